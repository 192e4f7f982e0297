"""The shared store: the generation log and the demo meter, in SQLite."""
import json
import os
import sqlite3
import time
from datetime import datetime, timezone

import gevent

FIELDS = ("id", "status", "cancel_reason", "provider", "model", "started_at", "first_token_at",
          "ended_at", "chunks", "text", "error", "upstream_request_id", "finish_reason", "usage")


def iso(timestamp):
    """Return a Unix timestamp as ISO 8601 UTC with milliseconds."""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now():
    """Return the current UTC time as ISO 8601 with milliseconds."""
    return iso(time.time())


def _execute(path, sql, args):
    """Run one statement on its own connection; return (rows, number of rows changed)."""
    with sqlite3.connect(path, timeout=10) as conn:
        # With WAL, NORMAL skips the fsync per commit and still never corrupts the file;
        # a power cut can lose the last few log rows, never a stream.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.row_factory = sqlite3.Row
        cursor = conn.execute(sql, args)
        rows = cursor.fetchall()
    conn.close()
    return rows, cursor.rowcount


def execute(path, sql, args=()):
    """Run one statement in gevent's thread pool, so disk waits never stall the worker's loop."""
    return gevent.get_hub().threadpool.apply(_execute, (path, sql, args))[0]


def init(path):
    """Create the database and its tables if missing; called once at start-up."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with sqlite3.connect(path) as conn:
        # WAL lets the page read the log while workers write it.
        conn.execute("PRAGMA journal_mode=WAL")
        with open(os.path.join(os.path.dirname(__file__), "schema.sql")) as f:
            conn.executescript(f.read())
    conn.close()


def start_generation(path, gen_id, provider, model):
    """Record a generation as streaming, before the upstream is contacted."""
    execute(path, "INSERT INTO generations (id, status, provider, model, started_at, worker_pid)"
                  " VALUES (?, 'streaming', ?, ?, ?, ?)", (gen_id, provider, model, now(), os.getpid()))


def finish_generation(path, gen_id, **fields):
    """Write a generation's outcome, once, when its stream ends however it ends."""
    if fields.get("usage") is not None:
        fields["usage"] = json.dumps(fields["usage"])
    columns = ", ".join(f"{name} = ?" for name in fields)
    execute(path, f"UPDATE generations SET {columns} WHERE id = ?", (*fields.values(), gen_id))


def _record(row):
    record = {name: row[name] for name in FIELDS}
    record["usage"] = json.loads(record["usage"]) if record["usage"] else None
    return record


def get_generation(path, gen_id):
    """Return one generation as a dict, or None."""
    rows = execute(path, "SELECT * FROM generations WHERE id = ?", (gen_id,))
    return _record(rows[0]) if rows else None


def list_generations(path, limit):
    """Return the newest `limit` generations, newest first."""
    rows = execute(path, "SELECT * FROM generations ORDER BY started_at DESC, rowid DESC LIMIT ?", (limit,))
    return [_record(row) for row in rows]


def cancel_streaming(path, reason, worker_pid=None):
    """Mark rows still `streaming` (of one worker, or all) as cancelled; return how many."""
    sql = "UPDATE generations SET status = 'cancelled', cancel_reason = ?, ended_at = ? WHERE status = 'streaming'"
    args = [reason, now()]
    if worker_pid is not None:
        sql += " AND worker_pid = ?"
        args.append(worker_pid)
    return _execute(path, sql, args)[1]  # called in gunicorn's master, outside any event loop
