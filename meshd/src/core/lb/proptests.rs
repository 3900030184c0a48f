//! Property tests: random TCP/UDP packets translated out and back restore
//! the original addresses and ports with every checksum valid (checked by
//! etherparse), and arbitrary bytes never upset the balancer.

use std::net::Ipv4Addr;
use std::time::Instant;

use proptest::prelude::*;
use skymesh_proto::v1::Protocol;

use super::packet::{TCP_ACK, TCP_FIN, TCP_SYN};
use super::testutil::*;
use super::*;

/// One service at VIP with ports 80→8080/TCP, 53→5353/UDP, 443→443/TCP
/// and one ready backend, in this cluster (`local`) or in c2.
fn single_backend(local: bool) -> (Lb, Ipv4Addr) {
    let mut s = mesh();
    let ports = [
        (80, 8080, Protocol::Tcp),
        (53, 5353, Protocol::Udp),
        (443, 0, Protocol::Tcp),
    ];
    let (cluster, ip) = if local {
        ("c1", "10.1.0.11")
    } else {
        ("c2", "10.2.0.11")
    };
    let addrs: &[Addr<'_>] = &[(ip, "w", true)];
    add(
        &mut s,
        service("web", VIP, &ports),
        Some(endpoints("web", &[(cluster, true, addrs)])),
    );
    (lb(&s, &Health::default()), ip.parse().unwrap())
}

#[derive(Debug, Clone)]
struct Case {
    client: Ipv4Addr,
    sport: u16,
    udp: bool,
    /// Index into the service's ports of that protocol.
    port: usize,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: Vec<u8>,
    reply_payload: Vec<u8>,
    zero_udp_checksum: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (
        (any::<u16>(), 1u16..),
        any::<bool>(),
        0usize..2,
        prop::sample::select(vec![TCP_SYN, TCP_ACK, TCP_ACK | TCP_FIN, TCP_SYN | TCP_ACK]),
        (any::<u32>(), any::<u32>()),
        prop::collection::vec(any::<u8>(), 0..300),
        prop::collection::vec(any::<u8>(), 0..300),
        any::<bool>(),
    )
        .prop_map(
            |((host, sport), udp, port, flags, (seq, ack), payload, reply_payload, zero)| Case {
                client: Ipv4Addr::new(10, 1, (host >> 8) as u8, host as u8),
                sport,
                udp,
                port,
                flags,
                seq,
                ack,
                payload,
                reply_payload,
                zero_udp_checksum: zero,
            },
        )
}

impl Case {
    fn vport(&self) -> (u16, u16) {
        if self.udp {
            (53, 5353)
        } else {
            [(80, 8080), (443, 443)][self.port]
        }
    }

    fn packet(
        &self,
        src: std::net::SocketAddrV4,
        dst: std::net::SocketAddrV4,
        payload: &[u8],
    ) -> Vec<u8> {
        if self.udp {
            let mut p = udp(src, dst, payload);
            if self.zero_udp_checksum {
                p[26..28].copy_from_slice(&[0, 0]);
            }
            p
        } else {
            tcp(src, dst, self.flags, self.seq, self.ack, payload)
        }
    }

    fn assert_zero_checksum_kept(&self, p: &[u8]) {
        if self.udp && self.zero_udp_checksum {
            assert_eq!(&p[26..28], &[0, 0], "UDP checksum 0 stays 0");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn remote_backend_round_trip(c in case()) {
        let (mut lb, backend) = single_backend(false);
        let now = Instant::now();
        let (vport, target) = c.vport();
        let client = sa(c.client, c.sport);
        let (v, p) = out(&mut lb, c.packet(client, sa(VIP, vport), &c.payload), now);
        prop_assert_eq!(v, Verdict::ToTunnel);
        let f = checked(&p);
        prop_assert_eq!((f.src, f.dst), (client, sa(backend, target)));
        prop_assert_eq!(&f.payload, &c.payload);
        c.assert_zero_checksum_kept(&p);
        // The backend answers the client; the reply arrives from the tunnel.
        let (v, r) = inb(&mut lb, c.packet(f.dst, f.src, &c.reply_payload), now);
        prop_assert_eq!(v, Verdict::ToTun);
        let r2 = checked(&r);
        prop_assert_eq!((r2.src, r2.dst), (sa(VIP, vport), client));
        prop_assert_eq!(&r2.payload, &c.reply_payload);
        c.assert_zero_checksum_kept(&r);
    }

    #[test]
    fn local_backend_round_trip_through_snat(c in case()) {
        let (mut lb, backend) = single_backend(true);
        let now = Instant::now();
        let (vport, target) = c.vport();
        let client = sa(c.client, c.sport);
        let (v, p) = out(&mut lb, c.packet(client, sa(VIP, vport), &c.payload), now);
        prop_assert_eq!(v, Verdict::ToTun);
        let f = checked(&p);
        prop_assert_eq!(*f.src.ip(), VIP, "SNAT source is the VIP");
        prop_assert_eq!(f.dst, sa(backend, target));
        prop_assert_eq!(&f.payload, &c.payload);
        c.assert_zero_checksum_kept(&p);
        // The backend answers VIP:snat-port; that comes in from the TUN.
        let (v, r) = out(&mut lb, c.packet(f.dst, f.src, &c.reply_payload), now);
        prop_assert_eq!(v, Verdict::ToTun);
        let r2 = checked(&r);
        prop_assert_eq!((r2.src, r2.dst), (sa(VIP, vport), client));
        prop_assert_eq!(&r2.payload, &c.reply_payload);
        c.assert_zero_checksum_kept(&r);
    }

    #[test]
    fn many_clients_round_trip_through_a_shared_table(cases in prop::collection::vec(case(), 1..40)) {
        let (mut lb, _) = single_backend(true);
        let now = Instant::now();
        let mut sent = Vec::new();
        for c in &cases {
            let client = sa(c.client, c.sport);
            let (v, p) = out(&mut lb, c.packet(client, sa(VIP, c.vport().0), &c.payload), now);
            prop_assert_eq!(v, Verdict::ToTun);
            sent.push((c, client, checked(&p)));
        }
        for (c, client, f) in sent {
            let (_, r) = out(&mut lb, c.packet(f.dst, f.src, &c.reply_payload), now);
            let r = checked(&r);
            prop_assert_eq!((r.src, r.dst), (sa(VIP, c.vport().0), client));
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(mut bytes in prop::collection::vec(any::<u8>(), 0..120), v4 in any::<bool>(), to_vip in any::<bool>()) {
        if v4 && bytes.len() >= 20 {
            bytes[0] = 0x45;
            if to_vip {
                bytes[16..20].copy_from_slice(&VIP.octets());
            }
        }
        let (mut lb, _) = single_backend(false);
        let now = Instant::now();
        let mut reply = Vec::new();
        let mut a = bytes.clone();
        let _ = lb.outbound(&mut a, &mut reply, now);
        let _ = lb.inbound(&mut bytes, &mut reply, now);
    }
}
