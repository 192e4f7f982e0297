"""Instructions and system calls per relayed event, ours vs the naive relay and the floor; prints tables.

    .venv/bin/python bench/instructions.py [--seconds S] [--keep DIR]

bench/capacity.py times the worker's CPU, which moves by up to 15 % from one 5 s window to
the next on a shared VM. These are two counts that do not move with the VM:
- Instructions per relayed event (user space): the worker runs under valgrind's callgrind,
  ~50x slower, so the load is scaled down as much (20 streams x 2 tokens/s: the worker's
  loop about as busy as at 100 x 20 natively); bench/counted.py brackets a window, and the
  instructions the worker executed in it are divided by the events the clients read in it.
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
from capacity import ours, text_of  # noqa: E402
from cancel import pin  # noqa: E402
from harness import ROOT, SSE, Upstream, scenario  # noqa: E402

RELAYS = {"ours": "wsgi:app", "naive Flask relay": "bench.naive_relay:app", "floor: parsing, nothing else": "bench.floor_relay:app"}
COUNTED = {"ours": "bench.counted:ours", "naive Flask relay": "bench.counted:naive",
           "floor: parsing, nothing else": "bench.counted:floor"}

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
    """`streams` clients reading a piece every `interval` s (None: one, then silence); counts the pieces read while `counting` is set."""

    def __init__(self, port, streams, interval):
        self.counting, self.events, self.times = False, 0, []
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
                self.events += self.counting

    def close(self):
        gevent.killall(self.greenlets)
        for c in self.clients:
            c.close()


def instructions(tmp, upstream, lib, name, seconds, keep, root=None):
    """Return (instructions per relayed event, per second with 20 silent streams, events) for relay `name` under callgrind.

    Per event is what a window of flowing streams adds over the same time with silent
    ones: a worker's fixed costs (the stop watcher's re-check, timers) are a far larger
    share of each event at this reduced rate than at 100 x 20.
    """
    out = Path(tempfile.mkdtemp(dir=tmp))
    server = ours(tmp, upstream, app=COUNTED[name], CALLGRIND_TOGGLE=lib, start_timeout=180, root=root or ROOT,
                  wrapper=["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}/cg.%p"])
    counts = []
    try:
        pin(server, upstream)
        worker = server.workers()[0]
        for interval in (None, 0.5):  # silent, then a piece every 0.5 s
            readers = Readers(server.port, 20, interval)
            gevent.sleep(3)
            # The first start turns counting on and has valgrind translate the hot code again;
            # the second, once that is done, zeroes the counts.
            for _ in range(2):
                urllib.request.urlopen(server.url + "/_callgrind/start", timeout=60).close()
                gevent.sleep(5)
            readers.counting = True
            gevent.sleep(seconds)
            readers.counting = False
            urllib.request.urlopen(server.url + "/_callgrind/dump", timeout=60).close()
            readers.close()
            counts.append(readers.events)
            gevent.sleep(2)
    finally:
        server.stop()
    totals = []
    for dump in sorted(glob.glob(f"{out}/cg.{worker}.*"), key=lambda path: int(path.rsplit(".", 1)[1])):
        with open(dump) as f:
            totals.append(int(re.search(r"^totals: (\d+)", f.read(), re.M).group(1)))
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(dump, Path(keep) / f"callgrind.{name.split()[0].strip(':')}.{len(totals)}")
    (silent, flowing), events = totals, counts[1]
    return (flowing - silent) / events, silent / seconds, events


def syscalls(tmp, upstream, name, seconds, root=None):
    """Return ({system call: count per relayed event}, events) for relay `name` at 100 x 20, natively."""
    server = ours(tmp, upstream, app=RELAYS[name], root=root or ROOT)
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
    counts, counted_for = collections.Counter(), 0
    for line in perf.stderr.splitlines():
        fields = line.split(",")
        if len(fields) > 3 and fields[0].isdigit():
            counts[fields[2].removeprefix("syscalls:sys_enter_")] += int(fields[0])
            counted_for = max(counted_for, int(fields[3]) / 1e9)  # ns the counters ran: perf takes a while to attach
    if not sum(counts.values()):
        sys.exit(f"perf counted no system calls: {perf.stderr.strip()[-500:]}")
    events = sum(1 for t in readers.times if end - counted_for <= t <= end)
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
        runs = ({"this checkout": ("ours", None), args.against: ("ours", os.path.abspath(args.against))} if args.against
                else {name: (name, None) for name in RELAYS})
        rows = {label: (instructions(tmp, upstream, lib, name, args.seconds, args.keep and f"{args.keep}/{i}", root),
                        syscalls(tmp, upstream, name, args.seconds, root))
                for i, (label, (name, root)) in enumerate(runs.items())}
        calls = sorted({c for _, (per, _) in rows.values() for c, n in per.items() if n >= 0.05},
                       key=lambda c: -next(iter(rows.values()))[1][0].get(c, 0))
        print("| relay | instructions per event (events) | per second, 20 silent streams | system calls per event (events) | "
              + " | ".join(calls) + " |")
        print("|---|---:|---:|---:|" + "---:|" * len(calls))
        for label, ((ir, fixed, n_ir), (per, n_sc)) in rows.items():
            print(f"| {label} | {ir:,.0f} ({n_ir:,}) | {fixed:,.0f} | {sum(per.values()):.2f} ({n_sc:,}) | "
                  + " | ".join(f"{per.get(c, 0):.2f}" for c in calls) + " |", flush=True)
    finally:
        upstream.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
