"""The core names the server it can't serve, at the first stream (in-process: the check reads the WSGI environ)."""
import logging

import gevent
import pytest

import sse


def events():
    yield sse.ServerSentEvent("delta", {"text": "x"})


def test_a_gevent_server_without_monkey_patching_is_refused_with_the_fix():
    # pytest's process is not monkey-patched: a greenlet here is exactly that misconfiguration.
    job = gevent.spawn(sse.EventStream, events(), {"wsgi.multithread": False})
    job.join()
    assert isinstance(job.exception, sse.UnsupportedServer)
    assert "monkey" in str(job.exception) and "-k gthread" in str(job.exception)


def test_a_one_request_per_process_server_is_refused_with_the_fix():
    with pytest.raises(sse.UnsupportedServer, match=r"sync worker.*30 s.*-k gevent.*-k gthread"):
        sse.EventStream(events(), {"wsgi.multithread": False, "SERVER_SOFTWARE": "gunicorn/27.0.1"})


def test_a_server_without_a_client_socket_streams_with_a_warning_naming_the_keys(caplog):
    caplog.set_level(logging.WARNING, logger="sse")
    stream = sse.EventStream(events(), {"wsgi.multithread": True, "SERVER_SOFTWARE": "mystery/1.0"}, keepalive=5)
    assert b"".join(stream).startswith(b"event: delta")
    stream.close()
    assert "gunicorn.socket or werkzeug.socket" in caplog.text and "mystery/1.0" in caplog.text
