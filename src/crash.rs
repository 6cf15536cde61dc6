//! Crash points for the crash tests: `TERN_CRASH_AT=<point>:<n>` makes the process SIGKILL
//! itself the n-th time it passes `<point>` (default n = 1), and `TERN_CRASH_TRACE=<file>`
//! appends every point passed to `<file>`, one name a line, so a sweep learns the points of a
//! run from the code that passes them. Points are named after the journal record just
//! committed (`after:step_started`, …), a moment inside a step (`after_effect`,
//! `job_finished/<op>`) or a cloud call (`cloud_call/<command>` before it is sent,
//! `cloud_answered/<command>` once its reply is read). Unset, a point costs one atomic load.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

struct Plan {
    point: String,
    nth: u64,
    hits: AtomicU64,
}

struct Mode {
    plan: Option<Plan>,
    trace: Option<Mutex<std::fs::File>>,
}

fn mode() -> Option<&'static Mode> {
    static MODE: OnceLock<Option<Mode>> = OnceLock::new();
    MODE.get_or_init(|| {
        let plan = std::env::var("TERN_CRASH_AT").ok().and_then(|raw| {
            let (point, nth) = match raw.rsplit_once(':') {
                Some((p, n)) if n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() => {
                    (p.to_string(), n.parse().ok()?)
                }
                _ => (raw.clone(), 1),
            };
            Some(Plan {
                point,
                nth,
                hits: AtomicU64::new(0),
            })
        });
        let trace = std::env::var_os("TERN_CRASH_TRACE").and_then(|path| {
            let file = std::fs::OpenOptions::new().create(true).append(true).open(&path);
            match file {
                Ok(f) => Some(Mutex::new(f)),
                Err(e) => {
                    eprintln!("tern: TERN_CRASH_TRACE {}: {e}", path.to_string_lossy());
                    None
                }
            }
        });
        (plan.is_some() || trace.is_some()).then_some(Mode { plan, trace })
    })
    .as_ref()
}

/// Whether crash points are in use (a plan or a trace), for callers that would build a name.
pub fn enabled() -> bool {
    mode().is_some()
}

/// Passes the point `<kind>/<detail>` (e.g. `job_finished/attach_to_oma`): a point of one
/// kind per sub-operation, named without allocating unless crash points are in use.
pub fn point_of(kind: &str, detail: &str) {
    if enabled() {
        point(&format!("{kind}/{detail}"));
    }
}

/// Passes a named point; kills the process with SIGKILL if the crash plan says so.
pub fn point(name: &str) {
    let Some(m) = mode() else { return };
    if let Some(trace) = &m.trace {
        let mut f = trace.lock().unwrap_or_else(|e| e.into_inner());
        // A trace is written before any kill, line by line, so a sweep reads whole names.
        let _ = writeln!(f, "{name}");
    }
    let Some(p) = &m.plan else { return };
    if p.point != name {
        return;
    }
    if p.hits.fetch_add(1, Ordering::SeqCst) + 1 == p.nth {
        eprintln!("tern: crash point {name} reached, SIGKILL");
        // SAFETY: kill(2) on our own pid with a valid signal number has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
