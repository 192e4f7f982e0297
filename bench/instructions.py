"""Instructions and system calls per relayed event, ours vs the naive relay and the floor; prints tables.

    .venv/bin/python bench/instructions.py [--seconds S] [--keep DIR]   ours, the naive relay, the floor
    .venv/bin/python bench/instructions.py --against DIR   this checkout's relay vs DIR's (a git worktree
                                                            of a commit that has bench/counted.py)

bench/capacity.py times the worker's CPU, which moves by up to 15 % from one 5 s window to
the next on a shared VM. These are two counts that do not move with the VM:
- Instructions per relayed event (user space): the worker runs under valgrind's callgrind,
  ~30-50x slower, so the load is scaled down (20 streams x 2 tokens/s; the table gives how
  busy that kept the worker, ~30 % at 100 x 20 natively). bench/counted.py brackets a
  window; the instructions the worker executed in it over the events it relayed in it,
  minus what the same worker executes in as long a window with 20 silent streams (its
  fixed costs: the stop watcher's re-check, timers, which this reduced rate would
  otherwise spread over far fewer events than 100 x 20 does).
- System calls per relayed event: the worker runs natively at 100 x 20 and perf counts the
  system calls it makes (syscalls:sys_enter_* tracepoints) over a window.
The kernel's work inside each system call is in neither count: a relay that makes more
system calls per event costs more than its instructions say.
Needs valgrind (with callgrind.h, Debian `valgrind`), a C compiler and perf.
"""
from gevent import monkey

monkey.patch_all()  # the clients are greenlets: one process reads every stream at once

import argparse  # noqa: E402
import collections
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import gevent  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from capacity import cpu_seconds, ours, text_of  # noqa: E402
from cancel import pin  # noqa: E402
from harness import ROOT, SSE, Upstream, get_json, scenario  # noqa: E402

RELAYS = {"ours": "wsgi:app", "naive Flask relay": "bench.naive_relay:app", "floor: parsing, nothing else": "bench.floor_relay:app"}
COUNTED = dict(zip(RELAYS, ("bench.counted:ours", "bench.counted:naive", "bench.counted:floor")))  # with the callgrind routes

TOGGLE_C = """
#include <valgrind/callgrind.h>
void start(void) { CALLGRIND_START_INSTRUMENTATION; CALLGRIND_ZERO_STATS; }
void dump(void) { CALLGRIND_DUMP_STATS; CALLGRIND_STOP_INSTRUMENTATION; }
"""


def build_toggle(tmp):
    """Compile the two callgrind client requests into a library bench/counted.py loads; return its path."""
    source, lib = tmp / "toggle.c", tmp / "toggle.so"
    source.write_text(TOGGLE_C)
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(source)], check=True)
    return str(lib)


class Readers:
    """`streams` clients reading a piece every `interval` s (None: one, then silence); `times` are the arrivals of the pieces."""

    def __init__(self, port, streams, interval):
        self.times = []
        behaviour = (dict(tokens=10**7, interval=interval, text="{t}") if interval else
                     dict(tokens=3, silence_after=1, silence=3600))
        self.clients = [SSE(port, scenario(tag=uuid.uuid4().hex, **behaviour), wait_for_headers=False)
                        for _ in range(streams)]
        self.greenlets = [gevent.spawn(self._read, c) for c in self.clients]

    def _read(self, client):
        while True:
            kind, data, arrived = client.next(timeout=120)
            if text_of(kind, data):
                self.times.append(arrived)

    def close(self):
        gevent.killall(self.greenlets)
        for c in self.clients:
            c.close()


