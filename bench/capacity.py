"""What one gevent worker costs per relayed event and per open stream, ours vs the naive relay; prints tables.

    .venv/bin/python bench/capacity.py [--quick] [--windows N]   CPU, added delay, a fast provider, memory
    .venv/bin/python bench/capacity.py --open 10000   N open streams on one worker, then all closed at once
    .venv/bin/python bench/capacity.py --against DIR  this checkout's relay vs DIR's (e.g. a git worktree), 100 x 20

One gevent worker per relay on loopback, the fake provider in its own process. With two or
more cores the worker gets a core of its own and the clients and the provider share the
others, so the load generator does not time-share the CPU it measures.
CPU per 1,000 relayed events: the worker's utime+stime over a window over the events the
clients read in it (the median of alternating windows, ours then naive), and the same
split into user and system time per event. Added delay: client
read - provider send, one CLOCK_MONOTONIC. Memory per open stream: the worker's RSS with N
silent streams open, minus its RSS before (after 100 streams ran), over N.
"""
from gevent import monkey

monkey.patch_all()  # the clients are greenlets: one process reads every stream at once

import argparse  # noqa: E402
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import gevent  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from harness import SSE, Server, Upstream, get_json, open_fds as fds, scenario  # noqa: E402
from cancel import percentile, pin  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_times(pid):
    """Return the process's (user, system) CPU seconds so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def cpu_seconds(pid):
    return sum(cpu_times(pid))


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def text_of(kind, data):
    """The text piece of a relayed event: ours (`delta`) or the naive relay's (OpenAI chunks as they came)."""
    if kind == "delta" and isinstance(data, dict):
        return data.get("text")
    if kind == "message" and isinstance(data, dict) and data.get("choices"):
        return data["choices"][0]["delta"].get("content")
    return None


def flowing(server, upstream, streams, seconds, interval):
    """Relay `streams` streams, a piece every `interval` s, for `seconds`.

    Returns ((user, system) µs CPU per event, i.e. ms per 1,000, delays in ms, events relayed / s,
    events the provider sent / s). With `server` None the clients read the provider directly:
    the instrument alone, no CPU figure.
    """
    worker = server.workers()[0] if server else None
    port, path = (server.port, "/api/chat") if server else (upstream.port, "/v1/chat/completions")
    tags = [uuid.uuid4().hex for _ in range(streams)]
    clients = [SSE(port, scenario(tag=tag, tokens=10**7, interval=interval, text="{t}"), path=path,
                   wait_for_headers=False) for tag in tags]
    delays, window = [], {}

    def read(client):
        while True:
            kind, data, arrived = client.next(timeout=30)
            text = text_of(kind, data)
            if text and "start" in window and "end" not in window:
                delays.append((arrived - float(text)) * 1000)

    readers = [gevent.spawn(read, c) for c in clients]
    gevent.sleep(1.5)  # every stream flowing
    window["start"], cpu0, start = True, worker and cpu_times(worker), time.monotonic()
    gevent.sleep(seconds)
    window["end"], cpu1, end = True, worker and cpu_times(worker), time.monotonic()
    gevent.killall(readers)
    for c in clients:
        c.close()
    sent = sum(start <= t <= end for tag in tags for t in upstream.record(tag)["piece_times"])
    gevent.sleep(1)
    cpu = tuple((after - before) * 10**6 / len(delays) for before, after in zip(cpu0, cpu1)) if worker else None
    return cpu, delays, len(delays) / (end - start), sent / (end - start)


def memory(server, count):
    """Return KB of worker RSS per open silent stream, with `count` open.

    100 streams run to their end first: what the worker allocates once (its thread pool,
    the store's connections, pools sized on first use) is not any stream's cost.
    """
    worker = server.workers()[0]
    warm = [SSE(server.port, scenario(tag=f"warm-{uuid.uuid4().hex}", tokens=3, silence_after=1, silence=1),
                wait_for_headers=False) for _ in range(100)]
    gevent.joinall([gevent.spawn(c.read_all, 30) for c in warm], raise_error=True)
    for c in warm:
        c.close()
    gevent.sleep(1)
    before = rss_kb(worker)
    clients = open_silent(server, count, "mem")
    gevent.sleep(1)
    after = rss_kb(worker)
    for c in clients:
        c.close()
    gevent.sleep(1)
    return (after - before) / count


def open_silent(server, count, prefix, batch=500, path="/api/chat"):
    """Open `count` streams that send one piece and go silent; return their clients once each has its piece.

    `server` is a relay, or the fake provider itself (path /v1/chat/completions) for the instrument alone.
    """
    clients = []
    for start in range(0, count, batch):
        more = [SSE(server.port, scenario(tag=f"{prefix}-{start + i}", tokens=3, silence_after=1, silence=3600),
                    path=path, wait_for_headers=False) for i in range(min(batch, count - start))]
        for c in more:
            while text_of(*c.next(timeout=60)[:2]) is None:  # the piece, not just the start event
                pass
        clients += more
    return clients


