//! What the bucket steps (`step.eventbus.kv`, `step.eventbus.object`) share: their Create, the
//! checks of bucket and action made at Create and again at Execute, and the one-line refusal
//! of a broker whose provider has no such buckets.

use super::templated;
use crate::config::decode::{self, RawConfig};
use crate::config::error::Problems;
use crate::nats::guard::{check_duration, MAX_DURATION};
use crate::nats::NatsError;
use crate::runtime::modules::broker::{BrokerModule, Open};
use crate::runtime::provider::{bounded, ProviderError};
use crate::runtime::types::StepKind;
use crate::runtime::RuntimeError;
use async_nats::jetstream::Context;
use std::future::Future;
use std::time::Duration;

/// Whether a value is checked now: at Execute (`complete`) every value given, at Create the
/// ones that hold no template (an empty one may still come from pipeline state).
pub(super) fn fixed(complete: bool, v: &str) -> bool {
    !v.is_empty() && (complete || !templated(v))
}

/// Checks the bucket and the action (one of `names`, parsed by `parse`); the action when valid.
pub(super) fn check_bucket_action<A>(
    p: &mut Problems,
    complete: bool,
    bucket: &str,
    action: &str,
    parse: fn(&str) -> Option<A>,
    names: &str,
) -> Option<A> {
    if fixed(complete, bucket) || complete {
        p.check("bucket", crate::nats::kv::check_bucket(bucket));
    }
    let act = parse(action);
    if fixed(complete, action) && act.is_none() {
        p.field(
            "action",
            format!("{} is not valid; use {names}", crate::secret::quote(action)),
        );
    } else if complete && action.is_empty() {
        p.field("action", format!("is required: {names}"));
    }
    act
}

/// Create of a bucket step: its config decoded and checked by `check`, its `timeout` bounded;
/// the component name its errors carry.
pub(super) fn create<C: prost::Message + Default>(
    kind: StepKind,
    name: &str,
    raw: RawConfig<'_>,
    check: impl FnOnce(&mut Problems, &C),
    timeout: fn(&C) -> &Option<prost_types::Duration>,
) -> Result<String, RuntimeError> {
    let mut p = Problems::new(kind.type_name(), name);
    match decode::decode::<C>(kind.full_messages().0, raw) {
        Err(lines) => p.raw(lines),
        Ok(c) => {
            check(&mut p, &c);
            p.check(
                "timeout",
                check_duration(timeout(&c), MAX_DURATION).map(|_| ()),
            );
        }
    }
    p.finish(format!("{} {name:?}", kind.type_name()))
        .map_err(Into::into)
}

/// The action of an Execute whose checks passed, else every problem in one line.
pub(super) fn checked<A>(p: Problems, act: Option<A>, component: &str) -> Result<A, RuntimeError> {
    match act {
        Some(a) if p.is_empty() => Ok(a),
        _ => Err(RuntimeError::failed(
            component,
            p.into_error().problems.join("; "),
        )),
    }
}

/// Runs `op` on the JetStream context `access` takes from the broker's provider (its
/// key-value or object-store access), bounded by `timeout` (the broker's request timeout when
/// unset, and named `op_name` when it runs out); refused in one line naming the provider when
/// it has no `what`.
pub(super) async fn run_on<P: Open, T, Fut>(
    broker: &BrokerModule,
    kind: StepKind,
    what: &str,
    op_name: &'static str,
    access: fn(&P) -> Option<Context>,
    timeout: Option<Duration>,
    op: impl FnOnce(Context) -> Fut,
) -> Result<T, ProviderError>
where
    Fut: Future<Output = Result<T, NatsError>>,
{
    let p = P::open(broker).await?;
    let Some(js) = access(&p) else {
        return Err(lacks(broker, what, kind.type_name()));
    };
    let after = timeout.unwrap_or_else(|| p.request_timeout());
    bounded(op_name, after, op(js)).await
}

/// The refusal of a broker whose provider has no `what` (e.g. "object stores"), naming the
/// provider and the type (`needed_by`) that needs a NATS broker.
pub fn lacks(broker: &BrokerModule, what: &str, needed_by: &str) -> ProviderError {
    ProviderError::Invalid(format!(
        "broker {:?} is provider {}, which has no {what}; {needed_by} needs a NATS broker",
        broker.spec.name,
        broker.spec.provider.as_str()
    ))
}
