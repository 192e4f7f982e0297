"""gunicorn settings for long-lived event streams. Every value can be overridden on the command line."""
import os
import glob
import resource
import sys
import tempfile

import config as settings_module  # not "config": gunicorn reads that name as a setting
import db

bind = os.environ.get("BIND", "127.0.0.1:8000")
# One process per core. Each gevent worker serves many streams at once: a stream is a
# greenlet waiting on sockets, not a thread.
workers = int(os.environ.get("WEB_CONCURRENCY", os.cpu_count() or 1))
worker_class = "gevent"
# Open connections per worker, counting the demo model's own: each demo chat holds two.
# The app derives MAX_STREAMS_PER_WORKER from it, so a full worker answers 503 at once
# instead of leaving new connections waiting unseen.
worker_connections = int(os.environ.get("WORKER_CONNECTIONS", "1000"))
os.environ["WORKER_CONNECTIONS"] = str(worker_connections)
# gevent records who spawned each greenlet and from where (a stack summary), for debugging
# tools we do not use: ~2.7 KB of every open stream (bench/capacity.py). Read by the workers.
# https://www.gevent.org/api/gevent._config.html#gevent._config.TrackGreenletTree
os.environ.setdefault("GEVENT_TRACK_GREENLET_TREE", "false")
# Each open stream is two sockets in its worker (the client's, the provider's): raise the
# soft open-file limit to the hard one (any process may) for the master and its workers.
# 10,000 streams per worker need ~20,100: `ulimit -Hn`, systemd LimitNOFILE= (README).
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))
except (ValueError, OSError):
    pass  # an unlimited hard limit the kernel caps lower: keep the soft one
FILES_NEEDED = 2 * worker_connections + 100
# prometheus_client's multiprocess mode: each worker writes its metrics to files here and
# /metrics adds them up. Set before any worker imports prometheus_client; wiped at start.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="relay-metrics-"))
# For async workers `timeout` is not a request limit: it is how long the worker's event
# loop may go without a heartbeat before the master kills it. Streams last as long as they
# need; a blocked loop (a non-cooperative call) is what this catches.
timeout = 30
# On reload (HUP) or TERM, streams get this long to finish; then each open one gets an
# `error` event saying the server is restarting, its upstream is closed and its row is
# marked cancelled / server_shutdown (see worker hooks below).
graceful_timeout = 30
# Idle keep-alive connections from nginx are closed after this; streams are not idle.
keepalive = 75
accesslog = "-"


def on_starting(server):
    """Check the settings once in the master, and close rows a crash left streaming."""
    try:
        settings = settings_module.from_env()
    except settings_module.ConfigError as exc:
        sys.exit(f"configuration error: {exc}")
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if files < FILES_NEEDED:
        server.log.warning("WORKER_CONNECTIONS=%d needs about %d open files per worker, the limit is %d: streams past"
                           " ~%d per worker will fail to connect. Raise it (ulimit -n / LimitNOFILE=) or lower"
                           " WORKER_CONNECTIONS.", worker_connections, FILES_NEEDED, files, (files - 100) // 2)
    metrics_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(metrics_dir, exist_ok=True)
    for name in glob.glob(os.path.join(metrics_dir, "*.db")):
        os.remove(name)  # a previous run's counts are not this run's
    try:
        db.init(settings.database_url)
        # Only this instance's rows: another machine's live streams are not ours to close.
        count = db.cancel_streaming(settings.database_url, "server_restart", settings.instance_id)
    except db.Unavailable as exc:
        sys.exit(f"the store is unavailable at start-up: {exc}")
    if count:
        server.log.warning("marked %d generation(s) left streaming as cancelled/server_restart", count)


def post_worker_init(worker):
    """Stop this worker's streams with a clear error before a graceful shutdown cuts them."""
    import gc

    import gevent
    import sse

    # The app's own ~45,000 objects live as long as the worker: freeze them out of the
    # collector. Its full passes pause the event loop, and every Stop with it: measured
    # with 200 streams open, up to 130 ms before, up to 86 ms after (the streams' own
    # objects remain; README "Benchmarks").
    gc.freeze()

    def drain():
        while worker.alive:
            gevent.sleep(0.1)
        # Leave a second before the worker's forced stop to write the last events.
        gevent.sleep(max(0.0, worker.cfg.graceful_timeout - 2))
        sse.stop_all("server_shutdown")

    gevent.spawn(drain)


def worker_int(worker):
    """On a quick shutdown (INT/QUIT) stop every stream at once, with the same clear error."""
    import gevent
    import sse

    sse.stop_all("server_shutdown")
    gevent.sleep(0.05)


def child_exit(server, worker):
    """A worker that died (or was killed) leaves no row streaming, and no live gauge."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # only removes its files: no metric is updated here
    settings = settings_module.from_env()
    try:
        count = db.cancel_streaming(settings.database_url, "server_restart", settings.instance_id, worker_pid=worker.pid)
    except db.Unavailable as exc:
        server.log.error("worker %s died; its rows could not be closed: %s", worker.pid, exc)
        return
    if count:
        server.log.warning("worker %s left %d generation(s) streaming; marked cancelled/server_restart", worker.pid, count)
