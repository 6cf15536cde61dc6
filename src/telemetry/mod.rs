//! Logs, traces and metrics. Logs: a `tracing` subscriber on stderr, human-readable by default,
//! JSON with `TERN_LOG_FORMAT=json`, filtered by `RUST_LOG` (default `info`); the last lines are
//! also kept in memory, as JSON ([`ring`]). Traces: the same spans exported over OTLP when the `OTEL_*`
//! environment asks ([`traces`]); `RUST_LOG` does not filter them (Tern's spans at `info` and
//! above are exported, with their `warn` and `error` events). Metrics: [`metrics`].

pub mod metrics;
pub mod ring;
pub mod traces;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

/// Flushes and stops the trace exporter when dropped (at the end of `main`).
#[must_use = "traces are flushed when the guard is dropped"]
pub struct Guard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("tern: flushing traces: {e}");
            }
        }
    }
}

/// Installs the process's subscriber. Must be called inside the Tokio runtime. A trace
/// configuration that cannot be used is said on stderr, and the process runs without traces.
pub fn init() -> Guard {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let json = std::env::var("TERN_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let logs = if json { logs.json().boxed() } else { logs.boxed() };
    let provider = traces::provider().unwrap_or_else(|e| {
        eprintln!("tern: traces are off: {e}");
        None
    });
    let spans = provider.as_ref().map(traces::layer);
    let recent = fmt::layer()
        .json()
        .with_writer(ring::Ring::global())
        .with_filter(filter());
    let _ = tracing_subscriber::registry()
        .with(logs.with_filter(filter()))
        .with(recent)
        .with(spans)
        .try_init();
    Guard { provider }
}
