"""The embedded demo model: an OpenAI-compatible streaming endpoint under /demo/v1.

It stops generating the moment its client (the relay) disconnects, and its meter,
GET /demo/v1/requests/<id>, shows how many tokens it generated after that.
Directives in the last user message provoke each case (the README lists them):
/long, /words N, /rate N, /pause S (before the response), /stall S (after the fifth
token), /fail (an error after the fifth token), /echo TEXT.
"""
import re
import time
import uuid

import gevent
from gevent.event import AsyncResult
from flask import Blueprint, Response, current_app, jsonify, request

import db
from sse import Cancelled, EventStream, ServerSentEvent, watch_disconnect

bp = Blueprint("demo", __name__, url_prefix="/demo/v1")

ANSWER = (
    "Most stop buttons only hide the text. The page stops drawing, but the server keeps "
    "reading from the model, and the model keeps generating tokens that nobody will read "
    "and somebody will pay for. This relay is different. When you press Stop, the browser "
    "aborts its request. The proxy closes its connection to the worker, and the worker "
    "notices at once because it watches the client socket instead of waiting for its next "
    "write. It then kills the greenlet that reads from the model, which closes that "
    "connection too, so the model stops within a token or two. Every link of that chain "
    "has a test that fails when the link is removed. "
)
LONG_ANSWER = ANSWER + (
    "A stream can go quiet for many reasons: the request waits in a queue, the prompt is "
    "long, or a reasoning model thinks before it speaks. During such a silence the relay "
    "sends a comment line now and then, so that proxies and browsers see a live connection "
    "and do not time it out. The comment carries no text, and the page ignores it. "
    "When the answer ends, for whatever reason, the relay writes one row to the generation "
    "log: complete, cancelled with the reason, or error with the message. That log lives in "
    "SQLite and is shared by every worker, so any of them can answer a question about any "
    "generation. The demo model keeps a meter in the same store: how many tokens it made, "
    "when its client left, and how many tokens it made after that. With a real stop button "
    "that last number is zero or one. "
) * 2


def _tokens(text):
    """Split text into word pieces with their leading space, like a tokenizer would."""
    return re.findall(r"\s*\S+", text)


def _plan(messages, default_rate):
    """Read the directives of the last user message; return the tokens and the pacing."""
    prompt = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    plan = {"rate": default_rate, "pause": 0.0, "stall": 0.0, "fail": False}
    echo = re.search(r"/echo\s(.*)", prompt, re.S)
    if echo:
        tokens = _tokens(echo.group(1)) or [""]
    elif "/long" in prompt:
        tokens = _tokens(LONG_ANSWER)
    else:
        tokens = _tokens(ANSWER)
    for name, value in re.findall(r"/(words|rate|pause|stall)\s+(\d+(?:\.\d+)?)", prompt):
        if name == "words":
            words = _tokens(LONG_ANSWER)
            tokens = [words[i % len(words)] for i in range(int(value))]
        else:
            plan[name] = float(value)
    plan["fail"] = "/fail" in prompt
    plan["tokens"] = tokens
    return plan


def _chunk(request_id, model, delta=None, finish_reason=None, usage=None):
    choices = [] if usage else [{"index": 0, "delta": delta or {}, "finish_reason": finish_reason}]
    chunk = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
             "model": model, "choices": choices}
    if usage:
        chunk["usage"] = usage
    return ServerSentEvent(data=chunk)


def _generate(store, request_id, model, plan, max_tokens, prompt_tokens, sock):
    """Yield the completion's chunks at the planned pace; meter what happened when it ends."""
    tokens = plan["tokens"][:max_tokens] if max_tokens else plan["tokens"]
    made = []  # monotonic time of each token made
    status = "complete"
    # The meter sees the client leave on its own, apart from the stop logic it checks.
    left = AsyncResult()
    watcher = watch_disconnect(sock, lambda _: left.set(time.monotonic())) if sock else None
    try:
        gevent.sleep(plan["pause"])
        yield _chunk(request_id, model, {"role": "assistant", "content": ""})
        for i, token in enumerate(tokens):
            if i == 5 and plan["stall"]:
                gevent.sleep(plan["stall"])
            if i == 5 and plan["fail"]:
                status = "failed"
                yield ServerSentEvent(data={"error": {"type": "server_error", "message": "demo: simulated failure (/fail)"}})
                return
            gevent.sleep(1 / plan["rate"])
            made.append(time.monotonic())
            yield _chunk(request_id, model, {"content": token})
        finish = "length" if max_tokens and len(plan["tokens"]) > max_tokens else "stop"
        yield _chunk(request_id, model, finish_reason=finish)
        yield _chunk(request_id, model, usage={"prompt_tokens": prompt_tokens, "completion_tokens": len(made),
                                               "total_tokens": prompt_tokens + len(made)})
        yield ServerSentEvent(data="[DONE]")
    except Cancelled:
        status = "disconnected"
    finally:
        left_iso = after = None
        if watcher is not None:
            left.wait(timeout=0.1 if status == "disconnected" else 0)
            watcher.close()
        left_at = left.value
        if left_at:
            status = "disconnected"
            after = sum(1 for t in made if t > left_at)
            left_iso = db.iso(time.time() - (time.monotonic() - left_at))
        db.execute(store, "UPDATE demo_requests SET status = ?, ended_at = ?, tokens_generated = ?,"
                            " client_disconnected_at = ?, tokens_after_disconnect = ? WHERE id = ?",
                   (status, db.now(), len(made), left_iso, after, request_id))


@bp.post("/chat/completions")
def chat_completions():
    """Stream a chat completion in OpenAI's format."""
    body = request.get_json(silent=True)
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return jsonify(error={"type": "invalid_request_error", "message": "messages is required"}), 400
    settings = current_app.config["SETTINGS"]
    request_id = "demo-" + uuid.uuid4().hex
    plan = _plan(body["messages"], settings.demo_tokens_per_second)
    prompt_tokens = sum(len(_tokens(str(m.get("content", "")))) for m in body["messages"])
    db.execute(settings.database_url, "INSERT INTO demo_requests (id, status, started_at) VALUES (?, 'generating', ?)",
               (request_id, db.now()))
    sock = request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket")
    events = _generate(settings.database_url, request_id, body.get("model") or "demo", plan,
                       body.get("max_tokens"), prompt_tokens, sock)
    # keepalive=None: a real provider's silence is silent, so the relay's own keepalive shows.
    return Response(EventStream(events, request.environ, keepalive=None), mimetype="text/event-stream",
                    headers={"x-request-id": request_id, "Cache-Control": "no-cache"})


@bp.get("/requests/<request_id>")
def request_meter(request_id):
    """Report what the demo model did for one request."""
    rows = db.execute(current_app.config["SETTINGS"].database_url,
                      "SELECT * FROM demo_requests WHERE id = ?", (request_id,))
    if not rows:
        return jsonify(error={"type": "not_found", "message": f"no demo request {request_id}"}), 404
    return jsonify(dict(rows[0]))


def init_app(app):
    """Serve the demo model from this app."""
    app.register_blueprint(bp)
