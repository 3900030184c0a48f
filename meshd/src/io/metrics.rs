//! Prometheus metrics (on `--metrics-listen`, path `/metrics`; text format
//! 0.0.4, or OpenMetrics when the scraper asks): per-peer bytes, packets,
//! handshakes, RTT and probe state; drops by reason; local job readiness.
//! Counters advance from the device loop's published totals once a second.
//! The same listener answers `/healthz` (200 once the gateway has a netmap
//! and its TUN interface is up); it is bound first thing at start, so a
//! gateway still joining or waiting for the coordinator answers 503.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context as _, Result};
use arc_swap::ArcSwap;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::device::DeviceStats;
use super::health::{JobReadiness, PeerHealth};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    service: String,
    from: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    service: String,
    backend: String,
}

/// meshd's metrics.
#[derive(Default)]
pub struct Metrics {
    rx_bytes: Family<PeerLabels, Counter>,
    tx_bytes: Family<PeerLabels, Counter>,
    rx_packets: Family<PeerLabels, Counter>,
    tx_packets: Family<PeerLabels, Counter>,
    handshakes: Family<PeerLabels, Counter>,
    rtt: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    up: Family<PeerLabels, Gauge>,
    drops: Family<DropLabels, Counter>,
    jobs_ready: Gauge,
    jobs: Gauge,
    connections: Family<ServiceLabels, Counter>,
    backend_connections: Family<BackendLabels, Counter>,
    active_flows: Gauge,
    evicted_flows: Counter,
    lb_drops: Family<DropLabels, Counter>,
    lb_replies: Family<DropLabels, Counter>,
    policy_denied: Family<PolicyLabels, Counter>,
}

impl Metrics {
    /// Registers every metric in `reg` (prefix `skymesh`).
    pub fn register(reg: &mut Registry) -> Arc<Self> {
        let m = Metrics::default();
        let r = reg.sub_registry_with_prefix("skymesh");
        r.register(
            "peer_rx_bytes",
            "Bytes received from a peer (decrypted)",
            m.rx_bytes.clone(),
        );
        r.register(
            "peer_tx_bytes",
            "Bytes sent to a peer (before encryption)",
            m.tx_bytes.clone(),
        );
        r.register(
            "peer_rx_packets",
            "Packets received from a peer",
            m.rx_packets.clone(),
        );
        r.register(
            "peer_tx_packets",
            "Packets sent to a peer",
            m.tx_packets.clone(),
        );
        r.register(
            "peer_handshakes",
            "Completed WireGuard handshakes with a peer",
            m.handshakes.clone(),
        );
        r.register(
            "peer_rtt_seconds",
            "Round-trip time of the latest probe",
            m.rtt.clone(),
        );
        r.register(
            "peer_up",
            "1 while the peer gateway answers probes",
            m.up.clone(),
        );
        r.register("drops", "Packets dropped, by reason", m.drops.clone());
        r.register(
            "jobs_ready",
            "Local jobs passing their health checks",
            m.jobs_ready.clone(),
        );
        r.register("jobs", "Local jobs being checked", m.jobs.clone());
        r.register(
            "service_connections",
            "New connections (flows) to a service VIP",
            m.connections.clone(),
        );
        r.register(
            "backend_connections",
            "New connections (flows) sent to a backend of a service",
            m.backend_connections.clone(),
        );
        r.register(
            "active_flows",
            "Flows in the VIP flow table",
            m.active_flows.clone(),
        );
        r.register(
            "lb_evicted_flows",
            "Flows never assured (or closed) evicted from a full flow table to make room",
            m.evicted_flows.clone(),
        );
        r.register(
            "lb_drops",
            "Packets to VIPs dropped, by reason",
            m.lb_drops.clone(),
        );
        r.register(
            "lb_replies",
            "Answers generated for VIPs (echo replies, resets, unreachables)",
            m.lb_replies.clone(),
        );
        r.register(
            "policy_denied",
            "New flows the service policy refused, by destination service and caller",
            m.policy_denied.clone(),
        );
        Arc::new(m)
    }

