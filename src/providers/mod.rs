//! The provider x deploy-target matrix: the providers and targets the Go plugin offered, plus the
//! new `local` target. `pgchannel` (PostgreSQL as the bus) has no deploy target: it uses the
//! database its dsn names, and `deploy_target` is ignored for it, as in the Go plugin.
//!
//! Every combination either works or fails at config load with a line that names the provider,
//! the target and what would work; nothing is left to fail later at Start.

pub mod kinesis;

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Provider {
    Nats,
    Pgchannel,
    Kafka,
    Kinesis,
}

impl Provider {
    pub const ALL: [Provider; 4] = [
        Provider::Nats,
        Provider::Pgchannel,
        Provider::Kafka,
        Provider::Kinesis,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Nats => "nats",
            Provider::Pgchannel => "pgchannel",
            Provider::Kafka => "kafka",
            Provider::Kinesis => "kinesis",
        }
    }

    /// Provider names are case-sensitive, as in the Go plugin.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    pub fn targets(self) -> &'static [DeployTarget] {
        use DeployTarget::*;
        match self {
            Provider::Nats => &[
                Local,
                SelfHosted,
                DigitalOceanApp,
                Kubernetes,
                AwsEcs,
                AwsEks,
            ],
            // Not deployed by us: the database the dsn names.
            Provider::Pgchannel => &[],
            Provider::Kafka => &[DigitalOceanManagedKafka, AwsMsk, Kubernetes, SelfHosted],
            Provider::Kinesis => &[AwsKinesis],
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeployTarget {
    Local,
    SelfHosted,
    DigitalOceanApp,
    DigitalOceanManagedKafka,
    AwsEcs,
    AwsEks,
    AwsMsk,
    AwsKinesis,
    Kubernetes,
}

impl DeployTarget {
    pub const ALL: [DeployTarget; 9] = [
        DeployTarget::Local,
        DeployTarget::SelfHosted,
        DeployTarget::DigitalOceanApp,
        DeployTarget::DigitalOceanManagedKafka,
        DeployTarget::AwsEcs,
        DeployTarget::AwsEks,
        DeployTarget::AwsMsk,
        DeployTarget::AwsKinesis,
        DeployTarget::Kubernetes,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeployTarget::Local => "local",
            DeployTarget::SelfHosted => "self_hosted",
            DeployTarget::DigitalOceanApp => "digitalocean.app_platform",
            DeployTarget::DigitalOceanManagedKafka => "digitalocean.managed_kafka",
            DeployTarget::AwsEcs => "aws.ecs",
            DeployTarget::AwsEks => "aws.eks",
            DeployTarget::AwsMsk => "aws.msk",
            DeployTarget::AwsKinesis => "aws.kinesis",
            DeployTarget::Kubernetes => "kubernetes",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }
}

impl fmt::Display for DeployTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn list<T: fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
    items
        .into_iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Problems with one field each: `(field, message)`.
pub type FieldProblem = (&'static str, String);

/// Checks `provider` + `deploy_target` and whether this plugin can serve the pair today.
pub fn check(provider: &str, target: &str) -> Result<(Provider, DeployTarget), FieldProblem> {
    if provider.is_empty() {
        return Err((
            "provider",
            format!("is required (supported: {})", list(Provider::ALL)),
        ));
    }
    let Some(p) = Provider::parse(provider) else {
        let hint = if Provider::parse(&provider.to_ascii_lowercase()).is_some() {
            " (provider names are lowercase)"
        } else {
            ""
        };
        return Err((
            "provider",
            format!(
                "unknown provider {}{hint}; supported providers are: {}",
                crate::secret::quote(provider),
                list(Provider::ALL)
            ),
        ));
    };
    if p == Provider::Pgchannel {
        // The Go plugin never read deploy_target for pgchannel; configs written for it may
        // carry any value. SelfHosted: "the server the operator names" (the dsn).
        return Ok((p, DeployTarget::SelfHosted));
    }
    if target.is_empty() {
        return Err((
            "deploy_target",
            format!(
                "is required for provider {p} (one of: {})",
                list(p.targets())
            ),
        ));
    }
    let t = DeployTarget::parse(target);
    match t {
        Some(t) if p.targets().contains(&t) => {}
        _ => {
            return Err((
                "deploy_target",
                format!(
                "provider {:?} does not support deploy target {}; supported targets for {p}: {}",
                p.as_str(),
                crate::secret::quote(target),
                list(p.targets())
            ),
            ))
        }
    }
    let t = t.unwrap_or(DeployTarget::SelfHosted);
    match p {
        // Kafka clusters are adopted wherever they run (the runtime only dials brokers);
        // wfctl's plan serves self_hosted and names it for the other targets.
        Provider::Nats | Provider::Pgchannel | Provider::Kafka => Ok((p, t)),
        Provider::Kinesis => Err(("provider", kinesis::NOT_YET.to_string())),
    }
}

/// Version pins: `latest` is refused, anything else must look like a release number.
pub fn check_version(version: &str) -> Result<(), FieldProblem> {
    if version.is_empty() {
        return Ok(());
    }
    if version.eq_ignore_ascii_case("latest") {
        return Err((
            "version",
            format!(
                "{} is not allowed; pin a nats-server release such as \"2.10\" or \"2.11.4\"",
                crate::secret::quote(version)
            ),
        ));
    }
    let v = version.strip_prefix('v').unwrap_or(version);
    let parts: Vec<&str> = v.split('.').collect();
    if parts.len() > 3
        || parts
            .iter()
            .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err((
            "version",
            format!(
                "{} is not a release number; use e.g. \"2.10\" or \"2.11.4\"",
                crate::secret::quote(version)
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_combination_is_either_served_or_explained() {
        for p in Provider::ALL {
            for t in DeployTarget::ALL {
                match check(p.as_str(), t.as_str()) {
                    Ok((Provider::Pgchannel, tt)) => {
                        assert_eq!(tt, DeployTarget::SelfHosted, "deploy_target ignored");
                    }
                    Ok((pp, tt)) => {
                        assert!(matches!(pp, Provider::Nats | Provider::Kafka), "{pp}");
                        assert!(p.targets().contains(&tt));
                    }
                    Err((field, msg)) => {
                        assert!(msg.contains(p.as_str()), "{msg}");
                        if field == "deploy_target" {
                            assert!(
                                msg.contains(t.as_str()) && msg.contains("supported targets"),
                                "{msg}"
                            );
                        } else {
                            assert!(msg.contains("nats"), "guidance names nats: {msg}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn go_error_meanings_are_kept() {
        let (f, m) = check("rabbitmq", "self_hosted").unwrap_err();
        assert_eq!(f, "provider");
        assert!(m.contains("unknown provider \"rabbitmq\""), "{m}");
        let (_, m) = check("NATS", "self_hosted").unwrap_err();
        assert!(m.contains("lowercase"), "{m}");
        let (f, m) = check("nats", "aws.msk").unwrap_err();
        assert_eq!(f, "deploy_target");
        assert!(
            m.contains("does not support deploy target \"aws.msk\""),
            "{m}"
        );
        let (f, _) = check("nats", "").unwrap_err();
        assert_eq!(f, "deploy_target");
        let (f, m) = check("kinesis", "aws.kinesis").unwrap_err();
        assert_eq!(f, "provider");
        assert!(m.contains("not available yet"), "{m}");
        assert_eq!(
            check("kafka", "self_hosted").unwrap(),
            (Provider::Kafka, DeployTarget::SelfHosted)
        );
        let (f, m) = check("kafka", "local").unwrap_err();
        assert_eq!(f, "deploy_target");
        assert!(m.contains("supported targets for kafka"), "{m}");
        // Go configs for pgchannel carry no (or any) deploy_target.
        assert_eq!(
            check("pgchannel", "").unwrap(),
            (Provider::Pgchannel, DeployTarget::SelfHosted)
        );
        assert!(check("pgchannel", "aws.ecs").is_ok());
    }

    #[test]
    fn latest_is_refused() {
        assert!(check_version("LATEST").is_err());
        assert!(check_version("2.10").is_ok());
        assert!(check_version("v2.11.4").is_ok());
        assert!(check_version("2.x").is_err());
    }
}
