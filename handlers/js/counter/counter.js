// The conformance counter in JavaScript; same behaviour as handlers/rust/counter.
//
// Payload: JSON `{"seq": <u64>, ...}`. Per message it appends `seq` to the
// key's state `seqs` (comma-separated decimals), increments `count` (decimal
// text) and sets `attempt` to the attempt that succeeded. Optional fields:
// - `"fail": "retryable" | "permanent"`: return that error, touching nothing;
//   `"trap"`: trap; `"spin"`: loop until the deadline; `"bomb"`: allocate
//   until the memory limit.
// - `"fail_attempts": N`: fail only on attempts 1..=N (then succeed).
// - `"emit": {"topic": T, "key": K}`: emit the payload minus `emit` to topic
//   T under key K, with the message's headers.

import * as state from "ordo:handler/state@0.1.0";
import { emit } from "ordo:handler/outbox@0.1.0";
import { log } from "ordo:handler/log@0.1.0";

const encoder = new TextEncoder();
const strictDecoder = new TextDecoder("utf-8", { fatal: true });

// Throwing `{ tag, val }` from an export returning `result` returns `err`.
const retryable = (text) => ({ tag: "retryable", val: text });
const permanent = (text) => ({ tag: "permanent", val: text });

// JSON numbers are doubles here: integers beyond 2^53 are not exact.
function asU64(value) {
  return Number.isSafeInteger(value) && value >= 0 ? value : undefined;
}

function getStr(key) {
  const raw = state.get(key);
  if (raw === undefined) return undefined;
  try {
    return strictDecoder.decode(raw);
  } catch {
    throw permanent(`state ${JSON.stringify(key)} is not UTF-8 text`);
  }
}

// Compact JSON with object keys sorted: byte-for-byte what the Rust counter
// emits.
function canonical(value) {
  if (Array.isArray(value)) return `[${value.map(canonical).join(",")}]`;
  if (value !== null && typeof value === "object") {
    const keys = Object.keys(value).sort();
    return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(value[k])}`).join(",")}}`;
  }
  return JSON.stringify(value);
}

export function handle(msg) {
  let payload;
  try {
    payload = JSON.parse(strictDecoder.decode(msg.payload));
  } catch (e) {
    throw permanent(`payload is not the expected JSON: ${e.message}`);
  }
  const isObject = payload !== null && typeof payload === "object" && !Array.isArray(payload);
  const fields = isObject ? payload : {};
  const seq = asU64(fields.seq);
  if (seq === undefined) throw permanent("payload has no unsigned integer `seq`");

  const limit = asU64(fields.fail_attempts);
  const failing = limit === undefined || msg.attempt <= limit;
  if (failing) {
    switch (fields.fail) {
      case "retryable":
        throw retryable(`seq ${seq}: asked to fail (retryable), attempt ${msg.attempt}`);
      case "permanent":
        throw permanent(`seq ${seq}: asked to fail (permanent)`);
      case "trap":
        // Not a `{ tag, val }` error: the call traps.
        throw new Error(`seq ${seq}: asked to trap`);
      case "spin": {
        // Runs until the host's deadline interrupts it.
        let x = seq;
        for (;;) x = (x * 1103515245 + 12345) % 2147483648;
      }
      case "bomb": {
        // Grows memory until the host's limit stops it.
        const hoard = [];
        for (;;) hoard.push(new Uint8Array(1 << 20).fill(1));
      }
      default:
    }
  }

  const old = getStr("seqs");
  const seqs = old ? `${old},${seq}` : `${seq}`;
  const countText = getStr("count");
  let count = 1;
  if (countText !== undefined) {
    if (!/^\+?[0-9]+$/.test(countText) || !Number.isSafeInteger(Number(countText))) {
      throw permanent(`state \`count\` is not a number: ${JSON.stringify(countText)}`);
    }
    count = Number(countText) + 1;
  }
  state.set("seqs", encoder.encode(seqs));
  state.set("count", encoder.encode(`${count}`));
  state.set("attempt", encoder.encode(`${msg.attempt}`));

  if (isObject && Object.hasOwn(payload, "emit")) {
    const target = payload.emit;
    delete payload.emit;
    const topic = target?.topic;
    const key = target?.key;
    if (typeof topic !== "string" || typeof key !== "string") {
      throw permanent("`emit` needs string `topic` and `key`");
    }
    emit(topic, key, encoder.encode(canonical(payload)), msg.headers);
  }
  log("debug", `key ${msg.partitionKey} seq ${seq} count ${count}`);
}
