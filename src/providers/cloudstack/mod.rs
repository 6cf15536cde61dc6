//! The CloudStack API client: signed GET/POST requests to `/client/api`, typed replies and
//! errors, and the two CloudStack [`SnapshotBackend`](super::SnapshotBackend)s.

pub mod sign;
mod snapshots;

use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use snapshots::{VmSnapshots, VolumeSnapshots};

use super::{
    transport_error, AsyncCommand, Cloud, JobRef, JobStatus, Network, ProviderError, Result, ServiceOffering, Snapshot,
    SnapshotFilter, Vm, VmFilter, VmSnapshot, Volume, VolumeFilter,
};

/// Where and how to reach a CloudStack management server.
#[derive(Clone)]
pub struct CloudStackConfig {
    /// e.g. `http://cloudstack:8080/client/api`
    pub endpoint: String,
    pub api_key: String,
    pub secret_key: String,
    /// Per HTTP request.
    pub request_timeout: Duration,
    /// How far CloudStack's clock may be from ours. A request expires (`expires`, which the
    /// server checks when the request reaches it) `request_timeout + clock_skew` after it is
    /// sent, rounded up to the second; when a mutation gets no reply, the client waits until
    /// that moment and one more `clock_skew` have passed before it returns the error, so a
    /// request held up on the way can no longer be applied once the caller looks at the world.
    pub clock_skew: Duration,
    /// Queries longer than this many bytes are sent as a POST form instead of a GET.
    pub post_threshold: usize,
    /// A CA certificate (PEM) to trust besides the public roots: a server whose certificate a
    /// private CA signed.
    pub ca_pem: Option<Vec<u8>>,
}

impl CloudStackConfig {
    pub fn new(endpoint: impl Into<String>, api_key: impl Into<String>, secret_key: impl Into<String>) -> Self {
        CloudStackConfig {
            endpoint: endpoint.into(),
            api_key: api_key.into(),
            secret_key: secret_key.into(),
            request_timeout: Duration::from_secs(30),
            clock_skew: Duration::from_secs(5),
            post_threshold: 2000,
            ca_pem: None,
        }
    }
}

impl fmt::Debug for CloudStackConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudStackConfig")
            .field("endpoint", &self.endpoint)
            .field("api_key", &"<redacted>")
            .field("secret_key", &"<redacted>")
            .field("request_timeout", &self.request_timeout)
            .field("clock_skew", &self.clock_skew)
            .field("post_threshold", &self.post_threshold)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<given>"))
            .finish()
    }
}

/// A [`Cloud`] speaking the CloudStack API.
#[derive(Debug, Clone)]
pub struct CloudStackClient {
    config: CloudStackConfig,
    http: reqwest::Client,
}

impl CloudStackClient {
    pub fn new(config: CloudStackConfig) -> Result<Self> {
        let http = super::http_client(config.request_timeout, config.ca_pem.as_deref())?;
        Ok(CloudStackClient { config, http })
    }

    /// Calls `command` and returns the body under `<command lower-case>response`.
    pub async fn call(&self, command: &str, params: Vec<(String, String)>) -> Result<Value> {
        super::measured("cloudstack", command, self.request(command, params)).await
    }

