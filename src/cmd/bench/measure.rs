//! What the bench measures besides time: CPU of the machine and of processes, RSS, percentiles,
//! the steady-state rate, PostgreSQL's work per workflow.

use super::*;

/// CPU time the machine has spent busy so far (every process and the kernel, not idle, not
/// waiting for I/O, not stolen by a hypervisor), from /proc/stat.
pub(super) fn machine_busy() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| ticks.get(i)).sum();
    clock_ticks(busy)
}

/// `ticks` of /proc's clock as a duration (None if the system does not say its rate).
pub(super) fn clock_ticks(ticks: u64) -> Option<Duration> {
    // SAFETY: sysconf only reads a constant of the system.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// CPU time (user and system; with `reaped`, that of reaped children too) of the processes `pick`
/// selects by pid and command name, from /proc/<pid>/stat. PostgreSQL's exited backends are
/// counted in the postmaster's children time, so a phase's difference is whole.
pub(super) fn processes_cpu(reaped: bool, pick: impl Fn(u32, &str) -> bool) -> Duration {
    let mut ticks = 0u64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ... utime(14) stime(15) cutime(16) cstime(17)
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if !pick(pid, &stat[open + 1..close]) {
            continue;
        }
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let own: &[usize] = if reaped { &[11, 12, 13, 14] } else { &[11, 12] };
        ticks += own
            .iter()
            .filter_map(|&i| fields.get(i).and_then(|t| t.parse::<u64>().ok()))
            .sum::<u64>();
    }
    clock_ticks(ticks).unwrap_or_default()
}

/// CPU spent so far by the given server processes, by PostgreSQL, and by this process (not
/// counting a server it reaped after a SIGKILL).
pub(super) fn cpu_split(servers: &[u32]) -> [Duration; 3] {
    let me = std::process::id();
    [
        processes_cpu(false, |pid, _| servers.contains(&pid)),
        processes_cpu(true, |_, comm| comm == "postgres"),
        processes_cpu(false, |pid, _| pid == me),
    ]
}

/// Peak resident set size of this process (VmHWM), in MB.
pub(super) fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

pub(super) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Resident set size of this process now (VmRSS), in MB.
pub(super) fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|kb| kb.parse::<f64>().ok()))
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Throughput once a phase is under way: the workflows that finished after the first fifth
/// had, over the time they took. It leaves out the phase's start (servers opening their
/// connections and preparing statements, counting their peers), the same for any number of
/// servers but a larger share of a short phase. `finished`: when each workflow finished, from
/// the phase's start (sorted here). None with too few workflows to tell.
pub(super) fn steady_rate(finished: &mut [Duration]) -> Option<f64> {
    finished.sort();
    let first = finished.len() / 5;
    let span = finished.last()?.checked_sub(*finished.get(first)?)?.as_secs_f64();
    let counted = finished.len() - 1 - first;
    (counted >= 10 && span > 0.0).then(|| counted as f64 / span)
}

/// With more than one round: each round's throughput of `k` servers against one server just
/// before it, and their median (what the scale-out target compares, steadier than any one
/// round on a shared machine), for the steady state and for the whole phases. `rates`: each
/// phase's (whole phase, steady state) throughput.
pub(super) fn rounds_line(rates: &[(f64, f64)], k: usize) -> Option<String> {
    let whole: Vec<f64> = rates.chunks_exact(2).map(|p| p[1].0 / p[0].0 - 1.0).collect();
    let steady: Vec<f64> = rates.chunks_exact(2).map(|p| p[1].1 / p[0].1 - 1.0).collect();
    if steady.len() < 2 || k == 1 {
        return None;
    }
    Some(format!(
        "{:<22} {:<8} {k} servers against 1 over {} rounds: steady state {}; whole phases {}",
        "scale-out rounds",
        "postgres",
        steady.len(),
        median_and_each(&steady),
        median_and_each(&whole),
    ))
}

/// `median +x% (+a%, +b%, ...)` of at least one ratio.
pub(super) fn median_and_each(pairs: &[f64]) -> String {
    let mut sorted = pairs.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    let median = if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    };
    let each: Vec<String> = pairs.iter().map(|r| format!("{:+.0}%", r * 100.0)).collect();
    format!("median {:+.1}% ({})", median * 100.0, each.join(", "))
}

/// What a phase cost PostgreSQL so far, whatever else shares the machine: from
/// `pg_stat_database`, the database's committed transactions and buffer reads (hits and
/// misses); from `pg_stat_wal`, the server's WAL flushes (fsyncs) and WAL bytes.
#[derive(Clone, Copy, sqlx::FromRow)]
pub(super) struct PgWork {
    pub(super) commits: i64,
    pub(super) buffers: i64,
    pub(super) wal_syncs: i64,
    pub(super) wal_bytes: i64,
}

pub(super) async fn pg_work(url: &str) -> Option<PgWork> {
    let pool = sqlx::PgPool::connect(url).await.ok()?;
    let row: Option<PgWork> = sqlx::query_as(
        "SELECT d.xact_commit AS commits, d.blks_hit + d.blks_read AS buffers, w.wal_sync AS wal_syncs, \
         w.wal_bytes::bigint AS wal_bytes FROM pg_stat_database d, pg_stat_wal w WHERE d.datname = current_database()",
    )
    .fetch_optional(&pool)
    .await
    .ok()
    .flatten();
    pool.close().await;
    row
}

/// The machine's CPU time per workflow over a phase, and how much of its cores stayed idle (a
/// phase that leaves cores idle is held back by waiting, not by CPU).
pub(super) fn cpu_figures(busy: Option<Duration>, workflows: usize, elapsed_secs: f64) -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    match busy {
        Some(busy) if workflows > 0 && elapsed_secs > 0.0 => format!(
            "CPU {:.2} ms/wf, idle {:.0}%",
            busy.as_secs_f64() * 1e3 / workflows as f64,
            (100.0 * (1.0 - busy.as_secs_f64() / (elapsed_secs * cores))).max(0.0)
        ),
        _ => "CPU n/a".to_string(),
    }
}
