//! Every key encoding of every ledger space, in one place. In the ledger's
//! sled tree each key below is preceded by its space's byte (1, 2, … in the
//! order of the table; see `space`); the encodings here never
//! include it.
//!
//! Integers are big-endian so byte order equals numeric order; strings are a
//! u32 big-endian length followed by the UTF-8 bytes, so a prefix of one
//! string can never be confused with another (`"a"` vs `"ab"`) and range
//! scans over a prefix of components are exact.
//!
//! | byte | space | key |
//! |---|---|---|
//! | 1 | `log` | str topic, u32 partition, u64 offset |
//! | 2 | `cursor` | str handler, str source, u32 partition |
//! | 3 | `state` | str handler, str partition key (one record per key: every state key and value; up to format 2 one entry per state key: + str state key) |
//! | 4 | `dedup` | str handler, str idempotency key (one record per key, written up to format 4; read, swept and exported where it is) |
//! | 5 | `outbox` | u64 sequence |
//! | 6 | `dlq` | str handler, u64 sequence |
//! | 7 | `parked` | str handler, u32 partition, str partition key |
//! | 8 | `dlq_actions` | str handler, u32 partition, u64 dead-letter sequence |
//! | 9 | `audit` | u64 sequence |
//! | 10 | `handlers` | str name, u64 version |
//! | 11 | `artifacts` | content hash (hex, raw bytes) |
//! | 12 | `meta` | `topic/` + topic name; `low/` + str topic, u32 partition; `control/` + str handler; `id_floor` |
//! | 13 | `dedup_segments` | str handler, u64 segment sequence (format 5 on: a batch's idempotency records in one value, see `ledger::dedup`; the last space, so the tree's hot end holds nothing else) |

/// Builds a key from components.
#[derive(Default)]
pub struct KeyBuf(Vec<u8>);

impl KeyBuf {
    /// An empty key.
    pub fn new() -> Self {
        KeyBuf(Vec::with_capacity(64))
    }

    /// Appends a length-prefixed string.
    pub fn str(mut self, s: &str) -> Self {
        self.0.extend_from_slice(&(s.len() as u32).to_be_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }

    /// Appends a big-endian u32.
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a big-endian u64.
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// The encoded bytes.
    pub fn done(self) -> Vec<u8> {
        self.0
    }
}

/// Reads components back from a key.
pub struct KeyReader<'a>(&'a [u8]);

impl<'a> KeyReader<'a> {
    /// Starts reading `key`.
    pub fn new(key: &'a [u8]) -> Self {
        KeyReader(key)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    /// Reads a length-prefixed string.
    pub fn str(&mut self) -> Option<&'a str> {
        let len = u32::from_be_bytes(self.take(4)?.try_into().ok()?) as usize;
        std::str::from_utf8(self.take(len)?).ok()
    }

    /// Reads a length-prefixed byte string.
    pub fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = u32::from_be_bytes(self.take(4)?.try_into().ok()?) as usize;
        self.take(len)
    }

    /// Whether everything has been read.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Reads a big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    /// Reads a big-endian u64.
    pub fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// `log` key of one message.
pub fn log(topic: &str, partition: u32, offset: u64) -> Vec<u8> {
    KeyBuf::new().str(topic).u32(partition).u64(offset).done()
}

/// (topic, partition, offset) of a `log` key: the first offset of its
/// segment.
pub fn parse_log(key: &[u8]) -> Option<(&str, u32, u64)> {
    let mut r = KeyReader::new(key);
    let parsed = (r.str()?, r.u32()?, r.u64()?);
    r.is_empty().then_some(parsed)
}

/// Prefix of all `log` keys of one partition.
pub fn log_partition(topic: &str, partition: u32) -> Vec<u8> {
    KeyBuf::new().str(topic).u32(partition).done()
}

/// `cursor` key.
pub fn cursor(handler: &str, source: &str, partition: u32) -> Vec<u8> {
    KeyBuf::new().str(handler).str(source).u32(partition).done()
}

/// `state` key: the record holding all of one partition key's state.
pub fn state(handler: &str, partition_key: &str) -> Vec<u8> {
    KeyBuf::new().str(handler).str(partition_key).done()
}

/// (handler, partition key) of a `state` record key.
pub fn parse_state(key: &[u8]) -> Option<(&str, &str)> {
    let mut r = KeyReader::new(key);
    let parsed = (r.str()?, r.str()?);
    r.is_empty().then_some(parsed)
}

/// Key of ONE state value: how format 2 stored state, and how exports
/// list it (one line per state key, whatever the layout).
pub fn state_entry(handler: &str, partition_key: &str, state_key: &str) -> Vec<u8> {
    KeyBuf::new()
        .str(handler)
        .str(partition_key)
        .str(state_key)
        .done()
}

/// (handler, partition key, state key) of a [`state_entry`] key. Never
/// matches a [`state`] record key (it has one string fewer).
pub fn parse_state_entry(key: &[u8]) -> Option<(&str, &str, &str)> {
    let mut r = KeyReader::new(key);
    let parsed = (r.str()?, r.str()?, r.str()?);
    r.is_empty().then_some(parsed)
}

/// `dedup` key: one idempotency record under its own key (written up to
/// format 4; see [`dedup_segment`]).
pub fn dedup(handler: &str, idempotency_key: &str) -> Vec<u8> {
    KeyBuf::new().str(handler).str(idempotency_key).done()
}

