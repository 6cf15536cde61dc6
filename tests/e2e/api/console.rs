//! The web console in a real browser: headless Chromium (Debian's `chromium`) driven by
//! Playwright (tests/e2e/api/console/browser.py) against a server without authentication and
//! one with. Screenshots land in target/console-screenshots (the README's are copies).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_runs_failovers_in_a_real_browser() {
    if std::env::var("TERN_SKIP_BROWSER").is_ok_and(|v| v == "1") {
        eprintln!("skipping: TERN_SKIP_BROWSER=1");
        return;
    }
    let chromium = std::env::var("TERN_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !std::path::Path::new(&chromium).exists() {
        // CI installs it (.ci/run); elsewhere the test says why it did not run.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{chromium} is missing: CI must run the browser test (apt-get install chromium)"
        );
        eprintln!("skipping: no {chromium} (apt-get install chromium; CI installs it)");
        return;
    }
    let super::rest::Pair {
        open,
        secured,
        viewer,
        operator,
        dbs: _dbs,
    } = super::rest::Pair::new().await;
    let vms = &open.inv.vms;
    let config = serde_json::json!({
        "base": open.rest,
        "auth_base": secured.rest,
        "tokens": {"viewer": viewer, "operator": operator},
        "vms": {"test": vms[0].vm_id, "cancel": vms[1].vm_id},
        "screenshots": concat!(env!("CARGO_MANIFEST_DIR"), "/target/console-screenshots"),
    });
    let text = super::python_client("console/run.sh", &[&config.to_string()]).await;
    assert!(text.contains("console: all checks passed, no console errors"), "{text}");
}