    fn advance(c: &Counter, prev: u64, now: u64) {
        // A rebuilt peer starts again from zero: count from there.
        c.inc_by(if now >= prev { now - prev } else { now });
    }

    /// Moves the metrics from the `prev` totals to the `now` totals.
    fn update(
        &self,
        prev: &DeviceStats,
        now: &DeviceStats,
        health: &BTreeMap<String, PeerHealth>,
        jobs: &JobReadiness,
    ) {
        let before: BTreeMap<&str, _> = prev.peers.iter().map(|p| (p.name.as_str(), p)).collect();
        for p in &now.peers {
            let l = PeerLabels {
                peer: p.name.clone(),
            };
            let b = before.get(p.name.as_str());
            Self::advance(
                &self.rx_bytes.get_or_create(&l),
                b.map_or(0, |b| b.rx_bytes),
                p.rx_bytes,
            );
            Self::advance(
                &self.tx_bytes.get_or_create(&l),
                b.map_or(0, |b| b.tx_bytes),
                p.tx_bytes,
            );
            Self::advance(
                &self.rx_packets.get_or_create(&l),
                b.map_or(0, |b| b.rx_packets),
                p.rx_packets,
            );
            Self::advance(
                &self.tx_packets.get_or_create(&l),
                b.map_or(0, |b| b.tx_packets),
                p.tx_packets,
            );
            Self::advance(
                &self.handshakes.get_or_create(&l),
                b.map_or(0, |b| b.handshakes),
                p.handshakes,
            );
            let h = health.get(&p.name);
            self.up
                .get_or_create(&l)
                .set(i64::from(h.is_some_and(|h| h.up)));
            if let Some(rtt) = h.and_then(|h| h.rtt) {
                self.rtt.get_or_create(&l).set(rtt.as_secs_f64());
            }
        }
        for p in prev
            .peers
            .iter()
            .filter(|p| !now.peers.iter().any(|n| n.name == p.name))
        {
            let l = PeerLabels {
                peer: p.name.clone(),
            };
            self.up.remove(&l);
            self.rtt.remove(&l);
        }
        for (reason, n) in &now.drops {
            let l = DropLabels {
                reason: reason.as_str().to_string(),
            };
            Self::advance(
                &self.drops.get_or_create(&l),
                prev.drops.get(reason).copied().unwrap_or(0),
                *n,
            );
        }
        for (svc, st) in &now.lb.services {
            let before = prev.lb.services.get(svc);
            let l = ServiceLabels {
                service: svc.to_string(),
            };
            Self::advance(
                &self.connections.get_or_create(&l),
                before.map_or(0, |b| b.connections),
                st.connections,
            );
            for (backend, n) in &st.backends {
                let l = BackendLabels {
                    service: svc.to_string(),
                    backend: backend.to_string(),
                };
                let b = before
                    .and_then(|b| b.backends.get(backend))
                    .copied()
                    .unwrap_or(0);
                Self::advance(&self.backend_connections.get_or_create(&l), b, *n);
            }
        }
        self.active_flows
            .set(i64::try_from(now.lb.active_flows).unwrap_or(i64::MAX));
        Self::advance(
            &self.evicted_flows,
            prev.lb.evicted_flows,
            now.lb.evicted_flows,
        );
        for (reason, n) in &now.lb.drops {
            let l = DropLabels {
                reason: reason.as_str().to_string(),
            };
            Self::advance(
                &self.lb_drops.get_or_create(&l),
                prev.lb.drops.get(reason).copied().unwrap_or(0),
                *n,
            );
        }
        for (kind, n) in &now.lb.replies {
            let l = DropLabels {
                reason: kind.as_str().to_string(),
            };
            Self::advance(
                &self.lb_replies.get_or_create(&l),
                prev.lb.replies.get(kind).copied().unwrap_or(0),
                *n,
            );
        }
        for ((service, from), n) in &now.lb.policy_denied {
            let l = PolicyLabels {
                service: service.to_string(),
                from: from.to_string(),
            };
            Self::advance(
                &self.policy_denied.get_or_create(&l),
                prev.lb
                    .policy_denied
                    .get(&(service.clone(), from.clone()))
                    .copied()
                    .unwrap_or(0),
                *n,
            );
        }
        self.jobs.set(i64::try_from(jobs.len()).unwrap_or(i64::MAX));
        self.jobs_ready
            .set(i64::try_from(jobs.values().filter(|r| **r).count()).unwrap_or(i64::MAX));
    }
}

