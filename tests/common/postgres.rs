//! A PostgreSQL server of a test's own (initdb, on a free port, in a temporary directory), for
//! what the shared one cannot do: take TLS connections only, or stop and start again.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::pki::Pki;

/// The PostgreSQL server binaries of this machine (Debian's layout), the newest version. None
/// only where PostgreSQL tests do not run (checked: in CI they must).
pub fn server_binaries() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    versions.sort();
    let found = versions.pop();
    if found.is_none() {
        assert!(
            super::pg_url().is_none(),
            "PostgreSQL tests run here, so its server binaries must be in /usr/lib/postgresql"
        );
        eprintln!("skipping: no PostgreSQL server binaries");
    }
    found
}

/// Runs a PostgreSQL binary as the `postgres` user (initdb refuses root).
fn as_postgres(bin: &Path, args: &[&str]) -> std::process::Output {
    let out = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin)
        .args(args)
        .output()
        .expect("runuser");
    assert!(
        out.status.success(),
        "{} {args:?}: {}{}",
        bin.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A PostgreSQL server running from a temporary directory; stopped when dropped.
pub struct OwnPostgres {
    bin: PathBuf,
    data: PathBuf,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
    }
}

impl OwnPostgres {
    /// A new server with trust authentication on 127.0.0.1; with `tls`, it takes TLS
    /// connections only, with the server certificate of `tls`.
    pub fn start(bin: PathBuf, tls: Option<&Pki>) -> OwnPostgres {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let chown = |p: &Path| {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(p)
                .status()
                .unwrap();
            assert!(ok.success());
        };
        chown(dir.path());
        as_postgres(
            &bin.join("initdb"),
            &["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres"],
        );
        let port = super::free_port();
        let mut conf = format!(
            "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n",
            dir.path().display()
        );
        let mut hba = "local all all trust\nhost all all 127.0.0.1/32 trust\n";
        if let Some(pki) = tls {
            std::fs::copy(pki.path("server.pem"), data.join("server.crt")).unwrap();
            std::fs::copy(pki.path("server.key"), data.join("server.key")).unwrap();
            Command::new("chmod")
                .arg("600")
                .arg(data.join("server.key"))
                .status()
                .unwrap();
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
            // TLS only: a plaintext connection finds no matching line.
            hba = "local all all trust\nhostssl all all 127.0.0.1/32 trust\n";
        }
        chown(&data);
        let mut pg_conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        pg_conf.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), pg_conf).unwrap();
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        let pg = OwnPostgres { bin, data, port, dir };
        pg.up();
        pg
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server (again).
    pub fn up(&self) {
        let log = self.dir.path().join("log");
        as_postgres(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "start",
            ],
        );
    }

    /// Stops the server at once, as a crash would (`-m immediate`).
    pub fn down(&self) {
        as_postgres(
            &self.bin.join("pg_ctl"),
            &["-D", self.data.to_str().unwrap(), "-m", "immediate", "-w", "stop"],
        );
    }
}
