//! What a request may carry: the length of every string, the size of every list and map, and
//! the characters no field may hold. Every refusal names its field, and a value quoted back in
//! an error is cut short, so a huge value never makes the reply itself too large.
//!
//! The limits are documented in the proto's comments and the README; a change here is a change
//! of the API.

/// Ids: vm_id, request_id, job and run ids, page tokens, CloudStack ids, resolved_by.
pub const MAX_ID: usize = 200;
/// Names: vm_name, network names, definition and signal names, os_type, MACs, IPs.
pub const MAX_NAME: usize = 255;
/// Free text: a cancel or resolve reason, a notification setting's value.
pub const MAX_TEXT: usize = 1000;
/// Entries of a map or list in a request: network_mappings, custom_config,
/// notification_config, a VM's NICs, a SetNetworkMappings' mappings.
pub const MAX_ENTRIES: usize = 64;
/// Disks of one VM.
pub const MAX_DISKS: usize = 64;
/// A raw workflow's input (`input_json`), in bytes.
pub const MAX_INPUT_BYTES: usize = 64 * 1024;

/// The most bytes a value takes when an error quotes it (escapes included).
const SHOWN: usize = 80;

/// `value` as an error quotes it: Rust-escaped (a control character shows as `\u{..}`), cut
/// to at most 80 bytes with "…".
pub fn shown(value: &str) -> String {
    let quoted = format!("{value:?}");
    if quoted.len() <= SHOWN {
        return quoted;
    }
    let mut cut = SHOWN - "…".len();
    while !quoted.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &quoted[..cut])
}

/// Field problems, collected in order: (the field, why).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<(String, String)>);

impl Problems {
    pub fn new() -> Problems {
        Problems::default()
    }

    pub fn push(&mut self, field: impl Into<String>, why: impl Into<String>) {
        self.0.push((field.into(), why.into()));
    }

    pub fn extend(&mut self, other: impl IntoIterator<Item = (String, String)>) {
        self.0.extend(other);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Checks a one-line value: at most `max` characters, no control character (a NUL would
    /// be refused by PostgreSQL, a newline forges log lines). True when it passed.
    pub fn line(&mut self, field: &str, value: &str, max: usize) -> bool {
        self.checked(field, value, max, |c| c.is_control())
    }

    /// As [`Problems::line`], and not empty once trimmed.
    pub fn required(&mut self, field: &str, value: &str, max: usize) -> bool {
        if value.trim().is_empty() {
            self.push(field, "is required");
            return false;
        }
        self.line(field, value, max)
    }

    /// Checks free text: at most `max` characters, no control character but newlines and tabs.
    pub fn text(&mut self, field: &str, value: &str, max: usize) -> bool {
        self.checked(field, value, max, |c| c.is_control() && c != '\n' && c != '\t')
    }

    /// Checks that a map or list has at most `max` entries. True when it passed.
    pub fn entries(&mut self, field: &str, count: usize, max: usize) -> bool {
        if count > max {
            self.push(field, format!("has {count} entries, more than the {max} allowed"));
            return false;
        }
        true
    }

    /// Checks each key and value of a string map: keys as names, values as `max_value` long
    /// lines, the field of each named `field[key]`.
    pub fn map<'a>(
        &mut self,
        field: &str,
        map: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
        max_value: usize,
    ) {
        if !self.entries(field, map.len(), MAX_ENTRIES) {
            return;
        }
        for (key, value) in map {
            if !self.line(&format!("{field} key"), key, MAX_NAME) {
                continue;
            }
            self.line(&format!("{field}[{key}]"), value, max_value);
        }
    }

    /// Checks every string in a JSON value (keys too) for NUL and other control characters
    /// but newlines and tabs: PostgreSQL refuses `\u0000` in JSON.
    pub fn json_strings(&mut self, field: &str, value: &serde_json::Value) {
        use serde_json::Value;
        let bad = |s: &str| s.chars().any(|c| c.is_control() && c != '\n' && c != '\t');
        match value {
            Value::String(s) if bad(s) => self.push(field, "contains a control character (e.g. NUL)"),
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    self.json_strings(&format!("{field}[{i}]"), v);
                }
            }
            Value::Object(map) => {
                for (k, v) in map {
                    if bad(k) {
                        self.push(field, "has a key with a control character (e.g. NUL)");
                        continue;
                    }
                    self.json_strings(&format!("{field}.{k}"), v);
                }
            }
            _ => {}
        }
    }

    fn checked(&mut self, field: &str, value: &str, max: usize, bad: impl Fn(char) -> bool) -> bool {
        let count = value.chars().count();
        if count > max {
            self.push(
                field,
                format!("is {count} characters long, more than the {max} allowed"),
            );
            return false;
        }
        if value.chars().any(bad) {
            self.push(field, "contains a control character (e.g. NUL or a newline)");
            return false;
        }
        true
    }
}

impl std::fmt::Display for Problems {
    /// `field: why; field: why`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let all: Vec<String> = self.0.iter().map(|(field, why)| format!("{field}: {why}")).collect();
        f.write_str(&all.join("; "))
    }
}

impl IntoIterator for Problems {
    type Item = (String, String);
    type IntoIter = std::vec::IntoIter<(String, String)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_and_control_characters_are_refused_naming_the_field() {
        let mut p = Problems::new();
        assert!(p.line("vm_id", "vm-1", MAX_ID));
        assert!(!p.line("vm_id", &"x".repeat(MAX_ID + 1), MAX_ID));
        assert!(!p.line("request_id", "a\0b", MAX_ID));
        assert!(!p.required("vm_name", "  ", MAX_NAME));
        assert!(p.text("reason", "two\nlines\tand a tab", MAX_TEXT));
        assert!(!p.text("reason", "nul\0", MAX_TEXT));
        let fields: Vec<&str> = p.0.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["vm_id", "request_id", "vm_name", "reason"]);
        assert!(p.0[0].1.contains("201 characters"), "{:?}", p.0[0]);
    }

    #[test]
    fn maps_name_the_key_and_json_names_the_path() {
        let mut p = Problems::new();
        let m = std::collections::BTreeMap::from([("VM Network".to_string(), "net\0".to_string())]);
        p.map("network_mappings", m.iter(), MAX_ID);
        let v = serde_json::json!({"vm_id": "a", "nested": [{"x": "bad\u{0}"}]});
        p.json_strings("input_json", &v);
        let fields: Vec<&str> = p.0.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(fields, ["network_mappings[VM Network]", "input_json.nested[0].x"]);
    }

    #[test]
    fn shown_values_are_cut_on_a_character_boundary() {
        assert_eq!(shown("abc"), "\"abc\"");
        for long in ["é".repeat(1000), "\u{e000}\0".repeat(500)] {
            let s = shown(&long);
            assert!(s.ends_with('…') && s.len() <= 80, "{s}");
        }
    }
}