/// `dedup_segments` key: (handler, segment sequence).
pub fn dedup_segment(handler: &str, sequence: u64) -> Vec<u8> {
    KeyBuf::new().str(handler).u64(sequence).done()
}

/// (handler, idempotency key) of a [`dedup`] key.
pub fn parse_dedup(key: &[u8]) -> Option<(&str, &str)> {
    let mut r = KeyReader::new(key);
    let parsed = (r.str()?, r.str()?);
    r.is_empty().then_some(parsed)
}

/// (handler, sequence) of a [`dedup_segment`] key.
pub fn parse_dedup_segment(key: &[u8]) -> Option<(&str, u64)> {
    let mut r = KeyReader::new(key);
    let parsed = (r.str()?, r.u64()?);
    r.is_empty().then_some(parsed)
}

/// `dlq` key.
pub fn dlq(handler: &str, sequence: u64) -> Vec<u8> {
    KeyBuf::new().str(handler).u64(sequence).done()
}

/// `parked` key: (handler, partition, partition key).
pub fn parked(handler: &str, partition: u32, partition_key: &str) -> Vec<u8> {
    KeyBuf::new()
        .str(handler)
        .u32(partition)
        .str(partition_key)
        .done()
}

/// `dlq_actions` key: (handler, partition, dead-letter sequence).
pub fn dlq_action(handler: &str, partition: u32, sequence: u64) -> Vec<u8> {
    KeyBuf::new()
        .str(handler)
        .u32(partition)
        .u64(sequence)
        .done()
}

/// Prefix of one handler's keys of one partition (`parked`, `dlq_actions`).
pub fn handler_partition(handler: &str, partition: u32) -> Vec<u8> {
    KeyBuf::new().str(handler).u32(partition).done()
}

/// `audit` key.
pub fn audit(sequence: u64) -> Vec<u8> {
    sequence.to_be_bytes().to_vec()
}

/// Prefix of one handler's keys (`dlq`, `dedup`, `state`, `cursor`, `handlers`).
pub fn handler_prefix(handler: &str) -> Vec<u8> {
    KeyBuf::new().str(handler).done()
}

/// `handlers` key.
pub fn handler_version(name: &str, version: u64) -> Vec<u8> {
    KeyBuf::new().str(name).u64(version).done()
}

/// `outbox` key.
pub fn outbox(sequence: u64) -> Vec<u8> {
    sequence.to_be_bytes().to_vec()
}

/// The sequence of an `outbox` key.
pub fn parse_outbox(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// `meta` key of a handler's [`super::records::HandlerControl`].
pub fn handler_control(handler: &str) -> Vec<u8> {
    let mut k = b"control/".to_vec();
    k.extend_from_slice(&handler_prefix(handler));
    k
}

/// `meta` key of a partition's low watermark (first offset kept).
pub fn low_watermark(topic: &str, partition: u32) -> Vec<u8> {
    let mut k = b"low/".to_vec();
    k.extend_from_slice(&log_partition(topic, partition));
    k
}

/// Prefix of topic configurations in `meta`.
pub const TOPIC_META_PREFIX: &[u8] = b"topic/";

/// `meta` key of a topic's configuration.
pub fn topic_meta(topic: &str) -> Vec<u8> {
    let mut k = TOPIC_META_PREFIX.to_vec();
    k.extend_from_slice(topic.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_order() {
        let k = log("orders", 3, 256);
        let mut r = KeyReader::new(&k);
        assert_eq!(
            (r.str(), r.u32(), r.u64()),
            (Some("orders"), Some(3), Some(256))
        );
        assert!(log("t", 0, 255) < log("t", 0, 256));
        assert!(log("t", 0, u64::MAX) < log("t", 1, 0));
        assert!(log("t", 1, 5).starts_with(&log_partition("t", 1)));
        assert!(!log("t", 10, 5).starts_with(&log_partition("t", 1)));
    }

    #[test]
    fn prefixes_do_not_collide() {
        assert!(!dlq("ab", 1).starts_with(&handler_prefix("a")));
        assert!(dlq("a", 1).starts_with(&handler_prefix("a")));
        assert_ne!(state_entry("a", "bc", "d"), state_entry("ab", "c", "d"));
        assert_ne!(state("a", "bc"), state("ab", "c"));
        // The two state key forms are told apart by their shape.
        let entry = state_entry("h", "k", "count");
        assert_eq!(parse_state_entry(&entry), Some(("h", "k", "count")));
        assert_eq!(parse_state(&entry), None);
        assert_eq!(parse_state(&state("h", "k")), Some(("h", "k")));
        assert_eq!(parse_log(&log("t", 3, 9)), Some(("t", 3, 9)));
        assert_eq!(parse_log(&state("h", "k")), None);
        assert_eq!(parse_state_entry(&state("h", "k")), None);
        assert_ne!(dedup("a", "b"), dedup("ab", ""));
        assert_eq!(parse_dedup(&dedup("h", "k")), Some(("h", "k")));
        assert_eq!(parse_dedup(&dedup("h", "")), Some(("h", "")));
        assert_eq!(parse_dedup_segment(&dedup_segment("h", 7)), Some(("h", 7)));
        assert!(dedup_segment("h", 1) < dedup_segment("h", 2));
        assert_eq!(parse_dedup_segment(&dedup_segment("h", 7)[..10]), None);
        assert_eq!(parse_dedup(&dedup_segment("h", 7)), None);
    }
}
