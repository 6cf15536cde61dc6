//! deploy/ checked by the tools of its ecosystem (hadolint, the Compose specification's schema,
//! the Kubernetes schemas, systemd-analyze, a PromQL parser) and against Tern itself
//! (tests/deploy/check.py). In CI (`CI=true`) the tools must be there (`.ci/run` installs them);
//! elsewhere a machine without them skips, saying so.

use std::process::Command;

fn tools_present() -> bool {
    let python = Command::new("python3")
        .args(["-c", "import yaml, promql_parser"])
        .status()
        .is_ok_and(|s| s.success());
    let tools = ["hadolint", "check-jsonschema", "kubernetes-validate", "systemd-analyze"]
        .iter()
        .all(|t| {
            Command::new(t)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    python && tools
}

#[test]
fn deploy_files_pass_their_checkers() {
    if !tools_present() {
        assert!(
            std::env::var("CI").is_err(),
            "CI must have the deploy checkers (.ci/run installs them)"
        );
        eprintln!(
            "skipping: hadolint, check-jsonschema, kubernetes-validate, promql-parser or systemd-analyze missing"
        );
        return;
    }
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/deploy/check.py"))
        .env("TERN_BIN", env!("CARGO_BIN_EXE_tern"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
