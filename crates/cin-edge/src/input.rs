//! Request bodies of the Filestack-style calls arrive as JSON or as form fields;
//! [`JsonOrForm`] accepts both and hands handlers one typed value.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_TYPE;
use serde::de::{DeserializeOwned, Deserializer};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Largest accepted body for control calls (start, upload, commit, complete).
const MAX_CONTROL_BODY: usize = 1 << 20;

pub struct JsonOrForm<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonOrForm<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let body = axum::body::to_bytes(req.into_body(), MAX_CONTROL_BODY)
            .await
            .map_err(|e| {
                ApiError::invalid(
                    "body_too_large",
                    format!("control request bodies are limited to 1 MiB: {e}"),
                )
            })?;
        let _ = state;
        let value = if content_type.starts_with("application/x-www-form-urlencoded") {
            form_to_value(&body)?
        } else if content_type.starts_with("application/json") || looks_like_json(&body) {
            serde_json::from_slice(&body).map_err(|e| {
                ApiError::invalid("malformed_json", format!("the JSON body is malformed: {e}"))
            })?
        } else if body.is_empty() {
            Value::Object(Map::new())
        } else {
            form_to_value(&body)?
        };
        serde_json::from_value(value).map(JsonOrForm).map_err(|e| {
            ApiError::invalid(
                "invalid_request",
                format!("the request fields are invalid: {e}"),
            )
        })
    }
}

fn looks_like_json(body: &Bytes) -> bool {
    body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// Turns form pairs into a JSON object. `store[location]`, `store.location` and
/// `store_location` all become `{"store": {"location": ...}}`, the shapes Filestack clients send.
fn form_to_value(body: &[u8]) -> Result<Value, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body).map_err(|e| {
        ApiError::invalid("malformed_form", format!("the form body is malformed: {e}"))
    })?;
    let mut root = Map::new();
    for (key, value) in pairs {
        let nested = key
            .strip_prefix("store[")
            .and_then(|k| k.strip_suffix(']'))
            .or_else(|| key.strip_prefix("store."))
            .or_else(|| key.strip_prefix("store_"));
        match nested {
            Some(field) => {
                let store = root
                    .entry("store")
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(store) = store {
                    store.insert(field.to_owned(), Value::String(value));
                }
            }
            None => {
                root.insert(key, Value::String(value));
            }
        }
    }
    Ok(Value::Object(root))
}

/// Numbers arrive as JSON numbers or as strings (forms, some SDKs).
pub fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match Value::deserialize(d)? {
        Value::Number(n) => n
            .as_u64()
            .ok_or_else(|| serde::de::Error::custom(format!("{n} is not a non-negative integer"))),
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a non-negative integer"))),
        other => Err(serde::de::Error::custom(format!(
            "{other} is not a non-negative integer"
        ))),
    }
}

pub fn lenient_opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        Value::String(s) if s.is_empty() => Ok(None),
        v => lenient_u64(v).map(Some).map_err(serde::de::Error::custom),
    }
}

pub fn lenient_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    match Value::deserialize(d)? {
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| serde::de::Error::custom(format!("{n} is not an integer"))),
        Value::String(s) => s
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not an integer"))),
        other => Err(serde::de::Error::custom(format!(
            "{other} is not an integer"
        ))),
    }
}

pub fn lenient_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::Bool(b) => b,
        Value::String(s) => matches!(s.to_ascii_lowercase().as_str(), "true" | "1" | "yes"),
        Value::Number(n) => n.as_u64() == Some(1),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_store_fields_nest() {
        let v = form_to_value(b"filename=a.txt&store_location=s3&store%5Bcontainer%5D=b&size=3")
            .unwrap();
        assert_eq!(v["store"]["location"], "s3");
        assert_eq!(v["store"]["container"], "b");
        assert_eq!(v["size"], "3");
    }
}
