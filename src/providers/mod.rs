//! The clouds Tern drives: provider traits, their domain types and the layer's one error enum.
//!
//! - [`Cloud`]: the CloudStack operations a failover needs. Async commands are split into
//!   [`Cloud::issue`] (returns a job id the caller checkpoints) and [`Cloud::poll_job`], so a
//!   restarted process resumes polling the same job instead of issuing the command again.
//! - [`SnapshotBackend`]: create / revert / delete / list named snapshots of one target
//!   (a CloudStack volume, a CloudStack VM, or a LINSTOR resource definition). Names are
//!   chosen by the caller, so they can be journaled before the snapshot is requested and
//!   adopted after a crash.
//!
//! Implementations: [`cloudstack::CloudStackClient`] (also [`cloudstack::VolumeSnapshots`],
//! [`cloudstack::VmSnapshots`]) and [`linstor::LinstorClient`]; [`crate::sim`] serves the same
//! wire protocols for tests.

pub mod cloudstack;
pub mod linstor;
mod types;
pub mod virtio;

pub use types::*;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub type Result<T, E = ProviderError> = std::result::Result<T, E>;

/// Every failure of a provider call. Classified by type (HTTP status, CloudStack `errorcode`,
/// LINSTOR `ret_code`), never by message text. No variant carries the API key, the secret or a
/// signed URL: texts come from the server's `errortext` or from the transport error with its
/// URL stripped.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// 401: unknown API key, bad signature, expired request (or, for CloudStack, an unknown
    /// command: the server cannot tell those apart).
    #[error("unauthorized: {errortext}")]
    Unauthorized { errortext: String },
    /// 430/431/432/405: the request itself is wrong (missing or invalid parameter, an id that
    /// does not exist, an operation the entity's state forbids). Retrying the same request
    /// cannot succeed.
    #[error("bad parameter ({code}): {errortext}")]
    BadParameter { code: u16, errortext: String },
    /// The entity looked up does not exist (an empty list for a by-id look-up, LINSTOR 404).
    #[error("not found: {what}")]
    NotFound { what: String },
    /// The entity exists but is in a state that refuses the operation (CloudStack 536
    /// resource-in-use, LINSTOR "exists"/"in use" codes). Not retryable as is: the caller must
    /// change the state first.
    #[error("invalid state ({code}): {errortext}")]
    InvalidState { code: u16, errortext: String },
    /// 530 (and other 5xx): the server failed. Retryable; a mutating request may have been
    /// applied before the failure (see [`ProviderError::may_have_applied`]).
    #[error("internal error ({code}): {errortext}")]
    Internal { code: u16, errortext: String },
    /// The server could not be reached or did not answer in time (connection refused/reset,
    /// timeout, 429, 503, 533-535). Retryable; the request may have been applied.
    #[error("unavailable: {detail}")]
    Unavailable { detail: String },
    /// Other refusals that retrying will not fix (531 account error, 532 resource limit, …).
    #[error("refused ({code}): {errortext}")]
    Refused { code: u16, errortext: String },
    /// An async job ended with `jobstatus` 2. Retryable when `errorcode` is 530 or 533-535:
    /// the job is over, so nothing is still running, and those codes mean a transient server
    /// side failure (agent timeout, capacity, resource unavailable). The caller's retry must
    /// re-read the state (adopt by name) before issuing again. 431 and others are final.
    #[error("async job {job_id} failed ({errorcode}): {errortext}")]
    AsyncJobFailed {
        job_id: String,
        errorcode: u16,
        errortext: String,
    },
    /// [`Cloud::wait_job`] gave up waiting; the job is still running. Retryable: poll the
    /// same job id again.
    #[error("async job {job_id} still pending after {waited:?}")]
    JobTimeout { job_id: String, waited: Duration },
    /// The reply could not be understood.
    #[error("protocol error: {detail}")]
    Protocol { detail: String },
}

