"""Where one relayed event's CPU and one open stream's bytes go, ours vs the naive relay; prints tables.

    .venv/bin/python bench/profile.py [--seconds S] [--open N]

CPU: py-spy samples the gevent worker (500 Hz, `--format raw`) while 100 streams relay
20 tokens/s each; each sample is put in the first category below that matches its stack
(leaf first). Shares are of the samples py-spy counted as running; "~us per event" spreads
the worker's measured CPU per event (utime+stime over the same window) over them.
Memory: the worker runs with tracemalloc (bench/traced.py); the table is what N silent open
streams added to the Python heap, grouped by where it was allocated, per stream.
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import collections
import json
import linecache
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import gevent  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from capacity import cpu_seconds, flowing, open_silent, pin, relays  # noqa: E402
from harness import Server, Upstream  # noqa: E402

PY_SPY = os.path.join(os.path.dirname(sys.executable), "py-spy")

CPU_CATEGORIES = [  # (name, frame substrings); a sample goes to the first whose pattern is in its leaf-most match
    ("loop: libev, greenlet switches", ["Hub.run"]),
    ("write to the client (gunicorn chunked write, sendall)", ["Response.write (gunicorn"]),
    # (sse.py's idle(): is anything left to read before the stream waits at the top, tenth round)
    ("waiting machinery (gevent Timeout, watchers)", ["timeout.py", "_primitive_wait", "wait_on_watcher", "idle (sse",
                                                      "_wait_upstream (sse"]),
    ("read from the provider: recv", ["recv_into", "SocketIO.readinto", "readinto (sse"]),
    ("read from the provider: HTTP chunks (urllib3, http.client)", ["urllib3/response.py", "http/client.py"]),
    ("SSE parsing (sseclient-py)", ["sseclient/"]),
    ("JSON decoding", ["json/decoder.py", "loads (json"]),
    ("event encoding (ServerSentEvent, JSON)", ["encode (sse.py", "json/encoder.py", "delta (app.py"]),
    # (gevent's Queue is compiled: py-spy charges it to its caller, EventStream._run, below)
    ("hand-over producer -> writer", ["_put (sse", "_take (sse", "Waiter", "queue.py"]),
    ("werkzeug response iterators", ["werkzeug/"]),
    ("relay logic (adapter, generation, sse.py, naive view)", ["providers/", "generation (app", "sse.py", "naive_relay"]),
]

MEMORY_CATEGORIES = [  # (name, test of an allocation site "file:line" and its source line)
    # A greenlet that waits has its part of the C stack copied to the heap, charged to the line it waits on.
    ("greenlet stacks (copied out while a greenlet waits)",
     lambda where, src: "_socketcommon.py" in where or "hub.py" in where or ("sse.py" in where and ".get(" in src)
     or "._wait(" in src),  # sse.py's _ReadingWhenDrained waits on the socket itself
    ("socket read buffers (io.BufferedReader)", lambda where, src: "BufferedReader" in src),
    ("greenlets, timers and watchers",
     lambda where, src: any(p in src for p in ("gevent.spawn", ".link(", "loop.timer", "loop.io", "Waiter()"))
     or "gevent/" in where),
    ("requests / urllib3 / http.client response objects",
     lambda where, src: any(p in where for p in ("requests/", "urllib3/", "http/client.py", "email/", "http/cookiejar"))),
    ("gunicorn request and environ", lambda where, src: "gunicorn/" in where),
    ("last parsed event (json, sseclient-py)", lambda where, src: "json/" in where or "sseclient/" in where),
    ("relay objects (app, providers, sse.py, stops, naive view)", lambda where, src: True),
]


def get_json(url):
    """GET a tracemalloc route: a snapshot of a worker with hundreds of streams takes seconds."""
    with urllib.request.urlopen(url, timeout=300) as resp:
        return json.load(resp)


def source_line(where):
    """Return the source text of an allocation site "file:line"."""
    filename, _, line = where.rpartition(":")
    return linecache.getline(filename, int(line))


def categorize(sample_file, categories):
    """Return (samples per category, total samples) for a py-spy raw file, leaving out gevent's idle pool threads."""
    counts, total = collections.Counter(), 0
    for line in open(sample_file):
        stack, n = line.rsplit(" ", 1)
        if "_WorkerGreenlet.run" in stack or "threading.py" in stack:
            continue
        frames, n = stack.split(";")[::-1], int(n)
        total += n
        if any("Response.write (gunicorn" in f for f in frames):
            counts[categories[1][0]] += n
            continue
        name = next((name for f in frames for name, patterns in categories if any(p in f for p in patterns)), "other")
        counts[name] += n
    return counts, total


