-- Who may call the API: bearer tokens (kept as SHA-256 hashes, never in clear) and client
-- certificate identities (the certificate's subject common name), each with a role. A revoked
-- principal keeps its row (revoked_at) until one of the same name is created again.
CREATE TABLE principals (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    kind TEXT NOT NULL,
    token_sha256 TEXT UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
-- Who asked for a signal or a cancel; the journal record of it names them.
ALTER TABLE signals ADD COLUMN principal TEXT;
ALTER TABLE runs ADD COLUMN cancel_principal TEXT;
