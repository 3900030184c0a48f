//! Balancer behaviour end to end, with packets and a synthetic clock.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etherparse::{Icmpv4Type, TransportHeader};
use skymesh_proto::v1::{Protocol, TrafficPolicy};

use super::nat::{TCP_ESTABLISHED_IDLE, TCP_TRANSITORY_IDLE, UDP_IDLE, UNASSURED_IDLE};
use super::packet::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use super::testutil::*;
use super::*;

const TCP: Protocol = Protocol::Tcp;
const UDP: Protocol = Protocol::Udp;

fn web_state(policy: TrafficPolicy) -> crate::state::NetState {
    let mut s = mesh();
    let svc = with_policy(
        service("web", VIP, &[(80, 8080, TCP), (53, 5353, UDP)]),
        policy,
    );
    add(&mut s, svc, Some(endpoints("web", &SIX)));
    s
}

/// Opens `n` TCP flows from CLIENT (ports 20000..) and returns, per backend
/// IP, how many it got; asserts translation and verdicts on the way.
fn spread(lb: &mut Lb, n: u16, now: Instant) -> BTreeMap<Ipv4Addr, u32> {
    let mut got = BTreeMap::new();
    for i in 0..n {
        let (v, p) = out(lb, syn(sa(CLIENT, 20_000 + i), sa(VIP, 80)), now);
        let s = checked(&p);
        assert_eq!(s.dst.port(), 8080);
        if s.dst.ip().octets()[1] == 1 {
            assert_eq!(v, Verdict::ToTun, "local backend");
            assert_eq!(*s.src.ip(), VIP, "SNAT to the VIP");
        } else {
            assert_eq!(v, Verdict::ToTunnel, "remote backend");
            assert_eq!(s.src, sa(CLIENT, 20_000 + i), "DNAT only");
        }
        *got.entry(*s.dst.ip()).or_default() += 1;
    }
    got
}

#[test]
fn flows_spread_over_every_replica_in_every_cluster() {
    let mut lb = lb(&web_state(TrafficPolicy::Spread), &Health::default());
    let got = spread(&mut lb, 120, Instant::now());
    assert_eq!(got.len(), 6, "{got:?}");
    assert!(got.values().all(|n| *n >= 8), "{got:?}");
    let stats = lb.stats();
    let web = &stats.services["default/web"];
    assert_eq!(web.connections, 120);
    assert_eq!(web.active_flows, 120);
    assert_eq!(web.backends.len(), 6);
    assert_eq!(web.backends.values().sum::<u64>(), 120);
    assert!(web.backends.contains_key("c2/web-2a"), "{:?}", web.backends);
}

#[test]
fn spread_is_even_for_many_clients_and_seeds() {
    // Independent of the key and the client: every backend gets ≥ 8 of 120.
    for seed in 0..20u64 {
        let mut c = cfg();
        c.hash_key = [seed, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)];
        let mut lb = Lb::new(c.clone());
        lb.set_table(Arc::new(LbTable::build(
            &web_state(TrafficPolicy::Spread),
            &c,
            &Health::default(),
        )));
        let mut got: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
        let now = Instant::now();
        for i in 0..120u16 {
            let client = Ipv4Addr::new(10, 1, 1, (seed as u8).wrapping_add(i as u8 % 7));
            let (_, p) = out(&mut lb, syn(sa(client, 30_000 + i * 2), sa(VIP, 80)), now);
            *got.entry(dst_ip(&p)).or_default() += 1;
        }
        assert!(
            got.len() == 6 && got.values().all(|n| *n >= 8),
            "seed {seed}: {got:?}"
        );
    }
}

#[test]
fn established_flows_stay_on_their_backend() {
    let mut lb = lb(&web_state(TrafficPolicy::Spread), &Health::default());
    let t0 = Instant::now();
    let c = sa(CLIENT, 40_000);
    let (v1, p1) = out(&mut lb, syn(c, sa(VIP, 80)), t0);
    for i in 0..20 {
        let (v, p) = out(
            &mut lb,
            tcp(c, sa(VIP, 80), TCP_ACK, 1001 + i, 1, b"GET /"),
            t0,
        );
        assert_eq!(v, v1);
        assert_eq!(checked(&p).dst, checked(&p1).dst);
        assert_eq!(checked(&p).src, checked(&p1).src);
    }
    assert_eq!(lb.stats().services["default/web"].connections, 1);
}

#[test]
fn prefer_local_keeps_to_local_replicas_while_any_is_ready() {
    let s = web_state(TrafficPolicy::PreferLocal);
    let mut lb = lb(&s, &Health::default());
    let got = spread(&mut lb, 60, Instant::now());
    assert_eq!(
        got.keys().map(|ip| ip.octets()[1]).max(),
        Some(1),
        "{got:?}"
    );
    assert_eq!(got.len(), 2);
    // Both local jobs failing: remote replicas take over.
    let health = Health {
        local_unready: [
            ("default".into(), "web-1a".into()),
            ("default".into(), "web-1b".into()),
        ]
        .into(),
        ..Default::default()
    };
    lb.set_table(Arc::new(LbTable::build(&s, &cfg(), &health)));
    let (v, p) = out(&mut lb, syn(sa(CLIENT, 1), sa(VIP, 80)), Instant::now());
    assert_eq!(v, Verdict::ToTunnel);
    assert_ne!(dst_ip(&p).octets()[1], 1);
}

#[test]
fn local_policy_never_leaves_the_cluster() {
    let s = web_state(TrafficPolicy::Local);
    let mut lb = lb(&s, &Health::default());
    let got = spread(&mut lb, 60, Instant::now());
    assert!(got.keys().all(|ip| ip.octets()[1] == 1), "{got:?}");
    // No local replica: like no backend at all, though remote ones exist.
    let health = Health {
        local_unready: [
            ("default".into(), "web-1a".into()),
            ("default".into(), "web-1b".into()),
        ]
        .into(),
        ..Default::default()
    };
    let mut lb = super::testutil::lb(&s, &health);
    let (v, p) = out(&mut lb, syn(sa(CLIENT, 1), sa(VIP, 80)), Instant::now());
    assert_eq!(v, Verdict::Reply);
    let TransportHeader::Tcp(t) = checked(&p).transport else {
        panic!()
    };
    assert!(t.rst);
}

#[test]
fn unhealthy_backends_get_no_new_flows() {
    let health = Health {
        peers_down: ["c2".to_string()].into(),
        local_unready: [("default".to_string(), "web-1a".to_string())].into(),
        ..Default::default()
    };
    let mut lb = lb(&web_state(TrafficPolicy::Spread), &health);
    let got = spread(&mut lb, 120, Instant::now());
    let ips: Vec<String> = got.keys().map(|i| i.to_string()).collect();
    assert_eq!(ips, ["10.1.0.12", "10.3.0.11", "10.3.0.12"]);
}

#[test]
fn client_ip_affinity_pins_a_client_and_expires() {
    let mut s = mesh();
    let svc = with_affinity(service("web", VIP, &[(80, 8080, TCP)]), 60);
    add(&mut s, svc, Some(endpoints("web", &SIX)));
    let mut lb = lb(&s, &Health::default());
    let t0 = Instant::now();
    let first = dst_ip(&out(&mut lb, syn(sa(CLIENT, 1000), sa(VIP, 80)), t0).1);
    // Many source ports, within the timeout measured from the last use.
    for i in 1..100u16 {
        let now = t0 + Duration::from_secs(u64::from(i) * 2);
        let (_, p) = out(&mut lb, syn(sa(CLIENT, 1000 + i), sa(VIP, 80)), now);
        assert_eq!(dst_ip(&p), first, "port {}", 1000 + i);
    }
    // Another client is balanced on its own.
    let others: std::collections::BTreeSet<Ipv4Addr> = (0..40u8)
        .map(|i| {
            dst_ip(
                &out(
                    &mut lb,
                    syn(sa(Ipv4Addr::new(10, 1, 2, i), 5), sa(VIP, 80)),
                    t0,
                )
                .1,
            )
        })
        .collect();
    assert!(others.len() > 1);
    // After the timeout, a new choice is made each time the pin lapses.
    let mut chosen = std::collections::BTreeSet::new();
    let mut now = t0 + Duration::from_secs(200);
    for i in 0..30u16 {
        now += Duration::from_secs(61);
        lb.handle_timeout(now);
        let (_, p) = out(&mut lb, syn(sa(CLIENT, 3000 + i * 7), sa(VIP, 80)), now);
        chosen.insert(dst_ip(&p));
    }
    assert!(chosen.len() > 1, "affinity never expired: {chosen:?}");
}

