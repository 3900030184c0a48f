//! Test fixtures for the balancer: a three-cluster mesh seen from `c1`,
//! services and endpoints, packets built and checked with `etherparse`
//! (an implementation independent of ours).

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Instant;

use etherparse::{NetHeaders, PacketBuilder, PacketHeaders, TransportHeader};
use skymesh_proto::v1::{
    EndpointAddress, Endpoints, EndpointsClusterStatus, EndpointsStatus, ObjectMeta, Peer,
    Protocol, Service, ServicePort, ServiceSpec, ServiceStatus, ServiceType, SessionAffinity,
    TrafficPolicy,
};

use super::{Health, Lb, LbConfig, LbTable, Verdict};
use crate::state::NetState;

pub const VIP: Ipv4Addr = Ipv4Addr::new(100, 65, 0, 10);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 100);

pub fn cfg() -> LbConfig {
    LbConfig {
        cluster: "c1".into(),
        service_cidr: "100.65.0.0/16".parse().unwrap(),
        hash_key: [0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210],
        limits: super::FlowLimits::default(),
        gateway_ip: None,
    }
}

pub fn meta(name: &str) -> Option<ObjectMeta> {
    Some(ObjectMeta {
        name: name.into(),
        namespace: "default".into(),
        ..Default::default()
    })
}

/// A ClusterIP service `name` at `vip`: ports `(port, target, protocol)`.
pub fn service(name: &str, vip: Ipv4Addr, ports: &[(u32, u32, Protocol)]) -> Service {
    Service {
        metadata: meta(name),
        spec: Some(ServiceSpec {
            r#type: ServiceType::ClusterIp as i32,
            ports: ports
                .iter()
                .map(|(p, t, proto)| ServicePort {
                    name: String::new(),
                    port: *p,
                    target_port: *t,
                    protocol: *proto as i32,
                })
                .collect(),
            ..Default::default()
        }),
        status: Some(ServiceStatus {
            cluster_ip: vip.to_string(),
            external_ips: vec![],
        }),
    }
}

pub fn with_policy(mut s: Service, p: TrafficPolicy) -> Service {
    if let Some(spec) = s.spec.as_mut() {
        spec.traffic_policy = p as i32;
    }
    s
}

pub fn with_affinity(mut s: Service, timeout_s: u32) -> Service {
    if let Some(spec) = s.spec.as_mut() {
        spec.session_affinity = SessionAffinity::ClientIp as i32;
        spec.affinity_timeout_s = timeout_s;
    }
    s
}

/// One address: `(ip, job, ready)`.
pub type Addr<'a> = (&'a str, &'a str, bool);

