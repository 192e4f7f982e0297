"""A fresh Flask app with the copied core: the README's "Copy the core", as a file the tests run.

    cp sse.py examples/myapp.py into your project, then any of:
    gunicorn -k gevent myapp:app            # one process, many streams (the fast path)
    gunicorn -k gthread --threads 32 myapp:app
    flask --app myapp run                   # the dev server (threaded)
"""
import os

import requests
from flask import Flask, Response, request

from sse import Cancelled, EventStream, ServerSentEvent, init_app, sse_events

app = Flask(__name__)
init_app(app)                          # optional: one greenlet per stream under gevent (less memory and CPU)
http = requests.Session()
url = os.environ.get("UPSTREAM_URL", "http://127.0.0.1:11434/v1/chat/completions")  # any OpenAI-style stream


@app.post("/stream")
def stream():
    body = {"model": "any", "stream": True, "messages": request.get_json()["messages"]}

    def events():                      # runs in the response's greenlet (or its own greenlet, or a thread)
        try:
            with http.post(url, json=body, stream=True, timeout=(10, 300)) as resp:
                for event in sse_events(resp):          # as it arrives; never half an event
                    yield ServerSentEvent("delta", {"text": event.data})
        except Cancelled as stop:      # the client left (stop.reason): the upstream is closed
            app.logger.warning("stopped: %s", stop.reason)  # record what you need; do not yield to a gone client
    return Response(EventStream(events(), request.environ, keepalive=float(os.environ.get("KEEPALIVE", 15))),
                    mimetype="text/event-stream", headers={"X-Accel-Buffering": "no"})
