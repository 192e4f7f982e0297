"""The server's half of the deployment doctor (doctor.py): a diagnostic stream that costs no tokens.

`GET /api/diagnostics` tells the doctor the server's keepalive; `POST /api/chat` with a
`diagnostic` object (and ADMIN_TOKEN) streams ticks instead of asking the provider.

It runs through the same EventStream, log row, stop request and lease as a chat; only its
text pieces are ticks (the server's clock, epoch seconds) at the pace the doctor asks for.
Its record (provider `doctor`) says when the server saw the client leave (`ended_at`), by
which path (`cancel_reason`) and how many ticks it wrote (`chunks`).
"""
import dataclasses
import time

import gevent
from flask import Blueprint, current_app, jsonify

import auth

bp = Blueprint("diagnostics", __name__, url_prefix="/api/diagnostics")

LIMITS = {"interval": (0.01, 60.0), "ticks": (1, 1_000_000), "silence_after": (0, 1_000_000), "silence": (0.0, 3600.0)}


def _settings():
    return current_app.config["SETTINGS"]


def _denied():
    settings = _settings()
    return auth.require_token(settings.admin_token, names="ADMIN_TOKEN")


def ticks(interval, count, silence_after, silence):
    """Return a source of `count` ticks, `interval` apart, silent for `silence` s after `silence_after` of them."""
    def source(info):
        info["request_id"] = "diagnostic"  # stands for the provider connection in the stop metric
        for n in range(count):
            if n and n == silence_after:
                gevent.sleep(silence)
            elif n:
                gevent.sleep(interval)
            yield f"{time.time():.6f}"
        info["finish_reason"] = "stop"
    return source


@bp.get("")
def describe():
    """Tell the doctor what it needs to pick its tests: the keepalive, the instance."""
    denied = _denied()
    if denied:
        return denied
    settings = _settings()
    return jsonify(keepalive_seconds=settings.keepalive, instance_id=settings.instance_id, time=time.time())


def stream(body):
    """Answer POST /api/chat with {"diagnostic": {interval, ticks, silence_after, silence}, "id", "lease_seconds"}.

    On the chat's own route, so every proxy treats it exactly as a chat.
    """
    import app as relay  # the chat's own stream machinery

    denied = _denied()
    if denied:
        return denied
    asked = body["diagnostic"]
    if not isinstance(asked, dict):
        return relay.error_response(400, "invalid_request", "diagnostic must be an object")
    params = {}
    for name, (low, high) in LIMITS.items():
        value = asked.get(name, {"interval": 0.1, "ticks": 10, "silence_after": 0, "silence": 0.0}[name])
        if type(value) not in (int, float) or not low <= value <= high:
            return relay.error_response(400, "invalid_request", f"{name} must be a number from {low} to {high}")
        params[name] = value
    try:
        _, _, gen_id, lease = relay.parse_chat_request({"messages": [{"role": "user", "content": "diagnostic"}],
                                                        "id": body.get("id"), "lease_seconds": body.get("lease_seconds")})
    except relay.BadRequest as exc:
        return relay.error_response(400, "invalid_request", str(exc))
    run = dataclasses.replace(_settings(), provider="doctor", model="diagnostic")
    source = ticks(params["interval"], int(params["ticks"]), int(params["silence_after"]), params["silence"])
    return relay.open_stream(run, gen_id, lease, lambda **kw: relay.generation(run, messages=None, max_tokens=None,
                                                                              source=source, **kw))


def init_app(app):
    """Serve the diagnostic routes."""
    app.register_blueprint(bp)
