"""The relay: a Flask app that streams a model's answer as Server-Sent Events."""
import dataclasses
import json
import logging
import re
import socket
import time
import uuid

import gevent
from flask import Flask, Response, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

import config
import db
import demo
import providers
import stops
from sse import Cancelled, EventStream, ServerSentEvent, when_idle

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


def error_response(status, type, message):
    """Return the JSON error every non-streaming failure uses."""
    return jsonify(error={"type": type, "message": message}), status


def _ms(start, end):
    return None if start is None or end is None else round((end - start) * 1000, 1)


def generation(settings, gen_id, messages, max_tokens, stopped=""):
    """Yield one generation's events, and finish its row in the log (before the last event) whatever ends it."""
    started, first = time.monotonic(), None
    pieces, info = [], {}
    row = {"status": "complete", "cancel_reason": None, "error": None}
    final = None
    yield ServerSentEvent("start", {"id": gen_id, "model": settings.model})
    try:
        if stopped:
            raise Cancelled(stopped)  # a stop came before its chat: the provider is never asked
        for text in providers.stream(settings, messages, max_tokens, info):
            if first is None:
                first, row["first_token_at"] = time.monotonic(), db.now()
            pieces.append(text)
            yield ServerSentEvent("delta", {"text": text})
        final = ServerSentEvent("done", {"status": "complete", "finish_reason": info.get("finish_reason"),
                                         "usage": info.get("usage")})
    except Cancelled as stop:
        row.update(status="cancelled", cancel_reason=stop.reason)
    except providers.UpstreamError as exc:
        row.update(status="error", error=f"{exc.type}: {exc.message}")
        final = ServerSentEvent("error", exc.event_data())
    except Exception:
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
    fields = dict(ended_at=ended_at, chunks=len(pieces), text="".join(pieces), upstream_request_id=info.get("request_id"),
                  finish_reason=info.get("finish_reason"), usage=info.get("usage"), **row)
    try:
        status, reason = db.finish_generation(settings.database_url, gen_id, **dict(fields))
    except db.Unavailable as exc:
        log.warning("generation %s: its final row could not be written (%s); retrying until the store is back", gen_id, exc)
        gevent.spawn(_write_row_later, settings.database_url, gen_id, fields)
        status, reason = row["status"], row["cancel_reason"]
    log.info(json.dumps({"generation": gen_id, "status": status, "reason": reason,
                         "chunks": len(pieces), "ttft_ms": _ms(started, first),
                         "total_ms": _ms(started, ended), "error": row["error"]}))
    return status, reason


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
    db.init(settings.database_url)
    demo.init_app(app)
    stops.init_app(app)

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
        try:
            messages, max_tokens, gen_id, lease = parse_chat_request(request.get_json(silent=True))
        except BadRequest as exc:
            return error_response(400, "invalid_request", str(exc))
        run = settings
        if settings.provider == "demo" and not settings.base_url:
            run = dataclasses.replace(settings, base_url=_own_url(request.environ) + "/demo/v1")
        gen_id = gen_id or "gen_" + uuid.uuid4().hex
        try:
            stopped = db.start_generation(settings.database_url, gen_id, settings.provider, settings.model,
                                          settings.instance_id, lease)
        except db.Unavailable as exc:
            # Never a stream that could be neither logged nor stopped.
            log.error("chat refused: the store is unavailable: %s", exc)
            return error_response(503, "log_unavailable",
                                  "the generation log is unavailable, so the answer could not be logged or stopped; retry shortly")
        if stopped is None:
            return error_response(409, "conflict", f"a generation with id {gen_id} exists already")
        stream = EventStream(generation(run, gen_id, messages, max_tokens, stopped), request.environ, settings.keepalive)
        stops.track(settings, gen_id, stream)
        return Response(stream,
                        mimetype="text/event-stream",
                        # X-Accel-Buffering: nginx must pass each event on at once.
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/generations")
    def generations():
        limit = request.args.get("limit", "20")
        if not limit.isdigit() or not 1 <= int(limit) <= 1000:
            return error_response(400, "invalid_request", "limit must be an integer from 1 to 1000")
        return jsonify(generations=db.list_generations(settings.database_url, int(limit)))

    @app.get("/api/generations/<gen_id>")
    def generation_record(gen_id):
        record = db.get_generation(settings.database_url, gen_id)
        if record is None:
            return error_response(404, "not_found", f"no generation {gen_id}")
        return jsonify(record)

    return app


def _own_url(environ):
    """Return the base URL of the socket this request came in on, to reach the demo model."""
    sock = environ.get("gunicorn.socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        host, port = sock.getsockname()[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    return request.host_url.rstrip("/")
