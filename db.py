"""The shared store: the generation log, stops, leases and the demo meter.

One interface over two engines, chosen by the URL: `sqlite:///path` (the embedded default,
one machine) or `postgresql://...` (several machines). Callers write SQL with `?`
placeholders and `{now}` for the store's own clock in epoch seconds, so every machine
reads leases and stops on one clock.
"""
import atexit
import json
import os
import sqlite3
import threading
import time
from datetime import datetime, timezone

FIELDS = ("id", "status", "cancel_reason", "provider", "model", "started_at", "first_token_at",
          "ended_at", "chunks", "text", "error", "upstream_request_id", "finish_reason", "usage",
          "instance_id", "worker_pid", "lease_seconds", "lease_expires_at", "usage_estimate")
# Columns added after the first release: an existing SQLite log gets them at start-up.
ADDED_COLUMNS = (("instance_id", "TEXT NOT NULL DEFAULT ''"), ("lease_seconds", "DOUBLE PRECISION"),
                 ("lease_expires", "DOUBLE PRECISION"), ("client_addr", "TEXT"), ("usage_estimate", "TEXT"))
# A stop for an id whose chat has not come (yet) is kept this long, then forgotten.
STOP_MEMORY_SECONDS = 600
NOTIFY_CHANNEL = "relay_stop"


class Unavailable(Exception):
    """The store could not be reached or could not run a statement."""


class IdTaken(Exception):
    """A generation with this id exists already."""


class ClientLimit(Exception):
    """The client has MAX_STREAMS_PER_CLIENT streams open already."""


def iso(timestamp):
    """Return a Unix timestamp as ISO 8601 UTC with milliseconds."""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now():
    """Return the current UTC time as ISO 8601 with milliseconds."""
    return iso(time.time())


def is_postgres(url):
    """Tell whether a store URL names Postgres."""
    return url.startswith(("postgres://", "postgresql://"))


def _sqlite_path(url):
    return url[len("sqlite:///"):] if url.startswith("sqlite:///") else url


_kept = {}  # (path, pid) -> the SQLite connection kept open for the stop watcher's re-checks


def _sqlite_run(path, statements, keep=False):
    """Run statements in one transaction on SQLite; return the last one's (rows, rows changed).

    Each call has its own connection, closed after it; `keep` reuses one kept open until
    release(): the stop watcher re-checks 10 times a second, and a connect costs ~6 queries.
    """
    try:
        conn = _kept.get((path, os.getpid())) if keep else None
        if conn is None:
            conn = sqlite3.connect(path, timeout=10, check_same_thread=False)  # kept: any pool thread, one at a time
            # With WAL, NORMAL skips the fsync per commit and still never corrupts the file;
            # a power cut can lose the last few log rows, never a stream.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.row_factory = sqlite3.Row
            if keep:
                _kept[(path, os.getpid())] = conn
        with conn:
            for sql, args in statements:
                cursor = conn.execute(sql.replace("{now}", "((julianday('now') - 2440587.5) * 86400.0)"), args)
                rows = [dict(row) for row in cursor.fetchall()]
        if not keep:
            conn.close()  # no connection outlives its call: nothing held per thread of the pool
    except sqlite3.Error as exc:
        raise Unavailable(f"sqlite: {exc}") from exc
    return rows, cursor.rowcount


def release(url):
    """Close the connection kept for `url`'s stop watcher (SQLite), once the worker holds no stream."""
    conn = _kept.pop((_sqlite_path(url), os.getpid()), None)
    if conn is not None:
        conn.close()


def _psycopg():
    """Import psycopg, cooperative under gevent even if the master imported it before patching."""
    import psycopg
    from psycopg import waiting

    # psycopg picks its wait function at import; the C one blocks a gevent worker's loop.
    # https://github.com/psycopg/psycopg/pull/663 (3.1.14): detected only if patched first.
    if waiting._is_select_patched() and waiting.wait is getattr(waiting, "wait_c", None):
        waiting.wait = waiting.wait_poll
    return psycopg


