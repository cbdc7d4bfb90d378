//! `POST /v1/sync/batches`: the cloud side of edge → cloud. An edge meshgate's sync service
//! uploads the traces its gateway recorded, in batches (protobuf `EdgeBatch`, usually gzip), with
//! the uploading key of a cloud project. The traces are attributed to that key's organization,
//! project, user and key (the edge's own tenant ids are kept in the trace's headers as
//! `x-meshgate-edge-project`), recorded in analytics, and their usage and cost charged to the
//! key's budgets, so the cloud sees the edge's traffic exactly once:
//!
//! 1. a batch id the project has applied before answers 200 with `duplicate: true`;
//! 2. the traces are recorded (analytics ignores a trace it already holds);
//! 3. the batch's usage is charged once under a charge id derived from project and batch id
//!    (quota answers a replay without charging);
//! 4. the batch id is recorded as applied.
//!
//! A failure or crash between the steps makes the edge send the batch again, and each step
//! applies it at most once. Usage lands on the day the batch arrives: budgets are enforced on
//! what the cloud learns when it learns it.
//!
//! What a batch may cost the cloud is bounded before any of it is decoded: the body
//! ([`MAX_BATCH_BYTES`]), its inflated size ([`MAX_INFLATED_BYTES`]), its trace count (counted
//! from the wire, [`MAX_BATCH_TRACES`]), batches decoded at once on the whole replica
//! ([`DECODING_AT_ONCE`], off the async workers), and batches in progress per key
//! (`[gateway] edge_uploads_per_key`).

use std::io::Read as _;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use meshgate_proto::analytics::v1::{RecordBatch, Trace};
use meshgate_proto::common::v1::{Role, Usage};
use meshgate_proto::quota::v1::ChargeRequest;
use meshgate_proto::sync::v1::EdgeBatch;
use meshgate_runtime::{ApiError, ErrorCode};
use prost::Message as _;
use serde::Serialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use crate::api::{AppState, authenticate, client_of, read_body, request_id_of};
use crate::auth::Caller;
use crate::peers::peer_call;
use crate::response::{IDEMPOTENT_REPLAYED, error_response};
use crate::tenancy::EndpointScope;

/// Content type of an edge batch.
pub const BATCH_CONTENT_TYPE: &str = "application/x-protobuf";
pub use meshgate_proto::sync::v1::{
    EDGE_BATCH_MAX_BODY_BYTES as MAX_BATCH_BYTES, EDGE_BATCH_MAX_INFLATED_BYTES as MAX_INFLATED_BYTES,
    EDGE_BATCH_MAX_TRACES as MAX_BATCH_TRACES,
};
/// Batches a replica reads and decodes at once; more are answered 503 (the edge retries).
pub const DECODING_AT_ONCE: usize = 4;
/// The field number of `EdgeBatch.traces`.
const TRACES_FIELD: u32 = 2;

static DECODING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(DECODING_AT_ONCE);
/// Longest batch id.
const MAX_BATCH_ID_LEN: usize = 128;
/// Trace header naming the edge project a trace was recorded in.
pub const EDGE_PROJECT_HEADER: &str = "x-meshgate-edge-project";
/// Trace header naming the edge batch a trace arrived in.
pub const EDGE_BATCH_HEADER: &str = "x-meshgate-edge-batch";

/// The raw bytes of an encoded `meshgate.sync.v1.EdgeBatch`.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)] // a schema only: the handler reads the body itself
pub(crate) struct EdgeBatchBody(Vec<u8>);

/// What the cloud did with a batch.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct EdgeBatchReceipt {
    batch_id: String,
    /// Traces in the batch.
    traces: usize,
    /// Traces analytics stored now (a trace it already held is not stored again).
    recorded: i64,
    /// The batch had been applied before: nothing was recorded or charged now.
    duplicate: bool,
}

/// What `uploadEdgeBatch` answers besides `openapi::COMMON_ERRORS`.
pub(crate) const UPLOAD_BATCH_ERRORS: &[ErrorCode] =
    &[ErrorCode::PayloadTooLarge, ErrorCode::UnsupportedMediaType, ErrorCode::Timeout];

