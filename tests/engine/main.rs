//! End-to-end tests of the engine in-process: the store conformance suite and workflow runs,
//! each on SQLite and PostgreSQL.

#[path = "../common/mod.rs"]
mod common;

mod runs;
mod store;
