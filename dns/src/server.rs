//! The DNS server: UDP and TCP sockets on one address, hickory's [`Server`]
//! and [`Catalog`] (one `MeshZoneHandler` per served zone, hickory's
//! [`ForwardZoneHandler`] at the root when there are upstreams), and the
//! [`DnsHandle`] through which meshd pushes views.
//!
//! hickory does the wire work: decoding (FORMERR for a bad body, silence for
//! a bad header), EDNS0 (the response advertises the client's payload size),
//! truncation with the TC bit when an answer exceeds it over UDP (512 bytes
//! without EDNS, RFC 1035 §4.2.1) and full answers over TCP. This module adds
//! metrics around the catalog and owns lifecycle: a [`CancellationToken`]
//! stops every socket task.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use hickory_proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_proto::rr::{LowerName, Name, RecordType};
use hickory_resolver::config::NameServerConfig;
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::forwarder::{ForwardConfig, ForwardZoneHandler};
use hickory_server::zone_handler::{Catalog, MessageResponseBuilder, ZoneHandler};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Upstreams, parse_resolv_conf, without_self};
use crate::records::{RecordSet, parse_zone};
use crate::zone::MeshZoneHandler;
use crate::{DnsConfig, DnsMetrics, Error, MeshView};

/// Queued responses per TCP connection (hickory's default stream buffer).
const TCP_RESPONSE_BUFFER: usize = 32;
/// Tries at finding a port free for both UDP and TCP when binding port 0.
const BIND_ATTEMPTS: usize = 16;
/// Tries per upstream for one forwarded query.
const UPSTREAM_ATTEMPTS: usize = 2;

/// The running server's sockets. Its tasks serve from [`DnsServer::bind`] on;
/// [`DnsServer::run`] waits for shutdown. Dropping it stops serving.
pub struct DnsServer {
    server: Server<MeshRequestHandler>,
    shutdown: CancellationToken,
    local_addr: SocketAddr,
}

/// What meshd keeps of the server: view updates, the bound address and
/// shutdown. Cheap to clone.
#[derive(Clone)]
pub struct DnsHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    config: DnsConfig,
    records: Arc<ArcSwap<RecordSet>>,
    /// Who may have names outside the zones forwarded.
    recursion: Arc<ArcSwap<RecursionAllow>>,
    /// The last serial used; held while a view is built so that concurrent
    /// updates are applied in serial order.
    serial: Mutex<u32>,
    local_addr: SocketAddr,
    upstreams: Vec<SocketAddr>,
    metrics: DnsMetrics,
    shutdown: CancellationToken,
    updates: AtomicU32,
}

impl DnsServer {
    /// Validates `config`, binds UDP and TCP on `config.listen`, sets up
    /// forwarding and starts serving an empty view. Metrics go into
    /// `registry`; cancelling `shutdown` (or [`DnsHandle::shutdown`]) stops
    /// the server.
    pub async fn bind(
        mut config: DnsConfig,
        registry: &mut Registry,
        shutdown: CancellationToken,
    ) -> Result<(DnsServer, DnsHandle), Error> {
        for zone in &config.zones {
            parse_zone(zone).map_err(|reason| Error::InvalidZone {
                zone: zone.clone(),
                reason,
            })?;
        }
        let (udp, tcp) = bind_pair(config.listen).await?;
        let local_addr = tcp.local_addr().map_err(|source| Error::Bind {
            proto: "tcp",
            addr: config.listen,
            source,
        })?;
        config.listen = local_addr;

        let upstreams = without_self(read_upstreams(&config.upstreams), local_addr);
        let forwarder = if upstreams.is_empty() {
            None
        } else {
            Some(Arc::new(forwarder(&upstreams, &config)?))
        };

        let metrics = DnsMetrics::new(registry);
        let records = Arc::new(ArcSwap::from_pointee(RecordSet::build_with_serial(
            &MeshView::default(),
            &config,
            1,
        )));

        let mut catalog = Catalog::new();
        let mut zones = Vec::new();
        for origin in RecordSet::origins(&config) {
            let origin = LowerName::new(&origin);
            let handler = MeshZoneHandler::new(origin.clone(), records.clone(), forwarder.clone());
            catalog.upsert(
                origin.clone(),
                vec![Arc::new(handler) as Arc<dyn ZoneHandler>],
            );
            zones.push(origin);
        }
        if let Some(fwd) = &forwarder {
            catalog.upsert(
                LowerName::new(&Name::root()),
                vec![fwd.clone() as Arc<dyn ZoneHandler>],
            );
        }
        info!(
            %local_addr,
            zones = ?zones.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ?upstreams,
            "dns server listening"
        );

        let recursion = Arc::new(ArcSwap::from_pointee(RecursionAllow::new(
            &config.recursion_allow,
            &[],
        )));
        let handler = MeshRequestHandler {
            catalog,
            metrics: metrics.clone(),
            zones,
            forwarding: forwarder.is_some(),
            recursion: recursion.clone(),
            forwards: Arc::new(Semaphore::new(config.max_forwards)),
        };
        let mut server = Server::new(handler);
        server.register_socket(udp);
        server.register_listener(tcp, config.tcp_idle_timeout, TCP_RESPONSE_BUFFER);

        let handle = DnsHandle {
            inner: Arc::new(HandleInner {
                config,
                records,
                recursion,
                serial: Mutex::new(1),
                local_addr,
                upstreams,
                metrics,
                shutdown: shutdown.clone(),
                updates: AtomicU32::new(0),
            }),
        };
        let server = DnsServer {
            server,
            shutdown,
            local_addr,
        };
        Ok((server, handle))
    }

