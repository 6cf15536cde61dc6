//! The VirtIO driver injectors: `CommandInjector` driving small shell scripts as fake tools
//! (real processes), `SimInjector` against the simulator over real HTTP on port 0, and one
//! conformance suite written against the `DriverInjector` trait run against both.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tern::providers::virtio::{serial_for, CommandInjector, CommandInjectorConfig, DriverInjector, SimInjector};
use tern::providers::ProviderError;
use tern::sim::{self, SimConfig};

const VOLUME: &str = "6b1f0f5e-2c4d-4e8a-9b7c-0123456789ab";
const SERIAL: &str = "6b1f0f5e2c4d4e8a9b7c";

/// Writes a shell script. It is run as `sh <script>` rather than executed directly: executing
/// a file just written is racy in a multi-threaded test binary (ETXTBSY when another thread
/// forks while the file is open for writing).
fn script(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("set -u\n{body}\n")).unwrap();
    path.to_str().unwrap().to_string()
}

fn cmd(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// A temp dir standing in for /dev/disk/by-id, holding `virtio-<SERIAL>`.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let f = Fixture {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir(f.by_id()).unwrap();
        std::fs::write(f.device(), b"").unwrap();
        f
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn by_id(&self) -> PathBuf {
        self.path().join("by-id")
    }
    fn device(&self) -> String {
        self.by_id()
            .join(format!("virtio-{SERIAL}"))
            .to_str()
            .unwrap()
            .to_string()
    }
    fn config(&self, inject_command: Vec<String>) -> CommandInjectorConfig {
        CommandInjectorConfig {
            inject_command,
            device_pattern: format!("{}/*{{serial}}", self.by_id().display()),
            timeout: Duration::from_secs(10),
            check_timeout: Duration::from_secs(10),
            ..Default::default()
        }
    }
}

/// The trait's contract, whatever the implementation: the device is stable, the check is
/// false before and true after an injection, a second injection succeeds and changes
/// nothing, unknown volumes are `NotFound`, unusable ids are refused.
async fn conformance(inj: &dyn DriverInjector, volume_id: &str, unknown_volume_id: &str) {
    let device = inj.device_for(volume_id).await.unwrap();
    assert!(device.contains(&serial_for(volume_id).unwrap()), "{device}");
    assert_eq!(inj.device_for(volume_id).await.unwrap(), device);

    assert!(!inj.is_injected(volume_id, &device).await.unwrap());
    let report = inj.inject(volume_id, &device).await.unwrap();
    assert!(!report.output.is_empty());
    assert!(inj.is_injected(volume_id, &device).await.unwrap());

    // A re-run (e.g. after a crash between inject and the checkpoint) is harmless.
    inj.inject(volume_id, &device).await.unwrap();
    assert!(inj.is_injected(volume_id, &device).await.unwrap());

    let e = inj.device_for(unknown_volume_id).await.unwrap_err();
    assert!(matches!(e, ProviderError::NotFound { .. }), "{e:?}");
    assert!(!e.is_retryable());

    for bad in ["", "../../etc/passwd", "-rf", "a b"] {
        let e = inj.device_for(bad).await.unwrap_err();
        assert!(matches!(e, ProviderError::BadParameter { .. }), "{bad:?}: {e:?}");
        let e = inj.inject(bad, &device).await.unwrap_err();
        assert!(matches!(e, ProviderError::BadParameter { .. }), "{bad:?}: {e:?}");
    }
}