#[test]
fn ping_to_a_vip_is_answered() {
    let mut lb = lb(&web_state(TrafficPolicy::Spread), &Health::default());
    let (v, p) = out(
        &mut lb,
        ping(CLIENT, VIP, 0x1234, 7, b"abcdefgh"),
        Instant::now(),
    );
    assert_eq!(v, Verdict::Reply);
    let s = checked(&p);
    assert_eq!((*s.src.ip(), *s.dst.ip()), (VIP, CLIENT));
    let TransportHeader::Icmpv4(i) = s.transport else {
        panic!()
    };
    let Icmpv4Type::EchoReply(e) = i.icmp_type else {
        panic!("{:?}", i.icmp_type)
    };
    assert_eq!((e.id, e.seq), (0x1234, 7));
    assert_eq!(s.payload, b"abcdefgh");
    assert_eq!(lb.stats().replies[&LbReply::EchoReply], 1);
    // Not a VIP: no answer.
    let (v, _) = out(
        &mut lb,
        ping(CLIENT, Ipv4Addr::new(100, 65, 9, 9), 1, 1, b""),
        Instant::now(),
    );
    assert_eq!(v, Verdict::Drop(LbDrop::NotAVip));
}

#[test]
fn syn_to_a_port_without_backends_gets_a_reset() {
    let mut s = mesh();
    add(
        &mut s,
        service("web", VIP, &[(80, 8080, TCP), (53, 53, UDP)]),
        None,
    );
    let mut lb = lb(&s, &Health::default());
    let c = sa(CLIENT, 41_000);
    let (v, p) = out(
        &mut lb,
        tcp(c, sa(VIP, 80), TCP_SYN, 0xffff_fff0, 0, &[]),
        Instant::now(),
    );
    assert_eq!(v, Verdict::Reply);
    let r = checked(&p);
    assert_eq!((r.src, r.dst), (sa(VIP, 80), c));
    let TransportHeader::Tcp(t) = r.transport else {
        panic!()
    };
    assert!(t.rst && t.ack && !t.syn);
    assert_eq!(
        (t.sequence_number, t.acknowledgment_number),
        (0, 0xffff_fff1)
    );
    // A segment with ACK: the reset takes its sequence number from it.
    let (_, p) = out(
        &mut lb,
        tcp(c, sa(VIP, 80), TCP_ACK, 5, 777, b"data"),
        Instant::now(),
    );
    let TransportHeader::Tcp(t) = checked(&p).transport else {
        panic!()
    };
    assert!(t.rst && !t.ack);
    assert_eq!(t.sequence_number, 777);
    // A reset is never answered.
    let (v, _) = out(
        &mut lb,
        tcp(c, sa(VIP, 80), TCP_RST, 5, 0, &[]),
        Instant::now(),
    );
    assert_eq!(v, Verdict::Drop(LbDrop::NoFlow));
    assert_eq!(lb.stats().replies[&LbReply::NoBackend], 2);
}

#[test]
fn udp_to_a_port_without_backends_gets_port_unreachable() {
    let mut s = mesh();
    add(
        &mut s,
        service("dns", VIP, &[(53, 53, UDP)]),
        Some(endpoints(
            "dns",
            &[("c1", true, &[("10.1.0.5", "d", false)])],
        )),
    );
    let mut lb = lb(&s, &Health::default());
    let orig = udp(sa(CLIENT, 5353), sa(VIP, 53), b"query-bytes");
    let (v, p) = out(&mut lb, orig.clone(), Instant::now());
    assert_eq!(v, Verdict::Reply);
    let r = checked(&p);
    assert_eq!((*r.src.ip(), *r.dst.ip()), (VIP, CLIENT));
    let TransportHeader::Icmpv4(i) = r.transport else {
        panic!()
    };
    assert!(matches!(
        i.icmp_type,
        Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port)
    ));
    assert_eq!(r.payload, orig[..28], "quotes the IP header and 8 bytes");
}

#[test]
fn undefined_ports_and_unknown_addresses() {
    let mut lb = lb(&web_state(TrafficPolicy::Spread), &Health::default());
    let now = Instant::now();
    let (v, p) = out(&mut lb, syn(sa(CLIENT, 1), sa(VIP, 81)), now);
    assert_eq!(v, Verdict::Reply);
    let TransportHeader::Tcp(t) = checked(&p).transport else {
        panic!()
    };
    assert!(t.rst);
    let (v, _) = out(&mut lb, udp(sa(CLIENT, 1), sa(VIP, 80), b"x"), now);
    assert_eq!(v, Verdict::Reply, "port 80 is TCP only");
    assert_eq!(lb.stats().replies[&LbReply::NoPort], 2);
    let other_vip = Ipv4Addr::new(100, 65, 3, 3);
    assert_eq!(
        out(&mut lb, syn(sa(CLIENT, 1), sa(other_vip, 80)), now).0,
        Verdict::Drop(LbDrop::NotAVip)
    );
    // Outside the service CIDR: not ours, untouched.
    let p = syn(sa(CLIENT, 1), sa(Ipv4Addr::new(10, 2, 0, 11), 80));
    assert_eq!(out(&mut lb, p.clone(), now), (Verdict::Pass, p.clone()));
    assert_eq!(inb(&mut lb, p.clone(), now), (Verdict::Pass, p));
    assert_eq!(
        out(&mut lb, vec![0x60; 40], now).0,
        Verdict::Pass,
        "IPv6 passes"
    );
    assert_eq!(lb.stats().drops[&LbDrop::NotAVip], 1);
}

#[test]
fn a_service_not_exposed_here_has_no_vip() {
    let mut s = mesh();
    let mut svc = service("web", VIP, &[(80, 8080, TCP)]);
    svc.spec.as_mut().unwrap().clusters = vec!["c2".into()];
    add(&mut s, svc, Some(endpoints("web", &SIX)));
    let mut lb = lb(&s, &Health::default());
    let now = Instant::now();
    assert_eq!(
        out(&mut lb, syn(sa(CLIENT, 1), sa(VIP, 80)), now).0,
        Verdict::Drop(LbDrop::NotAVip)
    );
    assert_eq!(
        out(&mut lb, ping(CLIENT, VIP, 1, 1, b""), now).0,
        Verdict::Drop(LbDrop::NotAVip)
    );
}

#[test]
fn remote_reply_is_reverse_translated() {
    let mut lb = lb(&web_state(TrafficPolicy::Spread), &Health::default());
    let now = Instant::now();
    // Find a flow that went remote.
    let (c, backend) = (0..50)
        .map(|i| sa(CLIENT, 42_000 + i))
        .find_map(|c| {
            let (v, p) = out(&mut lb, syn(c, sa(VIP, 80)), now);
            (v == Verdict::ToTunnel).then(|| (c, checked(&p).dst))
        })
        .unwrap();
    let (v, p) = inb(
        &mut lb,
        tcp(backend, c, TCP_SYN | TCP_ACK, 9, 1001, &[]),
        now,
    );
    assert_eq!(v, Verdict::ToTun);
    let r = checked(&p);
    assert_eq!((r.src, r.dst), (sa(VIP, 80), c));
    // A remote reply arriving from the TUN side is not taken for ours.
    let (v, _) = out(&mut lb, tcp(backend, c, TCP_ACK, 9, 1001, &[]), now);
    assert_eq!(v, Verdict::Pass);
}

