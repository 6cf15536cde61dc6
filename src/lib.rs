//! Tern: a durable workflow engine for VM failovers onto Apache CloudStack.
//!
//! Architecture (dependencies point one way):
//! - [`domain`] — pure types (ids, timestamps, step errors, inventory, validation checks).
//! - [`workflow`] — the TOML definitions in `workflows/`, loaded and validated; runs pin them by hash.
//! - [`engine`] — the pure state machine, the driver (commit, then act), the worker loop.
//! - [`steps`] — the actions steps run (registry, built-ins; failover actions come with providers).
//! - [`providers`] — the `Cloud` and `SnapshotBackend` traits, the CloudStack and LINSTOR clients.
//! - [`sim`] — the CloudStack/LINSTOR simulator, a real HTTP server speaking the same protocols.
//! - [`api`] — the gRPC services (tonic), generated code, proto <-> domain conversions.
//! - [`store`] — the `Store` trait and its SQLite and PostgreSQL backends; the only place with SQL.
//! - [`telemetry`] — logging (tracing spans per run and step).
//! - [`crash`] — named crash points for the crash tests (any layer may pass one).
//!
//! Glossary: a *run* is one execution of a *definition*; a *step* is one entry of it; an
//! *attempt* is one try of a step; a *lease* is a worker's time-limited claim on a run, and its
//! *fencing token* grows with every claim so a stale worker's writes are refused; a
//! *compensation* undoes a completed step; the *hold* waits for a signal or timer; the
//! *teardown* steps follow the hold.

pub mod api;
pub mod bench;
pub mod cli;
pub mod crash;
pub mod domain;
pub mod engine;
pub mod providers;
pub mod sim;
pub mod steps;
pub mod store;
pub mod telemetry;
pub mod workflow;
