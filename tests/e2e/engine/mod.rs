//! End-to-end tests of the engine in-process: the store conformance suite and workflow runs,
//! each on SQLite and PostgreSQL.

mod pg_tls;
mod runs;
mod store;
