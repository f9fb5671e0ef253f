//! Config validation both faces share: the strict decoder (typed Any, legacy Struct or JSON into
//! our messages), the per-field problem collector, and the broker spec. The runtime modules and
//! the IaC drivers read configs through here, so neither face imports the other for it.

pub mod broker;
pub mod decode;
pub mod error;
pub mod kafka;
pub mod nats;
pub mod pg;
pub mod shared;
