//! What replacing a stream or consumer would destroy, read from the live server: a stream's
//! messages, bytes and consumers with their positions; a consumer's position. The plan shows it
//! next to the fields that force the replace, so nobody deletes data without seeing how much.

use crate::nats::{NatsConn, NatsError};
use async_nats::jetstream::consumer;
use futures::TryStreamExt;

/// At most this many consumers are named one by one; the rest are counted.
const NAMED: usize = 10;

/// One line: where a consumer stands.
fn position(i: &consumer::Info) -> String {
    format!(
        "{}: delivered up to stream seq {}, ack floor {}, {} pending, {} awaiting ack",
        i.name,
        i.delivered.stream_sequence,
        i.ack_floor.stream_sequence,
        i.num_pending,
        i.num_ack_pending
    )
}

/// What deleting stream `name` loses, or `None` when it does not exist or holds nothing.
pub async fn stream_loss(conn: &NatsConn, name: &str) -> Result<Option<String>, NatsError> {
    let Some(mut s) = fetch(conn, name).await? else {
        return Ok(None);
    };
    let info = s
        .info()
        .await
        .map_err(|e| NatsError::other("stream info", e))?;
    let (messages, bytes) = (info.state.messages, info.state.bytes);
    let consumers: Vec<consumer::Info> = s
        .consumers()
        .try_collect()
        .await
        .map_err(|e| NatsError::other("list consumers", e))?;
    if messages == 0 && consumers.is_empty() {
        return Ok(None);
    }
    let mut text = format!("deletes {messages} messages ({bytes} bytes)");
    if consumers.is_empty() {
        text.push_str(" and no consumers");
    } else {
        let named: Vec<String> = consumers.iter().take(NAMED).map(position).collect();
        text.push_str(&format!(
            " and {} consumers with their positions ({}{})",
            consumers.len(),
            named.join("; "),
            if consumers.len() > NAMED {
                format!("; and {} more", consumers.len() - NAMED)
            } else {
                String::new()
            }
        ));
    }
    Ok(Some(text))
}

/// What switching stream `name` to interest retention in place deletes at once: every message
/// when no consumer exists, else what all consumers have acknowledged (and anything on subjects
/// none of them filters). `None`: nothing stored.
pub async fn interest_loss(conn: &NatsConn, name: &str) -> Result<Option<String>, NatsError> {
    let Some(mut s) = fetch(conn, name).await? else {
        return Ok(None);
    };
    let info = s
        .info()
        .await
        .map_err(|e| NatsError::other("stream info", e))?;
    let messages = info.state.messages;
    if messages == 0 {
        return Ok(None);
    }
    let consumers: Vec<consumer::Info> = s
        .consumers()
        .try_collect()
        .await
        .map_err(|e| NatsError::other("list consumers", e))?;
    let floor = consumers.iter().map(|c| c.ack_floor.stream_sequence).min();
    Ok(Some(match floor {
        None => format!(
            "interest retention deletes all {messages} stored messages at once: the stream has no consumers"
        ),
        Some(floor) => format!(
            "interest retention deletes the stored messages all {} consumers have acknowledged (up to stream seq {floor}) and any on subjects none of them filters; {messages} are stored",
            consumers.len()
        ),
    }))
}

/// What deleting consumer `durable` loses, or `None` when it (or its stream) does not exist.
pub async fn consumer_loss(
    conn: &NatsConn,
    stream: &str,
    durable: &str,
) -> Result<Option<String>, NatsError> {
    let Some(s) = fetch(conn, stream).await? else {
        return Ok(None);
    };
    use async_nats::jetstream::context::ConsumerInfoErrorKind as K;
    match s.consumer_info(durable).await {
        Ok(i) => Ok(Some(format!(
            "deletes the position of consumer {}",
            position(&i)
        ))),
        Err(e) if matches!(e.kind(), K::NotFound) => Ok(None),
        Err(e) => match e.kind() {
            K::JetStream(api) if api.error_code() == crate::nats::error::CONSUMER_NOT_FOUND => {
                Ok(None)
            }
            _ => Err(NatsError::other("consumer info", e)),
        },
    }
}

async fn fetch(
    conn: &NatsConn,
    name: &str,
) -> Result<Option<async_nats::jetstream::stream::Stream>, NatsError> {
    use async_nats::jetstream::context::GetStreamErrorKind as K;
    match conn.js.get_stream(name).await {
        Ok(s) => Ok(Some(s)),
        Err(e) => match e.kind() {
            K::JetStream(api) if api.error_code() == crate::nats::error::STREAM_NOT_FOUND => {
                Ok(None)
            }
            _ => Err(NatsError::other("get stream", e)),
        },
    }
}
