//! `eventbus.object_store` / `step.eventbus.object`: what may reach a JetStream object store.
//!
//! The server keeps an object store as the stream `OBJ_<bucket>` (`crate::nats::kv::OBJ`): each
//! object is a run of chunk messages on `$O.<bucket>.C.<nuid>` and one metadata message on
//! `$O.<bucket>.M.<name as base64url>`. The name is encoded before it becomes a subject, so it
//! can never add a token; it is still checked here (no control characters, no wildcards, a
//! length bound) so that what a pipeline names is what a person reads. Buckets follow the
//! key-value rule (`kv::check_bucket`). Sizes are checked on the bytes sent, before the first
//! chunk: an object that cannot fit leaves nothing behind in the bucket.

use super::NatsError;
use crate::secret::quote;
use async_nats::jetstream::object_store::{
    DeleteErrorKind, GetErrorKind, InfoErrorKind, ObjectInfo, ObjectMetadata, ObjectStore,
};
use futures::TryStreamExt;
use tokio::io::AsyncReadExt;

pub use super::kv::check_bucket;

/// The longest object name accepted.
pub const MAX_OBJECT_NAME: usize = 1024;
/// What a put sends or a get reads at most when the step sets no `max_object_size`: the
/// object is held in memory and returned in the step's output (bytes, text and JSON forms).
pub const DEFAULT_MAX_OBJECT_SIZE: i64 = 8 << 20;
/// The largest `max_object_size` a step may set.
pub const MAX_MAX_OBJECT_SIZE: i64 = 256 << 20;
/// The most objects one `list` returns.
pub const MAX_OBJECTS: usize = 10_000;
/// Bytes of one chunk (the client's default), lowered to the server's max_payload.
const CHUNK: usize = 128 * 1024;
/// Upper bound of what a stored message adds to its payload in the stream's byte count (the
/// store's record framing, sequence, time, checksum) beyond subject and headers.
const RECORD_OVERHEAD: usize = 64;
/// Upper bound of the metadata record's JSON beyond the name and description (bucket, nuid,
/// size, chunks, digest, time, options) plus its roll-up header.
const META_OVERHEAD: usize = 512;

/// An object name: 1 to [`MAX_OBJECT_NAME`] bytes of printable text without `*` or `>`
/// (e.g. `reports/2026/jan.pdf`).
pub fn check_object_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("is required".into());
    }
    if name.len() > MAX_OBJECT_NAME {
        return Err(format!(
            "{} is {} bytes long; object names are limited to {MAX_OBJECT_NAME} bytes",
            quote(name),
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_control() || matches!(c, '*' | '>'))
    {
        return Err(format!(
            "{} contains {c:?}; object names are printable text without wildcards ('*', '>') or control characters (e.g. reports/2026/jan.pdf)",
            quote(name)
        ));
    }
    if name.trim() != name {
        return Err(format!("{} starts or ends with whitespace", quote(name)));
    }
    Ok(())
}

/// One object-store operation of `step.eventbus.object`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectAction {
    Put,
    Get,
    Delete,
    List,
    Info,
}

impl ObjectAction {
    pub const NAMES: &'static str = "put, get, delete, list or info";
    pub fn parse(s: &str) -> Option<ObjectAction> {
        Some(match s {
            "put" => ObjectAction::Put,
            "get" => ObjectAction::Get,
            "delete" => ObjectAction::Delete,
            "list" => ObjectAction::List,
            "info" => ObjectAction::Info,
            _ => return None,
        })
    }
}

/// What the store records about one object (async-nats' `ObjectInfo`, the fields a pipeline reads).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stored {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub chunks: u64,
    pub digest: String,
    pub modified: Option<time::OffsetDateTime>,
    pub nuid: String,
}

impl From<ObjectInfo> for Stored {
    fn from(i: ObjectInfo) -> Stored {
        Stored {
            name: i.name,
            description: i.description.unwrap_or_default(),
            size: i.size as u64,
            chunks: i.chunks as u64,
            digest: i.digest.unwrap_or_default(),
            modified: i.modified,
            nuid: i.nuid,
        }
    }
}

/// What an operation found or did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ObjectOutcome {
    pub found: bool,
    pub data: Vec<u8>,
    pub info: Option<Stored>,
    pub objects: Vec<Stored>,
}

/// One checked operation: bucket passed `check_bucket`, name `check_object_name` (but for list).
pub struct ObjectOp<'a> {
    pub bucket: &'a str,
    pub action: ObjectAction,
    pub name: &'a str,
    pub data: Vec<u8>,
    pub description: &'a str,
    /// The step's `max_object_size`, in bytes.
    pub max_size: usize,
}

/// The store and its stream's config and state (read once, fresh: what a put's size checks
/// read); a missing store is `NotFound`, any other failure is said as such.
async fn open(
    js: &async_nats::jetstream::Context,
    bucket: &str,
) -> Result<(ObjectStore, async_nats::jetstream::stream::Info), NatsError> {
    use async_nats::jetstream::context::GetStreamErrorKind as K;
    let what = format!("object store {bucket:?}");
    let stream = js
        .get_stream(super::kv::OBJ.stream_name(bucket))
        .await
        .map_err(|e| match e.kind() {
            K::JetStream(api) if api.error_code() == super::error::STREAM_NOT_FOUND => {
                NatsError::NotFound { what: what.clone() }
            }
            K::JetStream(api) => super::error::lift_api("open object store", &what, &api),
            _ => NatsError::other("open object store", e),
        })?;
    let info = stream.cached_info().clone();
    let store = js
        .get_object_store(bucket)
        .await
        .map_err(|e| NatsError::other("open object store", e))?;
    Ok((store, info))
}

