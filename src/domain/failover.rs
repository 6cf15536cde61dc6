//! The input of a failover run, as a type: the API builds it, the definition checks it at
//! submit, the steps, the job read model and `tern admin recover` read it. Its JSON form is what the
//! run stores (and what a retried request with the same request id is compared against).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::inventory::{NetworkKind, VmRecord, MAX_CPU_COUNT, MAX_MEMORY_MB};
use super::limits::{shown, Problems, MAX_ID, MAX_NAME, MAX_TEXT};

/// A test failover (reversible, on the test network) or a live one (permanent, production).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobType {
    Test,
    Live,
}

impl JobType {
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::Test => "test",
            JobType::Live => "live",
        }
    }
}

/// What a `test-failover` or `live-failover` run is asked to do (the seeds' request fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailoverInput {
    /// The source VM (the VMware UUID the inventory knows it by).
    pub vm_id: String,
    /// The name the new VM is displayed with; the inventory's name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_name: Option<String>,
    /// Absent in inputs submitted as raw workflows: a test failover's network then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_type: Option<JobType>,
    #[serde(default)]
    pub skip_validation: bool,
    #[serde(default)]
    pub skip_snapshot: bool,
    #[serde(default)]
    pub skip_virtio_injection: bool,
    /// Source network -> CloudStack network id, overriding the stored mappings.
    #[serde(default)]
    pub network_mappings: BTreeMap<String, String>,
    #[serde(default)]
    pub custom_config: BTreeMap<String, String>,
    #[serde(default)]
    pub notification_config: BTreeMap<String, String>,
    /// Test failovers: tear down when `test_duration` has passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_cleanup: Option<bool>,
    /// Test failovers: how long the test VM is held (e.g. "30m").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_duration: Option<String>,
    /// The source VM as the inventory described it when the job was started: its disks, NICs
    /// and size for the whole job, whatever the inventory says later. FailoverService sets it;
    /// the steps of a run without it read the inventory. A stored value of another shape (a
    /// run from before this was typed) reads as none.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "spec_or_none")]
    pub source_vm_spec: Option<VmRecord>,
}

/// The longest hold a test failover may ask for (`test_duration`).
pub const MAX_TEST_DURATION: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);

/// The user-visible statuses a failover job can have (`failover_jobs.status`), as the proto
/// documents them; the failover definitions use no other (a test checks it).
pub const JOB_STATUSES: &[&str] = &[
    "pending",
    "validating",
    "snapshotting",
    "executing",
    "creating_vm",
    "switching_volume",
    "powering_on",
    "testing",
    "cleanup",
    "reverting",
    "completed",
    "failed",
    "cancelled",
    "needs_operator",
    "resolved",
];

/// The documented keys of `custom_config`, each with the largest value it takes: overrides of
/// the new VM's size on a custom offering.
pub const CUSTOM_CONFIG_KEYS: &[(&str, u32)] = &[("cpu_count", MAX_CPU_COUNT), ("memory_mb", MAX_MEMORY_MB)];

/// The `custom_config` key naming the service offering to deploy with (any CloudStack
/// offering id), instead of the one Tern would choose from its configured offerings.
pub const OFFERING_KEY: &str = "service_offering_id";

/// What is wrong with a request's `custom_config`, naming the key: an unknown key (it would be
/// stored and ignored), or a value that is not a whole number from 1 to the key's largest.
pub fn custom_config_problems(config: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut p = Vec::new();
    for (key, value) in config {
        let field = format!("custom_config[{key}]");
        if key == OFFERING_KEY {
            let ok = !value.trim().is_empty() && value.len() <= 64 && !value.contains(char::is_whitespace);
            if !ok {
                p.push((
                    field,
                    "must be a CloudStack offering id (1 to 64 characters, no spaces)".into(),
                ));
            }
            continue;
        }
        match CUSTOM_CONFIG_KEYS.iter().find(|(k, _)| k == key) {
            None => {
                let mut known: Vec<&str> = CUSTOM_CONFIG_KEYS.iter().map(|(k, _)| *k).collect();
                known.push(OFFERING_KEY);
                p.push((field, format!("is not a known key (known: {})", known.join(", "))));
            }
            Some((_, max)) => match value.trim().parse::<u32>() {
                Ok(n) if (1..=*max).contains(&n) => {}
                _ => p.push((field, format!("must be a whole number from 1 to {max}"))),
            },
        }
    }
    p
}

fn spec_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<VmRecord>, D::Error> {
    let v = Option::<Value>::deserialize(d)?;
    Ok(v.and_then(|v| serde_json::from_value(v).ok()))
}

