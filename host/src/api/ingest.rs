//! Validation of producer input for `POST /v1/topics/{topic}/messages`.
//!
//! A request body is one JSON object or an array of them:
//! `{"key": str, "idempotency_key": str?, "payload": str, "headers": {str: str}?}`
//! (`payload_base64` instead of `payload` for bytes). Validation is
//! all-or-nothing: the first bad message rejects the whole batch and names
//! the message index and the field.

use base64::Engine as _;
use serde::Deserialize;
use std::collections::BTreeMap;

/// Limits on producer input.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestLimits {
    /// Largest partition key, in bytes.
    pub max_key_bytes: usize,
    /// Largest idempotency key, in bytes.
    pub max_idempotency_key_bytes: usize,
    /// Largest payload (after base64 decoding), in bytes.
    pub max_payload_bytes: usize,
    /// Most headers per message.
    pub max_headers: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Most messages per request.
    pub max_batch_messages: usize,
}

impl Default for IngestLimits {
    fn default() -> Self {
        IngestLimits {
            max_key_bytes: 1024,
            max_idempotency_key_bytes: 512,
            max_payload_bytes: 1 << 20,
            max_headers: 64,
            max_body_bytes: 16 << 20,
            max_batch_messages: 10_000,
        }
    }
}

/// A validated message, ready to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingMessage {
    /// Partition key.
    pub key: String,
    /// Producer-supplied idempotency key, if any.
    pub idempotency_key: Option<String>,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Headers, sorted by name.
    pub headers: Vec<(String, String)>,
}

/// Why a request was rejected. `status()` gives the HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngestError {
    /// 400: the input is malformed; `field` names the culprit.
    #[error("{message}")]
    Invalid {
        /// Dotted path of the offending field, e.g. `messages[3].key`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// 413: the input is too large.
    #[error("{message}")]
    TooLarge {
        /// Dotted path of the offending field, or `body`.
        field: String,
        /// What is too large and the limit.
        message: String,
    },
}

impl IngestError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        IngestError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The HTTP status code for this error.
    pub fn status(&self) -> u16 {
        match self {
            IngestError::Invalid { .. } => 400,
            IngestError::TooLarge { .. } => 413,
        }
    }

    /// The offending field.
    pub fn field(&self) -> &str {
        match self {
            IngestError::Invalid { field, .. } | IngestError::TooLarge { field, .. } => field,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage {
    key: Option<String>,
    idempotency_key: Option<String>,
    payload: Option<String>,
    payload_base64: Option<String>,
    headers: Option<BTreeMap<String, String>>,
}

/// Parses and validates a request body.
pub fn parse_batch(
    body: &[u8],
    limits: &IngestLimits,
) -> Result<Vec<IncomingMessage>, IngestError> {
    if body.len() > limits.max_body_bytes {
        return Err(IngestError::TooLarge {
            field: "body".into(),
            message: format!(
                "request body is {} bytes, over the {}-byte batch limit",
                body.len(),
                limits.max_body_bytes
            ),
        });
    }
    let value: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Err(malformed(body, e)),
    };
    let (items, batched) = match value {
        serde_json::Value::Array(items) => (items, true),
        obj @ serde_json::Value::Object(_) => (vec![obj], false),
        _ => {
            return Err(IngestError::invalid(
                "body",
                "body must be a JSON object or an array of objects",
            ))
        }
    };
    if items.is_empty() {
        return Err(IngestError::invalid("body", "batch is empty"));
    }
    if items.len() > limits.max_batch_messages {
        return Err(IngestError::TooLarge {
            field: "body".into(),
            message: format!(
                "batch has {} messages, over the limit of {}",
                items.len(),
                limits.max_batch_messages
            ),
        });
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let prefix = if batched {
                format!("[{i}].")
            } else {
                String::new()
            };
            validate(item, &prefix, limits)
        })
        .collect()
}

