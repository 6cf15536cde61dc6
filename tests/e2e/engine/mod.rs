//! End-to-end tests of the engine in-process: the store conformance suite and workflow runs,
//! each on SQLite and PostgreSQL.

mod runs;
mod store;
