//! librdkafka client properties from a validated [`KafkaClientConfig`]: the one place that turns
//! brokers, TLS and SASL into `bootstrap.servers`, `security.protocol`, `ssl.*` and `sasl.*`.
//! The password goes into the property set only (librdkafka does not log it); nothing here
//! prints a `ClientConfig`.

use crate::config::kafka::KafkaClientConfig;
use rdkafka::ClientConfig;

use super::KafkaError;

/// What every client of one broker module shares: resolved brokers, security, and extra
/// librdkafka properties (tests and benchmarks set `linger.ms` and friends here).
#[derive(Clone, Debug)]
pub struct KafkaSettings {
    pub config: KafkaClientConfig,
    pub brokers: Vec<String>,
    pub extra: Vec<(String, String)>,
}

impl KafkaSettings {
    /// Resolves the brokers (the env fallback included) once.
    /// `kafka.librdkafka_options` become the extra properties.
    pub fn new(config: KafkaClientConfig) -> Result<Self, KafkaError> {
        let brokers = config.resolve_brokers().map_err(KafkaError::Invalid)?;
        Ok(KafkaSettings {
            extra: config.options.clone(),
            config,
            brokers,
        })
    }

    /// Plaintext, no auth: for tests against a local broker.
    pub fn plaintext(bootstrap: &str) -> Self {
        let config = KafkaClientConfig {
            brokers: vec![bootstrap.to_string()],
            env_var: String::new(),
            client_id: "workflow-plugin-eventbus".into(),
            protocol: crate::config::kafka::SecurityProtocol::Plaintext,
            ca_file: None,
            cert_file: None,
            key_file: None,
            sasl: None,
            default_replication_factor: None,
            min_insync_replicas: None,
            connect_timeout: crate::config::broker::DEFAULT_CONNECT_TIMEOUT,
            options: Vec::new(),
        };
        KafkaSettings {
            brokers: config.brokers.clone(),
            config,
            extra: Vec::new(),
        }
    }

    pub fn with_extra(mut self, props: &[(&str, &str)]) -> Self {
        self.extra
            .extend(props.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// The common properties of every client (producer, consumer, admin).
    pub fn client_config(&self) -> ClientConfig {
        let c = &self.config;
        let mut cc = ClientConfig::new();
        cc.set("bootstrap.servers", self.brokers.join(","))
            .set("client.id", &c.client_id)
            .set("security.protocol", c.protocol.as_str())
            .set(
                "socket.connection.setup.timeout.ms",
                c.connect_timeout.as_millis().max(1000).to_string(),
            )
            // librdkafka may resolve a name to an IPv6 address first; both are fine for real
            // clusters, and the test broker is IPv4 only (addresses are given as 127.0.0.1).
            .set("broker.address.family", "any")
            .set("log_level", "4");
        if let Some(f) = &c.ca_file {
            cc.set("ssl.ca.location", f.to_string_lossy());
        }
        if let Some(f) = &c.cert_file {
            cc.set("ssl.certificate.location", f.to_string_lossy());
        }
        if let Some(f) = &c.key_file {
            cc.set("ssl.key.location", f.to_string_lossy());
        }
        if let Some(s) = &c.sasl {
            cc.set("sasl.mechanisms", s.mechanism.as_str())
                .set("sasl.username", &s.username)
                .set("sasl.password", s.password.expose());
        }
        for (k, v) in &self.extra {
            cc.set(k, v);
        }
        cc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::kafka::{SaslCredentials, SaslMechanism, SecurityProtocol};
    use crate::secret::Secret;

    #[test]
    fn properties_carry_tls_and_scram() {
        let mut s = KafkaSettings::plaintext("127.0.0.1:9092");
        s.config.protocol = SecurityProtocol::SaslSsl;
        s.config.ca_file = Some("/etc/ca.pem".into());
        s.config.sasl = Some(SaslCredentials {
            mechanism: SaslMechanism::ScramSha256,
            username: "app".into(),
            password: Secret::new("pw-123"),
        });
        let cc = s.with_extra(&[("linger.ms", "0")]).client_config();
        assert_eq!(cc.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(cc.get("sasl.mechanisms"), Some("SCRAM-SHA-256"));
        assert_eq!(cc.get("sasl.username"), Some("app"));
        assert_eq!(cc.get("sasl.password"), Some("pw-123"));
        assert_eq!(cc.get("ssl.ca.location"), Some("/etc/ca.pem"));
        assert_eq!(cc.get("linger.ms"), Some("0"));
        assert_eq!(cc.get("bootstrap.servers"), Some("127.0.0.1:9092"));
    }
}