/// A JSON syntax error; for bodies that are not UTF-8, names the field that
/// holds the invalid bytes when it can be found.
fn malformed(body: &[u8], err: serde_json::Error) -> IngestError {
    if std::str::from_utf8(body).is_err() {
        let lossy = String::from_utf8_lossy(body);
        if let Ok(value) = serde_json::from_str::<serde_json::Value>(&lossy) {
            if let Some(field) = find_replacement_char(&value, String::new()) {
                return IngestError::invalid(field.clone(), format!("{field} is not valid UTF-8"));
            }
        }
        return IngestError::invalid("body", format!("body is not valid UTF-8 JSON: {err}"));
    }
    IngestError::invalid("body", format!("malformed JSON: {err}"))
}

fn find_replacement_char(value: &serde_json::Value, path: String) -> Option<String> {
    match value {
        serde_json::Value::String(s) if s.contains('\u{FFFD}') => Some(path),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| find_replacement_char(v, format!("{path}[{i}]"))),
        serde_json::Value::Object(map) => map.iter().find_map(|(k, v)| {
            let child = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            if k.contains('\u{FFFD}') {
                return Some(child);
            }
            find_replacement_char(v, child)
        }),
        _ => None,
    }
}

fn validate(
    item: serde_json::Value,
    prefix: &str,
    limits: &IngestLimits,
) -> Result<IncomingMessage, IngestError> {
    if !item.is_object() {
        return Err(IngestError::invalid(
            prefix.trim_end_matches('.'),
            "each message must be a JSON object",
        ));
    }
    let raw: RawMessage = serde_json::from_value(item).map_err(|e| {
        let text = e.to_string();
        let field = field_of_serde_error(&text).unwrap_or("message");
        IngestError::invalid(
            format!("{prefix}{field}"),
            format!("{prefix}{field}: {text}"),
        )
    })?;
    let f = |name: &str| format!("{prefix}{name}");

    let key = raw
        .key
        .ok_or_else(|| IngestError::invalid(f("key"), format!("{} is missing", f("key"))))?;
    if key.is_empty() {
        return Err(IngestError::invalid(
            f("key"),
            format!("{} is empty", f("key")),
        ));
    }
    if key.len() > limits.max_key_bytes {
        return Err(IngestError::invalid(
            f("key"),
            format!(
                "{} is {} bytes, over the {}-byte limit",
                f("key"),
                key.len(),
                limits.max_key_bytes
            ),
        ));
    }
    if let Some(idem) = &raw.idempotency_key {
        if idem.is_empty() {
            return Err(IngestError::invalid(
                f("idempotency_key"),
                format!(
                    "{} is empty (omit it to use the source position)",
                    f("idempotency_key")
                ),
            ));
        }
        if idem.len() > limits.max_idempotency_key_bytes {
            return Err(IngestError::invalid(
                f("idempotency_key"),
                format!(
                    "{} is {} bytes, over the {}-byte limit",
                    f("idempotency_key"),
                    idem.len(),
                    limits.max_idempotency_key_bytes
                ),
            ));
        }
    }
    let payload = match (raw.payload, raw.payload_base64) {
        (Some(_), Some(_)) => {
            return Err(IngestError::invalid(
                f("payload"),
                format!(
                    "give either {} or {}, not both",
                    f("payload"),
                    f("payload_base64")
                ),
            ))
        }
        (Some(text), None) => text.into_bytes(),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| {
                IngestError::invalid(
                    f("payload_base64"),
                    format!("{} is not valid base64: {e}", f("payload_base64")),
                )
            })?,
        (None, None) => {
            return Err(IngestError::invalid(
                f("payload"),
                format!(
                    "{} is missing (or give {})",
                    f("payload"),
                    f("payload_base64")
                ),
            ))
        }
    };
    if payload.len() > limits.max_payload_bytes {
        return Err(IngestError::TooLarge {
            field: f("payload"),
            message: format!(
                "{} is {} bytes, over the {}-byte limit",
                f("payload"),
                payload.len(),
                limits.max_payload_bytes
            ),
        });
    }
    let headers: Vec<(String, String)> = raw.headers.unwrap_or_default().into_iter().collect();
    if headers.len() > limits.max_headers {
        return Err(IngestError::invalid(
            f("headers"),
            format!(
                "{} has {} entries, over the limit of {}",
                f("headers"),
                headers.len(),
                limits.max_headers
            ),
        ));
    }
    Ok(IncomingMessage {
        key,
        idempotency_key: raw.idempotency_key,
        payload,
        headers,
    })
}

