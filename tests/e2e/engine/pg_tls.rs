//! Tern's PostgreSQL connection over TLS: a PostgreSQL server of this test's own (initdb, on a
//! free port) that takes TLS connections only, with a certificate from a private CA. With
//! `sslmode=verify-full&sslrootcert=<ca>` the store opens and works; without TLS, or without the
//! CA, it is refused.

use crate::common::pki::Pki;
use crate::common::postgres::{server_binaries, OwnPostgres};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_talks_to_postgres_over_tls_with_a_private_ca() {
    let Some(bin) = server_binaries() else {
        return;
    };
    let pki = Pki::new();
    let pg = OwnPostgres::start(bin, Some(&pki));
    let ca = pki.path("ca.pem");
    let base = pg.url();

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
