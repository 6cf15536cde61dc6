//! CloudStack request signing, exactly as the management server checks it.
//!
//! Every parameter except `signature` is signed. Names are sorted by their bytes
//! (case-sensitively); each pair is `name=` + the value encoded like Java's
//! `URLEncoder.encode(v, "UTF-8")` with `+` replaced by `%20`; pairs are joined with `&`; the
//! whole string is lower-cased; HMAC-SHA1 with the secret key; standard Base64. The simulator
//! verifies with the same functions, the unit tests check them against an independent
//! re-implementation.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;

/// Encodes like Java's `URLEncoder.encode(v, "UTF-8")`, but with a space as `%20`: bytes of
/// `A-Z a-z 0-9 . - * _` stay, every other byte becomes `%XX` (upper-case hex).
pub fn java_url_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'*' | b'_') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The encoded, sorted `name=value&…` query (not lower-cased), `signature` left out.
pub fn canonical_query(params: &[(String, String)]) -> String {
    let mut pairs: Vec<(&str, &str)> = params
        .iter()
        .filter(|(k, _)| k != "signature")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    pairs.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()).then(a.1.cmp(b.1)));
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", java_url_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The Base64 HMAC-SHA1 signature of `params` (which must not contain `signature`).
pub fn signature(params: &[(String, String)], secret_key: &str) -> String {
    let to_sign = canonical_query(params).to_lowercase();
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match Hmac::<Sha1>::new_from_slice(secret_key.as_bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(to_sign.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Constant-time comparison of two signatures.
pub fn signatures_match(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `2030-01-01T00:00:00+0000` (UTC), the format CloudStack expects for `expires`.
pub fn format_expires(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}+0000",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Parses `yyyy-MM-ddTHH:mm:ss` followed by `Z` or `±HHMM`.
pub fn parse_expires(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let offset_secs = match &s[19..] {
        "Z" => 0,
        tz if tz.len() == 5 && (tz.starts_with('+') || tz.starts_with('-')) => {
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            let hh = tz.get(1..3)?.parse::<i64>().ok()?;
            let mm = tz.get(3..5)?.parse::<i64>().ok()?;
            sign * (hh * 3600 + mm * 60)
        }
        _ => return None,
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se - offset_secs;
    u64::try_from(secs).ok().map(|s| UNIX_EPOCH + Duration::from_secs(s))
}

// Howard Hinnant's civil calendar algorithms.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// A deliberately naive second implementation of the rule, written from the spec text.
    fn reference_string_to_sign(params: &[(String, String)]) -> String {
        let mut names: Vec<&String> = params.iter().map(|(k, _)| k).collect();
        names.sort(); // String ordering is byte ordering.
        let mut parts = Vec::new();
        for n in names {
            let v = &params.iter().find(|(k, _)| k == n).unwrap().1;
            let mut enc = String::new();
            for c in v.chars() {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    let keep = b.is_ascii_uppercase()
                        || b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || b == b'.'
                        || b == b'-'
                        || b == b'*'
                        || b == b'_';
                    if keep {
                        enc.push(b as char);
                    } else if b == b' ' {
                        enc.push_str("%20");
                    } else {
                        enc.push_str(&format!("%{:02X}", b));
                    }
                }
            }
            parts.push(format!("{}={}", n, enc));
        }
        parts.join("&").to_lowercase()
    }

    #[test]
    fn encodes_like_java_urlencoder_with_space_as_percent_20() {
        assert_eq!(java_url_encode("a b"), "a%20b");
        assert_eq!(java_url_encode("~"), "%7E");
        assert_eq!(java_url_encode("*._-"), "*._-");
        assert_eq!(java_url_encode("a+b/c"), "a%2Bb%2Fc");
        assert_eq!(java_url_encode("é"), "%C3%A9");
        assert_eq!(java_url_encode("="), "%3D");
    }

    #[test]
    fn string_to_sign_matches_the_reference_implementation() {
        let params = p(&[
            ("command", "listVirtualMachines"),
            ("apiKey", "AbC~123"),
            ("response", "json"),
            ("signatureVersion", "3"),
            ("expires", "2030-01-01T00:00:00+0000"),
            ("name", "web server 01+*~/é✓"),
            ("Zeta", "Upper"),
            ("zeta2", "x"),
            ("details[0].cpuNumber", "2"),
        ]);
        let ours = canonical_query(&params).to_lowercase();
        assert_eq!(ours, reference_string_to_sign(&params));
        // Byte order puts upper-case names before lower-case ones.
        assert!(ours.starts_with("zeta=upper&apikey=abc%7e123&command=listvirtualmachines"));
        assert!(ours.contains("name=web%20server%2001%2b*%7e%2f%c3%a9%e2%9c%93"));
    }

    #[test]
    fn signature_matches_a_known_vector() {
        // HMAC-SHA1("secret", "apikey=key&command=listzones&response=json"), computed with
        // `printf %s 'apikey=key&command=listzones&response=json' | openssl dgst -sha1
        // -hmac secret -binary | base64`.
        let params = p(&[("command", "listZones"), ("apiKey", "KEY"), ("response", "json")]);
        assert_eq!(
            canonical_query(&params).to_lowercase(),
            "apikey=key&command=listzones&response=json"
        );
        assert_eq!(signature(&params, "secret"), KNOWN_SIGNATURE);
    }

    const KNOWN_SIGNATURE: &str = "CB2VceYQ2lFqNkAe+39yeUIsH5w=";

    #[test]
    fn signature_ignores_the_signature_parameter() {
        let mut params = p(&[("command", "listZones"), ("apiKey", "k")]);
        let s = signature(&params, "s");
        params.push(("signature".into(), "whatever".into()));
        assert_eq!(signature(&params, "s"), s);
    }

    #[test]
    fn expires_round_trips() {
        let t = UNIX_EPOCH + Duration::from_secs(1_893_456_000); // 2030-01-01T00:00:00Z
        assert_eq!(format_expires(t), "2030-01-01T00:00:00+0000");
        assert_eq!(parse_expires("2030-01-01T00:00:00+0000"), Some(t));
        assert_eq!(parse_expires("2030-01-01T01:00:00+0100"), Some(t));
        assert_eq!(parse_expires("2030-01-01T00:00:00Z"), Some(t));
        assert_eq!(parse_expires("garbage"), None);
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(format_expires(leap), "2000-02-29T00:00:00+0000");
    }
}
