//! The coordinator's metrics (`--metrics-listen`, path `/metrics`):
//! gRPC calls by method and status code (the names and labels of
//! go-grpc-prometheus, which dashboards know), open watch and netmap
//! streams, and the latency of store calls.
//!
//! A call is counted once it ends: for a unary call when its status is
//! sent; for a stream when its trailers are (a stream the client drops is
//! `Canceled`). Method labels come only from the methods that exist
//! ([`skymesh_proto::GRPC_METHODS`] and the health service); anything else
//! is `unknown`, so no client can make the coordinator keep a series per
//! path it invents.
//!
//! Must not: hold up a call (counting is a few atomic adds) or keep
//! anything per call after it ends.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use anyhow::Context as _;
use bytes::Bytes;
use futures::stream::BoxStream;
use http_body::Frame;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use skymesh_proto::GrpcMethod;
use skymesh_store::{Compare, KeyValue, Op, Store, TxnResult, WatchBatch};
use tokio_util::sync::CancellationToken;

use crate::limits::StreamLimit;

/// The health service's methods (`grpc.health.v1`, served by tonic-health).
const HEALTH_METHODS: &[GrpcMethod] = &[
    GrpcMethod {
        service: "grpc.health.v1.Health",
        method: "Check",
        server_streaming: false,
        client_streaming: false,
    },
    GrpcMethod {
        service: "grpc.health.v1.Health",
        method: "Watch",
        server_streaming: true,
        client_streaming: false,
    },
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_type: &'static str,
    grpc_service: &'static str,
    grpc_method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_type: &'static str,
    grpc_service: &'static str,
    grpc_method: &'static str,
    grpc_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    op: &'static str,
}

/// Every metric of the coordinator.
pub struct Metrics {
    started: Family<MethodLabels, Counter>,
    handled: Family<HandledLabels, Counter>,
    watch_streams: Gauge,
    netmap_streams: Gauge,
    store: Family<StoreLabels, Histogram>,
    /// Where the stream gauges are read from at each scrape.
    streams: std::sync::OnceLock<(StreamLimit, StreamLimit)>,
}

impl Metrics {
    /// The metrics and the registry they are in.
    pub fn new() -> (Arc<Metrics>, Registry) {
        let m = Metrics {
            started: Family::default(),
            handled: Family::default(),
            watch_streams: Gauge::default(),
            netmap_streams: Gauge::default(),
            store: Family::new_with_constructor(|| {
                // 100 µs to ~3.3 s.
                Histogram::new(exponential_buckets(0.0001, 2.0, 16))
            }),
            streams: std::sync::OnceLock::new(),
        };
        let mut reg = Registry::default();
        reg.register(
            "grpc_server_started",
            "RPCs started on the server",
            m.started.clone(),
        );
        reg.register(
            "grpc_server_handled",
            "RPCs completed on the server, by status code",
            m.handled.clone(),
        );
        let r = reg.sub_registry_with_prefix("skymesh_coordinator");
        r.register(
            "watch_streams",
            "Object watches open (skyctl get --watch, controllers of other tools)",
            m.watch_streams.clone(),
        );
        r.register(
            "netmap_streams",
            "Gateways' netmap streams open",
            m.netmap_streams.clone(),
        );
        r.register_with_unit(
            "store_request_duration",
            "Latency of store calls, by operation",
            Unit::Seconds,
            m.store.clone(),
        );
        (Arc::new(m), reg)
    }

    /// Reads the stream gauges from these limits at every scrape.
    pub fn watch_streams_of(&self, watches: StreamLimit, netmaps: StreamLimit) {
        let _ = self.streams.set((watches, netmaps));
    }

    fn refresh(&self) {
        if let Some((w, n)) = self.streams.get() {
            self.watch_streams
                .set(i64::try_from(w.total()).unwrap_or(i64::MAX));
            self.netmap_streams
                .set(i64::try_from(n.total()).unwrap_or(i64::MAX));
        }
    }

    fn observe_store(&self, op: &'static str, since: Instant) {
        self.store
            .get_or_create(&StoreLabels { op })
            .observe(since.elapsed().as_secs_f64());
    }
}

/// The method a request path (`/skymesh.v1.Api/Create`) names, if it
/// exists.
fn method_of(path: &str) -> Option<&'static GrpcMethod> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    skymesh_proto::GRPC_METHODS
        .iter()
        .chain(HEALTH_METHODS)
        .find(|m| m.service == service && m.method == method)
}

fn method_labels(m: Option<&'static GrpcMethod>) -> MethodLabels {
    match m {
        Some(m) => MethodLabels {
            grpc_type: match (m.client_streaming, m.server_streaming) {
                (false, false) => "unary",
                (false, true) => "server_stream",
                (true, false) => "client_stream",
                (true, true) => "bidi_stream",
            },
            grpc_service: m.service,
            grpc_method: m.method,
        },
        None => MethodLabels {
            grpc_type: "unknown",
            grpc_service: "unknown",
            grpc_method: "unknown",
        },
    }
}

