"""The relay: a Flask app that streams a model's answer as Server-Sent Events."""
import dataclasses
import json
import logging
import re
import socket
import time
import uuid
from functools import partial

import gevent
from flask import Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

import auth
import config
import db
import demo
import diagnostics
import metrics
import providers
import stops
import sse
from sse import WAIT, Cancelled, EventStream, ServerSentEvent, to_json, when_idle

log = logging.getLogger("relay")

ROLES = ("system", "user", "assistant")
# A client may name its generation, so it can ask the log about it even if it stops the
# stream before the `start` event arrives.
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{8,64}")

SHUTDOWN_ERROR = {"status": "error", "type": "server_shutdown",
                  "message": "The server is restarting; the answer was cut short. Retry to continue."}


CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class BadRequest(Exception):
    """The request body is not a valid chat request."""


def parse_chat_request(body):
    """Return (messages, max_tokens, id or None, lease_seconds or None) from a /api/chat body, or raise BadRequest."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}] must be an object")
        if message.get("role") not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise BadRequest(f"messages[{i}].content must be a string")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (type(max_tokens) is not int or not 1 <= max_tokens <= 1_000_000):
        raise BadRequest("max_tokens must be an integer from 1 to 1000000")
    gen_id = body.get("id")
    if gen_id is not None and (not isinstance(gen_id, str) or not ID_PATTERN.fullmatch(gen_id)):
        raise BadRequest("id must be 8 to 64 letters, digits, '_' or '-'")
    lease = body.get("lease_seconds")
    if lease is not None and (type(lease) not in (int, float) or not 1 <= lease <= 3600):
        raise BadRequest("lease_seconds must be a number from 1 to 3600")
    return [{"role": m["role"], "content": m["content"]} for m in messages], max_tokens, gen_id, lease


def read_json():
    """Return the request body parsed as JSON, or None if it is not JSON (however malformed)."""
    try:
        return json.loads(request.get_data())
    except (ValueError, RecursionError):  # RecursionError: e.g. 100,000 nested [
        return None


def error_response(status, type, message):
    """Return the JSON error every non-streaming failure uses."""
    return jsonify(error={"type": type, "message": message}), status


def _ms(start, end):
    return None if start is None or end is None else round((end - start) * 1000, 1)


def delta(text):
    """Return the `delta` event of one text piece: the one event per token, so its JSON is built by hand."""
    return ServerSentEvent("delta", '{"text": ' + to_json(text) + "}")


def generation(settings, gen_id, messages, max_tokens, stopped="", source=None):
    """Yield one generation's events, and finish its row in the log (before the last event) whatever ends it.

    `source(info)` gives the text pieces; by default the configured provider's (diagnostics.py ticks instead).
    """
    started, first = time.monotonic(), None
    pieces, info = [], {}
    row = {"status": "complete", "cancel_reason": None, "error": None}
    final = None
    yield ServerSentEvent("start", {"id": gen_id, "model": settings.model})
    try:
        if stopped:
            raise Cancelled(stopped)  # a stop came before its chat: the provider is never asked
        for text in (source or partial(providers.stream, settings, messages, max_tokens))(info):
            if text is WAIT:
                yield WAIT  # the provider is silent: EventStream waits for it (sse.WAIT)
                continue
            if first is None:
                first, row["first_token_at"] = time.monotonic(), db.now()
            pieces.append(text)
            yield delta(text)
        final = ServerSentEvent("done", {"status": "complete", "finish_reason": info.get("finish_reason"),
                                         "usage": info.get("usage")})
    except gevent.GreenletExit as stop:
        # Cancelled; or gunicorn killing its handler after graceful_timeout, which runs these
        # events itself (sse.init_app) and must end.
        row.update(status="cancelled", cancel_reason=getattr(stop, "reason", "server_shutdown"))
        if not isinstance(stop, Cancelled):
            raise
        if stop.stopped_at is not None and info.get("request_id") is not None:
            # The provider's connection is closed by now (the `with` in post_stream has exited).
            metrics.stop_closed(stop.reason, time.monotonic() - stop.stopped_at)
    except Exception as exc:
        error = exc if source else providers.upstream_error(exc, settings)
        if isinstance(error, providers.UpstreamError):
            row.update(status="error", error=f"{error.type}: {error.message}")
            info["error_type"] = error.type
            final = ServerSentEvent("error", error.event_data())
        else:
            log.exception("generation %s failed", gen_id)
            row.update(status="error", error="internal_error")
            final = ServerSentEvent("error", {"status": "error", "type": "internal_error",
                                              "message": "the relay failed; see the server log"})
    finally:
        stops.untrack(gen_id)
        # Before the last event, so a client that has read it finds the same outcome in the
        # log from any worker or machine. In a greenlet of its own: a Stop that lands now
        # interrupts this one and must not lose the row.
        status, reason = gevent.spawn(finish, settings, gen_id, row, pieces, info, started, first).get()
    if status == "cancelled" and reason in ("stop_request", "lease_expired"):
        # The stop request may have settled the outcome before the provider finished: it stands.
        final = ServerSentEvent("cancelled", {"status": "cancelled", "cancel_reason": reason})
    elif reason == "server_shutdown":
        final = ServerSentEvent("error", SHUTDOWN_ERROR)
    if final is not None:
        yield final


def finish(settings, gen_id, row, pieces, info, started, first):
    """Write a generation's row and its log line once its stream has ended; return the outcome the log keeps."""
    ended, ended_at = time.monotonic(), db.now()
    if row["cancel_reason"] == "client_disconnect":
        when_idle()  # nobody waits for this row: when many streams stop at once, every one closes its upstream first
    estimate = usage_estimate(info.get("usage"), pieces, info)
    fields = dict(ended_at=ended_at, chunks=len(pieces), text="".join(pieces), upstream_request_id=info.get("request_id"),
                  finish_reason=info.get("finish_reason"), usage=info.get("usage"), usage_estimate=estimate, **row)
    try:
        status, reason = db.finish_generation(settings.database_url, gen_id, **dict(fields))
    except db.Unavailable as exc:
        log.warning("generation %s: its final row could not be written (%s); retrying until the store is back", gen_id, exc)
        gevent.spawn(_write_row_later, settings.database_url, gen_id, fields)
        status, reason = row["status"], row["cancel_reason"]
    log.info(json.dumps({"generation": gen_id, "status": status, "reason": reason,
                         "chunks": len(pieces), "ttft_ms": _ms(started, first),
                         "total_ms": _ms(started, ended), "error": row["error"], "usage_estimate": estimate}))
    reported = _output_tokens(info.get("usage"))
    metrics.generation_ended(settings.provider, status, reason, info.get("error_type"), len(pieces), ended - started,
                             None if first is None else first - started,
                             reported if reported is not None else (estimate or {}).get("output_tokens"),
                             estimated=reported is None)
    return status, reason


