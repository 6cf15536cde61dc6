//! Pure domain types shared by every layer: ids, timestamps, durations, step errors.
//!
//! Nothing here does I/O; everything here is serialisable so it can be journaled.

pub mod auth;
pub mod failover;
pub mod inventory;
pub mod limits;
pub mod run;
pub mod validation;

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Milliseconds since the Unix epoch (UTC). Stored as BIGINT in both databases so the
/// two backends compare and index times the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Timestamp(ms)
    }

    pub fn millis(self) -> i64 {
        self.0
    }

    pub fn plus(self, d: Duration) -> Self {
        Timestamp(self.0.saturating_add(d.as_millis().min(i64::MAX as u128) as i64))
    }

    /// Time from `self` until `later`, zero if `later` is not after `self`.
    pub fn until(self, later: Timestamp) -> Duration {
        Duration::from_millis(later.0.saturating_sub(self.0).max(0) as u64)
    }

    /// RFC 3339 in UTC; a time outside 1970..=9999 (a far-off timer a client asked for) is
    /// shown at that bound instead of failing.
    pub fn to_rfc3339(self) -> String {
        const LAST_MS_OF_9999: i64 = 253_402_300_799_999;
        let ms = self.0.clamp(0, LAST_MS_OF_9999) as u64;
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

/// A run's id: a UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunId(pub Uuid);

impl RunId {
    pub fn new() -> Self {
        RunId(Uuid::now_v7())
    }
}

impl Default for RunId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for RunId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(RunId(Uuid::parse_str(s)?))
    }
}

/// Parses a human duration: "30m", "2h", "1h30m", "250ms", "5s".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration like \"30s\", \"5m\" or \"2h\" ({e})"))
}

/// How a step error must be treated. Decided by the error's type where it is raised,
/// never by looking at its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Worth another attempt after a delay (timeouts, 5xx, lost connections).
    Retryable,
    /// Another attempt would fail the same way (bad input, not found, refused).
    Permanent,
}

/// The persisted form of a step failure: what the journal and the API show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepError {
    pub class: ErrorClass,
    /// Machine-readable code, e.g. `SNAPSHOT_FAILED`, `TIMEOUT`, `INTERRUPTED`.
    pub code: String,
    pub message: String,
}

impl StepError {
    pub fn retryable(code: impl Into<String>, message: impl Into<String>) -> Self {
        StepError {
            class: ErrorClass::Retryable,
            code: code.into(),
            message: message.into(),
        }
    }

    pub fn permanent(code: impl Into<String>, message: impl Into<String>) -> Self {
        StepError {
            class: ErrorClass::Permanent,
            code: code.into(),
            message: message.into(),
        }
    }

    pub fn is_retryable(&self) -> bool {
        self.class == ErrorClass::Retryable
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_reject() {
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        // No time formats past year 9999 (or before 1970): it is shown at the bound.
        assert_eq!(Timestamp(i64::MAX).to_rfc3339(), "9999-12-31T23:59:59.999Z");
        assert_eq!(Timestamp(-5).to_rfc3339(), "1970-01-01T00:00:00.000Z");
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn timestamp_arithmetic_saturates() {
        let t = Timestamp(1_000);
        assert_eq!(t.plus(Duration::from_millis(500)), Timestamp(1_500));
        assert_eq!(Timestamp(2_000).until(t), Duration::ZERO);
        assert_eq!(t.until(Timestamp(2_000)), Duration::from_secs(1));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    proptest! {
        /// Durations as people type them, and anything else: parsed or refused, never a panic.
        #[test]
        fn durations_parse_or_are_refused(
            any_text in any::<String>(),
            n in any::<u64>(),
            unit in prop::sample::select(vec!["ms", "s", "m", "h", "d", "days", "w", "y", ""]),
        ) {
            let _ = super::parse_duration(&any_text);
            if let Err(e) = super::parse_duration(&format!("{n}{unit}")) {
                prop_assert!(!e.is_empty());
            }
        }
    }
}
