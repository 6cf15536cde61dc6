//! A real `tern server` child process SIGKILLed while failovers run, then restarted: every job a
//! client saw reaches the right terminal state, and a retried start (same request id) returns
//! the job it made before the kill.

use std::process::Stdio;
use std::time::Duration;

use tern::api::pb;
use tern::api::pb::failover_service_client::FailoverServiceClient;
use tern::sim::SimConfig;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::common::TestDb;

/// A `tern server` child process to start (and start again) with `args`; its logs are kept in
/// `log_dir`, one file per start.
pub(crate) struct Server {
    pub(crate) args: Vec<String>,
    pub(crate) log_dir: tempfile::TempDir,
    pub(crate) endpoint: String,
}

impl Server {
    pub(crate) fn spawn(&self, name: &str) -> Child {
        let log = std::fs::File::create(self.log_dir.path().join(format!("{name}.log"))).unwrap();
        // The secret key from a file, as systemd credentials and Kubernetes secrets give it.
        let secret = self.log_dir.path().join("secret-key");
        std::fs::write(&secret, "s\n").unwrap();
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(&self.args)
            .env("RUST_LOG", "info,sqlx=warn")
            .env_remove("TERN_CLOUDSTACK_SECRET_KEY")
            .env("TERN_CLOUDSTACK_SECRET_KEY_FILE", &secret)
            .env_remove("TERN_CRASH_AT")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tern server")
    }

    pub(crate) fn logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.log_dir.path()).unwrap().flatten() {
            out += &format!(
                "==> {}\n{}\n",
                e.path().display(),
                std::fs::read_to_string(e.path()).unwrap_or_default()
            );
        }
        out
    }

    /// One connection to the server, once it is up.
    pub(crate) async fn channel(&self) -> tonic::transport::Channel {
        for _ in 0..300 {
            if let Ok(ch) = tonic::transport::Endpoint::from_shared(self.endpoint.clone())
                .unwrap()
                .connect()
                .await
            {
                return ch;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("server never came up\n{}", self.logs());
    }

    async fn client(&self) -> FailoverServiceClient<tonic::transport::Channel> {
        FailoverServiceClient::new(self.channel().await)
    }
}

pub async fn server_killed_mid_failovers_and_restarted(db: TestDb) {
    let stop = CancellationToken::new();
    let _guard = stop.clone().drop_guard();
    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", sim_listener.local_addr().unwrap());
    let config = SimConfig {
        api_key: "k".into(),
        secret_key: "s".into(),
        state_file: None,
        async_latency: Duration::from_millis(200),
        fault_plan: None,
        seed: 7,
        sample: true,
    };
    let s = stop.clone();
    tokio::spawn(async move { tern::sim::serve(sim_listener, config, async move { s.cancelled().await }).await });
    let sample = tern::sim::sample_inventory(7);
    let inv = sample.to_inventory();
    let store = db.open().await;
    tern::store::load_inventory(store.as_ref(), &inv, tern::domain::Timestamp::now())
        .await
        .unwrap();
    let defs = super::fast_definitions();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let args: Vec<String> = [
        "server",
        "--insecure-no-auth",
        "--database",
        &db.url,
        "--workflows",
        &defs.path().display().to_string(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--lease-ttl",
        "1s",
        "--poll-interval",
        "100ms",
        "--shutdown-grace",
        "2s",
        "--cloudstack-url",
        &format!("{base}/client/api"),
        "--cloudstack-api-key",
        "k",
        "--zone-id",
        &sample.zone_id,
        "--service-offering-id",
        &sample.service_offering_id,
        "--template-id",
        &sample.template_id,
        "--test-network-id",
        &sample.test_network_id,
        "--virtio-sim-url",
        &base,
        "--job-poll",
        "20ms",
        "--request-timeout",
        "2s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let server = Server {
        args,
        log_dir: tempfile::tempdir().unwrap(),
        endpoint: format!("http://127.0.0.1:{port}"),
    };
    let mut child = server.spawn("server-1");
    let mut fo = server.client().await;
    let mut jobs = Vec::new();
    for (i, vm) in inv.vms.iter().enumerate() {
        let job = if i == 2 {
            fo.start_live_failover(pb::StartLiveFailoverRequest {
                vm_id: vm.vm_id.clone(),
                request_id: format!("restart-{i}"),
                ..Default::default()
            })
            .await
        } else {
            fo.start_test_failover(pb::StartTestFailoverRequest {
                vm_id: vm.vm_id.clone(),
                auto_cleanup: true,
                test_duration: "1s".into(),
                request_id: format!("restart-{i}"),
                ..Default::default()
            })
            .await
        };
        jobs.push((job.unwrap().into_inner(), i));
    }
    // Let the steps get going, then kill the process without warning.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut in_flight = 0;
    for (job, _) in &jobs {
        let run = store.get_run(job.job_id.parse().unwrap()).await.unwrap().unwrap();
        in_flight += usize::from(!run.status.is_terminal());
    }
    assert_eq!(in_flight, jobs.len(), "every job must still be running at the kill");
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    let mut child = server.spawn("server-2");
    let mut fo = server.client().await;
    // A client retrying its start after the crash gets the same job back.
    let again = fo
        .start_test_failover(pb::StartTestFailoverRequest {
            vm_id: inv.vms[0].vm_id.clone(),
            auto_cleanup: true,
            test_duration: "1s".into(),
            request_id: "restart-0".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.job_id.as_str(), again.created),
        (jobs[0].0.job_id.as_str(), false)
    );
    for (job, i) in &jobs {
        let mut last = None;
        for _ in 0..1500 {
            let j = fo
                .get_failover(pb::GetFailoverRequest {
                    job_id: job.job_id.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            if ["completed", "failed", "cancelled", "needs_operator"].contains(&j.run_status.as_str()) {
                last = Some(j);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let j = last.unwrap_or_else(|| panic!("job {} ({i}) never finished\n{}", job.job_id, server.logs()));
        assert_eq!(
            j.run_status,
            "completed",
            "job {} ({i}): {j:?}\n{}",
            job.job_id,
            server.logs()
        );
        assert_eq!(j.progress_percent, 100);
        let run: tern::domain::RunId = j.job_id.parse().unwrap();
        let seqs: Vec<i64> = store
            .journal(run, 0, 10_000)
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, (1..=j.last_sequence).collect::<Vec<_>>(), "journal gaps");
    }
    // SIGTERM: the server drains and exits cleanly.
    let pid = child.id().expect("running") as i32;
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("server stops after SIGTERM")
        .unwrap();
    assert!(status.success(), "exit {status:?}\n{}", server.logs());
    // Nothing Tern named is left in the cloud but the live failover's VM.
    let inv_check: serde_json::Value = reqwest::get(format!("{base}/sim/invariant?prefix=tern-t-"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(inv_check["ok"], serde_json::json!(true), "{inv_check:#}");
}
