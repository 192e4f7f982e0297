"""The three relays of bench/capacity.py with two routes that bracket a callgrind window, for bench/instructions.py.

GET /_callgrind/start zeroes callgrind's counts and starts counting; GET /_callgrind/dump
writes what was counted since then to the worker's callgrind file and stops. Each answers
with the time.monotonic() at which it did so (one clock for every process on the machine),
so the clients can count exactly the events the worker relayed in between. The library
at $CALLGRIND_TOGGLE (built by bench/instructions.py from valgrind's callgrind.h) holds the
two client requests, which are no-ops outside valgrind.
"""
import ctypes
import json
import os
import time

from bench import floor_relay, naive_relay
from wsgi import app as relay

_toggle = ctypes.CDLL(os.environ["CALLGRIND_TOGGLE"])


def _counted(app):
    def wrapped(environ, start_response):
        """Serve the two callgrind routes; pass everything else to the app."""
        path = environ.get("PATH_INFO", "")
        if not path.startswith("/_callgrind/"):
            return app(environ, start_response)
        _toggle.start() if path.endswith("/start") else _toggle.dump()
        body = json.dumps({"at": time.monotonic()}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    return wrapped


ours = _counted(relay)
naive = _counted(naive_relay.app)
floor = _counted(floor_relay.app)