/// Refuses a put its step, its bucket's `max_bucket_size` or the server would refuse, counted on
/// what it sends (every chunk and the metadata record, as the stream counts them), before the
/// first chunk. Returns the chunk size to send with.
fn check_put(
    op: &ObjectOp<'_>,
    info: &async_nats::jetstream::stream::Info,
    max_payload: usize,
) -> Result<usize, NatsError> {
    let data = op.data.len();
    if data > op.max_size {
        return Err(NatsError::OverLimit {
            what: "data".into(),
            size: data,
            limit: op.max_size,
            limit_name: "the step's max_object_size".into(),
        });
    }
    let chunk = CHUNK.min(max_payload).max(1);
    // The metadata record carries the name (base64url in its subject, as text in its JSON).
    let meta = META_OVERHEAD + op.name.len() * 3 + op.description.len() + op.bucket.len() * 2;
    super::wire::check_fits(
        "the object's metadata record (name and description)",
        &async_nats::HeaderMap::new(),
        meta,
        max_payload,
    )?;
    let chunk_subject = format!("$O.{}.C.", op.bucket).len() + 22;
    let stored =
        data + data.div_ceil(chunk) * (chunk_subject + RECORD_OVERHEAD) + meta + RECORD_OVERHEAD;
    let max_bytes = info.config.max_bytes;
    if max_bytes > 0 {
        let used = info.state.bytes as usize;
        if used + stored > max_bytes as usize {
            return Err(NatsError::OverLimit {
                what: format!(
                    "data (stored with its chunk and metadata records; the bucket holds {used} bytes already)"
                ),
                size: stored,
                limit: (max_bytes as usize).saturating_sub(used),
                limit_name: format!("the room left in bucket {:?} under its max_bucket_size", op.bucket),
            });
        }
    }
    Ok(chunk)
}

/// The object's record, `None` when it never existed or was deleted (a deleted object keeps a
/// tombstone record).
async fn live_info(store: &ObjectStore, name: &str) -> Result<Option<ObjectInfo>, NatsError> {
    match store.info(name).await {
        Ok(i) => Ok((!i.deleted).then_some(i)),
        Err(e) if e.kind() == InfoErrorKind::NotFound => Ok(None),
        Err(e) => Err(NatsError::other("read object info", e)),
    }
}

/// Runs one checked operation.
pub async fn run(
    js: &async_nats::jetstream::Context,
    op: ObjectOp<'_>,
) -> Result<ObjectOutcome, NatsError> {
    let bucket = op.bucket;
    let name = op.name;
    let mut out = ObjectOutcome::default();
    let (store, stream) = open(js, bucket).await?;
    if op.action == ObjectAction::Put {
        // The bucket's limits and use, read before anything is sent.
        let chunk = check_put(&op, &stream, js.client().max_payload())?;
        let meta = ObjectMetadata {
            name: name.to_string(),
            description: (!op.description.is_empty()).then(|| op.description.to_string()),
            chunk_size: Some(chunk),
            ..Default::default()
        };
        let info = store
            .put(meta, &mut op.data.as_slice())
            .await
            .map_err(|e| NatsError::other("put object", e))?;
        out.found = true;
        out.info = Some(info.into());
        return Ok(out);
    }
    match op.action {
        ObjectAction::Put => {}
        ObjectAction::Info | ObjectAction::Get => {
            let Some(info) = live_info(&store, name).await? else {
                return Ok(out);
            };
            if op.action == ObjectAction::Get {
                if info.size > op.max_size {
                    return Err(NatsError::OverLimit {
                        what: format!("object {name:?}"),
                        size: info.size,
                        limit: op.max_size,
                        limit_name: "the step's max_object_size".into(),
                    });
                }
                let object = match store.get(name).await {
                    Ok(o) => o,
                    Err(e) if e.kind() == GetErrorKind::NotFound => return Ok(out),
                    Err(e) => return Err(NatsError::other("get object", e)),
                };
                // Bounded again while reading: a link may lead to a larger object.
                let mut data = Vec::with_capacity(info.size);
                object
                    .take(op.max_size as u64 + 1)
                    .read_to_end(&mut data)
                    .await
                    .map_err(|e| NatsError::other("read object", e))?;
                if data.len() > op.max_size {
                    return Err(NatsError::OverLimit {
                        what: format!("object {name:?}"),
                        size: data.len(),
                        limit: op.max_size,
                        limit_name: "the step's max_object_size".into(),
                    });
                }
                out.data = data;
            }
            out.found = true;
            out.info = Some(info.into());
        }
        ObjectAction::Delete => {
            if live_info(&store, name).await?.is_none() {
                return Ok(out);
            }
            match store.delete(name).await {
                Ok(()) => out.found = true,
                Err(e) if e.kind() == DeleteErrorKind::NotFound => {}
                Err(e) => return Err(NatsError::other("delete object", e)),
            }
        }
        ObjectAction::List => {
            let list = store
                .list()
                .await
                .map_err(|e| NatsError::other("list objects", e))?;
            let mut list = list.map_err(|e| NatsError::other("list objects", e));
            while let Some(i) = list.try_next().await? {
                out.objects.push(i.into());
                if out.objects.len() >= MAX_OBJECTS {
                    break;
                }
            }
            out.objects.sort_by(|a, b| a.name.cmp(&b.name));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_checked() {
        for ok in ["a", "reports/2026/jan.pdf", "a b.txt", "ü.txt", "$JS.API.x"] {
            assert!(check_object_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a*", "a.>", "a\r\nPUB x", "a\0", "\ta", " a", "a "] {
            let e = check_object_name(bad).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
        }
        assert!(check_object_name(&"a".repeat(MAX_OBJECT_NAME + 1)).is_err());
    }
}
