//! `tern dev` on a machine that never ran Tern: its data directory is created, two run side by
//! side, and a simulator that cannot start stops it with the reason.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A `tern dev` with its own home and database, and what its banner said.
struct Dev {
    child: Child,
    endpoint: String,
    first_vm: String,
}

fn dev_command(home: &std::path::Path, database: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern"));
    cmd.args([
        "dev",
        "--database",
        database,
        "--listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ])
    .env("HOME", home)
    .env_remove("TERN_DATA_DIR")
    .env_remove("TERN_DATABASE_URL")
    .env("RUST_LOG", "warn")
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    cmd
}

/// Starts `tern dev` and reads its banner up to the API's address.
async fn start(home: &std::path::Path, database: &str) -> Dev {
    let mut child = dev_command(home, database).spawn().expect("spawn tern dev");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut first_vm = String::new();
    let mut in_vms = false;
    let read = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if in_vms && first_vm.is_empty() {
                first_vm = line.split_whitespace().next().unwrap_or_default().to_string();
            }
            in_vms = line.starts_with("sample VMs:");
            if let Some(rest) = line.strip_prefix("tern dev: gRPC API on ") {
                let addr = rest.split_whitespace().next().unwrap().to_string();
                return (addr, lines);
            }
        }
        panic!("tern dev ended before serving");
    };
    let (addr, mut lines) = tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("tern dev serves within a minute");
    // Keep draining its stderr so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Dev {
        child,
        endpoint: format!("http://{addr}"),
        first_vm,
    }
}

async fn readiness(d: &Dev) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["--endpoint", &d.endpoint, "readiness", &d.first_vm])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_on_a_new_machine_creates_its_directory_and_runs_beside_another() {
    let home = tempfile::tempdir().unwrap();
    let root = home.path();
    let a_db = format!("sqlite://{}/never/made/a/tern.db", root.display());
    let b_db = format!("sqlite://{}/never/made/b/tern.db", root.display());
    let mut a = start(root, &a_db).await;
    let mut b = start(root, &b_db).await;
    assert!(!a.first_vm.is_empty(), "the banner names the sample VMs");
    for d in [&a, &b] {
        let (code, out) = readiness(d).await;
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains("ready"), "{out}");
    }
    assert!(root.join("never/made/a/sim-state.json").is_file());
    assert!(root.join("never/made/b/sim-state.json").is_file());
    a.child.kill().await.unwrap();
    b.child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulator_that_cannot_start_stops_dev_with_the_reason() {
    let home = tempfile::tempdir().unwrap();
    let dir = home.path().join("broken");
    // The simulator's state file is a directory: the simulator cannot load it.
    std::fs::create_dir_all(dir.join("sim-state.json")).unwrap();
    let db = format!("sqlite://{}/tern.db", dir.display());
    let out = tokio::time::timeout(Duration::from_secs(60), dev_command(home.path(), &db).output())
        .await
        .expect("tern dev stops by itself")
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("the simulator stopped"), "{err}");
    assert!(err.contains("sim-state.json"), "{err}");
}
