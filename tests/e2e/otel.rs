//! One distributed trace per request across the mesh, exported over OTLP/gRPC to a receiver this
//! test runs (built on `opentelemetry-proto`), with the GenAI semantic conventions on the model
//! call. The exporter is process-wide, so this relies on nextest's process per test.

use std::sync::Arc;
use std::time::Duration;

use meshgate_tests::{CLOUD_MODEL, MeshOptions, TestMesh, chat_body};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use parking_lot::Mutex;
use serde_json::Value;
use tonic::transport::server::TcpIncoming;

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request.into_inner().resource_spans.into_iter().flat_map(|r| r.scope_spans).flat_map(|s| s.spans);
        self.spans.lock().extend(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attribute(span: &Span, key: &str) -> Option<AnyValue> {
    span.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.clone()).and_then(|v| v.value)
}

fn text(span: &Span, key: &str) -> String {
    match attribute(span, key) {
        Some(AnyValue::StringValue(value)) => value,
        other => panic!("{} has no string {key}: {other:?}", span.name),
    }
}

fn int(span: &Span, key: &str) -> i64 {
    match attribute(span, key) {
        Some(AnyValue::IntValue(value)) => value,
        other => panic!("{} has no integer {key}: {other:?}", span.name),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_across_the_services_with_genai_attributes() {
    let receiver = Receiver::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(receiver.clone()))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    meshgate_runtime::telemetry::init_exporting_to("meshgate-tests", Some(endpoint));
    // Per-request reservations: quota is on this request's path (Reserve, then Commit) and its
    // spans join the request's trace. A leased admission makes no quota call of its own.
    let mesh = TestMesh::start_with(MeshOptions {
        tune: Box::new(|config| config.gateway.quota_leases = false),
        ..MeshOptions::default()
    })
    .await;

    let response = mesh.chat(chat_body(CLOUD_MODEL, "trace this request")).await;
    assert_eq!(response.status(), 200);
    let trace_id = response.headers()["x-meshgate-trace-id"].to_str().unwrap().to_owned();
    let traceparent = response.headers()["traceparent"].to_str().unwrap().to_owned();
    assert!(traceparent.starts_with(&format!("00-{trace_id}-")), "{traceparent}");
    let body: Value = response.json().await.unwrap();

    // The spans of the request, across every service it touched, once all have been exported.
    let wanted = ["Router/Decide", "Quota/Reserve", "Sync/Complete", "Quota/Commit"];
    let mut ours = Vec::new();
    for _ in 0..100 {
        meshgate_runtime::telemetry::shutdown();
        ours = receiver.spans.lock().iter().filter(|s| hex(&s.trace_id) == trace_id).cloned().collect::<Vec<_>>();
        let names: Vec<&str> = ours.iter().map(|s| s.name.as_str()).collect();
        let model_call_done =
            ours.iter().any(|s| s.name.starts_with("chat ") && attribute(s, "gen_ai.usage.output_tokens").is_some());
        let edge_done = names.iter().any(|n| n.starts_with("POST /v1/chat/completions"));
        if wanted.iter().all(|w| names.iter().any(|n| n.ends_with(w))) && model_call_done && edge_done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let names: Vec<&str> = ours.iter().map(|s| s.name.as_str()).collect();
    for service_method in wanted {
        assert!(names.iter().any(|n| n.ends_with(service_method)), "no {service_method} span in {names:?}");
    }
    assert!(names.iter().any(|n| n.starts_with("POST /v1/chat/completions")), "{names:?}");

    let call = ours.iter().find(|s| s.name == format!("chat {CLOUD_MODEL}")).expect("a model-call span");
    assert_eq!(text(call, "gen_ai.operation.name"), "chat");
    assert_eq!(text(call, "gen_ai.provider.name"), "alpha");
    assert_eq!(text(call, "gen_ai.request.model"), CLOUD_MODEL);
    assert_eq!(text(call, "gen_ai.response.model"), CLOUD_MODEL);
    assert_eq!(int(call, "gen_ai.usage.input_tokens"), body["usage"]["prompt_tokens"].as_i64().unwrap());
    assert_eq!(int(call, "gen_ai.usage.output_tokens"), body["usage"]["completion_tokens"].as_i64().unwrap());
    // The provider call is the model call's child: sync's server span hangs below it.
    let complete = ours.iter().find(|s| s.name.ends_with("Sync/Complete")).unwrap();
    assert_eq!(complete.parent_span_id, call.span_id, "Sync/Complete runs inside the model call");

    mesh.stop().await;
    server.abort();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