    async fn request(&self, command: &str, params: Vec<(String, String)>) -> Result<Value> {
        if let Some((_, job)) = params.iter().find(|(k, _)| k == "jobid") {
            tracing::Span::current().record("job_id", job.as_str());
        }
        let mut all = params;
        all.push(("command".into(), command.into()));
        all.push(("apiKey".into(), self.config.api_key.clone()));
        all.push(("response".into(), "json".into()));
        all.push(("signatureVersion".into(), "3".into()));
        let expires = self.expires_at(SystemTime::now());
        all.push(("expires".into(), sign::format_expires(expires)));
        let signature = sign::signature(&all, &self.config.secret_key);
        let query = format!(
            "{}&signature={}",
            sign::canonical_query(&all),
            sign::java_url_encode(&signature)
        );

        let request = if query.len() > self.config.post_threshold {
            self.http
                .post(&self.config.endpoint)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(query)
        } else {
            self.http.get(format!("{}?{}", self.config.endpoint, query))
        };
        // Job polls are left out: how many a job takes is timing, not a place in the run.
        let marked = command != "queryAsyncJobResult";
        if marked {
            crate::crash::point_of("cloud_call", command);
        }
        let mutation = !command.starts_with("list") && command != "queryAsyncJobResult";
        let answered = async {
            let reply = request.send().await?;
            let status = reply.status().as_u16();
            Ok::<_, reqwest::Error>((status, reply.text().await?))
        };
        let (status, body) = match answered.await {
            Ok(answer) => answer,
            Err(e) => {
                let e = transport_error(e);
                if mutation && e.may_have_applied() {
                    self.outlive(command, expires).await;
                }
                return Err(e);
            }
        };
        if marked {
            crate::crash::point_of("cloud_answered", command);
        }
        tracing::debug!(command, status, "cloudstack reply");
        let reply = parse_reply(command, status, &body);
        if let Some(job) = reply.as_ref().ok().and_then(|r| r.get("jobid")).and_then(Value::as_str) {
            tracing::Span::current().record("job_id", job);
        }
        reply
    }

    /// When a request sent at `sent` expires: after the longest wait for its reply and the
    /// clock skew, rounded up to the second (`expires` has no finer unit).
    fn expires_at(&self, sent: SystemTime) -> SystemTime {
        let at = sent + self.config.request_timeout + self.config.clock_skew;
        let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        if since.subsec_nanos() == 0 {
            at
        } else {
            SystemTime::UNIX_EPOCH + Duration::from_secs(since.as_secs() + 1)
        }
    }

    /// Waits until a request that expires at `expires` can no longer be accepted by a server
    /// whose clock is at most `clock_skew` behind ours.
    async fn outlive(&self, command: &str, expires: SystemTime) {
        let after = expires + self.config.clock_skew;
        if let Ok(left) = after.duration_since(SystemTime::now()) {
            tracing::info!(command, wait = ?left, "no reply to a mutation: waiting until it has expired before looking again");
            tokio::time::sleep(left).await;
        }
    }

    async fn list<T: DeserializeOwned>(
        &self,
        command: &str,
        object: &str,
        params: Vec<(&str, String)>,
    ) -> Result<Vec<T>> {
        let mut params: Vec<(String, String)> = params.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        params.push(("listall".into(), "true".into()));
        let by_uuid = params.iter().any(|(k, _)| UUID_FILTERS.contains(&k.as_str()));
        let reply = self.call(command, params).await;
        list_or_empty(reply, by_uuid, &[object])
    }
}

/// Unwraps `{"<command>response": body}`; a non-2xx status (or an `errorcode` in the body)
/// becomes a typed error.
pub(crate) fn parse_reply(command: &str, status: u16, body: &str) -> Result<Value> {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let inner = parsed.as_ref().and_then(|v| {
        let key = format!("{}response", command.to_lowercase());
        v.get(&key)
            .or_else(|| v.get("errorresponse"))
            .or_else(|| v.as_object().and_then(|o| o.values().next()))
            .cloned()
    });
    let error_of = |v: &Value| {
        let code = v.get("errorcode").and_then(Value::as_u64)?;
        let text = v
            .get("errortext")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        Some((u16::try_from(code).unwrap_or(530), text))
    };
    if !(200..300).contains(&status) {
        let (code, text) = inner
            .as_ref()
            .and_then(error_of)
            .unwrap_or((status, format!("HTTP {status} from {command}")));
        return Err(ProviderError::from_cloudstack_code(code, text));
    }
    match inner {
        Some(v) => match error_of(&v) {
            Some((code, text)) => Err(ProviderError::from_cloudstack_code(code, text)),
            None => Ok(v),
        },
        None => Err(ProviderError::Protocol {
            detail: format!("{command}: reply is not a JSON object with a response"),
        }),
    }
}

/// List filters that CloudStack resolves as uuids before listing.
const UUID_FILTERS: &[&str] = &["id", "virtualmachineid", "volumeid", "vmsnapshotid"];

