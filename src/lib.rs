//! Tern: a durable workflow engine for VM failovers onto Apache CloudStack.
//!
//! Layers (each imports only those below it; `crash` and `telemetry` are leaves anyone may call;
//! `tests/e2e/layers.rs` checks it):
//!
//! ```text
//!   api          gRPC services, generated code, proto <-> domain, Status mapping
//!    |
//!   steps ---------------.     the actions: built-ins and the failover steps
//!    |                   |
//!   engine               |     pure state machine, driver (commit, then act), workers,
//!    |      \              |     and the step contract (engine::action)
//!   store   workflow   providers   store: journal, leases, read models (the only SQL);
//!    |        |          |         workflow: the definitions; providers: Cloud,
//!   domain ---'----------'         SnapshotBackend, DriverInjector + their real clients
//! ```
//!
//! `domain` holds the pure types: ids, time, errors, the run's vocabulary, FailoverInput.
//!
//! [`sim`] is tooling beside the layers: the CloudStack/LINSTOR simulator `tern dev` and the
//! tests run in-process (it uses `providers`' wire types). The binary (`main.rs`, `cmd/`) holds
//! the commands, the admin tools and `tern bench`.
//!
//! Glossary: a *run* is one execution of a *definition*; a *step* is one entry of it; an
//! *attempt* is one try of a step; a *lease* is a worker's time-limited claim on a run, and its
//! *fencing token* grows with every claim so a stale worker's writes are refused; a
//! *compensation* undoes a completed step; the *hold* waits for a signal or timer; the
//! *teardown* steps follow the hold.

pub mod api;
pub mod crash;
pub mod domain;
pub mod engine;
pub mod providers;
pub mod sim;
pub mod steps;
pub mod store;
pub mod telemetry;
pub mod workflow;