/// Endpoints `name`: per cluster `(cluster, exposed, addresses)`.
pub fn endpoints(name: &str, clusters: &[(&str, bool, &[Addr<'_>])]) -> Endpoints {
    Endpoints {
        metadata: meta(name),
        spec: None,
        status: Some(EndpointsStatus {
            clusters: clusters
                .iter()
                .map(|(c, exposed, addrs)| EndpointsClusterStatus {
                    cluster: (*c).into(),
                    exposed: *exposed,
                    addresses: addrs
                        .iter()
                        .map(|(ip, job, ready)| EndpointAddress {
                            ip: (*ip).into(),
                            ports: vec![],
                            job: (*job).into(),
                            ready: *ready,
                        })
                        .collect(),
                })
                .collect(),
        }),
    }
}

/// The mesh seen from c1 (10.1.0.0/16): peers c2 (10.2/16), c3 (10.3/16).
pub fn mesh() -> NetState {
    let mut s = NetState {
        cluster: "c1".into(),
        workload_cidrs: vec!["10.1.0.0/16".into()],
        service_cidr: "100.65.0.0/16".into(),
        ..Default::default()
    };
    for (i, c) in [(2, "c2"), (3, "c3")] {
        s.peers.insert(
            c.into(),
            Peer {
                cluster: c.into(),
                allowed_ips: vec![format!("100.64.0.{i}/32"), format!("10.{i}.0.0/16")],
                ..Default::default()
            },
        );
    }
    s.reparsed()
}

pub fn add(s: &mut NetState, svc: Service, eps: Option<Endpoints>) {
    let key = (
        "default".to_string(),
        svc.metadata.as_ref().unwrap().name.clone(),
    );
    s.services.insert(key.clone(), svc);
    if let Some(e) = eps {
        s.endpoints.insert(key, e);
    }
}

/// Six ready backends, two per cluster: `10.{c}.0.1{1,2}` jobs `web-{c}{a,b}`.
pub const SIX: [(&str, bool, &[Addr<'static>]); 3] = [
    (
        "c1",
        true,
        &[("10.1.0.11", "web-1a", true), ("10.1.0.12", "web-1b", true)],
    ),
    (
        "c2",
        true,
        &[("10.2.0.11", "web-2a", true), ("10.2.0.12", "web-2b", true)],
    ),
    (
        "c3",
        true,
        &[("10.3.0.11", "web-3a", true), ("10.3.0.12", "web-3b", true)],
    ),
];

/// A balancer over `state` with `health`.
pub fn lb(state: &NetState, health: &Health) -> Lb {
    let mut lb = Lb::new(cfg());
    lb.set_table(Arc::new(LbTable::build(state, &cfg(), health)));
    lb
}

pub fn sa(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

/// A TCP segment; `flags` from `packet::TCP_*`.
pub fn tcp(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64).tcp(
        src.port(),
        dst.port(),
        seq,
        65_000,
    );
    if flags & super::packet::TCP_SYN != 0 {
        b = b.syn();
    }
    if flags & super::packet::TCP_FIN != 0 {
        b = b.fin();
    }
    if flags & super::packet::TCP_RST != 0 {
        b = b.rst();
    }
    if flags & super::packet::TCP_ACK != 0 {
        b = b.ack(ack);
    }
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    v
}

pub fn syn(src: SocketAddrV4, dst: SocketAddrV4) -> Vec<u8> {
    tcp(src, dst, super::packet::TCP_SYN, 1000, 0, &[])
}

pub fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let b =
        PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64).udp(src.port(), dst.port());
    let mut v = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut v, payload).unwrap();
    v
}

pub fn ping(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let b = PacketBuilder::ipv4(src.octets(), dst.octets(), 64).icmpv4_echo_request(id, seq);
    let mut v = Vec::with_capacity(b.size(data.len()));
    b.write(&mut v, data).unwrap();
    v
}

/// What a checked packet says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub transport: TransportHeader,
    pub payload: Vec<u8>,
}

/// Parses `p` with etherparse and asserts the IPv4 header checksum and the
/// transport checksum (UDP: unless zero) are right. Ports are 0 for ICMP.
pub fn checked(p: &[u8]) -> Seen {
    let h = PacketHeaders::from_ip_slice(p).expect("parses");
    let Some(NetHeaders::Ipv4(ip, _)) = h.net.clone() else {
        panic!("not IPv4")
    };
    assert_eq!(
        ip.header_checksum,
        ip.calc_header_checksum(),
        "IPv4 header checksum"
    );
    let payload = h.payload.slice().to_vec();
    let t = h.transport.clone().expect("transport header");
    let (sp, dp) = match &t {
        TransportHeader::Tcp(t) => {
            assert_eq!(
                t.checksum,
                t.calc_checksum_ipv4(&ip, &payload).unwrap(),
                "TCP checksum"
            );
            (t.source_port, t.destination_port)
        }
        TransportHeader::Udp(u) => {
            if u.checksum != 0 {
                assert_eq!(
                    u.checksum,
                    u.calc_checksum_ipv4(&ip, &payload).unwrap(),
                    "UDP checksum"
                );
            }
            (u.source_port, u.destination_port)
        }
        TransportHeader::Icmpv4(i) => {
            assert_eq!(
                i.checksum,
                i.icmp_type.calc_checksum(&payload),
                "ICMP checksum"
            );
            (0, 0)
        }
        TransportHeader::Icmpv6(_) => panic!("ICMPv6 in IPv4"),
    };
    Seen {
        src: sa(ip.source.into(), sp),
        dst: sa(ip.destination.into(), dp),
        transport: t,
        payload,
    }
}

/// Sends `p` from the TUN; returns the verdict and the packet (or reply).
pub fn out(lb: &mut Lb, mut p: Vec<u8>, now: Instant) -> (Verdict, Vec<u8>) {
    let mut reply = Vec::new();
    let v = lb.outbound(&mut p, &mut reply, now);
    if v == Verdict::Reply {
        (v, reply)
    } else {
        (v, p)
    }
}

/// Sends `p` in from a tunnel.
pub fn inb(lb: &mut Lb, mut p: Vec<u8>, now: Instant) -> (Verdict, Vec<u8>) {
    let mut reply = Vec::new();
    let v = lb.inbound(&mut p, &mut reply, now);
    if v == Verdict::Reply {
        (v, reply)
    } else {
        (v, p)
    }
}

/// The destination IP of a packet.
pub fn dst_ip(p: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(p[16], p[17], p[18], p[19])
}
