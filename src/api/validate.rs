//! Every request message checked in one place, before a handler reads it: required fields,
//! the limits of [`crate::domain::limits`] (documented in the proto), the values a field may
//! take. Each problem names its field; a handler then works with values it can trust.

use super::convert;
use super::error::{ApiError, ApiResult};
use super::failover::Start;
use super::pb;
use crate::domain::failover::JOB_STATUSES;
use crate::domain::limits::{Problems, MAX_ID, MAX_INPUT_BYTES, MAX_NAME, MAX_TEXT};
use crate::domain::run::RunStatus;

/// A request message's own checks.
pub(crate) trait Checked {
    fn problems(&self) -> Problems;
}

/// INVALID_ARGUMENT listing every problem of `request`, if it has any.
pub(crate) fn checked(request: &impl Checked) -> ApiResult<()> {
    let p = request.problems();
    if p.is_empty() {
        Ok(())
    } else {
        Err(ApiError::InvalidArgument(p.0))
    }
}

/// A required reason: not empty, free text of at most 1,000 characters.
fn reason(p: &mut Problems, field: &str, value: &str) {
    if value.trim().is_empty() {
        p.push(field, "is required");
    } else {
        p.text(field, value, MAX_TEXT);
    }
}

/// `test`, `live` or empty.
fn job_type(p: &mut Problems, value: &str) {
    if !matches!(value.trim(), "" | "test" | "live") {
        p.push("job_type", "must be \"test\" or \"live\"");
    }
}

fn page(p: &mut Problems, token: &str) {
    p.line("page_token", token, MAX_ID);
}

fn after_sequence(p: &mut Problems, after: i64) {
    if after < 0 {
        p.push("after_sequence", "must not be negative");
    }
}

/// Problems of a message that names one job or run and nothing else.
fn one_id(field: &str, id: &str) -> Problems {
    let mut p = Problems::new();
    p.required(field, id, MAX_ID);
    p
}

impl Checked for Start<'_> {
    fn problems(&self) -> Problems {
        let mut p = self.input("").problems();
        if let Some((true, duration)) = self.hold {
            if duration.trim().is_empty() {
                p.push("test_duration", "is required when auto_cleanup is set");
            }
        }
        p.line("request_id", self.request_id, MAX_ID);
        p
    }
}

impl Checked for pb::EndTestFailoverRequest {
    fn problems(&self) -> Problems {
        one_id("job_id", &self.job_id)
    }
}

impl Checked for pb::CancelFailoverRequest {
    fn problems(&self) -> Problems {
        let mut p = one_id("job_id", &self.job_id);
        p.text("reason", &self.reason, MAX_TEXT);
        p
    }
}

impl Checked for pb::ResolveFailoverRequest {
    fn problems(&self) -> Problems {
        let mut p = one_id("job_id", &self.job_id);
        reason(&mut p, "reason", &self.reason);
        // Required when the server authenticates no one (the handler says so); otherwise the
        // principal resolves.
        p.line("resolved_by", &self.resolved_by, MAX_ID);
        p
    }
}

impl Checked for pb::GetFailoverRequest {
    fn problems(&self) -> Problems {
        one_id("job_id", &self.job_id)
    }
}

impl Checked for pb::ListFailoversRequest {
    fn problems(&self) -> Problems {
        let mut p = Problems::new();
        let status = self.status.trim();
        if p.line("status", status, MAX_NAME) && !status.is_empty() && !JOB_STATUSES.contains(&status) {
            p.push(
                "status",
                format!("is not a job status (one of {})", JOB_STATUSES.join(", ")),
            );
        }
        job_type(&mut p, &self.job_type);
        p.line("vm_id", &self.vm_id, MAX_ID);
        page(&mut p, &self.page_token);
        p
    }
}

impl Checked for pb::WatchFailoverRequest {
    fn problems(&self) -> Problems {
        let mut p = one_id("job_id", &self.job_id);
        after_sequence(&mut p, self.after_sequence);
        p
    }
}

impl Checked for pb::CheckReadinessRequest {
    fn problems(&self) -> Problems {
        let mut p = one_id("vm_id", &self.vm_id);
        job_type(&mut p, &self.job_type);
        p
    }
}

impl Checked for pb::UpsertVmRequest {
    fn problems(&self) -> Problems {
        let mut p = Problems::new();
        let Some(vm) = &self.vm else {
            p.push("vm", "is required");
            return p;
        };
        match convert::vm_record(vm) {
            Err((field, why)) => p.push(format!("vm.{field}"), why),
            Ok(record) => p.extend(record.problems().into_iter().map(|(f, why)| (format!("vm.{f}"), why))),
        }
        p
    }
}

impl Checked for pb::GetVmRequest {
    fn problems(&self) -> Problems {
        one_id("vm_id", &self.vm_id)
    }
}

impl Checked for pb::ListVmsRequest {
    fn problems(&self) -> Problems {
        let mut p = Problems::new();
        page(&mut p, &self.page_token);
        p
    }
}

impl Checked for pb::SetNetworkMappingsRequest {
    fn problems(&self) -> Problems {
        let mut p = one_id("vm_id", &self.vm_id);
        if convert::network_kind(self.kind.trim()).is_none() {
            p.push("kind", "must be \"test\" or \"production\"");
        }
        if p.entries("mappings", self.mappings.len(), crate::domain::limits::MAX_ENTRIES) {
            for (i, m) in self.mappings.iter().enumerate() {
                p.required(&format!("mappings[{i}].source_network"), &m.source_network, MAX_NAME);
                p.required(
                    &format!("mappings[{i}].destination_network_id"),
                    &m.destination_network_id,
                    MAX_ID,
                );
            }
        }
        p
    }
}

impl Checked for pb::GetNetworkMappingsRequest {
    fn problems(&self) -> Problems {
        one_id("vm_id", &self.vm_id)
    }
}

impl Checked for pb::SubmitWorkflowRequest {
    fn problems(&self) -> Problems {
        let mut p = Problems::new();
        p.required("definition", &self.definition, MAX_NAME);
        if self.input_json.len() > MAX_INPUT_BYTES {
            p.push(
                "input_json",
                format!(
                    "is {} bytes long, more than the {MAX_INPUT_BYTES} allowed",
                    self.input_json.len()
                ),
            );
        }
        p.line("request_id", &self.request_id, MAX_ID);
        p
    }
}

impl Checked for pb::GetWorkflowRequest {
    fn problems(&self) -> Problems {
        one_id("run_id", &self.run_id)
    }
}

impl Checked for pb::ListWorkflowsRequest {
    fn problems(&self) -> Problems {
        let mut p = Problems::new();
        let status = self.status.trim();
        if p.line("status", status, MAX_NAME) && !status.is_empty() && RunStatus::parse(status).is_none() {
            p.push("status", format!("unknown status {status:?}"));
        }
        p.line("definition", &self.definition, MAX_NAME);
        page(&mut p, &self.page_token);
        p
    }
}

impl Checked for pb::WatchWorkflowRequest {
    fn problems(&self) -> Problems {
        let mut p = one_id("run_id", &self.run_id);
        after_sequence(&mut p, self.after_sequence);
        p
    }
}

impl Checked for pb::SignalWorkflowRequest {
    fn problems(&self) -> Problems {
        let mut p = one_id("run_id", &self.run_id);
        p.required("name", &self.name, MAX_NAME);
        p
    }
}

impl Checked for pb::CancelWorkflowRequest {
    fn problems(&self) -> Problems {
        let mut p = one_id("run_id", &self.run_id);
        p.text("reason", &self.reason, MAX_TEXT);
        p
    }
}
