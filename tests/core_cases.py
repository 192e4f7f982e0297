"""Cases for the cancellation core (sse.py) inside one gevent process; run by test_core.py.

    python tests/core_cases.py CASE UPSTREAM_URL TMP_DIR

Each case prints one JSON line for the test to check. They run in a process of their own
because they need gevent's monkey-patching, which pytest's process must not get.
"""
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import requests  # noqa: E402
import urllib3  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sse  # noqa: E402
from harness import scenario  # noqa: E402

blocking_sleep = monkey.get_original("time", "sleep")


def fin_while_the_loop_is_busy(url, tmp):
    """Stop a stream waiting in a silence, then keep the loop from running anything for 0.5 s."""
    return _stop_then_block_the_loop(url, scenario(tag="busy-loop", tokens=100, interval=0.01, silence_after=2, silence=30),
                                     pieces=2)


def fin_before_headers_while_the_loop_is_busy(url, tmp):
    """Stop a stream whose provider has not answered yet, then keep the loop from running anything for 0.5 s."""
    return _stop_then_block_the_loop(url, scenario(tag="busy-headers", header_delay=30), pieces=0)


def _stop_then_block_the_loop(url, chat, pieces):
    def events():
        yield sse.ServerSentEvent("start")
        with requests.post(url + "/v1/chat/completions", json=chat, stream=True) as resp:
            for chunk in sse.iter_chunks(resp):
                yield sse.ServerSentEvent("delta", chunk.decode())

    stream = sse.EventStream(events(), environ={}, keepalive=5)
    body = iter(stream)
    for _ in range(1 + pieces):
        next(body)  # the start, and `pieces` pieces
    gevent.sleep(0.1)  # the producer now waits: in the silence, or for the headers
    stopped = time.monotonic()
    stream.stop("client_disconnect")
    blocking_sleep(0.5)  # as if 0.5 s of other streams' teardown were queued before the kill
    stream.close()
    return {"stopped": stopped, "reason": stream.reason}


def stop_while_the_row_is_written(url, tmp):
    """Let the upstream finish, then Stop while the producer is writing the generation's row."""
    os.environ.update(LLM_PROVIDER="openai", LLM_BASE_URL=url + "/v1", LLM_MODEL="m",
                      GENERATIONS_DB=os.path.join(tmp, "late-stop.db"))
    import app
    import config
    import db
    settings = config.from_env()
    db.init(settings.database_url)
    db.start_generation(settings.database_url, "gen_late_stop", "openai", "m", "test")
    stream = sse.EventStream(app.generation(settings, "gen_late_stop", scenario(tokens=2)["messages"], None),
                             environ={}, keepalive=5)
    kinds = []
    for item in stream:
        kinds.append(item.split(b"\n", 1)[0].decode())
        if item.startswith(b"event: done"):
            break  # the producer is past its last event, finishing the row
    stream.stop("client_disconnect")
    stream.close()
    deadline = time.monotonic() + 3
    while db.get_generation(settings.database_url, "gen_late_stop")["status"] == "streaming" and time.monotonic() < deadline:
        gevent.sleep(0.05)
    return {"events": kinds, "row": db.get_generation(settings.database_url, "gen_late_stop")}


def reads_wait_once_drained(url, tmp):
    """Read a stream of 20 events 20 ms apart, then a silence, with iter_chunks through the relay's session; count failed reads."""
    from providers.base import http

    class Counting:
        """The OS socket under gevent's, counting the reads the kernel refused (EAGAIN)."""
        def __init__(self, real):
            self.real, self.reads, self.refused = real, 0, 0

        def recv_into(self, *args):
            self.reads += 1
            try:
                return self.real.recv_into(*args)
            except BlockingIOError:
                self.refused += 1
                raise

        def __getattr__(self, name):
            return getattr(self.real, name)

    body = scenario(tag="drained", tokens=30, interval=0.02, silence_after=20, silence=5)
    resp = http.post(url + "/v1/chat/completions", json=body, stream=True, timeout=(2, 0.5))
    sock = resp.raw.connection.sock
    sock._sock = counting = Counting(sock._sock)
    events, error, started = 0, None, time.monotonic()
    try:
        for chunk in sse.iter_chunks(resp):
            events += chunk.count(b"data: {")
    except urllib3.exceptions.ReadTimeoutError as exc:  # the read timeout, in the silence
        error = type(exc).__name__
    return {"events": events, "reads": counting.reads, "refused": counting.refused, "error": error,
            "seconds": time.monotonic() - started}


def one_greenlet_reads_and_writes(url, tmp):
    """With the server's write() in the environ (sse.init_app), the response's own greenlet writes each event, in order."""
    log = []  # what reached the client, in order: each write's start and end, and what the body yielded

    def write(data):
        log.append(("write", data.decode(), gevent.getcurrent() is reader))
        gevent.sleep(0.03)  # a write that blocks a while: a keepalive due meanwhile must wait
        log.append(("written", None, None))

    def events():
        for i in range(5):
            yield sse.ServerSentEvent("delta", {"i": i})
            gevent.sleep(0.05)

    stream = sse.EventStream(events(), environ={sse.WRITE_KEY: write}, keepalive=0.01)
    reader = gevent.getcurrent()  # the greenlet that iterates the body, as gunicorn's handler does
    for item in stream:
        log.append(("yield", item.decode(), False))
    deltas = [data for kind, data, _ in log if kind in ("write", "yield") and data.startswith("event: delta")]
    inside_a_write = False
    for kind, data, _ in log:
        if kind in ("write", "yield") and inside_a_write:
            return {"interleaved": data}
        inside_a_write = kind == "write" or (inside_a_write and kind != "written")
    return {"by_reader": sum(1 for kind, data, mine in log if kind == "write" and mine and data.startswith("event: delta")),
            "yielded": sum(1 for kind, _, _ in log if kind == "yield"),
            "order": [json.loads(d.split("data: ", 1)[1])["i"] for d in deltas],
            "keepalives": sum(1 for kind, data, _ in log if kind == "write" and data.startswith(": keepalive"))}