_pools = {}
_pools_lock = threading.Lock()


def _pool(url):
    """Return this process's connection pool for a Postgres URL, made on first use after fork."""
    key = (url, os.getpid())
    with _pools_lock:
        if key not in _pools:
            _psycopg()
            from psycopg.rows import dict_row
            from psycopg_pool import ConnectionPool

            # timeout: a chat waits at most this long for the store before its 503.
            # min_size 2: the stop watcher's re-check and a request, without waiting for a connect.
            _pools[key] = ConnectionPool(url, min_size=2, max_size=20, timeout=3, open=True,
                                         kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": 3},
                                         check=ConnectionPool.check_connection, name="relay")
            # Closed while the interpreter still stands; its __del__ at exit would fail loudly.
            atexit.register(_pools[key].close, timeout=1)
        return _pools[key]


def _pg_sql(sql):
    return sql.replace("%", "%%").replace("?", "%s").replace("{now}", "extract(epoch from clock_timestamp())::float8")


def _pg_transaction(conn, statements):
    with conn.transaction():
        for sql, args in statements:
            cursor = conn.execute(_pg_sql(sql), args)
    return (cursor.fetchall() if cursor.description else []), cursor.rowcount


def _pg_run(url, statements, pooled=True):
    """Run statements in one transaction on Postgres (pooled in workers, direct in gunicorn's master)."""
    psycopg = _psycopg()
    from psycopg_pool import PoolTimeout
    try:
        if pooled:
            with _pool(url).connection() as conn:
                return _pg_transaction(conn, statements)
        from psycopg.rows import dict_row
        with psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=5) as conn:
            return _pg_transaction(conn, statements)
    except (psycopg.Error, PoolTimeout) as exc:
        raise Unavailable(f"postgres: {str(exc).strip()}") from exc


def _gevent_loop_running():
    try:
        from gevent import monkey
    except ImportError:
        return False
    return monkey.is_module_patched("socket")


def run(url, sql, args=(), pooled=True, then=(), keep=False):
    """Run one statement, and the (sql, args) pairs of `then` in the same transaction.

    Returns the last statement's (rows as dicts, number of rows changed).
    """
    statements = [(sql, args), *then]
    if is_postgres(url):
        return _pg_run(url, statements, pooled)
    if pooled and _gevent_loop_running():
        import gevent

        # sqlite3 blocks its thread: in gevent's thread pool disk waits never stall the loop.
        return gevent.get_hub().threadpool.apply(_sqlite_run, (_sqlite_path(url), statements, keep))
    return _sqlite_run(_sqlite_path(url), statements, keep)


def execute(url, sql, args=()):
    """Run one statement and return its rows as dicts."""
    return run(url, sql, args)[0]


def init(url):
    """Create the tables if missing (and add newer columns); called once per process at start-up.

    In a gevent worker it also opens the Postgres pool now, so the first chat does not wait for it.
    """
    if is_postgres(url) and _gevent_loop_running():
        _pool(url)
    with open(os.path.join(os.path.dirname(__file__), "schema.sql")) as f:
        statements = [s for s in f.read().split(";\n") if s.strip()]  # no ";" ends a comment line
    if is_postgres(url):
        psycopg = _psycopg()
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
                # Machines starting together must not race on CREATE TABLE.
                conn.execute("SELECT pg_advisory_lock(7243901)")
                for statement in statements:
                    conn.execute(statement)
                for name, kind in ADDED_COLUMNS:
                    conn.execute(f"ALTER TABLE generations ADD COLUMN IF NOT EXISTS {name} {kind}")
                conn.execute("SELECT pg_advisory_unlock(7243901)")
        except psycopg.Error as exc:
            raise Unavailable(f"postgres: {str(exc).strip()}") from exc
        return
    path = _sqlite_path(url)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with sqlite3.connect(path) as conn:
        # WAL lets the page read the log while workers write it.
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(statements[0])
        have = {row[1] for row in conn.execute("PRAGMA table_info(generations)")}
        for name, kind in ADDED_COLUMNS:
            if name not in have:
                conn.execute(f"ALTER TABLE generations ADD COLUMN {name} {kind}")
        for statement in statements[1:]:
            conn.execute(statement)
    conn.close()


