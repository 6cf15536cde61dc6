use super::*;

fn known(a: &str) -> bool {
    matches!(a, "act" | "undo")
}

fn load(src: &str) -> Result<Definition, DefinitionError> {
    parse("x.toml", src, &known)
}

const GOOD: &str = r#"
name = "x"
[defaults]
timeout = "10s"
retry = { max_attempts = 3, initial_delay = "100ms", multiplier = 2.0, max_delay = "1s", jitter = 0.0 }
[[step]]
name = "a"
action = "act"
compensate = "undo"
skip_if = "skip_a"
[[step]]
name = "b"
action = "act"
compensate = "none"
timeout = "1s"
retry = { max_attempts = 7 }
[hold]
signal = "end-test"
duration_input = "test_duration"
enabled_input = "auto_cleanup"
[[teardown]]
name = "t"
action = "act"
"#;

#[test]
fn parses_a_full_definition() {
    let d = load(GOOD).unwrap();
    assert_eq!(d.steps.len(), 2);
    assert_eq!(d.steps[0].undo, Undo::Action("undo".into()));
    assert_eq!(d.steps[1].undo, Undo::Nothing);
    assert_eq!(d.steps[1].retry.max_attempts, 7);
    assert_eq!(d.steps[1].retry.initial_delay, Duration::from_millis(100));
    assert_eq!(d.steps[0].timeout, Duration::from_secs(10));
    assert_eq!(d.steps[1].timeout, Duration::from_secs(1));
    assert_eq!(d.teardown[0].undo, Undo::Nothing);
    assert_eq!(d.hash.len(), 64);
    let input = serde_json::json!({"skip_a": true, "auto_cleanup": true, "test_duration": "2m"});
    assert!(d.skipped(Phase::Forward, 0, &input).is_some());
    assert!(d.skipped(Phase::Forward, 1, &input).is_none());
    assert_eq!(d.hold_duration(&input).unwrap(), Some(Duration::from_secs(120)));
    let no_auto = serde_json::json!({"test_duration": "2m"});
    assert_eq!(d.hold_duration(&no_auto).unwrap(), None);
    let bad = serde_json::json!({"auto_cleanup": true, "test_duration": "later"});
    assert!(d
        .validate_input(&bad)
        .unwrap_err()
        .to_string()
        .contains("test_duration: "));
    assert!(d.validate_input(&bad).unwrap_err().to_string().contains("later"));
}

fn problem(src: &str) -> DefinitionError {
    load(src).unwrap_err()
}

#[test]
fn rejects_unknown_action_naming_the_step() {
    let e = problem("name='x'\n[[step]]\nname='a'\naction='nope'\ncompensate='none'\n");
    assert_eq!(e.step.as_deref(), Some("a"));
    assert!(e.problem.contains("unknown action"), "{e}");
    assert!(e.to_string().starts_with("x.toml, step \"a\""), "{e}");
}

#[test]
fn rejects_duplicates_bad_durations_and_missing_compensation() {
    let dup = problem("name='x'\n[[step]]\nname='a'\naction='act'\ncompensate='none'\n[[step]]\nname='a'\naction='act'\ncompensate='none'\n");
    assert!(dup.problem.contains("duplicate"));
    let bad = problem("name='x'\n[[step]]\nname='a'\naction='act'\ncompensate='none'\ntimeout='soon'\n");
    assert!(bad.problem.contains("bad duration in timeout"), "{bad}");
    let missing = problem("name='x'\n[[step]]\nname='a'\naction='act'\n");
    assert!(missing.problem.contains("missing compensation"));
    let unknown_undo = problem("name='x'\n[[step]]\nname='a'\naction='act'\ncompensate='zap'\n");
    assert!(unknown_undo.problem.contains("unknown compensation"));
    let both = problem("name='x'\n[[step]]\nname='a'\naction='act'\ncompensate='undo'\nirreversible=true\n");
    assert!(both.problem.contains("both"));
    let retry = problem("name='x'\n[[step]]\nname='a'\naction='act'\ncompensate='none'\nretry={max_attempts=0}\n");
    assert!(retry.problem.contains("max_attempts"));
    let jitter = problem("name='x'\n[[step]]\nname='a'\naction='act'\ncompensate='none'\nretry={jitter=2.0}\n");
    assert!(jitter.problem.contains("jitter"));
    let teardown_no_hold = problem(
        "name='x'\n[[step]]\nname='a'\naction='act'\ncompensate='none'\n[[teardown]]\nname='t'\naction='act'\n",
    );
    assert!(teardown_no_hold.problem.contains("hold"));
    let unknown_field = problem("name='x'\n[[step]]\nname='a'\naction='act'\ncompensate='none'\ncolour='red'\n");
    assert!(unknown_field.problem.contains("colour"), "{unknown_field}");
    let empty = problem("name='x'\n");
    assert!(empty.problem.contains("at least one"));
}

