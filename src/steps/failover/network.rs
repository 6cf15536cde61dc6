//! network configuration (live failover): the production VM's NICs must sit, in the source's
//! order, on the networks the mappings name, with the MAC and IP kept where they were asked
//! for. The VM is deployed so; this step checks and records the result.

use serde_json::{json, Value};

use super::{fail, Attempt};
use crate::engine::action::ActionError;

pub(crate) async fn configure(attempt: &Attempt<'_>) -> Result<Value, ActionError> {
    const CODE: &str = "NETWORK_CONFIG_FAILED";
    let want = super::vm::nic_plan(attempt).await?;
    let vm = attempt
        .find_vm()
        .await?
        .ok_or_else(|| ActionError::permanent(CODE, format!("VM {} does not exist", attempt.vm_name())))?;
    let vm = attempt.cloud().get_vm(&vm.id).await.map_err(|e| fail(CODE, e))?;
    let mut wrong = Vec::new();
    for (i, planned) in want.iter().enumerate() {
        let want = &planned.request;
        match vm.nics.get(i) {
            None => wrong.push(format!("nics[{i}]: missing (wanted on network {})", want.network_id)),
            Some(have) => {
                if have.network_id != want.network_id {
                    wrong.push(format!(
                        "nics[{i}]: on network {}, wanted {}",
                        have.network_id, want.network_id
                    ));
                }
                if want.ip.is_some() && have.ip_address != want.ip {
                    wrong.push(format!("nics[{i}]: IP {:?}, wanted {:?}", have.ip_address, want.ip));
                }
                let same_mac = |m: &String| have.mac_address.as_ref().is_some_and(|h| h.eq_ignore_ascii_case(m));
                if want.mac.as_ref().is_some_and(|m| !same_mac(m)) {
                    wrong.push(format!("nics[{i}]: MAC {:?}, wanted {:?}", have.mac_address, want.mac));
                }
            }
        }
    }
    if !wrong.is_empty() {
        return Err(ActionError::permanent(
            CODE,
            format!("VM {} is not on its mapped networks: {}", vm.id, wrong.join("; ")),
        ));
    }
    let nics: Vec<Value> = vm
        .nics
        .iter()
        .map(|n| json!({"network_id": n.network_id, "ip": n.ip_address, "mac": n.mac_address}))
        .collect();
    let networks: Vec<&str> = vm.nics.iter().map(|n| n.network_id.as_str()).collect();
    Ok(json!({"vm_id": vm.id, "networks": networks, "nics": nics}))
}
