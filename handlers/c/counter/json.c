// See json.h. Recursive descent with a depth limit; every allocation failure
// is reported as a parse error rather than a crash.
#include "json.h"

#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 128

typedef struct {
  const uint8_t *p;
  const uint8_t *end;
  const char *error;
  int depth;
} parser;

static json_value *parse_value(parser *ps);

static bool valid_utf8(const uint8_t *s, size_t len) {
  size_t i = 0;
  while (i < len) {
    uint8_t c = s[i];
    size_t n;
    uint32_t cp;
    if (c < 0x80) {
      i++;
      continue;
    } else if ((c & 0xe0) == 0xc0) {
      n = 1;
      cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      n = 2;
      cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      n = 3;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (len - i <= n) return false;
    for (size_t k = 1; k <= n; k++) {
      if ((s[i + k] & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (s[i + k] & 0x3f);
    }
    if ((n == 1 && cp < 0x80) || (n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) ||
        cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
      return false;
    i += n + 1;
  }
  return true;
}

static void skip_ws(parser *ps) {
  while (ps->p < ps->end &&
         (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
    ps->p++;
}

static json_value *new_value(parser *ps, json_kind kind) {
  json_value *v = calloc(1, sizeof *v);
  if (!v) ps->error = "out of memory";
  else v->kind = kind;
  return v;
}

static bool literal(parser *ps, const char *word) {
  size_t n = strlen(word);
  if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, word, n) != 0) {
    ps->error = "invalid literal";
    return false;
  }
  ps->p += n;
  return true;
}

static bool is_digit(uint8_t c) { return c >= '0' && c <= '9'; }

static json_value *parse_number(parser *ps) {
  const uint8_t *start = ps->p;
  if (ps->p < ps->end && *ps->p == '-') ps->p++;
  if (ps->p >= ps->end || !is_digit(*ps->p)) {
    ps->error = "invalid number";
    return NULL;
  }
  if (*ps->p == '0') {
    ps->p++;
  } else {
    while (ps->p < ps->end && is_digit(*ps->p)) ps->p++;
  }
  if (ps->p < ps->end && *ps->p == '.') {
    ps->p++;
    if (ps->p >= ps->end || !is_digit(*ps->p)) {
      ps->error = "invalid number";
      return NULL;
    }
    while (ps->p < ps->end && is_digit(*ps->p)) ps->p++;
  }
  if (ps->p < ps->end && (*ps->p == 'e' || *ps->p == 'E')) {
    ps->p++;
    if (ps->p < ps->end && (*ps->p == '+' || *ps->p == '-')) ps->p++;
    if (ps->p >= ps->end || !is_digit(*ps->p)) {
      ps->error = "invalid number";
      return NULL;
    }
    while (ps->p < ps->end && is_digit(*ps->p)) ps->p++;
  }
  json_value *v = new_value(ps, JSON_NUMBER);
  if (!v) return NULL;
  size_t len = (size_t)(ps->p - start);
  v->text.ptr = malloc(len + 1);
  if (!v->text.ptr) {
    free(v);
    ps->error = "out of memory";
    return NULL;
  }
  memcpy(v->text.ptr, start, len);
  v->text.ptr[len] = 0;
  v->text.len = len;
  return v;
}

static int hex4(parser *ps, uint32_t *out) {
  if (ps->end - ps->p < 4) return 0;
  uint32_t v = 0;
  for (int i = 0; i < 4; i++) {
    uint8_t c = ps->p[i];
    v <<= 4;
    if (c >= '0' && c <= '9') v |= c - '0';
    else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
    else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
    else return 0;
  }
  ps->p += 4;
  *out = v;
  return 1;
}

static size_t put_utf8(char *dst, uint32_t cp) {
  if (cp < 0x80) {
    dst[0] = (char)cp;
    return 1;
  } else if (cp < 0x800) {
    dst[0] = (char)(0xc0 | (cp >> 6));
    dst[1] = (char)(0x80 | (cp & 0x3f));
    return 2;
  } else if (cp < 0x10000) {
    dst[0] = (char)(0xe0 | (cp >> 12));
    dst[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
    dst[2] = (char)(0x80 | (cp & 0x3f));
    return 3;
  }
  dst[0] = (char)(0xf0 | (cp >> 18));
  dst[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
  dst[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
  dst[3] = (char)(0x80 | (cp & 0x3f));
  return 4;
}

// Parses a string starting at the opening quote into `out`.
static bool parse_string(parser *ps, json_text *out) {
  ps->p++;  // opening quote
  // Decoded text is never longer than its source.
  const uint8_t *scan = ps->p;
  while (scan < ps->end && *scan != '"') scan += (*scan == '\\') ? 2 : 1;
  if (scan >= ps->end) {
    ps->error = "EOF while parsing a string";
    return false;
  }
  char *buf = malloc((size_t)(scan - ps->p) + 1);
  if (!buf) {
    ps->error = "out of memory";
    return false;
  }
  size_t n = 0;
  while (*ps->p != '"') {
    uint8_t c = *ps->p;
    if (c < 0x20) {
      ps->error = "control character in string";
      goto fail;
    }
    if (c != '\\') {
      buf[n++] = (char)c;
      ps->p++;
      continue;
    }
    ps->p++;
    switch (*ps->p++) {
      case '"': buf[n++] = '"'; break;
      case '\\': buf[n++] = '\\'; break;
      case '/': buf[n++] = '/'; break;
      case 'b': buf[n++] = '\b'; break;
      case 'f': buf[n++] = '\f'; break;
      case 'n': buf[n++] = '\n'; break;
      case 'r': buf[n++] = '\r'; break;
      case 't': buf[n++] = '\t'; break;
      case 'u': {
        uint32_t cp, lo;
        if (!hex4(ps, &cp)) {
          ps->error = "invalid escape";
          goto fail;
        }
        if (cp >= 0xdc00 && cp <= 0xdfff) {
          ps->error = "lone trailing surrogate";
          goto fail;
        }
        if (cp >= 0xd800 && cp <= 0xdbff) {
          if (ps->end - ps->p < 2 || ps->p[0] != '\\' || ps->p[1] != 'u') {
            ps->error = "lone leading surrogate";
            goto fail;
          }
          ps->p += 2;
          if (!hex4(ps, &lo) || lo < 0xdc00 || lo > 0xdfff) {
            ps->error = "invalid surrogate pair";
            goto fail;
          }
          cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
        }
        n += put_utf8(buf + n, cp);
        break;
      }
      default:
        ps->error = "invalid escape";
        goto fail;
    }
  }
  ps->p++;  // closing quote
  buf[n] = 0;
  out->ptr = buf;
  out->len = n;
  return true;
fail:
  free(buf);
  return false;
}

static bool grow(void **ptr, size_t *cap, size_t len, size_t size) {
  if (len < *cap) return true;
  size_t next = *cap ? *cap * 2 : 4;
  void *p = realloc(*ptr, next * size);
  if (!p) return false;
  *ptr = p;
  *cap = next;
  return true;
}

static json_value *parse_array(parser *ps) {
  json_value *v = new_value(ps, JSON_ARRAY);
  if (!v) return NULL;
  size_t cap = 0;
  ps->p++;
  skip_ws(ps);
  if (ps->p < ps->end && *ps->p == ']') {
    ps->p++;
    return v;
  }
  for (;;) {
    json_value *item = parse_value(ps);
    if (!item) goto fail;
    if (!grow((void **)&v->items, &cap, v->len, sizeof *v->items)) {
      json_free(item);
      ps->error = "out of memory";
      goto fail;
    }
    v->items[v->len++] = item;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == ',') {
      ps->p++;
      continue;
    }
    if (ps->p < ps->end && *ps->p == ']') {
      ps->p++;
      return v;
    }
    ps->error = "expected `,` or `]`";
    goto fail;
  }
fail:
  json_free(v);
  return NULL;
}

static json_value *parse_object(parser *ps) {
  json_value *v = new_value(ps, JSON_OBJECT);
  if (!v) return NULL;
  size_t cap = 0;
  ps->p++;
  skip_ws(ps);
  if (ps->p < ps->end && *ps->p == '}') {
    ps->p++;
    return v;
  }
  for (;;) {
    json_text key;
    skip_ws(ps);
    if (ps->p >= ps->end || *ps->p != '"') {
      ps->error = "key must be a string";
      goto fail;
    }
    if (!parse_string(ps, &key)) goto fail;
    skip_ws(ps);
    if (ps->p >= ps->end || *ps->p != ':') {
      free(key.ptr);
      ps->error = "expected `:`";
      goto fail;
    }
    ps->p++;
    json_value *item = parse_value(ps);
    if (!item) {
      free(key.ptr);
      goto fail;
    }
    if (!grow((void **)&v->members, &cap, v->len, sizeof *v->members)) {
      free(key.ptr);
      json_free(item);
      ps->error = "out of memory";
      goto fail;
    }
    v->members[v->len].key = key;
    v->members[v->len].value = item;
    v->len++;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == ',') {
      ps->p++;
      continue;
    }
    if (ps->p < ps->end && *ps->p == '}') {
      ps->p++;
      return v;
    }
    ps->error = "expected `,` or `}`";
    goto fail;
  }
fail:
  json_free(v);
  return NULL;
}

static json_value *parse_value(parser *ps) {
  skip_ws(ps);
  if (ps->p >= ps->end) {
    ps->error = "EOF while parsing a value";
    return NULL;
  }
  if (++ps->depth > MAX_DEPTH) {
    ps->error = "recursion limit exceeded";
    return NULL;
  }
  json_value *v = NULL;
  switch (*ps->p) {
    case 'n':
      if (literal(ps, "null")) v = new_value(ps, JSON_NULL);
      break;
    case 't':
      if (literal(ps, "true")) v = new_value(ps, JSON_TRUE);
      break;
    case 'f':
      if (literal(ps, "false")) v = new_value(ps, JSON_FALSE);
      break;
    case '"': {
      json_text s;
      if (parse_string(ps, &s)) {
        v = new_value(ps, JSON_STRING);
        if (v) v->text = s;
        else free(s.ptr);
      }
      break;
    }
    case '[':
      v = parse_array(ps);
      break;
    case '{':
      v = parse_object(ps);
      break;
    default:
      v = parse_number(ps);
      break;
  }
  ps->depth--;
  return v;
}

json_value *json_parse(const uint8_t *data, size_t len, const char **error) {
  if (!valid_utf8(data, len)) {
    *error = "invalid UTF-8";
    return NULL;
  }
  parser ps = {data, data + len, NULL, 0};
  json_value *v = parse_value(&ps);
  if (v) {
    skip_ws(&ps);
    if (ps.p != ps.end) {
      json_free(v);
      v = NULL;
      ps.error = "trailing characters";
    }
  }
  if (!v) *error = ps.error ? ps.error : "invalid JSON";
  return v;
}

void json_free(json_value *v) {
  if (!v) return;
  free(v->text.ptr);
  for (size_t i = 0; v->kind == JSON_ARRAY && i < v->len; i++) json_free(v->items[i]);
  for (size_t i = 0; v->kind == JSON_OBJECT && i < v->len; i++) {
    free(v->members[i].key.ptr);
    json_free(v->members[i].value);
  }
  free(v->items);
  free(v->members);
  free(v);
}

static bool key_is(const json_text *key, const char *name) {
  size_t n = strlen(name);
  return key->len == n && memcmp(key->ptr, name, n) == 0;
}

json_value *json_get(const json_value *object, const char *key) {
  if (!object || object->kind != JSON_OBJECT) return NULL;
  for (size_t i = object->len; i > 0; i--)
    if (key_is(&object->members[i - 1].key, key)) return object->members[i - 1].value;
  return NULL;
}

bool json_as_u64(const json_value *v, uint64_t *out) {
  if (!v || v->kind != JSON_NUMBER) return false;
  uint64_t n = 0;
  for (size_t i = 0; i < v->text.len; i++) {
    char c = v->text.ptr[i];
    if (c < '0' || c > '9') return false;
    uint64_t d = (uint64_t)(c - '0');
    if (n > (UINT64_MAX - d) / 10) return false;
    n = n * 10 + d;
  }
  *out = n;
  return true;
}

const char *json_as_str(const json_value *v) {
  if (!v || v->kind != JSON_STRING || strlen(v->text.ptr) != v->text.len) return NULL;
  return v->text.ptr;
}

void json_remove(json_value *object, const char *key) {
  if (!object || object->kind != JSON_OBJECT) return;
  size_t kept = 0;
  for (size_t i = 0; i < object->len; i++) {
    json_member m = object->members[i];
    if (key_is(&m.key, key)) {
      free(m.key.ptr);
      json_free(m.value);
    } else {
      object->members[kept++] = m;
    }
  }
  object->len = kept;
}

typedef struct {
  uint8_t *buf;
  size_t len;
  size_t cap;
  bool failed;
} writer;

static void put(writer *w, const void *data, size_t n) {
  if (w->failed) return;
  if (w->len + n > w->cap) {
    size_t cap = w->cap ? w->cap : 64;
    while (cap < w->len + n) cap *= 2;
    uint8_t *p = realloc(w->buf, cap);
    if (!p) {
      w->failed = true;
      return;
    }
    w->buf = p;
    w->cap = cap;
  }
  memcpy(w->buf + w->len, data, n);
  w->len += n;
}

static void put_str(writer *w, const json_text *s) {
  static const char hex[] = "0123456789abcdef";
  put(w, "\"", 1);
  for (size_t i = 0; i < s->len; i++) {
    uint8_t c = (uint8_t)s->ptr[i];
    switch (c) {
      case '"': put(w, "\\\"", 2); break;
      case '\\': put(w, "\\\\", 2); break;
      case '\b': put(w, "\\b", 2); break;
      case '\f': put(w, "\\f", 2); break;
      case '\n': put(w, "\\n", 2); break;
      case '\r': put(w, "\\r", 2); break;
      case '\t': put(w, "\\t", 2); break;
      default:
        if (c < 0x20) {
          char esc[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
          put(w, esc, 6);
        } else {
          put(w, &c, 1);
        }
    }
  }
  put(w, "\"", 1);
}

typedef struct {
  const json_member *member;
  size_t index;
} sorted_member;

static int compare_members(const void *a, const void *b) {
  const sorted_member *x = a, *y = b;
  size_t n = x->member->key.len < y->member->key.len ? x->member->key.len : y->member->key.len;
  int c = memcmp(x->member->key.ptr, y->member->key.ptr, n);
  if (c) return c;
  if (x->member->key.len != y->member->key.len)
    return x->member->key.len < y->member->key.len ? -1 : 1;
  return x->index < y->index ? -1 : 1;
}

static bool same_key(const json_member *a, const json_member *b) {
  return a->key.len == b->key.len && memcmp(a->key.ptr, b->key.ptr, a->key.len) == 0;
}

static void put_value(writer *w, const json_value *v) {
  switch (v->kind) {
    case JSON_NULL: put(w, "null", 4); break;
    case JSON_FALSE: put(w, "false", 5); break;
    case JSON_TRUE: put(w, "true", 4); break;
    case JSON_NUMBER: put(w, v->text.ptr, v->text.len); break;
    case JSON_STRING: put_str(w, &v->text); break;
    case JSON_ARRAY:
      put(w, "[", 1);
      for (size_t i = 0; i < v->len; i++) {
        if (i) put(w, ",", 1);
        put_value(w, v->items[i]);
      }
      put(w, "]", 1);
      break;
    case JSON_OBJECT: {
      sorted_member *order = malloc((v->len ? v->len : 1) * sizeof *order);
      if (!order) {
        w->failed = true;
        return;
      }
      for (size_t i = 0; i < v->len; i++) order[i] = (sorted_member){&v->members[i], i};
      qsort(order, v->len, sizeof *order, compare_members);
      put(w, "{", 1);
      bool first = true;
      for (size_t i = 0; i < v->len; i++) {
        // Of equal keys, only the last in source order is written.
        if (i + 1 < v->len && same_key(order[i].member, order[i + 1].member)) continue;
        if (!first) put(w, ",", 1);
        first = false;
        put_str(w, &order[i].member->key);
        put(w, ":", 1);
        put_value(w, order[i].member->value);
      }
      put(w, "}", 1);
      free(order);
      break;
    }
  }
}

uint8_t *json_write(const json_value *value, size_t *len) {
  writer w = {0};
  put_value(&w, value);
  if (w.failed) {
    free(w.buf);
    return NULL;
  }
  *len = w.len;
  return w.buf;
}
