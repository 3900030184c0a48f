//! Two nodes wired together in memory: handshake, data both ways,
//! cryptokey routing drops, garbage, live peer changes.

use super::*;
use crate::core::batch::Datagrams;

/// What a node produced, as these tests compare it.
#[derive(Debug, PartialEq, Eq)]
enum Transmit {
    /// A UDP datagram to a peer.
    Network(SocketAddr, Vec<u8>),
    /// A decrypted IP packet for the TUN interface.
    Tunnel(Vec<u8>),
}

fn drain(d: &mut Datagrams, out: &mut Vec<Transmit>) {
    out.extend(
        d.datagrams()
            .map(|(dst, b)| Transmit::Network(dst, b.to_vec())),
    );
    d.clear();
}

/// The node's batch API, collected into [`Transmit`]s.
trait Collect {
    fn tun_t(&mut self, packet: &[u8], out: &mut Vec<Transmit>);
    fn net_t(&mut self, src: SocketAddr, datagram: &[u8], out: &mut Vec<Transmit>);
}

impl Collect for Node {
    fn tun_t(&mut self, packet: &[u8], out: &mut Vec<Transmit>) {
        let mut d = Datagrams::new(1 << 16, 64);
        self.handle_tun(packet, &mut d);
        drain(&mut d, out);
    }

