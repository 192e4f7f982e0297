"""Stop-request and lease latency on loopback; prints tables.

    .venv/bin/python bench/stop.py [--quick] [--keep-cores-awake]

A stop request is timed from sending `POST /api/generations/<id>/stop` (on a kept-alive
connection, as a browser's would be) to the moment the provider sees its connection close
(one CLOCK_MONOTONIC for all processes):
  - same worker: one gunicorn with one worker, which holds the stream and takes the stop;
  - other worker, SQLite: two gunicorn masters (one worker each) on one SQLite file, the
    stream on the first, the stop to the second, which wakes the holder's re-check of the
    store with a datagram, as a second worker of one master does;
  - other instance, Postgres: the same on a real Postgres, where NOTIFY carries the stop.
A lapsed lease is timed from the client's last renewal to the provider's close.
"""
import argparse
import http.client
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from harness import SSE, Postgres, Server, Upstream, poll, postgres_bindir, scenario  # noqa: E402
from cancel import keep_cores_awake, percentile  # noqa: E402

PHASES = {"tokens flowing": {"tokens": 100000, "interval": 0.02},
          "mid-stream silence": {"tokens": 100000, "interval": 0.02, "silence_after": 3, "silence": 30}}


def post(url):
    with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=10) as resp:
        return json.load(resp)


def warm_connection(server):
    """Return a keep-alive connection to `server` that has served one request, as a browser's would have."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/healthz")
    conn.getresponse().read()
    return conn


def stop_once(upstream, holder, stopper, phase):
    """Open a stream on `holder`, stop it through `stopper`; return ms until the provider saw its close."""
    tag = uuid.uuid4().hex
    stream = SSE(holder.port, scenario(tag=tag, **PHASES[phase]))
    pieces = 0
    gen_id = None
    while pieces < 3:
        kind, data, _ = stream.next()
        gen_id = gen_id or data["id"]
        pieces += kind == "delta"
    conn = warm_connection(stopper)
    if phase == "mid-stream silence":
        time.sleep(0.1)
    sent = time.monotonic()
    conn.request("POST", f"/api/generations/{gen_id}/stop", body=b"")
    conn.getresponse().read()
    conn.close()
    time.sleep(0.3)  # let the close land before asking the provider (asking competes for the CPU)
    rec = poll(lambda: upstream.record(tag), lambda r: r.get("closed_at"), 2)
    stream.close()
    return (rec["closed_at"] - sent) * 1000 if rec.get("closed_at") else None


def lease_once(upstream, server, lease, results):
    """Renew twice, then vanish (stay connected, silent); record ms from the last renewal to the close."""
    tag = uuid.uuid4().hex
    stream = SSE(server.port, {"lease_seconds": lease, **scenario(tag=tag, **PHASES["tokens flowing"])})
    gen_id = stream.next()[1]["id"]
    for _ in range(2):
        time.sleep(lease / 2)
        post(f"{server.url}/api/generations/{gen_id}/lease")
        last = time.monotonic()
    rec = poll(lambda: upstream.record(tag), lambda r: r.get("closed_at"), lease + 5)
    stream.close()
    results.append((rec["closed_at"] - last) * 1000 if rec.get("closed_at") else None)


def row(name, phase, samples):
    seen = [s for s in samples if s is not None]
    missed = len(samples) - len(seen)
    p50 = f"{percentile(seen, 50):.2f}" if seen else "–"
    p99 = f"{percentile(seen, 99):.2f}" if seen else "–"
    return f"| {name} | {phase} | {len(samples)} | {p50} | {p99} | {missed} |"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs, for a smoke test")
    parser.add_argument("--keep-cores-awake", action="store_true", help="a SCHED_IDLE busy loop on every core (as in"
                        " bench/cancel.py): no stop waits for the VM to wake a halted vCPU")
    args = parser.parse_args()
    runs = 20 if args.quick else 50
    tmp = Path(tempfile.mkdtemp(prefix="bench-stop-"))
    upstream = Upstream()
    common = {"LLM_PROVIDER": "openai", "LLM_BASE_URL": upstream.url + "/v1", "LLM_MODEL": "m", "KEEPALIVE_SECONDS": 15}
    shared_db = str(tmp / "shared.db")
    servers = []
    pg = Postgres(postgres_bindir()) if postgres_bindir() else None
    spinners = keep_cores_awake() if args.keep_cores_awake else []
    try:
        one = Server(tmp, **common)
        a = Server(tmp, GENERATIONS_DB=shared_db, INSTANCE_ID="a", **common)
        b = Server(tmp, GENERATIONS_DB=shared_db, INSTANCE_ID="b", **common)
        servers += [one, a, b]
        pairs = {"same worker": (one, one), "other worker, SQLite": (a, b)}
        if pg:
            pa = Server(tmp, DATABASE_URL=pg.url, INSTANCE_ID="pa", **common)
            pb = Server(tmp, DATABASE_URL=pg.url, INSTANCE_ID="pb", **common)
            servers += [pa, pb]
            pairs["other instance, Postgres"] = (pa, pb)
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, one gevent worker per gunicorn, loopback"
              + (", every core kept awake (SCHED_IDLE busy loops)" if spinners else ""))
        print("\n### Stop request -> provider sees its connection close\n")
        print("| stop lands on | phase | runs | p50 ms | p99 ms | not seen in 2 s |")
        print("|---|---|---:|---:|---:|---:|")
        for name, (holder, stopper) in pairs.items():
            stop_once(upstream, holder, stopper, "tokens flowing")  # warm-up, not counted
            for phase in PHASES:
                samples = [stop_once(upstream, holder, stopper, phase) for _ in range(runs)]
                if os.environ.get("BENCH_SAMPLES"):
                    print(samples)
                print(row(name, phase, samples), flush=True)
        lease = 2.0
        print(f"\n### A vanished client with a {lease:g} s lease: its last renewal -> provider sees its connection close\n")
        print("| store | streams | p50 ms | p99 ms | not seen |")
        print("|---|---:|---:|---:|---:|")
        for name, server in (("SQLite", a), ("Postgres", pairs.get("other instance, Postgres", (None,))[0])):
            if server is None:
                continue
            results = []
            threads = [threading.Thread(target=lease_once, args=(upstream, server, lease, results))
                       for _ in range(10 if args.quick else 40)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seen = [r for r in results if r is not None]
            print(f"| {name} | {len(results)} | {percentile(seen, 50):.0f} | {percentile(seen, 99):.0f} |"
                  f" {len(results) - len(seen)} |", flush=True)
    finally:
        for spinner in spinners:
            spinner.kill()
        for server in servers:
            server.stop()
        upstream.stop()
        if pg:
            pg.destroy()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
