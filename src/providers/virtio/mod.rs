//! VirtIO driver injection: putting viostor & co. into a Windows disk image before it first
//! boots under KVM, while the replicated CloudStack volume is still attached to the OMA
//! appliance VM (where it shows up as a block device).
//!
//! The step using a [`DriverInjector`] is expected to run, on every attempt:
//! [`DriverInjector::device_for`], then [`DriverInjector::is_injected`] (read-only), and only
//! if that says `false`, [`DriverInjector::inject`]. That makes a re-run after a crash skip
//! the injection instead of doing it twice.
//!
//! Implementations: [`CommandInjector`] (runs a configured tool, `virt-v2v-in-place` by
//! default, on the device) and [`SimInjector`] (the simulator's
//! `/sim/volumes/{id}/inject-virtio`). Both map failures to [`ProviderError`]:
//!
//! | failure                                        | error                                     | retryable |
//! |------------------------------------------------|-------------------------------------------|-----------|
//! | no device for the volume / unknown volume      | [`ProviderError::NotFound`]               | no        |
//! | several devices match                          | [`ProviderError::Refused`] (code 0)       | no        |
//! | volume id unusable as a serial, bad pattern    | [`ProviderError::BadParameter`] (code 0)  | no        |
//! | tool exits non-zero (check: other than 0 or 1) | [`ProviderError::Refused`] (code = exit status, 128 + signal if killed by one; 126/127 if it cannot be started) | no |
//! | tool runs longer than its timeout (killed)     | [`ProviderError::Unavailable`]            | yes       |
//! | simulator unreachable / 5xx                    | [`ProviderError::Unavailable`] / [`ProviderError::Internal`] | yes |
//!
//! A failed or timed-out injection may have written part of the drivers
//! ([`ProviderError::Unavailable`] reports `may_have_applied`; a non-zero exit is reported as
//! [`ProviderError::Refused`], which does not, because the tool said it failed: the disk should
//! be treated as suspect and reverted from the protecting snapshot by the step's compensation).

mod command;
mod simulator;

pub use command::{CommandInjector, CommandInjectorConfig};
pub use simulator::SimInjector;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{ProviderError, Result};

/// How long a virtio serial number is: QEMU/CloudStack truncate it to 20 characters.
pub const SERIAL_LEN: usize = 20;

/// What an injection printed, for the run's journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InjectionReport {
    /// The tool's stdout and stderr, interleaved in the order they were read (two pipes: lines
    /// written to both at nearly the same time may appear swapped); only the tail is kept (see
    /// [`CommandInjectorConfig::max_output`]), preceded by a `[… N earlier bytes omitted …]`
    /// line when something was cut.
    pub output: String,
    pub duration_ms: u64,
}

/// Injects VirtIO drivers into a volume's disk while it is attached to the OMA.
#[async_trait]
pub trait DriverInjector: Send + Sync {
    /// Where the volume's disk appears on the OMA (e.g. `/dev/disk/by-id/virtio-<serial>`),
    /// or [`ProviderError::NotFound`].
    async fn device_for(&self, volume_id: &str) -> Result<String>;

    /// Read-only: are the VirtIO drivers (viostor service + driver file) already in the disk?
    async fn is_injected(&self, volume_id: &str, device: &str) -> Result<bool>;

    /// Injects the drivers, unconditionally (call [`DriverInjector::is_injected`] first);
    /// returns the tool's combined output for the journal. Injecting into a disk that already
    /// has the drivers succeeds.
    async fn inject(&self, volume_id: &str, device: &str) -> Result<InjectionReport>;
}

/// The virtio serial number CloudStack's KVM agent gives a volume's disk: the volume UUID
/// without its hyphens, cut to [`SERIAL_LEN`] characters (`diskUuidToSerial` in CloudStack's
/// `LibvirtComputingResource`). It is what `/dev/disk/by-id/virtio-<serial>` is named after.
///
/// Volume ids are checked first (see [`check_volume_id`]), so the serial is safe to put into
/// a path pattern or a command argument.
pub fn serial_for(volume_id: &str) -> Result<String> {
    check_volume_id(volume_id)?;
    Ok(volume_id.chars().filter(|c| *c != '-').take(SERIAL_LEN).collect())
}

/// A volume id must be non-empty ASCII letters, digits, `-`, `_` or `.`, and not start with
/// `-` (so it cannot be read as an option when substituted into a command line) nor contain
/// `/` or `..` (so it cannot leave the device directory). CloudStack ids are UUIDs.
pub fn check_volume_id(volume_id: &str) -> Result<()> {
    let ok = !volume_id.is_empty()
        && !volume_id.starts_with('-')
        && !volume_id.contains("..")
        && volume_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ProviderError::BadParameter {
            code: 0,
            errortext: format!("{volume_id:?} is not a usable volume id"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_is_the_uuid_without_hyphens_cut_to_20() {
        assert_eq!(
            serial_for("6b1f0f5e-2c4d-4e8a-9b7c-0123456789ab").unwrap(),
            "6b1f0f5e2c4d4e8a9b7c"
        );
        assert_eq!(serial_for("short-id").unwrap(), "shortid");
        for bad in ["", "-rf", "a/b", "..", "a b", "a*", "ü"] {
            assert!(
                matches!(serial_for(bad), Err(ProviderError::BadParameter { .. })),
                "{bad:?}"
            );
        }
    }
}
