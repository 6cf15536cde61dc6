-- Tern engine schema (PostgreSQL). Times are milliseconds since the Unix epoch (UTC) except in
-- the seeds' projection tables, which use TIMESTAMPTZ for people reading them in SQL.

-- Definitions are content-addressed: a run is pinned to the exact text it started with.
CREATE TABLE definitions (
    hash        TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    source      TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE runs (
    id               UUID PRIMARY KEY,           -- UUIDv7
    definition       TEXT NOT NULL,
    definition_hash  TEXT NOT NULL REFERENCES definitions(hash),
    request_id       TEXT UNIQUE,                -- idempotent submission
    correlation_id   TEXT NOT NULL,
    status           TEXT NOT NULL,              -- coarse engine status
    display_status   TEXT NOT NULL,              -- the seeds' vocabulary
    current_step     TEXT,
    state            JSONB NOT NULL,             -- RunState JSON (the position)
    input            JSONB NOT NULL,
    context          JSONB NOT NULL,
    last_seq         BIGINT NOT NULL,           -- last journal sequence number
    fencing_token    BIGINT NOT NULL DEFAULT 0,
    lease_owner      TEXT,
    lease_expires_at BIGINT,
    wake_at          BIGINT,                    -- NULL: only a signal wakes it, or terminal
    signals_pending  BIGINT NOT NULL DEFAULT 0,
    cancel_reason    TEXT,
    cancel_pending   BOOLEAN NOT NULL DEFAULT FALSE,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    started_at       BIGINT,
    completed_at     BIGINT
);
CREATE INDEX runs_wake ON runs (wake_at) WHERE wake_at IS NOT NULL;
CREATE INDEX runs_status ON runs (status, id);
CREATE INDEX runs_definition ON runs (definition, id);

-- The append-only journal: every transition, also the audit trail.
CREATE TABLE journal (
    run_id  UUID NOT NULL REFERENCES runs(id),
    seq     BIGINT NOT NULL,
    kind    TEXT NOT NULL,
    record  JSONB NOT NULL,
    at      BIGINT NOT NULL,
    PRIMARY KEY (run_id, seq)
);

CREATE TABLE signals (
    id           BIGSERIAL PRIMARY KEY,
    run_id       UUID NOT NULL REFERENCES runs(id),
    name         TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    consumed_at  BIGINT,
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
    created_at             TIMESTAMPTZ NOT NULL,
    updated_at             TIMESTAMPTZ NOT NULL,
    started_at             TIMESTAMPTZ,
    completed_at           TIMESTAMPTZ
);
CREATE INDEX failover_jobs_vm ON failover_jobs (vm_id);
CREATE INDEX failover_jobs_status ON failover_jobs (status);

-- Projection of the seeds' job_tracking table: one row per step (and per rollback of a step).
CREATE TABLE job_tracking (
    id             TEXT PRIMARY KEY,
    parent_job_id  TEXT NOT NULL,
    operation      TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('pending','executing','completed','failed','cancelled')),
    metadata       JSONB,
    error_message  TEXT,
    created_at     TIMESTAMPTZ NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL,
    UNIQUE (parent_job_id, operation)
);

-- Side effects of the built-in test actions (crash tests count them).
CREATE TABLE ledger (
    id       BIGSERIAL PRIMARY KEY,
    key      TEXT NOT NULL,
    run_id   UUID NOT NULL,
    step     TEXT NOT NULL,
    attempt  BIGINT NOT NULL,
    kind     TEXT NOT NULL,
    at       BIGINT NOT NULL
);
CREATE INDEX ledger_key ON ledger (key);
CREATE INDEX ledger_run ON ledger (run_id);
