// The counter's logic, shared by `counter` and `counter-fixed` (which sets
// `HONOUR_FAIL = false`). See `lib.rs` for the behaviour.

use core::sync::atomic::{AtomicU64, Ordering};

use ordo_guest::serde_json::{self, Value};

/// Messages this instance has handled (a fresh instance starts at 0).
static HANDLED: AtomicU64 = AtomicU64::new(0);
use ordo_guest::{debug, outbox, state, Handler, HandlerError, Message};

/// The conformance counter; `HONOUR_FAIL = false` ignores `fail`.
pub struct Counter<const HONOUR_FAIL: bool>;

impl<const HONOUR_FAIL: bool> Handler for Counter<HONOUR_FAIL> {
    fn handle(msg: Message) -> Result<(), HandlerError> {
        let handled = HANDLED.fetch_add(1, Ordering::Relaxed) + 1;
        let mut payload: Value = msg.payload_json()?;
        let seq = payload
            .get("seq")
            .and_then(Value::as_u64)
            .ok_or_else(|| HandlerError::permanent("payload has no unsigned integer `seq`"))?;
        // `fail_attempts: N` limits a failure to the first N attempts.
        let failing = payload
            .get("fail_attempts")
            .and_then(Value::as_u64)
            .is_none_or(|n| u64::from(msg.attempt) <= n);
        match payload.get("fail").and_then(Value::as_str) {
            _ if !HONOUR_FAIL || !failing => {}
            Some("retryable") => {
                return Err(HandlerError::retryable(format!(
                    "seq {seq}: asked to fail (retryable), attempt {}",
                    msg.attempt
                )))
            }
            Some("permanent") => {
                return Err(HandlerError::permanent(format!(
                    "seq {seq}: asked to fail (permanent)"
                )))
            }
            Some("trap") => panic!("seq {seq}: asked to trap"),
            Some("spin") => {
                // Runs until the host's deadline interrupts it.
                let mut x = seq;
                loop {
                    x = core::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                }
            }
            Some("bomb") => {
                // Grows memory until the host's limit stops it.
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 1 << 20]);
                    core::hint::black_box(&hoard);
                }
            }
            Some("log-flood") => {
                // Far more lines than the host keeps; the host caps them.
                for i in 0..100_000u32 {
                    ordo_guest::info!("seq {seq}: flood line {i}");
                }
            }
            Some("emit-flood") => {
                // More emits than the host's quota: the attempt fails.
                for _ in 0..100_000u32 {
                    outbox::emit("flood", &msg.partition_key, b"x", &[]);
                }
            }
            Some("state-flood") => {
                // A value over the host's size quota: the attempt fails.
                state::set("flood", &vec![b'x'; 8 << 20]);
            }
            Some("write-flood") => {
                // More state writes than the host's quota.
                for i in 0..100_000u32 {
                    state::set_str(&format!("flood-{i}"), "x");
                }
            }
            _ => {}
        }
        // `leak_kib: N` keeps N KiB allocated for good: memory that an
        // instance the host reuses carries into its next message.
        if let Some(kib) = payload.get("leak_kib").and_then(Value::as_u64) {
            let kib = usize::try_from(kib).unwrap_or(usize::MAX);
            core::mem::forget(core::hint::black_box(vec![1u8; kib.saturating_mul(1024)]));
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
        state::set_str("attempt", &msg.attempt.to_string());
        if payload.get("report_instance").and_then(Value::as_bool) == Some(true) {
            state::set_str("instance_messages", &handled.to_string());
        }

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