def instructions(tmp, upstream, lib, name, seconds, keep=None, root=ROOT):
    """Return (instructions per relayed event, per second with 20 silent streams, events, worker busy share) under callgrind.

    `keep`: a path prefix to copy the two callgrind files to (silent, flowing).
    """
    out = Path(tempfile.mkdtemp(dir=tmp))
    server = ours(tmp, upstream, app=COUNTED[name], CALLGRIND_TOGGLE=lib, start_timeout=180, root=root,
                  wrapper=["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}/cg.%p"])
    windows = []  # (worker's time at the zero, at the dump)
    try:
        pin(server, upstream)
        worker = server.workers()[0]
        for interval in (None, 0.5):  # silent, then a piece every 0.5 s
            readers = Readers(server.port, 20, interval)
            gevent.sleep(3)
            get_json(server.url + "/_callgrind/start")  # valgrind translates the hot code again, counting
            gevent.sleep(5)
            start, cpu = get_json(server.url + "/_callgrind/start")["at"], cpu_seconds(worker)
            gevent.sleep(seconds)
            end, cpu = get_json(server.url + "/_callgrind/dump")["at"], cpu_seconds(worker) - cpu
            windows.append((start, end))
            gevent.sleep(1)  # the events written before the dump have arrived
            readers.close()
            gevent.sleep(2)
    finally:
        server.stop()
    totals = []
    dumps = sorted(glob.glob(f"{out}/cg.{worker}.*"), key=lambda path: int(path.rsplit(".", 1)[1]))
    for dump, phase in zip(dumps, ("silent", "flowing")):
        with open(dump) as f:
            totals.append(int(re.search(r"^totals: (\d+)", f.read(), re.M).group(1)))
        if keep:
            shutil.copy(dump, f"{keep}.{phase}")
    (silent, flowing), (start, end) = totals, windows[1]
    # A client reads an event a fraction of a ms after the worker wrote it: noise on hundreds.
    events = sum(1 for t in readers.times if start <= t <= end)
    per_second = silent / (windows[0][1] - windows[0][0])
    return (flowing - per_second * (end - start)) / events, per_second, events, cpu / (end - start)


def syscalls(tmp, upstream, name, seconds, root=ROOT):
    """Return ({system call: count per relayed event}, events) for relay `name` at 100 x 20, natively."""
    server = ours(tmp, upstream, app=RELAYS[name], root=root)
    try:
        pin(server, upstream)
        readers = Readers(server.port, 100, 0.05)
        gevent.sleep(1.5)
        perf = subprocess.run(["perf", "stat", "-x,", "-e", "syscalls:sys_enter_*", "-p", str(server.workers()[0]),
                               "--", "sleep", str(seconds)], capture_output=True, text=True)
        end = time.monotonic()
        readers.close()
    finally:
        server.stop()
    counts = collections.Counter()
    for line in perf.stderr.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].isdigit():
            counts[fields[2].removeprefix("syscalls:sys_enter_")] += int(fields[0])
    if not sum(counts.values()):
        sys.exit(f"perf counted no system calls: {perf.stderr.strip()[-500:]}")
    # perf counts while its `sleep` runs, which ends just before perf does.
    events = sum(1 for t in readers.times if end - seconds <= t <= end)
    return {call: n / events for call, n in counts.items() if n}, events


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20, help="counting window per relay")
    parser.add_argument("--keep", metavar="DIR", help="also copy each relay's callgrind files there (callgrind_annotate)")
    parser.add_argument("--against", metavar="DIR", help="instead: our relay from this checkout and from DIR (a git worktree)")
    args = parser.parse_args()
    missing = [tool for tool in ("valgrind", "cc", "perf") if not shutil.which(tool)]
    if missing or not os.path.exists("/usr/include/valgrind/callgrind.h"):
        sys.exit(f"needs valgrind with its headers, a C compiler and perf; missing: {', '.join(missing) or 'callgrind.h'}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-instructions-"))
    upstream = Upstream()
    try:
        lib = build_toggle(tmp)
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, one gevent worker per relay, loopback")
        print(f"\n### Per relayed event: user-space instructions (callgrind, 20 streams x 2 tokens/s, {args.seconds:g} s)"
              f" and system calls (perf, 100 streams x 20 tokens/s, {args.seconds:g} s)\n")
        runs = ({"this checkout": ("ours", ROOT), args.against: ("ours", os.path.abspath(args.against))} if args.against
                else {name: (name, ROOT) for name in RELAYS})
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
        print("| relay | instructions per event (events; worker busy) | per second, 20 silent streams |"
              " system calls per event (events) | by call |")
        print("|---|---:|---:|---:|---|")
        for label, (name, root) in runs.items():
            keep = args.keep and os.path.join(args.keep, "callgrind." + re.sub(r"\W+", "-", label).strip("-"))
            per_event, per_second, events, busy = instructions(tmp, upstream, lib, name, args.seconds, keep, root)
            calls, counted = syscalls(tmp, upstream, name, args.seconds, root)
            by_call = ", ".join(f"{call} {n:.2f}" for call, n in sorted(calls.items(), key=lambda c: -c[1]) if n >= 0.05)
            print(f"| {label} | {per_event:,.0f} ({events:,}; {busy:.0%}) | {per_second:,.0f} |"
                  f" {sum(calls.values()):.2f} ({counted:,}) | {by_call} |", flush=True)
    finally:
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
