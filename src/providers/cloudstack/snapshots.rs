//! CloudStack volume snapshots and VM snapshots as [`SnapshotBackend`]s.
//!
//! Both adopt by name: `create` first looks for a snapshot with the caller's name, and after
//! an error that may hide an applied request (lost reply, timeout) looks again before giving
//! up, so a retried or resumed step never makes a second snapshot. A snapshot with that name
//! left in `Error` by a failed attempt is deleted and made again.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::providers::{
    AsyncCommand, Cloud, ProviderError, Result, Snapshot, SnapshotBackend, SnapshotFilter, SnapshotInfo, VmSnapshot,
};

/// How long the backends wait for jobs and for adopted snapshots to become ready.
#[derive(Debug, Clone, Copy)]
pub struct Waiting {
    pub poll_interval: Duration,
    pub timeout: Duration,
}

impl Default for Waiting {
    fn default() -> Self {
        Waiting {
            poll_interval: Duration::from_secs(2),
            timeout: Duration::from_secs(30 * 60),
        }
    }
}

/// One snapshot as a flavour lists it.
pub struct Listed {
    id: String,
    name: String,
    state: String,
    target: String,
}

/// What differs between CloudStack's volume snapshots and its VM snapshots: how they are
/// listed, made, reverted and deleted, and which state means ready.
#[async_trait]
pub trait Flavour: Send + Sync + 'static {
    /// The [`SnapshotBackend::kind`].
    const KIND: &'static str;
    /// The state of a snapshot that can be reverted to.
    const READY: &'static str;
    /// For messages: "snapshot {name} of volume {target}".
    fn describe(name: &str, target: &str) -> String;
    /// Snapshots of `target`, with `name` only when given (CloudStack may filter by it).
    async fn list(cloud: &dyn Cloud, target: &str, name: Option<&str>) -> Result<Vec<Listed>>;
    fn create(target: &str, name: &str) -> AsyncCommand;
    fn revert(id: String) -> AsyncCommand;
    fn delete(id: String) -> AsyncCommand;
}

/// Volume snapshots (`target` = volume id); ready when `BackedUp`.
pub struct Volumes;

#[async_trait]
impl Flavour for Volumes {
    const KIND: &'static str = "cloudstack-volume";
    const READY: &'static str = "BackedUp";

    fn describe(name: &str, target: &str) -> String {
        format!("snapshot {name} of volume {target}")
    }

    async fn list(cloud: &dyn Cloud, target: &str, name: Option<&str>) -> Result<Vec<Listed>> {
        let filter = SnapshotFilter {
            volume_id: Some(target.to_string()),
            name: name.map(str::to_string),
            id: None,
        };
        let all: Vec<Snapshot> = cloud.list_snapshots(filter).await?;
        Ok(all
            .into_iter()
            .map(|s| Listed {
                id: s.id,
                name: s.name,
                state: s.state,
                target: s.volume_id,
            })
            .collect())
    }

    fn create(target: &str, name: &str) -> AsyncCommand {
        AsyncCommand::CreateSnapshot {
            volume_id: target.to_string(),
            name: name.to_string(),
        }
    }

    fn revert(id: String) -> AsyncCommand {
        AsyncCommand::RevertSnapshot { id }
    }

    fn delete(id: String) -> AsyncCommand {
        AsyncCommand::DeleteSnapshot { id }
    }
}

/// Disk-only VM snapshots (`target` = VM id); ready when `Ready`.
pub struct VmDisks;

#[async_trait]
impl Flavour for VmDisks {
    const KIND: &'static str = "cloudstack-vm";
    const READY: &'static str = "Ready";

    fn describe(name: &str, target: &str) -> String {
        format!("VM snapshot {name} of VM {target}")
    }

    async fn list(cloud: &dyn Cloud, target: &str, _name: Option<&str>) -> Result<Vec<Listed>> {
        let all: Vec<VmSnapshot> = cloud.list_vm_snapshots(target).await?;
        Ok(all
            .into_iter()
            .map(|s| Listed {
                id: s.id,
                name: s.name,
                state: s.state,
                target: s.vm_id,
            })
            .collect())
    }

    fn create(target: &str, name: &str) -> AsyncCommand {
        AsyncCommand::CreateVmSnapshot {
            vm_id: target.to_string(),
            name: name.to_string(),
        }
    }

