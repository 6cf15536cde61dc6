//! `GET /metrics`: the Prometheus text format, on a listener of its own (`--metrics-listen`), so
//! it can stay on a private network while the gRPC API is exposed, and needs no token. The
//! store's figures are read at each scrape (a few indexed counts); a store that does not answer
//! within five seconds leaves them as they were and sets `tern_store_up` to 0.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use metrics::gauge;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::domain::Timestamp;
use crate::store::{Diagnostics, Gauges};
use crate::telemetry::metrics::{NEEDS_OPERATOR, RUNS, RUNS_DUE, RUNS_DUE_OLDEST, STORE_UP};

/// How long a scrape waits for the store.
const STORE_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct Scrape {
    handle: PrometheusHandle,
    store: Arc<dyn Diagnostics>,
    /// The (definition, status) pairs shown so far: one absent now is shown as 0, not dropped.
    seen: Arc<Mutex<HashSet<(String, String)>>>,
}

/// Serves `/metrics` on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    store: Arc<dyn Diagnostics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let scrape = Scrape {
        handle,
        store,
        seen: Arc::default(),
    };
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .with_state(scrape);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

async fn metrics(State(s): State<Scrape>) -> impl IntoResponse {
    match tokio::time::timeout(STORE_WAIT, s.store.gauges(Timestamp::now())).await {
        Ok(Ok(g)) => {
            let mut seen = s.seen.lock().unwrap_or_else(|e| e.into_inner());
            set_store_gauges(&g, &mut seen, Timestamp::now());
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "metrics: the store did not answer");
            gauge!(STORE_UP).set(0.0);
        }
        Err(_) => {
            tracing::warn!(timeout = ?STORE_WAIT, "metrics: the store did not answer in time");
            gauge!(STORE_UP).set(0.0);
        }
    }
    s.handle.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        s.handle.render(),
    )
}

fn set_store_gauges(g: &Gauges, seen: &mut HashSet<(String, String)>, now: Timestamp) {
    gauge!(STORE_UP).set(1.0);
    let current: HashSet<(String, String)> = g
        .runs
        .iter()
        .map(|(d, s, _)| (d.clone(), s.as_str().to_string()))
        .collect();
    for (definition, status) in seen.difference(&current) {
        gauge!(RUNS, "definition" => definition.clone(), "status" => status.clone()).set(0.0);
    }
    for (definition, status, n) in &g.runs {
        gauge!(RUNS, "definition" => definition.clone(), "status" => status.as_str()).set(*n as f64);
    }
    seen.extend(current);
    gauge!(RUNS_DUE).set(g.due as f64);
    let oldest = g.oldest_due.map_or(Duration::ZERO, |at| at.until(now));
    gauge!(RUNS_DUE_OLDEST).set(oldest.as_secs_f64());
    gauge!(NEEDS_OPERATOR).set(g.needs_operator as f64);
}
