//! TLS per libpq's sslmode against a real PostgreSQL server serving a certificate from a
//! private CA, issued to `localhost` only.

use std::time::Duration;

use eventbus_plugin::pg::{PgBus, PgSettings};
use pg_test_server::PgServer;

struct Pki {
    ca: String,
    other_ca: String,
    cert: String,
    key: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca = |_: ()| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let k = KeyPair::generate().unwrap();
        let c = p.self_signed(&k).unwrap();
        (c, k)
    };
    let (ca_cert, ca_key) = ca(());
    let (other, _) = ca(());
    let leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
    Pki {
        ca: ca_cert.pem(),
        other_ca: other.pem(),
        cert: leaf_cert.pem(),
        key: leaf_key.serialize_pem(),
    }
}

async fn connect(dsn: String) -> Result<PgBus, String> {
    let mut s = PgSettings::new("bus", dsn);
    s.connect_timeout = Duration::from_secs(5);
    PgBus::connect(s).await.map_err(|e| e.to_string())
}

fn tls_sessions(pg: &PgServer) -> i64 {
    pg.psql("SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE s.ssl AND a.application_name = 'workflow-plugin-eventbus'")
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_follow_libpq() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    let other = dir.path().join("other.pem");
    std::fs::write(&ca, &pki.ca).unwrap();
    std::fs::write(&other, &pki.other_ca).unwrap();
    let pg = PgServer::builder().tls(&pki.cert, &pki.key).start();
    let port = pg.port();
    let url = |host: &str, q: &str| format!("postgres://postgres@{host}:{port}/eventbus?{q}");

    // verify-full: chain and name.
    let b = connect(url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    ))
    .await
    .expect("verify-full with the right CA and name");
    assert!(tls_sessions(&pg) >= 1, "the pool's connection is encrypted");
    b.close().await;
    let e = connect(url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", ca.display()),
    ))
    .await
    .expect_err("name mismatch refused");
    assert!(e.contains("connect"), "{e}");
    // verify-ca: chain only.
    connect(format!(
        "host=127.0.0.1 port={port} user=postgres dbname=eventbus sslmode=verify-ca sslrootcert='{}'",
        ca.display()
    ))
    .await
    .expect("verify-ca ignores the name");
    let e = connect(url(
        "localhost",
        &format!("sslmode=verify-ca&sslrootcert={}", other.display()),
    ))
    .await
    .expect_err("unknown CA refused");
    assert!(!e.is_empty());
    // require: encrypted, unverified.
    connect(url("127.0.0.1", "sslmode=require"))
        .await
        .expect("require");
    // A missing root file is a clear configuration error.
    let e = connect(url(
        "localhost",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    ))
    .await
    .expect_err("missing root file");
    assert!(
        e.contains("sslrootcert") && e.contains("/nonexistent/ca.pem"),
        "{e}"
    );
}
