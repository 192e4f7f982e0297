"""Our relay (`ours`) and the naive one (`naive`) with tracemalloc on, for bench/profile.py.

GET /_tracemalloc/snap takes a snapshot; GET /_tracemalloc/diff returns what was allocated
since then and is still alive, by allocation site (file:line).
"""
import json
import tracemalloc

tracemalloc.start(1)

from bench import naive_relay  # noqa: E402
from wsgi import app as relay  # noqa: E402

_snapshot = []


def _traced(app):
    def wrapped(environ, start_response):
        """Serve the two tracemalloc routes; pass everything else to the app."""
        path = environ.get("PATH_INFO", "")
        if not path.startswith("/_tracemalloc/"):
            return app(environ, start_response)
        import gc
        gc.collect()
        snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        if path.endswith("/snap"):
            _snapshot[:] = [snap]
            body = {"ok": True}
        else:
            stats = snap.compare_to(_snapshot[0], "lineno")
            body = {"stats": [{"size": s.size_diff, "count": s.count_diff,
                               "where": f"{s.traceback[0].filename}:{s.traceback[0].lineno}"} for s in stats]}
        data = json.dumps(body).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]
    return wrapped


ours = _traced(relay)
naive = _traced(naive_relay.app)
