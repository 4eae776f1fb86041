// The conformance counter in Go; same behaviour as handlers/rust/counter.
//
// Payload: JSON `{"seq": <u64>, ...}`. Per message it appends `seq` to the
// key's state `seqs` (comma-separated decimals), increments `count` (decimal
// text) and sets `attempt` to the attempt that succeeded. Optional fields:
//   - `"fail": "retryable" | "permanent"`: return that error, touching
//     nothing; `"trap"`: trap; `"spin"`: loop until the deadline; `"bomb"`:
//     allocate until the memory limit.
//   - `"fail_attempts": N`: fail only on attempts 1..=N (then succeed).
//   - `"emit": {"topic": T, "key": K}`: emit the payload minus `emit` to
//     topic T under key K, with the message's headers.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"
)

// asU64 is serde_json's `as_u64`: a JSON integer without sign, fraction or
// exponent that fits in 64 bits.
func asU64(v any) (uint64, bool) {
	n, ok := v.(json.Number)
	if !ok {
		return 0, false
	}
	s := string(n)
	if s == "" || strings.ContainsAny(s, "+-.eE") {
		return 0, false
	}
	u, err := strconv.ParseUint(s, 10, 64)
	return u, err == nil
}

func getStr(key string) (string, bool, *HandlerError) {
	raw, ok := StateGet(key)
	if !ok {
		return "", false, nil
	}
	if !utf8.Valid(raw) {
		return "", false, Permanent(fmt.Sprintf("state %q is not UTF-8 text", key))
	}
	return string(raw), true, nil
}

// encode writes compact JSON with object keys sorted (Go sorts map keys),
// without HTML escaping: what the Rust counter emits.
func encode(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}

func handle(msg Message) *HandlerError {
	dec := json.NewDecoder(bytes.NewReader(msg.Payload))
	dec.UseNumber()
	var payload any
	if err := dec.Decode(&payload); err != nil {
		return Permanent("payload is not the expected JSON: " + err.Error())
	}
	if dec.More() {
		return Permanent("payload is not the expected JSON: trailing characters")
	}
	fields, isObject := payload.(map[string]any)
	seq, ok := asU64(fields["seq"])
	if !ok {
		return Permanent("payload has no unsigned integer `seq`")
	}

	limit, limited := asU64(fields["fail_attempts"])
	failing := !limited || uint64(msg.Attempt) <= limit
	fail, _ := fields["fail"].(string)
	if failing {
		switch fail {
		case "retryable":
			return Retryable(fmt.Sprintf("seq %d: asked to fail (retryable), attempt %d", seq, msg.Attempt))
		case "permanent":
			return Permanent(fmt.Sprintf("seq %d: asked to fail (permanent)", seq))
		case "trap":
			panic(fmt.Sprintf("seq %d: asked to trap", seq))
		case "spin":
			// Runs until the host's deadline interrupts it.
			x := seq
			for {
				x = x*6364136223846793005 + 1
			}
		case "bomb":
			// Grows memory until the host's limit stops it.
			var hoard [][]byte
			for {
				chunk := bytes.Repeat([]byte{1}, 1<<20)
				hoard = append(hoard, chunk)
			}
		}
	}

	old, _, herr := getStr("seqs")
	if herr != nil {
		return herr
	}
	seqs := strconv.FormatUint(seq, 10)
	if old != "" {
		seqs = old + "," + seqs
	}
	countText, present, herr := getStr("count")
	if herr != nil {
		return herr
	}
	count := uint64(1)
	if present {
		n, err := strconv.ParseUint(strings.TrimPrefix(countText, "+"), 10, 64)
		if err != nil {
			return Permanent(fmt.Sprintf("state `count` is not a number: %q", countText))
		}
		count = n + 1
	}
	StateSet("seqs", []byte(seqs))
	StateSet("count", []byte(strconv.FormatUint(count, 10)))
	StateSet("attempt", []byte(strconv.FormatUint(uint64(msg.Attempt), 10)))

	if target, has := fields["emit"]; isObject && has {
		delete(fields, "emit")
		spec, _ := target.(map[string]any)
		topic, topicOK := spec["topic"].(string)
		key, keyOK := spec["key"].(string)
		if !topicOK || !keyOK {
			return Permanent("`emit` needs string `topic` and `key`")
		}
		body, err := encode(fields)
		if err != nil {
			return Permanent("cannot encode emit: " + err.Error())
		}
		Emit(topic, key, body, msg.Headers)
	}
	Log(LevelDebug, fmt.Sprintf("key %s seq %d count %d", msg.PartitionKey, seq, count))
	return nil
}
