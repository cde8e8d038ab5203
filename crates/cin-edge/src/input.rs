//! What handlers read from requests, as typed values whose every refusal is our
//! JSON error (never axum's plain-text rejections): bodies of the Filestack-style
//! calls, which arrive as JSON or as form fields ([`JsonOrForm`]), query strings
//! ([`Query`]) and path segments ([`Path`]).

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::request::Parts;
use cin_storage::ChunkError;
use serde::de::{DeserializeOwned, Deserializer};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Largest accepted body for control calls (start, upload, commit, complete).
const MAX_CONTROL_BODY: usize = 1 << 20;

/// The query string as `T`. Values arrive as strings (numbers go through the
/// `lenient_*` helpers, as in forms). A key repeated with different values is
/// refused, naming the key: which one was meant is anyone's guess.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        query_value(query)
            .and_then(|value| {
                deserialize_fields(value).map_err(|detail| {
                    ApiError::invalid(
                        "invalid_query",
                        format!("the query string is invalid: {detail}"),
                    )
                })
            })
            .map(Query)
    }
}

/// The query's pairs as a JSON object of strings.
fn query_value(query: &str) -> Result<Value, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).map_err(|e| {
        ApiError::invalid(
            "invalid_query",
            format!("the query string is malformed: {e}"),
        )
    })?;
    let mut fields = Map::new();
    for (key, value) in pairs {
        match fields.get(&key) {
            Some(Value::String(earlier)) if *earlier != value => {
                return Err(ApiError::invalid(
                    "invalid_query",
                    format!(
                        "the query string gives `{key}` twice ({earlier:?} and {value:?}); give it once"
                    ),
                ));
            }
            Some(_) => {}
            None => {
                fields.insert(key, Value::String(value));
            }
        }
    }
    Ok(Value::Object(fields))
}

/// `value` as `T`; an error names the field it is about (`size: "lots" is not ...`).
fn deserialize_fields<T: DeserializeOwned>(value: Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            inner.to_string()
        } else {
            format!("{path}: {inner}")
        }
    })
}

/// A path segment (or several) as `T`; one that cannot be read (invalid UTF-8
/// after percent-decoding, say) is a 400 `invalid_path`.
pub struct Path<T>(pub T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => {
                let detail = rejection.body_text();
                Err(ApiError::invalid(
                    "invalid_path",
                    format!(
                        "the URL path cannot be read ({}); check its percent-encoding",
                        detail.trim_start_matches("Invalid URL: ")
                    ),
                ))
            }
        }
    }
}

/// Why a control call's body could not be read: past the limit (413), or a body
/// that broke (bad chunked encoding: 400 `body_malformed`; stalled, cut off).
fn control_body_error(error: axum::Error) -> ApiError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return control_body_too_large();
        }
        source = e.source();
    }
    ChunkError::Body(crate::body::classify(error)).into()
}

fn control_body_too_large() -> ApiError {
    ApiError::BodyTooLarge {
        message: format!(
            "control request bodies are limited to {} KiB; send file bytes to the upload URL, /api/store or tus instead",
            MAX_CONTROL_BODY / 1024
        ),
    }
}

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
        // An announced length past the limit is refused before reading a byte.
        let announced = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if announced.is_some_and(|len| len > MAX_CONTROL_BODY as u64) {
            return Err(control_body_too_large());
        }
        let body = axum::body::to_bytes(req.into_body(), MAX_CONTROL_BODY)
            .await
            .map_err(control_body_error)?;
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
        deserialize_fields(value).map(JsonOrForm).map_err(|detail| {
            ApiError::invalid(
                "invalid_request",
                format!("the request fields are invalid: {detail}"),
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
/// A number with no fractional part that an i64 or u64 holds exactly.
fn whole(n: &serde_json::Number) -> Option<f64> {
    const EXACT: f64 = (1u64 << 53) as f64;
    n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() <= EXACT)
}

pub fn lenient_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match Value::deserialize(d)? {
        // 5.0 is an integer too (JSON Schema says so, and some clients send it).
        Value::Number(n) => n
            .as_u64()
            .or_else(|| whole(&n).and_then(|f| (f >= 0.0).then_some(f as u64)))
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
            .or_else(|| whole(&n).map(|f| f as i64))
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

/// A struct given as a JSON object (or null: its default) and nothing else:
/// serde alone would also take an array of its fields in order.
pub fn object_only<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: DeserializeOwned + Default,
{
    match Value::deserialize(d)? {
        Value::Object(map) => {
            serde_json::from_value(Value::Object(map)).map_err(serde::de::Error::custom)
        }
        Value::Null => Ok(T::default()),
        other => Err(serde::de::Error::custom(format!(
            "{other} is not an object"
        ))),
    }
}

/// A boolean as JSON or a form field spells it ([`BOOL_SPELLINGS`] as text).
/// How a form field may spell a boolean.
pub const BOOL_SPELLINGS: [&str; 7] = ["true", "1", "yes", "false", "0", "no", ""];

pub fn lenient_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    let value = Value::deserialize(d)?;
    let parsed = match &value {
        Value::Bool(b) => Some(*b),
        Value::Null => Some(false),
        Value::String(s) => match s.as_str() {
            "true" | "1" | "yes" => Some(true),
            "false" | "0" | "no" | "" => Some(false),
            _ => None,
        },
        _ => None,
    };
    parsed.ok_or_else(|| serde::de::Error::custom(format!("{value} is not true or false")))
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

    #[test]
    fn repeated_query_keys_are_taken_once_or_refused_by_name() {
        let v = query_value("offset=0&size=3&offset=0").unwrap();
        assert_eq!(v["offset"], "0");
        let e = query_value("offset=0&offset=5").unwrap_err();
        assert!(e.to_string().contains("`offset` twice"), "{e}");
    }

    #[test]
    fn field_errors_name_the_field() {
        #[derive(Debug, Deserialize)]
        struct Q {
            #[serde(deserialize_with = "lenient_u64")]
            #[allow(dead_code)]
            offset: u64,
        }
        let e = deserialize_fields::<Q>(query_value("offset=abc").unwrap()).unwrap_err();
        assert!(e.starts_with("offset: "), "{e}");
    }
}
