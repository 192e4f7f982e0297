"""What the parts of one open stream and of one event cost on their own on this Python; prints two tables.

    .venv/bin/python bench/parts.py [--count N]

Memory: each part is made N times in a fresh process (monkey-patched, greenlet-tree tracking off as
in gunicorn.conf.py) after a warm-up round of 100; the figures are the growth of RSS
(/proc/self/statm) and of the heap tracemalloc sees, divided by N. What RSS counts and the
heap does not is memory Python takes from the OS directly, such as the frame stack CPython
3.11 gives each greenlet (its own 16 KB chunk, of which the pages touched count).
CPU: each part runs in a fresh process too; the figure is process CPU time over the runs.
"""
import argparse
import os
import resource
import subprocess
import sys

PARTS = {
    "greenlet": "a gevent greenlet parked on an Event",
    "greenlet-deep": "a greenlet parked under 8 nested generators, as the producer is",
    "io-watcher": "a libev io watcher on a socket with a callback (the disconnect watcher)",
    "quiet": "a sse.Quiet timer (the keepalive and the read timeout use one each)",
}


def _as_a_worker():
    """Set this process up as gunicorn.conf.py sets up a worker: monkey-patched, greenlet-tree tracking off."""
    os.environ["GEVENT_TRACK_GREENLET_TREE"] = "false"
    from gevent import monkey

    monkey.patch_all()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(part, count):
    """Make `count` instances of `part` in this process; return (RSS KB, heap KB) per instance."""
    _as_a_worker()
    import socket
    import tracemalloc

    import gevent
    import gevent.event

    import sse

    parked = gevent.event.Event()

    def nested(depth):
        if depth:
            yield from nested(depth - 1)
        else:
            parked.wait()
            yield

    def make(n):
        if part == "greenlet":
            things = [gevent.spawn(parked.wait) for _ in range(n)]
        elif part == "greenlet-deep":
            things = [gevent.spawn(list, nested(8)) for _ in range(n)]
        elif part == "io-watcher":
            loop = gevent.get_hub().loop
            things = []
            for sock in [sockets.pop() for _ in range(n)]:
                watcher = loop.io(sock.fileno(), 1)
                watcher.start(lambda: None)
                things.append(watcher)
        else:
            things = [sse.Quiet(15.0, lambda: None) for _ in range(n)]
        gevent.sleep(0)  # the greenlets start and park
        return things

    if part == "io-watcher":
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 2 * count + 500)), hard))
    pairs = [socket.socketpair() for _ in range(count + 100)] if part == "io-watcher" else []
    sockets = [a for a, _ in pairs]
    warm = make(100)
    tracemalloc.start()
    rss0, heap0 = _rss(), tracemalloc.get_traced_memory()[0]
    things = make(count)
    rss1, heap1 = _rss(), tracemalloc.get_traced_memory()[0]
    assert len(things) == count and len(warm) == 100
    return (rss1 - rss0) / count / 1024, (heap1 - heap0) / count / 1024


CPU_PARTS = {
    "direct": "30,000 `delta` events, one per loop turn, iterated and encoded by the one greenlet that waits for them",
    "stream": "the same events through `sse.EventStream` (the producer greenlet hands each to the writer's)",
    "recheck": "the store's re-check for stops (`db.stops_since`, SQLite, 100 streaming rows), one every 100 ms",
    "sleep": "the same 100 ms sleeps without the re-check",
}


def cpu(part):
    """Run `part` in this process; return its CPU time in µs per event or per re-check."""
    _as_a_worker()
    import logging
    import tempfile
    import time

    import gevent
    from gevent.event import Event

    logging.disable(logging.WARNING)  # EventStream warns once that it has no client socket
    import app
    import db
    import sse

    if part in ("recheck", "sleep"):
        url = f"sqlite:///{tempfile.mkdtemp()}/parts.db"
        db.init(url)
        for i in range(100):
            db.run(url, "INSERT INTO generations (id, status, provider, model, started_at, worker_pid, instance_id)"
                        " VALUES (?, 'streaming', 'p', 'm', ?, ?, 'i')", (f"gen{i:04d}", db.now(), os.getpid()))
        db.stops_since(url, 0, "i", os.getpid())
        start = time.process_time()
        for _ in range(50):
            gevent.sleep(0.1)
            if part == "recheck":
                db.stops_since(url, 0, "i", os.getpid())
        return (time.process_time() - start) / 50 * 1e6
    count, gate = 30000, Event()

    def events():
        for i in range(count):
            gate.wait()  # as a provider's read waits for its socket
            gate.clear()
            yield app.delta(f"tok{i}")

    def pace():
        while True:
            gate.set()
            gevent.sleep(0)

    pacer = gevent.spawn(pace)
    start = time.process_time()
    if part == "direct":
        for event in events():
            event.encode()
    else:
        stream = sse.EventStream(events(), environ={}, keepalive=15)
        for _ in stream:
            pass
        stream.close()
    took = time.process_time() - start
    pacer.kill()
    return took / count * 1e6


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # one part, in a process of its own
    parser.add_argument("--cpu", choices=CPU_PARTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        print(*measure(args.part, args.count))
        return
    if args.cpu:
        print(cpu(args.cpu))
        return
    print(f"python {sys.version.split()[0]}, {args.count:,} of each part, each part in a fresh process\n")
    print("| part | RSS per instance | of which the heap tracemalloc sees |")
    print("|---|---:|---:|")
    for part, what in PARTS.items():
        out = subprocess.run([sys.executable, __file__, "--part", part, "--count", str(args.count)],
                             capture_output=True, text=True, check=True).stdout
        rss, heap = map(float, out.split())
        print(f"| {what} | {rss:.1f} KB | {heap:.1f} KB |", flush=True)
    print("\n| part of one event, or of the worker's upkeep | CPU, three runs |")
    print("|---|---:|")
    for part, what in CPU_PARTS.items():
        runs = [float(subprocess.run([sys.executable, __file__, "--cpu", part], capture_output=True, text=True,
                                     check=True).stdout) for _ in range(3)]
        unit = "per event" if part in ("direct", "stream") else "per 100 ms"
        print(f"| {what} | {' / '.join(f'{r:.1f}' for r in runs)} µs {unit} |", flush=True)


if __name__ == "__main__":
    main()
