"""Stops that reach the stream wherever it runs: the stop request, client leases, and each worker's watcher.

A stop is recorded in the shared store first, then signalled: directly when the request
lands on the worker that holds the stream, by NOTIFY on Postgres. Each worker also
re-checks the store on its own (every POLL seconds while it holds streams), so a lost
signal still stops the stream, and it is the one that notices its own leases running out.
"""
import logging
import os

import gevent
from flask import Blueprint, current_app, jsonify

import db
import metrics

log = logging.getLogger("relay")
bp = Blueprint("stops", __name__)

# Re-check period: SQLite has no push signal, so its re-check is the signal between workers.
# 0.1 s: one query 10 times a second per worker holding streams; other workers' stops land
# within it (bench/stop.py: p99 ~100 ms, the target is 150 ms).
POLL = {"sqlite": 0.1, "postgres": 0.25}
_live = {}  # generation id -> EventStream, the streams this worker holds
_watcher = {}  # pid -> the watcher greenlet, started on this worker's first stream


def open_streams():
    """Return the ids of the chat streams this worker holds now."""
    return _live.keys()


def track(settings, gen_id, stream):
    """Remember that this worker holds `gen_id`'s stream, and watch the store for stops to it."""
    _live[gen_id] = stream
    metrics.OPEN_STREAMS.inc()
    if os.getpid() not in _watcher:
        _watcher[os.getpid()] = gevent.spawn(_watch, settings)
        if db.is_postgres(settings.database_url):
            gevent.spawn(_listen, settings)


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


def _watch(settings):
    """Stop this worker's streams that the store says were stopped or whose lease ran out."""
    url = settings.database_url
    period = POLL["postgres" if db.is_postgres(url) else "sqlite"]
    since = None
    while True:
        gevent.sleep(period)
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
