//! Helpers shared by the integration test binaries: one store per backend, isolated per test.
#![allow(dead_code)]

use std::sync::Arc;

use tern::store::{self, Store};

/// The PostgreSQL URL for tests. In CI (CI=true) a missing URL is an error, never a skip.
pub fn pg_url() -> Option<String> {
    match std::env::var("TERN_TEST_POSTGRES_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
            panic!("TERN_TEST_POSTGRES_URL is not set in CI: PostgreSQL tests must run, not skip (see .ci/run)")
        }
        _ => None,
    }
}

/// A database for one test: its URL (with an isolating schema for PostgreSQL) and whatever
/// must stay alive while it is used.
pub struct TestDb {
    pub url: String,
    pub backend: &'static str,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn open(&self) -> Arc<dyn Store> {
        store::open(&self.url).await.expect("open test store")
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

pub fn sqlite_db() -> TestDb {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("tern.db").display());
    TestDb {
        url,
        backend: "sqlite",
        _dir: Some(dir),
    }
}

/// None when PostgreSQL is not configured (outside CI only).
pub fn postgres_db() -> Option<TestDb> {
    let base = pg_url()?;
    let sep = if base.contains('?') { '&' } else { '?' };
    Some(TestDb {
        url: format!("{base}{sep}tern_schema={}", unique("t")),
        backend: "postgres",
        _dir: None,
    })
}

pub fn db(backend: &str) -> Option<TestDb> {
    match backend {
        "sqlite" => Some(sqlite_db()),
        "postgres" => {
            let db = postgres_db();
            if db.is_none() {
                eprintln!("skipping: TERN_TEST_POSTGRES_URL not set (it is required in CI)");
            }
            db
        }
        other => panic!("unknown backend {other}"),
    }
}

/// Declares `#[tokio::test]`s running the async fn `$case(TestDb)` once per backend.
#[macro_export]
macro_rules! on_both_backends {
    ($($case:ident),* $(,)?) => {
        $(
            mod $case {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    if let Some(db) = $crate::common::db("sqlite") { super::$case(db).await }
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    if let Some(db) = $crate::common::db("postgres") { super::$case(db).await }
                }
            }
        )*
    };
}
