//! The LINSTOR controller REST client (default port 3370), used as a [`SnapshotBackend`]
//! whose target is a resource definition (the CloudStack LINSTOR plugin names a volume's
//! resource definition `cs-<volume uuid>`; see [`resource_name_for_volume`]).
//!
//! Mutating calls answer a JSON array of ApiCallRc objects (`{"ret_code": i64, "message":
//! …}`). A `ret_code` whose two top bits are both set (`0xC000_0000_0000_0000`) is an error
//! even when the HTTP status is 2xx. The low 15 bits are LINSTOR's code: 300-399 are
//! "not found" codes (`FAIL_NOT_FOUND_*`), 400-499 "already exists" (`FAIL_EXISTS_*`), 600-699
//! "in use"; everything else is treated as an internal error.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::cloudstack::sign::java_url_encode;
use super::{transport_error, GroupSnapshot, ProviderError, Result, SnapshotBackend, SnapshotInfo};

pub const MASK_ERROR: u64 = 0xC000_0000_0000_0000;
const MASK_CODE: u64 = 0x7FFF;

/// The resource definition the CloudStack LINSTOR plugin creates for a volume.
pub fn resource_name_for_volume(volume_id: &str) -> String {
    format!("cs-{volume_id}")
}

/// One ApiCallRc of a LINSTOR reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiCallRc {
    pub ret_code: i64,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
}

impl ApiCallRc {
    pub fn is_error(&self) -> bool {
        (self.ret_code as u64) & MASK_ERROR == MASK_ERROR
    }
    fn code(&self) -> u64 {
        (self.ret_code as u64) & MASK_CODE
    }
}

/// A snapshot as `GET …/snapshots` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinstorSnapshot {
    pub name: String,
    pub resource_name: String,
    #[serde(default)]
    pub flags: Vec<String>,
}

impl LinstorSnapshot {
    pub fn is_successful(&self) -> bool {
        self.flags.iter().any(|f| f == "SUCCESSFUL")
    }
}

/// A LINSTOR controller client.
#[derive(Debug, Clone)]
pub struct LinstorClient {
    base: String,
    http: reqwest::Client,
    waiting: (Duration, Duration),
}

impl LinstorClient {
    /// `base_url` e.g. `http://linstor-controller:3370` (no trailing `/v1`).
    pub fn new(base_url: impl Into<String>, request_timeout: Duration) -> Result<Self> {
        Self::with_ca(base_url, request_timeout, None)
    }

    /// [`LinstorClient::new`] trusting the CA certificate `ca_pem` (PEM) besides the public roots.
    pub fn with_ca(base_url: impl Into<String>, request_timeout: Duration, ca_pem: Option<&[u8]>) -> Result<Self> {
        let http = super::http_client(request_timeout, ca_pem)?;
        Ok(LinstorClient {
            base: base_url.into().trim_end_matches('/').to_string(),
            http,
            waiting: (Duration::from_millis(500), Duration::from_secs(600)),
        })
    }

    /// How `create` polls a snapshot that exists but is not yet SUCCESSFUL.
    pub fn with_waiting(mut self, poll_interval: Duration, timeout: Duration) -> Self {
        self.waiting = (poll_interval, timeout);
        self
    }

    fn url(&self, rsc: &str, rest: &str) -> String {
        format!("{}/v1/resource-definitions/{}{rest}", self.base, java_url_encode(rsc))
    }

    pub async fn create_snapshot(&self, rsc: &str, snap: &str) -> Result<()> {
        let req = self
            .http
            .post(self.url(rsc, "/snapshots"))
            .json(&serde_json::json!({ "name": snap }));
        self.mutate("linstor.createSnapshot", req, rsc).await
    }

    /// Snapshots several resource definitions at one instant (LINSTOR suspends I/O on all of
    /// them, takes every snapshot, then resumes): `POST /v1/actions/snapshot/multi`.
    pub async fn create_multi_snapshot(&self, rscs: &[String], snap: &str) -> Result<()> {
        let snapshots: Vec<serde_json::Value> = rscs
            .iter()
            .map(|r| serde_json::json!({ "resource_name": r, "name": snap }))
            .collect();
        let req = self
            .http
            .post(format!("{}/v1/actions/snapshot/multi", self.base))
            .json(&serde_json::json!({ "snapshots": snapshots }));
        self.mutate("linstor.createMultiSnapshot", req, &rscs.join(",")).await
    }

