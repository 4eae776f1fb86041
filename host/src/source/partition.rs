//! Partitioning: which partition a partition key lives in.
//!
//! `partition = fnv1a_32(utf8 bytes of the key) % partitions`, with the
//! standard 32-bit FNV-1a (offset basis 0x811c9dc5, prime 0x01000193). It is
//! stable across versions, platforms and restarts: producers may compute it
//! themselves, and changing it would break per-key order of existing data.

/// The 32-bit FNV-1a hash of `bytes`.
pub fn fnv1a_32(bytes: &[u8]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for &b in bytes {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash
}

/// The partition of `key` in a topic with `partitions` partitions.
///
/// `partitions` must be at least 1 (topics are validated on creation); 0 is
/// treated as 1 rather than panicking.
pub fn partition_for(key: &str, partitions: u32) -> u32 {
    fnv1a_32(key.as_bytes()) % partitions.max(1)
}

/// The canary bucket (0..100) of a partition key:
/// `fnv1a_32("canary/" + key) % 100`. A canary at P % runs the keys whose
/// bucket is below P; the prefix keeps the choice independent of the
/// partition a key lives in.
pub fn canary_bucket(key: &str) -> u32 {
    let mut bytes = Vec::with_capacity(7 + key.len());
    bytes.extend_from_slice(b"canary/");
    bytes.extend_from_slice(key.as_bytes());
    fnv1a_32(&bytes) % 100
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        // Reference values of 32-bit FNV-1a.
        assert_eq!(fnv1a_32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a_32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a_32(b"foobar"), 0xbf9c_f968);
        assert_eq!(partition_for("foobar", 16), 0xbf9c_f968 % 16);
        assert_eq!(partition_for("x", 0), 0);
    }

    #[test]
    fn canary_buckets_spread() {
        let below_30 = (0..10_000)
            .filter(|i| canary_bucket(&format!("key-{i}")) < 30)
            .count();
        assert!((2_700..3_300).contains(&below_30), "{below_30}");
        assert_eq!(canary_bucket("k"), canary_bucket("k"));
    }
}