impl FailoverInput {
    /// A failover of `vm_id` with every option at its default.
    pub fn new(vm_id: impl Into<String>, job_type: JobType) -> FailoverInput {
        FailoverInput {
            vm_id: vm_id.into(),
            vm_name: None,
            job_type: Some(job_type),
            skip_validation: false,
            skip_snapshot: false,
            skip_virtio_injection: false,
            network_mappings: BTreeMap::new(),
            custom_config: BTreeMap::new(),
            notification_config: BTreeMap::new(),
            auto_cleanup: None,
            test_duration: None,
            source_vm_spec: None,
        }
    }

    /// Reads a run's stored input; the error names the field.
    pub fn from_value(input: &Value) -> Result<FailoverInput, String> {
        let parsed = FailoverInput::deserialize(input).map_err(|e| e.to_string())?;
        if parsed.vm_id.trim().is_empty() {
            return Err("vm_id must not be empty".into());
        }
        Ok(parsed)
    }

    /// The new VM's size as `custom_config` overrides it: (CPU count, memory in MB).
    /// Values that do not parse are none here; a new run's are checked at submit.
    /// The service offering the request names (`custom_config[service_offering_id]`).
    pub fn offering_override(&self) -> Option<&str> {
        self.custom_config.get(OFFERING_KEY).map(|v| v.trim())
    }

    pub fn size_override(&self) -> (Option<u32>, Option<u32>) {
        let get = |k: &str| self.custom_config.get(k).and_then(|v| v.trim().parse().ok());
        (get("cpu_count"), get("memory_mb"))
    }

    /// Reads and checks a new run's input (whichever service submits it): every field within
    /// its limits ([`super::limits`]), each problem naming its field.
    pub fn check_new(input: &Value) -> Result<FailoverInput, Problems> {
        let mut p = Problems::new();
        let parsed: FailoverInput = serde_path_to_error::deserialize(input).map_err(|e| {
            let path = e.path().to_string();
            let why = e.into_inner().to_string();
            // A field missing is reported at the top ("."): name it from serde's message.
            let missing = why
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split('`').next())
                .map(str::to_string);
            match (path.as_str(), missing) {
                (".", Some(field)) => Problems(vec![(field, "is required".into())]),
                (".", None) => Problems(vec![("input".into(), why)]),
                _ => Problems(vec![(path, why)]),
            }
        })?;
        p.extend(parsed.problems());
        if let Some(spec) = input.get("source_vm_spec").filter(|v| !v.is_null()) {
            match serde_json::from_value::<VmRecord>(spec.clone()) {
                Err(e) => p.push("source_vm_spec", e.to_string()),
                Ok(vm) => {
                    p.extend(
                        vm.problems()
                            .into_iter()
                            .map(|(f, why)| (format!("source_vm_spec.{f}"), why)),
                    );
                    if vm.vm_id != parsed.vm_id {
                        p.push(
                            "source_vm_spec.vm_id",
                            format!("is VM {}, not {}", shown(&vm.vm_id), shown(&parsed.vm_id)),
                        );
                    }
                }
            }
        }
        if p.is_empty() {
            Ok(parsed)
        } else {
            Err(p)
        }
    }

    /// What is wrong with the request's fields, each named as the start requests name it.
    pub fn problems(&self) -> Problems {
        let mut p = Problems::new();
        p.required("vm_id", &self.vm_id, MAX_ID);
        if let Some(name) = &self.vm_name {
            p.line("vm_name", name, MAX_NAME);
        }
        if let Some(d) = self.test_duration.as_deref().filter(|d| !d.trim().is_empty()) {
            if p.line("test_duration", d, MAX_ID) {
                match crate::domain::parse_duration(d) {
                    Err(e) => p.push("test_duration", e),
                    Ok(hold) if hold > MAX_TEST_DURATION => p.push(
                        "test_duration",
                        format!("must be at most {}", humantime::format_duration(MAX_TEST_DURATION)),
                    ),
                    Ok(_) => {}
                }
            }
        }
        let before = p.0.len();
        p.map("network_mappings", self.network_mappings.iter(), MAX_ID);
        if p.0.len() == before {
            for (source, dest) in &self.network_mappings {
                if source.trim().is_empty() || dest.trim().is_empty() {
                    p.push(
                        format!("network_mappings[{source}]"),
                        "source and destination network must not be empty",
                    );
                }
            }
        }
        let before = p.0.len();
        p.map("custom_config", self.custom_config.iter(), MAX_ID);
        if p.0.len() == before {
            p.extend(custom_config_problems(&self.custom_config));
        }
        p.map("notification_config", self.notification_config.iter(), MAX_TEXT);
        p
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Which networks the new VM joins.
    pub fn network_kind(&self) -> NetworkKind {
        match self.job_type {
            Some(JobType::Live) => NetworkKind::Production,
            Some(JobType::Test) | None => NetworkKind::Test,
        }
    }

    /// The columns of the job read model that come from the input.
    pub fn subject(&self) -> JobSubject {
        JobSubject {
            vm_id: self.vm_id.clone(),
            vm_name: self.vm_name.clone(),
            source_vm_spec: self.source_vm_spec.as_ref().and_then(|v| serde_json::to_string(v).ok()),
        }
    }
}

