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

async fn relay_tcp(listener: TcpListener, vip: Ipv4Addr, port: u16, stop: CancellationToken) {
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
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut upstream = match TcpStream::connect((vip, port)).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(%from, %vip, error = %e, "external connection refused by the VIP");
                    return;
                }
            };
            tokio::select! {
                () = stop.cancelled() => {}
                _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
            }
        });
    }
}

async fn relay_udp(sock: UdpSocket, vip: Ipv4Addr, port: u16, stop: CancellationToken) {
    let sock = Arc::new(sock);
    let mut clients: BTreeMap<SocketAddr, (Arc<UdpSocket>, CancellationToken)> = BTreeMap::new();
    let mut buf = vec![0u8; 65_535];
    let (gone_tx, mut gone_rx) = tokio::sync::mpsc::unbounded_channel::<SocketAddr>();
    loop {
        let (n, from) = tokio::select! {
            () = stop.cancelled() => return,
            Some(addr) = gone_rx.recv() => {
                clients.remove(&addr);
                continue;
            }
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        let up = match clients.entry(from) {
            std::collections::btree_map::Entry::Occupied(e) => e.get().0.clone(),
            std::collections::btree_map::Entry::Vacant(slot) => {
                let Ok(up) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).await else {
                    continue;
                };
                if up.connect((vip, port)).await.is_err() {
                    continue;
                }
                let up = Arc::new(up);
                let child = stop.child_token();
                let (down, up2, gone, c) =
                    (sock.clone(), up.clone(), gone_tx.clone(), child.clone());
                // Replies from the VIP go back to this client until it idles out.
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_535];
                    loop {
                        tokio::select! {
                            () = c.cancelled() => break,
                            r = tokio::time::timeout(UDP_IDLE, up2.recv(&mut buf)) => match r {
                                Ok(Ok(n)) => {
                                    let _ = down.send_to(&buf[..n], from).await;
                                }
                                _ => break,
                            },
                        }
                    }
                    let _ = gone.send(from);
                });
                slot.insert((up.clone(), child));
                up
            }
        };
        let _ = up.send(&buf[..n]).await;
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