#[test]
fn retry_delay_grows_caps_and_jitters() {
    let p = RetryPolicy {
        max_attempts: 10,
        initial_delay: Duration::from_millis(100),
        multiplier: 2.0,
        max_delay: Duration::from_millis(500),
        jitter: 0.5,
    };
    assert_eq!(p.delay(1, 0.0), Duration::from_millis(100));
    assert_eq!(p.delay(2, 0.0), Duration::from_millis(200));
    assert_eq!(p.delay(5, 0.0), Duration::from_millis(500));
    assert_eq!(p.delay(1, 1.0), Duration::from_millis(150));
    assert_eq!(p.delay(1, -1.0), Duration::from_millis(50));
}

#[test]
fn embedded_definitions_all_load() {
    let cat = Catalog::load(None, &|a| crate::steps::builtin_names().contains(a)).unwrap();
    assert!(cat.get("noop-6").is_some());
    assert!(cat.get("crash-saga").is_some());
}

/// Every status a failover job can show is one the API documents (and accepts as a filter).
#[test]
fn failover_statuses_are_the_documented_ones() {
    use crate::domain::failover::JOB_STATUSES;
    for (file, text) in EMBEDDED.iter().filter(|(f, _)| f.contains("failover")) {
        let def = parse(file, text, &|_| true).unwrap();
        let steps = def
            .steps
            .iter()
            .chain(&def.teardown)
            .filter_map(|s| s.status.as_deref());
        let hold = def.hold.iter().filter_map(|h| h.status.as_deref());
        for status in steps.chain(hold) {
            assert!(JOB_STATUSES.contains(&status), "{file}: {status}");
        }
        for state in [
            RunState::Pending,
            RunState::Completed,
            RunState::Compensating {
                step: 0,
                attempt: 1,
                cause: crate::domain::run::Cause::Cancelled { reason: "x".into() },
            },
        ] {
            let status = def.display_status(&state);
            assert!(JOB_STATUSES.contains(&status.as_str()), "{file}: {status}");
        }
    }
}

#[test]
fn a_directory_overrides_and_must_match_names() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("noop-6.toml"),
        "name='noop-6'\n[[step]]\nname='only'\naction='noop'\ncompensate='none'\n",
    )
    .unwrap();
    let known = |a: &str| crate::steps::builtin_names().contains(a);
    let cat = Catalog::load(Some(dir.path()), &known).unwrap();
    assert_eq!(cat.get("noop-6").unwrap().steps.len(), 1);
    std::fs::write(
        dir.path().join("other.toml"),
        "name='mismatch'\n[[step]]\nname='a'\naction='noop'\ncompensate='none'\n",
    )
    .unwrap();
    let e = Catalog::load(Some(dir.path()), &known).unwrap_err();
    assert!(e.problem.contains("does not match"), "{e}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 300, ..Default::default() })]

    /// Any text, and any mutation of an embedded definition, loads or is refused naming the
    /// file (and the step, where there is one); nothing panics.
    #[test]
    fn the_loader_refuses_with_a_reason_and_never_panics(
        text in proptest::prelude::any::<String>(),
        cut in 0usize..4000,
        insert in "[\\[\\]=a-z_\"'0-9\\.\n ]{0,40}",
    ) {
        let known = |a: &str| crate::steps::builtin_names().contains(a) || a.starts_with("failover.");
        if let Err(e) = parse("random.toml", &text, &known) {
            proptest::prop_assert!(e.file == "random.toml" && !e.problem.is_empty());
        }
        for (file, source) in EMBEDDED {
            let at = source.char_indices().map(|(i, _)| i).nth(cut % source.chars().count()).unwrap_or(0);
            let mutated = format!("{}{}{}", &source[..at], insert, &source[at..]);
            if let Err(e) = parse(file, &mutated, &known) {
                proptest::prop_assert!(e.file == *file && !e.problem.is_empty());
            }
        }
    }
}
