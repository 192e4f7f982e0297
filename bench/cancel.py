"""Cancel propagation and relay latency on loopback, ours vs the naive Flask relay; prints tables.

    .venv/bin/python bench/cancel.py [--quick] [--only one|crowd|burst|nginx|latency ...] [--runs N] [--keep-cores-awake]

Everything is a real process: the fake provider (tests/fake_upstream.py), gunicorn with one
gevent worker for each relay, nginx from deploy/nginx.conf when installed, and this client
on raw sockets. Cancel propagation is the time from the client's close() to the moment
the provider sees its connection close; both read the same CLOCK_MONOTONIC. With two or
more cores each relay's worker gets a core of its own and the provider and the clients share
the others (nginx, when there, runs anywhere).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from harness import SSE, Nginx, Server, Upstream, poll, scenario  # noqa: E402

PHASES = {  # the provider's behaviour, and how long the client waits before closing
    "tokens flowing": {"tokens": 100000, "interval": 0.02},  # 50 tokens/s
    "before headers": {"header_delay": 30},
    "mid-stream silence": {"tokens": 100000, "interval": 0.02, "silence_after": 3, "silence": 30},
    "crowd": {"tokens": 100000, "interval": 0.05},  # 20 tokens/s
}
TABLES = ("one", "crowd", "burst", "nginx", "latency")
NOT_NOTICED_AFTER = 2.0  # seconds; a close not seen by then is reported as not noticed
# The provider timestamps each close itself, so the log can be read later. Reading it at
# once would compete for the CPU with the very closes being timed: measured here, that
# alone took the instrument's own "before headers" figure from 0.28 ms to 0.9 ms p50.
SETTLE = 0.2  # seconds


CORES = sorted(os.sched_getaffinity(0))  # before pin() narrows this process's own
# The instrument again with its client on the relays' core, so each close wakes the
# provider's core from another, as a relay's FIN does: what that costs the VM, not the relay.
ACROSS = "fake provider alone, its client on another core"


def pin(server, upstream):
    """Give the relay's worker a core of its own; the fake provider and this process run on the others.

    In production the provider is another machine: on a shared core, what the relay does
    after a close (its teardown) would slow the very instrument that times the close.
    """
    # From the cores this process started with: after the first call its own affinity is
    # the other cores, and taking that would leave every later relay unpinned.
    if len(CORES) < 2:
        return
    os.sched_setaffinity(server.workers()[0], CORES[-1:])
    for pid in (0, upstream.proc.pid):
        os.sched_setaffinity(pid, CORES[:-1])


def keep_cores_awake():
    """Start one busy loop per core at SCHED_IDLE priority; return them, to kill() when done.

    A VM whose idle vCPUs halt (no cpuidle driver: plain HLT, as in Firecracker) wakes one
    only when the host schedules it again, measured here at up to ~5 ms: a close whose
    wake-up lands on a halted core pays that, whatever the relay does. A SCHED_IDLE loop
    keeps each core running and gives way to any other task at once: what is left is the
    relay's own time. (On bare metal a C-state exit takes microseconds.)
    """
    spinners = []
    for core in CORES:
        def setup(core=core):
            os.sched_setaffinity(0, {core})
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        spinners.append(subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=setup))
    return spinners


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(p / 100 * len(values) + 0.5) - 1))]


def into_phase(stream, phase):
    """Read until the stream is in `phase`: pieces flowing, waiting for headers, or silent."""
    if phase == "before headers":
        time.sleep(0.1)
        return
    pieces = 0  # ours sends delta events, the naive relay passes the provider's events on
    while pieces < 3:
        kind, data, _ = stream.next(timeout=10)
        pieces += kind in ("delta", "message")
    if phase == "mid-stream silence":
        time.sleep(0.1)


def outcomes(upstream, closed):
    """Wait (at most NOT_NOTICED_AFTER) for the provider to see each close; return samples.

    `closed` maps tag -> client close time. A sample is (ms, or None if not seen in time;
    pieces the provider sent after the close).
    """
    time.sleep(SETTLE)
    deadline = time.monotonic() + NOT_NOTICED_AFTER - SETTLE
    records = {}
    while len(records) < len(closed) and time.monotonic() < deadline:
        for tag in closed.keys() - records.keys():
            rec = upstream.record(tag)
            if rec.get("closed_at"):
                records[tag] = rec
        time.sleep(0.01)
    samples = []
    for tag, t in closed.items():
        rec = records.get(tag) or upstream.record(tag)
        ms = (rec["closed_at"] - t) * 1000 if rec.get("closed_at") else None
        samples.append((ms if ms is not None and ms <= NOT_NOTICED_AFTER * 1000 else None,
                        sum(1 for p in rec.get("piece_times", []) if p > t)))
    return samples


def cancel_once(upstream, port, path, phase):
    """Open one stream, close it in `phase`; return (ms until the provider saw it, tokens sent after)."""
    tag = uuid.uuid4().hex
    stream = SSE(port, scenario(tag=tag, **PHASES[phase]), path=path, wait_for_headers=False)
    if phase == "before headers":
        # On a busy worker the request may reach the provider later than 0.1 s: close only once it has.
        poll(lambda: upstream.record(tag), lambda rec: rec.get("tag"), 5)
    into_phase(stream, phase)
    return outcomes(upstream, {tag: stream.close()})[0]


def open_streams(upstream, port, count, phase, path="/api/chat"):
    """Open `count` streams and bring each into `phase`."""
    streams = []
    for _ in range(count):
        tag = uuid.uuid4().hex
        stream = SSE(port, scenario(tag=tag, **PHASES[phase]), path=path, wait_for_headers=False)
        stream.tag = tag
        streams.append(stream)
    for stream in streams:
        into_phase(stream, phase)
    return streams


def summarize(samples):
    seen = [ms for ms, _ in samples if ms is not None]
    after = max(a for _, a in samples)
    if len(seen) < len(samples):
        return {"n": len(samples), "p50": None, "p99": None, "noticed": len(seen), "after": after}
    return {"n": len(samples), "p50": percentile(seen, 50), "p99": percentile(seen, 99), "noticed": len(seen), "after": after}


def cancel_table(upstream, targets, runs, background):
    rows = []
    for name, (port, path) in targets.items():
        if name == ACROSS:
            os.sched_setaffinity(0, CORES[-1:])
        # The crowd streams at 20 tokens/s (one piece per 50 ms each).
        streams = open_streams(upstream, port, background, "crowd", path) if background else []
        for phase in ("tokens flowing", "before headers", "mid-stream silence"):
            samples = []
            for _ in range(runs):
                samples.append(cancel_once(upstream, port, path, phase))
                if samples[-1][0] is None and len(samples) >= 3:
                    break  # this relay does not notice in this phase; more runs only wait
            rows.append((name, phase, summarize(samples)))
        for stream in streams:
            stream.close()
        if name == ACROSS:
            os.sched_setaffinity(0, CORES[:-1])
        time.sleep(0.5)
    return rows


def burst_table(upstream, targets, count, rounds, phase):
    """Close `count` streams in `phase` at once; one sample per stream."""
    rows = []
    for name, (port, path) in targets.items():
        samples = []
        for _ in range(rounds):
            streams = open_streams(upstream, port, count, phase, path)
            samples += outcomes(upstream, {stream.tag: stream.close() for stream in streams})
            time.sleep(1)
        rows.append((name, "tokens flowing (20/s)" if phase == "crowd" else phase, summarize(samples)))
    return rows


def latency_table(upstream, relays, tokens):
    """Per-event delay from the provider's send to the client's read, direct and through each relay."""
    rows = []
    targets = {"direct to provider": (upstream.port, "/v1/chat/completions"), **{n: (p, "/api/chat") for n, p in relays.items()}}
    results = {}
    for name, (port, path) in targets.items():
        stream = SSE(port, scenario(tag=uuid.uuid4().hex, tokens=tokens, interval=0.01, text="{t}"), path=path,
                     wait_for_headers=False)
        delays = []
        for kind, data, arrived in stream.read_all():
            if kind == "delta":
                delays.append((arrived - float(data["text"])) * 1000)
            elif kind == "message" and isinstance(data, dict) and data.get("choices"):
                content = data["choices"][0]["delta"].get("content")
                if content:
                    delays.append((arrived - float(content)) * 1000)
        results[name] = delays
    base = percentile(results["direct to provider"], 50)
    for name, delays in results.items():
        rows.append((name, len(delays), percentile(delays, 50), percentile(delays, 99), percentile(delays, 50) - base))
    return rows


def fmt(ms):
    return "–" if ms is None else f"{ms:.2f}"


def print_cancel(title, rows):
    print(f"\n### {title}\n")
    print("| relay | phase | runs | p50 ms | p99 ms | tokens sent after close (max) |")
    print("|---|---|---:|---:|---:|---:|")
    for name, phase, s in rows:
        if s["noticed"] < s["n"]:
            p50 = p99 = f"not noticed in {NOT_NOTICED_AFTER:g} s ({s['n'] - s['noticed']}/{s['n']})"
        else:
            p50, p99 = fmt(s["p50"]), fmt(s["p99"])
        print(f"| {name} | {phase} | {s['n']} | {p50} | {p99} | {s['after']} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs and streams, for a smoke test")
    parser.add_argument("--only", choices=TABLES, action="append", help="print only this table (repeatable)")
    parser.add_argument("--runs", type=int, help="closes per relay and phase in the one-stream tables (default 30;"
                        " p99 of 30 is the slowest one, of 200 the third slowest)")
    parser.add_argument("--keep-cores-awake", action="store_true", help="run a SCHED_IDLE busy loop on every core, so"
                        " no close waits for the VM to wake a halted vCPU (see keep_cores_awake)")
    args = parser.parse_args()
    tables = args.only or TABLES
    runs, crowd = (5, 20) if args.quick else (30, 200)
    runs = args.runs or runs
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    upstream = Upstream()
    common = {"LLM_PROVIDER": "openai", "LLM_BASE_URL": upstream.url + "/v1", "LLM_MODEL": "m"}
    ours = Server(tmp, **common)
    naive = Server(tmp, app="bench.naive_relay:app", UPSTREAM_URL=upstream.url + "/v1", **common)
    nginx = Nginx(shutil.which("nginx"), tmp, ours) if shutil.which("nginx") else None
    relays = {"ours": ours.port, "naive Flask relay": naive.port}

    def restart_naive():
        naive.restart()  # it left streams open at the provider, which would load what follows
        pin(naive, upstream)

    pin(ours, upstream)
    pin(naive, upstream)
    spinners = keep_cores_awake() if args.keep_cores_awake else []
    try:
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, one gevent worker per relay, loopback"
              + (", every core kept awake (SCHED_IDLE busy loops)" if spinners else ""))
        instrument = (upstream.port, "/v1/chat/completions")
        targets = {"fake provider alone (the instrument)": instrument,
                   **{name: (port, "/api/chat") for name, port in relays.items()}}
        if "one" in tables:
            one = dict(targets)
            if len(CORES) > 1:
                one = {"fake provider alone (the instrument)": instrument, ACROSS: instrument, **targets}
            print_cancel("Cancel propagation, one stream (client close -> provider sees its connection close)",
                         cancel_table(upstream, one, runs, 0))
            restart_naive()
        if "crowd" in tables:
            print_cancel(f"Cancel propagation, one stream while {crowd} others stream at 20 tokens/s",
                         cancel_table(upstream, targets, runs, crowd))
            restart_naive()
        if "burst" in tables:
            rounds = 1 if args.quick else 3
            silent = burst_table(upstream, targets, crowd, rounds, "mid-stream silence")
            restart_naive()
            print_cancel(f"Cancel propagation, {crowd} streams closed at once",
                         silent + burst_table(upstream, targets, crowd, rounds, "crowd"))
            restart_naive()
        if "nginx" in tables and nginx:
            print_cancel("Cancel propagation through nginx (deploy/nginx.conf) vs direct to gunicorn",
                         cancel_table(upstream, {"ours via nginx": (nginx.port, "/api/chat"),
                                                 "ours direct": (ours.port, "/api/chat")}, runs, 0))
        elif "nginx" in tables:
            print("\n(nginx not installed: no nginx column)")
        if "latency" in tables:
            print("\n### Per-event latency, provider send -> client read, 200 events at 100/s\n")
            print("| path | events | p50 ms | p99 ms | added p50 ms |")
            print("|---|---:|---:|---:|---:|")
            for name, n, p50, p99, added in latency_table(upstream, relays, 200 if not args.quick else 50):
                print(f"| {name} | {n} | {p50:.2f} | {p99:.2f} | {added:.2f} |")
    finally:
        for spinner in spinners:
            spinner.kill()
        if nginx:
            nginx.stop()
        naive.stop()
        ours.stop()
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