impl ProviderError {
    /// The variant's name, for metrics (a bounded label).
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderError::Unauthorized { .. } => "unauthorized",
            ProviderError::BadParameter { .. } => "bad_parameter",
            ProviderError::NotFound { .. } => "not_found",
            ProviderError::InvalidState { .. } => "invalid_state",
            ProviderError::Internal { .. } => "internal",
            ProviderError::Unavailable { .. } => "unavailable",
            ProviderError::Refused { .. } => "refused",
            ProviderError::AsyncJobFailed { .. } => "async_job_failed",
            ProviderError::JobTimeout { .. } => "job_timeout",
            ProviderError::Protocol { .. } => "protocol",
        }
    }

    /// Whether the same call may succeed if made again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProviderError::Internal { .. } | ProviderError::Unavailable { .. } | ProviderError::JobTimeout { .. } => {
                true
            }
            ProviderError::AsyncJobFailed { errorcode, .. } => {
                matches!(errorcode, 530 | 533 | 534 | 535)
            }
            ProviderError::Unauthorized { .. }
            | ProviderError::BadParameter { .. }
            | ProviderError::NotFound { .. }
            | ProviderError::InvalidState { .. }
            | ProviderError::Refused { .. }
            | ProviderError::Protocol { .. } => false,
        }
    }

    /// Whether a mutating request that returned this error may nevertheless have been applied
    /// (reply lost, timeout after the server acted). The caller must look the resource up
    /// (by the name it chose) before issuing again.
    pub fn may_have_applied(&self) -> bool {
        matches!(
            self,
            ProviderError::Internal { .. } | ProviderError::Unavailable { .. } | ProviderError::Protocol { .. }
        )
    }

    /// What an uncertain error (one that [`may_have_applied`](Self::may_have_applied)) becomes
    /// when a look-up then finds nothing of `what`: the request was most likely not applied, so
    /// it may be made again. Unknown is not failed: this is always retryable.
    pub fn unconfirmed(self, what: &str) -> ProviderError {
        ProviderError::Unavailable {
            detail: format!("{what} not found after an uncertain reply ({self})"),
        }
    }

    /// Maps a CloudStack `errorcode` (= HTTP status of a sync error) to its variant.
    pub fn from_cloudstack_code(code: u16, errortext: String) -> Self {
        match code {
            401 | 411 => ProviderError::Unauthorized { errortext },
            405 | 430 | 431 | 432 => ProviderError::BadParameter { code, errortext },
            536 => ProviderError::InvalidState { code, errortext },
            429 | 503 | 533 | 534 | 535 => ProviderError::Unavailable {
                detail: format!("{code}: {errortext}"),
            },
            530 => ProviderError::Internal { code, errortext },
            c if c >= 500 && !(531..=537).contains(&c) => ProviderError::Internal { code, errortext },
            _ => ProviderError::Refused { code, errortext },
        }
    }
}

/// A transport error described without its URL (a signed URL carries the API key and the
/// signature).
/// The HTTP client of a provider: `timeout` per request, and `ca_pem` (PEM, one or more
/// certificates) trusted besides the public roots.
pub(crate) fn http_client(timeout: std::time::Duration, ca_pem: Option<&[u8]>) -> Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder().timeout(timeout);
    if let Some(pem) = ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| ProviderError::Protocol {
            detail: format!("the CA certificate file is not PEM: {e}"),
        })?;
        if certs.is_empty() {
            return Err(ProviderError::Protocol {
                detail: "the CA certificate file holds no certificate".into(),
            });
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(transport_error)
}

