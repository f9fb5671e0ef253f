//! Kafka brokers are adopted (`deploy_target: self_hosted`, a cluster the operator runs); the
//! other targets declared for kafka fail at load, naming what works.

/// The refusal of kafka on `target`, one line naming what works.
pub fn not_yet(target: &str) -> String {
    format!(
        "provider \"kafka\" is not available yet on deploy target {:?} in this plugin; use \
         deploy_target self_hosted (adopt a Kafka cluster you run: dsn kafka://host:9092 or \
         kafka.brokers), or use provider: nats (deploy_target local, self_hosted, kubernetes, \
         digitalocean.app_platform, aws.ecs or aws.eks)",
        target
    )
}
