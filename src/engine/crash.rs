//! Crash points for the crash tests: `TERN_CRASH_AT=<point>:<n>` makes the process SIGKILL
//! itself the n-th time it passes `<point>` (default n = 1). Points are named after the journal
//! record just committed (`after:step_started`, `after:timer_fired`, …) or a moment inside a
//! step (`after_effect`, `after_job_progress`). Unset, a point costs one atomic load.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

struct Plan {
    point: String,
    nth: u64,
    hits: AtomicU64,
}

fn plan() -> Option<&'static Plan> {
    static PLAN: OnceLock<Option<Plan>> = OnceLock::new();
    PLAN.get_or_init(|| {
        let raw = std::env::var("TERN_CRASH_AT").ok()?;
        let (point, nth) = match raw.rsplit_once(':') {
            Some((p, n)) if n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() => (p.to_string(), n.parse().ok()?),
            _ => (raw.clone(), 1),
        };
        Some(Plan {
            point,
            nth,
            hits: AtomicU64::new(0),
        })
    })
    .as_ref()
}

/// Passes the point `<kind>/<detail>` (e.g. `job_finished/attach_to_oma`): a point of one
/// kind per sub-operation, named without allocating unless a crash plan is set.
pub fn point_of(kind: &str, detail: &str) {
    if plan().is_some() {
        point(&format!("{kind}/{detail}"));
    }
}

/// Passes a named point; kills the process with SIGKILL if the crash plan says so.
pub fn point(name: &str) {
    let Some(p) = plan() else { return };
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
