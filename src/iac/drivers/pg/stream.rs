//! `infra.eventbus.stream` on a pgchannel broker: a row of `eventbus_streams`.
//!
//! Every setting pgchannel has (subjects, max_age, max_msgs, max_bytes, duplicate_window)
//! changes in place: the row is updated and the events stay. Deleting the stream deletes its
//! events, consumers and delivery records with it, as deleting a JetStream stream drops its
//! messages and consumers.

use super::spec::{stream_def, stream_outputs, Flags, STREAM_KEYS};
use crate::iac::drivers::stream::{broker_key, delete_gate, provider_id, Located};
use crate::iac::drivers::{record_placed, Placed};
use crate::iac::drivers::{Ctx, Output, CONSUMER_TYPE, STREAM_TYPE};
use crate::iac::error::DriverError;
use crate::iac::plan::{resource_changes, Change as PlanChange};
use crate::iac::state::PgRecord;
use crate::nats::stream::{Change, FieldDiff, StreamSpec};
use crate::pb::iac::ResourceRef;
use crate::pg::Ensured;
use serde_json::Value as Json;

fn label(resource: &str, stream: &str) -> String {
    format!("{STREAM_TYPE} {resource:?} (pgchannel stream {stream:?})")
}

/// The config as a row, or the NATS-only settings it uses (at plan and at apply).
pub fn def(resource: &str, spec: &StreamSpec) -> Result<crate::pg::StreamDef, DriverError> {
    stream_def(STREAM_TYPE, resource, spec).map_err(DriverError::Config)
}

/// Pure: the spec against persisted outputs. Each managed setting is an in-place change.
pub fn diff(
    resource: &str,
    spec: &StreamSpec,
    broker: Option<&str>,
    current: &Json,
) -> Result<Vec<PlanChange>, DriverError> {
    let d = def(resource, spec)?;
    let want = stream_outputs(
        &d,
        &Flags {
            broker: broker.unwrap_or_default().to_string(),
            broker_ref: spec.broker_ref.clone(),
            prevent_destroy: spec.prevent_destroy,
            bind: spec.bind,
        },
    );
    Ok(resource_changes(
        &[("name", Some(&spec.name)), ("broker", broker)],
        field_diffs(STREAM_KEYS, &[], &want, current),
        &want,
        current,
    ))
}