    fn net_t(&mut self, src: SocketAddr, datagram: &[u8], out: &mut Vec<Transmit>) {
        let mut d = Datagrams::new(1 << 16, 64);
        let mut tun = vec![0u8; datagram.len()];
        let n = self.handle_network(src, datagram, &mut d, &mut tun);
        drain(&mut d, out);
        if let Some(n) = n {
            out.push(Transmit::Tunnel(tun[..n].to_vec()));
        }
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> Ipv4Net {
    s.parse().unwrap()
}

/// An IPv4 packet with the given source and destination (protocol 253,
/// "experimental", payload of `len` bytes).
pub(crate) fn packet(src: [u8; 4], dst: [u8; 4], len: usize) -> Vec<u8> {
    let total = 20 + len;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 253;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p
}

struct Pair {
    a: Node,
    b: Node,
}

const A_ADDR: &str = "198.51.100.11:51820";
const B_ADDR: &str = "198.51.100.12:51820";

fn pair() -> Pair {
    let mut a = Node::new([1u8; 32]);
    let mut b = Node::new([2u8; 32]);
    let psk = [7u8; 32];
    a.set_peers(vec![PeerConfig {
        name: "b".into(),
        public_key: b.public_key(),
        preshared_key: psk,
        endpoint: Some(addr(B_ADDR)),
        allowed_ips: vec![net("100.64.0.2/32"), net("10.2.0.0/16")],
    }]);
    b.set_peers(vec![PeerConfig {
        name: "a".into(),
        public_key: a.public_key(),
        preshared_key: psk,
        endpoint: Some(addr(A_ADDR)),
        allowed_ips: vec![net("100.64.0.1/32"), net("10.1.0.0/16")],
    }]);
    a.set_local(vec![net("100.64.0.1/32"), net("10.1.0.0/16")]);
    b.set_local(vec![net("100.64.0.2/32"), net("10.2.0.0/16")]);
    Pair { a, b }
}

/// Delivers every network transmit to the other node until quiet; returns
/// what each node wrote to its TUN.
fn pump(
    p: &mut Pair,
    mut from_a: Vec<Transmit>,
    mut from_b: Vec<Transmit>,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let (mut tun_a, mut tun_b) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        if from_a.is_empty() && from_b.is_empty() {
            break;
        }
        let mut next_a = Vec::new();
        let mut next_b = Vec::new();
        for t in from_a.drain(..) {
            match t {
                Transmit::Network(dst, d) => {
                    assert_eq!(dst, addr(B_ADDR));
                    p.b.net_t(addr(A_ADDR), &d, &mut next_b);
                }
                Transmit::Tunnel(pk) => tun_a.push(pk),
            }
        }
        for t in from_b.drain(..) {
            match t {
                Transmit::Network(dst, d) => {
                    assert_eq!(dst, addr(A_ADDR));
                    p.a.net_t(addr(B_ADDR), &d, &mut next_a);
                }
                Transmit::Tunnel(pk) => tun_b.push(pk),
            }
        }
        // Tunnel outputs produced while handling are collected next round.
        from_a = next_a;
        from_b = next_b;
    }
    (tun_a, tun_b)
}

fn established() -> Pair {
    let mut p = pair();
    let mut out = Vec::new();
    let first = packet([10, 1, 0, 11], [10, 2, 0, 11], 100);
    p.a.tun_t(&first, &mut out);
    let (_, tun_b) = pump(&mut p, out, Vec::new());
    assert_eq!(
        tun_b,
        vec![first],
        "the packet queued during the handshake arrives"
    );
    p
}

#[test]
fn handshake_and_data_both_ways() {
    let mut p = established();
    let mut out = Vec::new();
    let reply = packet([10, 2, 0, 11], [10, 1, 0, 11], 1400);
    p.b.tun_t(&reply, &mut out);
    let (tun_a, _) = pump(&mut p, Vec::new(), out);
    assert_eq!(tun_a, vec![reply]);
    let a = &p.a.peers()[0];
    assert!(a.last_handshake.is_some());
    assert_eq!(a.rx_packets, 1);
    assert_eq!(a.tx_packets, 1);
    assert!(a.handshakes >= 1);
    assert!(p.a.drops().is_empty(), "{:?}", p.a.drops());
}

#[test]
fn inner_source_outside_allowed_ips_is_dropped_and_counted() {
    let mut p = established();
    // b's peer entry for a allows 10.1.0.0/16; a sends a packet claiming to
    // come from 10.3.0.1 (a's own routing would let it out: dst is b's).
    let spoofed = packet([10, 3, 0, 1], [10, 2, 0, 11], 60);
    let mut out = Vec::new();
    p.a.tun_t(&spoofed, &mut out);
    let (_, tun_b) = pump(&mut p, out, Vec::new());
    assert!(tun_b.is_empty(), "spoofed packet not delivered");
    assert_eq!(p.b.drops().get(&DropReason::SourceNotAllowed), Some(&1));
}

#[test]
fn inner_destination_outside_the_local_networks_is_dropped_and_counted() {
    let mut p = established();
    // a believes b owns 192.0.2.0/24 (its allowed IPs say so) and routes a
    // packet there; b owns only its overlay IP and 10.2.0.0/16, so it must
    // not forward it anywhere (no transit through a gateway).
    let mut cfg = p.a.peers()[0].clone();
    cfg.allowed_ips.push(net("192.0.2.0/24"));
    p.a.set_peers(vec![PeerConfig {
        name: cfg.name,
        public_key: cfg.public_key,
        preshared_key: cfg.preshared_key,
        endpoint: cfg.endpoint,
        allowed_ips: cfg.allowed_ips,
    }]);
    let mut out = Vec::new();
    p.a.tun_t(&packet([10, 1, 0, 11], [192, 0, 2, 1], 60), &mut out);
    p.a.tun_t(&packet([10, 1, 0, 11], [100, 64, 0, 2], 60), &mut out);
    let (_, tun_b) = pump(&mut p, out, Vec::new());
    assert_eq!(tun_b.len(), 1, "only the packet to b's overlay IP arrives");
    assert_eq!(ipv4_dst(&tun_b[0]), Some(Ipv4Addr::new(100, 64, 0, 2)));
    assert_eq!(
        p.b.drops().get(&DropReason::DestinationNotAllowed),
        Some(&1)
    );
}

#[test]
fn garbage_and_forged_datagrams_are_counted_and_harmless() {
    let mut p = established();
    let mut out = Vec::new();
    p.b.net_t(addr(A_ADDR), b"hello, not wireguard", &mut out);
    // A data message with a valid-looking header but a bad tag.
    let mut forged = vec![0u8; 64];
    forged[0] = 4;
    forged[4..8].copy_from_slice(&(1u32 << 8).to_le_bytes());
    p.b.net_t(addr(A_ADDR), &forged, &mut out);
    // A handshake initiation from a stranger's key.
    let mut stranger = Node::new([9u8; 32]);
    stranger.set_peers(vec![PeerConfig {
        name: "b".into(),
        public_key: p.b.public_key(),
        preshared_key: [0; 32],
        endpoint: Some(addr(B_ADDR)),
        allowed_ips: vec![net("10.2.0.0/16")],
    }]);
    let mut init = Vec::new();
    stranger.tun_t(&packet([10, 9, 0, 1], [10, 2, 0, 1], 10), &mut init);
    for t in init {
        if let Transmit::Network(_, d) = t {
            p.b.net_t(addr("198.51.100.99:1"), &d, &mut out);
        }
    }
    assert!(out.is_empty(), "nothing answered: {out:?}");
    let d = p.b.drops();
    assert_eq!(d.get(&DropReason::Garbage), Some(&1));
    assert_eq!(d.get(&DropReason::AuthFailed), Some(&1));
    assert_eq!(d.get(&DropReason::UnknownPeer), Some(&1));
    // The established tunnel still works.
    let mut out = Vec::new();
    let pkt = packet([10, 1, 0, 11], [10, 2, 0, 12], 10);
    p.a.tun_t(&pkt, &mut out);
    let (_, tun_b) = pump(&mut p, out, Vec::new());
    assert_eq!(tun_b, vec![pkt]);
}

#[test]
fn unrouted_and_non_ipv4_packets_are_dropped() {
    let mut p = pair();
    let mut out = Vec::new();
    p.a.tun_t(&packet([10, 1, 0, 1], [8, 8, 8, 8], 10), &mut out);
    p.a.tun_t(&[0x60; 40], &mut out);
    assert!(out.is_empty());
    assert_eq!(p.a.drops().get(&DropReason::NoRoute), Some(&1));
    assert_eq!(p.a.drops().get(&DropReason::NotIpv4), Some(&1));
}

#[test]
fn peer_changes_keep_unchanged_sessions() {
    let mut p = established();
    let b = p.a.peers()[0].clone();
    let third = Node::new([3u8; 32]);
    let cfg_b = PeerConfig {
        name: "b".into(),
        public_key: b.public_key,
        preshared_key: b.preshared_key,
        endpoint: Some(addr(B_ADDR)),
        allowed_ips: b.allowed_ips.clone(),
    };
    let cfg_c = PeerConfig {
        name: "c".into(),
        public_key: third.public_key(),
        preshared_key: [5; 32],
        endpoint: Some(addr("198.51.100.13:51820")),
        allowed_ips: vec![net("10.3.0.0/16")],
    };
    let diff = p.a.set_peers(vec![cfg_b.clone(), cfg_c.clone()]);
    assert_eq!(diff.added, vec!["c"]);
    assert!(diff.removed.is_empty() && diff.rekeyed.is_empty() && diff.updated.is_empty());
    assert_eq!(p.a.route("10.3.1.1".parse().unwrap()), Some("c"));
    // b's session survived: data flows without a new handshake.
    let mut out = Vec::new();
    p.a.tun_t(&packet([10, 1, 0, 11], [10, 2, 0, 11], 10), &mut out);
    assert_eq!(out.len(), 1);
    let Transmit::Network(_, d) = &out[0] else {
        panic!()
    };
    assert_eq!(d[0], 4, "a data message, not a handshake initiation");
    // Removing c, rekeying b.
    let diff = p.a.set_peers(vec![PeerConfig {
        preshared_key: [8; 32],
        ..cfg_b
    }]);
    assert_eq!(diff.removed, vec!["c"]);
    assert_eq!(diff.rekeyed, vec!["b"]);
    assert_eq!(p.a.route("10.3.1.1".parse().unwrap()), None);
}

const ATTACKER: &str = "203.0.113.66:4444";

/// The network datagrams in `out`, with their destinations.
fn datagrams(out: Vec<Transmit>) -> Vec<(SocketAddr, Vec<u8>)> {
    out.into_iter()
        .filter_map(|t| match t {
            Transmit::Network(a, d) => Some((a, d)),
            Transmit::Tunnel(_) => None,
        })
        .collect()
}

/// The WireGuard message type of a datagram (1 initiation, 2 response,
/// 3 cookie reply, 4 data).
fn msg_type(d: &[u8]) -> u8 {
    d[0]
}

fn endpoint_of(n: &Node) -> Option<SocketAddr> {
    n.peers()[0].endpoint
}

/// A pair whose handshake is done step by step, keeping a's initiation, b's
/// response and a's first data message.
fn established_capturing() -> (Pair, Vec<u8>, Vec<u8>, Vec<u8>) {
    let mut p = pair();
    let mut out = Vec::new();
    p.a.tun_t(&packet([10, 1, 0, 11], [10, 2, 0, 11], 100), &mut out);
    let [(_, init)] = <[_; 1]>::try_from(datagrams(out)).unwrap();
    assert_eq!(msg_type(&init), 1);
    let mut out = Vec::new();
    p.b.net_t(addr(A_ADDR), &init, &mut out);
    let [(to, resp)] = <[_; 1]>::try_from(datagrams(out)).unwrap();
    assert_eq!((to, msg_type(&resp)), (addr(A_ADDR), 2));
    let mut out = Vec::new();
    p.a.net_t(addr(B_ADDR), &resp, &mut out);
    let sent = datagrams(out);
    assert!(sent.iter().all(|(_, d)| msg_type(d) == 4));
    let data = sent.last().unwrap().1.clone();
    let mut tun = Vec::new();
    for (_, d) in &sent {
        p.b.net_t(addr(A_ADDR), d, &mut tun);
    }
    assert!(tun.contains(&Transmit::Tunnel(packet(
        [10, 1, 0, 11],
        [10, 2, 0, 11],
        100
    ))));
    (p, init, resp, data)
}

#[test]
fn authenticated_data_from_a_new_address_moves_the_endpoint() {
    let mut p = established();
    assert_eq!(endpoint_of(&p.b), Some(addr(A_ADDR)));
    let mut out = Vec::new();
    p.a.tun_t(&packet([10, 1, 0, 11], [10, 2, 0, 11], 10), &mut out);
    let [(_, data)] = <[_; 1]>::try_from(datagrams(out)).unwrap();
    let roamed = addr("198.51.100.77:40000");
    let mut out = Vec::new();
    p.b.net_t(roamed, &data, &mut out);
    assert_eq!(out.len(), 1, "delivered: {out:?}");
    assert_eq!(endpoint_of(&p.b), Some(roamed), "the peer roamed");
}

#[test]
fn replayed_and_forged_messages_from_elsewhere_never_move_the_endpoint() {
    let (mut p, init, resp, data) = established_capturing();
    let mut out = Vec::new();
    // A captured initiation replayed (its timestamp is not newer), a
    // response to a handshake b is not doing, a replayed data message.
    p.b.net_t(addr(ATTACKER), &init, &mut out);
    p.b.net_t(addr(ATTACKER), &resp, &mut out);
    p.b.net_t(addr(ATTACKER), &data, &mut out);
    // A data message with b's receiver index but a bad tag.
    let mut forged = data.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    p.b.net_t(addr(ATTACKER), &forged, &mut out);
    assert!(datagrams(out).is_empty(), "nothing answered the attacker");
    assert_eq!(endpoint_of(&p.b), Some(addr(A_ADDR)));
    assert_eq!(p.b.drops().get(&DropReason::AuthFailed), Some(&4));
    // The same for a: b's response replayed, at a that is not waiting.
    let mut out = Vec::new();
    p.a.net_t(addr(ATTACKER), &resp, &mut out);
    assert_eq!(endpoint_of(&p.a), Some(addr(B_ADDR)));
}

#[test]
fn a_cookie_reply_from_elsewhere_never_moves_the_endpoint() {
    let mut p = pair();
    // b starts a handshake with a; a is flooded over its limit, so it
    // answers b's initiation with a cookie reply, which an attacker
    // relays to b from its own address.
    let mut out = Vec::new();
    p.b.tun_t(&packet([10, 2, 0, 11], [10, 1, 0, 11], 10), &mut out);
    let [(_, init)] = <[_; 1]>::try_from(datagrams(out)).unwrap();
    let mut flood = Vec::new();
    for _ in 0..=HANDSHAKE_RATE_LIMIT {
        p.a.net_t(addr(ATTACKER), &init, &mut flood);
    }
    let mut out = Vec::new();
    p.a.net_t(addr(B_ADDR), &init, &mut out);
    let [(to, cookie)] = <[_; 1]>::try_from(datagrams(out)).unwrap();
    assert_eq!((to, msg_type(&cookie)), (addr(B_ADDR), 3), "a cookie reply");
    let mut out = Vec::new();
    p.b.net_t(addr(ATTACKER), &cookie, &mut out);
    assert!(out.is_empty());
    assert!(
        !p.b.drops().contains_key(&DropReason::AuthFailed),
        "b took the cookie: {:?}",
        p.b.drops()
    );
    assert_eq!(endpoint_of(&p.b), Some(addr(A_ADDR)));
}

#[test]
fn under_handshake_load_the_endpoint_stays_and_the_tunnel_works() {
    let (mut p, init, resp, _) = established_capturing();
    // A flood of initiations with a valid MAC1 (replays) takes b over its
    // limit; none is answered, none moves the endpoint.
    let flooder = addr("203.0.113.9:9");
    let mut out = Vec::new();
    for _ in 0..HANDSHAKE_RATE_LIMIT + 20 {
        p.b.net_t(flooder, &init, &mut out);
    }
    assert!(
        datagrams(out)
            .iter()
            .all(|(to, d)| *to == flooder && msg_type(d) == 3),
        "only cookie replies go to the flooder"
    );
    // b counted the handshake's initiation: 99 more fit, 21 are refused.
    assert_eq!(p.b.drops().get(&DropReason::UnderLoad), Some(&21));
    assert_eq!(endpoint_of(&p.b), Some(addr(A_ADDR)));
    // Over the limit, an initiation from elsewhere gets a cookie reply
    // there and goes no further.
    let mut out = Vec::new();
    p.b.net_t(addr(ATTACKER), &init, &mut out);
    let [(to, d)] = <[_; 1]>::try_from(datagrams(out)).unwrap();
    assert_eq!((to, msg_type(&d)), (addr(ATTACKER), 3));
    assert_eq!(endpoint_of(&p.b), Some(addr(A_ADDR)));
    // The same for handshake responses, at a (b's response has a valid
    // MAC1 for a): replayed, they take a over its limit; what is refused is
    // answered with a cookie reply, which must not count as the peer
    // speaking from there.
    let mut out = Vec::new();
    for _ in 0..HANDSHAKE_RATE_LIMIT + 20 {
        p.a.net_t(flooder, &resp, &mut out);
        assert_eq!(endpoint_of(&p.a), Some(addr(B_ADDR)));
    }
    assert!(
        datagrams(out)
            .iter()
            .all(|(to, d)| *to == flooder && msg_type(d) == 3)
    );
    assert_eq!(p.a.drops().get(&DropReason::UnderLoad), Some(&21));
    let mut out = Vec::new();
    p.a.net_t(addr(ATTACKER), &resp, &mut out);
    let [(to, d)] = <[_; 1]>::try_from(datagrams(out)).unwrap();
    assert_eq!((to, msg_type(&d)), (addr(ATTACKER), 3));
    assert_eq!(endpoint_of(&p.a), Some(addr(B_ADDR)));
    // Data is not rate limited: the tunnel still carries traffic.
    let mut out = Vec::new();
    let pkt = packet([10, 1, 0, 11], [10, 2, 0, 12], 10);
    p.a.tun_t(&pkt, &mut out);
    let (_, tun_b) = pump(&mut p, out, Vec::new());
    assert_eq!(tun_b, vec![pkt]);
    let mut out = Vec::new();
    let pkt = packet([10, 2, 0, 12], [10, 1, 0, 11], 10);
    p.b.tun_t(&pkt, &mut out);
    let (tun_a, _) = pump(&mut p, Vec::new(), out);
    assert_eq!(tun_a, vec![pkt]);
    assert_eq!(endpoint_of(&p.b), Some(addr(A_ADDR)));
    assert_eq!(endpoint_of(&p.a), Some(addr(B_ADDR)));
}

#[test]
fn an_initiation_counts_once_against_the_limiter() {
    let (mut p, init, _, _) = established_capturing();
    // The handshake above counted one initiation (and one response at a).
    // HANDSHAKE_RATE_LIMIT - 1 more fit in the window; counted twice, the
    // limit would be reached half way.
    let mut out = Vec::new();
    for _ in 1..HANDSHAKE_RATE_LIMIT {
        p.b.net_t(addr(ATTACKER), &init, &mut out);
    }
    assert!(
        datagrams(out).is_empty(),
        "no cookie reply within the limit"
    );
    assert_eq!(p.b.drops().get(&DropReason::UnderLoad), None);
    let mut out = Vec::new();
    p.b.net_t(addr(ATTACKER), &init, &mut out);
    assert_eq!(p.b.drops().get(&DropReason::UnderLoad), Some(&1));
    let [(_, d)] = <[_; 1]>::try_from(datagrams(out)).unwrap();
    assert_eq!(msg_type(&d), 3, "the next one gets a cookie reply");
    // A new window.
    std::thread::sleep(Duration::from_millis(1010));
    p.b.reset_rate_limiter();
    let mut out = Vec::new();
    p.b.net_t(addr(ATTACKER), &init, &mut out);
    assert!(datagrams(out).is_empty());
    assert_eq!(p.b.drops().get(&DropReason::UnderLoad), Some(&1));
}
