"""Cancel propagation of the copied core (examples/myapp.py + sse.py) on each server; prints a table.

    .venv/bin/python bench/servers.py [--quick]

The same measure as bench/cancel.py (client close -> the provider sees its connection close,
one CLOCK_MONOTONIC), for gunicorn -k gevent, gunicorn -k gthread --threads 128 and
flask run, each serving the copied app from an empty directory, as tests/test_copied_core.py does.
"""
import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from cancel import PHASES, cancel_once, outcomes, print_cancel, summarize  # noqa: E402
from harness import SSE, Upstream, scenario  # noqa: E402
from test_copied_core import CopiedApp  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs, for a smoke test")
    args = parser.parse_args()
    runs, crowd = (5, 20) if args.quick else (30, 100)
    upstream = Upstream()
    tmp = Path(tempfile.mkdtemp(prefix="bench-servers-"))
    rows, bursts = [], []
    try:
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, loopback, the copied core (examples/myapp.py)")
        for name, args_ in (("gunicorn -k gevent", ()), ("gunicorn -k gthread --threads 128", ("--threads", "128")),
                            ("flask run", ())):
            server = {"gunicorn -k gevent": "gevent", "flask run": "flask run"}.get(name, "gthread")
            (tmp / server).mkdir(exist_ok=True)
            app = CopiedApp(tmp / server, server, upstream, args=args_, KEEPALIVE="15")
            try:
                for phase in ("tokens flowing", "before headers", "mid-stream silence"):
                    samples = [cancel_once(upstream, app.port, "/stream", phase) for _ in range(runs)]
                    rows.append((name, phase, summarize(samples)))
                tags = [uuid.uuid4().hex for _ in range(crowd if server != "flask run" else crowd // 2)]
                streams = [SSE(app.port, scenario(tag=t, **PHASES["mid-stream silence"]), path="/stream") for t in tags]
                for stream in streams:
                    stream.read_until("delta", 3)
                time.sleep(0.1)
                closed = {t: s.close() for t, s in zip(tags, streams)}
                bursts.append((name, f"{len(tags)} silent streams closed at once", summarize(outcomes(upstream, closed))))
                time.sleep(0.5)
            finally:
                app.stop()
        print_cancel("Cancel propagation of the copied core, one stream (client close -> provider sees its connection close)",
                     rows)
        print_cancel("Cancel propagation of the copied core, many streams closed at once", bursts)
    finally:
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
