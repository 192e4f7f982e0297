"""Stops that reach the stream wherever it runs: the stop request, client leases, and each worker's watcher.

A stop is recorded in the shared store first, then signalled: directly when the request
lands on the worker that holds the stream, by NOTIFY on Postgres, by a datagram that wakes
the holder's re-check on SQLite. Each worker also re-checks the store on its own (every POLL
seconds while it holds streams), so a lost signal still stops the stream, and it is the one
that notices its own leases running out.
"""
import hashlib
import logging
import os
import socket
import sys

import gevent
from gevent.event import Event
from flask import Blueprint, current_app, jsonify

import db
import metrics

log = logging.getLogger("relay")
bp = Blueprint("stops", __name__)

# Re-check period, for leases and lost signals. Each re-check is a query that costs the
# worker ~0.5 ms of CPU once its caches are cold (bench/parts.py): at 10 a second, as SQLite's
# was before it had a wake, ~2.5 us of every event at 100 streams x 20 tokens/s.
POLL = {"sqlite": 0.5, "postgres": 0.25}
_live = {}  # generation id -> EventStream, the streams this worker holds
_watcher = {}  # pid -> the Event that wakes its watcher greenlet, started on its first stream
_sender = []  # this process's socket for waking other workers (SQLite)


def open_streams():
    """Return the ids of the chat streams this worker holds now."""
    return _live.keys()


def track(settings, gen_id, stream):
    """Remember that this worker holds `gen_id`'s stream, and watch the store for stops to it."""
    _live[gen_id] = stream
    metrics.OPEN_STREAMS.inc()
    if os.getpid() not in _watcher:
        wake = _watcher[os.getpid()] = Event()
        gevent.spawn(_watch, settings, wake)
        if db.is_postgres(settings.database_url):
            gevent.spawn(_listen, settings)
        elif sys.platform.startswith("linux"):
            gevent.spawn(_take_wakes, settings.database_url, wake)


def untrack(gen_id):
    """Forget a stream once it has ended."""
    if _live.pop(gen_id, None) is not None:
        metrics.OPEN_STREAMS.dec()


def _stop_local(gen_id, reason):
    stream = _live.get(gen_id)
    if stream is not None:
        stream.stop(reason)
        return True
    return False


def _watch(settings, wake):
    """Stop this worker's streams that the store says were stopped or whose lease ran out."""
    url = settings.database_url
    period = POLL["postgres" if db.is_postgres(url) else "sqlite"]
    since = None
    while True:
        wake.wait(period)
        wake.clear()
        if not _live:
            if since is not None:
                db.release(url)
            since = None
            continue
        try:
            if since is None:
                since = db.stops_since(url, 1e12, settings.instance_id, os.getpid())[1] - 2
            stopped, clock = db.stops_since(url, since, settings.instance_id, os.getpid())
            for gen_id, reason in stopped:
                if gen_id in _live and (reason != "lease_expired" or db.cancel(url, gen_id, reason)):
                    _stop_local(gen_id, reason)
            # Two seconds back: a stop stamped earlier may commit after this read.
            since = clock - 2
        except Exception as exc:  # noqa: BLE001 - the store down, or anything: keep watching
            log.warning("stop watcher: %s; retrying", str(exc).strip())
            gevent.sleep(1)


# SQLite has no push signal, and every worker on one SQLite file runs on one machine: the
# worker that took a stop wakes the holder's re-check with a datagram on an abstract Unix
# socket (Linux: a name, no file to clean up, gone with its process). It carries nothing to
# trust; a stray one costs one query. Elsewhere the re-check alone finds the stop.
def _address(url, pid):
    """Return the socket name of worker `pid` on the SQLite file of `url`."""
    path = os.path.realpath(db._sqlite_path(url)).encode()
    return f"\0relay-stops-{hashlib.sha256(path).hexdigest()[:16]}-{pid}"


def _take_wakes(url, wake):
    """Wake this worker's watcher whenever another worker says a stop for it is in the store."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(_address(url, os.getpid()))
    except OSError as exc:
        log.warning("stop signals between workers are off (%s): stops taken by another worker land within %g s",
                    exc, POLL["sqlite"])
        return
    while True:
        sock.recv(16)
        wake.set()


def _wake_holder(url, record):
    """Tell the SQLite worker holding `record`'s stream to re-check the store now."""
    pid = (record or {}).get("worker_pid")
    if db.is_postgres(url) or not pid or pid == os.getpid() or not sys.platform.startswith("linux"):
        return
    if not _sender or _sender[0][0] != os.getpid():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)  # a full queue means a wake is pending already
        _sender[:] = [(os.getpid(), sock)]
    try:
        _sender[0][1].sendto(b"!", _address(url, pid))
    except OSError:
        pass  # that worker is gone, or its queue is full: its re-check covers it


def _listen(settings):
    """Take NOTIFY stop signals from Postgres, reconnecting by itself whenever the connection drops."""
    while True:
        try:
            db.listen(settings.database_url, lambda gen_id: _stop_local(gen_id, "stop_request"))
        except Exception as exc:  # noqa: BLE001 - any failure: reconnect; the watcher re-checks meanwhile
            log.warning("stop listener: %s; reconnecting in 1 s", str(exc).strip())
            gevent.sleep(1)


def _answer(gen_id, record):
    if record is None:
        # The chat may still be on its way: it will end at once when it comes.
        return jsonify(id=gen_id, status="pending"), 202
    return jsonify(id=gen_id, status=record["status"], cancel_reason=record["cancel_reason"],
                   lease_expires_at=record["lease_expires_at"])


@bp.post("/api/generations/<gen_id>/stop")
def stop(gen_id):
    """Stop a generation wherever it streams; idempotent, and harmless after the end."""
    url = current_app.config["SETTINGS"].database_url
    # On the worker holding the stream, stop it now: no signal is involved that could be lost.
    _stop_local(gen_id, "stop_request")
    # Elsewhere, durable first, then signalled: a lost signal is found by the owner's re-check.
    db.request_stop(url, gen_id)
    record = db.get_generation(url, gen_id)
    _wake_holder(url, record)
    db.forget_old_stops(url)
    return _answer(gen_id, record)


@bp.post("/api/generations/<gen_id>/lease")
def lease(gen_id):
    """Renew a streaming generation's lease by its own length."""
    record = db.renew_lease(current_app.config["SETTINGS"].database_url, gen_id)
    if record is None:
        return jsonify(error={"type": "not_found", "message": f"no generation {gen_id}"}), 404
    return _answer(gen_id, record)


def init_app(app):
    """Serve the stop and lease routes."""
    app.register_blueprint(bp)