def start_generation(url, gen_id, provider, model, instance_id, lease_seconds=None, client_addr=None,
                     max_per_client=0):
    """Record a generation as streaming; return the reason of a stop already asked for it, or "".

    Raises IdTaken, or ClientLimit when `client_addr` has `max_per_client` streams open on
    any worker of any instance (0: no limit).
    """
    insert = ("INSERT INTO generations (id, status, provider, model, started_at, worker_pid, instance_id,"
              " lease_seconds, lease_expires, client_addr)"
              " SELECT ?, 'streaming', ?, ?, ?, ?, ?, ?, {now} + ?, ?"
              " WHERE ? = 0 OR (SELECT count(*) FROM generations WHERE status = 'streaming' AND client_addr = ?) < ?"
              " ON CONFLICT (id) DO NOTHING RETURNING id")
    args = (gen_id, provider, model, now(), os.getpid(), instance_id, lease_seconds, lease_seconds, client_addr,
            max_per_client, client_addr, max_per_client)
    if is_postgres(url) and max_per_client:
        # Postgres lets two transactions count at once: one client's chats take turns here.
        rows = run(url, "SELECT pg_advisory_xact_lock(hashtext(?))", (client_addr or "",), then=[(insert, args)])[0]
    else:
        rows = execute(url, insert, args)  # one SQLite statement runs under its write lock
    if not rows:
        if execute(url, "SELECT 1 FROM generations WHERE id = ?", (gen_id,)):
            raise IdTaken(gen_id)
        raise ClientLimit(client_addr)
    # Written before read, as request_stop() does the other way round: one of the two sees the other.
    stops = execute(url, "SELECT reason FROM stops WHERE id = ?", (gen_id,))
    if stops:
        cancel(url, gen_id, stops[0]["reason"])
        return stops[0]["reason"]
    return ""


def cancel(url, gen_id, reason):
    """Mark a streaming generation cancelled for `reason`; return whether this call did it."""
    return run(url, "UPDATE generations SET status = 'cancelled', cancel_reason = ?, ended_at = ?"
                    " WHERE id = ? AND status = 'streaming'", (reason, now(), gen_id))[1] > 0


def finish_generation(url, gen_id, **fields):
    """Write a generation's outcome when its stream ends; return the (status, cancel_reason) the log keeps.

    A stop request may have settled the status first: then its outcome stands and only the
    text and figures are added, so every reader agrees with what any client was told.
    """
    for name in ("usage", "usage_estimate"):
        if fields.get(name) is not None:
            fields[name] = json.dumps(fields[name])
    status, reason, ended_at = fields.pop("status"), fields.pop("cancel_reason"), fields.pop("ended_at")
    columns = "".join(f", {name} = ?" for name in fields)
    rows = execute(url, "UPDATE generations SET"
                        " cancel_reason = CASE WHEN status = 'streaming' THEN ? ELSE cancel_reason END,"
                        " status = CASE WHEN status = 'streaming' THEN ? ELSE status END,"
                        f" ended_at = COALESCE(ended_at, ?){columns} WHERE id = ? RETURNING status, cancel_reason",
                   (reason, status, ended_at, *fields.values(), gen_id))
    return (rows[0]["status"], rows[0]["cancel_reason"]) if rows else (status, reason)


def _record(row):
    record = {name: row.get(name) for name in FIELDS}
    for name in ("usage", "usage_estimate"):
        record[name] = json.loads(record[name]) if record[name] else None
    record["lease_expires_at"] = iso(row["lease_expires"]) if row.get("lease_expires") and row["status"] == "streaming" else None
    return record


def get_generation(url, gen_id):
    """Return one generation as a dict, or None."""
    rows = execute(url, "SELECT * FROM generations WHERE id = ?", (gen_id,))
    return _record(rows[0]) if rows else None