    /// The address the server is bound to (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until the shutdown token is cancelled, then stops every socket
    /// task gracefully. Returns an error if a socket task ends on its own.
    pub async fn run(mut self) -> Result<(), Error> {
        let ended = tokio::select! {
            result = self.server.block_until_done() => Some(result),
            () = self.shutdown.cancelled() => None,
        };
        match ended {
            Some(result) => {
                warn!(local_addr = %self.local_addr, "dns server tasks ended without shutdown");
                result.map_err(Error::Serve)
            }
            None => {
                let result = self.server.shutdown_gracefully().await;
                info!(local_addr = %self.local_addr, "dns server stopped");
                result.map_err(Error::Serve)
            }
        }
    }
}

impl DnsHandle {
    /// Rebuilds every record from `view` and swaps them in; queries see the
    /// new records as soon as this returns.
    #[tracing::instrument(skip_all, fields(cluster = %view.cluster))]
    pub fn update(&self, view: &MeshView) {
        let inner = &self.inner;
        let mut serial = inner.serial.lock().unwrap_or_else(|e| e.into_inner());
        *serial = serial.wrapping_add(1);
        let set = RecordSet::build_with_serial(view, &inner.config, *serial);
        debug!(serial = *serial, names = set.len(), "dns records rebuilt");
        inner.records.store(Arc::new(set));
        inner.recursion.store(Arc::new(RecursionAllow::new(
            &inner.config.recursion_allow,
            &view.local_cidrs,
        )));
        inner.updates.fetch_add(1, Ordering::Relaxed);
    }

    /// Applies every view the watch channel carries (the current one first)
    /// until the sender is dropped or the server shuts down.
    pub async fn follow(&self, mut views: watch::Receiver<MeshView>) {
        loop {
            self.update(&views.borrow_and_update());
            tokio::select! {
                changed = views.changed() => if changed.is_err() { return },
                () = self.inner.shutdown.cancelled() => return,
            }
        }
    }

    /// The address the server is bound to (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The records currently served.
    pub fn records(&self) -> Arc<RecordSet> {
        self.inner.records.load_full()
    }

    /// The upstream resolvers names outside the zones go to (empty: REFUSED).
    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.inner.upstreams
    }

    /// The server's metrics.
    pub fn metrics(&self) -> &DnsMetrics {
        &self.inner.metrics
    }

    /// How many views have been applied.
    pub fn updates(&self) -> u32 {
        self.inner.updates.load(Ordering::Relaxed)
    }

    /// Asks the server to stop ([`DnsServer::run`] returns once it has).
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
    }

    /// The token that stops the server.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }
}