#[test]
fn a_direct_connection_reusing_a_closed_flows_port_is_left_alone() {
    // Found by the benchmark: after ~10k VIP connections, a direct
    // connection to a replica reused a client port of a closed VIP flow,
    // and its SYN-ACK was rewritten to come from the VIP.
    let mut lb = lb(&web_state(TrafficPolicy::Spread), &Health::default());
    let now = Instant::now();
    let (c, backend) = (0..50)
        .map(|i| sa(CLIENT, 44_000 + i))
        .find_map(|c| {
            let (v, p) = out(&mut lb, syn(c, sa(VIP, 80)), now);
            (v == Verdict::ToTunnel).then(|| (c, checked(&p).dst))
        })
        .unwrap();
    let (v, _) = inb(
        &mut lb,
        tcp(backend, c, TCP_SYN | TCP_ACK, 9, 1001, &[]),
        now,
    );
    assert_eq!(v, Verdict::ToTun);
    // The VIP connection closes (FIN both ways), its entry lingers.
    let (v, _) = out(
        &mut lb,
        tcp(c, sa(VIP, 80), TCP_FIN | TCP_ACK, 1001, 10, &[]),
        now,
    );
    assert_eq!(v, Verdict::ToTunnel);
    let (v, _) = inb(
        &mut lb,
        tcp(backend, c, TCP_FIN | TCP_ACK, 10, 1002, &[]),
        now,
    );
    assert_eq!(v, Verdict::ToTun);
    // Later the client connects to the replica directly, same port.
    let later = now + Duration::from_secs(1);
    let (v, p) = out(&mut lb, syn(c, backend), later);
    assert_eq!(v, Verdict::Pass);
    assert_eq!(checked(&p).dst, backend, "untouched");
    let (v, p) = inb(
        &mut lb,
        tcp(backend, c, TCP_SYN | TCP_ACK, 50, 1, &[]),
        later,
    );
    assert_eq!(
        v,
        Verdict::Pass,
        "the direct connection's SYN-ACK is not translated"
    );
    assert_eq!(checked(&p).src, backend);
}

#[test]
fn a_direct_udp_flow_reusing_a_vip_flows_port_is_left_alone() {
    // A client asks the VIP (DNS-like, UDP) and later the replica directly
    // from the same port, within the VIP flow's 5 min idle timeout: the
    // replica's answers to the direct query must come from the replica.
    let mut lb = lb(&web_state(TrafficPolicy::Spread), &Health::default());
    let now = Instant::now();
    let (c, backend) = (0..50)
        .map(|i| sa(CLIENT, 45_000 + i))
        .find_map(|c| {
            let (v, p) = out(&mut lb, udp(c, sa(VIP, 53), b"q1"), now);
            (v == Verdict::ToTunnel).then(|| (c, checked(&p).dst))
        })
        .unwrap();
    let (v, p) = inb(&mut lb, udp(backend, c, b"a1"), now);
    assert_eq!(v, Verdict::ToTun);
    assert_eq!(checked(&p).src, sa(VIP, 53), "the VIP flow's answer");
    let later = now + Duration::from_secs(10);
    let (v, p) = out(&mut lb, udp(c, backend, b"q2"), later);
    assert_eq!(v, Verdict::Pass);
    assert_eq!(checked(&p).dst, backend, "untouched");
    let (v, p) = inb(&mut lb, udp(backend, c, b"a2"), later);
    assert_eq!(v, Verdict::Pass, "the direct answer is not translated");
    assert_eq!(checked(&p).src, backend);
    // Asking the VIP again from that port makes a new VIP flow.
    let (v, p) = out(&mut lb, udp(c, sa(VIP, 53), b"q3"), later);
    assert_eq!(v, Verdict::ToTunnel);
    let b2 = checked(&p).dst;
    let (v, p) = inb(&mut lb, udp(b2, c, b"a3"), later);
    assert_eq!(v, Verdict::ToTun);
    assert_eq!(checked(&p).src, sa(VIP, 53));
}

#[test]
fn local_reply_to_the_snat_address_is_translated_back() {
    let mut s = mesh();
    add(
        &mut s,
        service("web", VIP, &[(80, 8080, TCP)]),
        Some(endpoints(
            "web",
            &[("c1", false, &[("10.1.0.11", "w", true)])],
        )),
    );
    let mut lb = lb(&s, &Health::default());
    let now = Instant::now();
    let c = sa(CLIENT, 43_000);
    let (v, p) = out(&mut lb, syn(c, sa(VIP, 80)), now);
    assert_eq!(v, Verdict::ToTun);
    let fwd = checked(&p);
    assert_eq!(fwd.src, sa(VIP, 43_000), "client port kept when free");
    assert_eq!(fwd.dst, sa(Ipv4Addr::new(10, 1, 0, 11), 8080));
    // The backend's answer to VIP:43000 comes in from the TUN.
    let (v, p) = out(
        &mut lb,
        tcp(fwd.dst, fwd.src, TCP_SYN | TCP_ACK, 5, 1001, &[]),
        now,
    );
    assert_eq!(v, Verdict::ToTun);
    let r = checked(&p);
    assert_eq!((r.src, r.dst), (sa(VIP, 80), c));
    // A second client with the same port gets another SNAT port.
    let c2 = sa(Ipv4Addr::new(10, 1, 0, 101), 43_000);
    let (_, p) = out(&mut lb, syn(c2, sa(VIP, 80)), now);
    assert_ne!(checked(&p).src, fwd.src);
}

#[test]
fn flows_expire_on_the_synthetic_clock() {
    let mut s = mesh();
    add(
        &mut s,
        service("web", VIP, &[(80, 8080, TCP), (53, 53, UDP)]),
        Some(endpoints("web", &SIX)),
    );
    let mut lb = lb(&s, &Health::default());
    let t0 = Instant::now();
    assert_eq!(lb.poll_timeout(), None, "nothing tracked");
    // Answers come back the way the verdict sent the packet.
    let answer = |lb: &mut Lb, v: Verdict, p: Vec<u8>| {
        if v == Verdict::ToTun {
            assert_eq!(out(lb, p, t0).0, Verdict::ToTun);
        } else {
            assert_eq!(inb(lb, p, t0).0, Verdict::ToTun);
        }
    };
    // UDP both ways and on: assured.
    let u = sa(CLIENT, 5000);
    let (v, p) = out(&mut lb, udp(u, sa(VIP, 53), b"a"), t0);
    let f = checked(&p);
    answer(&mut lb, v, udp(f.dst, f.src, b"r"));
    out(&mut lb, udp(u, sa(VIP, 53), b"b"), t0);
    // UDP one way only: not assured.
    out(&mut lb, udp(sa(CLIENT, 5001), sa(VIP, 53), b"a"), t0);
    // TCP opened but never answered: not assured.
    out(&mut lb, syn(sa(CLIENT, 6000), sa(VIP, 80)), t0);
    // TCP established: SYN, SYN-ACK back, ACK.
    let e = sa(CLIENT, 7000);
    let (v, p) = out(&mut lb, syn(e, sa(VIP, 80)), t0);
    let f = checked(&p);
    answer(
        &mut lb,
        v,
        tcp(f.dst, f.src, TCP_SYN | TCP_ACK, 1, 1001, &[]),
    );
    out(&mut lb, tcp(e, sa(VIP, 80), TCP_ACK, 1001, 2, &[]), t0);
    let (deadline, why) = lb.poll_timeout().unwrap();
    assert_eq!(deadline, t0 + SWEEP_INTERVAL);
    assert!(!why.is_empty());
    let active = |lb: &Lb| lb.stats().active_flows;
    lb.handle_timeout(t0 + UNASSURED_IDLE - Duration::from_secs(1));
    assert_eq!(active(&lb), 4);
    lb.handle_timeout(t0 + UNASSURED_IDLE);
    assert_eq!(
        active(&lb),
        2,
        "unanswered SYN and one-way UDP gone after 30 s"
    );
    lb.handle_timeout(t0 + UDP_IDLE);
    assert_eq!(active(&lb), 1, "UDP gone after 5 min");
    lb.handle_timeout(t0 + TCP_ESTABLISHED_IDLE - Duration::from_secs(1));
    assert_eq!(active(&lb), 1, "established lives 2 h 4 min");
    lb.handle_timeout(t0 + TCP_ESTABLISHED_IDLE);
    assert_eq!(active(&lb), 0);
    assert_eq!(lb.poll_timeout(), None);
    // Traffic refreshes: a one-way UDP flow used every 20 s never expires.
    let t1 = t0 + TCP_ESTABLISHED_IDLE;
    for k in 0..5u32 {
        out(
            &mut lb,
            udp(u, sa(VIP, 53), b"b"),
            t1 + 20 * k * Duration::from_secs(1),
        );
        lb.handle_timeout(t1 + (20 * k + 19) * Duration::from_secs(1));
    }
    assert_eq!(lb.stats().services["default/web"].connections, 5);
}

