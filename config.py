"""Settings read from environment variables, checked once at start-up."""
import math
import os
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

PROVIDERS = ("demo", "openai", "anthropic", "ollama")

# Where each provider lives when LLM_BASE_URL is not set. The demo model is served by this
# same app, so its URL is taken from the listening socket of each request (see app.py).
DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "ollama": "http://127.0.0.1:11434",
}


class ConfigError(ValueError):
    """A setting has a bad value; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    provider: str = "demo"
    base_url: str = ""
    api_key: str = ""
    model: str = "demo"
    keepalive: float = 15.0
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    database_url: str = "sqlite:///data/generations.db"
    instance_id: str = "local"
    demo_tokens_per_second: float = 20.0
    max_request_bytes: int = 1_000_000
    admin_token: str = ""
    metrics_token: str = ""
    log_retention_days: float = 0.0  # 0: keep forever
    max_streams_per_worker: int = 1000
    max_streams_per_client: int = 0  # 0: no limit
    trusted_proxies: int = 0


def _number(env, name, default, cast=float):
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = cast(raw)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a positive number, got {raw!r}")
    return value


def _count(env, name, default):
    """Read a whole number >= 0 (0 meaning off or none)."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()):
        raise ConfigError(f"{name} must be a whole number (0 or more), got {raw!r}")
    return int(raw)


def _worker_streams(env, provider):
    """The default MAX_STREAMS_PER_WORKER: gunicorn's worker_connections, less room for other requests."""
    connections = _count(env, "WORKER_CONNECTIONS", 1000) or 1000
    # Stop, lease and page requests need a few connections; each demo chat also holds the
    # demo model's own connection, on this worker or another.
    room = max(10, connections // 50)
    return max(1, (connections - room) // (2 if provider == "demo" else 1))


def from_env(env=os.environ):
    """Build Settings from the environment, or raise ConfigError naming the bad variable."""
    provider = env.get("LLM_PROVIDER", "").strip().lower() or "demo"
    if provider not in PROVIDERS:
        raise ConfigError(f"LLM_PROVIDER must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    base_url = env.get("LLM_BASE_URL", "").strip().rstrip("/") or DEFAULT_BASE_URLS.get(provider, "")
    if base_url and (urlparse(base_url).scheme not in ("http", "https") or not urlparse(base_url).netloc):
        raise ConfigError(f"LLM_BASE_URL must be an http(s) URL, got {base_url!r}")
    model = env.get("LLM_MODEL", "").strip() or ("demo" if provider == "demo" else "")
    if not model:
        raise ConfigError(f"LLM_MODEL must name the model when LLM_PROVIDER={provider}")
    api_key = env.get("LLM_API_KEY", "").strip()
    if provider == "anthropic" and not api_key:
        raise ConfigError("LLM_API_KEY must be set when LLM_PROVIDER=anthropic")
    database_url = env.get("DATABASE_URL", "").strip()
    if not database_url:
        database_url = "sqlite:///" + (env.get("GENERATIONS_DB", "").strip() or "data/generations.db")
    elif not database_url.startswith(("sqlite:///", "postgres://", "postgresql://")):
        raise ConfigError(f"DATABASE_URL must start with sqlite:///, postgresql:// or postgres://, got {database_url.split(':', 1)[0]!r}")
    return Settings(
        provider=provider,
        base_url=base_url,
        api_key=api_key,
        model=model,
        keepalive=_number(env, "KEEPALIVE_SECONDS", 15.0),
        connect_timeout=_number(env, "UPSTREAM_CONNECT_TIMEOUT", 10.0),
        read_timeout=_number(env, "UPSTREAM_READ_TIMEOUT", 300.0),
        database_url=database_url,
        instance_id=env.get("INSTANCE_ID", "").strip() or socket.gethostname(),
        demo_tokens_per_second=_number(env, "DEMO_TOKENS_PER_SECOND", 20.0),
        max_request_bytes=_number(env, "MAX_REQUEST_BYTES", 1_000_000, int),
        admin_token=env.get("ADMIN_TOKEN", "").strip(),
        metrics_token=env.get("METRICS_TOKEN", "").strip(),
        log_retention_days=_number(env, "LOG_RETENTION_DAYS", 0.0),
        max_streams_per_worker=_count(env, "MAX_STREAMS_PER_WORKER", 0) or _worker_streams(env, provider),
        max_streams_per_client=_count(env, "MAX_STREAMS_PER_CLIENT", 0),
        trusted_proxies=_count(env, "TRUSTED_PROXIES", 0),
    )
