-- The VM inventory (replicated source VMs) and their network mappings.
CREATE TABLE vms (
    vm_id       TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    record      TEXT NOT NULL,      -- VmRecord JSON
    updated_at  INTEGER NOT NULL
);
CREATE INDEX vms_name ON vms (name);

CREATE TABLE network_mappings (
    vm_id                   TEXT NOT NULL,
    source_network          TEXT NOT NULL,
    kind                    TEXT NOT NULL CHECK (kind IN ('test', 'production')),
    destination_network_id  TEXT NOT NULL,
    PRIMARY KEY (vm_id, source_network, kind)
);
CREATE INDEX failover_jobs_active ON failover_jobs (vm_id) WHERE completed_at IS NULL;
