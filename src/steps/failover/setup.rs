//! Building the failover actions' dependencies from configuration: the CloudStack client, the
//! snapshot backend, the VirtIO injector. `tern worker`, `tern dev` and the tests share this.

use std::sync::Arc;
use std::time::Duration;

use super::{FailoverConfig, FailoverDeps};
use crate::providers::cloudstack::{CloudStackClient, CloudStackConfig, VmSnapshots, VolumeSnapshots};
use crate::providers::linstor::LinstorClient;
use crate::providers::virtio::{CommandInjector, CommandInjectorConfig, DriverInjector, SimInjector};
use crate::providers::{Cloud, SnapshotBackend, SnapshotKind};
use crate::store::Store;

/// How VirtIO drivers are injected.
#[derive(Debug, Clone)]
pub enum InjectorSettings {
    /// Run a command on the OMA (the real thing).
    Command(CommandInjectorConfig),
    /// Ask the simulator at this base URL (development and tests).
    Sim { base_url: String },
}

/// Everything needed to reach the cloud. Secrets stay out of `Debug`.
#[derive(Clone)]
pub struct CloudSettings {
    /// CloudStack API endpoint, e.g. `http://cloudstack:8080/client/api`.
    pub cloudstack_url: String,
    pub api_key: String,
    pub secret_key: String,
    /// LINSTOR controller, e.g. `http://linstor:3370` (needed for the `linstor` backend).
    pub linstor_url: Option<String>,
    pub snapshot_backend: SnapshotKind,
    pub zone_id: String,
    /// One service offering id, or several separated by commas (see [`FailoverConfig`]).
    pub service_offering_id: String,
    pub template_id: String,
    pub test_network_id: Option<String>,
    pub injector: InjectorSettings,
    pub job_poll: Duration,
    pub job_timeout: Duration,
    pub request_timeout: Duration,
    /// How far CloudStack's clock may be from ours (see [`CloudStackConfig::clock_skew`]).
    pub clock_skew: Duration,
    /// CA certificates (PEM) to trust for CloudStack and for LINSTOR, besides the public roots.
    pub cloudstack_ca_pem: Option<Vec<u8>>,
    pub linstor_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for CloudSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudSettings")
            .field("cloudstack_url", &self.cloudstack_url)
            .field("api_key", &"***")
            .field("secret_key", &"***")
            .field("linstor_url", &self.linstor_url)
            .field("snapshot_backend", &self.snapshot_backend)
            .field("zone_id", &self.zone_id)
            .finish_non_exhaustive()
    }
}

/// Builds the deps, or says (naming the setting) what is missing.
pub fn build(settings: &CloudSettings, store: Arc<dyn Store>) -> Result<Arc<FailoverDeps>, String> {
    for (name, value) in [
        ("TERN_CLOUDSTACK_URL", &settings.cloudstack_url),
        ("TERN_CLOUDSTACK_API_KEY", &settings.api_key),
        ("TERN_CLOUDSTACK_SECRET_KEY", &settings.secret_key),
        ("TERN_ZONE_ID", &settings.zone_id),
        ("TERN_SERVICE_OFFERING_ID", &settings.service_offering_id),
        ("TERN_TEMPLATE_ID", &settings.template_id),
    ] {
        if value.trim().is_empty() {
            return Err(format!("{name} is not set"));
        }
    }
    let mut cs = CloudStackConfig::new(&settings.cloudstack_url, &settings.api_key, &settings.secret_key);
    cs.request_timeout = settings.request_timeout;
    cs.clock_skew = settings.clock_skew;
    cs.ca_pem = settings.cloudstack_ca_pem.clone();
    let cloud: Arc<dyn Cloud> = Arc::new(CloudStackClient::new(cs).map_err(|e| format!("CloudStack client: {e}"))?);
    let snapshots: Arc<dyn SnapshotBackend> = match settings.snapshot_backend {
        SnapshotKind::CloudstackVolume => Arc::new(VolumeSnapshots::new(
            cloud.clone(),
            settings.job_poll,
            settings.job_timeout,
        )),
        SnapshotKind::CloudstackVm => {
            Arc::new(VmSnapshots::new(cloud.clone(), settings.job_poll, settings.job_timeout))
        }
        SnapshotKind::Linstor => {
            let url = settings
                .linstor_url
                .as_deref()
                .filter(|u| !u.trim().is_empty())
                .ok_or("TERN_LINSTOR_URL is not set (needed by TERN_SNAPSHOT_BACKEND=linstor)")?;
            Arc::new(
                LinstorClient::with_ca(url, settings.request_timeout, settings.linstor_ca_pem.as_deref())
                    .map_err(|e| format!("LINSTOR client: {e}"))?
                    .with_waiting(settings.job_poll, settings.job_timeout),
            )
        }
    };
    let injector: Arc<dyn DriverInjector> = match &settings.injector {
        InjectorSettings::Command(c) => {
            Arc::new(CommandInjector::new(c.clone()).map_err(|e| format!("VirtIO injector: {e}"))?)
        }
        InjectorSettings::Sim { base_url } => Arc::new(
            SimInjector::new(base_url.clone(), settings.request_timeout)
                .map_err(|e| format!("simulator VirtIO injector: {e}"))?,
        ),
    };
    Ok(Arc::new(FailoverDeps {
        store,
        cloud,
        snapshots,
        injector,
        config: FailoverConfig {
            zone_id: settings.zone_id.clone(),
            service_offering_ids: settings
                .service_offering_id
                .split(',')
                .map(str::trim)
                .filter(|id| !id.is_empty())
                .map(str::to_string)
                .collect(),
            template_id: settings.template_id.clone(),
            test_network_id: settings.test_network_id.clone(),
            snapshot_kind: settings.snapshot_backend,
            job_poll: settings.job_poll,
            job_timeout: settings.job_timeout,
        },
    }))
}
