//! `tern dev`, `tern server` and `tern worker`: the long-running processes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use tern::engine::{worker, Engine};
use tern::providers::virtio::CommandInjectorConfig;
use tern::steps::failover::setup::{self as failover_setup, CloudSettings, InjectorSettings};
use tern::steps::failover::FailoverDeps;
use tern::store::{self, Store};

use super::sim::{self, SimArgs};
use super::{config, data_dir, open_store, ApiArgs, Cli, CloudArgs, Command, WorkerArgs};

/// Runs `tern dev`, `tern server` or `tern worker` until `shutdown`.
pub(crate) async fn run(cli: &Cli, shutdown: CancellationToken) -> Result<()> {
    let store = open_store(cli).await?;
    let metrics = match &cli.command {
        Command::Worker { worker: w, .. } | Command::Server { worker: w, .. } | Command::Dev { worker: w, .. } => {
            serve_metrics(w, store.clone(), shutdown.clone()).await?
        }
        _ => None,
    };
    let _stop_metrics = metrics.map(tokio_util::task::AbortOnDropHandle::new);
    match &cli.command {
        Command::Worker { worker: w, cloud } => {
            let (engine, _) = cloud_engine(cli, store.clone(), w, cloud)?;
            worker::run_worker(engine, shutdown).await?;
        }
        Command::Server { api, worker: w, cloud } => {
            let listener = bind_api(&api.listen).await?;
            let http = match &api.http_listen {
                Some(addr) => Some(bind_http(addr).await?),
                None => None,
            };
            let options = serve_options(api, &listener, http.as_ref(), store.clone()).await?;
            let (engine, deps) = cloud_engine(cli, store.clone(), w, cloud)?;
            serve_and_work((listener, http), options, engine, store, deps, shutdown).await?;
        }
        Command::Dev {
            worker: w,
            sim_listen,
            listen,
            http_listen,
        } => {
            let listener = bind_api(listen).await?;
            let http = bind_http(http_listen).await?;
            let (engine, deps, sim) = dev(cli, store.clone(), w, sim_listen, shutdown.clone()).await?;
            eprintln!(
                "tern dev: gRPC API on {} (plaintext, no authentication: for this machine only)\n\
                 tern dev: REST API on http://{} (the same; OpenAPI at /api/v1/openapi.json)",
                listener.local_addr()?,
                http.local_addr()?
            );
            let options = tern::api::ServeOptions::default();
            let served = serve_and_work((listener, Some(http)), options, engine, store, Some(deps), shutdown).await;
            // A simulator that stopped on an error stopped `tern dev`: that error is the reason.
            match sim.await {
                Ok(Err(e)) => return Err(e.context("tern dev: the simulator stopped")),
                Err(e) => return Err(anyhow::Error::new(e).context("tern dev: the simulator panicked")),
                Ok(Ok(())) => served?,
            }
        }
        _ => unreachable!("only the serving commands come here"),
    }
    Ok(())
}

/// With `--metrics-listen`: the process's metrics recorder and `/metrics` on that address.
async fn serve_metrics(
    w: &WorkerArgs,
    store: Arc<dyn Store>,
    shutdown: CancellationToken,
) -> Result<Option<JoinHandle<()>>> {
    let Some(addr) = &w.metrics_listen else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint to {addr} (--metrics-listen)"))?;
    let handle = tern::telemetry::metrics::install().map_err(anyhow::Error::msg)?;
    tracing::info!(addr = %listener.local_addr()?, "metrics at /metrics");
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = tern::api::metrics::serve(listener, handle, store, shutdown.cancelled_owned()).await {
            tracing::error!(error = %e, "the metrics endpoint stopped");
        }
    })))
}

