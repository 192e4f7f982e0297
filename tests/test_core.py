"""The cancellation core (sse.py) on its own, in a gevent process of its own (tests/core_cases.py)."""
import json
import os
import subprocess

import pytest

from harness import PYTHON, ROOT


def run_case(case, upstream, tmp_path):
    proc = subprocess.run([PYTHON, os.path.join(ROOT, "tests", "core_cases.py"), case, upstream.url, str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("case, tag", [("fin_while_the_loop_is_busy", "busy-loop"),
                                       ("fin_before_headers_while_the_loop_is_busy", "busy-headers")],
                         ids=["reading the body", "waiting for headers"])
def test_stop_sends_the_provider_its_fin_even_while_the_loop_is_busy(upstream, tmp_path, case, tag):
    """The FIN goes out inside stop(), not when the producer next runs: when hundreds of
    streams stop at once, none waits for the others' teardown."""
    result = run_case(case, upstream, tmp_path)
    record = upstream.wait_closed(tag)
    assert result["reason"] == "client_disconnect"
    assert record["closed_at"] is not None
    assert record["closed_at"] - result["stopped"] < 0.25  # the loop was blocked for 0.5 s after stop()


def test_a_stop_while_the_row_is_written_loses_no_row(upstream, tmp_path):
    """The upstream finished; a Stop then lands while the producer writes the row."""
    result = run_case("stop_while_the_row_is_written", upstream, tmp_path)
    assert result["events"] == ["event: start", "event: delta", "event: delta", "event: done"]
    row = result["row"]
    assert row["status"] == "complete" and row["text"] == "tok0 tok1 " and row["ended_at"]


def test_a_drained_provider_socket_is_waited_on_not_read(upstream, tmp_path):
    """Between events a provider's socket is empty: iter_chunks waits for it instead of first
    asking the kernel for bytes it has not got (a system call and an exception per event), and
    the read timeout still holds in a silence."""
    result = run_case("reads_wait_once_drained", upstream, tmp_path)
    assert result["events"] >= 20, result  # the tokens, and the role and usage chunks around them
    assert result["refused"] <= 2, result  # gevent's own recv: one refused read per event (~20)
    assert result["reads"] >= 20
    assert result["error"] == "ReadTimeoutError"  # urllib3's, from the socket's timeout
    assert result["seconds"] < 3  # 0.4 s of events, then the 0.5 s read timeout, not the 5 s silence


def test_with_init_app_the_responses_own_greenlet_reads_and_writes_each_event(upstream, tmp_path):
    """sse.init_app passes the server's write() on: the greenlet that iterates the body reads
    the events and writes each itself, in order (one greenlet per stream), and a keepalive,
    written by a greenlet of its own in a silence, never overlaps an event's write."""
    result = run_case("one_greenlet_reads_and_writes", upstream, tmp_path)
    assert "interleaved" not in result, result
    assert result["by_reader"] == 5, result
    assert result["yielded"] == 0, result
    assert result["order"] == [0, 1, 2, 3, 4]
    assert result["keepalives"] >= 1  # the 50 ms silences between events still get theirs


def test_a_stop_waits_for_the_producers_write_then_cancels_where_it_waits(upstream, tmp_path):
    """A kill inside the write would leave the client half an event and skip the events'
    own `except Cancelled`; the Stop lands once the write is done, where the producer waits."""
    result = run_case("stop_while_the_producer_writes", upstream, tmp_path)
    assert result["written"] == ('event: delta\ndata: {"text": "' + "x" * 100 + '"}\n\n'
                                 'event: done\ndata: {"status": "cancelled"}\n\n'), result
    assert result["seen"] == ["stopped"]
    assert result["yielded"] == "", result


def test_a_stop_that_comes_as_the_events_end_is_not_raised_in_the_server(upstream, tmp_path):
    """With init_app the events run in gunicorn's own greenlet: a Cancelled delivered after they
    ended would land in gunicorn's wait for the connection's next request and drop it."""
    assert run_case("stop_as_the_events_end", upstream, tmp_path) == {"cancelled_in_the_server": None}


def test_the_read_timeout_does_not_cut_a_write_to_a_slow_client(upstream, tmp_path):
    """The read timeout is the provider's silence: while the greenlet that reads it is blocked
    writing to a slow client, it must not fire inside the write (half an event, then an error)."""
    result = run_case("read_timeout_while_writing_to_a_slow_client", upstream, tmp_path)
    assert result["whole"], result
    assert result["events"] == ["event: piece"] * len(result["events"]) and len(result["events"]) >= 3, result


def test_events_that_pass_wait_on_wait_for_the_provider_under_no_generator(upstream, tmp_path):
    """With sse_events(resp, waits=True) and WAIT passed on, a silent stream's greenlet waits
    at the top of its stack (a waiting greenlet keeps its C stack: ~0.7 KB per generator it
    waits under); the pieces after a silence all arrive; a Stop and the read timeout that come
    during the wait are raised where the events read, so their own handlers run."""
    result = run_case("waits_for_the_provider_at_the_top", upstream, tmp_path)
    stack = result["in_the_silence"]
    assert stack[:2] == ["wait", "_wait_upstream"], stack  # innermost first
    assert not {"events", "sse_events", "iter_chunks", "read_chunked"} & set(stack), stack
    # the last two: finish_reason, usage
    assert result["pieces"] == [["tok0 "], ["tok1 "], ["tok2 "], ["tok3 "], [None], []], result
    assert "pause" not in result["seen"]  # [DONE] ended it
    assert result["seen"]["stop"] == "Cancelled" and result["stopped_in"] < 2, result
    assert result["seen"]["timeout"] == "TimeoutError" and result["timed_out_in"] < 3, result
