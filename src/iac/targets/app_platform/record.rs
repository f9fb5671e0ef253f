//! What the state file keeps of a broker on `digitalocean.app_platform`.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AppRecord {
    pub app_id: String,
    pub app_name: String,
}
