//! Two engines against each other in memory, no root: handshake, bulk
//! transfers both ways byte for byte, a VIP flow to a replica behind the
//! other gateway and its replies translated back.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use skymesh_proto::v1::{Peer, Protocol, TrafficPolicy};

use super::*;
use crate::core::batch::{Datagrams, Packets};
use crate::core::lb::packet::{TCP_ACK, TCP_SYN};
use crate::core::lb::testutil::{self, Seen, checked, sa, tcp};
use crate::core::lb::{Health, Lb, LbConfig, LbTable};
use crate::core::node::DATA_HEADER;

pub(crate) const A_ADDR: &str = "198.51.100.11:51820";
pub(crate) const B_ADDR: &str = "198.51.100.12:51820";

fn b64(k: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// The netmap of cluster `me` (`1` or `2`) with the other as its peer, and
/// a service `web` whose one replica runs in c2.
fn state(me: u8, peer_key: [u8; 32]) -> NetState {
    let other = 3 - me;
    let mut s = NetState {
        cluster: format!("c{me}"),
        overlay_ip: format!("100.64.0.{me}"),
        workload_cidrs: vec![format!("10.{me}.0.0/16")],
        service_cidr: "100.65.0.0/16".into(),
        ..Default::default()
    };
    s.peers.insert(
        format!("c{other}"),
        Peer {
            cluster: format!("c{other}"),
            public_key: b64(&peer_key),
            preshared_key: b64(&[7u8; 32]),
            endpoint: if other == 1 { A_ADDR } else { B_ADDR }.into(),
            overlay_ip: format!("100.64.0.{other}"),
            // A bare address and a CIDR: one rule parses both.
            allowed_ips: vec![format!("100.64.0.{other}"), format!("10.{other}.0.0/16")],
        },
    );
    let svc = testutil::with_policy(
        testutil::service("web", testutil::VIP, &[(80, 8080, Protocol::Tcp)]),
        TrafficPolicy::Spread,
    );
    testutil::add(
        &mut s,
        svc,
        Some(testutil::endpoints(
            "web",
            &[("c2", true, &[("10.2.0.11", "web-2a", true)])],
        )),
    );
    s.reparsed()
}

fn engine(me: u8, key: [u8; 32], peer_key: [u8; 32], now: Instant) -> Engine {
    let s = state(me, peer_key);
    let cfg = LbConfig {
        cluster: s.cluster.clone(),
        ..testutil::cfg()
    };
    let mut lb = Lb::new(cfg.clone());
    lb.set_table(Arc::new(LbTable::build(&s, &cfg, &Health::default())));
    let mut e = Engine::new(Node::new(key), lb, now);
    let diff = e.apply_netmap(&s);
    assert_eq!(diff.added, [format!("c{}", 3 - me)]);
    e
}

/// Two gateways and what each wrote to its TUN.
pub(crate) struct Wire {
    pub a: Engine,
    pub b: Engine,
    pub tun_a: Vec<Vec<u8>>,
    pub tun_b: Vec<Vec<u8>>,
    pub now: Instant,
}

pub(crate) fn wire() -> Wire {
    let (ka, kb) = ([1u8; 32], [2u8; 32]);
    let pub_of = |k| {
        *skymesh_noise::x25519::PublicKey::from(&skymesh_noise::x25519::StaticSecret::from(k))
            .as_bytes()
    };
    let now = Instant::now();
    Wire {
        a: engine(1, ka, pub_of(kb), now),
        b: engine(2, kb, pub_of(ka), now),
        tun_a: Vec::new(),
        tun_b: Vec::new(),
        now,
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

impl Wire {
    /// Sends packets from a's TUN (`from_a`) and b's, then delivers every
    /// datagram until both are quiet, in batches as the device does: a
    /// takes each datagram by copy ([`Engine::handle_network`]), b in
    /// place, coalesced into receive buffers as UDP GRO does
    /// ([`Engine::handle_received`]).
    pub(crate) fn run(&mut self, from_a: Vec<Vec<u8>>, from_b: Vec<Vec<u8>>) {
        let mut net_a = Datagrams::new(1 << 18, 64);
        let mut net_b = Datagrams::new(1 << 18, 64);
        let mut pk_a = Packets::new(128, 10);
        let mut pk_b = Packets::with_rx(128, 10, 8, 1 << 16);
        let now = self.now;
        // a's packets take the staged path (read into slots, sealed in
        // place), b's the copying one: both are checked the same way.
        for chunk in from_a.chunks(TUN_SLOTS) {
            stage(&mut net_a, chunk);
            for (i, p) in chunk.iter().enumerate() {
                self.a
                    .handle_tun_staged(i, p.len(), now, &mut net_a, &mut pk_a);
            }
            self.a.finish_staged(&mut net_a);
        }
        for mut p in from_b {
            self.b.handle_tun(&mut p, now, &mut net_b, &mut pk_b);
        }
        let mut queue: VecDeque<(bool, Vec<u8>)> = VecDeque::new();
        for _ in 0..1000 {
            for (dst, d) in net_a.datagrams() {
                assert_eq!(dst, addr(B_ADDR));
                queue.push_back((true, d.to_vec()));
            }
            for (dst, d) in net_b.datagrams() {
                assert_eq!(dst, addr(A_ADDR));
                queue.push_back((false, d.to_vec()));
            }
            net_a.clear();
            net_b.clear();
            self.a.finish_opened(&mut pk_a, now);
            self.b.finish_opened(&mut pk_b, now);
            self.tun_a.extend(pk_a.packets().map(<[u8]>::to_vec));
            self.tun_b.extend(pk_b.packets().map(<[u8]>::to_vec));
            pk_a.clear();
            pk_b.clear();
            if queue.is_empty() {
                return;
            }
            let mut to_b = Vec::new();
            for (is_b, d) in queue.drain(..) {
                if is_b {
                    to_b.push(d);
                } else {
                    self.a
                        .handle_network(addr(B_ADDR), &d, now, &mut net_a, &mut pk_a);
                }
            }
            self.receive_b(&to_b, &mut net_b, &mut pk_b);
        }
        panic!("the engines never went quiet");
    }

    /// Delivers `datagrams` to b as `recvmmsg` with UDP GRO does: runs of
    /// one size (the last of a run may be shorter) in one receive buffer,
    /// up to 3 buffers per receive, receives into a batch until its
    /// buffers are taken; then the batch is judged and written.
    fn receive_b(&mut self, datagrams: &[Vec<u8>], net: &mut Datagrams, pk: &mut Packets) {
        let now = self.now;
        let mut i = 0;
        while i < datagrams.len() {
            let first = pk.rx_used();
            let mut filled = 0;
            while filled < 3 && i < datagrams.len() && !pk.rx_free().is_empty() {
                let stride = datagrams[i].len();
                let buf = &mut pk.rx_free()[0];
                let mut len = 0;
                while let Some(d) = datagrams.get(i) {
                    if d.len() > stride || len + d.len() > buf.len() {
                        break;
                    }
                    buf[len..len + d.len()].copy_from_slice(d);
                    len += d.len();
                    i += 1;
                    if d.len() < stride {
                        break;
                    }
                }
                pk.rx_commit(addr(A_ADDR), len, stride);
                filled += 1;
            }
            self.b.handle_received(first, now, net, pk);
            if pk.rx_free().is_empty() {
                self.b.finish_opened(pk, now);
                self.tun_b.extend(pk.packets().map(<[u8]>::to_vec));
                pk.clear();
            }
        }
    }
}

/// What a TUN read does: each packet into its slot, after room for the
/// WireGuard header.
pub(crate) fn stage(net: &mut Datagrams, packets: &[Vec<u8>]) {
    let area = net.stage(TUN_SLOTS, SLOT);
    for (slot, p) in area.chunks_mut(SLOT).zip(packets) {
        slot[DATA_HEADER..DATA_HEADER + p.len()].copy_from_slice(p);
    }
}

/// An IPv4 packet (protocol 253) carrying `seq` and `len` bytes derived
/// from it, so that any corruption or reordering shows.
pub(crate) fn numbered(src: [u8; 4], dst: [u8; 4], seq: u32, len: usize) -> Vec<u8> {
    let mut p = crate::core::node::tests::packet(src, dst, len);
    for (i, b) in p[20..].iter_mut().enumerate() {
        *b = (seq as usize).wrapping_mul(31).wrapping_add(i) as u8;
    }
    if len >= 4 {
        p[20..24].copy_from_slice(&seq.to_be_bytes());
    }
    p
}

#[test]
fn bulk_transfers_both_ways_arrive_byte_for_byte_in_order() {
    let mut w = wire();
    // Sizes from tiny to a full MTU, deterministic.
    let size = |i: u32| 4 + (i as usize * 7919) % 1397;
    let a_to_b: Vec<Vec<u8>> = (0..3000)
        .map(|i| numbered([10, 1, 0, 5], [10, 2, 0, 5], i, size(i)))
        .collect();
    let b_to_a: Vec<Vec<u8>> = (0..3000)
        .map(|i| numbered([10, 2, 0, 6], [100, 64, 0, 1], i, size(i + 1)))
        .collect();
    // The first packet starts the handshake and is queued until it is done.
    w.run(vec![a_to_b[0].clone()], Vec::new());
    assert_eq!(w.tun_b, [a_to_b[0].clone()]);
    w.tun_b.clear();
    for chunk in 0..30 {
        let r = chunk * 100..(chunk + 1) * 100;
        let from_a = if chunk == 0 {
            a_to_b[1..100].to_vec()
        } else {
            a_to_b[r.clone()].to_vec()
        };
        w.run(from_a, b_to_a[r].to_vec());
    }
    assert_eq!(w.tun_b.len(), 2999);
    assert!(w.tun_b == a_to_b[1..], "a → b arrived intact and in order");
    assert_eq!(w.tun_a.len(), 3000);
    assert!(w.tun_a == b_to_a, "b → a arrived intact and in order");
    let a = &w.a.node().peers()[0];
    assert_eq!((a.tx_packets, a.rx_packets), (3000, 3000));
    assert!(w.a.node().drops().is_empty(), "{:?}", w.a.node().drops());
    assert!(w.b.node().drops().is_empty(), "{:?}", w.b.node().drops());
}

#[test]
fn a_vip_flow_reaches_the_replica_behind_the_other_gateway_and_back() {
    let mut w = wire();
    let client = sa(Ipv4Addr::new(10, 1, 0, 100), 40_000);
    let vip = sa(testutil::VIP, 80);
    w.run(vec![tcp(client, vip, TCP_SYN, 1, 0, &[])], Vec::new());
    let [syn] = &w.tun_b[..] else {
        panic!("one SYN arrives at c2: {:?}", w.tun_b)
    };
    let s: Seen = checked(syn);
    assert_eq!(
        (s.src, s.dst),
        (client, sa(Ipv4Addr::new(10, 2, 0, 11), 8080))
    );
    // The replica answers its client directly; c1 translates it back.
    let reply = tcp(s.dst, client, TCP_SYN | TCP_ACK, 9, 2, &[]);
    w.run(Vec::new(), vec![reply]);
    let [back] = &w.tun_a[..] else {
        panic!("one reply arrives at c1: {:?}", w.tun_a)
    };
    let r = checked(back);
    assert_eq!((r.src, r.dst), (vip, client), "from the VIP again");
    let stats = w.a.lb().stats();
    assert_eq!(stats.services["default/web"].connections, 1);
}

#[test]
fn timers_are_polled_and_keep_the_session_alive() {
    let mut w = wire();
    w.run(
        vec![numbered([10, 1, 0, 5], [10, 2, 0, 5], 0, 10)],
        Vec::new(),
    );
    let t0 = w.now;
    let first = w.a.poll_timeout();
    assert!(first <= t0, "the first tick is due at once");
    let mut net = Datagrams::new(1 << 16, 64);
    assert!(w.a.handle_timeout(t0, &mut net));
    let next = w.a.poll_timeout();
    assert!(next > t0 && next <= t0 + TIMER_TICK, "{:?}", next - t0);
    assert!(
        !w.a.handle_timeout(t0 + TIMER_TICK / 2, &mut net),
        "not due yet"
    );
    // A late call runs one tick, not every missed one.
    assert!(w.a.handle_timeout(t0 + TIMER_TICK * 10, &mut net));
    assert!(w.a.poll_timeout() > t0 + TIMER_TICK * 10);
}

/// One data message from a to b, sealed as the device seals it.
fn sealed_from_a(w: &mut Wire, seq: u32) -> Vec<u8> {
    let mut net = Datagrams::new(TUN_SLOTS * SLOT + 4096, 64);
    let mut tun = Packets::new(16, 10);
    let p = numbered([10, 1, 0, 5], [10, 2, 0, 5], seq, 200);
    stage(&mut net, std::slice::from_ref(&p));
    w.a.handle_tun_staged(0, p.len(), w.now, &mut net, &mut tun);
    w.a.finish_staged(&mut net);
    let all: Vec<Vec<u8>> = net.datagrams().map(|(_, d)| d.to_vec()).collect();
    assert_eq!(all.len(), 1);
    all.into_iter().next().unwrap()
}

/// Delivers `d` to b from `src`; returns the packets b would write.
fn deliver_to_b(w: &mut Wire, src: SocketAddr, d: &[u8]) -> usize {
    let mut net = Datagrams::new(1 << 16, 64);
    let mut tun = Packets::new(16, 10);
    w.b.handle_network(src, d, w.now, &mut net, &mut tun);
    assert!(tun.has_sealed(), "a data message waits to be opened");
    w.b.finish_opened(&mut tun, w.now);
    tun.len()
}

#[test]
fn opened_in_place_replays_and_forgeries_are_dropped_and_never_move_the_endpoint() {
    let mut w = wire();
    w.run(
        vec![numbered([10, 1, 0, 5], [10, 2, 0, 5], 0, 10)],
        Vec::new(),
    );
    let a = addr(A_ADDR);
    let elsewhere = addr("203.0.113.9:4444");
    let endpoint = |w: &Wire| w.b.node().peers()[0].endpoint;
    let d = sealed_from_a(&mut w, 1);
    assert_eq!(deliver_to_b(&mut w, a, &d), 1, "the message is delivered");
    // The same message again, from another address: a replay.
    assert_eq!(deliver_to_b(&mut w, elsewhere, &d), 0);
    assert_eq!(endpoint(&w), Some(a), "a replay never moves the endpoint");
    // A forged one (a flipped ciphertext byte).
    let mut forged = sealed_from_a(&mut w, 2);
    forged[40] ^= 1;
    assert_eq!(deliver_to_b(&mut w, elsewhere, &forged), 0);
    assert_eq!(endpoint(&w), Some(a), "a forgery never moves the endpoint");
    assert_eq!(w.b.node().drops()[&DropReason::AuthFailed], 2);
    // An authentic one from the new address: roaming.
    let d = sealed_from_a(&mut w, 3);
    assert_eq!(deliver_to_b(&mut w, elsewhere, &d), 1);
    assert_eq!(
        endpoint(&w),
        Some(elsewhere),
        "authenticated: the peer roamed"
    );
    let b = &w.b.node().peers()[0];
    assert_eq!(b.rx_packets, 3, "the handshake's packet and two more");
}

#[test]
fn opened_packets_outside_the_peers_allowed_ips_are_dropped() {
    let mut w = wire();
    w.run(
        vec![numbered([10, 1, 0, 5], [10, 2, 0, 5], 0, 10)],
        Vec::new(),
    );
    // a's packet claims a source in b's own CIDR: a may not send it, and
    // one to a destination b does not own may not pass b either.
    for (src, dst, why) in [
        ([10, 2, 0, 7], [10, 2, 0, 5], DropReason::SourceNotAllowed),
        (
            [10, 1, 0, 5],
            [10, 9, 0, 5],
            DropReason::DestinationNotAllowed,
        ),
    ] {
        let mut net = Datagrams::new(1 << 16, 64);
        let mut tun = Packets::new(16, 10);
        // Sealed for b directly by a's node (a's own routing would not
        // send the second).
        let p = numbered(src, dst, 9, 100);
        let session = w.a.node().peer_session_for_tests();
        let area = net.stage(1, SLOT);
        area[DATA_HEADER..DATA_HEADER + p.len()].copy_from_slice(&p);
        net.commit_sealing(
            0,
            addr(B_ADDR),
            p.len(),
            &session,
            session.reserve_nonces(1).unwrap(),
        );
        let d: Vec<u8> = net.datagrams().next().unwrap().1.to_vec();
        w.b.handle_network(addr(A_ADDR), &d, w.now, &mut net, &mut tun);
        w.b.finish_opened(&mut tun, w.now);
        assert_eq!(tun.len(), 0);
        assert_eq!(w.b.node().drops()[&why], 1, "{why:?}");
    }
}
