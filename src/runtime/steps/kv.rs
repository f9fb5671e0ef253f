//! `step.eventbus.kv`: get, put (with an expected revision), create, delete, purge and list the
//! keys of a key-value bucket on the step's broker. Bucket, key and key filter are checked
//! (`crate::nats::kv`) before anything is sent, so a key can never address another bucket, a
//! stream or the JetStream API; every call is bounded by the step's timeout.

use super::bucket;
use super::message::{payload_of, Include};
use super::{decode_execute, pick, ExecuteInput, StepOutput};
use crate::config::decode::RawConfig;
use crate::config::error::Problems;
use crate::nats::guard::{check_duration, MAX_DURATION};
use crate::nats::kv::{self, KvAction};
use crate::pb::eventbus::{KvRequest, KvResponse, KvStepConfig};
use crate::runtime::modules::broker::{BrokerModule, ForProvider, Open};
use crate::runtime::provider::{rfc3339, ProviderError};
use crate::runtime::registry::Registry;
use crate::runtime::types::StepKind;
use crate::runtime::RuntimeError;
use std::time::Duration;

pub struct KvStep {
    component: String,
}

/// The checks of a step's bucket, action, key and key filter, on the values that hold no
/// template. At Create (`complete` false) an empty value may still come from pipeline state;
/// at Execute (`complete` true) the action is required and a key with every action but `keys`.
fn check(
    p: &mut Problems,
    complete: bool,
    [bucket, action, key, filter]: [&str; 4],
) -> Option<KvAction> {
    let act = bucket::check_bucket_action(
        p,
        complete,
        bucket,
        action,
        KvAction::parse,
        KvAction::NAMES,
    );
    // At Execute templates are resolved: every value given is checked.
    let fixed = |v: &str| bucket::fixed(complete, v);
    if fixed(key) || (complete && act.is_some_and(|a| a != KvAction::Keys)) {
        p.check("key", kv::check_key(key));
    }
    if fixed(filter) {
        p.check("keys", kv::check_key_filter(filter));
    }
    act
}

impl KvStep {
    pub fn create(name: &str, raw: RawConfig<'_>) -> Result<Self, RuntimeError> {
        let component = bucket::create(
            StepKind::Kv,
            name,
            raw,
            |p, c: &KvStepConfig| {
                check(p, false, [&c.bucket, &c.action, &c.key, &c.keys]);
            },
            |c| &c.timeout,
        )?;
        Ok(KvStep { component })
    }

    pub async fn execute(
        &self,
        rt: &Registry,
        input: ExecuteInput<'_>,
    ) -> Result<StepOutput, RuntimeError> {
        let (cfg, inp): (KvStepConfig, KvRequest) =
            decode_execute(StepKind::Kv, &self.component, &input)?;
        let bucket = pick(&cfg.bucket, &inp.bucket);
        let action = pick(&cfg.action, &inp.action);
        let key = pick(&cfg.key, &inp.key);
        let filter = pick(&cfg.keys, &inp.keys);
        let mut p = Problems::new(StepKind::Kv.type_name(), "");
        let act = check(&mut p, true, [&bucket, &action, &key, &filter]);
        let act = bucket::checked(p, act, &self.component)?;
        let value = payload_of(cfg.value.as_ref())
            .map_err(|e| RuntimeError::failed(&self.component, e))?
            .unwrap_or(inp.value);
        let timeout = check_duration(&cfg.timeout, MAX_DURATION)
            .map_err(|e| RuntimeError::failed(&self.component, format!("timeout {e}")))?;
        let broker = rt.broker(&pick(&cfg.broker_ref, &inp.broker_ref), &self.component)?;
        let job = KvJob {
            bucket: &bucket,
            action: act,
            key: &key,
            value,
            expected: inp.expected_revision,
            filter: &filter,
            timeout,
        };
        let out = broker
            .dispatch(job)
            .await
            .map_err(|e| RuntimeError::broker(&self.component, e))?;
        let (_, text, json) = Include {
            payload: false,
            text: true,
            json: true,
        }
        .forms(&out.value);
        let resp = KvResponse {
            bucket,
            key: if act == KvAction::Keys {
                String::new()
            } else {
                key
            },
            found: out.found,
            value: out.value,
            text,
            json,
            revision: out.revision,
            operation: out.operation.to_string(),
            created: out.created.map(rfc3339).unwrap_or_default(),
            count: out.keys.len() as i32,
            keys: out.keys,
        };
        Ok(StepOutput {
            typed: StepKind::Kv.pack_output(&resp),
        })
    }
}

struct KvJob<'a> {
    bucket: &'a str,
    action: KvAction,
    key: &'a str,
    value: Vec<u8>,
    expected: u64,
    filter: &'a str,
    timeout: Option<Duration>,
}

impl ForProvider for KvJob<'_> {
    type Out = Result<kv::KvOutcome, ProviderError>;
    async fn run<P: Open>(self, broker: &BrokerModule) -> Self::Out {
        bucket::run_on(
            broker,
            StepKind::Kv,
            "key-value buckets",
            "key-value operation",
            |p: &P| p.key_value(),
            self.timeout,
            |js| async move {
                kv::run(
                    &js,
                    self.bucket,
                    self.action,
                    self.key,
                    self.value,
                    self.expected,
                    self.filter,
                )
                .await
            },
        )
        .await
    }
}