#[test]
fn closed_connection_reuse_rebalances_and_fin_shortens_timeout() {
    let mut s = mesh();
    add(
        &mut s,
        service("web", VIP, &[(80, 8080, TCP)]),
        Some(endpoints(
            "web",
            &[("c2", true, &[("10.2.0.11", "w", true)])],
        )),
    );
    let mut lb = lb(&s, &Health::default());
    let t0 = Instant::now();
    let c = sa(CLIENT, 44_000);
    let b = sa(Ipv4Addr::new(10, 2, 0, 11), 8080);
    out(&mut lb, syn(c, sa(VIP, 80)), t0);
    inb(&mut lb, tcp(b, c, TCP_SYN | TCP_ACK, 1, 1001, &[]), t0);
    out(
        &mut lb,
        tcp(c, sa(VIP, 80), TCP_FIN | TCP_ACK, 1001, 2, &[]),
        t0,
    );
    inb(&mut lb, tcp(b, c, TCP_FIN | TCP_ACK, 2, 1002, &[]), t0);
    lb.handle_timeout(t0 + TCP_TRANSITORY_IDLE);
    assert_eq!(lb.stats().active_flows, 0, "closed flows are transitory");
    // The same 5-tuple again after close: counted as a new connection.
    out(&mut lb, syn(c, sa(VIP, 80)), t0 + TCP_TRANSITORY_IDLE);
    inb(
        &mut lb,
        tcp(b, c, TCP_RST | TCP_ACK, 0, 1001, &[]),
        t0 + TCP_TRANSITORY_IDLE,
    );
    out(&mut lb, syn(c, sa(VIP, 80)), t0 + TCP_TRANSITORY_IDLE);
    assert_eq!(lb.stats().services["default/web"].connections, 3);
}

#[test]
fn set_table_keeps_live_flows_and_rebalances_the_rest() {
    let s = web_state(TrafficPolicy::Spread);
    let mut lb = lb(&s, &Health::default());
    let now = Instant::now();
    let mut before = BTreeMap::new();
    for i in 0..120u16 {
        let (_, p) = out(&mut lb, syn(sa(CLIENT, 50_000 + i), sa(VIP, 80)), now);
        before.insert(i, dst_ip(&p));
    }
    // Replica 10.2.0.11 becomes unready.
    let mut s2 = s.clone();
    let gone = Ipv4Addr::new(10, 2, 0, 11);
    let mut eps = endpoints("web", &SIX);
    eps.status.as_mut().unwrap().clusters[1].addresses[0].ready = false;
    s2.endpoints.insert(("default".into(), "web".into()), eps);
    let t2 = LbTable::rebuild(Some(lb.table()), &s2, lb.config(), &Health::default());
    lb.set_table(Arc::new(t2));
    let moved_on = before.values().filter(|ip| **ip == gone).count() as u64;
    assert!(moved_on > 0);
    assert_eq!(lb.stats().active_flows, 120 - moved_on);
    for (i, was) in &before {
        let (_, p) = out(
            &mut lb,
            tcp(sa(CLIENT, 50_000 + i), sa(VIP, 80), TCP_ACK, 1, 1, &[]),
            now,
        );
        let now_at = dst_ip(&p);
        if *was == gone {
            assert_ne!(now_at, gone, "flow {i} re-balanced");
        } else {
            assert_eq!(now_at, *was, "flow {i} kept");
        }
    }
    assert_eq!(
        lb.stats().services["default/web"].connections,
        120 + moved_on
    );
    // Removing the service drops its flows; its VIP stops answering.
    let mut s3 = s.clone();
    s3.services.clear();
    lb.set_table(Arc::new(LbTable::build(
        &s3,
        lb.config(),
        &Health::default(),
    )));
    assert_eq!(lb.stats().active_flows, 0);
    assert_eq!(
        out(&mut lb, syn(sa(CLIENT, 50_000), sa(VIP, 80)), now).0,
        Verdict::Drop(LbDrop::NotAVip)
    );
}

#[test]
fn peer_down_moves_its_flows_at_once() {
    let s = web_state(TrafficPolicy::Spread);
    let mut lb = lb(&s, &Health::default());
    let now = Instant::now();
    spread(&mut lb, 60, now);
    let health = Health {
        peers_down: ["c3".into()].into(),
        ..Default::default()
    };
    lb.set_table(Arc::new(LbTable::build(&s, lb.config(), &health)));
    for i in 0..60u16 {
        let (_, p) = out(
            &mut lb,
            tcp(sa(CLIENT, 20_000 + i), sa(VIP, 80), TCP_ACK, 1, 1, &[]),
            now,
        );
        assert_ne!(dst_ip(&p).octets()[1], 3);
    }
}

#[test]
fn a_suspect_peer_takes_no_new_flows_and_loses_only_unanswered_ones() {
    let s = web_state(TrafficPolicy::Spread);
    let mut lb = lb(&s, &Health::default());
    let now = Instant::now();
    // Flows to c3: some answered by their backend, some not yet.
    let mut answered = Vec::new();
    let mut unanswered = Vec::new();
    for i in 0..200u16 {
        let c = sa(CLIENT, 30_000 + i);
        let (_, p) = out(&mut lb, syn(c, sa(VIP, 80)), now);
        let b = dst_ip(&p);
        if b.octets()[1] != 3 {
            continue;
        }
        if i % 2 == 0 {
            let reply = tcp(sa(b, 8080), c, TCP_SYN | TCP_ACK, 1, 1, &[]);
            let (v, _) = inb(&mut lb, reply, now);
            assert_eq!(v, Verdict::ToTun);
            answered.push((c, b));
        } else {
            unanswered.push(c);
        }
    }
    assert!(!answered.is_empty() && !unanswered.is_empty());
    let health = Health {
        peers_suspect: ["c3".into()].into(),
        ..Default::default()
    };
    lb.set_table(Arc::new(LbTable::build(&s, lb.config(), &health)));
    // Answered flows stay where they are.
    for (c, b) in &answered {
        let (_, p) = out(&mut lb, tcp(*c, sa(VIP, 80), TCP_ACK, 2, 2, &[]), now);
        assert_eq!(dst_ip(&p), *b);
    }
    // A retransmitted SYN of an unanswered flow, and every new flow, goes
    // elsewhere.
    for c in unanswered {
        let (_, p) = out(&mut lb, syn(c, sa(VIP, 80)), now);
        assert_ne!(dst_ip(&p).octets()[1], 3, "retransmitted SYN moved");
    }
    for i in 0..100u16 {
        let (_, p) = out(&mut lb, syn(sa(CLIENT, 40_000 + i), sa(VIP, 80)), now);
        assert_ne!(dst_ip(&p).octets()[1], 3, "no new flows to a suspect peer");
    }
    // When every candidate is suspect, they all keep serving.
    let health = Health {
        peers_suspect: ["c1".into(), "c2".into(), "c3".into()].into(),
        ..Default::default()
    };
    lb.set_table(Arc::new(LbTable::build(&s, lb.config(), &health)));
    let got = spread(&mut lb, 120, now);
    assert!(got.len() > 1, "{got:?}");
}

