"""What the parts of one open stream cost on their own on this Python (RSS and traced heap per instance); prints a table.

    .venv/bin/python bench/parts.py [--count N]

Each part is made N times in a fresh process (monkey-patched, greenlet-tree tracking off as
in gunicorn.conf.py) after a warm-up round of 100; the figures are the growth of RSS
(/proc/self/statm) and of the heap tracemalloc sees, divided by N. What RSS counts and the
heap does not is memory Python takes from the OS directly, such as the frame stack CPython
3.11 gives each greenlet (its own 16 KB chunk, of which the pages touched count).
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


def measure(part, count):
    """Make `count` instances of `part` in this process; return (RSS KB, heap KB) per instance."""
    os.environ["GEVENT_TRACK_GREENLET_TREE"] = "false"
    from gevent import monkey

    monkey.patch_all()
    import socket
    import tracemalloc

    import gevent
    import gevent.event

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # one part, in a process of its own
    args = parser.parse_args()
    if args.part:
        print(*measure(args.part, args.count))
        return
    print(f"python {sys.version.split()[0]}, {args.count:,} of each part, each part in a fresh process\n")
    print("| part | RSS per instance | of which the heap tracemalloc sees |")
    print("|---|---:|---:|")
    for part, what in PARTS.items():
        out = subprocess.run([sys.executable, __file__, "--part", part, "--count", str(args.count)],
                             capture_output=True, text=True, check=True).stdout
        rss, heap = map(float, out.split())
        print(f"| {what} | {rss:.1f} KB | {heap:.1f} KB |", flush=True)


if __name__ == "__main__":
    main()
