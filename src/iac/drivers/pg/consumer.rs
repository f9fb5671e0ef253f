//! `infra.eventbus.consumer` on a pgchannel broker: a row of `eventbus_consumers`.
//!
//! Settings change in place and the row keeps its position (what was acked stays acked),
//! except where it starts (`deliver_policy` and its options), which only a new row honours:
//! that is a replace, as for NATS. Deleting the consumer deletes its row and delivery records,
//! as deleting a JetStream consumer drops its position.

use super::spec::{consumer_def, consumer_outputs, Flags, CONSUMER_KEYS, CONSUMER_REPLACE};
use super::stream::field_diffs;
use crate::iac::drivers::consumer::provider_id;
use crate::iac::drivers::stream::{broker_key, delete_gate, locate, Located};
use crate::iac::drivers::{record_placed, Placed};
use crate::iac::drivers::{Ctx, Output, CONSUMER_TYPE};
use crate::iac::error::DriverError;
use crate::iac::plan::{resource_changes, Change as PlanChange};
use crate::iac::state::PgRecord;
use crate::nats::consumer::ConsumerSpec;
use crate::pb::iac::ResourceRef;
use crate::pg::Ensured;
use serde_json::Value as Json;

fn label(resource: &str, stream: &str, name: &str) -> String {
    format!("{CONSUMER_TYPE} {resource:?} (pgchannel consumer {name:?} on stream {stream:?})")
}

pub fn def(resource: &str, spec: &ConsumerSpec) -> Result<crate::pg::ConsumerDef, DriverError> {
    consumer_def(CONSUMER_TYPE, resource, spec).map_err(DriverError::Config)
}

pub fn diff(
    resource: &str,
    spec: &ConsumerSpec,
    broker: Option<&str>,
    current: &Json,
) -> Result<Vec<PlanChange>, DriverError> {
    let d = def(resource, spec)?;
    let want = consumer_outputs(
        &d,
        &Flags {
            broker: broker.unwrap_or_default().to_string(),
            broker_ref: spec.broker_ref.clone(),
            prevent_destroy: spec.prevent_destroy,
            bind: spec.bind,
        },
    );
    Ok(resource_changes(
        &[
            ("name", Some(&spec.durable)),
            ("stream_name", Some(&spec.stream)),
            ("broker", broker),
        ],
        field_diffs(CONSUMER_KEYS, CONSUMER_REPLACE, &want, current),
        &want,
        current,
    ))
}

pub async fn apply(
    ctx: &Ctx,
    resource: &str,
    spec: &ConsumerSpec,
    broker: &str,
    pg: &PgRecord,
) -> Result<Output, DriverError> {
    let what = label(resource, &spec.stream, &spec.durable);
    let want = def(resource, spec)?;
    let bus = ctx.pg().connect(&what, broker, pg).await?;
    if bus
        .stream(&spec.stream)
        .await
        .map_err(|e| DriverError::pg(&what, e))?
        .is_none()
    {
        return Err(DriverError::refused(
            &what,
            format!(
                "stream {:?} has no row in broker {:?}'s database; apply the stream first (list it in this consumer's depends_on)",
                spec.stream,
                broker_key(broker)
            ),
        ));
    }
    let existing = bus
        .consumer(&spec.stream, &spec.durable)
        .await
        .map_err(|e| DriverError::pg(&what, e))?;
    if existing.is_none() && spec.bind {
        return Err(DriverError::refused(
            &what,
            "bind is set and the consumer has no row; bind adopts an existing consumer and never creates one",
        ));
    }
    let ensured = bus
        .ensure_consumer(&want)
        .await
        .map_err(|e| DriverError::pg(&what, e))?;
    tracing::info!(resource, stream = %spec.stream, consumer = %spec.durable, broker, outcome = ?ensured, "pgchannel consumer row ensured");
    let row = match ensured {
        Ensured::Unchanged => existing.unwrap_or(want),
        _ => bus
            .consumer(&spec.stream, &spec.durable)
            .await
            .map_err(|e| DriverError::pg(&what, e))?
            .ok_or_else(|| {
                DriverError::refused(
                    &what,
                    "the row was deleted while it was being written; apply again",
                )
            })?,
    };
    let at = Placed {
        broker,
        servers: &[],
        stream: &spec.stream,
        durable: Some(&spec.durable),
        broker_ref: &spec.broker_ref,
        prevent_destroy: spec.prevent_destroy,
        bind: spec.bind,
        provider_id: provider_id(broker, &spec.stream, &spec.durable),
    };
    record_placed(ctx, resource, at, |flags| consumer_outputs(&row, flags))
}

pub async fn read(
    ctx: &Ctx,
    r: &ResourceRef,
    l: &Located,
    pg: &PgRecord,
) -> Result<Output, DriverError> {
    let what = label(&r.name, &l.stream, &l.durable);
    let bus = ctx.pg().connect(&what, &l.broker, pg).await?;
    match bus
        .consumer(&l.stream, &l.durable)
        .await
        .map_err(|e| DriverError::pg(&what, e))?
    {
        None => Err(DriverError::not_found(format!(
            "{what} has no row in broker {:?}'s database",
            broker_key(&l.broker)
        ))),
        Some(row) => Ok(Output {
            provider_id: provider_id(&l.broker, &l.stream, &l.durable),
            outputs: consumer_outputs(&row, &l.flags),
            sensitive: Vec::new(),
            status: "running".into(),
        }),
    }
}

pub async fn delete(
    ctx: &Ctx,
    r: &ResourceRef,
    l: &Located,
    pg: &PgRecord,
) -> Result<(), DriverError> {
    let what = label(&r.name, &l.stream, &l.durable);
    if !delete_gate(
        ctx,
        r,
        l,
        &what,
        "bound pgchannel consumer released; its row stays",
    )? {
        return Ok(());
    }
    let bus = ctx.pg().connect(&what, &l.broker, pg).await?;
    let deleted = bus
        .delete_consumer(&l.stream, &l.durable)
        .await
        .map_err(|e| DriverError::pg(&what, e))?;
    tracing::info!(resource = %r.name, stream = %l.stream, consumer = %l.durable, deleted, "pgchannel consumer row deleted (its position and delivery records with it)");
    ctx.state.update(|s| {
        s.resources.remove(&r.name);
    })
}

pub async fn health(
    ctx: &Ctx,
    r: &ResourceRef,
    l: &Located,
    pg: &PgRecord,
) -> Result<(bool, String), DriverError> {
    match read(ctx, r, l, pg).await {
        Ok(_) => Ok((
            true,
            format!(
                "pgchannel consumer {:?} on stream {:?}",
                l.durable, l.stream
            ),
        )),
        Err(e) if e.is_not_found() => Err(e),
        Err(e) => Ok((false, crate::error_chain::render(&e))),
    }
}

/// The consumers this provider records on `broker`, read live.
pub async fn enumerate(
    ctx: &Ctx,
    broker: &str,
    pg: &PgRecord,
) -> Result<Vec<(String, Output)>, DriverError> {
    let state = ctx.state.load()?;
    let mut out = Vec::new();
    for (name, rec) in &state.resources {
        if rec.type_name != CONSUMER_TYPE || rec.broker != broker || !rec.servers.is_empty() {
            continue;
        }
        let r = ResourceRef {
            name: name.clone(),
            r#type: CONSUMER_TYPE.into(),
            provider_id: rec.provider_id.clone(),
        };
        let Some(l) = locate(&state, &r, CONSUMER_TYPE) else {
            continue;
        };
        match read(ctx, &r, &l, pg).await {
            Ok(o) => out.push((l.durable.clone(), o)),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}