/// `POST /v1/sync/batches`.
#[utoipa::path(
    post,
    path = "/v1/sync/batches",
    operation_id = "uploadEdgeBatch",
    tag = "sync",
    summary = "Apply a batch of an edge meshgate's traffic",
    description = "The body is a protobuf `meshgate.sync.v1.EdgeBatch` (`Content-Type: application/x-protobuf`, \
`Content-Encoding: gzip` or none) whose `batch_id` equals the `Idempotency-Key` header. Its traces are recorded under \
the key's organization and project and their usage charged to the key's budgets, once: a batch id applied before \
answers 200 with `duplicate: true` and changes nothing. Needs a key allowed `edge_sync` and a role above viewer.",
    params(
        ("idempotency-key" = String, Header, description = "The batch id: 1–128 of `A-Za-z0-9-_.:`."),
        ("content-encoding" = Option<String>, Header, description = "`gzip`, or none."),
    ),
    request_body(content = EdgeBatchBody, content_type = "application/x-protobuf", description = "A `meshgate.sync.v1.EdgeBatch`."),
    responses((status = 200, description = "The batch is applied (now, or before: `duplicate`)", body = EdgeBatchReceipt))
)]
pub async fn upload_batch(State(app): State<AppState>, request: Request) -> Response {
    let id = request_id_of(&request);
    let caller = authenticate(&app, request.headers(), client_of(&request)).await;
    let (parts, body) = request.into_parts();
    let result = async {
        let caller = caller?;
        caller.require(EndpointScope::EdgeSync)?;
        if !caller.platform_admin && caller.role() <= Role::Viewer {
            return Err(ApiError::new(ErrorCode::PermissionDenied, "a viewer may not upload usage"));
        }
        let batch_key = idempotency_key(&parts.headers)?;
        check_content_type(&parts.headers)?;
        let encoding = content_encoding(&parts.headers)?;
        let _in_progress = app.uploads.open(&caller.principal)?;
        let _decoding = DECODING.try_acquire().map_err(|_| {
            ApiError::new(ErrorCode::Overloaded, "too many edge batches are being applied; retry shortly")
                .with_retry_after(1)
        })?;
        let raw = read_body(body, &parts.headers, MAX_BATCH_BYTES).await?;
        let batch = tokio::task::spawn_blocking(move || decode_batch(encoding, &raw))
            .await
            .map_err(|err| ApiError::new(ErrorCode::Internal, format!("decoding the batch failed: {err}")))??;
        if batch.batch_id != batch_key {
            return Err(ApiError::new(ErrorCode::InvalidRequest, "Idempotency-Key must equal the body's batch_id"));
        }
        apply(&app, &caller, batch).await
    }
    .await;
    match result {
        Ok((receipt, duplicate)) => {
            let mut response = (StatusCode::OK, axum::Json(receipt)).into_response();
            if duplicate {
                response.headers_mut().insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
            }
            response
        }
        Err(err) => error_response(&err, &id),
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, message)
}

fn idempotency_key(headers: &HeaderMap) -> Result<String, ApiError> {
    let key = headers
        .get("idempotency-key")
        .ok_or_else(|| invalid("Idempotency-Key (the batch id) is required"))?
        .to_str()
        .map_err(|_| invalid("Idempotency-Key must be visible ASCII"))?;
    valid_batch_id(key)?;
    Ok(key.to_owned())
}

fn valid_batch_id(id: &str) -> Result<(), ApiError> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
    if id.is_empty() || id.len() > MAX_BATCH_ID_LEN || !id.chars().all(allowed) {
        return Err(invalid(format!("a batch id is 1 to {MAX_BATCH_ID_LEN} of A-Za-z0-9-_.: (got {id:?})")));
    }
    Ok(())
}

fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let media = content_type.split(';').next().unwrap_or_default().trim();
    if media.eq_ignore_ascii_case(BATCH_CONTENT_TYPE) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!("an edge batch is {BATCH_CONTENT_TYPE} (got {content_type:?})"),
        ))
    }
}

