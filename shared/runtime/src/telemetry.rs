//! Logging and distributed tracing. A tracer provider is always installed so every request gets a
//! W3C trace id that crosses gRPC hops; spans are exported over OTLP/gRPC only when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set (sampling ratio from `OTEL_TRACES_SAMPLER_ARG`, default 1).

use std::sync::OnceLock;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs the global subscriber once per process (later calls are no-ops, which is what tests
/// and the standalone binary, six services in one process, need). `RUST_LOG` filters logs;
/// Logs go to stderr (stdout stays for command output); `MESHGATE_LOG_FORMAT=json` switches to
/// JSON lines.
pub fn init(service_name: &str) {
    init_exporting_to(service_name, std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|v| !v.is_empty()));
}

/// [`init`] with the OTLP endpoint given rather than read from the environment (`None`: no
/// export), for tests that run their own receiver.
pub fn init_exporting_to(service_name: &str, otlp_endpoint: Option<String>) {
    PROVIDER.get_or_init(|| {
        let provider = build_provider(service_name, otlp_endpoint);
        let tracer = provider.tracer("meshgate");
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let json = std::env::var("MESHGATE_LOG_FORMAT").is_ok_and(|v| v == "json");
        let fmt = if json {
            tracing_subscriber::fmt::layer().json().with_target(true).with_writer(std::io::stderr).boxed()
        } else {
            tracing_subscriber::fmt::layer().compact().with_target(true).with_writer(std::io::stderr).boxed()
        };
        // try_init: a test harness may already have installed a subscriber.
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(fmt)
            .with(tracing_opentelemetry::layer().with_tracer(tracer))
            .try_init();
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        opentelemetry::global::set_tracer_provider(provider.clone());
        provider
    });
}

fn build_provider(service_name: &str, endpoint: Option<String>) -> SdkTracerProvider {
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service_name.to_owned()).build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let Some(endpoint) = endpoint else {
        // Nothing to export to: spans stay unsampled, but ids are still made and propagated.
        return builder.with_sampler(Sampler::AlwaysOff).build();
    };
    let ratio = std::env::var("OTEL_TRACES_SAMPLER_ARG").ok().and_then(|v| v.parse().ok()).unwrap_or(1.0);
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)));
    match opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint.clone()).build() {
        Ok(exporter) => builder.with_sampler(sampler).with_batch_exporter(exporter).build(),
        Err(err) => {
            eprintln!("meshgate: OTLP exporter for {endpoint} could not be built ({err}); traces are not exported");
            builder.with_sampler(Sampler::AlwaysOff).build()
        }
    }
}

/// Flushes buffered spans; call before the process exits.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        let _ = provider.force_flush();
    }
}

/// Reads W3C trace context from HTTP headers (gRPC metadata is HTTP/2 headers).
pub struct HeaderExtractor<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Writes W3C trace context into HTTP headers.
pub struct HeaderInjector<'a>(pub &'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) =
            (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(&value))
        {
            self.0.insert(name, value);
        }
    }
}

/// Makes `span` a child of the trace context carried by `headers`, if any.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let _ = span.set_parent(cx);
}

/// Writes the trace context of `span` into `headers`.
pub fn inject_span_context(span: &tracing::Span, headers: &mut http::HeaderMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
}

/// The 32-hex-digit trace id of `span` (all zeros when telemetry is not initialised).
pub fn trace_id(span: &tracing::Span) -> String {
    use opentelemetry::trace::TraceContextExt;
    span.context().span().span_context().trace_id().to_string()
}

/// The W3C `traceparent` value of `span`, if it has a valid context.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut headers = http::HeaderMap::new();
    inject_span_context(span, &mut headers);
    headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_owned)
}