def _output_tokens(usage):
    """Return the output tokens a provider reported (OpenAI, Ollama or Anthropic names), or None."""
    if not isinstance(usage, dict):
        return None
    value = usage.get("completion_tokens", usage.get("output_tokens"))
    return value if type(value) is int else None


def usage_estimate(usage, pieces, info):
    """Return what is known of a generation's usage when the provider reported none, or None.

    Cheap on purpose (no tokenizer in the event loop): output tokens are a lower bound, the
    text pieces relayed, each of which the provider sent for at least one token.
    """
    if _output_tokens(usage) is not None:
        return None
    estimate = {"output_tokens": sum(1 for piece in pieces if piece), "output_tokens_method": "lower bound: text pieces relayed"}
    if info.get("input_tokens") is not None:
        estimate.update(input_tokens=info["input_tokens"], input_tokens_source="provider: message_start")
    return estimate


def _write_row_later(url, gen_id, fields, attempts=600):
    """Retry a final row every second while the store is down; say so loudly if it never comes back."""
    for _ in range(attempts):
        gevent.sleep(1)
        try:
            db.finish_generation(url, gen_id, **dict(fields))
            log.warning("generation %s: final row written after the store came back", gen_id)
            return
        except db.Unavailable:
            pass
    log.error("generation %s: FINAL ROW LOST, the store was unavailable for %d s: %s", gen_id, attempts, json.dumps(fields))


