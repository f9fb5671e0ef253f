//! Advisory-lock keys. The subscriber lock uses the single-bigint key space with the Go
//! plugin's key (FNV-64a of `stream NUL consumer`), so a Go subscriber and ours exclude each
//! other. Our other locks use the two-int4 key space (a separate space in pg_locks), under
//! one class id, so they never collide with the Go key or with each other's kinds.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

pub(crate) fn fnv64a(parts: &[&[u8]]) -> u64 {
    let mut h = FNV_OFFSET;
    for p in parts {
        for b in *p {
            h ^= u64::from(*b);
            h = h.wrapping_mul(FNV_PRIME);
        }
    }
    h
}

/// The session advisory lock key for a consumer, as the Go plugin computes it.
pub fn consumer_lock_key(stream: &str, consumer: &str) -> i64 {
    fnv64a(&[stream.as_bytes(), &[0], consumer.as_bytes()]) as i64
}

/// Class id of our two-int4 advisory locks ("EBUS").
pub(crate) const LOCK_CLASS: i32 = 0x4542_5553;

/// Second key of the schema-migration lock.
pub(crate) const SCHEMA_KEY: i32 = 0;

/// Two-int4 key for per-stream publish ordering (shared by publishers, exclusive when a
/// consumer position is advanced).
pub(crate) fn stream_key(stream: &str) -> i32 {
    fold(fnv64a(&[b"stream\0", stream.as_bytes()]))
}

/// Two-int4 key serialising publishes of one message id on one stream (de-duplication).
pub(crate) fn msg_id_key(stream: &str, msg_id: &str) -> i32 {
    fold(fnv64a(&[
        b"msgid\0",
        stream.as_bytes(),
        &[0],
        msg_id.as_bytes(),
    ]))
}

pub(crate) fn fold(h: u64) -> i32 {
    ((h >> 32) ^ (h & 0xffff_ffff)) as u32 as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv64a_matches_the_reference_vectors() {
        // Reference values of FNV-1a 64 (draft-eastlake-fnv).
        assert_eq!(fnv64a(&[b""]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv64a(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv64a(&[b"foobar"]), 0x8594_4171_f739_67e8);
        assert_eq!(
            consumer_lock_key("S", "c"),
            fnv64a(&[b"S\0c"]) as i64,
            "stream NUL consumer"
        );
    }
}