/// How the body is encoded (`Content-Encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    Identity,
    Gzip,
}

fn content_encoding(headers: &HeaderMap) -> Result<Encoding, ApiError> {
    let encoding = headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).unwrap_or("identity").trim();
    match encoding.to_ascii_lowercase().as_str() {
        "identity" | "" => Ok(Encoding::Identity),
        "gzip" => Ok(Encoding::Gzip),
        other => Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!("Content-Encoding {other:?} is not supported (gzip or none)"),
        )),
    }
}

/// The batch in `raw`, inflated within [`MAX_INFLATED_BYTES`], its traces counted on the wire
/// before any is decoded. Blocking work: called off the async workers.
fn decode_batch(encoding: Encoding, raw: &[u8]) -> Result<EdgeBatch, ApiError> {
    let inflated;
    let bytes = match encoding {
        Encoding::Identity => raw,
        Encoding::Gzip => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(raw)
                .take(MAX_INFLATED_BYTES as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|err| invalid(format!("the body is not valid gzip: {err}")))?;
            if out.len() > MAX_INFLATED_BYTES {
                return Err(ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!("the batch exceeds {MAX_INFLATED_BYTES} bytes uncompressed"),
                ));
            }
            inflated = out;
            &inflated
        }
    };
    let traces = count_traces(bytes)?;
    if traces == 0 || traces > MAX_BATCH_TRACES {
        return Err(invalid(format!("a batch carries 1 to {MAX_BATCH_TRACES} traces (got {traces})")));
    }
    let batch = EdgeBatch::decode(bytes).map_err(|err| invalid(format!("the body is not an EdgeBatch: {err}")))?;
    valid_batch_id(&batch.batch_id)?;
    Ok(batch)
}

/// Counts `traces` entries by walking the message's top-level fields without decoding them; stops
/// at one past [`MAX_BATCH_TRACES`].
fn count_traces(mut bytes: &[u8]) -> Result<usize, ApiError> {
    use prost::encoding::{DecodeContext, WireType, decode_key, skip_field};
    let malformed = |err: prost::DecodeError| invalid(format!("the body is not an EdgeBatch: {err}"));
    let mut traces = 0;
    while !bytes.is_empty() {
        let (tag, wire_type) = decode_key(&mut bytes).map_err(malformed)?;
        if tag == TRACES_FIELD && wire_type == WireType::LengthDelimited {
            traces += 1;
            if traces > MAX_BATCH_TRACES {
                break;
            }
        }
        skip_field(wire_type, tag, &mut bytes, DecodeContext::default()).map_err(malformed)?;
    }
    Ok(traces)
}

/// The batch's total usage; refuses negative or overflowing figures.
fn batch_usage(traces: &[Trace]) -> Result<Usage, ApiError> {
    let mut total = Usage::default();
    for trace in traces {
        let usage = trace.usage.unwrap_or_default();
        let tokens = usage.tokens();
        for (field, value) in [
            ("prompt_tokens", usage.prompt_tokens),
            ("completion_tokens", usage.completion_tokens),
            ("total_tokens", usage.total_tokens),
            ("cost_micros", usage.cost_micros),
        ] {
            if value < 0 {
                return Err(invalid(format!("trace {}: usage.{field} is negative", trace.request_id)));
            }
        }
        let add = |a: i64, b: i64| a.checked_add(b).ok_or_else(|| invalid("the batch's usage overflows"));
        total.prompt_tokens = add(total.prompt_tokens, usage.prompt_tokens)?;
        total.completion_tokens = add(total.completion_tokens, usage.completion_tokens)?;
        total.total_tokens = add(total.total_tokens, tokens)?;
        total.cost_micros = add(total.cost_micros, usage.cost_micros)?;
    }
    Ok(total)
}

/// The quota charge id of a project's batch: bounded, and distinct per project so one project
/// cannot spend another's batch id.
fn charge_id(project_id: &str, batch_id: &str) -> String {
    let digest = Sha256::new().chain_update(project_id).chain_update([0]).chain_update(batch_id).finalize();
    format!("edge:{}", hex::encode(&digest[..16]))
}

