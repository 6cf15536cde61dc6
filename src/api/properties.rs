//! Property tests (proptest) over what a client controls: every request message's checks and
//! the proto-to-domain conversions. Whatever arrives, nothing panics, every refusal names its
//! field and stays short, and what the API accepts the engine accepts too.

use std::collections::HashMap;

use proptest::prelude::*;

use super::failover::Start;
use super::validate::Checked;
use super::{convert, pb, TEST_FAILOVER};
use crate::domain::failover::{FailoverInput, JobType};

/// Strings as a client may send them: any character (NUL, newlines, any script), short or over
/// every limit.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<String>(),
        2 => "[a-z0-9-]{0,12}",
        1 => "[0-9]{1,6}(ms|s|m|h|d|days)",
        1 => prop::string::string_regex(".{190,300}").unwrap(),
    ]
}

fn map() -> impl Strategy<Value = HashMap<String, String>> {
    prop_oneof![
        3 => prop::collection::hash_map(text(), text(), 0..4),
        1 => prop::collection::hash_map("[a-z_]{1,12}", "[0-9]{1,4}", 60..70),
    ]
}

/// Every refusal names a field and says why, briefly.
fn well_formed(problems: &crate::domain::limits::Problems) -> Result<(), TestCaseError> {
    for (field, why) in &problems.0 {
        prop_assert!(!field.trim().is_empty(), "a refusal without its field: {why}");
        prop_assert!(!why.trim().is_empty(), "{field}: no reason");
        prop_assert!(why.len() < 400, "{field}: a reason of {} bytes", why.len());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn start_requests_are_refused_by_field_or_accepted_by_the_engine_too(
        vm_id in text(),
        vm_name in text(),
        test_duration in text(),
        auto_cleanup in any::<bool>(),
        request_id in text(),
        network_mappings in map(),
        custom_config in prop_oneof![map(), prop::collection::hash_map(
            prop::sample::select(vec!["cpu_count".to_string(), "memory_mb".to_string()]), "[0-9]{1,9}", 0..2)],
        notification_config in map(),
    ) {
        let r = pb::StartTestFailoverRequest {
            vm_id, vm_name, auto_cleanup, test_duration, request_id,
            network_mappings, custom_config, notification_config,
            ..Default::default()
        };
        let start = super::failover::start_of!(r, TEST_FAILOVER, JobType::Test, Some((r.auto_cleanup, &r.test_duration)));
        let problems = start.problems();
        well_formed(&problems)?;
        if problems.is_empty() {
            let input = start.input("inventory name").to_value();
            let checked = FailoverInput::check_new(&input);
            prop_assert!(checked.is_ok(), "the API accepted what the engine refuses: {:?}", checked.err());
        }
    }

    #[test]
    fn vm_messages_convert_or_name_the_field(
        vm_id in text(), name in text(), os_type in text(), oma in text(),
        cpu in any::<u32>(), memory in any::<u32>(),
        volume in text(),
        disks in prop::collection::vec((text(), any::<u64>(), any::<bool>(), any::<u32>()), 0..4),
        nics in prop::collection::vec((text(), text(), text()), 0..4),
    ) {
        let vm = pb::Vm {
            vm_id, name, os_type, oma_vm_id: oma, cpu_count: cpu, memory_mb: memory, volume_id: volume,
            disks: disks.into_iter().map(|(volume_id, size_bytes, boot, unit_number)| pb::Disk {
                volume_id, size_bytes, boot, unit_number,
            }).collect(),
            nics: nics.into_iter().map(|(source_network, mac, ip_address)| pb::Nic {
                source_network, mac, ip_address,
            }).collect(),
            ..Default::default()
        };
        let problems = pb::UpsertVmRequest { vm: Some(vm.clone()) }.problems();
        well_formed(&problems)?;
        for (field, _) in &problems.0 {
            prop_assert!(field.starts_with("vm."), "{field}");
        }
        if problems.is_empty() {
            // Accepted: it converts, and converts back to the same VM.
            let record = convert::vm_record(&vm).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            let again = convert::vm_record(&convert::vm(&record)).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
            prop_assert_eq!(record, again);
        }
    }

    #[test]
    fn other_messages_name_their_fields(a in text(), b in text(), c in text(), n in any::<i64>(), size in any::<u32>()) {
        let all = [
            pb::ResolveFailoverRequest { job_id: a.clone(), reason: b.clone(), resolved_by: c.clone(), force: false }.problems(),
            pb::CancelFailoverRequest { job_id: a.clone(), reason: b.clone() }.problems(),
            pb::ListFailoversRequest { status: a.clone(), job_type: b.clone(), vm_id: c.clone(), page_size: size, page_token: a.clone() }.problems(),
            pb::WatchFailoverRequest { job_id: a.clone(), after_sequence: n }.problems(),
            pb::CheckReadinessRequest { vm_id: a.clone(), job_type: b.clone() }.problems(),
            pb::SetNetworkMappingsRequest {
                vm_id: a.clone(), kind: b.clone(),
                mappings: vec![pb::NetworkMapping { source_network: c.clone(), destination_network_id: a.clone(), kind: b.clone() }],
            }.problems(),
            pb::SubmitWorkflowRequest { definition: a.clone(), input_json: b.clone(), request_id: c.clone() }.problems(),
            pb::ListWorkflowsRequest { status: a.clone(), definition: b.clone(), page_size: size, page_token: c.clone() }.problems(),
            pb::SignalWorkflowRequest { run_id: a.clone(), name: b.clone() }.problems(),
            pb::CancelWorkflowRequest { run_id: a.clone(), reason: b.clone() }.problems(),
        ];
        for p in &all {
            well_formed(p)?;
        }
    }

    #[test]
    fn timestamps_convert_without_panic(seconds in any::<i64>(), nanos in any::<i32>()) {
        let t = convert::from_timestamp(&prost_types::Timestamp { seconds, nanos });
        let back = convert::timestamp(t);
        let _ = t.to_rfc3339();
        prop_assert!((0..1_000_000_000).contains(&back.nanos));
    }
}