    fn revert(id: String) -> AsyncCommand {
        AsyncCommand::RevertToVmSnapshot { id }
    }

    fn delete(id: String) -> AsyncCommand {
        AsyncCommand::DeleteVmSnapshot { id }
    }
}

/// CloudStack volume snapshots as a [`SnapshotBackend`].
pub type VolumeSnapshots = CloudSnapshots<Volumes>;
/// CloudStack disk-only VM snapshots as a [`SnapshotBackend`].
pub type VmSnapshots = CloudSnapshots<VmDisks>;

/// Named CloudStack snapshots of one flavour.
pub struct CloudSnapshots<F> {
    cloud: Arc<dyn Cloud>,
    waiting: Waiting,
    flavour: std::marker::PhantomData<F>,
}

impl<F: Flavour> CloudSnapshots<F> {
    pub fn new(cloud: Arc<dyn Cloud>, poll_interval: Duration, timeout: Duration) -> Self {
        CloudSnapshots {
            cloud,
            waiting: Waiting { poll_interval, timeout },
            flavour: std::marker::PhantomData,
        }
    }

    async fn by_name(&self, target: &str, name: &str) -> Result<Option<Listed>> {
        let found = F::list(self.cloud.as_ref(), target, Some(name)).await?;
        Ok(found.into_iter().find(|s| s.name == name))
    }

    async fn adopt(&self, target: &str, name: &str) -> Result<Option<SnapshotInfo>> {
        let started = tokio::time::Instant::now();
        loop {
            let Some(s) = self.by_name(target, name).await? else {
                return Ok(None);
            };
            if s.state == F::READY {
                return Ok(Some(info::<F>(s)));
            }
            if s.state == "Error" {
                // A failed earlier attempt: clear it so the name can be used again.
                tracing::warn!(name, target, kind = F::KIND, "removing a snapshot left in Error");
                self.run(F::delete(s.id)).await?;
                return Ok(None);
            }
            if started.elapsed() >= self.waiting.timeout {
                return Err(ProviderError::JobTimeout {
                    job_id: F::describe(name, target),
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(self.waiting.poll_interval).await;
        }
    }

    async fn run(&self, cmd: AsyncCommand) -> Result<serde_json::Value> {
        let job = self.cloud.issue(cmd).await?;
        self.cloud
            .wait_job(&job.job_id, self.waiting.poll_interval, self.waiting.timeout)
            .await
    }
}

fn info<F: Flavour>(s: Listed) -> SnapshotInfo {
    SnapshotInfo {
        ready: s.state == F::READY,
        name: s.name,
        id: s.id,
        target: s.target,
    }
}

#[async_trait]
impl<F: Flavour> SnapshotBackend for CloudSnapshots<F> {
    fn kind(&self) -> &'static str {
        F::KIND
    }

    async fn create(&self, target: &str, name: &str) -> Result<SnapshotInfo> {
        if let Some(found) = self.adopt(target, name).await? {
            return Ok(found);
        }
        let uncertain = match self.run(F::create(target, name)).await {
            Ok(_) => None,
            Err(e) if e.may_have_applied() => {
                tracing::warn!(error = %e, name, kind = F::KIND, "the snapshot may have been made; looking it up");
                Some(e)
            }
            Err(e) => return Err(e),
        };
        match (self.adopt(target, name).await?, uncertain) {
            (Some(found), _) => Ok(found),
            (None, Some(e)) => Err(e.unconfirmed(&F::describe(name, target))),
            (None, None) => Err(ProviderError::Protocol {
                detail: format!("{} missing after it was made", F::describe(name, target)),
            }),
        }
    }

    async fn revert(&self, target: &str, name: &str) -> Result<()> {
        let s = self
            .by_name(target, name)
            .await?
            .ok_or_else(|| ProviderError::NotFound {
                what: F::describe(name, target),
            })?;
        self.run(F::revert(s.id)).await?;
        Ok(())
    }

    async fn delete(&self, target: &str, name: &str) -> Result<()> {
        let Some(s) = self.by_name(target, name).await? else {
            return Ok(());
        };
        self.run(F::delete(s.id)).await?;
        Ok(())
    }

    async fn list(&self, target: &str) -> Result<Vec<SnapshotInfo>> {
        let all = F::list(self.cloud.as_ref(), target, None).await?;
        Ok(all.into_iter().map(info::<F>).collect())
    }
}