def cpu(tmp, upstream, seconds):
    """Profile each relay under load; return {relay: (shares by category, CPU us per event)}."""
    results = {}
    servers = relays(tmp, upstream)
    try:
        for name, server in servers.items():
            pin(server, upstream)
            worker, out = server.workers()[0], tmp / f"{name.split()[0]}.txt"
            spy = subprocess.Popen([PY_SPY, "record", "-p", str(worker), "-r", "500", "-d", str(int(seconds) + 1), "-f", "raw",
                                    "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            cpu, _, _, _ = flowing(server, upstream, 100, seconds, 0.05)
            per_1000 = sum(cpu)
            while spy.poll() is None:
                gevent.sleep(0.2)
            if spy.returncode:
                sys.exit(f"py-spy failed: {spy.stderr.read().decode().strip()}")
            counts, total = categorize(out, CPU_CATEGORIES)
            results[name] = ({k: v / total for k, v in counts.items()}, per_1000)
    finally:
        for server in servers.values():
            server.stop()
    return results


def memory(tmp, upstream, count):
    """Return {relay: {category: bytes per open stream}} from tracemalloc in the worker."""
    results = {}
    for name, app in (("ours", "bench.traced:ours"), ("naive Flask relay", "bench.traced:naive")):
        server = Server(tmp, app=app, LLM_PROVIDER="openai", LLM_BASE_URL=upstream.url + "/v1", LLM_MODEL="m",
                        UPSTREAM_URL=upstream.url + "/v1")
        try:
            for c in open_silent(server, 20, f"warm-{name[:5]}"):
                c.close()
            gevent.sleep(1)
            get_json(server.url + "/_tracemalloc/snap")
            clients = open_silent(server, count, f"prof-{name[:5]}")
            gevent.sleep(1)
            diff = get_json(server.url + "/_tracemalloc/diff")
            sizes = collections.Counter()
            for stat in diff["stats"]:
                where = stat["where"]
                cat = next(n for n, test in MEMORY_CATEGORIES if test(where, source_line(where)))
                sizes[cat] += stat["size"] / count
            results[name] = sizes
            for c in clients:
                c.close()
        finally:
            server.stop()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--open", type=int, default=300)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    upstream = Upstream()
    try:
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, one gevent worker per relay, loopback")
        results = cpu(tmp, upstream, args.seconds)
        names = list(results)
        print(f"\n### Where the worker's CPU goes: 100 streams x 20 tokens/s, py-spy for {args.seconds:g} s\n")
        print("| part | " + " | ".join(f"{n}: share / ~us per event" for n in names) + " |")
        print("|---|" + "---:|" * len(names))
        for part in [name for name, _ in CPU_CATEGORIES] + ["other"]:
            cells = [f"{results[n][0].get(part, 0) * 100:.1f} % / {results[n][0].get(part, 0) * results[n][1]:.0f}"
                     for n in names]
            print(f"| {part} | " + " | ".join(cells) + " |")
        print("| **CPU per event (measured)** | " + " | ".join(f"**{results[n][1]:.0f} us**" for n in names) + " |")
        mem = memory(tmp, upstream, args.open)
        print(f"\n### Where an open stream's Python heap goes: {args.open} silent streams, tracemalloc\n")
        print("| part | " + " | ".join(mem) + " |")
        print("|---|" + "---:|" * len(mem))
        for part, _ in MEMORY_CATEGORIES:
            print(f"| {part} | " + " | ".join(f"{mem[n].get(part, 0) / 1024:.1f} KB" for n in mem) + " |")
        print("| **total** | " + " | ".join(f"**{sum(mem[n].values()) / 1024:.1f} KB**" for n in mem) + " |")
    finally:
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
