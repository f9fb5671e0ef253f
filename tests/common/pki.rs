//! A private CA for the TLS tests: a self-signed root and PEM certificates it signs.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, ExtendedKeyUsagePurpose as Eku, IsCa, KeyPair,
};

pub struct Ca {
    cert: Certificate,
    key: KeyPair,
}

impl Ca {
    pub fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// (certificate, key) for `names` (DNS names or IP addresses): a server's, valid as a
    /// client too (nats-server routes are mutual TLS), or a client's only.
    pub fn issue(&self, names: Vec<String>, server: bool) -> (String, String) {
        let mut params = CertificateParams::new(names).unwrap();
        params.extended_key_usages = if server {
            vec![Eku::ServerAuth, Eku::ClientAuth]
        } else {
            vec![Eku::ClientAuth]
        };
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}
