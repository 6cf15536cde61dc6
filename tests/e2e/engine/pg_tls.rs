//! Tern's PostgreSQL connection over TLS: a PostgreSQL server of this test's own (initdb, on a
//! free port) that takes TLS connections only, with a certificate from a private CA. With
//! `sslmode=verify-full&sslrootcert=<ca>` the store opens and works; without TLS, or without the
//! CA, it is refused.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::pki::Pki;

/// The PostgreSQL server binaries of this machine (Debian's layout), the newest version.
fn pg_bin() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop()
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
struct TlsPostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", self.data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
    }
}

fn start(bin: PathBuf, pki: &Pki) -> TlsPostgres {
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
    std::fs::copy(pki.path("server.pem"), data.join("server.crt")).unwrap();
    std::fs::copy(pki.path("server.key"), data.join("server.key")).unwrap();
    chown(&data);
    Command::new("chmod")
        .arg("600")
        .arg(data.join("server.key"))
        .status()
        .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let conf = format!(
        "\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
         ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
        dir.path().display()
    );
    let mut pg_conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
    pg_conf.push_str(&conf);
    std::fs::write(data.join("postgresql.conf"), pg_conf).unwrap();
    // TLS only: a plaintext connection finds no matching line.
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    let log = dir.path().join("log");
    as_postgres(
        &bin.join("pg_ctl"),
        &["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-w", "start"],
    );
    TlsPostgres {
        bin,
        data,
        port,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_talks_to_postgres_over_tls_with_a_private_ca() {
    let Some(bin) = pg_bin() else {
        assert!(
            crate::common::pg_url().is_none(),
            "PostgreSQL tests run here, so its server binaries must be in /usr/lib/postgresql"
        );
        eprintln!("skipping: no PostgreSQL server binaries");
        return;
    };
    let pki = Pki::new();
    let pg = start(bin, &pki);
    let ca = pki.path("ca.pem");
    let base = format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port);

    let url = format!("{base}?sslmode=verify-full&sslrootcert={}", ca.display());
    let store = tern::store::open(&url).await.expect("TLS with the private CA");
    assert_eq!(store.count_by_status().await.unwrap().len(), 0);
    assert!(store.vm_records().await.unwrap().is_empty());

    let plaintext = tern::store::open(&format!("{base}?sslmode=disable")).await;
    let e = plaintext.err().expect("a plaintext connection is refused").to_string();
    assert!(e.contains("no encryption") || e.contains("pg_hba"), "{e}");
    let unknown_ca = tern::store::open(&format!("{base}?sslmode=verify-full")).await;
    assert!(
        unknown_ca.is_err(),
        "a server certificate from an unknown CA is refused"
    );
}