def close_all(clients, upstream, prefix, timeout=120):
    """Close every client at once; return (ms to close them, ms after the first close at which the provider saw each close, still open)."""
    first = time.monotonic()
    for c in clients:
        c.close()
    closing = (time.monotonic() - first) * 1000
    deadline = time.monotonic() + timeout
    while True:
        gevent.sleep(0.5)
        seen = get_json(f"{upstream.url}/_closed/{prefix}-")
        if all(seen.values()) or time.monotonic() > deadline:
            break
    return closing, [(when - first) * 1000 for when in seen.values() if when], sum(1 for w in seen.values() if not w)


def cpu_cells(cpus):
    """The two CPU cells of a table row, from its windows' (user, system) µs per event: totals, then user / system."""
    totals = [sum(cpu) for cpu in cpus]
    return (f"{statistics.median(totals):.0f} ms ({', '.join(f'{t:.0f}' for t in totals)}) | "
            + " / ".join(f"{statistics.median(part):.1f}" for part in zip(*cpus)))


def spread(delays):
    """The added-delay cell of a table row: p50 / p99 / max."""
    return f"{percentile(delays, 50):.2f} / {percentile(delays, 99):.2f} / {max(delays):.1f} ms"


def ours(tmp, upstream, **kwargs):
    """Our relay on gunicorn, relaying the fake provider as an OpenAI-style upstream."""
    return Server(tmp, LLM_PROVIDER="openai", LLM_BASE_URL=upstream.url + "/v1", LLM_MODEL="m", KEEPALIVE_SECONDS=15,
                  UPSTREAM_URL=upstream.url + "/v1", **kwargs)


def relays(tmp, upstream):
    return {"ours": ours(tmp, upstream),
            "naive Flask relay": ours(tmp, upstream, app="bench.naive_relay:app"),
            "floor: parsing, nothing else": ours(tmp, upstream, app="bench.floor_relay:app")}


def windows(servers, upstream, reps, streams=100, seconds=5):
    """Run `reps` windows of each server at `streams` x 20 tokens/s; return {name: ((user, system) CPUs, p99s, all delays)}."""
    results = {name: ([], [], []) for name in servers}
    names = list(servers)
    for rep in range(reps):
        # Each relay takes each place in the order once, so none always follows the same one.
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            cpu, delays, _, _ = flowing(servers[name], upstream, streams, seconds, 0.05)
            results[name][0].append(cpu)
            results[name][1].append(percentile(delays, 99))
            results[name][2].extend(delays)
    return results


def tables(tmp, upstream, quick, reps=3):
    streams, seconds, open_count = (20, 2, 100) if quick else (100, 5, 1000)
    reps, fast = (1, 2) if quick else (reps, 15)  # fast: seconds of the fast-provider run
    servers = relays(tmp, upstream)
    try:
        for server in servers.values():
            pin(server, upstream)
        print(f"\n### {streams} streams x 20 tokens/s ({reps} alternating windows of {seconds} s each)\n")
        print("| relay | CPU per 1,000 relayed events (median; each window) | user / system µs per event (medians) |"
              " added delay p50 / p99 / max |")
        print("|---|---:|---:|---:|")
        for name, (cpus, _, delays) in windows(servers, upstream, reps, streams, seconds).items():
            print(f"| {name} | {cpu_cells(cpus)} | {spread(delays)} |", flush=True)
        _, delays, _, _ = flowing(None, upstream, streams, seconds, 0.05)
        print(f"| the instrument alone: clients read the provider directly | — | — | {spread(delays)} |", flush=True)

        print(f"\n### A fast provider: 10 streams x 500 tokens/s for {fast} s\n")
        print("| relay | CPU per 1,000 relayed events | events the provider sent / relayed per s | added delay p50 / p99 / max |")
        print("|---|---:|---:|---:|")
        for name, server in servers.items():
            server.restart()
            pin(server, upstream)
            cpu, delays, rate, sent = flowing(server, upstream, 10, fast, 0.002)
            print(f"| {name} | {sum(cpu):.0f} ms | {sent:,.0f} / {rate:,.0f} | {spread(delays)} |", flush=True)
        _, delays, rate, sent = flowing(None, upstream, 10, fast, 0.002)
        print(f"| the instrument alone | — | {sent:,.0f} / {rate:,.0f} | {spread(delays)} |", flush=True)

        print(f"\n### Memory with {open_count:,} silent streams open\n")
        print("| relay | memory per open stream |")
        print("|---|---:|")
        for name, server in servers.items():
            server.restart()  # the naive relay's unnoticed streams would load what follows
            print(f"| {name} | {memory(server, open_count):.1f} KB |", flush=True)
    finally:
        for server in servers.values():
            server.stop()