def create_app(settings=None):
    """Create the relay app with settings from the environment unless given."""
    settings = settings or config.from_env()
    app = Flask(__name__)
    app.config["SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    if settings.trusted_proxies:
        # Only as many X-Forwarded-For hops as there are proxies of ours: a client's own
        # X-Forwarded-For header is never believed.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies)
    db.init(settings.database_url)
    sse.init_app(app)  # one greenlet per stream: the response's own reads and writes its events
    if settings.provider == "demo":
        demo.init_app(app)  # the demo model's routes exist only when it is the provider
    stops.init_app(app)
    metrics.init_app(app)
    diagnostics.init_app(app)
    if settings.log_retention_days:
        start_retention(settings)

    @app.after_request
    def security_headers(response):
        # Only our own scripts, styles and fetches: injected markup could not run even if
        # model output were ever rendered as HTML (the page uses textContent only).
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        return response

    @app.errorhandler(db.Unavailable)
    def store_unavailable(exc):
        log.error("the store is unavailable: %s", exc)
        return error_response(503, "log_unavailable", "the generation log is unavailable; retry shortly")

    @app.errorhandler(HTTPException)
    def http_error(exc):
        type = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}.get(exc.code, "http_error")
        return error_response(exc.code, type, exc.description)

    @app.get("/")
    def index():
        return render_template("index.html", demo=settings.provider == "demo", model=settings.model)

    @app.get("/favicon.ico")
    def favicon():
        return "", 204

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "provider": settings.provider, "model": settings.model}

    @app.post("/api/chat")
    def chat():
        if not request.is_json:
            return error_response(415, "unsupported_media_type", "send the body as application/json")
        body = read_json()
        if isinstance(body, dict) and "diagnostic" in body:
            return diagnostics.stream(body)  # the doctor's stream: same route, same proxies, no tokens
        try:
            messages, max_tokens, gen_id, lease = parse_chat_request(body)
        except BadRequest as exc:
            return error_response(400, "invalid_request", str(exc))
        run = settings
        if settings.provider == "demo" and not settings.base_url:
            run = dataclasses.replace(settings, base_url=_own_url(request.environ) + "/demo/v1")
        return open_stream(run, gen_id, lease, partial(generation, run, messages=messages, max_tokens=max_tokens))

    @app.get("/api/generations")
    def generations():
        # Every user's conversations: for the operator only. One record stays readable by its id.
        denied = auth.require_token(settings.admin_token, names="ADMIN_TOKEN")
        if denied:
            return denied
        limit = request.args.get("limit", "20")
        if not (limit.isascii() and limit.isdigit()) or not 1 <= int(limit) <= 1000:
            return error_response(400, "invalid_request", "limit must be an integer from 1 to 1000")
        return jsonify(generations=db.list_generations(settings.database_url, int(limit)))

    @app.get("/api/generations/<gen_id>")
    def generation_record(gen_id):
        record = db.get_generation(settings.database_url, gen_id)
        if record is None:
            return error_response(404, "not_found", f"no generation {gen_id}")
        return jsonify(record)

    return app


def open_stream(settings, gen_id, lease, events):
    """Record a new generation and return its event stream, or the JSON error that refused it before any streaming.

    `events(gen_id=..., stopped=...)` makes the generation's events (generation() with its source).
    """
    if len(stops.open_streams()) >= settings.max_streams_per_worker:
        metrics.REJECTED.labels("server_busy").inc()
        response = error_response(503, "server_busy", "this worker has as many open streams as it takes"
                                  " (MAX_STREAMS_PER_WORKER); retry shortly")
        return (*response, {"Retry-After": "5"})
    gen_id = gen_id or "gen_" + uuid.uuid4().hex
    try:
        stopped = db.start_generation(settings.database_url, gen_id, settings.provider, settings.model,
                                      settings.instance_id, lease, request.remote_addr, settings.max_streams_per_client)
    except db.Unavailable as exc:
        # Never a stream that could be neither logged nor stopped.
        log.error("chat refused: the store is unavailable: %s", exc)
        metrics.REJECTED.labels("log_unavailable").inc()
        return error_response(503, "log_unavailable",
                              "the generation log is unavailable, so the answer could not be logged or stopped; retry shortly")
    except db.IdTaken:
        return error_response(409, "conflict", f"a generation with id {gen_id} exists already")
    except db.ClientLimit:
        metrics.REJECTED.labels("too_many_streams").inc()
        response = error_response(429, "too_many_streams", "this client has as many streams open as it may"
                                  " (MAX_STREAMS_PER_CLIENT); stop one or retry later")
        return (*response, {"Retry-After": "5"})
    stream = EventStream(events(gen_id=gen_id, stopped=stopped), request.environ, settings.keepalive)
    stops.track(settings, gen_id, stream)
    # X-Accel-Buffering: nginx must pass each event on at once.
    return Response(stream, mimetype="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                    direct_passthrough=True)


def start_retention(settings):
    """Delete log rows older than LOG_RETENTION_DAYS now and every hour, off the event loop."""
    def prune():
        while True:
            try:
                count = db.delete_older_than(settings.database_url, time.time() - settings.log_retention_days * 86400)
                if count:
                    log.info(json.dumps({"retention": "deleted", "rows": count, "days": settings.log_retention_days}))
            except db.Unavailable as exc:
                log.warning("log retention: the store is unavailable (%s); trying again in an hour", exc)
            gevent.sleep(3600)

    gevent.spawn(prune)


def _own_url(environ):
    """Return the base URL of the socket this request came in on, to reach the demo model."""
    sock = environ.get("gunicorn.socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        host, port = sock.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    return request.host_url.rstrip("/")