#[test]
fn icmp_errors_about_translated_packets_are_translated() {
    let mut lb = lb(&web_state(TrafficPolicy::Spread), &Health::default());
    let now = Instant::now();
    let c = sa(CLIENT, 45_000);
    let mut sent = None;
    for i in 0..50 {
        let c = sa(CLIENT, 45_000 + i);
        let (v, p) = out(&mut lb, udp(c, sa(VIP, 53), b"q"), now);
        if v == Verdict::ToTunnel {
            sent = Some((c, p));
            break;
        }
    }
    let (c, p) = sent.unwrap_or((c, Vec::new()));
    let fwd = checked(&p);
    // The remote backend says port unreachable about what it received.
    let mut icmp = Vec::new();
    let h = packet::parse_ipv4(&p).unwrap();
    packet::build_icmp_unreachable(&p, &h, *fwd.dst.ip(), 3, &mut icmp);
    let (v, e) = inb(&mut lb, icmp, now);
    assert_eq!(v, Verdict::ToTun);
    let r = checked(&e);
    assert_eq!((*r.src.ip(), *r.dst.ip()), (VIP, *c.ip()));
    // The quote now shows what the client sent: client → VIP:53.
    let qip = etherparse::Ipv4HeaderSlice::from_slice(&r.payload)
        .unwrap()
        .to_header();
    assert_eq!(qip.header_checksum, qip.calc_header_checksum());
    assert_eq!(
        (qip.source, qip.destination),
        (c.ip().octets(), VIP.octets())
    );
    assert_eq!(
        &r.payload[20..24],
        &[c.port().to_be_bytes(), 53u16.to_be_bytes()].concat()[..]
    );
}

#[test]
fn later_fragments_follow_the_first() {
    let mut s = mesh();
    add(
        &mut s,
        service("dns", VIP, &[(53, 5353, UDP)]),
        Some(endpoints(
            "dns",
            &[("c2", true, &[("10.2.0.7", "d", true)])],
        )),
    );
    let mut lb = lb(&s, &Health::default());
    let now = Instant::now();
    let whole = udp(sa(CLIENT, 999), sa(VIP, 53), &[7u8; 64]);
    // Split after 8 + 16 bytes of UDP: offset 3 (×8 bytes) for the rest.
    let mut first = whole[..20 + 24].to_vec();
    let mut rest = [&whole[..20], &whole[20 + 24..]].concat();
    let fix = |p: &mut Vec<u8>, mf: bool, off: u16| {
        let len = p.len() as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p[6..8].copy_from_slice(&((u16::from(mf) << 13) | off).to_be_bytes());
        p[10..12].copy_from_slice(&[0, 0]);
        let c = packet::checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    };
    fix(&mut first, true, 0);
    fix(&mut rest, false, 3);
    assert_eq!(
        lb.outbound(&mut rest.clone(), &mut Vec::new(), now),
        Verdict::Drop(LbDrop::Fragment)
    );
    assert_eq!(
        lb.outbound(&mut first, &mut Vec::new(), now),
        Verdict::ToTunnel
    );
    assert_eq!(
        lb.outbound(&mut rest, &mut Vec::new(), now),
        Verdict::ToTunnel
    );
    assert_eq!(dst_ip(&rest), Ipv4Addr::new(10, 2, 0, 7));
    assert_eq!(packet::checksum(&rest[..20]), 0);
    // Reassembled, the datagram's UDP checksum is right.
    let mut joined = [&first[..], &rest[20..]].concat();
    fix(&mut joined, false, 0);
    let r = checked(&joined);
    assert_eq!(r.dst, sa(Ipv4Addr::new(10, 2, 0, 7), 5353));
}

#[test]
fn reply_generation_is_rate_limited() {
    let mut s = mesh();
    add(&mut s, service("web", VIP, &[(80, 8080, TCP)]), None);
    let mut lb = lb(&s, &Health::default());
    let now = Instant::now();
    let mut verdicts = BTreeMap::new();
    for i in 0..1100u32 {
        let (v, _) = out(
            &mut lb,
            syn(sa(CLIENT, (i % 60_000) as u16 + 1), sa(VIP, 80)),
            now,
        );
        *verdicts.entry(v).or_insert(0) += 1;
    }
    assert_eq!(verdicts[&Verdict::Reply], 1000);
    assert_eq!(verdicts[&Verdict::Drop(LbDrop::RateLimited)], 100);
    assert_eq!(
        out(
            &mut lb,
            syn(sa(CLIENT, 1), sa(VIP, 80)),
            now + Duration::from_secs(1)
        )
        .0,
        Verdict::Reply
    );
}

#[test]
fn icmp_errors_on_the_snat_path_are_translated_both_ways() {
    let mut s = mesh();
    add(
        &mut s,
        service("dns", VIP, &[(53, 5353, UDP)]),
        Some(endpoints(
            "dns",
            &[("c1", true, &[("10.1.0.7", "d", true)])],
        )),
    );
    let mut lb = lb(&s, &Health::default());
    let now = Instant::now();
    let c = sa(CLIENT, 33_333);
    let (v, fwd) = out(&mut lb, udp(c, sa(VIP, 53), b"q"), now);
    assert_eq!(v, Verdict::ToTun);
    let f = checked(&fwd);
    let quote = |p: &[u8]| {
        let q = etherparse::Ipv4HeaderSlice::from_slice(p)
            .unwrap()
            .to_header();
        assert_eq!(q.header_checksum, q.calc_header_checksum());
        let port = |at: usize| u16::from_be_bytes([p[at], p[at + 1]]);
        (
            sa(q.source.into(), port(20)),
            sa(q.destination.into(), port(22)),
        )
    };
    // The local backend refuses: error to VIP:snat from the backend.
    let mut icmp = Vec::new();
    packet::build_icmp_unreachable(
        &fwd,
        &packet::parse_ipv4(&fwd).unwrap(),
        *f.dst.ip(),
        3,
        &mut icmp,
    );
    let (v, e) = out(&mut lb, icmp, now);
    assert_eq!(v, Verdict::ToTun);
    let r = checked(&e);
    assert_eq!((*r.src.ip(), *r.dst.ip()), (VIP, *c.ip()));
    assert_eq!(quote(&r.payload), (c, sa(VIP, 53)));
    // The client refuses the backend's reply: error to the VIP from the client.
    let (_, back) = out(&mut lb, udp(f.dst, f.src, b"answer"), now);
    let mut icmp = Vec::new();
    packet::build_icmp_unreachable(
        &back,
        &packet::parse_ipv4(&back).unwrap(),
        *c.ip(),
        3,
        &mut icmp,
    );
    let (v, e) = out(&mut lb, icmp, now);
    assert_eq!(v, Verdict::ToTun);
    let r = checked(&e);
    assert_eq!((*r.src.ip(), *r.dst.ip()), (VIP, *f.dst.ip()));
    assert_eq!(quote(&r.payload), (f.dst, f.src));
    // About no flow at all: dropped.
    let stray = udp(sa(VIP, 53), sa(CLIENT, 1), b"x");
    let mut icmp = Vec::new();
    packet::build_icmp_unreachable(
        &stray,
        &packet::parse_ipv4(&stray).unwrap(),
        *c.ip(),
        3,
        &mut icmp,
    );
    assert_eq!(out(&mut lb, icmp, now).0, Verdict::Drop(LbDrop::NoFlow));
}

/// A balancer over `s` with these bounds.
fn lb_with(s: &crate::state::NetState, limits: FlowLimits) -> Lb {
    let cfg = LbConfig { limits, ..cfg() };
    let mut lb = Lb::new(cfg.clone());
    lb.set_table(Arc::new(LbTable::build(s, &cfg, &Health::default())));
    lb
}

