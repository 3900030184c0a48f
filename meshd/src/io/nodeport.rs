//! NodePort / LoadBalancer services: reachable from outside the mesh on the
//! gateway's underlay address (SPEC §5, `external_ips`).
//!
//! For every such service exposed in this cluster, meshd listens on
//! `<underlay IP>:<service port>` and relays each TCP connection (and each
//! UDP client) to the service's VIP. The relay's own connection to the VIP
//! goes through the kernel into the TUN like any client's, so the balancer,
//! health and traffic policies apply unchanged; replies come back to the
//! gateway's overlay address. Listeners follow the netmap: added, kept and
//! removed by diff.
//!
//! Bounded against floods: per listener at most [`MAX_TCP_CONNECTIONS`]
//! TCP connections and [`MAX_UDP_CLIENTS`] UDP clients (the longest idle
//! makes room), at most [`MAX_PER_SOURCE`] per source address, and a fixed
//! number of buffers. The relay hides the client's address from the
//! balancer (ClientIP affinity sees the gateway), a known limit.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use skymesh_proto::v1::{Protocol, ServiceType};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::state::NetState;

/// How long a UDP client's relay lives without traffic (RFC 4787 REQ-5:
/// at least 2 minutes; these relays are cheap to recreate, so the floor).
const UDP_IDLE: Duration = Duration::from_secs(120);

/// One external listener: protocol and port on the underlay address, and
/// the VIP it relays to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listener {
    pub udp: bool,
    pub port: u16,
    pub vip: Ipv4Addr,
}

/// The listeners the netmap asks for in this cluster (pure).
pub fn desired(s: &NetState) -> Vec<Listener> {
    let mut out = Vec::new();
    for svc in s.services.values() {
        let (Some(spec), Some(status)) = (&svc.spec, &svc.status) else {
            continue;
        };
        if !matches!(
            spec.r#type(),
            ServiceType::NodePort | ServiceType::LoadBalancer
        ) {
            continue;
        }
        if !spec.clusters.is_empty() && !spec.clusters.contains(&s.cluster) {
            continue;
        }
        let Ok(vip) = status.cluster_ip.parse::<Ipv4Addr>() else {
            continue;
        };
        for p in &spec.ports {
            if let Ok(port) = u16::try_from(p.port) {
                out.push(Listener {
                    udp: p.protocol() == Protocol::Udp,
                    port,
                    vip,
                });
            }
        }
    }
    out.sort();
    out.dedup_by_key(|l| (l.udp, l.port));
    out
}

/// Keeps the external listeners equal to what the netmap asks for.
pub async fn run(
    ip: IpAddr,
    mut netmap: watch::Receiver<Arc<NetState>>,
    cancel: CancellationToken,
) {
    let mut running: BTreeMap<Listener, (CancellationToken, JoinHandle<()>)> = BTreeMap::new();
    loop {
        let want = desired(&netmap.borrow_and_update());
        running.retain(|l, (stop, _)| {
            let keep = want.contains(l);
            if !keep {
                tracing::info!(port = l.port, udp = l.udp, "external listener removed");
                stop.cancel();
            }
            keep
        });
        for l in want {
            if running.contains_key(&l) {
                continue;
            }
            let stop = cancel.child_token();
            let addr = SocketAddr::new(ip, l.port);
            let task = if l.udp {
                match UdpSocket::bind(addr).await {
                    Ok(sock) => tokio::spawn(relay_udp(sock, l.vip, l.port, stop.clone())),
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "cannot listen for an external service");
                        continue;
                    }
                }
            } else {
                match TcpListener::bind(addr).await {
                    Ok(listener) => tokio::spawn(relay_tcp(listener, l.vip, l.port, stop.clone())),
                    Err(e) => {
                        tracing::warn!(%addr, error = %e, "cannot listen for an external service");
                        continue;
                    }
                }
            };
            tracing::info!(%addr, vip = %l.vip, udp = l.udp, "external listener added");
            running.insert(l, (stop, task));
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            r = netmap.changed() => if r.is_err() { return },
        }
    }
}

/// Tuning: TCP connections one external listener relays at once; beyond
/// it new ones are closed at once (each holds two sockets and a task).
pub const MAX_TCP_CONNECTIONS: usize = 4096;
/// Tuning: TCP connections (or UDP clients) one source address may hold at
/// once on a listener.
pub const MAX_PER_SOURCE: usize = 64;
/// Tuning: UDP clients (each with its own socket towards the VIP) one
/// external listener relays at once. When full, the client idle longest
/// makes room for a new one, so a spray from many addresses cannot lock
/// out a client that talks.
pub const MAX_UDP_CLIENTS: usize = 1024;

/// Counts of what each source address holds, with a cap.
#[derive(Debug, Default)]
struct PerSource(std::collections::HashMap<IpAddr, usize>);

impl PerSource {
    /// Takes a slot for `ip`; `false` if it holds [`MAX_PER_SOURCE`].
    fn take(&mut self, ip: IpAddr) -> bool {
        let n = self.0.entry(ip).or_default();
        if *n >= MAX_PER_SOURCE {
            return false;
        }
        *n += 1;
        true
    }

    fn release(&mut self, ip: IpAddr) {
        if let std::collections::hash_map::Entry::Occupied(mut e) = self.0.entry(ip) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }
}

