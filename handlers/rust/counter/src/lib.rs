//! The conformance handler every ordo test uses.
//!
//! Payload: JSON `{"seq": <u64>, ...}`. Per message it appends `seq` to the
//! key's state `seqs` (comma-separated decimals, e.g. `1,2,3`) and increments
//! `count` (decimal text). Optional fields:
//! - `"fail": "retryable" | "permanent"`: return that error, touching nothing;
//!   `"fail": "trap"`: panic (a trap).
//! - `"emit": {"topic": T, "key": K}`: emit the payload minus `emit` to topic
//!   T under key K, with the message's headers.

use ordo_guest::serde_json::{self, Value};
use ordo_guest::{debug, export_handler, outbox, state, Handler, HandlerError, Message};

struct Counter;

impl Handler for Counter {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let mut payload: Value = msg.payload_json()?;
        let seq = payload
            .get("seq")
            .and_then(Value::as_u64)
            .ok_or_else(|| HandlerError::permanent("payload has no unsigned integer `seq`"))?;
        match payload.get("fail").and_then(Value::as_str) {
            Some("retryable") => {
                return Err(HandlerError::retryable(format!(
                    "seq {seq}: asked to fail (retryable)"
                )))
            }
            Some("permanent") => {
                return Err(HandlerError::permanent(format!(
                    "seq {seq}: asked to fail (permanent)"
                )))
            }
            Some("trap") => panic!("seq {seq}: asked to trap"),
            _ => {}
        }

        let seqs = match state::get_str("seqs")? {
            Some(old) if !old.is_empty() => format!("{old},{seq}"),
            _ => seq.to_string(),
        };
        let count = match state::get_str("count")? {
            Some(c) => c.parse::<u64>().map_err(|_| {
                HandlerError::permanent(format!("state `count` is not a number: {c:?}"))
            })?,
            None => 0,
        } + 1;
        state::set_str("seqs", &seqs);
        state::set_str("count", &count.to_string());

        if let Some(emit) = payload.as_object_mut().and_then(|o| o.remove("emit")) {
            let topic = emit.get("topic").and_then(Value::as_str);
            let key = emit.get("key").and_then(Value::as_str);
            let (Some(topic), Some(key)) = (topic, key) else {
                return Err(HandlerError::permanent(
                    "`emit` needs string `topic` and `key`",
                ));
            };
            let body = serde_json::to_vec(&payload)
                .map_err(|e| HandlerError::permanent(format!("cannot encode emit: {e}")))?;
            outbox::emit(topic, key, &body, &msg.headers);
        }
        debug!("key {} seq {seq} count {count}", msg.partition_key);
        Ok(())
    }
}

export_handler!(Counter);
