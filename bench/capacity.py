"""What a worker costs per relayed event and per open stream, ours vs the naive relay; prints a table.

    .venv/bin/python bench/capacity.py [--quick]

One gevent worker per relay on loopback, the fake provider at 20 tokens/s per stream:
CPU per 1,000 relayed events (the worker's utime+stime over a window, divided by the
events the clients read in it), the added delay of each event (client read - provider
send, one CLOCK_MONOTONIC), and memory per open stream (the worker's RSS with N silent
streams open, minus its RSS before, over N).
"""
from gevent import monkey

monkey.patch_all()  # the clients are greenlets: one process reads every stream at once

import argparse  # noqa: E402
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import gevent  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from harness import SSE, Server, Upstream, scenario  # noqa: E402
from cancel import percentile  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def flowing(server, upstream, streams, seconds):
    """Relay `streams` streams at 20 tokens/s for `seconds`; return (ms CPU per 1,000 events, delays in ms)."""
    worker = server.workers()[0]
    clients = [SSE(server.port, scenario(tag=uuid.uuid4().hex, tokens=100000, interval=0.05, text="{t}"),
                   wait_for_headers=False) for _ in range(streams)]
    delays, counted = [], [0]
    window = {}

    def read(client):
        while True:
            kind, data, arrived = client.next(timeout=30)
            text = data.get("text") if isinstance(data, dict) and kind == "delta" else None
            if text is None and kind == "message" and isinstance(data, dict) and data.get("choices"):
                text = data["choices"][0]["delta"].get("content")
            if text and "start" in window and "end" not in window:
                counted[0] += 1
                delays.append((arrived - float(text)) * 1000)

    readers = [gevent.spawn(read, c) for c in clients]
    gevent.sleep(2)  # all streams flowing
    window["start"], cpu0 = True, cpu_seconds(worker)
    gevent.sleep(seconds)
    window["end"], cpu1 = True, cpu_seconds(worker)
    gevent.killall(readers)
    for c in clients:
        c.close()
    gevent.sleep(1)
    return (cpu1 - cpu0) * 1000 / counted[0] * 1000, delays


def memory(server, upstream, count):
    """Return KB of worker RSS per open silent stream, with `count` open."""
    worker = server.workers()[0]
    gevent.sleep(0.5)
    before = rss_kb(worker)
    clients = []
    for _ in range(count):
        clients.append(SSE(server.port, scenario(tokens=3, silence_after=1, silence=120), wait_for_headers=False))
    for c in clients:
        c.next(timeout=30)
    gevent.sleep(1)
    after = rss_kb(worker)
    for c in clients:
        c.close()
    gevent.sleep(1)
    return (after - before) / count


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    streams, seconds, open_count = (20, 3, 100) if args.quick else (100, 10, 1000)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    upstream = Upstream()
    common = {"LLM_PROVIDER": "openai", "LLM_BASE_URL": upstream.url + "/v1", "LLM_MODEL": "m", "KEEPALIVE_SECONDS": 15}
    relays = {"ours": Server(tmp, **common),
              "naive Flask relay": Server(tmp, app="bench.naive_relay:app", UPSTREAM_URL=upstream.url + "/v1", **common)}
    try:
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, one gevent worker per relay, loopback")
        print(f"\n### {streams} streams x 20 tokens/s for {seconds} s; memory with {open_count} silent streams open\n")
        print("| relay | CPU per 1,000 relayed events | added delay p50 / p99 | memory per open stream |")
        print("|---|---:|---:|---:|")
        for name, server in relays.items():
            cpu, delays = flowing(server, upstream, streams, seconds)
            server.restart()  # the naive relay's unnoticed streams would load what follows
            kb = memory(server, upstream, open_count)
            server.restart()
            print(f"| {name} | {cpu:.0f} ms | {percentile(delays, 50):.2f} / {percentile(delays, 99):.2f} ms |"
                  f" {kb:.1f} KB |", flush=True)
    finally:
        for server in relays.values():
            server.stop()
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
