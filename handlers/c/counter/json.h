// A small JSON reader and writer: enough for a handler to read a payload and
// write it back (objects with sorted keys, compact, numbers kept verbatim).
#ifndef ORDO_JSON_H
#define ORDO_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum {
  JSON_NULL,
  JSON_FALSE,
  JSON_TRUE,
  JSON_NUMBER,
  JSON_STRING,
  JSON_ARRAY,
  JSON_OBJECT,
} json_kind;

typedef struct json_value json_value;

// A string (decoded, UTF-8, may contain NUL) or a number's source text.
typedef struct {
  char *ptr;
  size_t len;
} json_text;

typedef struct {
  json_text key;
  json_value *value;
} json_member;

struct json_value {
  json_kind kind;
  json_text text;         // JSON_STRING, JSON_NUMBER
  json_value **items;     // JSON_ARRAY
  json_member *members;   // JSON_OBJECT, in source order
  size_t len;             // number of items or members
};

// Parses `len` bytes. Returns NULL on malformed input and sets `*error` to a
// static description.
json_value *json_parse(const uint8_t *data, size_t len, const char **error);

// Frees a value from json_parse (NULL is fine).
void json_free(json_value *value);

// The last member called `key` (as serde_json keeps the last duplicate), or
// NULL. `object` may be NULL or not an object.
json_value *json_get(const json_value *object, const char *key);

// The value as an unsigned 64-bit integer: a number without fraction,
// exponent or sign that fits. Returns false otherwise.
bool json_as_u64(const json_value *value, uint64_t *out);

// The value as a NUL-terminated string: NULL unless a string without NUL.
const char *json_as_str(const json_value *value);

// Removes the members called `key` from an object.
void json_remove(json_value *object, const char *key);

// Serializes compactly with object keys sorted bytewise (duplicates keep the
// last), like serde_json's default map. Returns a malloc'd buffer.
uint8_t *json_write(const json_value *value, size_t *len);

#endif
