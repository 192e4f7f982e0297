"""The floor: what any relay that parses each event pays on this stack, and nothing more.

    gunicorn -k gevent bench.floor_relay:app     (UPSTREAM_URL=http://127.0.0.1:9000/v1)

It does per event what ours must (sseclient-py, json.loads, one `delta` event written, the
provider read through our session's 1 KB buffer, iter_chunks as it arrives), in gunicorn's
one handler greenlet per stream. It has no Stop, no keepalive, no read timeout, no log and
no limits: a gone client is noticed when a write fails, and a silent provider holds the
stream forever.
"""
import json
import os
from types import SimpleNamespace

from flask import Flask, Response, request

from app import delta
from providers.base import post_stream
from sse import sse_events

app = Flask(__name__)
# No read timeout: a gevent socket's timeout is a timer per wait.
UPSTREAM = SimpleNamespace(base_url=os.environ.get("UPSTREAM_URL"), connect_timeout=10, read_timeout=None)


@app.post("/api/chat")
def chat():
    upstream = post_stream(UPSTREAM, "/chat/completions", {**request.get_json(), "stream": True}, {}, {})

    def relay():
        with upstream:
            for event in sse_events(upstream):
                if event.data == "[DONE]":
                    return
                for choice in json.loads(event.data).get("choices") or ():
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield delta(text).encode()

    return Response(relay(), mimetype="text/event-stream", direct_passthrough=True)


@app.get("/healthz")
def healthz():
    return {"status": "ok"}
