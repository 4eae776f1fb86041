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
}
