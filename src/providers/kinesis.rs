//! Kinesis is declared in the schema (KinesisConfig) but not implemented: configs fail at load.

pub const NOT_YET: &str =
    "provider \"kinesis\" is not available yet in this plugin; use provider: nats \
(deploy_target local, self_hosted, kubernetes, digitalocean.app_platform, aws.ecs or aws.eks)";
