// The conformance counter in C; same behaviour as handlers/rust/counter.
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
//
// Bindings: `wit-bindgen c wit --world handler` (handler.h), generated at
// build time by scripts/build-polyglot.sh.
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "handler.h"
#include "json.h"

// Sets `err` to a malloc'd message (the generated post-return frees it).
static bool fail_with(handler_handler_error_t *err, uint8_t tag, const char *fmt, ...) {
  va_list args;
  va_start(args, fmt);
  int n = vsnprintf(NULL, 0, fmt, args);
  va_end(args);
  char *text = malloc(n > 0 ? (size_t)n + 1 : 1);
  if (!text) __builtin_trap();
  va_start(args, fmt);
  vsnprintf(text, (size_t)n + 1, fmt, args);
  va_end(args);
  err->tag = tag;
  err->val.permanent = (handler_string_t){(uint8_t *)text, (size_t)n};
  return false;
}

#define PERMANENT(...) fail_with(err, ORDO_HANDLER_TYPES_HANDLER_ERROR_PERMANENT, __VA_ARGS__)
#define RETRYABLE(...) fail_with(err, ORDO_HANDLER_TYPES_HANDLER_ERROR_RETRYABLE, __VA_ARGS__)

static handler_string_t str(const char *s) {
  return (handler_string_t){(uint8_t *)s, strlen(s)};
}

// A state value as a NUL-terminated malloc'd string; `*found` tells whether
// the key is set. Returns NULL when it is set but not text.
static char *state_text(const char *key, bool *found) {
  handler_string_t k = str(key);
  handler_list_u8_t value;
  *found = ordo_handler_state_get(&k, &value);
  if (!*found) return NULL;
  char *text = malloc(value.len + 1);
  if (!text) __builtin_trap();
  if (value.len) memcpy(text, value.ptr, value.len);
  text[value.len] = 0;
  bool ok = strlen(text) == value.len;
  handler_list_u8_free(&value);
  if (!ok) {
    free(text);
    return NULL;
  }
  return text;
}

static char *copy(const char *s) {
  size_t n = strlen(s) + 1;
  char *c = malloc(n);
  if (!c) __builtin_trap();
  return memcpy(c, s, n);
}

static void state_set(const char *key, const char *text) {
  handler_string_t k = str(key);
  handler_list_u8_t v = {(uint8_t *)text, strlen(text)};
  ordo_handler_state_set(&k, &v);
}

// Rust's `u64::from_str`: an optional `+`, then decimal digits that fit.
static bool parse_u64(const char *s, uint64_t *out) {
  if (*s == '+') s++;
  if (!*s) return false;
  uint64_t n = 0;
  for (; *s; s++) {
    if (*s < '0' || *s > '9') return false;
    uint64_t d = (uint64_t)(*s - '0');
    if (n > (UINT64_MAX - d) / 10) return false;
    n = n * 10 + d;
  }
  *out = n;
  return true;
}

// `"key"` as Rust's `{:?}` writes a plain string.
static char *quoted(const char *s) {
  size_t n = strlen(s);
  char *q = malloc(n * 6 + 3);
  if (!q) __builtin_trap();
  char *p = q;
  *p++ = '"';
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c == '"' || c == '\\') {
      *p++ = '\\';
      *p++ = (char)c;
    } else if (c == '\n') {
      *p++ = '\\';
      *p++ = 'n';
    } else if (c == '\t') {
      *p++ = '\\';
      *p++ = 't';
    } else if (c == '\r') {
      *p++ = '\\';
      *p++ = 'r';
    } else if (c < 0x20 || c == 0x7f) {
      p += sprintf(p, "\\u{%x}", c);
    } else {
      *p++ = (char)c;
    }
  }
  *p++ = '"';
  *p = 0;
  return q;
}

