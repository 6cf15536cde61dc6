//! `tern bench` runs end to end on small numbers: every scenario prints its line, and the
//! checkpoints it counts in the database are exactly the workload's (14 journal rows per
//! workflow). Figures are printed, never asserted on: the machines here are shared and noisy.

use crate::common;

use std::process::Command;

fn bench(backend: &str, pg: Option<&str>) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern"));
    cmd.args([
        "bench",
        "--backend",
        backend,
        "--runs",
        "20",
        "--in-flight",
        "5",
        "--latency-runs",
        "3",
    ])
    .args(["--recovery-runs", "5", "--recovery-lease-ttl", "1s"])
    .args(["--scale-out-runs", "30", "--servers", "3"])
    .env("RUST_LOG", "error");
    if let Some(url) = pg {
        cmd.args(["--postgres-url", url]);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "bench failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn check(out: &str, backend: &str) {
    for (scenario, workflows) in [
        ("throughput in-process", 20),
        ("latency in-process", 3),
        ("throughput gRPC", 20),
        ("latency gRPC", 3),
    ] {
        let line = out
            .lines()
            .find(|l| l.starts_with(scenario) && l.contains(backend))
            .unwrap_or_else(|| panic!("no {scenario} line for {backend} in:\n{out}"));
        assert!(
            line.contains(&format!("checkpoints {:>7}", workflows * 14)),
            "every step's started and succeeded stored: {line}"
        );
        assert!(line.contains("wf/s") && line.contains("p99"), "{line}");
    }
    let recovery = out
        .lines()
        .find(|l| l.starts_with("recovery") && l.contains(backend))
        .unwrap_or_else(|| panic!("no recovery line in:\n{out}"));
    assert!(recovery.contains("SIGKILLed: 5 moving again"), "{recovery}");
    let scale_out: Vec<&str> = out.lines().filter(|l| l.starts_with("scale-out")).collect();
    if backend != "postgres" {
        assert!(scale_out.is_empty(), "scale-out is PostgreSQL's: {out}");
        return;
    }
    assert_eq!(scale_out.len(), 3, "1 server, 3 servers, 3 with a SIGKILL:\n{out}");
    for line in &scale_out {
        // Every run completed, none doubled by a retried submit, no step run again after success, no
        // journal row without its run; the CPU is split between the servers, PostgreSQL and the bench.
        assert!(line.contains("30/30 runs completed"), "{line}");
        assert!(line.contains(" 0 run again after success"), "{line}");
        assert!(line.contains(" 0 journal rows without a run"), "{line}");
        assert!(line.contains("(servers ") && line.contains(", PostgreSQL "), "{line}");
        // Throughput once under way, beside the whole phase's.
        assert!(line.contains(" wf/s (steady "), "{line}");
        assert!(!line.contains("NOT met"), "{line}");
        assert!(line.contains(" max "), "{line}");
    }
    // Without a kill, no request fails and is asked again elsewhere.
    for line in &scale_out[..2] {
        assert!(line.contains("; 0 requests retried elsewhere"), "{line}");
    }
    assert!(scale_out[2].contains("one SIGKILLed"), "{}", scale_out[2]);
}

#[test]
fn bench_runs_every_scenario_on_sqlite() {
    check(&bench("sqlite", None), "sqlite");
}

#[test]
fn bench_runs_every_scenario_on_postgres() {
    // Outside CI without PostgreSQL this is skipped; in CI pg_url() panics instead.
    let Some(url) = common::pg_url() else {
        eprintln!("skipped: TERN_TEST_POSTGRES_URL is not set");
        return;
    };
    check(&bench("postgres", Some(&url)), "postgres");
}
