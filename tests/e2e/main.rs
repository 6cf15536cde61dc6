//! The end-to-end tests, one binary: the engine in-process on both backends (store
//! conformance, runs), the gRPC API against a real server, the failover workflows against the
//! simulator over HTTP, the provider clients and their conformance suites, the VirtIO injectors,
//! and `tern bench` itself. The SIGKILL chaos suites are their own targets (`crash`, `campaign`).

#[path = "../common/mod.rs"]
mod common;

mod api;
mod bench;
mod config;
mod deploy;
mod dev;
mod engine;
mod failover;
mod layers;
mod providers;
mod virtio;