/// Opens a connection from `c` to the VIP the way a real client does: SYN,
/// the backend's SYN-ACK back, the client's ACK. Returns the SYN's verdict.
fn connect(lb: &mut Lb, c: std::net::SocketAddrV4, now: Instant) -> Verdict {
    let (v, p) = out(lb, syn(c, sa(VIP, 80)), now);
    if !matches!(v, Verdict::ToTun | Verdict::ToTunnel) {
        return v;
    }
    let f = checked(&p);
    let answer = tcp(f.dst, f.src, TCP_SYN | TCP_ACK, 1, 1001, &[]);
    let back = if v == Verdict::ToTun {
        out(lb, answer, now).0
    } else {
        inb(lb, answer, now).0
    };
    assert_eq!(back, Verdict::ToTun, "SYN-ACK to {c} translated back");
    let (ack, _) = out(lb, tcp(c, sa(VIP, 80), TCP_ACK, 1001, 2, &[]), now);
    assert_eq!(ack, v, "ACK from {c} follows its flow");
    v
}

#[test]
fn a_spoofed_syn_flood_never_locks_out_real_clients() {
    let s = web_state(TrafficPolicy::Spread);
    let limits = FlowLimits {
        max_flows: 2000,
        ..FlowLimits::default()
    };
    let mut lb = lb_with(&s, limits);
    let t0 = Instant::now();
    // Established before the flood.
    let before = sa(CLIENT, 40_000);
    assert!(matches!(
        connect(&mut lb, before, t0),
        Verdict::ToTun | Verdict::ToTunnel
    ));
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut now = t0;
    for second in 0..20u32 {
        // 20 s of 5,000 spoofed SYNs a second (random source and port),
        // 2.5 times the table each second.
        for _ in 0..5000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let src = sa(
                Ipv4Addr::from((rng >> 32) as u32 | 0x0a00_0000),
                rng as u16 | 1,
            );
            out(&mut lb, syn(src, sa(VIP, 80)), now);
        }
        // A real client connects meanwhile, every second, and gets through.
        let c = sa(Ipv4Addr::new(10, 1, 7, 7), 30_000 + second as u16);
        assert!(
            matches!(connect(&mut lb, c, now), Verdict::ToTun | Verdict::ToTunnel),
            "second {second}: real connection refused"
        );
        now += Duration::from_secs(1);
        lb.handle_timeout(now);
    }
    let st = lb.stats();
    assert!(st.evicted_flows > 90_000, "evicted {}", st.evicted_flows);
    assert_eq!(st.drops.get(&LbDrop::FlowTableFull), None);
    assert!(st.active_flows <= 2000);
    // The flows that completed their handshakes are all still there.
    for (i, c) in std::iter::once(before)
        .chain((0..20u16).map(|k| sa(Ipv4Addr::new(10, 1, 7, 7), 30_000 + k)))
        .enumerate()
    {
        let (v, _) = out(&mut lb, tcp(c, sa(VIP, 80), TCP_ACK, 1, 1, &[]), now);
        assert!(
            matches!(v, Verdict::ToTun | Verdict::ToTunnel),
            "flow {i} kept"
        );
    }
    // 30 s after the flood ends its entries are gone.
    lb.handle_timeout(now + UNASSURED_IDLE);
    assert_eq!(lb.stats().active_flows, 21);
}

#[test]
fn affinity_pins_are_bounded_least_recently_used_first() {
    let mut s = mesh();
    let svc = with_affinity(service("web", VIP, &[(80, 8080, TCP)]), 3600);
    add(&mut s, svc, Some(endpoints("web", &SIX)));
    let limits = FlowLimits {
        max_affinities: 100,
        ..FlowLimits::default()
    };
    let mut lb = lb_with(&s, limits);
    let t0 = Instant::now();
    for i in 0..1000u32 {
        let c = sa(Ipv4Addr::from(0x0a01_0000 + i), 1000);
        out(&mut lb, syn(c, sa(VIP, 80)), t0);
    }
    assert_eq!(lb.stats().affinities, 100);
}

/// Issue #18 at the client's gateway: `web` whitelists
/// `default/frontend`; frontend's job gets a replica, batch's job gets a
/// reset (TCP) or administratively prohibited (UDP) at once, counted, with
/// no flow, SNAT port or affinity taken.
const FRONTEND: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 50);
const BATCH: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 60);

/// `web` (replicas in three clusters, VIP [`VIP`]) whitelisting
/// `whitelists`, and the services `frontend` and `batch` with one local
/// job each ([`FRONTEND`], [`BATCH`]).
fn policy_state(whitelists: &[&str]) -> crate::state::NetState {
    let mut s = web_state(TrafficPolicy::Spread);
    set_whitelists(&mut s, "web", whitelists);
    for (name, vip, ip) in [
        ("frontend", Ipv4Addr::new(100, 65, 0, 20), "10.1.0.50"),
        ("batch", Ipv4Addr::new(100, 65, 0, 30), "10.1.0.60"),
    ] {
        add(
            &mut s,
            service(name, vip, &[(80, 80, TCP)]),
            Some(endpoints(name, &[("c1", true, &[(ip, name, true)])])),
        );
    }
    s
}

/// Sets service `name`'s whitelists.
fn set_whitelists(s: &mut crate::state::NetState, name: &str, whitelists: &[&str]) {
    let key = ("default".to_string(), name.to_string());
    let mut svc = (**s.services.get(&key).unwrap()).clone();
    svc.spec.as_mut().unwrap().whitelists = whitelists.iter().map(|w| w.to_string()).collect();
    s.services.insert(key, Arc::new(svc));
}

fn is_admin_prohibited(p: &[u8]) -> bool {
    let TransportHeader::Icmpv4(i) = checked(p).transport else {
        return false;
    };
    matches!(
        i.icmp_type,
        Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FilterProhibited
        )
    )
}

/// Issue #18 for UDP to a job's IP: a call the policy allows is tracked,
/// so its replies pass although the other way is no allowed call; a
/// refused one gets ICMP administratively prohibited; a change cuts a
/// tracked call both ways and lets in what it now allows.
#[test]
fn direct_udp_calls_are_tracked_and_cut_by_a_change() {
    let mut s = policy_state(&["default/frontend"]);
    // Only db may call frontend: web's replies are no allowed call.
    set_whitelists(&mut s, "frontend", &["default/db"]);
    let mut lb = lb(&s, &Health::default());
    let now = Instant::now();
    let web = Ipv4Addr::new(10, 3, 0, 11);
    let (v, _) = out(&mut lb, udp(sa(FRONTEND, 5000), sa(web, 9090), b"q"), now);
    assert_eq!(v, Verdict::Pass);
    let (v, _) = inb(&mut lb, udp(sa(web, 9090), sa(FRONTEND, 5000), b"a"), now);
    assert_eq!(v, Verdict::Pass, "a reply to an allowed call");
    let (v, _) = inb(&mut lb, udp(sa(web, 9091), sa(FRONTEND, 5000), b"x"), now);
    assert_eq!(v, Verdict::Reply, "web calling frontend");
    let (v, p) = out(&mut lb, udp(sa(BATCH, 5000), sa(web, 9090), b"q"), now);
    assert_eq!(v, Verdict::Reply);
    assert!(is_admin_prohibited(&p));
    assert_eq!(lb.direct.len(), 1);

    let mut s = policy_state(&["default/batch"]);
    set_whitelists(&mut s, "frontend", &["default/db"]);
    lb.set_table(Arc::new(LbTable::build(&s, &cfg(), &Health::default())));
    let (v, p) = out(&mut lb, udp(sa(FRONTEND, 5000), sa(web, 9090), b"q"), now);
    assert_eq!(v, Verdict::Reply, "the cut call");
    assert!(is_admin_prohibited(&p));
    let (v, _) = inb(&mut lb, udp(sa(web, 9090), sa(FRONTEND, 5000), b"a"), now);
    assert_eq!(v, Verdict::Reply, "its replies too");
    let (v, _) = out(&mut lb, udp(sa(BATCH, 5000), sa(web, 9090), b"q"), now);
    assert_eq!(v, Verdict::Pass, "batch is let in");
    // Without any policy nothing is tracked.
    lb.set_table(Arc::new(LbTable::build(
        &web_state(TrafficPolicy::Spread),
        &cfg(),
        &Health::default(),
    )));
    assert_eq!(lb.direct.len(), 0);
    let (v, _) = out(&mut lb, udp(sa(FRONTEND, 5000), sa(web, 9090), b"q"), now);
    assert_eq!(v, Verdict::Pass);
    assert_eq!(lb.direct.len(), 0);
}