/// What a run's job row says about its subject (empty for runs that are not failovers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobSubject {
    pub vm_id: String,
    pub vm_name: Option<String>,
    /// JSON text.
    pub source_vm_spec: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_raw_workflow_input_reads_with_defaults() {
        let i = FailoverInput::from_value(&json!({"vm_id": "v", "network_mappings": {"a": "b"}})).unwrap();
        assert_eq!(i.network_kind(), NetworkKind::Test);
        assert_eq!(i.network_mappings.get("a").map(String::as_str), Some("b"));
        let live = FailoverInput::from_value(&json!({"vm_id": "v", "job_type": "live"})).unwrap();
        assert_eq!(live.network_kind(), NetworkKind::Production);
    }

    #[test]
    fn a_bad_input_is_refused_naming_the_field() {
        let e = FailoverInput::from_value(&json!({})).unwrap_err();
        assert!(e.contains("vm_id"), "{e}");
        let e = FailoverInput::from_value(&json!({"vm_id": "v", "skip_snapshot": "yes"})).unwrap_err();
        assert!(e.contains("bool"), "{e}");
        let e = FailoverInput::from_value(&json!({"vm_id": " "})).unwrap_err();
        assert!(e.contains("vm_id"), "{e}");
    }

    #[test]
    fn the_stored_form_round_trips() {
        let mut i = FailoverInput::new("v", JobType::Test);
        i.vm_name = Some("n".into());
        i.auto_cleanup = Some(true);
        i.test_duration = Some("30m".into());
        let v = i.to_value();
        assert_eq!(v["job_type"], json!("test"));
        assert_eq!(v["network_mappings"], json!({}));
        assert!(v.get("source_vm_spec").is_none());
        assert_eq!(FailoverInput::from_value(&v).unwrap(), i);
    }

    #[test]
    fn custom_config_keys_are_known_and_checked() {
        let mut c = BTreeMap::from([("cpu_count".to_string(), "6".to_string())]);
        assert!(custom_config_problems(&c).is_empty());
        c.insert("ticket".into(), "CHG-1".into());
        c.insert("memory_mb".into(), "0".into());
        let p: Vec<String> = custom_config_problems(&c).into_iter().map(|(f, _)| f).collect();
        assert_eq!(p, ["custom_config[memory_mb]", "custom_config[ticket]"]);
        let mut i = FailoverInput::new("a", JobType::Test);
        i.custom_config = BTreeMap::from([("memory_mb".to_string(), " 12288 ".to_string())]);
        assert_eq!(i.size_override(), (None, Some(12288)));
        assert!(FailoverInput::check_new(&i.to_value()).is_ok());
        i.test_duration = Some("999999999h".into());
        let e = FailoverInput::check_new(&i.to_value()).unwrap_err().to_string();
        assert!(e.contains("test_duration") && e.contains("30days"), "{e}");
        i.test_duration = Some("30days".into());
        assert!(FailoverInput::check_new(&i.to_value()).is_ok());
        i.custom_config.insert("colour".into(), "blue".into());
        assert!(FailoverInput::check_new(&i.to_value())
            .unwrap_err()
            .to_string()
            .contains("custom_config[colour]"));
    }

    #[test]
    fn a_source_spec_of_another_shape_reads_as_none_in_old_runs_and_is_refused_in_new_ones() {
        let old = json!({"vm_id": "a", "source_vm_spec": {"cpus": 2}});
        assert_eq!(FailoverInput::from_value(&old).unwrap().source_vm_spec, None);
        assert!(FailoverInput::check_new(&old)
            .unwrap_err()
            .to_string()
            .contains("source_vm_spec"));
        let spec = json!({"vm_id": "a", "name": "n", "cpu_count": 1, "memory_mb": 512, "os_type": "linux",
            "volume_id": "v", "oma_vm_id": "o"});
        let new = json!({"vm_id": "a", "source_vm_spec": spec});
        let parsed = FailoverInput::check_new(&new).unwrap();
        assert_eq!(
            parsed.source_vm_spec.map(|s| s.boot_disk.volume_id),
            Some("v".to_string())
        );
        let other = json!({"vm_id": "b", "source_vm_spec": spec});
        assert!(FailoverInput::check_new(&other)
            .unwrap_err()
            .to_string()
            .contains(r#"not "b""#));
    }
}
