//! The packet path allocates nothing per packet once warm: two engines
//! exchange 20,000 packets through their batches under dhat's counting
//! allocator, and the heap must not see a single new block.
//!
//! Its own test binary, so the counting allocator covers nothing else.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use meshd::core::batch::{Datagrams, Packets};
use meshd::core::engine::{Engine, SLOT, TUN_SLOTS};
use meshd::core::gro::{Gro, Offloads};
use meshd::core::lb::{FlowLimits, Health, Lb, LbConfig, LbTable};
use meshd::core::node::{DATA_HEADER, Node};
use meshd::state::NetState;
use skymesh_proto::v1::Peer;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

const A: &str = "198.51.100.11:51820";
const B: &str = "198.51.100.12:51820";

fn public(k: [u8; 32]) -> [u8; 32] {
    *skymesh_noise::x25519::PublicKey::from(&skymesh_noise::x25519::StaticSecret::from(k))
        .as_bytes()
}

fn engine(me: u8, key: [u8; 32], peer: [u8; 32]) -> Engine {
    let b64 = base64::engine::general_purpose::STANDARD;
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
            public_key: b64.encode(public(peer)),
            preshared_key: b64.encode([7u8; 32]),
            endpoint: if other == 1 { A } else { B }.into(),
            allowed_ips: vec![format!("100.64.0.{other}/32"), format!("10.{other}.0.0/16")],
            ..Default::default()
        },
    );
    s.reparse();
    let cfg = LbConfig {
        cluster: s.cluster.clone(),
        service_cidr: "100.65.0.0/16".parse().unwrap(),
        hash_key: [1, 2],
        limits: FlowLimits::default(),
        gateway_ip: None,
    };
    let mut lb = Lb::new(cfg.clone());
    lb.set_table(Arc::new(LbTable::build(&s, &cfg, &Health::default())));
    let mut e = Engine::new(Node::new(key), lb, Instant::now());
    e.apply_netmap(&s);
    e
}

/// A UDP/IPv4 packet of `len` payload bytes (checksum 0: not checked on the
/// way, the balancer passes it).
fn packet(src: [u8; 4], dst: [u8; 4], len: usize) -> Vec<u8> {
    let total = 28 + len;
    let mut p = vec![0u8; total];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..22].copy_from_slice(&5001u16.to_be_bytes());
    p[22..24].copy_from_slice(&5001u16.to_be_bytes());
    p[24..26].copy_from_slice(&((8 + len) as u16).to_be_bytes());
    p
}

struct Side {
    engine: Engine,
    net: Datagrams,
    tun: Packets,
    /// The TUN write's plan (coalesced writes gathered from the batch).
    gro: Gro,
    me: SocketAddr,
}

/// Judges `to`'s batch, plans its TUN writes and empties it; returns how
/// many packets it held.
fn settle(to: &mut Side, now: Instant) -> usize {
    to.engine.finish_opened(&mut to.tun, now);
    let n = to.tun.len();
    // As the TUN writer does: every byte of the batch is in one write.
    to.gro.plan(&to.tun);
    let gathered: usize = (0..to.gro.writes())
        .flat_map(|w| to.gro.write_parts(w, &to.tun))
        .map(<[u8]>::len)
        .sum();
    assert!(gathered >= to.tun.packets().map(<[u8]>::len).sum::<usize>());
    to.tun.clear();
    n
}

/// Delivers `from`'s datagrams to `to` as `recvmmsg` with UDP GRO does:
/// runs of one size (the last may be shorter) in each receive buffer of
/// `to`'s batch, opened there ([`Engine::handle_received`]); a batch
/// whose buffers are all taken is judged and written. Returns how many
/// packets arrived.
fn receive_in_place(from: &mut Side, to: &mut Side, now: Instant) -> usize {
    let mut arrived = 0;
    // The receive buffer being filled: bytes, datagram size, whether a
    // short datagram ended it.
    let mut filling: Option<(usize, usize, bool)> = None;
    for (_, d) in from.net.datagrams() {
        if let Some((len, stride, ended)) = filling
            && (ended || d.len() > stride || len + d.len() > RX_BUFFER)
        {
            to.tun.rx_commit(from.me, len, stride);
            filling = None;
        }
        let (len, stride, ended) = match filling {
            Some(f) => f,
            None => {
                if to.tun.rx_free().is_empty() {
                    to.engine.handle_received(0, now, &mut to.net, &mut to.tun);
                    arrived += settle(to, now);
                }
                (0, d.len(), false)
            }
        };
        to.tun.rx_free()[0][len..len + d.len()].copy_from_slice(d);
        filling = Some((len + d.len(), stride, ended || d.len() < stride));
    }
    if let Some((len, stride, _)) = filling {
        to.tun.rx_commit(from.me, len, stride);
    }
    from.net.clear();
    to.engine.handle_received(0, now, &mut to.net, &mut to.tun);
    arrived + settle(to, now)
}