/// Issue #18: a change cuts an open TCP connection straight to a job
/// (the client's next segment gets a RST, the job's are dropped); a new
/// connection on the same ports is judged anew.
#[test]
fn a_policy_change_cuts_direct_tcp_connections() {
    let s = policy_state(&["default/frontend", "default/batch"]);
    let mut lb = lb(&s, &Health::default());
    let now = Instant::now();
    let web = Ipv4Addr::new(10, 3, 0, 11);
    let (c, w) = (sa(BATCH, 40_000), sa(web, 8080));
    assert_eq!(out(&mut lb, syn(c, w), now).0, Verdict::Pass);
    let synack = tcp(w, c, TCP_SYN | TCP_ACK, 1, 1, &[]);
    assert_eq!(inb(&mut lb, synack, now).0, Verdict::Pass);
    let s = policy_state(&["default/frontend"]);
    lb.set_table(Arc::new(LbTable::build(&s, &cfg(), &Health::default())));
    // The client's next segment resets both ends: it goes on as a reset
    // (in order for the replica: its own seq), and the client gets one
    // (seq: what it acknowledged).
    let resets = |lb: &mut Lb, mut p: Vec<u8>, outbound: bool| {
        let mut reply = Vec::new();
        let v = if outbound {
            lb.outbound(&mut p, &mut reply, now)
        } else {
            lb.inbound(&mut p, &mut reply, now)
        };
        assert_eq!(v, Verdict::ResetOnward);
        let seq = |p: &[u8]| {
            let s = checked(p);
            let TransportHeader::Tcp(t) = s.transport else {
                panic!()
            };
            assert!(t.rst && !t.syn && !t.fin, "{t:?}");
            (s.src, s.dst, t.sequence_number)
        };
        (seq(&p), seq(&reply))
    };
    let (onward, back) = resets(&mut lb, tcp(c, w, TCP_ACK, 2, 5, b"x"), true);
    assert_eq!((onward, back), ((c, w, 2), (w, c, 5)));
    // So does the replica's, coming through the tunnel.
    let (onward, back) = resets(&mut lb, tcp(w, c, TCP_ACK | TCP_FIN, 5, 3, b"y"), false);
    assert_eq!((onward, back), ((w, c, 5), (c, w, 3)));
    // Let in again: the same connection goes on.
    let s = policy_state(&["default/frontend", "default/batch"]);
    lb.set_table(Arc::new(LbTable::build(&s, &cfg(), &Health::default())));
    assert_eq!(
        out(&mut lb, tcp(c, w, TCP_ACK, 3, 3, b"x"), now).0,
        Verdict::Pass
    );
}

/// Issue #18: a whitelist change cuts the VIP flows it forbids at once
/// (the client's next packet is reset), and keeps the others.
#[test]
fn a_policy_change_cuts_the_flows_it_forbids() {
    let both = policy_state(&["default/frontend", "default/batch"]);
    let mut lb = lb(&both, &Health::default());
    let now = Instant::now();
    for c in [sa(FRONTEND, 30_000), sa(BATCH, 40_000)] {
        let (v, _) = out(&mut lb, syn(c, sa(VIP, 80)), now);
        assert!(matches!(v, Verdict::ToTun | Verdict::ToTunnel), "{v:?}");
    }
    assert_eq!(lb.stats().active_flows, 2);
    let only_frontend = policy_state(&["default/frontend"]);
    lb.set_table(Arc::new(LbTable::build(
        &only_frontend,
        &cfg(),
        &Health::default(),
    )));
    assert_eq!(lb.stats().active_flows, 1, "batch's flow is cut");
    let (v, _) = out(
        &mut lb,
        tcp(sa(FRONTEND, 30_000), sa(VIP, 80), TCP_ACK, 2, 2, b"x"),
        now,
    );
    assert!(matches!(v, Verdict::ToTun | Verdict::ToTunnel), "{v:?}");
    let (v, p) = out(
        &mut lb,
        tcp(sa(BATCH, 40_000), sa(VIP, 80), TCP_ACK, 2, 2, b"x"),
        now,
    );
    // Reset at both ends (a_cut_flows_next_client_segment_resets_both_ends).
    assert!(matches!(v, Verdict::Reset | Verdict::ResetOnward), "{v:?}");
    let TransportHeader::Tcp(t) = checked(&p).transport else {
        panic!()
    };
    assert!(t.rst);
}

/// A replica's answer on a flow a policy change cut resets both ends at
/// once: a client whose SYN got through a moment before the change is
/// refused now, not at its SYN retry a second later. Over many clients,
/// so that both paths (local replica, SNAT; remote, through a tunnel) are
/// taken.
#[test]
fn a_cut_flows_next_reply_resets_both_ends() {
    let both = policy_state(&["default/frontend", "default/batch"]);
    let mut lb = lb(&both, &Health::default());
    let now = Instant::now();
    let mut sent = Vec::new();
    for port in 40_000..40_016 {
        let client = sa(BATCH, port);
        let mut p = syn(client, sa(VIP, 80));
        let mut reply = Vec::new();
        let v = lb.outbound(&mut p, &mut reply, now);
        assert!(matches!(v, Verdict::ToTun | Verdict::ToTunnel), "{v:?}");
        let s = checked(&p);
        sent.push((client, v, s.src, s.dst));
    }
    let (v, p) = out(&mut lb, udp(sa(BATCH, 50_000), sa(VIP, 53), b"q"), now);
    let dgram = checked(&p);
    lb.set_table(Arc::new(LbTable::build(
        &policy_state(&["default/frontend"]),
        &cfg(),
        &Health::default(),
    )));
    assert_eq!(lb.stats().active_flows, 0);
    let key = (Arc::from("default/web"), Arc::from("default/batch"));
    assert_eq!(
        lb.stats().policy_denied[&key],
        17,
        "cut calls are refused ones"
    );
    // A UDP answer on a cut flow is dropped, not passed untranslated.
    let answer = udp(dgram.dst, dgram.src, b"a");
    let got = match v {
        Verdict::ToTun => out(&mut lb, answer, now).0,
        _ => inb(&mut lb, answer, now).0,
    };
    assert_eq!(got, Verdict::Drop(LbDrop::PolicyCut), "{v:?}");
    let mut paths = BTreeMap::new();
    for (k, (client, v, from, replica)) in sent.into_iter().enumerate() {
        // The replica's SYN+ACK (its ISN 7000) acknowledges the client's
        // SYN (seq 1000); or, as if later, data with a FIN, or a reset of
        // its own (which needs no answer).
        let (flags, payload): (u8, &[u8]) = match k % 3 {
            0 => (TCP_SYN | TCP_ACK, &[]),
            1 => (TCP_ACK | TCP_FIN, b"data"),
            _ => (TCP_RST | TCP_ACK, &[]),
        };
        let mut p = tcp(replica, from, flags, 7000, 1001, payload);
        let mut reply = Vec::new();
        let got = if v == Verdict::ToTun {
            lb.outbound(&mut p, &mut reply, now)
        } else {
            lb.inbound(&mut p, &mut reply, now)
        };
        assert_eq!(got, Verdict::Reset, "{v:?}");
        *paths.entry(format!("{v:?}")).or_insert(0) += 1;
        let c = checked(&p);
        assert_eq!((c.src, c.dst), (sa(VIP, 80), client));
        let TransportHeader::Tcp(t) = c.transport else {
            panic!()
        };
        assert!(t.rst && t.ack && !t.syn && !t.fin, "{t:?}");
        assert_eq!(t.acknowledgment_number, 1001, "acknowledges the SYN");
        assert_eq!(t.sequence_number, 7000, "in order");
        if flags & TCP_RST != 0 {
            assert!(reply.is_empty(), "a reset is not answered");
            continue;
        }
        let r = checked(&reply);
        assert_eq!((r.src, r.dst), (from, replica));
        let TransportHeader::Tcp(t) = r.transport else {
            panic!()
        };
        assert!(t.rst, "{t:?}");
        assert_eq!(t.sequence_number, 1001, "in the replica's window");
        // Done: a retransmitted SYN+ACK is no longer translated.
        let mut p = tcp(replica, from, TCP_SYN | TCP_ACK, 7000, 1001, &[]);
        let again = if v == Verdict::ToTun {
            lb.outbound(&mut p, &mut reply, now)
        } else {
            lb.inbound(&mut p, &mut reply, now)
        };
        assert_ne!(again, Verdict::Reset);
    }
    assert_eq!(paths.len(), 2, "both paths taken: {paths:?}");
    assert_eq!(lb.stats().replies[&LbReply::Policy], 16);
}