/// The engine of `tern worker` / `tern server`: built-ins plus the failover steps bound to the
/// configured cloud (or failing with NOT_CONFIGURED when there is none).
pub(crate) fn cloud_engine(
    cli: &Cli,
    store: Arc<dyn Store>,
    w: &WorkerArgs,
    cloud: &CloudArgs,
) -> Result<(Arc<Engine>, Option<Arc<FailoverDeps>>)> {
    let mut registry = tern::steps::builtins(store.clone());
    let deps = match cloud_settings(cloud)? {
        Some(settings) => {
            let deps = failover_setup::build(&settings, store.clone()).map_err(anyhow::Error::msg)?;
            tern::steps::failover::register(&mut registry, deps.clone());
            Some(deps)
        }
        None => {
            tracing::warn!("TERN_CLOUDSTACK_URL not set: failover steps will fail until CloudStack is configured");
            None
        }
    };
    let engine = Engine::with_registry(store, cli.workflows.as_deref(), registry, config(w)?)?;
    Ok((engine, deps))
}

/// TLS and authentication of `tern server`, from its flags; a certificate or key that does not
/// load stops the start with the reason.
async fn serve_options(
    api: &ApiArgs,
    listener: &tokio::net::TcpListener,
    http: Option<&tokio::net::TcpListener>,
    store: Arc<dyn Store>,
) -> Result<tern::api::ServeOptions> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let read =
        |flag: &str, path: &Path| std::fs::read(path).with_context(|| format!("reading {flag} {}", path.display()));
    let mut http_tls = None;
    let tls = match (&api.tls_cert, &api.tls_key) {
        (Some(cert), Some(key)) => {
            let (cert, key) = (read("--tls-cert", cert)?, read("--tls-key", key)?);
            let client_ca = api
                .tls_client_ca
                .as_deref()
                .map(|ca| read("--tls-client-ca", ca))
                .transpose()?;
            if http.is_some() {
                http_tls = Some(
                    tern::api::rest::tls::server_config(&cert, &key, client_ca.as_deref(), !api.insecure_no_auth)
                        .map_err(anyhow::Error::msg)
                        .context("the REST API's TLS")?,
                );
            }
            let identity = Identity::from_pem(cert, key);
            let mut tls = ServerTlsConfig::new().identity(identity);
            if let Some(ca) = client_ca {
                // With tokens, a client may authenticate either way; without, only by certificate.
                tls = tls
                    .client_ca_root(Certificate::from_pem(ca))
                    .client_auth_optional(!api.insecure_no_auth);
            }
            tonic::transport::Server::builder()
                .tls_config(tls.clone())
                .context("the TLS certificate or key (--tls-cert, --tls-key, --tls-client-ca)")?;
            Some(tls)
        }
        _ => None,
    };
    let addr = listener.local_addr()?;
    let exposed = !addr.ip().is_loopback();
    if tls.is_none() && exposed {
        tracing::warn!(%addr, "the gRPC API is plaintext on a non-loopback address: tokens and data cross the network in clear (use --tls-cert and --tls-key)");
    }
    if let Some(http) = http {
        let addr = http.local_addr()?;
        if http_tls.is_none() && !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the REST API is plaintext on a non-loopback address: tokens and data cross the network in clear (use --tls-cert and --tls-key)");
        }
    }
    let auth = if api.insecure_no_auth {
        if exposed {
            tracing::warn!(%addr, "--insecure-no-auth on a non-loopback address: anyone who reaches it may start a live failover of any VM");
        } else {
            tracing::warn!("--insecure-no-auth: every caller may do everything");
        }
        tern::api::auth::Authenticator::Off
    } else {
        if store.principals().await?.iter().all(|p| p.revoked_at.is_some()) {
            tracing::warn!("no principal exists yet: every call is UNAUTHENTICATED until one is created (tern token create NAME --role admin)");
        }
        tern::api::auth::Authenticator::Principals {
            store,
            certificates: api.tls_client_ca.is_some(),
        }
    };
    let limits = tern::api::gate::Limits {
        max_message_bytes: api.max_message_size,
        calls_per_connection: api.max_calls_per_connection as usize,
        watches: api.max_watches as usize,
        calls_per_second: api.rate_limit,
    };
    Ok(tern::api::ServeOptions {
        tls,
        http_tls,
        auth,
        limits,
    })
}

pub(crate) async fn bind_api(listen: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the gRPC API to {listen} (use --listen)"))
}

async fn bind_http(listen: &str) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the REST API to {listen} (use --http-listen)"))
}

