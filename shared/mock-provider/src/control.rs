//! `GET` and `PUT /_mock/behavior`, served when the mock is started with
//! [`crate::ServeOptions::control`] (the binary's `--control`): the fault knobs of [`Behavior`] as
//! JSON, so a test in another process (the chaos runner) can make the provider slow, failing,
//! hanging or breaking its streams and heal it again without a restart.
//!
//! | key | type | [`Behavior`] field |
//! |---|---|---|
//! | `latency_ms`, `chunk_delay_ms` | integer (ms) | `latency`, `chunk_delay` |
//! | `stream_chunks` | integer | `stream_chunks` |
//! | `failure_rate` | number in `[0, 1]` | `failure_rate` |
//! | `failure_status` | integer in `400..=599` | `failure_status` |
//! | `retry_after_secs` | integer or `null` | `retry_after_secs` |
//! | `seed` | integer | `seed` |
//! | `hang`, `garbage`, `ignore_stream`, `empty_replies`, `honour_idempotency_keys` | boolean | the same |
//! | `fail_after_chunks` | integer or `null` | `fail_after_chunks` |
//! | `stream_fault` | `"abort"`, `"error_event"` or `"close"` | `stream_fault` |
//!
//! `GET` answers every knob; `PUT` takes an object with any subset of them and replaces those
//! (all or none: a bad value or an unknown key is a 400 naming it, and nothing changes), answering
//! every knob as they now are. Like [`crate::MockProvider::set_behavior`], a change applies to
//! requests that arrive afterwards: a request already hanging or streaming keeps the behaviour it
//! started with. Each request reads the behaviour once, from the same lock-free snapshot the
//! handle replaces, so serving the control costs the API routes nothing.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::checks::Invalid;
use crate::server::json_response;
use crate::state::{Behavior, Shared, StreamFault};

/// The keys `PUT` takes (named in the 400 for an unknown one).
const KNOBS: &[&str] = &[
    "latency_ms",
    "chunk_delay_ms",
    "stream_chunks",
    "failure_rate",
    "failure_status",
    "retry_after_secs",
    "seed",
    "hang",
    "garbage",
    "ignore_stream",
    "empty_replies",
    "fail_after_chunks",
    "stream_fault",
    "honour_idempotency_keys",
];

/// `GET /_mock/behavior`.
pub(crate) async fn get_behavior(State(shared): State<Arc<Shared>>) -> Response {
    json_response(StatusCode::OK, &knobs(&shared.behavior.load()))
}

/// `PUT /_mock/behavior`.
pub(crate) async fn put_behavior(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let patch = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(patch)) => patch,
        Ok(_) => return Invalid::new("body", "The body must be a JSON object of behaviour knobs.").response(),
        Err(err) => return Invalid::new("body", format!("The body is not JSON: {err}")).response(),
    };
    // Checked against the current behaviour first, so that a bad request changes nothing.
    if let Err(invalid) = apply(&patch, &mut Behavior::clone(&shared.behavior.load())) {
        return invalid.response();
    }
    shared.behavior.rcu(|current| {
        let mut next = Behavior::clone(current);
        // Checked above; only a concurrent change of `track_requests` could refuse it now.
        let _ = apply(&patch, &mut next);
        next
    });
    json_response(StatusCode::OK, &knobs(&shared.behavior.load()))
}

/// The fault knobs of `behavior` as `GET` answers them (durations in whole milliseconds).
fn knobs(behavior: &Behavior) -> Value {
    json!({
        "latency_ms": millis(behavior.latency),
        "chunk_delay_ms": millis(behavior.chunk_delay),
        "stream_chunks": behavior.stream_chunks,
        "failure_rate": behavior.failure_rate,
        "failure_status": behavior.failure_status,
        "retry_after_secs": behavior.retry_after_secs,
        "seed": behavior.seed,
        "hang": behavior.hang,
        "garbage": behavior.garbage,
        "ignore_stream": behavior.ignore_stream,
        "empty_replies": behavior.empty_replies,
        "fail_after_chunks": behavior.fail_after_chunks,
        "stream_fault": match behavior.stream_fault {
            StreamFault::Abort => "abort",
            StreamFault::ErrorEvent => "error_event",
            StreamFault::Close => "close",
        },
        "honour_idempotency_keys": behavior.honour_idempotency_keys,
    })
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Applies `patch` to `behavior`, or names the first key it cannot take.
fn apply(patch: &Map<String, Value>, behavior: &mut Behavior) -> Result<(), Invalid> {
    for (key, value) in patch {
        match key.as_str() {
            "latency_ms" => behavior.latency = Duration::from_millis(integer(key, value)?),
            "chunk_delay_ms" => behavior.chunk_delay = Duration::from_millis(integer(key, value)?),
            "stream_chunks" => behavior.stream_chunks = small(key, value)?,
            "failure_rate" => {
                behavior.failure_rate = value
                    .as_f64()
                    .filter(|rate| (0.0..=1.0).contains(rate))
                    .ok_or_else(|| expected(key, "a number between 0 and 1"))?;
            }
            "failure_status" => {
                behavior.failure_status = integer(key, value)
                    .ok()
                    .and_then(|status| u16::try_from(status).ok())
                    .filter(|status| (400..=599).contains(status))
                    .ok_or_else(|| expected(key, "an HTTP error status (400 to 599)"))?;
            }
            "retry_after_secs" => behavior.retry_after_secs = optional(key, value, integer)?,
            "seed" => behavior.seed = integer(key, value)?,
            "hang" => behavior.hang = boolean(key, value)?,
            "garbage" => behavior.garbage = boolean(key, value)?,
            "ignore_stream" => behavior.ignore_stream = boolean(key, value)?,
            "empty_replies" => behavior.empty_replies = boolean(key, value)?,
            "fail_after_chunks" => behavior.fail_after_chunks = optional(key, value, small)?,
            "stream_fault" => {
                behavior.stream_fault = match value.as_str() {
                    Some("abort") => StreamFault::Abort,
                    Some("error_event") => StreamFault::ErrorEvent,
                    Some("close") => StreamFault::Close,
                    _ => return Err(expected(key, "one of \"abort\", \"error_event\" and \"close\"")),
                };
            }
            "honour_idempotency_keys" => {
                behavior.honour_idempotency_keys = boolean(key, value)?;
                if behavior.honour_idempotency_keys && !behavior.track_requests {
                    return Err(Invalid::new(
                        key.as_str(),
                        "Honouring idempotency keys needs tracked requests (start the mock with --track-requests).",
                    ));
                }
            }
            _ => {
                return Err(Invalid::new(
                    key.as_str(),
                    format!("Unknown behaviour knob '{key}'; known: {}.", KNOBS.join(", ")),
                )
                .code("unknown_parameter"));
            }
        }
    }
    Ok(())
}

fn expected(key: &str, what: &str) -> Invalid {
    Invalid::new(key, format!("Invalid '{key}': expected {what}.")).code("invalid_type")
}

fn integer(key: &str, value: &Value) -> Result<u64, Invalid> {
    value.as_u64().ok_or_else(|| expected(key, "a non-negative integer"))
}

fn small(key: &str, value: &Value) -> Result<u32, Invalid> {
    value.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| expected(key, "a non-negative integer"))
}

fn boolean(key: &str, value: &Value) -> Result<bool, Invalid> {
    value.as_bool().ok_or_else(|| expected(key, "true or false"))
}

fn optional<T>(key: &str, value: &Value, read: fn(&str, &Value) -> Result<T, Invalid>) -> Result<Option<T>, Invalid> {
    if value.is_null() { Ok(None) } else { read(key, value).map(Some) }
}
