"""The baseline: the usual Flask relay, which notices a gone client only when a write fails.

    gunicorn -k gevent bench.naive_relay:app     (UPSTREAM_URL=http://127.0.0.1:9000/v1)
"""
import os

import requests
from flask import Flask, Response, request

app = Flask(__name__)


@app.post("/api/chat")
def chat():
    upstream = requests.post(os.environ["UPSTREAM_URL"] + "/chat/completions", json={**request.get_json(), "stream": True},
                             stream=True, timeout=(10, 300))

    def relay():
        with upstream:
            for line in upstream.iter_lines():
                yield line + b"\n"

    return Response(relay(), mimetype="text/event-stream")


@app.get("/healthz")
def healthz():
    return {"status": "ok"}