/// Bytes of one receive buffer (a UDP GRO batch).
const RX_BUFFER: usize = 1 << 16;

/// Sends `packets` from `from`'s TUN to `to`'s, in batches of 64 (staged
/// in place like a TUN read and received in place, or handed over and
/// received one by one); returns how many arrived.
fn exchange(from: &mut Side, to: &mut Side, packets: &mut [Vec<u8>], staged: bool) -> usize {
    let now = Instant::now();
    let mut arrived = 0;
    for chunk in packets.chunks_mut(64) {
        if staged {
            // As a TUN read does: into slots, sealed where they lie.
            let area = from.net.stage(TUN_SLOTS, SLOT);
            for (slot, p) in area.chunks_mut(SLOT).zip(chunk.iter()) {
                slot[DATA_HEADER..DATA_HEADER + p.len()].copy_from_slice(p);
            }
            for (i, p) in chunk.iter().enumerate() {
                from.engine
                    .handle_tun_staged(i, p.len(), now, &mut from.net, &mut from.tun);
            }
            from.engine.finish_staged(&mut from.net);
        } else {
            for p in chunk.iter_mut() {
                from.engine.handle_tun(p, now, &mut from.net, &mut from.tun);
            }
        }
        if staged {
            // As the packet thread does: received in place, GRO-style.
            arrived += receive_in_place(from, to, now);
        } else {
            for (_, d) in from.net.datagrams() {
                to.engine
                    .handle_network(from.me, d, now, &mut to.net, &mut to.tun);
            }
            from.net.clear();
            arrived += settle(to, now);
        }
        // Handshake answers, if any, go back.
        for (_, d) in to.net.datagrams() {
            from.engine
                .handle_network(to.me, d, now, &mut from.net, &mut from.tun);
        }
        from.engine.finish_opened(&mut from.tun, now);
        from.tun.clear();
        to.net.clear();
    }
    arrived
}

#[test]
fn no_allocation_per_packet_once_warm() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let (ka, kb) = ([1u8; 32], [2u8; 32]);
    let side = |me: u8, key, peer, addr: &str| Side {
        engine: engine(me, key, peer),
        net: Datagrams::new(1 << 18, 64),
        tun: Packets::with_rx(128, 10, 8, RX_BUFFER),
        gro: Gro::new(Offloads {
            vnet_hdr: true,
            udp: true,
        }),
        me: addr.parse().unwrap(),
    };
    let mut a = side(1, ka, kb, A);
    let mut b = side(2, kb, ka, B);
    let mut a_to_b: Vec<Vec<u8>> = (0..10_000)
        .map(|i| packet([10, 1, 0, 5], [10, 2, 0, 5], 16 + i % 1380))
        .collect();
    let mut b_to_a: Vec<Vec<u8>> = (0..10_000)
        .map(|i| packet([10, 2, 0, 6], [10, 1, 0, 6], 16 + (i * 7) % 1380))
        .collect();
    // Warm up: the handshake, and every buffer grown to its working size.
    let mut warm: Vec<Vec<u8>> = a_to_b[..1].to_vec();
    exchange(&mut a, &mut b, &mut warm, false);
    for _ in 0..2 {
        exchange(&mut a, &mut b, &mut a_to_b[..2000], true);
        exchange(&mut b, &mut a, &mut b_to_a[..2000], false);
    }
    let before = dhat::HeapStats::get();
    let ab = exchange(&mut a, &mut b, &mut a_to_b, true);
    let ba = exchange(&mut b, &mut a, &mut b_to_a, false);
    let after = dhat::HeapStats::get();
    assert_eq!((ab, ba), (10_000, 10_000), "every packet arrived");
    let blocks = after.total_blocks - before.total_blocks;
    let bytes = after.total_bytes - before.total_bytes;
    dhat::assert_eq!(
        blocks,
        0,
        "{blocks} allocations ({bytes} bytes) for 20,000 packets"
    );
}