/// A status code as gRPC's own libraries name it (`OK`, `NotFound`, ...).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// The `grpc-status` in headers or trailers, if there is one.
fn grpc_status(h: &http::HeaderMap) -> Option<tonic::Code> {
    let v = h.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(tonic::Code::from_i32(v))
}

/// Counts every call through the gRPC server ([`tonic::transport::Server::layer`]).
#[derive(Clone)]
pub struct RpcLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;
    fn layer(&self, inner: S) -> RpcService<S> {
        RpcService {
            inner,
            m: self.0.clone(),
        }
    }
}

/// [`RpcLayer`]'s service.
#[derive(Clone)]
pub struct RpcService<S> {
    inner: S,
    m: Arc<Metrics>,
}

impl<S, B> tower::Service<http::Request<B>> for RpcService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let labels = method_labels(method_of(req.uri().path()));
        self.m.started.get_or_create(&labels).inc();
        let call = Call {
            m: self.m.clone(),
            labels,
            done: false,
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let (parts, body) = resp.into_parts();
            let mut call = call;
            // A call that fails at once answers with its status in the
            // headers (trailers-only).
            if let Some(code) = grpc_status(&parts.headers) {
                call.finish(code);
            }
            let body = tonic::body::Body::new(CountedBody { inner: body, call });
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

/// One call until it is counted.
struct Call {
    m: Arc<Metrics>,
    labels: MethodLabels,
    done: bool,
}

impl Call {
    fn finish(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let l = &self.labels;
        self.m
            .handled
            .get_or_create(&HandledLabels {
                grpc_type: l.grpc_type,
                grpc_service: l.grpc_service,
                grpc_method: l.grpc_method,
                grpc_code: code_name(code),
            })
            .inc();
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // Dropped before its status went out: the client went away.
        self.finish(tonic::Code::Cancelled);
    }
}

/// A response body that counts its call when the status goes out.
struct CountedBody {
    inner: tonic::body::Body,
    call: Call,
}

impl http_body::Body for CountedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    this.call.finish(code);
                }
            }
            Poll::Ready(Some(Err(s))) => this.call.finish(s.code()),
            // Ended without a status: not something tonic does.
            Poll::Ready(None) => this.call.finish(tonic::Code::Unknown),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A store that times every call into [`Metrics`].
pub struct TimedStore {
    inner: Arc<dyn Store>,
    m: Arc<Metrics>,
}

impl TimedStore {
    /// `inner`, timed.
    pub fn new(inner: Arc<dyn Store>, m: Arc<Metrics>) -> TimedStore {
        TimedStore { inner, m }
    }
}

#[async_trait::async_trait]
impl Store for TimedStore {
    async fn current_revision(&self) -> skymesh_store::Result<u64> {
        let t = Instant::now();
        let r = self.inner.current_revision().await;
        self.m.observe_store("current_revision", t);
        r
    }

    async fn get(&self, key: &str) -> skymesh_store::Result<Option<KeyValue>> {
        let t = Instant::now();
        let r = self.inner.get(key).await;
        self.m.observe_store("get", t);
        r
    }

    async fn range(&self, prefix: &str) -> skymesh_store::Result<(Vec<KeyValue>, u64)> {
        let t = Instant::now();
        let r = self.inner.range(prefix).await;
        self.m.observe_store("range", t);
        r
    }

    async fn txn(&self, compares: Vec<Compare>, ops: Vec<Op>) -> skymesh_store::Result<TxnResult> {
        let t = Instant::now();
        let r = self.inner.txn(compares, ops).await;
        self.m.observe_store("txn", t);
        r
    }

    fn watch(
        &self,
        prefix: &str,
        after_revision: u64,
    ) -> BoxStream<'static, skymesh_store::Result<WatchBatch>> {
        self.inner.watch(prefix, after_revision)
    }
}

/// Serves `/metrics` on `listener` until `cancel` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    m: Arc<Metrics>,
    registry: Registry,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let registry = Arc::new(registry);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let (m, registry) = (m.clone(), registry.clone());
            async move {
                m.refresh();
                skymesh_metrics::scrape(&registry, &headers)
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
        .context("metrics server failed")
}

/// Binds `--metrics-listen`.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to listen on --metrics-listen {addr}"))?;
    tracing::info!(addr = %l.local_addr().unwrap_or(addr), "metrics listening");
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_real_methods_get_their_name() {
        let l = method_labels(method_of("/skymesh.v1.Gateway/Join"));
        assert_eq!(
            (l.grpc_service, l.grpc_method),
            ("skymesh.v1.Gateway", "Join")
        );
        assert_eq!(l.grpc_type, "unary");
        let l = method_labels(method_of("/grpc.health.v1.Health/Watch"));
        assert_eq!(l.grpc_type, "server_stream");
        for p in [
            "/skymesh.v1.Api/NoSuchMethod",
            "/x.Y/Z",
            "/",
            "",
            "nonsense",
        ] {
            assert_eq!(method_labels(method_of(p)).grpc_method, "unknown", "{p}");
        }
    }
}
