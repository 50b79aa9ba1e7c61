//! OpenTelemetry: two nodes export spans over OTLP/gRPC to a real receiver started here; one
//! message's trace covers the publishing node and the receiving node.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use e2e::{free_port, wait_for, Client, Gateway, GatewayOpts, RedisServer, WAIT};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use serde_json::json;

/// One received span: (node, name, trace id, span id, parent span id).
type SpanRow = (String, String, Vec<u8>, Vec<u8>, Vec<u8>);

#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<SpanRow>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let node = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.instance.id")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push((
                        node.clone(),
                        span.name,
                        span.trace_id,
                        span.span_id,
                        span.parent_span_id,
                    ));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test]
async fn one_trace_spans_the_sending_and_the_receiving_node() -> anyhow::Result<()> {
    let receiver = Receiver::default();
    let port = free_port();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(receiver.clone()))
        .serve(format!("127.0.0.1:{port}").parse()?);
    let server = tokio::spawn(server);

    let redis = RedisServer::start().await?;
    let mut nodes = Vec::new();
    for name in ["sender-node", "receiver-node"] {
        let opts = GatewayOpts::redis(&redis.url())
            .node(name)
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{port}"),
            )
            .env("OTEL_BSP_SCHEDULE_DELAY", 100);
        nodes.push(Gateway::start(opts).await?);
    }
    let mut alice = Client::connect(&nodes[0].ws_url()).await?;
    alice.login("alice", json!("traced")).await?;
    let mut bob = Client::connect(&nodes[1].ws_url()).await?;
    bob.login("bob", json!("traced")).await?;
    alice
        .send(json!({"roomId":"traced","content":"follow me"}))
        .await?;
    bob.recv_until(|f| f["event"] == "message").await?;

    let (publish, deliver) = wait_for("publish and deliver spans of one trace", WAIT * 2, || {
        let spans = receiver.spans.lock().unwrap().clone();
        async move {
            let publish = spans
                .iter()
                .find(|s| s.0 == "sender-node" && s.1 == "publish")?
                .clone();
            let deliver = spans
                .iter()
                .find(|s| s.0 == "receiver-node" && s.1 == "deliver" && s.2 == publish.2)?
                .clone();
            Some((publish, deliver))
        }
    })
    .await?;
    assert_eq!(
        deliver.4, publish.3,
        "the delivery span's parent is the publish span"
    );
    assert!(publish.2.iter().any(|b| *b != 0), "a real trace id");
    let names: Vec<String> = receiver
        .spans
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.1.clone())
        .collect();
    assert!(names.iter().any(|n| n == "login"), "{names:?}");
    server.abort();
    let _ = tokio::time::timeout(Duration::from_secs(1), server).await;
    Ok(())
}
