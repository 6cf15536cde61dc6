//! network configuration (live failover): the production VM's NICs must sit on the networks
//! the mappings name. The VM is deployed on them; this step checks and records the result.

use serde_json::{json, Value};

use super::{fail, Attempt};
use crate::engine::action::ActionError;

pub(crate) async fn configure(attempt: &Attempt<'_>) -> Result<Value, ActionError> {
    const CODE: &str = "NETWORK_CONFIG_FAILED";
    let want = super::vm::networks(attempt).await?;
    let vm = attempt
        .find_vm()
        .await?
        .ok_or_else(|| ActionError::permanent(CODE, format!("VM {} does not exist", attempt.vm_name())))?;
    let vm = attempt.cloud().get_vm(&vm.id).await.map_err(|e| fail(CODE, e))?;
    let have: Vec<String> = vm.nics.iter().map(|n| n.network_id.clone()).collect();
    let missing: Vec<&String> = want.iter().filter(|n| !have.contains(n)).collect();
    if !missing.is_empty() {
        return Err(ActionError::permanent(
            CODE,
            format!("VM {} has no NIC on mapped networks {missing:?}", vm.id),
        ));
    }
    Ok(json!({"vm_id": vm.id, "networks": have}))
}
