//! TLS per libpq's sslmode against a real PostgreSQL server serving a certificate from a
//! private CA, issued to `localhost` only.

use std::time::Duration;

use eventbus_plugin::pg::{PgBus, PgSettings};
use pg_test_server::PgServer;

struct Pki {
    client_cert: String,
    client_key: String,
    ca: String,
    other_ca: String,
    cert: String,
    key: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair};
    // Distinct subjects: OpenSSL (the server's side) takes a certificate whose subject equals
    // its issuer's for self-signed.
    let named = |mut p: CertificateParams, cn: &str| {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p
    };
    let ca = |cn: &str| {
        let mut p = named(CertificateParams::new(Vec::<String>::new()).unwrap(), cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let k = KeyPair::generate().unwrap();
        let c = p.self_signed(&k).unwrap();
        (c, k)
    };
    let (ca_cert, ca_key) = ca("eventbus test CA");
    let (other, _) = ca("another CA");
    let leaf = named(
        CertificateParams::new(vec!["localhost".to_string()]).unwrap(),
        "localhost",
    );
    let leaf_key = KeyPair::generate().unwrap();
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();
    let client = named(
        CertificateParams::new(vec!["eventbus-client".to_string()]).unwrap(),
        "eventbus-client",
    );
    let client_key = KeyPair::generate().unwrap();
    let client_cert = client.signed_by(&client_key, &ca_cert, &ca_key).unwrap();
    Pki {
        client_cert: client_cert.pem(),
        client_key: client_key.serialize_pem(),
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
    let pg = PgServer::builder()
        .tls(&pki.cert, &pki.key)
        .tls_client_ca(&pki.ca)
        .start();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_presented_from_sslcert_and_sslkey() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let w = |n: &str, pem: &str| {
        let p = dir.path().join(n);
        std::fs::write(&p, pem).unwrap();
        p.display().to_string()
    };
    let (ca, cert, key) = (
        w("ca.pem", &pki.ca),
        w("c.pem", &pki.client_cert),
        w("c.key", &pki.client_key),
    );
    let pg = PgServer::builder()
        .tls(&pki.cert, &pki.key)
        .tls_client_ca(&pki.ca)
        .start();
    let dsn = format!(
        "postgres://postgres@localhost:{}/eventbus?sslmode=verify-full&sslrootcert={ca}&sslcert={cert}&sslkey={key}",
        pg.port()
    );
    let _b = match connect(dsn).await {
        Ok(b) => b,
        Err(e) => panic!("connect with a client certificate: {e}\n{}", pg.log_tail()),
    };
    let dn = pg.psql(
        "SELECT s.client_dn FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'workflow-plugin-eventbus' AND s.client_dn IS NOT NULL LIMIT 1",
    );
    assert!(dn.contains("eventbus-client"), "client_dn: {dn:?}");
    let e = connect(format!(
        "postgres://postgres@localhost:{}/eventbus?sslmode=require&sslcert={cert}",
        pg.port()
    ))
    .await
    .expect_err("sslcert without sslkey");
    assert!(e.contains("sslcert and sslkey"), "{e}");
}