async fn relay_tcp(listener: TcpListener, vip: Ipv4Addr, port: u16, stop: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_TCP_CONNECTIONS));
    let sources = Arc::new(std::sync::Mutex::new(PerSource::default()));
    loop {
        let (mut client, from) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        // Over a bound, the connection is closed at once (dropped).
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%from, "external connection refused: listener at its limit");
            continue;
        };
        if !lock(&sources).take(from.ip()) {
            tracing::debug!(%from, "external connection refused: source at its limit");
            continue;
        }
        let (stop, sources) = (stop.clone(), sources.clone());
        tokio::spawn(async move {
            let _slot = slot;
            if let Ok(Ok(mut upstream)) =
                tokio::time::timeout(Duration::from_secs(10), TcpStream::connect((vip, port))).await
            {
                tokio::select! {
                    () = stop.cancelled() => {}
                    _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                }
            } else {
                tracing::debug!(%from, %vip, "external connection refused by the VIP");
            }
            lock(&sources).release(from.ip());
        });
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One UDP client of a listener: its socket towards the VIP.
struct UdpClient {
    up: Arc<UdpSocket>,
    stop: CancellationToken,
}

/// Relays UDP: one socket towards the VIP per client address (so replies
/// find their way back), at most [`MAX_UDP_CLIENTS`], each idle for
/// [`UDP_IDLE`] at most. Memory is bounded: one receive buffer for the
/// listener and one shared by every client's reply task (they read with
/// `try_recv` under a lock, never holding it across an await).
async fn relay_udp(sock: UdpSocket, vip: Ipv4Addr, port: u16, stop: CancellationToken) {
    let sock = Arc::new(sock);
    let mut clients: lru::LruCache<SocketAddr, UdpClient> = lru::LruCache::new(
        std::num::NonZeroUsize::new(MAX_UDP_CLIENTS).expect("MAX_UDP_CLIENTS is not zero"),
    );
    let mut sources = PerSource::default();
    let mut buf = vec![0u8; 65_535];
    let reply_buf = Arc::new(std::sync::Mutex::new(vec![0u8; 65_535]));
    let (gone_tx, mut gone_rx) = tokio::sync::mpsc::unbounded_channel::<SocketAddr>();
    loop {
        let (n, from) = tokio::select! {
            () = stop.cancelled() => return,
            Some(addr) = gone_rx.recv() => {
                if let Some(c) = clients.pop(&addr) {
                    c.stop.cancel();
                    sources.release(addr.ip());
                }
                continue;
            }
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        if let Some(c) = clients.get(&from) {
            let _ = c.up.try_send(&buf[..n]);
            continue;
        }
        if !sources.take(from.ip()) {
            continue;
        }
        if clients.len() >= MAX_UDP_CLIENTS
            && let Some((idle, c)) = clients.pop_lru()
        {
            c.stop.cancel();
            sources.release(idle.ip());
        }
        let Ok(up) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await else {
            sources.release(from.ip());
            continue;
        };
        if up.connect((vip, port)).await.is_err() {
            sources.release(from.ip());
            continue;
        }
        let up = Arc::new(up);
        let child = stop.child_token();
        let (down, up2, gone, c, rbuf) = (
            sock.clone(),
            up.clone(),
            gone_tx.clone(),
            child.clone(),
            reply_buf.clone(),
        );
        // Replies from the VIP go back to this client until it idles out.
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = c.cancelled() => return,
                    r = tokio::time::timeout(UDP_IDLE, up2.readable()) => {
                        if !matches!(r, Ok(Ok(()))) {
                            break;
                        }
                        let mut b = lock(&rbuf);
                        match up2.try_recv(&mut b) {
                            Ok(n) => {
                                let _ = down.try_send_to(&b[..n], from);
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                            Err(_) => break,
                        }
                    }
                }
            }
            let _ = gone.send(from);
        });
        // Awaited, not `try_send`: a socket this new has no readiness
        // from the reactor yet, and `try_send` would drop the datagram.
        let _ = up.send(&buf[..n]).await;
        clients.put(from, UdpClient { up, stop: child });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_proto::v1::{ObjectMeta, Service, ServicePort, ServiceSpec, ServiceStatus};

    fn svc(name: &str, ty: ServiceType, clusters: &[&str], vip: &str) -> Service {
        Service {
            metadata: Some(ObjectMeta {
                name: name.into(),
                namespace: "default".into(),
                ..Default::default()
            }),
            spec: Some(ServiceSpec {
                r#type: ty as i32,
                clusters: clusters.iter().map(|c| c.to_string()).collect(),
                ports: vec![
                    ServicePort {
                        port: 80,
                        target_port: 8080,
                        ..Default::default()
                    },
                    ServicePort {
                        port: 53,
                        protocol: Protocol::Udp as i32,
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }),
            status: Some(ServiceStatus {
                cluster_ip: vip.into(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn only_external_types_exposed_here_get_listeners() {
        let mut s = NetState {
            cluster: "a".into(),
            ..Default::default()
        };
        for (i, (ty, clusters)) in [
            (ServiceType::NodePort, vec![]),
            (ServiceType::LoadBalancer, vec!["b"]),
            (ServiceType::ClusterIp, vec![]),
        ]
        .into_iter()
        .enumerate()
        {
            let name = format!("s{i}");
            s.services.insert(
                ("default".into(), name.clone()),
                svc(&name, ty, &clusters, &format!("100.65.0.{}", i + 1)),
            );
        }
        let d = desired(&s);
        assert_eq!(
            d,
            vec![
                Listener {
                    udp: false,
                    port: 80,
                    vip: Ipv4Addr::new(100, 65, 0, 1)
                },
                Listener {
                    udp: true,
                    port: 53,
                    vip: Ipv4Addr::new(100, 65, 0, 1)
                },
            ]
        );
    }
}
