"""Prometheus metrics at GET /metrics, added up across gunicorn's workers.

Under gunicorn each worker writes its own files in PROMETHEUS_MULTIPROC_DIR
(prometheus_client's multiprocess mode; gunicorn.conf.py sets and wipes it); without it,
one process's registry is served. Labels never carry ids, prompts or addresses.
"""
import os

from flask import Blueprint, Response, current_app
from prometheus_client import (CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram,
                               generate_latest, multiprocess)

import auth

bp = Blueprint("metrics", __name__)

# Seconds, from sub-millisecond stops to answers of many minutes.
FAST = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
SLOW = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

GENERATIONS = Counter("relay_generations", "Generations ended, by how they ended.",
                      ["provider", "status", "cancel_reason"])
OPEN_STREAMS = Gauge("relay_open_streams", "Chat streams open now.", multiprocess_mode="livesum")
REJECTED = Counter("relay_rejected_chats", "Chats refused before streaming, by reason.", ["reason"])
TTFT = Histogram("relay_time_to_first_token_seconds", "From the chat request to the first text piece.",
                 ["provider"], buckets=SLOW)
DURATION = Histogram("relay_generation_duration_seconds", "From the chat request to the end of its stream.",
                     ["provider", "status"], buckets=SLOW)
STOP_TO_CLOSE = Histogram("relay_stop_to_upstream_close_seconds",
                          "From a stop signal seen by the worker holding the stream to its provider connection closed.",
                          ["signal"], buckets=FAST)
PIECES = Counter("relay_text_pieces", "Text pieces relayed to clients.", ["provider"])
PROVIDER_ERRORS = Counter("relay_provider_errors", "Generations that ended in a provider error, by error type.",
                          ["provider", "type"])
TOKENS = Counter("relay_output_tokens", "Output tokens: as the provider reported them, or estimated where it"
                 " reported none (a lower bound: text pieces relayed).", ["provider", "source"])

# Error types the relay names itself; a provider's own mid-stream types are counted as "provider_other".
KNOWN_ERRORS = {"invalid_request", "authentication_error", "permission_error", "not_found", "rate_limited",
                "upstream_server_error", "upstream_overloaded", "upstream_timeout", "upstream_unreachable",
                "upstream_disconnected", "upstream_ended_early", "upstream_bad_response", "upstream_error",
                "internal_error", "server_error", "overloaded_error", "api_error", "rate_limit_error"}
SIGNALS = {"client_disconnect": "disconnect", "stop_request": "stop_request", "lease_expired": "lease",
           "server_shutdown": "shutdown"}


def generation_ended(provider, status, reason, error_type, pieces, seconds, ttft, output_tokens, estimated):
    """Count one generation once its row is written; never per token."""
    GENERATIONS.labels(provider, status, reason or "").inc()
    DURATION.labels(provider, status).observe(seconds)
    if ttft is not None:
        TTFT.labels(provider).observe(ttft)
    if pieces:
        PIECES.labels(provider).inc(pieces)
    if error_type:
        PROVIDER_ERRORS.labels(provider, error_type if error_type in KNOWN_ERRORS else "provider_other").inc()
    if output_tokens:
        TOKENS.labels(provider, "estimate" if estimated else "provider").inc(output_tokens)


def stop_closed(reason, seconds):
    """Record how long a stop took, from the signal to the provider connection closed."""
    STOP_TO_CLOSE.labels(SIGNALS.get(reason, "other")).observe(seconds)


@bp.get("/metrics")
def scrape():
    """Serve every worker's metrics, added up, to a holder of METRICS_TOKEN or ADMIN_TOKEN."""
    settings = current_app.config["SETTINGS"]
    denied = auth.require_token(settings.metrics_token, settings.admin_token, names="METRICS_TOKEN or ADMIN_TOKEN")
    if denied:
        return denied
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


def init_app(app):
    """Serve /metrics."""
    app.register_blueprint(bp)