def against(tmp, upstream, other, reps=8):
    """Our relay from this checkout and from `other`, alternating 5 s windows at 100 x 20; print a table."""
    servers = {"this checkout": ours(tmp, upstream), other: ours(tmp, upstream, root=other)}
    try:
        for server in servers.values():
            pin(server, upstream)
        results = windows(servers, upstream, reps)
    finally:
        for server in servers.values():
            server.stop()
    print(f"\n### Ours, two checkouts: 100 streams x 20 tokens/s ({reps} alternating windows of 5 s each)\n")
    print("| relay | CPU per 1,000 relayed events (median; each window) | user / system µs per event (medians) |"
          " added delay p99 of each window | all windows: p50 / p99 / max |")
    print("|---|---:|---:|---:|---:|")
    for name, (cpus, p99s, delays) in results.items():
        print(f"| {name} | {cpu_cells(cpus)} | {' / '.join(f'{p:.2f}' for p in p99s)} ms | {spread(delays)} |")


def many_open(tmp, upstream, count):
    """Open `count` streams on one worker, relay a probe stream beside them, then close them all at once."""
    connections = count + count // 20 + 100
    server = ours(tmp, upstream, WORKER_CONNECTIONS=connections)
    try:
        pin(server, upstream)
        worker = server.workers()[0]
        for c in open_silent(server, 10, "warm"):  # the worker opens its metric files once: not per stream
            c.close()
        gevent.sleep(2)
        fds0, rss0, t0 = fds(worker), rss_kb(worker), time.monotonic()
        clients = open_silent(server, count, "many")
        opened = time.monotonic() - t0
        gevent.sleep(1)
        fds1, rss1 = fds(worker), rss_kb(worker)
        _, delays, _, _ = flowing(server, upstream, 10, 5, 0.05)  # while they are all open
        closed_at = time.monotonic()
        closing, delays_closed, still_open = close_all(clients, upstream, "many")
        while fds(worker) > fds0 and time.monotonic() < closed_at + 300:
            gevent.sleep(0.2)
        back, fds2 = time.monotonic() - closed_at, fds(worker)
    finally:
        server.stop()
    # The instrument alone: the same closes made straight to the provider, which stamps them.
    direct = open_silent(upstream, count, "direct", path="/v1/chat/completions")
    _, delays_direct, _ = close_all(direct, upstream, "direct")

    print(f"\n### {count:,} open streams on one worker (WORKER_CONNECTIONS={connections})\n")
    print("| measure | value |")
    print("|---|---:|")
    print(f"| time to open them all (batches of 500) | {opened:.1f} s |")
    print(f"| worker RSS before / with them open | {rss0 / 1024:.0f} MB / {rss1 / 1024:.0f} MB |")
    print(f"| memory per open stream | {(rss1 - rss0) / count:.1f} KB |")
    print(f"| worker fds before / with them open | {fds0:,} / {fds1:,} |")
    print(f"| probe: 10 streams x 20 tokens/s beside them, added delay p50 / p99 | {percentile(delays, 50):.2f} /"
          f" {percentile(delays, 99):.2f} ms |")
    print(f"| all closed at once ({closing:.0f} ms to close {count:,} sockets): the provider sees each connection"
          f" close, p50 / p99 / max after the first close | {percentile(delays_closed, 50):.0f} /"
          f" {percentile(delays_closed, 99):.0f} / {max(delays_closed):.0f} ms |")
    print(f"| the instrument alone: the same closes straight to the provider, p50 / p99 / max |"
          f" {percentile(delays_direct, 50):.0f} / {percentile(delays_direct, 99):.0f} / {max(delays_direct):.0f} ms |")
    print(f"| provider connections left open | {still_open} |")
    print(f"| worker fds after: every row written, every socket closed | {fds2:,} (before: {fds0:,}), {back:.1f} s after"
          f" the first close |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--windows", type=int, default=3, metavar="N", help="alternating 5 s windows per relay at 100 x 20")
    parser.add_argument("--open", type=int, metavar="N", help="instead: N open streams on one worker, all closed at once")
    parser.add_argument("--against", metavar="DIR", help="instead: this checkout's relay vs the one in DIR, alternating")
    args = parser.parse_args()
    # Each open stream is two sockets in the worker (client, provider): the soft limit up to
    # the hard one, for this process and the servers it starts.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.open and 2 * args.open + 100 > hard:
        print(f"{args.open:,} streams need {2 * args.open + 100:,} open files in the worker; the hard limit here is"
              f" {hard:,} (ulimit -Hn; raise it with LimitNOFILE= or nofile in limits.conf): running"
              f" {(hard - 100) // 2:,}")
        args.open = (hard - 100) // 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    upstream = Upstream()
    try:
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, one gevent worker per relay, loopback")
        if args.against:
            against(tmp, upstream, os.path.abspath(args.against))
        elif args.open:
            many_open(tmp, upstream, args.open)
        else:
            tables(tmp, upstream, args.quick, args.windows)
    finally:
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
