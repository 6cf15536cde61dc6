-- Tern engine schema (SQLite). Times are milliseconds since the Unix epoch (UTC) except in
-- the seeds' projection tables, which carry RFC 3339 text for people reading them in SQL.

-- Definitions are content-addressed: a run is pinned to the exact text it started with.
CREATE TABLE definitions (
    hash        TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    source      TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE runs (
    id               TEXT PRIMARY KEY,           -- UUIDv7
    definition       TEXT NOT NULL,
    definition_hash  TEXT NOT NULL REFERENCES definitions(hash),
    request_id       TEXT UNIQUE,                -- idempotent submission
    correlation_id   TEXT NOT NULL,
    status           TEXT NOT NULL,              -- coarse engine status
    display_status   TEXT NOT NULL,              -- the seeds' vocabulary
    current_step     TEXT,
    state            TEXT NOT NULL,              -- RunState JSON (the position)
    input            TEXT NOT NULL,
    context          TEXT NOT NULL,
    last_seq         INTEGER NOT NULL,           -- last journal sequence number
    fencing_token    INTEGER NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    wake_at          INTEGER,                    -- NULL: only a signal wakes it, or terminal
    signals_pending  INTEGER NOT NULL DEFAULT 0,
    cancel_reason    TEXT,
    cancel_pending   INTEGER NOT NULL DEFAULT 0,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    started_at       INTEGER,
    completed_at     INTEGER
);
CREATE INDEX runs_wake ON runs (wake_at) WHERE wake_at IS NOT NULL;
CREATE INDEX runs_status ON runs (status, id);
CREATE INDEX runs_definition ON runs (definition, id);

-- The append-only journal: every transition, also the audit trail.
CREATE TABLE journal (
    run_id  TEXT NOT NULL REFERENCES runs(id),
    seq     INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    record  TEXT NOT NULL,
    at      INTEGER NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;

CREATE TABLE signals (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id       TEXT NOT NULL REFERENCES runs(id),
    name         TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    consumed_at  INTEGER,
    UNIQUE (run_id, name)
);

-- Projection of the seeds' failover_jobs table.
CREATE TABLE failover_jobs (
    job_id                 TEXT PRIMARY KEY,
    vm_id                  TEXT NOT NULL,
    vm_name                TEXT,
    job_type               TEXT NOT NULL,
    status                 TEXT NOT NULL DEFAULT 'pending',
    linstor_snapshot_name  TEXT,
    destination_vm_id      TEXT,
    source_vm_spec         TEXT,
    network_mappings       TEXT,
    error_message          TEXT,
    correlation_id         TEXT,
    created_at             TEXT NOT NULL,
    updated_at             TEXT NOT NULL,
    started_at             TEXT,
    completed_at           TEXT
);
CREATE INDEX failover_jobs_vm ON failover_jobs (vm_id);
CREATE INDEX failover_jobs_status ON failover_jobs (status);

-- Projection of the seeds' job_tracking table: one row per step (and per rollback of a step).
CREATE TABLE job_tracking (
    id             TEXT PRIMARY KEY,
    parent_job_id  TEXT NOT NULL,
    operation      TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('pending','executing','completed','failed','cancelled')),
    metadata       TEXT,
    error_message  TEXT,
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL,
    UNIQUE (parent_job_id, operation)
);

-- Side effects of the built-in test actions (crash tests count them).
CREATE TABLE ledger (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    key      TEXT NOT NULL,
    run_id   TEXT NOT NULL,
    step     TEXT NOT NULL,
    attempt  INTEGER NOT NULL,
    kind     TEXT NOT NULL,
    at       INTEGER NOT NULL
);
CREATE INDEX ledger_key ON ledger (key);
CREATE INDEX ledger_run ON ledger (run_id);