/// A list call's items. CloudStack answers 431 when a uuid filter names nothing it knows;
/// for a list filtered by uuid that means "nothing has that id": an empty list.
fn list_or_empty<T: DeserializeOwned>(reply: Result<Value>, by_uuid: bool, objects: &[&str]) -> Result<Vec<T>> {
    match reply {
        Ok(body) => list_items(&body, objects),
        Err(ProviderError::BadParameter { code: 431, .. }) if by_uuid => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// The items of a list reply: `{"count": N, "<object>": [...]}`, or `{}` when empty.
pub(crate) fn list_items<T: DeserializeOwned>(body: &Value, objects: &[&str]) -> Result<Vec<T>> {
    let Some(items) = objects.iter().find_map(|o| body.get(*o)) else {
        return Ok(Vec::new());
    };
    serde_json::from_value(items.clone()).map_err(|e| ProviderError::Protocol {
        detail: format!("list of {}: {e}", objects.join("/")),
    })
}

fn str_field(body: &Value, name: &str) -> Option<String> {
    match body.get(name)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn command_params(cmd: &AsyncCommand) -> Vec<(String, String)> {
    let p: Vec<(&str, String)> = match cmd {
        AsyncCommand::DeployVm {
            name,
            display_name,
            service_offering_id,
            template_id,
            zone_id,
            nics,
            start_vm,
            extra,
        } => {
            let mut p = vec![
                ("name", name.clone()),
                ("serviceofferingid", service_offering_id.clone()),
                ("templateid", template_id.clone()),
                ("zoneid", zone_id.clone()),
                ("startvm", start_vm.to_string()),
            ];
            if let Some(d) = display_name {
                p.push(("displayname", d.clone()));
            }
            let mut p: Vec<(String, String)> = p.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            if nics.iter().any(|n| n.ip.is_some() || n.mac.is_some()) {
                for (i, n) in nics.iter().enumerate() {
                    p.push((format!("iptonetworklist[{i}].networkid"), n.network_id.clone()));
                    if let Some(ip) = &n.ip {
                        p.push((format!("iptonetworklist[{i}].ip"), ip.clone()));
                    }
                    if let Some(mac) = &n.mac {
                        p.push((format!("iptonetworklist[{i}].mac"), mac.clone()));
                    }
                }
            } else if !nics.is_empty() {
                let ids: Vec<&str> = nics.iter().map(|n| n.network_id.as_str()).collect();
                p.push(("networkids".to_string(), ids.join(",")));
            }
            p.extend(extra.iter().map(|(k, v)| (k.clone(), v.clone())));
            return p;
        }
        AsyncCommand::StartVm { id } => vec![("id", id.clone())],
        AsyncCommand::StopVm { id, forced } => {
            vec![("id", id.clone()), ("forced", forced.to_string())]
        }
        AsyncCommand::DestroyVm { id, expunge } => {
            vec![("id", id.clone()), ("expunge", expunge.to_string())]
        }
        AsyncCommand::AttachVolume {
            volume_id,
            vm_id,
            device_id,
        } => {
            let mut p = vec![("id", volume_id.clone()), ("virtualmachineid", vm_id.clone())];
            if let Some(d) = device_id {
                p.push(("deviceid", d.to_string()));
            }
            p
        }
        AsyncCommand::DetachVolume { volume_id } => vec![("id", volume_id.clone())],
        AsyncCommand::CreateSnapshot { volume_id, name } => {
            vec![("volumeid", volume_id.clone()), ("name", name.clone())]
        }
        AsyncCommand::RevertSnapshot { id } | AsyncCommand::DeleteSnapshot { id } => {
            vec![("id", id.clone())]
        }
        AsyncCommand::CreateVmSnapshot { vm_id, name } => vec![
            ("virtualmachineid", vm_id.clone()),
            ("name", name.clone()),
            ("snapshotmemory", "false".into()),
        ],
        AsyncCommand::RevertToVmSnapshot { id } | AsyncCommand::DeleteVmSnapshot { id } => {
            vec![("vmsnapshotid", id.clone())]
        }
    };
    p.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

#[async_trait]
impl Cloud for CloudStackClient {
    async fn issue(&self, cmd: AsyncCommand) -> Result<JobRef> {
        let body = self.call(cmd.api_name(), command_params(&cmd)).await?;
        job_ref(cmd.api_name(), &body)
    }

    async fn poll_job(&self, job_id: &str) -> Result<JobStatus> {
        let body = self
            .call("queryAsyncJobResult", vec![("jobid".into(), job_id.to_string())])
            .await?;
        job_status(&body)
    }

    async fn list_vms(&self, filter: VmFilter) -> Result<Vec<Vm>> {
        let mut params = Vec::new();
        if let Some(id) = &filter.id {
            params.push(("id", id.clone()));
        }
        if let Some(name) = &filter.name {
            params.push(("name", name.clone()));
        }
        let vms: Vec<Vm> = self.list("listVirtualMachines", "virtualmachine", params).await?;
        Ok(vms
            .into_iter()
            .filter(|v| filter.name.as_ref().is_none_or(|n| &v.name == n))
            .collect())
    }

    async fn list_volumes(&self, filter: VolumeFilter) -> Result<Vec<Volume>> {
        let mut params = Vec::new();
        if let Some(id) = &filter.id {
            params.push(("id", id.clone()));
        }
        if let Some(vm) = &filter.vm_id {
            params.push(("virtualmachineid", vm.clone()));
        }
        if let Some(t) = &filter.volume_type {
            params.push(("type", t.as_str().to_string()));
        }
        self.list("listVolumes", "volume", params).await
    }

    async fn find_network(&self, id: &str) -> Result<Option<Network>> {
        let networks: Vec<Network> = self
            .list("listNetworks", "network", vec![("id", id.to_string())])
            .await?;
        Ok(networks.into_iter().find(|n| n.id == id))
    }

    async fn find_service_offering(&self, id: &str) -> Result<Option<ServiceOffering>> {
        let offerings: Vec<ServiceOffering> = self
            .list("listServiceOfferings", "serviceoffering", vec![("id", id.to_string())])
            .await?;
        Ok(offerings.into_iter().find(|o| o.id == id))
    }

    async fn list_snapshots(&self, filter: SnapshotFilter) -> Result<Vec<Snapshot>> {
        let mut params = Vec::new();
        if let Some(id) = &filter.id {
            params.push(("id", id.clone()));
        }
        if let Some(v) = &filter.volume_id {
            params.push(("volumeid", v.clone()));
        }
        if let Some(n) = &filter.name {
            params.push(("name", n.clone()));
        }
        let snaps: Vec<Snapshot> = self.list("listSnapshots", "snapshot", params).await?;
        Ok(snaps
            .into_iter()
            .filter(|s| filter.name.as_ref().is_none_or(|n| &s.name == n))
            .collect())
    }

    async fn list_vm_snapshots(&self, vm_id: &str) -> Result<Vec<VmSnapshot>> {
        let body = self
            .call(
                "listVMSnapshot",
                vec![
                    ("virtualmachineid".into(), vm_id.to_string()),
                    ("listall".into(), "true".into()),
                ],
            )
            .await;
        list_or_empty(body, true, &["vmSnapshot", "vmsnapshot"])
    }

    async fn delete_volume(&self, id: &str) -> Result<()> {
        let body = self.call("deleteVolume", vec![("id".into(), id.to_string())]).await?;
        if is_success(&body) {
            Ok(())
        } else {
            Err(ProviderError::Protocol {
                detail: format!("deleteVolume {id}: reply without success=true"),
            })
        }
    }
}

/// `{"success": true}`, or `"true"` as older servers send it.
fn is_success(body: &Value) -> bool {
    match body.get("success") {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => false,
    }
}

fn job_ref(command: &str, body: &Value) -> Result<JobRef> {
    let job_id = str_field(body, "jobid").ok_or_else(|| ProviderError::Protocol {
        detail: format!("{command}: reply without jobid"),
    })?;
    Ok(JobRef {
        job_id,
        resource_id: str_field(body, "id"),
    })
}

fn job_status(body: &Value) -> Result<JobStatus> {
    let status = body
        .get("jobstatus")
        .and_then(Value::as_i64)
        .ok_or_else(|| ProviderError::Protocol {
            detail: "queryAsyncJobResult: reply without jobstatus".into(),
        })?;
    match status {
        0 => Ok(JobStatus::Pending),
        1 => Ok(JobStatus::Succeeded(
            body.get("jobresult").cloned().unwrap_or(Value::Null),
        )),
        2 => {
            let result = body.get("jobresult");
            let errorcode = result
                .and_then(|r| r.get("errorcode"))
                .and_then(Value::as_u64)
                .or_else(|| body.get("jobresultcode").and_then(Value::as_u64))
                .and_then(|c| u16::try_from(c).ok())
                .unwrap_or(530);
            let errortext = result
                .and_then(|r| r.get("errortext"))
                .and_then(Value::as_str)
                .unwrap_or("async job failed")
                .to_string();
            Ok(JobStatus::Failed { errorcode, errortext })
        }
        other => Err(ProviderError::Protocol {
            detail: format!("queryAsyncJobResult: unknown jobstatus {other}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response fixture from `shared/cloudstack/responses`, beside the checkout (where CI lays
    /// it) or in the team's workspace. Empty when neither has it; in CI that fails the test.
    fn fixture(name: &str) -> String {
        let beside = format!("{}/../shared/cloudstack/responses/{name}", env!("CARGO_MANIFEST_DIR"));
        let workspace = format!("/work/shared/cloudstack/responses/{name}");
        let text = std::fs::read_to_string(beside)
            .or_else(|_| std::fs::read_to_string(workspace))
            .unwrap_or_default();
        assert!(
            !text.is_empty() || std::env::var("CI").is_err(),
            "fixture {name} not found beside the checkout (../shared) nor in /work/shared"
        );
        text
    }

    const DEPLOY: &str = r#"{"deployvirtualmachineresponse":{"id":"915653c4","jobid":"74bbb422"}}"#;

    #[test]
    fn parses_create_replies_into_job_refs() {
        let body = parse_reply("deployVirtualMachine", 200, DEPLOY).unwrap();
        let r = job_ref("deployVirtualMachine", &body).unwrap();
        assert_eq!(r.job_id, "74bbb422");
        assert_eq!(r.resource_id.as_deref(), Some("915653c4"));
    }

    #[test]
    fn empty_list_is_an_empty_vec() {
        let body = parse_reply("listVolumes", 200, r#"{"listvolumesresponse":{}}"#).unwrap();
        let v: Vec<Volume> = list_items(&body, &["volume"]).unwrap();
        assert!(v.is_empty());
    }

    #[test]
    fn errors_are_typed_by_code() {
        let e = parse_reply(
            "attachVolume",
            431,
            r#"{"attachvolumeresponse":{"uuidList":[],"errorcode":431,"cserrorcode":9999,"errortext":"missing"}}"#,
        )
        .unwrap_err();
        assert!(matches!(e, ProviderError::BadParameter { code: 431, .. }));
        let e = parse_reply("x", 530, "not json").unwrap_err();
        assert!(matches!(e, ProviderError::Internal { code: 530, .. }));
        assert!(e.is_retryable());
        let e = parse_reply(
            "listVirtualMachines",
            401,
            r#"{"listvirtualmachinesresponse":{"uuidList":[],"errorcode":401,"errortext":"unable"}}"#,
        )
        .unwrap_err();
        assert!(matches!(e, ProviderError::Unauthorized { .. }));
    }

    #[test]
    fn success_may_be_a_string() {
        assert!(is_success(&serde_json::json!({"success": true})));
        assert!(is_success(&serde_json::json!({"success": "true"})));
        assert!(!is_success(&serde_json::json!({"success": "false"})));
        assert!(!is_success(&serde_json::json!({})));
    }

    #[test]
    fn job_status_follows_jobstatus_not_jobresultcode() {
        let failed = serde_json::json!({"jobstatus": 2, "jobresultcode": 530,
            "jobresult": {"errorcode": 431, "errortext": "bad"}});
        assert_eq!(
            job_status(&failed).unwrap(),
            JobStatus::Failed {
                errorcode: 431,
                errortext: "bad".into()
            }
        );
        let pending = serde_json::json!({"jobstatus": 0, "jobresultcode": 0});
        assert_eq!(job_status(&pending).unwrap(), JobStatus::Pending);
    }

    #[test]
    fn parses_the_shared_fixtures() {
        let vms = fixture("listVirtualMachines.json");
        if vms.is_empty() {
            eprintln!("skipped: the shared CloudStack fixtures are not on this machine");
            return;
        }
        let body = parse_reply("listVirtualMachines", 200, &vms).unwrap();
        let vms: Vec<Vm> = list_items(&body, &["virtualmachine"]).unwrap();
        assert_eq!(vms[0].state, super::super::VmState::Running);
        assert_eq!(vms[0].nics.len(), 1);

        let vols = fixture("listVolumes.json");
        let body = parse_reply("listVolumes", 200, &vols).unwrap();
        let vols: Vec<Volume> = list_items(&body, &["volume"]).unwrap();
        assert_eq!(vols.len(), 2);
        assert_eq!(vols[1].device_id, Some(1));

        for (file, expect) in [
            ("queryAsyncJobResult_pending.json", "pending"),
            ("queryAsyncJobResult_failure.json", "failed"),
            ("queryAsyncJobResult_failure_marvin.json", "failed"),
            ("queryAsyncJobResult_success_attachVolume.json", "ok"),
            ("queryAsyncJobResult_success_deployVirtualMachine.json", "ok"),
        ] {
            let body = parse_reply("queryAsyncJobResult", 200, &fixture(file)).unwrap();
            let s = job_status(&body).unwrap();
            let got = match s {
                JobStatus::Pending => "pending",
                JobStatus::Failed { .. } => "failed",
                JobStatus::Succeeded(_) => "ok",
            };
            assert_eq!(got, expect, "{file}");
        }
        let body = parse_reply("deleteVolume", 200, &fixture("deleteVolume.json")).unwrap();
        assert_eq!(body.get("success"), Some(&Value::Bool(true)));
        let e = parse_reply("listVirtualMachines", 530, &fixture("error_530_internal.json")).unwrap_err();
        assert!(matches!(e, ProviderError::Internal { code: 530, .. }));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use super::*;
    use crate::providers::{Vm, Volume};

    /// JSON values of any shape, a few levels deep, with CloudStack's field names mixed in.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>().prop_map(|f| json!(f)),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            let key = prop_oneof![
                Just("jobid".to_string()),
                Just("jobstatus".to_string()),
                Just("jobresult".to_string()),
                Just("errorcode".to_string()),
                Just("errortext".to_string()),
                Just("virtualmachine".to_string()),
                Just("volume".to_string()),
                Just("id".to_string()),
                Just("state".to_string()),
                any::<String>(),
            ];
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(key, inner, 0..5).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

        /// Whatever a server (or a proxy in front of it) answers, the parsers return a value or a
        /// typed error; none panics.
        #[test]
        fn replies_of_any_shape_parse_or_fail_typed(
            body in json_value(),
            raw in any::<String>(),
            status in prop_oneof![Just(200u16), Just(431u16), Just(530u16), any::<u16>()],
        ) {
            let command = "queryAsyncJobResult";
            let wrapped = json!({ "queryasyncjobresultresponse": body.clone() }).to_string();
            for text in [wrapped.as_str(), raw.as_str(), &body.to_string()] {
                if let Ok(v) = parse_reply(command, status, text) {
                    let _ = job_status(&v);
                    let _ = job_ref(command, &v);
                    let _ = is_success(&v);
                    let _ = list_items::<Vm>(&v, &["virtualmachine"]);
                    let _ = list_items::<Volume>(&v, &["volume"]);
                }
            }
            let _ = job_status(&body);
            let _ = list_items::<Vm>(&body, &["virtualmachine"]);
            let _ = list_items::<Volume>(&body, &["volume"]);
            let _ = super::sign::parse_expires(&raw);
        }
    }
}
