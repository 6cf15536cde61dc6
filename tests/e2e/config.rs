//! The configuration file under the environment and the flags, as `tern config print` shows
//! it and as a command runs with it; mistakes named; completions and man pages.

use std::process::Command;

/// Runs `tern` with `args` and `env` (and no TERN_* from the test's own environment);
/// (exit code, stdout, stderr).
fn tern(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tern"));
    for (k, _) in std::env::vars() {
        if k.starts_with("TERN_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.args(args).envs(env.iter().copied()).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn line<'a>(out: &'a str, key: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("no {key} in:\n{out}"))
}

#[test]
fn the_file_is_under_the_environment_and_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("from-file.db");
    let file = dir.path().join("tern.toml");
    std::fs::write(
        &file,
        format!(
            "database = \"sqlite://{}\"\nlease_ttl = \"7s\"\nrate-limit = 50\nmetrics_listen = \"127.0.0.1:9464\"\n\n\
             [server]\nlisten = \"127.0.0.1:6000\"\ninsecure_no_auth = true\n",
            db.display()
        ),
    )
    .unwrap();
    let f = file.to_str().unwrap();
    let (code, out, err) = tern(
        &["--config", f, "config", "print", "server", "--rate-limit", "5"],
        &[
            ("TERN_POLL_INTERVAL", "3s"),
            ("TERN_CLOUDSTACK_SECRET_KEY", "never-shown-4f1"),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(line(&out, "lease_ttl").ends_with("\"7s\"  # file"), "{out}");
    assert!(line(&out, "listen").ends_with("\"127.0.0.1:6000\"  # file"), "{out}");
    assert!(line(&out, "insecure_no_auth").ends_with("\"true\"  # file"), "{out}");
    assert!(line(&out, "rate_limit").ends_with("\"5\"  # flag"), "{out}");
    assert!(line(&out, "poll_interval").ends_with("\"3s\"  # environment"), "{out}");
    assert!(line(&out, "concurrency").ends_with("\"64\"  # default"), "{out}");
    assert!(line(&out, "metrics_listen").contains("127.0.0.1:9464"), "{out}");
    assert!(
        out.contains("# cloudstack_secret_key: set in TERN_CLOUDSTACK_SECRET_KEY"),
        "{out}"
    );
    assert!(!out.contains("never-shown-4f1"), "a secret was printed:\n{out}");

    // The environment over the file; TERN_CONFIG names the file.
    let (code, out, err) = tern(
        &["config", "print", "worker"],
        &[
            ("TERN_CONFIG", f),
            ("TERN_LEASE_TTL", "9s"),
            ("TERN_CLOUDSTACK_API_KEY", "key-7a"),
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert!(line(&out, "lease_ttl").ends_with("\"9s\"  # environment"), "{out}");
    assert!(
        !out.contains("listen = \"127.0.0.1:6000\""),
        "[server] applies to the server only:\n{out}"
    );
    assert!(line(&out, "cloudstack_api_key").contains("(redacted)"), "{out}");
    assert!(!out.contains("key-7a"), "{out}");

    // A command runs with the file's database.
    let (code, _, err) = tern(&["--config", f, "admin", "migrate"], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(db.exists(), "the file's database was used");

    // A password in the database URL is not shown.
    std::fs::write(&file, "database = \"postgres://tern:pw-8c2e@db.example/tern\"\n").unwrap();
    let (code, out, err) = tern(&["--config", f, "config", "print", "server"], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!out.contains("pw-8c2e"), "{out}");
    assert!(line(&out, "database").contains("tern:***@db.example"), "{out}");
}

#[test]
fn a_mistake_in_the_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tern.toml");
    let f = file.to_str().unwrap().to_string();
    for (text, want) in [
        ("lease_tll = \"7s\"\n", "lease_tll is not a setting of any tern command"),
        (
            "[server]\nsim_listen = \"127.0.0.1:1\"\n",
            "server.sim_listen is not a setting of tern server",
        ),
        ("[srever]\nlisten = \"x\"\n", "[srever] is not a tern command"),
        (
            "lease_ttl = [1, 2]\n",
            "lease_ttl must be a string, a number or true/false",
        ),
        ("lease_ttl = \n", "is not valid TOML"),
        (
            "cloudstack_secret_key = \"x\"\n",
            "cloudstack_secret_key is not a setting of any tern command",
        ),
    ] {
        std::fs::write(&file, text).unwrap();
        let (code, _, err) = tern(&["--config", &f, "config", "print", "server"], &[]);
        assert_eq!(code, Some(2), "{text}: {err}");
        assert!(err.contains(want) && err.contains(&f), "{text}: {err}");
    }
    let (code, _, err) = tern(&["--config", "/nonexistent/tern.toml", "list"], &[]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("/nonexistent/tern.toml"), "{err}");
    // A value of the wrong kind is clap's usage error, naming the flag.
    std::fs::write(&file, "lease_ttl = \"soon\"\n").unwrap();
    let (code, _, err) = tern(&["--config", &f, "config", "print", "worker"], &[]);
    assert_ne!(code, Some(0), "{err}");
    assert!(err.contains("--lease-ttl"), "{err}");
}

#[test]
fn completions_and_man_pages_come_from_the_command_line_definition() {
    let (code, out, err) = tern(&["completions", "bash"], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("_tern()") && out.contains("test-failover") && out.contains("--lease-ttl"),
        "{out}"
    );
    let (code, out, _) = tern(&["completions", "zsh"], &[]);
    assert_eq!(code, Some(0));
    assert!(out.contains("#compdef tern"), "{out}");
    let (code, out, err) = tern(&["man"], &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(".TH tern 1") && out.contains("test\\-failover"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = tern(&["man", "--dir", dir.path().to_str().unwrap()], &[]);
    assert_eq!(code, Some(0), "{err}");
    let server = std::fs::read_to_string(dir.path().join("tern-server.1")).unwrap();
    assert!(server.contains("lease\\-ttl"), "{server}");
    // `man` renders it (when man is installed).
    if let Ok(out) = Command::new("man")
        .arg("-l")
        .arg(dir.path().join("tern.1"))
        .env("MANPAGER", "cat")
        .output()
    {
        if out.status.success() {
            assert!(String::from_utf8_lossy(&out.stdout).contains("tern"), "man -l");
        }
    }
}
