//! Seeded fault injection: which request fails, and how.
//!
//! The decision for the n-th request of a command is a pure function of
//! `(seed, command, n)`, so the same seed and the same per-command request order give the
//! same faults whatever the interleaving of other commands.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Probabilities (0.0-1.0) of each fault for one command. They are checked in this order on
/// one draw, so their sum should stay at or below 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultRates {
    /// Answer 530 with CloudStack's error body (LINSTOR: HTTP 200 with an error ret_code)
    /// without doing anything.
    pub error_rate: f64,
    /// Sleep `hang_ms` before handling the request, as a server that receives it only then
    /// (held up on the way): CloudStack's `expires` is checked at that moment. A client with a
    /// shorter timeout has given up; the request may still be applied after it did.
    pub hang_rate: f64,
    /// Apply the request, then answer 530 as if it had failed: the client must look the
    /// resource up and adopt it.
    pub lost_reply_rate: f64,
    /// Async commands only: accept the job, then end it with `jobstatus` 2 (errorcode 530).
    pub job_failure_rate: f64,
}

/// The fault plan, a JSON file:
///
/// ```json
/// {
///   "hang_ms": 30000,
///   "default": {"error_rate": 0.0},
///   "commands": {
///     "deployVirtualMachine": {"error_rate": 0.2, "lost_reply_rate": 0.1,
///                              "hang_rate": 0.05, "job_failure_rate": 0.1},
///     "linstor.createSnapshot": {"error_rate": 0.5}
///   }
/// }
/// ```
///
/// `scripted` names exact requests instead of rates: `{"attachVolume": {"0": "job_failure",
/// "1": "job_failure"}}` fails the first two attachVolume requests (0-based, counted since the
/// simulator started) and no others, so a test can fail a step's attempts but not its undo.
///
/// Keys of `commands` are CloudStack command names as sent (case-sensitive) or
/// `linstor.createSnapshot`, `linstor.rollbackSnapshot`, `linstor.deleteSnapshot`,
/// `linstor.listSnapshots`. Commands not listed use `default`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultPlan {
    pub default: FaultRates,
    pub commands: BTreeMap<String, FaultRates>,
    /// How long a hang lasts (default 30 s).
    pub hang_ms: Option<u64>,
    /// Exact faults for exact requests: command -> (0-based request index -> fault).
    pub scripted: BTreeMap<String, BTreeMap<u64, Fault>>,
}

impl FaultPlan {
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// Reads a plan file (JSON, format above).
    pub fn load(path: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let text = std::fs::read_to_string(path).with_context(|| format!("reading fault plan {}", path.display()))?;
        Self::from_json(&text).with_context(|| format!("parsing fault plan {}", path.display()))
    }

    pub fn rates(&self, command: &str) -> FaultRates {
        self.commands.get(command).copied().unwrap_or(self.default)
    }

    pub fn hang(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.hang_ms.unwrap_or(30_000))
    }
}

/// What happens to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    Error,
    Hang,
    LostReply,
    JobFailure,
}

/// One injected fault, as `GET /sim/faults` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultRecord {
    pub command: String,
    /// 0-based index of the request among this command's requests since the sim started.
    pub n: u64,
    pub fault: Fault,
}

/// The fault decision for the `n`-th request of `command`.
pub fn decide(seed: u64, plan: &FaultPlan, command: &str, n: u64, is_async: bool) -> Option<Fault> {
    if let Some(f) = plan.scripted.get(command).and_then(|calls| calls.get(&n)) {
        return match f {
            Fault::JobFailure if !is_async => None,
            other => Some(*other),
        };
    }
    let rates = plan.rates(command);
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ fnv1a(command).rotate_left(17) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let draw: f64 = rng.gen();
    let mut edge = rates.error_rate;
    if draw < edge {
        return Some(Fault::Error);
    }
    edge += rates.hang_rate;
    if draw < edge {
        return Some(Fault::Hang);
    }
    edge += rates.lost_reply_rate;
    if draw < edge {
        return Some(Fault::LostReply);
    }
    edge += rates.job_failure_rate;
    if is_async && draw < edge {
        return Some(Fault::JobFailure);
    }
    None
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_a_function_of_seed_command_and_index() {
        let mut plan = FaultPlan::default();
        plan.commands.insert(
            "attachVolume".into(),
            FaultRates {
                error_rate: 0.3,
                lost_reply_rate: 0.3,
                ..Default::default()
            },
        );
        let run = |seed| {
            (0..50)
                .map(|n| decide(seed, &plan, "attachVolume", n, true))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        assert!(run(7).iter().any(Option::is_some));
        assert!((0..50).all(|n| decide(7, &plan, "listVolumes", n, false).is_none()));
    }

    #[test]
    fn plan_parses_from_json() {
        let plan = FaultPlan::from_json(
            r#"{"default":{"error_rate":0.1},"commands":{"deployVirtualMachine":{"hang_rate":0.5}},"hang_ms":100}"#,
        )
        .unwrap();
        assert_eq!(plan.rates("listVolumes").error_rate, 0.1);
        assert_eq!(plan.rates("deployVirtualMachine").hang_rate, 0.5);
        assert_eq!(plan.hang().as_millis(), 100);
    }
}
