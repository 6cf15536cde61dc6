//! `tern sim`: the CloudStack/LINSTOR simulator as a process of its own.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio_util::sync::CancellationToken;

use super::duration;

#[derive(clap::Args, Clone)]
pub(crate) struct SimArgs {
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub(crate) listen: String,
    #[arg(long, env = "TERN_SIM_API_KEY", default_value = "tern-dev-key")]
    pub(crate) api_key: String,
    #[arg(
        long,
        env = "TERN_SIM_SECRET_KEY",
        default_value = "tern-dev-secret",
        hide_env_values = true
    )]
    pub(crate) secret_key: String,
    /// Where the simulated world is kept (it survives restarts).
    #[arg(long)]
    pub(crate) state: Option<PathBuf>,
    /// Create the sample world (an OMA, networks, replicated VMs) and print its inventory.
    #[arg(long)]
    pub(crate) sample: bool,
    /// With --sample: also write the inventory to this file (for `tern admin inventory load`).
    #[arg(long, requires = "sample", value_name = "FILE")]
    pub(crate) inventory_out: Option<PathBuf>,
    /// JSON fault plan (error, hang, job failure and lost-reply rates per command).
    #[arg(long)]
    pub(crate) fault_plan: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// How long async jobs stay pending.
    #[arg(long, default_value = "200ms", value_parser = duration)]
    pub(crate) latency: Duration,
    /// Serve HTTPS with this certificate chain (PEM), as a CloudStack behind a private CA.
    #[arg(long, requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
}

pub(crate) fn sim_config(args: &SimArgs) -> Result<tern::sim::SimConfig> {
    let fault_plan = match &args.fault_plan {
        Some(p) => Some(tern::sim::FaultPlan::load(p).with_context(|| format!("fault plan {}", p.display()))?),
        None => None,
    };
    Ok(tern::sim::SimConfig {
        api_key: args.api_key.clone(),
        secret_key: args.secret_key.clone(),
        state_file: args.state.clone(),
        async_latency: args.latency,
        fault_plan,
        seed: args.seed,
        sample: args.sample,
    })
}

pub(crate) async fn run(args: &SimArgs, shutdown: CancellationToken) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if args.tls_cert.is_some() { "https" } else { "http" };
    let addr = format!("{scheme}://{addr}");
    if args.sample {
        let inv = tern::sim::sample_inventory(args.seed);
        let text = serde_json::to_string_pretty(&inv.to_inventory())?;
        println!("{text}");
        if let Some(path) = &args.inventory_out {
            std::fs::write(path, format!("{text}\n"))
                .with_context(|| format!("writing the inventory to {} (--inventory-out)", path.display()))?;
        }
        eprintln!(
            "tern sim: CloudStack at {addr}/client/api, LINSTOR at {addr}\n\
             the inventory above loads with `tern admin inventory load FILE`; point a worker at it with\n  \
             TERN_CLOUDSTACK_URL={addr}/client/api TERN_ZONE_ID={} TERN_SERVICE_OFFERING_ID={} \\\n  \
             TERN_TEMPLATE_ID={} TERN_TEST_NETWORK_ID={} TERN_VIRTIO_SIM_URL={addr} tern worker",
            inv.zone_id, inv.service_offering_id, inv.template_id, inv.test_network_id
        );
    } else {
        eprintln!("tern sim: CloudStack at {addr}/client/api, LINSTOR at {addr}");
    }
    let stop = async move { shutdown.cancelled().await };
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            tern::sim::serve_tls(listener, sim_config(args)?, &read(cert)?, &read(key)?, stop).await
        }
        _ => tern::sim::serve(listener, sim_config(args)?, stop).await,
    }
}
