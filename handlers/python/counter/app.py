"""The conformance counter in Python; same behaviour as handlers/rust/counter.

Payload: JSON `{"seq": <u64>, ...}`. Per message it appends `seq` to the
key's state `seqs` (comma-separated decimals), increments `count` (decimal
text) and sets `attempt` to the attempt that succeeded. Optional fields:
- `"fail": "retryable" | "permanent"`: return that error, touching nothing;
  `"trap"`: trap; `"spin"`: loop until the deadline; `"bomb"`: allocate until
  the memory limit.
- `"fail_attempts": N`: fail only on attempts 1..=N (then succeed).
- `"emit": {"topic": T, "key": K}`: emit the payload minus `emit` to topic T
  under key K, with the message's headers.
"""

import json

import wit_world
from componentize_py_types import Err
from wit_world.imports import log, outbox, state
from wit_world.imports.types import (
    HandlerError_Permanent,
    HandlerError_Retryable,
    Message,
)

U64_MAX = (1 << 64) - 1


def permanent(text: str) -> Err:
    return Err(HandlerError_Permanent(text))


def as_u64(value):
    """The value as an unsigned 64-bit integer, or None (JSON semantics)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= U64_MAX:
        return value
    return None


def get_str(key: str):
    raw = state.get(key)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise permanent(f"state {json.dumps(key)} is not UTF-8 text")


def parse_u64(text: str):
    """Decimal digits only (an optional leading `+`), like Rust's u64 parse."""
    digits = text[1:] if text.startswith("+") else text
    if digits and digits.isascii() and digits.isdigit():
        value = int(digits)
        if value <= U64_MAX:
            return value
    return None


class WitWorld(wit_world.WitWorld):
    def handle(self, msg: Message) -> None:
        try:
            payload = json.loads(msg.payload)
        except (ValueError, UnicodeDecodeError) as e:
            raise permanent(f"payload is not the expected JSON: {e}")
        fields = payload if isinstance(payload, dict) else {}
        seq = as_u64(fields.get("seq"))
        if seq is None:
            raise permanent("payload has no unsigned integer `seq`")

        limit = as_u64(fields.get("fail_attempts"))
        failing = limit is None or msg.attempt <= limit
        fail = fields.get("fail")
        if failing and isinstance(fail, str):
            if fail == "retryable":
                raise Err(
                    HandlerError_Retryable(
                        f"seq {seq}: asked to fail (retryable), attempt {msg.attempt}"
                    )
                )
            if fail == "permanent":
                raise permanent(f"seq {seq}: asked to fail (permanent)")
            if fail == "trap":
                # Any exception other than `Err` escaping `handle` is a trap.
                raise RuntimeError(f"seq {seq}: asked to trap")
            if fail == "spin":
                # Runs until the host's deadline interrupts it.
                x = seq
                while True:
                    x = (x * 6364136223846793005 + 1) & U64_MAX
            if fail == "bomb":
                # Grows memory until the host's limit stops it.
                hoard = []
                while True:
                    hoard.append(bytearray(b"\x01" * (1 << 20)))

        old = get_str("seqs")
        seqs = f"{old},{seq}" if old else str(seq)
        count_text = get_str("count")
        if count_text is None:
            count = 1
        else:
            parsed = parse_u64(count_text)
            if parsed is None:
                raise permanent(
                    f"state `count` is not a number: {json.dumps(count_text)}"
                )
            count = parsed + 1
        state.set("seqs", seqs.encode())
        state.set("count", str(count).encode())
        state.set("attempt", str(msg.attempt).encode())

        if isinstance(payload, dict) and "emit" in payload:
            emit = payload.pop("emit")
            emit = emit if isinstance(emit, dict) else {}
            topic, key = emit.get("topic"), emit.get("key")
            if not isinstance(topic, str) or not isinstance(key, str):
                raise permanent("`emit` needs string `topic` and `key`")
            # Compact with sorted keys: byte-for-byte what the Rust counter emits.
            body = json.dumps(
                payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False
            )
            outbox.emit(topic, key, body.encode(), msg.headers)
        log.log(
            log.Level.DEBUG, f"key {msg.partition_key} seq {seq} count {count}"
        )