/// A client's next segment on a cut VIP flow resets both ends too: it
/// goes on to the replica as a reset (translated as the flow was), and the
/// client gets one from the VIP; after that the tuple is refused as a new
/// call would be.
#[test]
fn a_cut_flows_next_client_segment_resets_both_ends() {
    let mut lb = lb(
        &policy_state(&["default/frontend", "default/batch"]),
        &Health::default(),
    );
    let now = Instant::now();
    let mut sent = Vec::new();
    for port in 41_000..41_012 {
        let client = sa(BATCH, port);
        let (v, p) = out(&mut lb, syn(client, sa(VIP, 80)), now);
        let s = checked(&p);
        sent.push((client, v, s.src, s.dst));
    }
    lb.set_table(Arc::new(LbTable::build(
        &policy_state(&["default/frontend"]),
        &cfg(),
        &Health::default(),
    )));
    let mut paths = BTreeMap::new();
    for (client, v, from, replica) in sent {
        let mut p = tcp(client, sa(VIP, 80), TCP_ACK, 1001, 7001, b"GET");
        let mut reply = Vec::new();
        let got = lb.outbound(&mut p, &mut reply, now);
        let want = if v == Verdict::ToTun {
            Verdict::Reset
        } else {
            Verdict::ResetOnward
        };
        assert_eq!(got, want, "{v:?}");
        *paths.entry(format!("{v:?}")).or_insert(0) += 1;
        let c = checked(&p);
        assert_eq!((c.src, c.dst), (from, replica));
        let TransportHeader::Tcp(t) = c.transport else {
            panic!()
        };
        assert!(t.rst && t.ack, "{t:?}");
        assert_eq!(t.sequence_number, 1001, "in order for the replica");
        let r = checked(&reply);
        assert_eq!((r.src, r.dst), (sa(VIP, 80), client));
        let TransportHeader::Tcp(t) = r.transport else {
            panic!()
        };
        assert!(t.rst);
        assert_eq!(t.sequence_number, 7001, "in order for the client");
        // Done: the next segment is refused as a new call would be.
        let (again, _) = out(
            &mut lb,
            tcp(client, sa(VIP, 80), TCP_ACK, 1004, 7001, b"x"),
            now,
        );
        assert_eq!(again, Verdict::Reply);
    }
    assert_eq!(paths.len(), 2, "both paths taken: {paths:?}");
}

/// Issue #18 for calls to a job's IP: the caller's gateway answers a
/// refused SYN with a RST; the job's gateway drops one that comes through
/// a tunnel anyway; what follows a SYN, and replies, are not judged.
#[test]
fn direct_connections_to_a_job_are_judged_on_the_syn() {
    let s = policy_state(&["default/frontend"]);
    let mut lb = lb(&s, &Health::default());
    let now = Instant::now();
    // web-3a, a replica in c3, from batch here.
    let web = Ipv4Addr::new(10, 3, 0, 11);
    let (v, p) = out(&mut lb, syn(sa(BATCH, 40_000), sa(web, 8080)), now);
    assert_eq!(v, Verdict::Reply);
    let r = checked(&p);
    assert_eq!((*r.src.ip(), *r.dst.ip()), (web, BATCH));
    let TransportHeader::Tcp(t) = r.transport else {
        panic!()
    };
    assert!(t.rst);
    let (v, _) = out(&mut lb, syn(sa(FRONTEND, 40_000), sa(web, 8080)), now);
    assert_eq!(v, Verdict::Pass);
    let (v, _) = out(
        &mut lb,
        tcp(sa(BATCH, 40_001), sa(web, 8080), TCP_ACK, 2, 2, b"x"),
        now,
    );
    assert_eq!(v, Verdict::Pass, "not a new connection");
    // At web's own gateway (a tunnel brings batch's SYN to web-1a here).
    let web_here = Ipv4Addr::new(10, 1, 0, 11);
    let (v, _) = inb(&mut lb, syn(sa(BATCH, 40_002), sa(web_here, 8080)), now);
    assert_eq!(v, Verdict::Reply);
    let (v, _) = inb(&mut lb, syn(sa(FRONTEND, 40_002), sa(web_here, 8080)), now);
    assert_eq!(v, Verdict::Pass);
    // A reply of web's to batch (SYN+ACK) passes.
    let (v, _) = inb(
        &mut lb,
        tcp(
            sa(web_here, 8080),
            sa(BATCH, 40_003),
            TCP_SYN | TCP_ACK,
            1,
            1,
            &[],
        ),
        now,
    );
    assert_eq!(v, Verdict::Pass);
    let key = (
        Arc::<str>::from("default/web"),
        Arc::<str>::from("default/batch"),
    );
    assert_eq!(lb.stats().policy_denied[&key], 2);
}

#[test]
fn the_service_policy_refuses_new_flows_before_anything_is_allocated() {
    let s = policy_state(&["default/frontend"]);
    let (frontend, batch) = (FRONTEND, BATCH);
    let mut lb = lb(&s, &Health::default());
    assert!(!lb.table().policy().is_empty());
    let now = Instant::now();
    for port in 0..20 {
        let (v, _) = out(&mut lb, syn(sa(frontend, 30_000 + port), sa(VIP, 80)), now);
        assert!(matches!(v, Verdict::ToTun | Verdict::ToTunnel), "{v:?}");
    }
    let flows = lb.stats().active_flows;
    assert_eq!(flows, 20);
    let (v, p) = out(&mut lb, syn(sa(batch, 40_000), sa(VIP, 80)), now);
    assert_eq!(v, Verdict::Reply);
    let r = checked(&p);
    assert_eq!((*r.src.ip(), *r.dst.ip()), (VIP, batch));
    let TransportHeader::Tcp(t) = r.transport else {
        panic!()
    };
    assert!(t.rst);
    let orig = udp(sa(batch, 5353), sa(VIP, 53), b"query");
    let (v, p) = out(&mut lb, orig, now);
    assert_eq!(v, Verdict::Reply);
    let TransportHeader::Icmpv4(i) = checked(&p).transport else {
        panic!()
    };
    assert!(
        matches!(
            i.icmp_type,
            Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FilterProhibited
            )
        ),
        "{:?}",
        i.icmp_type
    );
    let st = lb.stats();
    assert_eq!(st.active_flows, flows, "a refused call takes no flow");
    assert_eq!(st.replies[&LbReply::Policy], 2);
    let key = (
        Arc::<str>::from("default/web"),
        Arc::<str>::from("default/batch"),
    );
    assert_eq!(st.policy_denied[&key], 2);
    // Other services stay open to batch.
    let (v, _) = out(
        &mut lb,
        syn(sa(batch, 40_001), sa(Ipv4Addr::new(100, 65, 0, 20), 80)),
        now,
    );
    assert!(matches!(v, Verdict::ToTun | Verdict::ToTunnel), "{v:?}");
}