def list_generations(url, limit):
    """Return the newest `limit` generations, newest first."""
    rows = execute(url, "SELECT * FROM generations ORDER BY started_at DESC, id DESC LIMIT ?", (limit,))
    return [_record(row) for row in rows]


def request_stop(url, gen_id, reason="stop_request"):
    """Record a stop durably and settle the generation's status; on Postgres also signal its owner."""
    # One transaction: the stop is kept even for an id not seen yet (its chat may be on the
    # way), and NOTIFY goes out at commit, once the stop is durable.
    insert = "INSERT INTO stops (id, reason, requested_at) VALUES (?, ?, {now}) ON CONFLICT (id) DO NOTHING"
    update = ("UPDATE generations SET status = 'cancelled', cancel_reason = ?, ended_at = ?"
              " WHERE id = ? AND status = 'streaming'")
    if is_postgres(url):
        # One statement, one round trip. The NOTIFY is lost if the owner's listener is down;
        # the owner's own re-check covers that.
        execute(url, f"WITH s AS ({insert}), u AS ({update}) SELECT pg_notify(?, ?)",
                (gen_id, reason, reason, now(), gen_id, NOTIFY_CHANNEL, gen_id))
    else:
        run(url, insert, (gen_id, reason), then=[(update, (reason, now(), gen_id))])


def forget_old_stops(url):
    """Delete stops older than STOP_MEMORY_SECONDS, so stops for ids that never come do not pile up."""
    execute(url, "DELETE FROM stops WHERE requested_at < {now} - ?", (STOP_MEMORY_SECONDS,))


def renew_lease(url, gen_id):
    """Push a streaming generation's lease forward by its own length; return its record or None."""
    execute(url, "UPDATE generations SET lease_expires = {now} + lease_seconds"
                 " WHERE id = ? AND status = 'streaming' AND lease_seconds IS NOT NULL", (gen_id,))
    return get_generation(url, gen_id)


def stops_since(url, since, instance_id, worker_pid):
    """Return (stops recorded after `since`, with leases of this worker that ran out, as (id, reason); the store's time now).

    One query, as the watcher of every worker runs it several times a second.
    """
    rows = run(url, "SELECT id, reason, {now} AS clock FROM stops WHERE requested_at > ?"
                    " UNION ALL SELECT id, 'lease_expired', {now} FROM generations WHERE status = 'streaming'"
                    " AND instance_id = ? AND worker_pid = ? AND lease_expires < {now}"
                    " UNION ALL SELECT NULL, NULL, {now}", (since, instance_id, worker_pid), keep=True)[0]
    return [(r["id"], r["reason"]) for r in rows if r["id"] is not None], rows[-1]["clock"]


def listen(url, on_id):
    """Call on_id(id) for every stop signalled to this store until the connection fails; Postgres only."""
    psycopg = _psycopg()
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        for notify in conn.notifies():
            on_id(notify.payload)


def delete_older_than(url, timestamp):
    """Delete ended generations (text included) and demo meters started before `timestamp`; return how many."""
    cutoff = iso(timestamp)
    count = run(url, "DELETE FROM generations WHERE started_at < ? AND status <> 'streaming'", (cutoff,))[1]
    run(url, "DELETE FROM demo_requests WHERE started_at < ? AND status <> 'generating'", (cutoff,))
    return count


def cancel_streaming(url, reason, instance_id, worker_pid=None):
    """Mark one instance's rows still `streaming` (of one worker, or all) as cancelled; return how many.

    Called in gunicorn's master, outside any event loop; never touches another instance's rows.
    """
    sql = ("UPDATE generations SET status = 'cancelled', cancel_reason = ?, ended_at = ?"
           " WHERE status = 'streaming' AND instance_id = ?")
    args = [reason, now(), instance_id]
    if worker_pid is not None:
        sql += " AND worker_pid = ?"
        args.append(worker_pid)
    return run(url, sql, args, pooled=False)[1]