async fn apply(app: &AppState, caller: &Caller, batch: EdgeBatch) -> Result<(EdgeBatchReceipt, bool), ApiError> {
    let project_id = caller.principal.project_id.clone();
    let store = app.auth.store();
    let count = batch.traces.len();
    if store.edge_batch_applied(&project_id, &batch.batch_id).await? {
        app.metrics.edge_batches.with_label_values(&["duplicate"]).inc();
        let receipt = EdgeBatchReceipt { batch_id: batch.batch_id, traces: count, recorded: 0, duplicate: true };
        return Ok((receipt, true));
    }
    let usage = batch_usage(&batch.traces)?;
    let traces: Vec<Trace> = batch
        .traces
        .into_iter()
        .map(|mut trace| {
            let edge_project = trace.principal.take().map(|p| p.project_id).unwrap_or_default();
            trace.principal = Some(caller.principal.clone());
            trace.headers.insert(EDGE_PROJECT_HEADER.into(), edge_project);
            trace.headers.insert(EDGE_BATCH_HEADER.into(), batch.batch_id.clone());
            trace
        })
        .collect();
    let peers = app.orchestrator.peers();
    // A batch is large: its calls get more than a request's.
    let deadline = peers.timeout.max(std::time::Duration::from_secs(10));
    let mut analytics = peers.analytics.clone();
    let recording = analytics.record(futures::stream::iter([RecordBatch { traces }]));
    let recorded = peer_call("analytics", deadline, recording).await?.accepted;
    let charge = ChargeRequest {
        charge_id: charge_id(&project_id, &batch.batch_id),
        principal: Some(caller.principal.clone()),
        usage: Some(usage),
        requests: count as i64,
    };
    peer_call("quota", deadline, peers.quota.clone().charge(charge)).await?;
    store.record_edge_batch(&project_id, &batch.batch_id, count as i64, Utc::now()).await?;
    app.metrics.edge_batches.with_label_values(&["applied"]).inc();
    Ok((EdgeBatchReceipt { batch_id: batch.batch_id, traces: count, recorded, duplicate: false }, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charge_ids_are_bounded_and_per_project() {
        let a = charge_id("p1", "edge-1");
        assert_eq!(a, charge_id("p1", "edge-1"));
        assert_ne!(a, charge_id("p2", "edge-1"));
        assert_ne!(charge_id("p1", "x"), charge_id("p1x", ""), "the separator keeps fields apart");
        assert_eq!(a.len(), "edge:".len() + 32);
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, bytes).unwrap();
        gz.finish().unwrap()
    }

    #[test]
    fn bodies_are_checked_before_anything_is_applied() {
        let batch =
            EdgeBatch { batch_id: "e-1".into(), traces: vec![Trace { request_id: "r1".into(), ..Default::default() }] };
        assert_eq!(decode_batch(Encoding::Identity, &batch.encode_to_vec()).unwrap(), batch);
        assert_eq!(decode_batch(Encoding::Gzip, &gzip(&batch.encode_to_vec())).unwrap(), batch);
        assert_eq!(decode_batch(Encoding::Gzip, b"not gzip").unwrap_err().code, ErrorCode::InvalidRequest);
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
        assert_eq!(content_encoding(&headers).unwrap_err().code, ErrorCode::UnsupportedMediaType);
        headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(" GZIP "));
        assert_eq!(content_encoding(&headers).unwrap(), Encoding::Gzip);
        assert_eq!(decode_batch(Encoding::Identity, b"\xff\xff\xff").unwrap_err().code, ErrorCode::InvalidRequest);
        let empty = EdgeBatch { batch_id: "e-2".into(), traces: vec![] };
        let err = decode_batch(Encoding::Identity, &empty.encode_to_vec()).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest);
        let bad_id = EdgeBatch { batch_id: "a b".into(), ..batch };
        let err = decode_batch(Encoding::Identity, &bad_id.encode_to_vec()).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest);
    }

    #[test]
    fn too_many_traces_are_refused_from_the_wire_before_decoding() {
        // Each trace is an empty message: 2 bytes on the wire, so a batch of a million is small
        // and would cost a million allocations to decode.
        let mut wire = EdgeBatch { batch_id: "e-1".into(), traces: vec![] }.encode_to_vec();
        for _ in 0..1_000_000 {
            wire.extend_from_slice(&[(TRACES_FIELD << 3 | 2) as u8, 0]);
        }
        assert_eq!(count_traces(&wire).unwrap(), MAX_BATCH_TRACES + 1, "counting stops past the limit");
        let err = decode_batch(Encoding::Gzip, &gzip(&wire)).unwrap_err();
        assert!(err.message.contains("1 to 10000 traces"), "{}", err.message);
    }

    #[test]
    fn an_inflation_bomb_is_cut_at_the_inflated_limit() {
        let bomb = gzip(&vec![0u8; MAX_INFLATED_BYTES + 1024]);
        assert!(bomb.len() < MAX_BATCH_BYTES / 100, "a small body: {} bytes", bomb.len());
        assert_eq!(decode_batch(Encoding::Gzip, &bomb).unwrap_err().code, ErrorCode::PayloadTooLarge);
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::super::*;

        fn trace() -> impl Strategy<Value = Trace> {
            ("[a-z0-9-]{1,12}", any::<i64>(), proptest::collection::vec("\\PC{0,8}", 0..3)).prop_map(
                |(request_id, tokens, tools)| Trace {
                    request_id,
                    usage: Some(Usage { prompt_tokens: tokens, ..Default::default() }),
                    routing_reasons: tools,
                    ..Default::default()
                },
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            /// Whatever the bytes, the decoder answers a batch or a 4xx, never a panic.
            #[test]
            fn arbitrary_bodies_decode_or_are_refused(raw in proptest::collection::vec(any::<u8>(), 0..4096), gzipped in any::<bool>()) {
                let (encoding, body) = if gzipped { (Encoding::Gzip, super::gzip(&raw)) } else { (Encoding::Identity, raw) };
                match decode_batch(encoding, &body) {
                    Ok(batch) => prop_assert!((1..=MAX_BATCH_TRACES).contains(&batch.traces.len())),
                    Err(err) => prop_assert!(err.code.http_status().is_client_error(), "{err:?}"),
                }
            }

            /// Valid batches, mangled at one byte: decoded whole or refused, and the wire count
            /// always matches what decoding finds.
            #[test]
            fn valid_batches_survive_and_mangled_ones_are_refused(
                traces in proptest::collection::vec(trace(), 1..20),
                flip in any::<(usize, u8)>(),
            ) {
                let batch = EdgeBatch { batch_id: "edge-1".into(), traces };
                let wire = batch.encode_to_vec();
                prop_assert_eq!(count_traces(&wire).unwrap(), batch.traces.len());
                prop_assert_eq!(&decode_batch(Encoding::Gzip, &super::gzip(&wire)).unwrap(), &batch);
                let mut mangled = wire.clone();
                let at = flip.0 % mangled.len();
                mangled[at] ^= flip.1.max(1);
                match decode_batch(Encoding::Identity, &mangled) {
                    Ok(decoded) => prop_assert_eq!(count_traces(&mangled).unwrap(), decoded.traces.len()),
                    Err(err) => prop_assert!(err.code.http_status().is_client_error()),
                }
            }
        }
    }

    #[test]
    fn usage_adds_up_and_refuses_negative_figures() {
        let trace = |tokens: i64, cost: i64| Trace {
            usage: Some(Usage { prompt_tokens: tokens, completion_tokens: 1, cost_micros: cost, ..Usage::default() }),
            ..Default::default()
        };
        let total = batch_usage(&[trace(10, 5), trace(2, 7)]).unwrap();
        assert_eq!(
            (total.prompt_tokens, total.completion_tokens, total.total_tokens, total.cost_micros),
            (12, 2, 14, 12)
        );
        assert!(batch_usage(&[trace(-1, 0)]).is_err());
        assert!(batch_usage(&[trace(0, i64::MAX), trace(0, 1)]).is_err());
    }
}