    pub async fn rollback_snapshot(&self, rsc: &str, snap: &str) -> Result<()> {
        let path = format!("/snapshot-rollback/{}", java_url_encode(snap));
        self.mutate("linstor.rollbackSnapshot", self.http.post(self.url(rsc, &path)), rsc)
            .await
    }

    pub async fn delete_snapshot(&self, rsc: &str, snap: &str) -> Result<()> {
        let path = format!("/snapshots/{}", java_url_encode(snap));
        self.mutate("linstor.deleteSnapshot", self.http.delete(self.url(rsc, &path)), rsc)
            .await
    }

    pub async fn list_snapshots(&self, rsc: &str) -> Result<Vec<LinstorSnapshot>> {
        super::measured("linstor", "linstor.listSnapshots", self.read_snapshots(rsc)).await
    }

    async fn read_snapshots(&self, rsc: &str) -> Result<Vec<LinstorSnapshot>> {
        crate::crash::point("cloud_call/linstor.listSnapshots");
        let reply = self
            .http
            .get(self.url(rsc, "/snapshots"))
            .send()
            .await
            .map_err(transport_error)?;
        let status = reply.status().as_u16();
        let body = reply.text().await.map_err(transport_error)?;
        crate::crash::point("cloud_answered/linstor.listSnapshots");
        if !(200..300).contains(&status) {
            return Err(error_from(status, &body, rsc));
        }
        serde_json::from_str(&body).map_err(|e| {
            // A controller may answer a failed list with its error list (ApiCallRc) and 200.
            match serde_json::from_str::<Vec<ApiCallRc>>(&body)
                .ok()
                .and_then(|rcs| rcs.into_iter().find(ApiCallRc::is_error))
            {
                Some(rc) => error_of_rc(&rc, status),
                None => ProviderError::Protocol {
                    detail: format!("LINSTOR snapshot list of {rsc}: {e}"),
                },
            }
        })
    }

    /// Sends a mutating request (`op` names it for crash points) and reads its ApiCallRc list.
    async fn mutate(&self, op: &str, req: reqwest::RequestBuilder, rsc: &str) -> Result<()> {
        super::measured("linstor", op, self.send_mutation(op, req, rsc)).await
    }

    async fn send_mutation(&self, op: &str, req: reqwest::RequestBuilder, rsc: &str) -> Result<()> {
        crate::crash::point_of("cloud_call", op);
        let reply = req.send().await.map_err(transport_error)?;
        let status = reply.status().as_u16();
        let body = reply.text().await.map_err(transport_error)?;
        crate::crash::point_of("cloud_answered", op);
        if !(200..300).contains(&status) {
            return Err(error_from(status, &body, rsc));
        }
        let rcs: Vec<ApiCallRc> = serde_json::from_str(&body).map_err(|e| ProviderError::Protocol {
            detail: format!("LINSTOR reply for {rsc}: {e}"),
        })?;
        match rcs.iter().find(|rc| rc.is_error()) {
            Some(rc) => Err(error_of_rc(rc, status)),
            None => Ok(()),
        }
    }
}

fn error_of_rc(rc: &ApiCallRc, status: u16) -> ProviderError {
    let errortext = rc.message.clone();
    match rc.code() {
        300..=399 => ProviderError::NotFound { what: errortext },
        400..=499 | 600..=699 => ProviderError::InvalidState {
            code: status,
            errortext,
        },
        _ => ProviderError::Internal {
            code: status,
            errortext,
        },
    }
}

fn error_from(status: u16, body: &str, rsc: &str) -> ProviderError {
    let rc = serde_json::from_str::<Vec<ApiCallRc>>(body)
        .ok()
        .and_then(|v| v.into_iter().find(|rc| rc.is_error()));
    let errortext = rc
        .as_ref()
        .map(|rc| rc.message.clone())
        .unwrap_or_else(|| format!("HTTP {status} for resource definition {rsc}"));
    match status {
        404 => ProviderError::NotFound { what: errortext },
        400 | 422 => ProviderError::BadParameter {
            code: status,
            errortext,
        },
        401 | 403 => ProviderError::Unauthorized { errortext },
        409 => ProviderError::InvalidState {
            code: status,
            errortext,
        },
        429 | 502 | 503 | 504 => ProviderError::Unavailable {
            detail: format!("{status}: {errortext}"),
        },
        _ => match rc {
            Some(rc) => error_of_rc(&rc, status),
            None => ProviderError::Internal {
                code: status,
                errortext,
            },
        },
    }
}