def stop_while_the_producer_writes(url, tmp):
    """A Stop (the client still there) lands while the producer is inside a write that blocks."""
    written, seen = [], []

    def write(data):
        written.append(data[:7])
        gevent.sleep(0.3)  # a client that reads slowly: the write waits for room
        written.append(data[7:])

    def events():
        try:
            yield sse.ServerSentEvent("delta", {"text": "x" * 100})
            gevent.sleep(30)  # the provider, silent
        except sse.Cancelled as stop:
            seen.append(stop.reason)
            yield sse.ServerSentEvent("done", {"status": "cancelled"})

    stream = sse.EventStream(events(), environ={sse.WRITE_KEY: write}, keepalive=5)
    body = iter(stream)
    waiter = gevent.spawn(lambda: [item for item in body])
    gevent.sleep(0.1)  # the producer is in its write
    stream.stop("stopped")
    yielded = waiter.get(timeout=5)
    stream.close()
    return {"written": b"".join(written).decode(), "yielded": b"".join(yielded).decode(), "seen": seen}


def stop_as_the_events_end(url, tmp):
    """A Stop whose Cancelled is still on its way when the events end: the response's greenlet has gone back to the server."""
    def events():
        yield sse.ServerSentEvent("delta", {"i": 0})
        stream.stop("late")  # raised from the loop, after these events have ended

    stream = sse.EventStream(events(), environ={sse.WRITE_KEY: lambda data: None}, keepalive=5)
    list(stream)
    try:
        gevent.sleep(0.1)  # the server's greenlet, waiting for the connection's next request
    except sse.Cancelled as exc:
        return {"cancelled_in_the_server": exc.reason}
    return {"cancelled_in_the_server": None}


def read_timeout_while_writing_to_a_slow_client(url, tmp):
    """The provider's read timeout (0.3 s) passes while the events' greenlet waits 0.6 s on a slow client's write."""
    from providers.base import http
    written = []

    def write(data):
        written.append(b"")
        gevent.sleep(0.6)  # a client reading slowly: the write waits for room
        written[-1] = data

    def events():
        try:
            body = scenario(tag="slow-client", tokens=3, interval=0.05)
            with http.post(url + "/v1/chat/completions", json=body, stream=True, timeout=(2, 0.3)) as resp:
                for event in sse.sse_events(resp):
                    yield sse.ServerSentEvent("piece", event.data)
        except Exception as exc:  # noqa: BLE001 - the case reports whatever ended it
            yield sse.ServerSentEvent("error", type(exc).__name__)

    list(sse.EventStream(events(), environ={sse.WRITE_KEY: write}, keepalive=5))
    return {"events": [data.decode().split("\n")[0] for data in written], "whole": all(written)}


def waits_for_the_provider_at_the_top(url, tmp):
    """Streams whose events pass sse.WAIT on: what the greenlet waits under in a silence; a Stop and the read timeout then."""
    from providers.base import http
    seen = {}

    def events(name, chat, read_timeout):
        with http.post(url + "/v1/chat/completions", json=chat, stream=True, timeout=(2, read_timeout)) as resp:
            try:
                for event in sse.sse_events(resp, waits=True):
                    if event is sse.WAIT:
                        yield sse.WAIT
                    elif event.data != "[DONE]":
                        chunk = json.loads(event.data)
                        yield sse.ServerSentEvent("piece", [c["delta"].get("content") for c in chunk["choices"]])
            except BaseException as exc:  # where the events read: their own handlers must see it
                seen[name] = type(exc).__name__
                raise

    def run(name, chat, read_timeout=30):
        written = []
        stream = sse.EventStream(events(name, chat, read_timeout), environ={sse.WRITE_KEY: written.append}, keepalive=5)
        return stream, written, gevent.spawn(lambda: list(stream))

    def frames(greenlet):
        names, frame = [], greenlet.gr_frame
        while frame is not None:
            names.append(frame.f_code.co_name)
            frame = frame.f_back
        return names

    # Two pieces, a 0.5 s silence, two more: the silence is waited for at the top, nothing is lost.
    _, written, reader = run("pause", scenario(tag="top-pause", tokens=4, interval=0.01, silence_after=2, silence=0.5))
    gevent.sleep(0.3)
    in_the_silence = frames(reader)
    reader.get(timeout=5)
    pieces = [json.loads(data.decode().split("data: ", 1)[1]) for data in written if data.startswith(b"event: piece")]
    # A provider deaf to our FIN, silent: only the Cancelled raised into the wait can end it.
    stream, _, reader = run("stop", scenario(tag="top-stop", tokens=3, silence_after=1, silence=30, deaf=True))
    gevent.sleep(0.3)
    started = time.monotonic()
    stream.stop("stop_request")
    reader.join(timeout=5)
    stopped_in = time.monotonic() - started
    # The read timeout (0.3 s) in a 30 s silence.
    started = time.monotonic()
    _, _, reader = run("timeout", scenario(tag="top-timeout", tokens=3, silence_after=1, silence=30), read_timeout=0.3)
    reader.join(timeout=5)
    return {"in_the_silence": in_the_silence, "pieces": pieces, "seen": seen, "stopped_in": stopped_in,
            "timed_out_in": time.monotonic() - started}


if __name__ == "__main__":
    case, url, tmp = sys.argv[1:4]
    print(json.dumps(globals()[case](url, tmp)), flush=True)
