//! [`SimInjector`]: the [`DriverInjector`] of the simulator ([`crate::sim`]), over HTTP.
//!
//! The simulator models a volume's content as `{generation, virtio_injected}`:
//! `GET /sim/volumes/{id}` reads it and `POST /sim/volumes/{id}/inject-virtio` sets
//! `virtio_injected` (and bumps the generation, like any write). Snapshots capture it, so a
//! revert undoes an injection as it would on a real disk.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;

use super::{check_volume_id, serial_for, DriverInjector, InjectionReport};
use crate::providers::{transport_error, ProviderError, Result};

/// The simulator's driver injector. Devices are synthetic paths
/// (`/dev/disk/by-id/virtio-<serial>`) that exist while the volume is attached to a VM.
#[derive(Debug, Clone)]
pub struct SimInjector {
    base: String,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct VolumeContentReply {
    content: ContentReply,
}

#[derive(Deserialize)]
struct ContentReply {
    generation: u64,
    virtio_injected: bool,
}

/// The part of `GET /sim/state` this injector reads.
#[derive(Deserialize)]
struct StateReply {
    volumes: std::collections::BTreeMap<String, StateVolume>,
}

#[derive(Deserialize)]
struct StateVolume {
    vm_id: Option<String>,
}

impl SimInjector {
    /// `sim_base_url` e.g. `http://127.0.0.1:8080` (the simulator's root, no path).
    pub fn new(sim_base_url: impl Into<String>, request_timeout: Duration) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(request_timeout)
            .build()
            .map_err(transport_error)?;
        Ok(SimInjector {
            base: sim_base_url.into().trim_end_matches('/').to_string(),
            http,
        })
    }

    /// The synthetic device path of a volume: `/dev/disk/by-id/virtio-<serial>`.
    pub fn device_path(volume_id: &str) -> Result<String> {
        Ok(format!("/dev/disk/by-id/virtio-{}", serial_for(volume_id)?))
    }

    /// Refuses a device that is not the volume's (a step passing the wrong value).
    fn check_device(volume_id: &str, device: &str) -> Result<()> {
        let expected = Self::device_path(volume_id)?;
        if device == expected {
            Ok(())
        } else {
            Err(ProviderError::BadParameter {
                code: 0,
                errortext: format!("{device} is not the device of volume {volume_id} (that is {expected})"),
            })
        }
    }

    async fn send<T: for<'de> Deserialize<'de>>(&self, req: reqwest::RequestBuilder, what: &str) -> Result<T> {
        let reply = req.send().await.map_err(transport_error)?;
        let status = reply.status().as_u16();
        let body = reply.text().await.map_err(transport_error)?;
        match status {
            200..=299 => serde_json::from_str(&body).map_err(|e| ProviderError::Protocol {
                detail: format!("simulator reply for {what}: {e}"),
            }),
            404 => Err(ProviderError::NotFound { what: what.to_string() }),
            429 | 502 | 503 | 504 => Err(ProviderError::Unavailable {
                detail: format!("{status} for {what}"),
            }),
            500..=599 => Err(ProviderError::Internal {
                code: status,
                errortext: format!("simulator failed on {what}: {body}"),
            }),
            _ => Err(ProviderError::Protocol {
                detail: format!("unexpected status {status} for {what}: {body}"),
            }),
        }
    }

    async fn content(&self, volume_id: &str) -> Result<ContentReply> {
        let url = format!("{}/sim/volumes/{volume_id}", self.base);
        let reply: VolumeContentReply = self.send(self.http.get(url), &format!("volume {volume_id}")).await?;
        Ok(reply.content)
    }
}

#[async_trait]
impl DriverInjector for SimInjector {
    /// The volume must exist and be attached to a VM (on a real OMA, a detached volume has no
    /// device); otherwise [`ProviderError::NotFound`].
    async fn device_for(&self, volume_id: &str) -> Result<String> {
        let device = Self::device_path(volume_id)?;
        let state: StateReply = self
            .send(self.http.get(format!("{}/sim/state", self.base)), "simulator state")
            .await?;
        match state.volumes.get(volume_id) {
            None => Err(ProviderError::NotFound {
                what: format!("volume {volume_id}"),
            }),
            Some(StateVolume { vm_id: None }) => Err(ProviderError::NotFound {
                what: format!("device of volume {volume_id} (the volume is not attached)"),
            }),
            Some(StateVolume { vm_id: Some(_) }) => Ok(device),
        }
    }

    async fn is_injected(&self, volume_id: &str, device: &str) -> Result<bool> {
        check_volume_id(volume_id)?;
        Self::check_device(volume_id, device)?;
        Ok(self.content(volume_id).await?.virtio_injected)
    }

    async fn inject(&self, volume_id: &str, device: &str) -> Result<InjectionReport> {
        check_volume_id(volume_id)?;
        Self::check_device(volume_id, device)?;
        let started = Instant::now();
        let url = format!("{}/sim/volumes/{volume_id}/inject-virtio", self.base);
        let reply: VolumeContentReply = self.send(self.http.post(url), &format!("volume {volume_id}")).await?;
        Ok(InjectionReport {
            output: format!(
                "simulator: VirtIO drivers injected into {device} (volume {volume_id}, content generation {})\n",
                reply.content.generation
            ),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }
}