/// Advances the metrics once a second until `cancel` fires.
pub async fn run_updater(
    m: Arc<Metrics>,
    stats: Arc<ArcSwap<DeviceStats>>,
    health: watch::Receiver<BTreeMap<String, PeerHealth>>,
    jobs: watch::Receiver<JobReadiness>,
    cancel: CancellationToken,
) {
    let mut prev = Arc::new(DeviceStats::default());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = stats.load_full();
        m.update(&prev, &now, &health.borrow(), &jobs.borrow());
        prev = now;
    }
}

/// How far a gateway has come, for `/healthz`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    /// Joining, or waiting for the first netmap (from the coordinator or
    /// the cache).
    WaitingForNetmap = 0,
    /// Has a netmap; the TUN interface and the tasks are being set up.
    StartingTun = 1,
    /// Has a netmap, the TUN interface is up and every task runs.
    Ready = 2,
}

/// What the observability listener serves from a gateway that may still be
/// starting: its stage, and the metrics registry once every metric is in it.
#[derive(Clone, Default)]
pub struct Observed {
    registry: Arc<OnceLock<Registry>>,
    stage: Arc<AtomicU8>,
}

impl Observed {
    /// Moves `/healthz` on to `stage`.
    pub fn set_stage(&self, stage: Stage) {
        self.stage.store(stage as u8, Ordering::Release);
    }

    /// Serves `registry` on `/metrics` from now on (the first one given
    /// stays).
    pub fn publish(&self, registry: Registry) {
        let _ = self.registry.set(registry);
    }

    fn healthz(&self) -> (StatusCode, &'static str) {
        match self.stage.load(Ordering::Acquire) {
            s if s == Stage::Ready as u8 => (StatusCode::OK, "ok\n"),
            s if s == Stage::StartingTun as u8 => (
                StatusCode::SERVICE_UNAVAILABLE,
                "starting: bringing the TUN interface up\n",
            ),
            _ => (
                StatusCode::SERVICE_UNAVAILABLE,
                "starting: no netmap yet (joining, or waiting for the coordinator)\n",
            ),
        }
    }
}

/// Binds the observability listener (`--metrics-listen`).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("failed to listen on --metrics-listen {addr}"))?;
    tracing::info!(%addr, "metrics and /healthz listening");
    Ok(listener)
}

/// Serves, until `cancel` fires: `/metrics` (Prometheus text format 0.0.4,
/// or OpenMetrics when `Accept` asks for it; 503 until the registry is
/// published) and `/healthz` (200 once the gateway has a netmap and its
/// TUN interface is up, 503 before, with the stage in the body).
pub async fn serve(
    listener: tokio::net::TcpListener,
    observed: Observed,
    cancel: CancellationToken,
) -> Result<()> {
    let (m, h) = (observed.clone(), observed);
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move |headers: HeaderMap| {
                let m = m.clone();
                async move {
                    match m.registry.get() {
                        Some(r) => skymesh_metrics::scrape(r, &headers),
                        None => (StatusCode::SERVICE_UNAVAILABLE, m.healthz().1).into_response(),
                    }
                }
            }),
        )
        .route(
            "/healthz",
            axum::routing::get(move || {
                let h = h.clone();
                async move { h.healthz() }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
        .context("metrics server failed")
}