/// Runs one request to `provider` in a span of its own (a child of the step's; the request
/// may record `job_id` on it) and records its outcome and duration
/// (`tern_cloud_requests_total`, `tern_cloud_request_duration_seconds`).
pub(crate) async fn measured<T>(
    provider: &'static str,
    command: &str,
    request: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    use tracing::Instrument;
    let span = tracing::info_span!(
        "cloud",
        otel.name = %format!("{provider} {command}"),
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        provider,
        command,
        job_id = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    let started = std::time::Instant::now();
    let result = request.instrument(span.clone()).await;
    let outcome = result.as_ref().map_or_else(ProviderError::kind, |_| "ok");
    span.record("outcome", outcome);
    if result.is_err() {
        span.record("otel.status_code", "ERROR");
    }
    crate::telemetry::metrics::cloud_request(provider, command, outcome, started.elapsed());
    result
}

pub(crate) fn transport_error(e: reqwest::Error) -> ProviderError {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_decode() || e.is_body() {
        "reading the reply failed"
    } else {
        "request failed"
    };
    let mut detail = kind.to_string();
    let e = e.without_url();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    ProviderError::Unavailable { detail }
}

/// The CloudStack operations a failover needs.
#[async_trait]
pub trait Cloud: Send + Sync {
    /// Issues an async command and returns its job at once. Not idempotent: after an error
    /// with [`ProviderError::may_have_applied`], look the resource up before issuing again.
    async fn issue(&self, cmd: AsyncCommand) -> Result<JobRef>;

    /// One `queryAsyncJobResult`.
    async fn poll_job(&self, job_id: &str) -> Result<JobStatus>;

    /// Polls until the job ends: its `jobresult` on success, [`ProviderError::AsyncJobFailed`]
    /// on failure, [`ProviderError::JobTimeout`] if it is still pending (or every poll failed
    /// with a retryable error) after `timeout`.
    async fn wait_job(&self, job_id: &str, poll_interval: Duration, timeout: Duration) -> Result<serde_json::Value> {
        let started = tokio::time::Instant::now();
        loop {
            match self.poll_job(job_id).await {
                Ok(JobStatus::Succeeded(v)) => return Ok(v),
                Ok(JobStatus::Failed { errorcode, errortext }) => {
                    return Err(ProviderError::AsyncJobFailed {
                        job_id: job_id.to_string(),
                        errorcode,
                        errortext,
                    })
                }
                Ok(JobStatus::Pending) => {}
                // Polling is read-only, so a transient failure is simply polled through.
                Err(e) if e.is_retryable() => {
                    tracing::warn!(job_id, error = %e, "polling the async job failed; polling again");
                }
                Err(e) => return Err(e),
            }
            let waited = started.elapsed();
            if waited >= timeout {
                return Err(ProviderError::JobTimeout {
                    job_id: job_id.to_string(),
                    waited,
                });
            }
            tokio::time::sleep(poll_interval.min(timeout - waited)).await;
        }
    }

    async fn list_vms(&self, filter: VmFilter) -> Result<Vec<Vm>>;

    /// [`ProviderError::NotFound`] if no VM has this id.
    async fn get_vm(&self, id: &str) -> Result<Vm> {
        self.list_vms(VmFilter::id(id))
            .await?
            .into_iter()
            .find(|v| v.id == id)
            .ok_or_else(|| ProviderError::NotFound {
                what: format!("virtual machine {id}"),
            })
    }

    async fn list_volumes(&self, filter: VolumeFilter) -> Result<Vec<Volume>>;

    /// [`ProviderError::NotFound`] if no volume has this id.
    async fn get_volume(&self, id: &str) -> Result<Volume> {
        self.list_volumes(VolumeFilter::id(id))
            .await?
            .into_iter()
            .find(|v| v.id == id)
            .ok_or_else(|| ProviderError::NotFound {
                what: format!("volume {id}"),
            })
    }

    async fn list_snapshots(&self, filter: SnapshotFilter) -> Result<Vec<Snapshot>>;

    /// The network with this id, or None if CloudStack knows none.
    async fn find_network(&self, id: &str) -> Result<Option<Network>>;

    /// The compute offering with this id, or None if CloudStack knows none.
    async fn find_service_offering(&self, id: &str) -> Result<Option<ServiceOffering>>;

    async fn list_vm_snapshots(&self, vm_id: &str) -> Result<Vec<VmSnapshot>>;

    /// Synchronous `deleteVolume` (the volume must be detached).
    async fn delete_volume(&self, id: &str) -> Result<()>;
}

/// Which [`SnapshotBackend`] protects a replicated volume, as configuration names it
/// (`cloudstack-volume`, `cloudstack-vm`, `linstor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotKind {
    /// CloudStack volume snapshots; target = the volume id.
    CloudstackVolume,
    /// CloudStack disk-only VM snapshots; target = the id of the VM the volumes are attached to
    /// when it is taken (a failover's new VM, never the OMA).
    CloudstackVm,
    /// LINSTOR snapshots; target = the volume's resource definition (`cs-<volume id>`).
    Linstor,
}

impl SnapshotKind {
    /// The backend target protecting `volume_id`, attached to `vm_id` when the snapshot is
    /// taken.
    pub fn target(self, volume_id: &str, vm_id: &str) -> String {
        match self {
            SnapshotKind::CloudstackVolume => volume_id.to_string(),
            SnapshotKind::CloudstackVm => vm_id.to_string(),
            SnapshotKind::Linstor => linstor::resource_name_for_volume(volume_id),
        }
    }
}