/// Binds UDP, then TCP on the same address. With port 0 the kernel's UDP pick
/// may be taken for TCP; then another port is tried.
async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), Error> {
    let bind_err = |proto, source| Error::Bind {
        proto,
        addr,
        source,
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|e| bind_err("udp", e))?;
        let bound = udp.local_addr().map_err(|e| bind_err("udp", e))?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() == 0 && attempt < BIND_ATTEMPTS => {
                debug!(%bound, error = %e, "tcp port taken, trying another");
            }
            Err(e) => return Err(bind_err("tcp", e)),
        }
    }
}

fn read_upstreams(upstreams: &Upstreams) -> Vec<SocketAddr> {
    match upstreams {
        Upstreams::Static(list) => list.clone(),
        Upstreams::ResolvConf(path) => read_resolv_conf(path),
    }
}

fn read_resolv_conf(path: &Path) -> Vec<SocketAddr> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_resolv_conf(&text),
        Err(error) => {
            warn!(path = %path.display(), %error, "cannot read resolver configuration; names outside the zones will be refused");
            Vec::new()
        }
    }
}

fn forwarder(upstreams: &[SocketAddr], config: &DnsConfig) -> Result<ForwardZoneHandler, Error> {
    let name_servers = upstreams
        .iter()
        .map(|addr| {
            let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
            for conn in &mut ns.connections {
                conn.port = addr.port();
            }
            ns
        })
        .collect();
    let mut builder = ForwardZoneHandler::builder_tokio(ForwardConfig {
        name_servers,
        options: None,
    });
    let opts = builder.options_mut();
    opts.timeout = config.upstream_timeout;
    opts.attempts = UPSTREAM_ATTEMPTS;
    builder.build().map_err(|reason| Error::Forwarder {
        upstreams: upstreams.to_vec(),
        reason,
    })
}

/// The clients that may use recursion: loopback, the view's local CIDRs and
/// the configured extra networks.
struct RecursionAllow(Vec<ipnet::IpNet>);

impl RecursionAllow {
    fn new(extra: &[ipnet::IpNet], local: &[ipnet::Ipv4Net]) -> Self {
        RecursionAllow(
            extra
                .iter()
                .copied()
                .chain(local.iter().map(|n| ipnet::IpNet::V4(*n)))
                .collect(),
        )
    }

    fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_loopback() || self.0.iter().any(|n| n.contains(&ip))
    }
}

/// The catalog plus metrics: every decoded request goes through here.
/// Queries for names outside the zones are refused to clients that may not
/// use recursion, and bounded in flight for those that may.
struct MeshRequestHandler {
    catalog: Catalog,
    metrics: DnsMetrics,
    /// Served origins (names outside them are forwarded or refused).
    zones: Vec<LowerName>,
    forwarding: bool,
    recursion: Arc<ArcSwap<RecursionAllow>>,
    /// One permit per forwarded query in flight.
    forwards: Arc<Semaphore>,
}

impl MeshRequestHandler {
    /// Answers `code` without looking anything up.
    async fn answer<R: ResponseHandler>(
        &self,
        request: &Request,
        code: ResponseCode,
        mut response_handle: R,
    ) -> ResponseInfo {
        let response =
            MessageResponseBuilder::new(&request.queries, None).error_msg(&request.metadata, code);
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(error) => {
                debug!(%error, "failed to send a response");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for MeshRequestHandler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let started = tokio::time::Instant::now();
        let query = request.queries.queries().first();
        let qtype = query.map_or(RecordType::Unknown(0), |q| q.query_type());
        let outside = query.is_some_and(|q| !self.zones.iter().any(|z| z.zone_of(q.name())));
        let mut _permit = None;
        if outside && self.forwarding {
            let refused = if !self.recursion.load().allows(request.src().ip()) {
                Some(ResponseCode::Refused)
            } else {
                match self.forwards.clone().try_acquire_owned() {
                    Ok(p) => {
                        _permit = Some(p);
                        None
                    }
                    Err(_) => Some(ResponseCode::ServFail),
                }
            };
            if let Some(code) = refused {
                let info = self.answer(request, code, response_handle).await;
                self.metrics
                    .observe(qtype, info.response_code, false, started.elapsed());
                return info;
            }
        }
        let info = self
            .catalog
            .handle_request::<R, T>(request, response_handle)
            .await;
        let forwarded = outside && self.forwarding && request.metadata.recursion_desired;
        self.metrics
            .observe(qtype, info.response_code, forwarded, started.elapsed());
        info
    }
}