fn info(rsc: &str, s: LinstorSnapshot) -> SnapshotInfo {
    SnapshotInfo {
        ready: s.is_successful(),
        id: s.name.clone(),
        name: s.name,
        target: rsc.to_string(),
    }
}

#[async_trait]
impl SnapshotBackend for LinstorClient {
    fn kind(&self) -> &'static str {
        "linstor"
    }

    async fn create(&self, target: &str, name: &str) -> Result<SnapshotInfo> {
        let started = tokio::time::Instant::now();
        let mut requested = false;
        let mut uncertain: Option<ProviderError> = None;
        loop {
            if let Some(s) = self.find(target, name).await? {
                if s.ready {
                    return Ok(s);
                }
            } else if !requested {
                requested = true;
                match self.create_snapshot(target, name).await {
                    Ok(()) => continue,
                    // Someone (an earlier attempt) created it in between: adopt it.
                    Err(ProviderError::InvalidState { .. }) => continue,
                    Err(e) if e.may_have_applied() => {
                        tracing::warn!(error = %e, name, "LINSTOR snapshot may exist; looking it up");
                        uncertain = Some(e);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            } else if let Some(e) = uncertain {
                return Err(e.unconfirmed(&format!("LINSTOR snapshot {name} of {target}")));
            } else {
                return Err(ProviderError::Protocol {
                    detail: format!("LINSTOR snapshot {name} of {target} missing after create"),
                });
            }
            if started.elapsed() >= self.waiting.1 {
                return Err(ProviderError::JobTimeout {
                    job_id: format!("LINSTOR snapshot {name}"),
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(self.waiting.0).await;
        }
    }

    /// Several resources are snapshotted at one instant with the multi-snapshot action. A
    /// controller without it (404, 501), or a snapshot that already exists on some of them (a
    /// race), falls back to one at a time, and says so. All of them already there is an
    /// earlier attempt's group, adopted.
    async fn create_group(&self, targets: &[String], name: &str) -> Result<GroupSnapshot> {
        let mut missing = Vec::new();
        for t in targets {
            if self.find(t, name).await?.is_none() {
                missing.push(t.clone());
            }
        }
        let consistent = if missing.is_empty() || targets.len() <= 1 {
            true
        } else if missing.len() < targets.len() {
            false
        } else {
            match self.create_multi_snapshot(targets, name).await {
                Ok(()) => true,
                Err(ProviderError::NotFound { .. } | ProviderError::BadParameter { .. }) => false,
                Err(ProviderError::Internal { code: 501, .. }) => false,
                // Someone took one meanwhile: the rest one at a time.
                Err(ProviderError::InvalidState { .. }) => false,
                Err(e) if e.may_have_applied() => {
                    tracing::warn!(error = %e, name, "LINSTOR multi-snapshot may have been taken; looking");
                    let mut all = true;
                    for t in targets {
                        all &= self.find(t, name).await?.is_some();
                    }
                    all
                }
                Err(e) => return Err(e),
            }
        };
        let mut snapshots = Vec::new();
        for t in targets {
            snapshots.push(self.create(t, name).await?);
        }
        Ok(GroupSnapshot { snapshots, consistent })
    }

    async fn revert(&self, target: &str, name: &str) -> Result<()> {
        self.rollback_snapshot(target, name).await
    }

    async fn delete(&self, target: &str, name: &str) -> Result<()> {
        match self.delete_snapshot(target, name).await {
            Err(ProviderError::NotFound { .. }) if self.find(target, name).await?.is_none() => Ok(()),
            other => other,
        }
    }

    async fn list(&self, target: &str) -> Result<Vec<SnapshotInfo>> {
        Ok(self
            .list_snapshots(target)
            .await?
            .into_iter()
            .map(|s| info(target, s))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bits_are_read_as_an_unsigned_pattern() {
        let err = ApiCallRc {
            ret_code: (MASK_ERROR | 0x0000_0000_0038_0000 | 301) as i64,
            message: "not found".into(),
            cause: None,
        };
        assert!(err.ret_code < 0);
        assert!(err.is_error());
        assert!(matches!(error_of_rc(&err, 200), ProviderError::NotFound { .. }));
        let info = ApiCallRc {
            ret_code: 0x4000_0000_0000_0001,
            message: "created".into(),
            cause: None,
        };
        assert!(!info.is_error());
        let warn = ApiCallRc {
            ret_code: (0x8000_0000_0000_0001u64) as i64,
            message: "warn".into(),
            cause: None,
        };
        assert!(!warn.is_error());
    }
}