impl std::str::FromStr for SnapshotKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "cloudstack-volume" => Ok(SnapshotKind::CloudstackVolume),
            "cloudstack-vm" => Ok(SnapshotKind::CloudstackVm),
            "linstor" => Ok(SnapshotKind::Linstor),
            other => Err(format!(
                "unknown snapshot backend {other:?} (cloudstack-volume, cloudstack-vm, linstor)"
            )),
        }
    }
}

/// A snapshot as a [`SnapshotBackend`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The caller-chosen name.
    pub name: String,
    /// The backend's own id (CloudStack uuid; for LINSTOR the name again).
    pub id: String,
    /// What was snapshotted: volume id, VM id or LINSTOR resource definition.
    pub target: String,
    /// Complete and usable for a revert.
    pub ready: bool,
}

/// Named snapshots of one target, used to protect a volume before a failover writes to it
/// and to undo those writes. `target` is whatever the backend snapshots: a CloudStack volume
/// id ([`cloudstack::VolumeSnapshots`]), a VM id ([`cloudstack::VmSnapshots`]), a LINSTOR
/// resource definition ([`linstor::LinstorClient`]).
#[async_trait]
pub trait SnapshotBackend: Send + Sync {
    /// A short name for logs; the same as the [`SnapshotKind`] it implements
    /// ("cloudstack-volume", "cloudstack-vm", "linstor").
    fn kind(&self) -> &'static str;

    /// Creates the snapshot `name` of `target` and waits until it is ready. Idempotent: if a
    /// snapshot with this name already exists it is adopted (waiting for it if needed).
    async fn create(&self, target: &str, name: &str) -> Result<SnapshotInfo>;

    /// The snapshot called `name`, if any.
    async fn find(&self, target: &str, name: &str) -> Result<Option<SnapshotInfo>> {
        Ok(self.list(target).await?.into_iter().find(|s| s.name == name))
    }

    /// Restores `target` to the snapshot's content. [`ProviderError::NotFound`] if it does
    /// not exist.
    async fn revert(&self, target: &str, name: &str) -> Result<()>;

    /// Deletes the snapshot. Idempotent: a missing snapshot is success.
    async fn delete(&self, target: &str, name: &str) -> Result<()>;

    async fn list(&self, target: &str) -> Result<Vec<SnapshotInfo>>;

    /// Creates the snapshot `name` of every target (a VM's disks), adopting any that exists.
    /// Where the backend can take them at one instant it does, and says so (`consistent`);
    /// by default they are taken one after the other.
    async fn create_group(&self, targets: &[String], name: &str) -> Result<GroupSnapshot> {
        let mut snapshots = Vec::new();
        for target in targets {
            snapshots.push(self.create(target, name).await?);
        }
        Ok(GroupSnapshot {
            snapshots,
            consistent: targets.len() <= 1,
        })
    }
}

/// The snapshots [`SnapshotBackend::create_group`] took, in the targets' order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSnapshot {
    pub snapshots: Vec<SnapshotInfo>,
    /// Taken at one instant (crash-consistent across the targets).
    pub consistent: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_classification_is_by_type_and_code() {
        let failed = |errorcode| ProviderError::AsyncJobFailed {
            job_id: "j".into(),
            errorcode,
            errortext: "x".into(),
        };
        assert!(failed(530).is_retryable());
        assert!(failed(534).is_retryable());
        assert!(!failed(431).is_retryable());
        assert!(ProviderError::from_cloudstack_code(530, "x".into()).is_retryable());
        assert!(ProviderError::from_cloudstack_code(533, "x".into()).is_retryable());
        for code in [401, 431, 432, 531, 532, 536] {
            assert!(
                !ProviderError::from_cloudstack_code(code, "x".into()).is_retryable(),
                "{code}"
            );
        }
        assert!(matches!(
            ProviderError::from_cloudstack_code(536, "x".into()),
            ProviderError::InvalidState { .. }
        ));
    }

    #[test]
    fn snapshot_kinds_name_their_targets() {
        for (name, kind, target) in [
            ("cloudstack-volume", SnapshotKind::CloudstackVolume, "vol"),
            ("cloudstack-vm", SnapshotKind::CloudstackVm, "vm"),
            ("linstor", SnapshotKind::Linstor, "cs-vol"),
        ] {
            let parsed: SnapshotKind = name.parse().unwrap();
            assert_eq!(parsed, kind);
            assert_eq!(kind.target("vol", "vm"), target);
            assert_eq!(serde_json::to_value(kind).unwrap(), name);
        }
        assert!("zfs".parse::<SnapshotKind>().is_err());
    }
}
