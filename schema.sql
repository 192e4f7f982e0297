-- The generation log and the demo model's meter. Shared by every gunicorn worker.
CREATE TABLE IF NOT EXISTS generations (
  id TEXT PRIMARY KEY,
  status TEXT NOT NULL,              -- streaming | complete | cancelled | error
  cancel_reason TEXT,                -- client_disconnect | server_shutdown | server_restart
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
  worker_pid INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS generations_newest ON generations (started_at DESC);
CREATE INDEX IF NOT EXISTS generations_streaming ON generations (status) WHERE status = 'streaming';

CREATE TABLE IF NOT EXISTS demo_requests (
  id TEXT PRIMARY KEY,
  status TEXT NOT NULL,              -- generating | complete | disconnected | failed
  started_at TEXT NOT NULL,
  ended_at TEXT,
  tokens_generated INTEGER NOT NULL DEFAULT 0,
  client_disconnected_at TEXT,
  tokens_after_disconnect INTEGER
);
