-- The shared store, one schema for SQLite and Postgres. Shared by every worker of every instance.
CREATE TABLE IF NOT EXISTS generations (
  id TEXT PRIMARY KEY,
  status TEXT NOT NULL,              -- streaming | complete | cancelled | error
  cancel_reason TEXT,                -- client_disconnect | stop_request | lease_expired | server_shutdown | server_restart
  provider TEXT NOT NULL,
  model TEXT NOT NULL,
  started_at TEXT NOT NULL,          -- ISO 8601 UTC, ms precision
  first_token_at TEXT,
  ended_at TEXT,
  chunks INTEGER NOT NULL DEFAULT 0,
  text TEXT NOT NULL DEFAULT '',
  error TEXT,
  upstream_request_id TEXT,
  finish_reason TEXT,
  usage TEXT,                        -- JSON, as the provider reported it
  worker_pid INTEGER NOT NULL,       -- the worker holding the stream ...
  instance_id TEXT NOT NULL DEFAULT '', -- ... on this instance (INSTANCE_ID)
  lease_seconds DOUBLE PRECISION,    -- the client's lease, if it asked for one
  lease_expires DOUBLE PRECISION,    -- epoch seconds on the store's clock
  client_addr TEXT,                  -- for MAX_STREAMS_PER_CLIENT, never shown by the API
  usage_estimate TEXT                -- JSON: what is known when the provider reported no usage
);
CREATE INDEX IF NOT EXISTS generations_newest ON generations (started_at DESC);
CREATE INDEX IF NOT EXISTS generations_streaming ON generations (status) WHERE status = 'streaming';

-- Stops, kept STOP_MEMORY_SECONDS (db.py) so a stop that beats its own chat still counts.
CREATE TABLE IF NOT EXISTS stops (
  id TEXT PRIMARY KEY,
  reason TEXT NOT NULL,
  requested_at DOUBLE PRECISION NOT NULL  -- epoch seconds on the store's clock
);
CREATE INDEX IF NOT EXISTS stops_recent ON stops (requested_at);

CREATE TABLE IF NOT EXISTS demo_requests (
  id TEXT PRIMARY KEY,
  status TEXT NOT NULL,              -- generating | complete | disconnected | failed
  started_at TEXT NOT NULL,
  ended_at TEXT,
  tokens_generated INTEGER NOT NULL DEFAULT 0,
  client_disconnected_at TEXT,
  tokens_after_disconnect INTEGER
);