/// Key-by-key differences; those in `replace` force a replace, the rest are in place.
pub(super) fn field_diffs(
    keys: &[&'static str],
    replace: &[&str],
    want: &Json,
    have: &Json,
) -> Vec<FieldDiff> {
    keys.iter()
        .filter(|k| !super::spec::same(k, &want[**k], &have[**k]))
        .map(|k| FieldDiff {
            field: k,
            want: want[*k].to_string(),
            have: have[*k].to_string(),
            change: if replace.contains(k) {
                Change::Replace
            } else {
                Change::InPlace
            },
        })
        .collect()
}

/// Create-or-adopt, and Update: makes the row hold the spec.
pub async fn apply(
    ctx: &Ctx,
    resource: &str,
    spec: &StreamSpec,
    broker: &str,
    pg: &PgRecord,
) -> Result<Output, DriverError> {
    let what = label(resource, &spec.name);
    let want = def(resource, spec)?;
    let bus = ctx.pg().connect(&what, broker, pg).await?;
    let existing = bus
        .stream(&want.name)
        .await
        .map_err(|e| DriverError::pg(&what, e))?;
    if existing.is_none() && spec.bind {
        return Err(DriverError::refused(
            &what,
            format!(
                "bind is set and the stream has no row in broker {broker:?}'s database; bind adopts an existing stream and never creates one (remove bind to let the provider create it)"
            ),
        ));
    }
    let ensured = bus
        .ensure_stream(&want)
        .await
        .map_err(|e| DriverError::pg(&what, e))?;
    tracing::info!(resource, stream = %want.name, broker, outcome = ?ensured, "pgchannel stream row ensured");
    let row = match ensured {
        Ensured::Unchanged => existing.unwrap_or(want),
        _ => bus
            .stream(&spec.name)
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
        stream: &spec.name,
        durable: None,
        broker_ref: &spec.broker_ref,
        prevent_destroy: spec.prevent_destroy,
        bind: spec.bind,
        provider_id: provider_id(broker, &spec.name),
    };
    record_placed(ctx, resource, at, |flags| stream_outputs(&row, flags))
}

/// The row as it is now; no row is "not found" (drift reports GHOST, refresh re-creates).
pub async fn read(
    ctx: &Ctx,
    r: &ResourceRef,
    l: &Located,
    pg: &PgRecord,
) -> Result<Output, DriverError> {
    let what = label(&r.name, &l.stream);
    let bus = ctx.pg().connect(&what, &l.broker, pg).await?;
    match bus
        .stream(&l.stream)
        .await
        .map_err(|e| DriverError::pg(&what, e))?
    {
        None => Err(DriverError::not_found(format!(
            "{what} has no row in broker {:?}'s database",
            broker_key(&l.broker)
        ))),
        Some(row) => Ok(Output {
            provider_id: provider_id(&l.broker, &l.stream),
            outputs: stream_outputs(&row, &l.flags),
            sensitive: Vec::new(),
            status: "running".into(),
        }),
    }
}

/// Idempotent; `prevent_destroy` refuses, `bind` only forgets. The stream's events, consumers
/// and delivery records go with it (as with a JetStream stream).
pub async fn delete(
    ctx: &Ctx,
    r: &ResourceRef,
    l: &Located,
    pg: &PgRecord,
) -> Result<(), DriverError> {
    let what = label(&r.name, &l.stream);
    if !delete_gate(
        ctx,
        r,
        l,
        &what,
        "bound pgchannel stream released; its row and events stay",
    )? {
        return Ok(());
    }
    let bus = ctx.pg().connect(&what, &l.broker, pg).await?;
    let deleted = bus
        .delete_stream(&l.stream)
        .await
        .map_err(|e| DriverError::pg(&what, e))?;
    if deleted {
        tracing::info!(resource = %r.name, stream = %l.stream, "pgchannel stream deleted with its events, consumers and delivery records");
    } else {
        tracing::info!(resource = %r.name, stream = %l.stream, "pgchannel stream already gone");
    }
    let stream_id = provider_id(&l.broker, &l.stream);
    ctx.state.update(|s| {
        s.resources.remove(&r.name);
        s.resources.retain(|_, rec| {
            !(rec.type_name == CONSUMER_TYPE
                && rec.provider_id.starts_with(&format!("{stream_id}/")))
        });
    })
}

pub async fn health(
    ctx: &Ctx,
    r: &ResourceRef,
    l: &Located,
    pg: &PgRecord,
) -> Result<(bool, String), DriverError> {
    match read(ctx, r, l, pg).await {
        Ok(o) => Ok((
            true,
            format!(
                "pgchannel stream {:?}: subjects {}",
                l.stream, o.outputs["subjects"]
            ),
        )),
        Err(e) if e.is_not_found() => Err(e),
        Err(e) => Ok((false, crate::error_chain::render(&e))),
    }
}

/// The streams this provider records on `broker`, read live (the domain has no listing of
/// rows; streams made outside wfctl are not enumerated).
pub async fn enumerate(
    ctx: &Ctx,
    broker: &str,
    pg: &PgRecord,
) -> Result<Vec<(String, Output)>, DriverError> {
    let state = ctx.state.load()?;
    let mut out = Vec::new();
    for (name, rec) in &state.resources {
        if rec.type_name != STREAM_TYPE || rec.broker != broker || !rec.servers.is_empty() {
            continue;
        }
        let r = ResourceRef {
            name: name.clone(),
            r#type: STREAM_TYPE.into(),
            provider_id: rec.provider_id.clone(),
        };
        let Some(l) = crate::iac::drivers::stream::locate(&state, &r, STREAM_TYPE) else {
            continue;
        };
        match read(ctx, &r, &l, pg).await {
            Ok(o) => out.push((l.stream.clone(), o)),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}