/// Extracts the field name from serde messages such as "unknown field `x`"
/// or "invalid type: integer `5`, expected a string" (the latter has none).
fn field_of_serde_error(text: &str) -> Option<&str> {
    let rest = text.strip_prefix("unknown field `")?;
    rest.split('`').next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<Vec<IncomingMessage>, IngestError> {
        parse_batch(body.as_bytes(), &IngestLimits::default())
    }

    #[test]
    fn accepts_object_and_array() {
        let one = parse(r#"{"key":"k","payload":"p"}"#).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].payload, b"p");
        let many = parse(
            r#"[{"key":"a","payload":"x","idempotency_key":"i","headers":{"h":"v"}},
                {"key":"b","payload_base64":"AAE="}]"#,
        )
        .unwrap();
        assert_eq!(many[0].idempotency_key.as_deref(), Some("i"));
        assert_eq!(many[0].headers, vec![("h".into(), "v".into())]);
        assert_eq!(many[1].payload, vec![0u8, 1]);
    }

    #[test]
    fn names_the_field() {
        let cases = [
            (r#"{"payload":"p"}"#, "key", 400),
            (r#"{"key":"","payload":"p"}"#, "key", 400),
            (
                r#"[{"key":"a","payload":"p"},{"key":"b"}]"#,
                "[1].payload",
                400,
            ),
            (
                r#"{"key":"a","payload_base64":"!!"}"#,
                "payload_base64",
                400,
            ),
            (r#"{"key":"a","payload":"p","extra":1}"#, "extra", 400),
            (r#"{"key":"a","#, "body", 400),
            ("[]", "body", 400),
            ("42", "body", 400),
        ];
        for (body, field, status) in cases {
            let err = parse(body).unwrap_err();
            assert_eq!(err.field(), field, "{body}: {err}");
            assert_eq!(err.status(), status, "{body}");
        }
        let long_key = format!(r#"{{"key":"{}","payload":"p"}}"#, "k".repeat(1025));
        assert_eq!(parse(&long_key).unwrap_err().field(), "key");
        let long_idem = format!(
            r#"{{"key":"k","payload":"p","idempotency_key":"{}"}}"#,
            "i".repeat(513)
        );
        assert_eq!(parse(&long_idem).unwrap_err().field(), "idempotency_key");
        let headers: Vec<String> = (0..65).map(|i| format!(r#""h{i}":"v""#)).collect();
        let many_headers = format!(
            r#"{{"key":"k","payload":"p","headers":{{{}}}}}"#,
            headers.join(",")
        );
        assert_eq!(parse(&many_headers).unwrap_err().field(), "headers");
        let big = format!(r#"{{"key":"k","payload":"{}"}}"#, "x".repeat((1 << 20) + 1));
        let err = parse(&big).unwrap_err();
        assert_eq!((err.field(), err.status()), ("payload", 413));
    }

    #[test]
    fn invalid_utf8_names_the_field() {
        let mut body = br#"{"key":"ab"#.to_vec();
        body.push(0xff);
        body.extend_from_slice(br#"","payload":"p"}"#);
        let err = parse_batch(&body, &IngestLimits::default()).unwrap_err();
        assert_eq!(err.field(), "key", "{err}");
    }

    #[test]
    fn oversized_body_is_413() {
        let limits = IngestLimits {
            max_body_bytes: 10,
            ..IngestLimits::default()
        };
        let err = parse_batch(br#"{"key":"k","payload":"p"}"#, &limits).unwrap_err();
        assert_eq!((err.field(), err.status()), ("body", 413));
    }
}
