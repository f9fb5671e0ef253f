//! `step.eventbus.object`: put, get, delete, list and describe the objects of an object store on
//! the step's broker. Bucket and object name are checked (`crate::nats::object`) before anything
//! is sent, the object's size against `max_object_size` (and the bucket's room) before its first
//! chunk, and every call is bounded by the step's timeout.

use super::bucket;
use super::message::payload_of;
use super::{decode_execute, pick, ExecuteInput, StepOutput};
use crate::config::decode::RawConfig;
use crate::config::error::Problems;
use crate::nats::guard::{check_duration, MAX_DURATION};
use crate::nats::object::{self, ObjectAction, ObjectOp, DEFAULT_MAX_OBJECT_SIZE};
use crate::pb::eventbus::{ObjectRequest, ObjectResponse, ObjectStepConfig, StoredObject};
use crate::runtime::modules::broker::{BrokerModule, ForProvider, Open};
use crate::runtime::provider::{rfc3339, Include, ProviderError};
use crate::runtime::registry::Registry;
use crate::runtime::types::StepKind;
use crate::runtime::RuntimeError;
use std::time::Duration;

pub struct ObjectStep {
    component: String,
}

/// The checks of a step's bucket, action, object name and size limit, on the values that hold
/// no template. At Create (`complete` false) an empty value may still come from pipeline
/// state; at Execute (`complete` true) the action is required and a name with every action
/// but `list`.
fn check(
    p: &mut Problems,
    complete: bool,
    [bucket, action, name]: [&str; 3],
    max_object_size: i64,
) -> Option<ObjectAction> {
    let act = bucket::check_bucket_action(
        p,
        complete,
        bucket,
        action,
        ObjectAction::parse,
        ObjectAction::NAMES,
    );
    if bucket::fixed(complete, name) || (complete && act.is_some_and(|a| a != ObjectAction::List)) {
        p.check("name", object::check_object_name(name));
    }
    if !(0..=object::MAX_MAX_OBJECT_SIZE).contains(&max_object_size) {
        p.field(
            "max_object_size",
            format!(
                "{max_object_size} is out of range (0..={}; 0 means {DEFAULT_MAX_OBJECT_SIZE})",
                object::MAX_MAX_OBJECT_SIZE
            ),
        );
    }
    act
}

fn stored(s: object::Stored) -> StoredObject {
    StoredObject {
        name: s.name,
        description: s.description,
        size: s.size,
        chunks: s.chunks,
        digest: s.digest,
        modified: s.modified.map(rfc3339).unwrap_or_default(),
        nuid: s.nuid,
    }
}

impl ObjectStep {
    pub fn create(name: &str, raw: RawConfig<'_>) -> Result<Self, RuntimeError> {
        let component = bucket::create(
            StepKind::Object,
            name,
            raw,
            |p, c: &ObjectStepConfig| {
                check(p, false, [&c.bucket, &c.action, &c.name], c.max_object_size);
            },
            |c| &c.timeout,
        )?;
        Ok(ObjectStep { component })
    }

    pub async fn execute(
        &self,
        rt: &Registry,
        input: ExecuteInput<'_>,
    ) -> Result<StepOutput, RuntimeError> {
        let (cfg, inp): (ObjectStepConfig, ObjectRequest) =
            decode_execute(StepKind::Object, &self.component, &input)?;
        let bucket = pick(&cfg.bucket, &inp.bucket);
        let action = pick(&cfg.action, &inp.action);
        let name = pick(&cfg.name, &inp.name);
        let mut p = Problems::new(StepKind::Object.type_name(), "");
        let act = check(&mut p, true, [&bucket, &action, &name], cfg.max_object_size);
        let act = bucket::checked(p, act, &self.component)?;
        let data = payload_of(cfg.data.as_ref())
            .map_err(|e| RuntimeError::failed(&self.component, e))?
            .unwrap_or(inp.data);
        let timeout = check_duration(&cfg.timeout, MAX_DURATION)
            .map_err(|e| RuntimeError::failed(&self.component, format!("timeout {e}")))?;
        let max_size = match cfg.max_object_size {
            0 => DEFAULT_MAX_OBJECT_SIZE,
            n => n,
        } as usize;
        let broker = rt.broker(&pick(&cfg.broker_ref, &inp.broker_ref), &self.component)?;
        let job = ObjectJob {
            op: ObjectOp {
                bucket: &bucket,
                action: act,
                name: if act == ObjectAction::List { "" } else { &name },
                data,
                description: &cfg.description,
                max_size,
            },
            timeout,
        };
        let out = broker
            .dispatch(job)
            .await
            .map_err(|e| RuntimeError::broker(&self.component, e))?;
        let (_, text, json) = Include {
            payload: false,
            text: act == ObjectAction::Get,
            json: act == ObjectAction::Get,
        }
        .forms(&out.data);
        let resp = ObjectResponse {
            bucket,
            name: if act == ObjectAction::List {
                String::new()
            } else {
                name
            },
            found: out.found,
            data: out.data,
            text,
            json,
            info: out.info.map(stored),
            count: out.objects.len() as i32,
            objects: out.objects.into_iter().map(stored).collect(),
        };
        Ok(StepOutput {
            typed: StepKind::Object.pack_output(&resp),
        })
    }
}

struct ObjectJob<'a> {
    op: ObjectOp<'a>,
    timeout: Option<Duration>,
}

impl ForProvider for ObjectJob<'_> {
    type Out = Result<object::ObjectOutcome, ProviderError>;
    async fn run<P: Open>(self, broker: &BrokerModule) -> Self::Out {
        bucket::run_on(
            broker,
            StepKind::Object,
            "object stores",
            "object-store operation",
            |p: &P| p.object_store(),
            self.timeout,
            |js| async move { object::run(&js, self.op).await },
        )
        .await
    }
}
