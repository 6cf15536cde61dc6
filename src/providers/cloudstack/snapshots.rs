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

/// Snapshots of one CloudStack volume (`target` = volume id); ready when `BackedUp`.
#[derive(Clone)]
pub struct VolumeSnapshots {
    cloud: Arc<dyn Cloud>,
    waiting: Waiting,
}

impl VolumeSnapshots {
    pub fn new(cloud: Arc<dyn Cloud>, poll_interval: Duration, timeout: Duration) -> Self {
        VolumeSnapshots {
            cloud,
            waiting: Waiting { poll_interval, timeout },
        }
    }

    async fn by_name(&self, volume_id: &str, name: &str) -> Result<Option<Snapshot>> {
        let found = self
            .cloud
            .list_snapshots(SnapshotFilter {
                volume_id: Some(volume_id.to_string()),
                name: Some(name.to_string()),
                id: None,
            })
            .await?;
        Ok(found.into_iter().find(|s| s.name == name))
    }

    async fn adopt(&self, volume_id: &str, name: &str) -> Result<Option<SnapshotInfo>> {
        let started = tokio::time::Instant::now();
        loop {
            let Some(s) = self.by_name(volume_id, name).await? else {
                return Ok(None);
            };
            match s.state.as_str() {
                "BackedUp" => return Ok(Some(volume_info(s))),
                "Error" => {
                    // A failed earlier attempt: clear it so the name can be used again.
                    tracing::warn!(name, volume_id, "removing a snapshot left in Error");
                    self.run(AsyncCommand::DeleteSnapshot { id: s.id }).await?;
                    return Ok(None);
                }
                _ => {}
            }
            if started.elapsed() >= self.waiting.timeout {
                return Err(ProviderError::JobTimeout {
                    job_id: format!("snapshot {name}"),
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

fn volume_info(s: Snapshot) -> SnapshotInfo {
    SnapshotInfo {
        ready: s.state == "BackedUp",
        name: s.name,
        id: s.id,
        target: s.volume_id,
    }
}

#[async_trait]
impl SnapshotBackend for VolumeSnapshots {
    fn kind(&self) -> &'static str {
        "cloudstack-volume"
    }

    async fn create(&self, target: &str, name: &str) -> Result<SnapshotInfo> {
        if let Some(found) = self.adopt(target, name).await? {
            return Ok(found);
        }
        let cmd = AsyncCommand::CreateSnapshot {
            volume_id: target.to_string(),
            name: name.to_string(),
        };
        let uncertain = match self.run(cmd).await {
            Ok(_) => None,
            Err(e) if e.may_have_applied() => {
                tracing::warn!(error = %e, name, "createSnapshot may have been applied; looking it up");
                Some(e)
            }
            Err(e) => return Err(e),
        };
        match (self.adopt(target, name).await?, uncertain) {
            (Some(found), _) => Ok(found),
            (None, Some(e)) => Err(e.unconfirmed(&format!("snapshot {name} of volume {target}"))),
            (None, None) => Err(ProviderError::Protocol {
                detail: format!("snapshot {name} of volume {target} missing after createSnapshot succeeded"),
            }),
        }
    }

    async fn revert(&self, target: &str, name: &str) -> Result<()> {
        let s = self
            .by_name(target, name)
            .await?
            .ok_or_else(|| ProviderError::NotFound {
                what: format!("snapshot {name} of volume {target}"),
            })?;
        self.run(AsyncCommand::RevertSnapshot { id: s.id }).await?;
        Ok(())
    }

    async fn delete(&self, target: &str, name: &str) -> Result<()> {
        let Some(s) = self.by_name(target, name).await? else {
            return Ok(());
        };
        self.run(AsyncCommand::DeleteSnapshot { id: s.id }).await?;
        Ok(())
    }

    async fn list(&self, target: &str) -> Result<Vec<SnapshotInfo>> {
        let all = self
            .cloud
            .list_snapshots(SnapshotFilter {
                volume_id: Some(target.to_string()),
                ..Default::default()
            })
            .await?;
        Ok(all.into_iter().map(volume_info).collect())
    }
}

/// Disk-only snapshots of one CloudStack VM (`target` = VM id); ready when `Ready`.
#[derive(Clone)]
pub struct VmSnapshots {
    cloud: Arc<dyn Cloud>,
    waiting: Waiting,
}

impl VmSnapshots {
    pub fn new(cloud: Arc<dyn Cloud>, poll_interval: Duration, timeout: Duration) -> Self {
        VmSnapshots {
            cloud,
            waiting: Waiting { poll_interval, timeout },
        }
    }

    async fn by_name(&self, vm_id: &str, name: &str) -> Result<Option<VmSnapshot>> {
        let all = self.cloud.list_vm_snapshots(vm_id).await?;
        Ok(all.into_iter().find(|s| s.name == name))
    }

    async fn adopt(&self, vm_id: &str, name: &str) -> Result<Option<SnapshotInfo>> {
        let started = tokio::time::Instant::now();
        loop {
            let Some(s) = self.by_name(vm_id, name).await? else {
                return Ok(None);
            };
            match s.state.as_str() {
                "Ready" => return Ok(Some(vm_info(s))),
                "Error" => {
                    // A failed earlier attempt: clear it so the name can be used again.
                    tracing::warn!(name, vm_id, "removing a VM snapshot left in Error");
                    self.run(AsyncCommand::DeleteVmSnapshot { id: s.id }).await?;
                    return Ok(None);
                }
                _ => {}
            }
            if started.elapsed() >= self.waiting.timeout {
                return Err(ProviderError::JobTimeout {
                    job_id: format!("VM snapshot {name}"),
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

fn vm_info(s: VmSnapshot) -> SnapshotInfo {
    SnapshotInfo {
        ready: s.state == "Ready",
        name: s.name,
        id: s.id,
        target: s.vm_id,
    }
}

#[async_trait]
impl SnapshotBackend for VmSnapshots {
    fn kind(&self) -> &'static str {
        "cloudstack-vm"
    }

    async fn create(&self, target: &str, name: &str) -> Result<SnapshotInfo> {
        if let Some(found) = self.adopt(target, name).await? {
            return Ok(found);
        }
        let cmd = AsyncCommand::CreateVmSnapshot {
            vm_id: target.to_string(),
            name: name.to_string(),
        };
        let uncertain = match self.run(cmd).await {
            Ok(_) => None,
            Err(e) if e.may_have_applied() => {
                tracing::warn!(error = %e, name, "createVMSnapshot may have been applied; looking it up");
                Some(e)
            }
            Err(e) => return Err(e),
        };
        match (self.adopt(target, name).await?, uncertain) {
            (Some(found), _) => Ok(found),
            (None, Some(e)) => Err(e.unconfirmed(&format!("VM snapshot {name} of VM {target}"))),
            (None, None) => Err(ProviderError::Protocol {
                detail: format!("VM snapshot {name} of VM {target} missing after createVMSnapshot succeeded"),
            }),
        }
    }

    async fn revert(&self, target: &str, name: &str) -> Result<()> {
        let s = self
            .by_name(target, name)
            .await?
            .ok_or_else(|| ProviderError::NotFound {
                what: format!("VM snapshot {name} of VM {target}"),
            })?;
        self.run(AsyncCommand::RevertToVmSnapshot { id: s.id }).await?;
        Ok(())
    }

    async fn delete(&self, target: &str, name: &str) -> Result<()> {
        let Some(s) = self.by_name(target, name).await? else {
            return Ok(());
        };
        self.run(AsyncCommand::DeleteVmSnapshot { id: s.id }).await?;
        Ok(())
    }

    async fn list(&self, target: &str) -> Result<Vec<SnapshotInfo>> {
        let all = self.cloud.list_vm_snapshots(target).await?;
        Ok(all.into_iter().map(vm_info).collect())
    }
}