#[tokio::test]
async fn conformance_command_injector() {
    let f = Fixture::new();
    let state = f.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let inject = script(
        f.path(),
        "inject.sh",
        r#"echo "[   0.0] Opening the source $1"
echo "[  12.3] Copying viostor.sys" >&2
touch "$STATE_DIR/$2""#,
    );
    let check = script(f.path(), "check.sh", r#"[ -e "$STATE_DIR/$2" ] && exit 0; exit 1"#);
    let mut config = f.config(cmd(&["sh", &inject, "{device}", "{volume_id}"]));
    config.check_command = Some(cmd(&["sh", &check, "{device}", "{volume_id}"]));
    config.env.push(("STATE_DIR".into(), state.to_str().unwrap().into()));
    let inj = CommandInjector::new(config).unwrap();
    conformance(&inj, VOLUME, "00000000-0000-0000-0000-000000000000").await;
}

#[tokio::test]
async fn conformance_sim_injector() {
    let seed = 7;
    let inventory = sim::sample_inventory(seed);
    let windows = inventory.vms.iter().find(|v| v.os_type == "windows").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(sim::serve(
        listener,
        SimConfig {
            seed,
            sample: true,
            ..Default::default()
        },
        async move {
            let _ = stopped.await;
        },
    ));

    let inj = SimInjector::new(base.clone(), Duration::from_secs(5)).unwrap();
    conformance(&inj, &windows.volume_id, "00000000-0000-0000-0000-000000000000").await;

    // The injection is visible in the simulator's volume content.
    let content: serde_json::Value = reqwest::get(format!("{base}/sim/volumes/{}", windows.volume_id))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(content["content"]["virtio_injected"], true, "{content}");

    // Another volume's device is refused (a step passing the wrong value).
    let other = &inventory.vms.iter().find(|v| v.os_type != "windows").unwrap().volume_id;
    let wrong = inj.device_for(other).await.unwrap();
    let e = inj.is_injected(&windows.volume_id, &wrong).await.unwrap_err();
    assert!(matches!(e, ProviderError::BadParameter { .. }), "{e:?}");

    let _ = stop.send(());
    server.await.unwrap().unwrap();

    // A simulator that is gone is retryable.
    let e = inj.device_for(&windows.volume_id).await.unwrap_err();
    assert!(
        matches!(e, ProviderError::Unavailable { .. }) && e.is_retryable(),
        "{e:?}"
    );
}

#[tokio::test]
async fn placeholders_are_substituted_and_env_is_passed() {
    let f = Fixture::new();
    let record = f.path().join("record");
    let inject = script(
        f.path(),
        "inject.sh",
        r#"for a in "$@"; do echo "arg=$a"; done > "$RECORD"
echo "env=$VIRTIO_WIN" >> "$RECORD"
echo "stdin=$(cat)" >> "$RECORD"
echo "out line"
echo "err line" >&2"#,
    );
    let mut config = f.config(cmd(&[
        "sh",
        &inject,
        "-i",
        "disk",
        "{device}",
        "--volume={volume_id}",
        "{serial}",
        "{unknown}",
        "$(touch pwned)",
    ]));
    config.env.push(("RECORD".into(), record.to_str().unwrap().into()));
    let inj = CommandInjector::new(config).unwrap();

    let device = inj.device_for(VOLUME).await.unwrap();
    assert_eq!(device, f.device());
    let report = inj.inject(VOLUME, &device).await.unwrap();

    let recorded = std::fs::read_to_string(&record).unwrap();
    let expected = format!(
        "arg=-i\narg=disk\narg={device}\narg=--volume={VOLUME}\narg={SERIAL}\narg={{unknown}}\narg=$(touch pwned)\n\
         env=/usr/share/virtio-win/virtio-win.iso\nstdin=\n"
    );
    assert_eq!(recorded, expected);
    assert!(!Path::new("pwned").exists() && !f.path().join("pwned").exists());
    assert!(report.output.contains("out line\n"), "{:?}", report.output);
    assert!(report.output.contains("err line\n"), "{:?}", report.output);
    assert!(report.duration_ms < 10_000);
}

#[tokio::test]
async fn output_keeps_a_bounded_tail_with_a_marker() {
    let f = Fixture::new();
    let inject = script(
        f.path(),
        "inject.sh",
        r#"i=0
while [ $i -lt 3000 ]; do echo "progress line $i of a long conversion log"; i=$((i+1)); done"#,
    );
    let mut config = f.config(cmd(&["sh", &inject]));
    config.max_output = 1024;
    let inj = CommandInjector::new(config).unwrap();
    let report = inj.inject(VOLUME, &f.device()).await.unwrap();
    let (marker, tail) = report.output.split_once('\n').unwrap();
    assert!(
        marker.starts_with("[... ") && marker.ends_with(" earlier bytes of output omitted ...]"),
        "{marker}"
    );
    assert_eq!(tail.len(), 1024);
    assert!(
        tail.ends_with("progress line 2998 of a long conversion log\nprogress line 2999 of a long conversion log\n"),
        "{tail}"
    );
    let omitted: u64 = marker["[... ".len()..].split(' ').next().unwrap().parse().unwrap();
    assert!(omitted > 100_000, "{omitted}");
}

#[tokio::test]
async fn non_zero_exit_is_a_permanent_error_with_code_and_stderr_tail() {
    let f = Fixture::new();
    let inject = script(
        f.path(),
        "inject.sh",
        r#"echo "stdout noise"
echo "virt-v2v-in-place: error: inspection could not detect the source guest" >&2
exit 3"#,
    );
    let inj = CommandInjector::new(f.config(cmd(&["sh", &inject]))).unwrap();
    let e = inj.inject(VOLUME, &f.device()).await.unwrap_err();
    match &e {
        ProviderError::Refused { code, errortext } => {
            assert_eq!(*code, 3);
            assert!(errortext.contains("exited with status 3"), "{errortext}");
            assert!(errortext.contains("inspection could not detect"), "{errortext}");
            assert!(!errortext.contains("stdout noise"), "{errortext}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!e.is_retryable());

    // Killed by a signal: 128 + signal, as a shell reports it.
    let killed = script(f.path(), "killed.sh", "kill -9 $$");
    let inj = CommandInjector::new(f.config(cmd(&["sh", &killed]))).unwrap();
    let e = inj.inject(VOLUME, &f.device()).await.unwrap_err();
    assert!(matches!(e, ProviderError::Refused { code: 137, .. }), "{e:?}");

    // A tool that is not installed.
    let inj = CommandInjector::new(f.config(cmd(&["/nonexistent/virt-v2v-in-place", "{device}"]))).unwrap();
    let e = inj.inject(VOLUME, &f.device()).await.unwrap_err();
    assert!(matches!(e, ProviderError::Refused { code: 127, .. }), "{e:?}");
    assert!(!e.is_retryable());
}

/// Whether the process is gone (or a zombie nobody has reaped yet: it no longer runs) within
/// a second: SIGKILL is delivered asynchronously, the killed process still has to be scheduled.
async fn process_gone(pid: &str) -> bool {
    let gone = || match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    };
    for _ in 0..100 {
        if gone() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn timeout_is_retryable_and_kills_the_tool_and_its_children() {
    let f = Fixture::new();
    let inject = script(
        f.path(),
        "inject.sh",
        r#"echo $$ > "$DIR/tool.pid"
sleep 2 &
echo $! > "$DIR/child.pid"
echo "converting..."
wait
touch "$DIR/done""#,
    );
    let mut config = f.config(cmd(&["sh", &inject]));
    config.timeout = Duration::from_millis(500);
    config.env.push(("DIR".into(), f.path().to_str().unwrap().into()));
    let inj = CommandInjector::new(config).unwrap();

    let started = Instant::now();
    let e = inj.inject(VOLUME, &f.device()).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(e, ProviderError::Unavailable { .. }), "{e:?}");
    assert!(e.is_retryable());
    assert!(e.to_string().contains("timed out"), "{e}");

    let tool = std::fs::read_to_string(f.path().join("tool.pid")).unwrap();
    let child = std::fs::read_to_string(f.path().join("child.pid")).unwrap();
    assert!(process_gone(tool.trim()).await, "the tool still runs");
    assert!(process_gone(child.trim()).await, "the tool's child still runs");

    // Had anything survived, it would have finished by now.
    tokio::time::sleep(Duration::from_millis(2500).saturating_sub(started.elapsed())).await;
    assert!(!f.path().join("done").exists());
}

#[tokio::test]
async fn check_command_exit_codes() {
    let f = Fixture::new();
    let answer = f.path().join("answer");
    let check = script(f.path(), "check.sh", r#"exit "$(cat "$1")""#);
    let mut config = f.config(cmd(&["true"]));
    let answer_arg = answer.to_str().unwrap();
    config.check_command = Some(cmd(&["sh", &check, answer_arg, "{device}"]));
    let inj = CommandInjector::new(config).unwrap();
    let device = f.device();

    std::fs::write(&answer, "0").unwrap();
    assert!(inj.is_injected(VOLUME, &device).await.unwrap());
    std::fs::write(&answer, "1").unwrap();
    assert!(!inj.is_injected(VOLUME, &device).await.unwrap());
    std::fs::write(&answer, "2").unwrap();
    let e = inj.is_injected(VOLUME, &device).await.unwrap_err();
    assert!(matches!(e, ProviderError::Refused { code: 2, .. }), "{e:?}");
    assert!(!e.is_retryable());

    // Without a check nothing runs and the answer is "not injected".
    let inj = CommandInjector::new(f.config(cmd(&["true"]))).unwrap();
    assert!(!inj.is_injected(VOLUME, &device).await.unwrap());
}

#[tokio::test]
async fn device_resolution_needs_exactly_one_device() {
    let f = Fixture::new();
    let by_id = f.by_id();
    let inj = CommandInjector::new(f.config(cmd(&["true"]))).unwrap();

    // One device; its partition links and a second link to the same device do not count.
    std::fs::write(by_id.join(format!("virtio-{SERIAL}-part1")), b"").unwrap();
    std::os::unix::fs::symlink(f.device(), by_id.join(format!("wwn-0x{SERIAL}"))).unwrap();
    assert_eq!(inj.device_for(VOLUME).await.unwrap(), f.device());

    // None: NotFound (also for a dangling link).
    let dangling = "aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa";
    let link = by_id.join(format!("virtio-{}", serial_for(dangling).unwrap()));
    std::os::unix::fs::symlink(by_id.join("gone"), link).unwrap();
    for id in ["ffffffff-0000-0000-0000-000000000000", dangling] {
        let e = inj.device_for(id).await.unwrap_err();
        assert!(matches!(e, ProviderError::NotFound { .. }), "{e:?}");
    }

    // Two distinct devices: an error naming both.
    std::fs::write(by_id.join(format!("scsi-0QEMU_QEMU_HARDDISK_{SERIAL}")), b"").unwrap();
    let e = inj.device_for(VOLUME).await.unwrap_err();
    match &e {
        ProviderError::Refused { errortext, .. } => {
            assert!(errortext.contains(&format!("virtio-{SERIAL}")), "{errortext}");
            assert!(
                errortext.contains(&format!("scsi-0QEMU_QEMU_HARDDISK_{SERIAL}")),
                "{errortext}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(!e.is_retryable());

    // Configuration errors are caught up front.
    let mut bad = f.config(cmd(&["true"]));
    bad.device_pattern = "/dev/disk/by-id/[{serial}".into();
    assert!(matches!(
        CommandInjector::new(bad),
        Err(ProviderError::BadParameter { .. })
    ));
    assert!(matches!(
        CommandInjector::new(f.config(vec![])),
        Err(ProviderError::BadParameter { .. })
    ));
}