/// The gRPC API (and the REST API, with its listener) and a worker in one process; both stop
/// on `token` (the API first drains its calls).
pub(crate) async fn serve_and_work(
    (listener, http): (tokio::net::TcpListener, Option<tokio::net::TcpListener>),
    options: tern::api::ServeOptions,
    engine: Arc<Engine>,
    store: Arc<dyn Store>,
    failover: Option<Arc<FailoverDeps>>,
    token: CancellationToken,
) -> Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "gRPC API listening");
    if let Some(http) = &http {
        tracing::info!(addr = %http.local_addr()?, "REST API listening");
    }
    let state = tern::api::ApiState::new(engine.clone(), store, failover);
    let stop = token.clone();
    let api = tokio::spawn(tern::api::serve_with_http(listener, http, state, options, async move {
        stop.cancelled().await
    }));
    let worked = worker::run_worker(engine, token.clone()).await;
    token.cancel();
    let served = api.await.context("the gRPC server task panicked")?;
    worked?;
    served?;
    Ok(())
}

/// Splits a command line as a POSIX shell would (quotes and backslashes), without running a
/// shell; `what` names the setting in the error.
pub(crate) fn split_command(what: &str, s: &str) -> Result<Vec<String>> {
    match shlex::split(s) {
        Some(words) if !words.is_empty() => Ok(words),
        Some(_) => anyhow::bail!("{what} is empty"),
        None => anyhow::bail!("{what} has an unclosed quote or a trailing backslash: {s}"),
    }
}

/// The cloud settings from flags/environment; None when no CloudStack URL is given.
pub(crate) fn cloud_settings(c: &CloudArgs) -> Result<Option<CloudSettings>> {
    let Some(url) = c.cloudstack_url.clone().filter(|u| !u.trim().is_empty()) else {
        return Ok(None);
    };
    let injector = match &c.virtio_sim_url {
        Some(base_url) => InjectorSettings::Sim {
            base_url: base_url.clone(),
        },
        None => InjectorSettings::Command(CommandInjectorConfig {
            inject_command: split_command("TERN_VIRTIO_COMMAND", &c.virtio_command)?,
            check_command: match c.virtio_check_command.as_deref() {
                Some(check) => Some(split_command("TERN_VIRTIO_CHECK_COMMAND", check)?),
                None => None,
            },
            env: vec![("VIRTIO_WIN".to_string(), c.virtio_win.clone())],
            device_pattern: c.virtio_device_pattern.clone(),
            timeout: c.virtio_timeout,
            ..CommandInjectorConfig::default()
        }),
    };
    Ok(Some(CloudSettings {
        cloudstack_url: url,
        api_key: c.cloudstack_api_key.clone().unwrap_or_default(),
        secret_key: c.secret_key()?.unwrap_or_default(),
        linstor_url: c.linstor_url.clone(),
        snapshot_backend: c.snapshot_backend,
        zone_id: c.zone_id.clone(),
        service_offering_id: c.service_offering_id.clone(),
        template_id: c.template_id.clone(),
        test_network_id: c.test_network_id.clone(),
        injector,
        job_poll: c.job_poll,
        job_timeout: c.job_timeout,
        request_timeout: c.request_timeout,
        clock_skew: c.cloudstack_clock_skew,
        cloudstack_ca_pem: read_ca("--cloudstack-ca", c.cloudstack_ca.as_deref())?,
        linstor_ca_pem: read_ca("--linstor-ca", c.linstor_ca.as_deref())?,
    }))
}

/// The CA certificate file `path` names, if any.
fn read_ca(flag: &str, path: Option<&Path>) -> Result<Option<Vec<u8>>> {
    path.map(|p| std::fs::read(p).with_context(|| format!("reading {flag} {}", p.display())))
        .transpose()
}

