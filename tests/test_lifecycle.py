"""Reload, shutdown and crashes never cut a stream silently nor leave a row `streaming`."""
import os
import signal
import time
import uuid

import pytest

from harness import SSE, Server, scenario, texts


def tag():
    return uuid.uuid4().hex[:12]


def start_stream(server, upstream):
    t = tag()
    s = SSE(server.port, scenario(tag=t, tokens=100000, interval=0.02))
    events = s.read_until("delta", 2)
    return t, s, events


@pytest.mark.parametrize("sig, within", [(signal.SIGHUP, 4.0), (signal.SIGTERM, 4.0), (signal.SIGINT, 1.0)],
                         ids=["reload", "graceful_shutdown", "quick_shutdown"])
def test_streams_end_with_a_clear_error_on_reload_and_shutdown(upstream, tmp_path, sig, within):
    server = Server(tmp_path, args=("--graceful-timeout", "3"), LLM_PROVIDER="openai",
                    LLM_BASE_URL=upstream.url + "/v1", LLM_MODEL="m")
    try:
        t, s, events = start_stream(server, upstream)
        gen_id = events[0][1]["id"]
        sent = time.monotonic()
        os.kill(server.proc.pid, sig)
        events += s.read_all()
        ended = time.monotonic()
        assert events[-1][0] == "error", events[-3:]
        assert events[-1][1]["type"] == "server_shutdown" and "restarting" in events[-1][1]["message"]
        assert ended - sent < within
        assert upstream.wait_closed(t)["closed_at"] is not None
        if sig == signal.SIGHUP:  # the new workers serve on
            gen = server.wait_finished(gen_id)
            assert SSE(server.port, scenario(tokens=2)).read_all()[-1][0] == "done"
        else:
            server.proc.wait(10)
            gen = get_row(server.db, gen_id)
        assert gen["status"] == "cancelled" and gen["cancel_reason"] == "server_shutdown"
        assert gen["text"] == texts(events)
    finally:
        server.stop()


def get_row(path, gen_id):
    import sqlite3
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    row = dict(conn.execute("SELECT * FROM generations WHERE id = ?", (gen_id,)).fetchone())
    conn.close()
    return row


def test_a_killed_worker_leaves_no_row_streaming(upstream, tmp_path):
    server = Server(tmp_path, LLM_PROVIDER="openai", LLM_BASE_URL=upstream.url + "/v1", LLM_MODEL="m")
    try:
        t, s, events = start_stream(server, upstream)
        gen_id = events[0][1]["id"]
        os.kill(server.workers()[0], signal.SIGKILL)
        gen = server.wait_finished(gen_id, timeout=10)
        assert gen["status"] == "cancelled" and gen["cancel_reason"] == "server_restart"
        assert upstream.wait_closed(t)["closed_at"] is not None  # the kernel closed it with the process
    finally:
        server.stop()


def test_rows_left_streaming_by_a_crash_are_closed_at_start_up(upstream, tmp_path):
    db = str(tmp_path / "shared.db")
    server = Server(tmp_path, LLM_PROVIDER="openai", LLM_BASE_URL=upstream.url + "/v1", LLM_MODEL="m", GENERATIONS_DB=db)
    workers = server.workers()
    t, s, events = start_stream(server, upstream)
    gen_id = events[0][1]["id"]
    for pid in [server.proc.pid, *workers]:  # a power cut: nobody gets to clean up
        os.kill(pid, signal.SIGKILL)
    server.proc.wait()
    assert get_row(db, gen_id)["status"] == "streaming"
    again = Server(tmp_path, LLM_PROVIDER="openai", LLM_BASE_URL=upstream.url + "/v1", LLM_MODEL="m", GENERATIONS_DB=db)
    try:
        gen = again.generation(gen_id)
        assert gen["status"] == "cancelled" and gen["cancel_reason"] == "server_restart"
    finally:
        again.stop()
        server.log.close()