static bool handle(handler_message_t *msg, handler_handler_error_t *err) {
  const char *error = NULL;
  json_value *payload = json_parse(msg->payload.ptr, msg->payload.len, &error);
  if (!payload) return PERMANENT("payload is not the expected JSON: %s", error);
  bool ok = false;
  char *old = NULL, *count_text = NULL, *seqs = NULL;
  uint64_t seq, limit;

  if (!json_as_u64(json_get(payload, "seq"), &seq)) {
    PERMANENT("payload has no unsigned integer `seq`");
    goto done;
  }
  bool failing = !json_as_u64(json_get(payload, "fail_attempts"), &limit) ||
                 (uint64_t)msg->attempt <= limit;
  const char *fail = json_as_str(json_get(payload, "fail"));
  if (failing && fail) {
    if (strcmp(fail, "retryable") == 0) {
      RETRYABLE("seq %" PRIu64 ": asked to fail (retryable), attempt %" PRIu32, seq,
                msg->attempt);
      goto done;
    } else if (strcmp(fail, "permanent") == 0) {
      PERMANENT("seq %" PRIu64 ": asked to fail (permanent)", seq);
      goto done;
    } else if (strcmp(fail, "trap") == 0) {
      __builtin_trap();
    } else if (strcmp(fail, "spin") == 0) {
      // Runs until the host's deadline interrupts it.
      volatile uint64_t x = seq;
      for (;;) x = x * 6364136223846793005u + 1;
    } else if (strcmp(fail, "bomb") == 0) {
      // Grows memory until the host's limit stops it (malloc failing or the
      // grow trapping).
      for (;;) {
        void *chunk = malloc(1 << 20);
        if (!chunk) __builtin_trap();
        memset(chunk, 1, 1 << 20);
      }
    }
  }

  bool found;
  old = state_text("seqs", &found);
  if (found && !old) {
    PERMANENT("state \"seqs\" is not UTF-8 text");
    goto done;
  }
  size_t seqs_len = (old ? strlen(old) : 0) + 24;
  seqs = malloc(seqs_len);
  if (!seqs) __builtin_trap();
  if (old && *old) snprintf(seqs, seqs_len, "%s,%" PRIu64, old, seq);
  else snprintf(seqs, seqs_len, "%" PRIu64, seq);

  uint64_t count = 0;
  count_text = state_text("count", &found);
  if (found && !count_text) {
    PERMANENT("state \"count\" is not UTF-8 text");
    goto done;
  }
  if (count_text && !parse_u64(count_text, &count)) {
    char *q = quoted(count_text);
    PERMANENT("state `count` is not a number: %s", q);
    free(q);
    goto done;
  }
  count++;
  char number[24];
  state_set("seqs", seqs);
  snprintf(number, sizeof number, "%" PRIu64, count);
  state_set("count", number);
  snprintf(number, sizeof number, "%" PRIu32, msg->attempt);
  state_set("attempt", number);

  if (payload->kind == JSON_OBJECT && json_get(payload, "emit")) {
    json_value *target = json_get(payload, "emit");
    const char *topic = json_as_str(json_get(target, "topic"));
    const char *key = json_as_str(json_get(target, "key"));
    if (!topic || !key) {
      PERMANENT("`emit` needs string `topic` and `key`");
      goto done;
    }
    // Copies: removing `emit` frees the strings `topic` and `key` point to.
    char *topic_copy = copy(topic), *key_copy = copy(key);
    json_remove(payload, "emit");
    size_t body_len;
    uint8_t *body = json_write(payload, &body_len);
    if (!body) __builtin_trap();
    handler_string_t t = str(topic_copy), k = str(key_copy);
    handler_list_u8_t b = {body, body_len};
    ordo_handler_outbox_emit(&t, &k, &b, &msg->headers);
    free(body);
    free(topic_copy);
    free(key_copy);
  }

  char line[512];
  int n = snprintf(line, sizeof line, "key %.*s seq %" PRIu64 " count %" PRIu64,
                   (int)msg->partition_key.len, (const char *)msg->partition_key.ptr, seq,
                   count);
  handler_string_t text = {(uint8_t *)line, n < (int)sizeof line ? (size_t)n : sizeof line - 1};
  // A key too long for the buffer gets the full line from the heap.
  char *long_line = NULL;
  if (n >= (int)sizeof line) {
    long_line = malloc((size_t)n + 1);
    if (!long_line) __builtin_trap();
    snprintf(long_line, (size_t)n + 1, "key %.*s seq %" PRIu64 " count %" PRIu64,
             (int)msg->partition_key.len, (const char *)msg->partition_key.ptr, seq, count);
    text = (handler_string_t){(uint8_t *)long_line, (size_t)n};
  }
  ordo_handler_log_log(ORDO_HANDLER_LOG_LEVEL_DEBUG, &text);
  free(long_line);
  ok = true;

done:
  free(old);
  free(count_text);
  free(seqs);
  json_free(payload);
  return ok;
}

bool exports_handler_handle(handler_message_t *msg, handler_handler_error_t *err) {
  bool ok = handle(msg, err);
  handler_message_free(msg);
  return ok;
}