/// Where `tern dev` keeps the simulator's world: beside its SQLite database (so two `tern dev`
/// with their own databases run side by side), else in the data directory. Created if absent.
fn dev_state_dir(cli: &Cli) -> Result<PathBuf> {
    let dir = cli
        .database
        .as_deref()
        .and_then(super::sqlite_dir)
        .unwrap_or_else(data_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating the data directory {}", dir.display()))?;
    Ok(dir)
}

/// `tern dev`: the simulator with the sample world (kept beside the database), its inventory
/// loaded, and a worker whose failover steps talk to the simulator over HTTP. The simulator's
/// task ends with its error, having stopped everything through `token`.
pub(crate) async fn dev(
    cli: &Cli,
    store: Arc<dyn Store>,
    w: &WorkerArgs,
    sim_listen: &str,
    token: CancellationToken,
) -> Result<(Arc<Engine>, Arc<FailoverDeps>, JoinHandle<Result<()>>)> {
    let seed = 1;
    let state = dev_state_dir(cli)?.join("sim-state.json");
    let args = SimArgs {
        listen: sim_listen.to_string(),
        api_key: "tern-dev-key".into(),
        secret_key: "tern-dev-secret".into(),
        state: Some(state.clone()),
        sample: true,
        fault_plan: None,
        seed,
        latency: Duration::from_millis(200),
        tls_cert: None,
        tls_key: None,
        inventory_out: None,
    };
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding the simulator to {} (use --sim-listen)", args.listen))?;
    let addr = listener.local_addr()?;
    let sim = sim::sim_config(&args)?;
    let stop = token.clone();
    let sim = tokio::spawn(async move {
        let served = tern::sim::serve(listener, sim, stop.clone().cancelled_owned()).await;
        if let Err(e) = &served {
            tracing::error!(error = %e, "the simulator stopped: stopping tern dev");
            stop.cancel();
        }
        served
    });
    let inv = tern::sim::sample_inventory(seed);
    let file = inv.to_inventory();
    store::load_inventory(store.as_ref(), &file, tern::domain::Timestamp::now()).await?;
    let settings = CloudSettings {
        cloudstack_url: format!("http://{addr}/client/api"),
        api_key: args.api_key.clone(),
        secret_key: args.secret_key.clone(),
        linstor_url: Some(format!("http://{addr}")),
        snapshot_backend: tern::providers::SnapshotKind::CloudstackVolume,
        zone_id: inv.zone_id.clone(),
        service_offering_id: inv.service_offering_id.clone(),
        template_id: inv.template_id.clone(),
        test_network_id: Some(inv.test_network_id.clone()),
        injector: InjectorSettings::Sim {
            base_url: format!("http://{addr}"),
        },
        job_poll: Duration::from_millis(100),
        job_timeout: Duration::from_secs(120),
        request_timeout: Duration::from_secs(10),
        // The simulator runs on this machine's clock.
        clock_skew: Duration::from_millis(200),
        cloudstack_ca_pem: None,
        linstor_ca_pem: None,
    };
    let mut registry = tern::steps::builtins(store.clone());
    let deps = failover_setup::build(&settings, store.clone()).map_err(anyhow::Error::msg)?;
    tern::steps::failover::register(&mut registry, deps.clone());
    let engine = Engine::with_registry(store, cli.workflows.as_deref(), registry, config(w)?)?;
    print_dev_banner(&engine, &file, &format!("http://{addr}"), &state);
    Ok((engine, deps, sim))
}

pub(crate) fn print_dev_banner(engine: &Engine, inv: &tern::domain::inventory::InventoryFile, sim: &str, state: &Path) {
    let vms: Vec<String> = inv
        .vms
        .iter()
        .map(|v| format!("  {}  {:<12} {}", v.vm_id, v.name, v.os_type))
        .collect();
    let first = inv.vms.first().map(|v| v.vm_id.clone()).unwrap_or_default();
    eprintln!(
        "tern dev: engine on {} with the CloudStack simulator at {sim} (state in {})\n\
         sample VMs:\n{}\n\
         try, in another terminal:\n  \
         tern test-failover {first} --duration 30s --auto-cleanup --watch\n  \
         tern list\n  tern readiness {first}\n  \
         tern admin submit test-failover --input '{{\"vm_id\": \"{first}\", \"auto_cleanup\": true, \"test_duration\": \"30s\"}}' --wait 2m\n  \
         tern admin runs\n  tern admin journal <run-id>\n  \
         curl -s '{sim}/sim/invariant?prefix=tern-'\n\
         stop with Ctrl-C.",
        engine.backend(),
        state.display(),
        vms.join("\n"),
    );
}
