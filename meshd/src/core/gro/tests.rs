#![allow(clippy::unwrap_used)]

use proptest::prelude::*;

use super::*;
use crate::core::lb::packet::checksum;

const HEADROOM: usize = 16;
const BOTH: Offloads = Offloads {
    vnet_hdr: true,
    udp: true,
};

/// The checksum of an L4 segment `l4` between `src` and `dst` (4 or 16
/// bytes each), computed from scratch.
fn l4_checksum(src: &[u8], dst: &[u8], proto: u8, l4: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&u16::try_from(l4.len()).unwrap().to_be_bytes());
    pseudo.extend_from_slice(l4);
    checksum(&pseudo)
}

/// Sets every length and checksum of an IPv4 or IPv6 packet.
fn seal(p: &mut [u8]) {
    let v6 = p[0] >> 4 == 6;
    let ip = if v6 { 40 } else { 20 };
    let len = u16::try_from(p.len()).unwrap();
    if v6 {
        p[4..6].copy_from_slice(&(len - 40).to_be_bytes());
    } else {
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p[10..12].fill(0);
        let c = checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
    }
    let proto = if v6 { p[6] } else { p[9] };
    let at = if proto == IPPROTO_TCP {
        ip + 16
    } else {
        ip + 6
    };
    if proto == IPPROTO_UDP {
        let l = u16::try_from(p.len() - ip).unwrap();
        p[ip + 4..ip + 6].copy_from_slice(&l.to_be_bytes());
    }
    p[at..at + 2].fill(0);
    let (src, dst) = if v6 {
        (8..24, 24..40)
    } else {
        (12..16, 16..20)
    };
    let c = l4_checksum(&p[src], &p[dst], proto, &p[ip..]);
    p[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// An IP header (IPv4 with DF unless `no_df`, ID `id`) for `proto`.
fn ip_header(v6: bool, proto: u8, id: u16) -> Vec<u8> {
    if v6 {
        let mut h = vec![0u8; 40];
        h[0] = 0x60;
        h[6] = proto;
        h[7] = 64;
        h[8] = 0xfd;
        h[23] = 1;
        h[24] = 0xfd;
        h[39] = 2;
        h
    } else {
        let mut h = vec![0u8; 20];
        h[0] = 0x45;
        h[4..6].copy_from_slice(&id.to_be_bytes());
        h[6] = 0x40;
        h[8] = 64;
        h[9] = proto;
        h[12..16].copy_from_slice(&[10, 0, 0, 1]);
        h[16..20].copy_from_slice(&[10, 0, 0, 2]);
        h
    }
}

/// Payload bytes that tell segments apart.
fn payload(seed: u32, n: usize) -> impl Iterator<Item = u8> {
    (0..n).map(move |i| (seed as usize).wrapping_mul(31).wrapping_add(i) as u8)
}

/// A TCP segment with timestamps (so that options are compared too).
fn tcp(v6: bool, sport: u16, seq: u32, len: usize, flags: u8, id: u16) -> Vec<u8> {
    let mut p = ip_header(v6, IPPROTO_TCP, id);
    let mut t = vec![0u8; 32];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&5201u16.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&7u32.to_be_bytes());
    t[12] = 8 << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&502u16.to_be_bytes());
    t[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3]);
    p.extend_from_slice(&t);
    p.extend(payload(seq, len));
    seal(&mut p);
    p
}

fn udp(v6: bool, sport: u16, len: usize, id: u16) -> Vec<u8> {
    let mut p = ip_header(v6, IPPROTO_UDP, id);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&53u16.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend(payload(u32::from(id), len));
    seal(&mut p);
    p
}

fn batch(packets: &[Vec<u8>]) -> Packets {
    let mut b = Packets::new(256, HEADROOM);
    for p in packets {
        b.push(p);
    }
    b
}

/// The bytes of every planned write, each as one buffer.
fn writes(g: &Gro, b: &Packets) -> Vec<Vec<u8>> {
    (0..g.writes())
        .map(|w| g.write_parts(w, b).flatten().copied().collect())
        .collect()
}

/// Cuts a TUN write back into packets as the kernel does: checks the
/// checksum the kernel would finish (CHECKSUM_PARTIAL), then segments
/// with fresh lengths, IPv4 IDs, sequence numbers and checksums.
fn cut(write: &[u8]) -> Vec<Vec<u8>> {
    let (v, pkt) = write.split_at(VNET_HDR);
    let u = |at: usize| usize::from(u16::from_ne_bytes([v[at], v[at + 1]]));
    if v[1] == 0 {
        assert_eq!(v, [0u8; VNET_HDR]);
        return vec![pkt.to_vec()];
    }
    assert_eq!(v[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
    let (hdr_len, gso, start, offset) = (u(2), u(4), u(6), u(8));
    let v6 = pkt[0] >> 4 == 6;
    let proto = if v6 { pkt[6] } else { pkt[9] };
    // The partial checksum completes to the packet's real one.
    let mut whole = pkt.to_vec();
    seal(&mut whole);
    let finished = !fold(ones_sum(&pkt[start..], 0));
    let real = u16::from_be_bytes([whole[start + offset], whole[start + offset + 1]]);
    assert_eq!(finished, real, "partial checksum");
    assert_eq!(&whole[..start], &pkt[..start], "IP header as sealed");
    let (headers, body) = pkt.split_at(hdr_len);
    let n = body.len().div_ceil(gso);
    body.chunks(gso)
        .enumerate()
        .map(|(i, chunk)| {
            let mut p = headers.to_vec();
            p.extend_from_slice(chunk);
            if !v6 {
                let id = u16::from_be_bytes([p[4], p[5]]).wrapping_add(i as u16);
                p[4..6].copy_from_slice(&id.to_be_bytes());
            }
            if proto == IPPROTO_TCP {
                let at = start + 4;
                let seq = u32::from_be_bytes(p[at..at + 4].try_into().unwrap());
                let seq = seq.wrapping_add((i * gso) as u32);
                p[at..at + 4].copy_from_slice(&seq.to_be_bytes());
                if i + 1 < n {
                    p[start + 13] &= !(TCP_PSH | 0x01);
                }
            }
            seal(&mut p);
            p
        })
        .collect()
}

/// Plans `packets` and returns the writes and the packets they cut back
/// into, in write order.
fn roundtrip(offloads: Offloads, packets: &[Vec<u8>]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let b = batch(packets);
    let mut g = Gro::new(offloads);
    g.plan(&b);
    let w = writes(&g, &b);
    let back = if offloads.vnet_hdr {
        w.iter().flat_map(|w| cut(w)).collect()
    } else {
        w.clone()
    };
    (w, back)
}

/// The flow a packet belongs to (protocol, version, source port), for
/// comparing per-flow order.
fn flow(p: &[u8]) -> (u8, u16) {
    let ip = if p[0] >> 4 == 6 { 40 } else { 20 };
    (p[0] >> 4, u16::from_be_bytes([p[ip], p[ip + 1]]))
}

/// Every packet comes back once, each flow's in order.
fn assert_same_per_flow(sent: &[Vec<u8>], back: &[Vec<u8>]) {
    let mut a: Vec<_> = sent.iter().map(|p| (flow(p), p.clone())).collect();
    let mut b: Vec<_> = back.iter().map(|p| (flow(p), p.clone())).collect();
    // Stable: order within a flow is kept.
    a.sort_by_key(|(f, _)| *f);
    b.sort_by_key(|(f, _)| *f);
    assert!(a == b, "packets differ");
}

#[test]
fn one_bulk_flow_makes_few_large_writes() {
    // 100 segments of 1380 bytes: writes of at most 64 KiB (47 + 47 + 6).
    let packets: Vec<_> = (0..100)
        .map(|i| tcp(false, 40000, 1000 + i * 1380, 1380, TCP_ACK, i as u16))
        .collect();
    let (w, back) = roundtrip(BOTH, &packets);
    let lens: Vec<_> = w.iter().map(|w| (w.len() - VNET_HDR - 52) / 1380).collect();
    assert_eq!(lens, vec![47, 47, 6]);
    assert!(w.iter().all(|w| w.len() - VNET_HDR <= COALESCED_MAX));
    assert_eq!(back, packets);
}

#[test]
fn psh_and_a_short_segment_end_a_write() {
    let mut packets = vec![
        tcp(false, 1, 0, 1000, TCP_ACK, 0),
        tcp(false, 1, 1000, 1000, TCP_ACK | TCP_PSH, 1),
        tcp(false, 1, 2000, 1000, TCP_ACK, 2),
        tcp(false, 1, 3000, 400, TCP_ACK, 3),
        tcp(false, 1, 3400, 1000, TCP_ACK, 4),
    ];
    let (w, back) = roundtrip(BOTH, &packets);
    assert_eq!(w.len(), 3);
    assert_eq!(back, packets);
    // A head with PSH takes nothing after it.
    packets = vec![
        tcp(false, 1, 0, 1000, TCP_ACK | TCP_PSH, 0),
        tcp(false, 1, 1000, 1000, TCP_ACK, 1),
        tcp(false, 1, 2000, 1000, TCP_ACK, 2),
    ];
    let (w, back) = roundtrip(BOTH, &packets);
    assert_eq!(w.len(), 2);
    assert_eq!(back, packets);
}

#[test]
fn gaps_and_changed_headers_start_new_writes() {
    let mut ttl = tcp(false, 1, 2000, 1000, TCP_ACK, 2);
    ttl[8] = 63;
    seal(&mut ttl);
    let mut ack = tcp(false, 1, 3000, 1000, TCP_ACK, 3);
    ack[20 + 11] = 9;
    seal(&mut ack);
    let packets = vec![
        tcp(false, 1, 0, 1000, TCP_ACK, 0),
        // A gap in sequence.
        tcp(false, 1, 5000, 1000, TCP_ACK, 1),
        // Another TTL.
        ttl,
        // Another ACK number.
        ack,
    ];
    let (w, back) = roundtrip(BOTH, &packets);
    assert_eq!(w.len(), 4);
    assert_eq!(back, packets);
}

#[test]
fn without_df_the_ipv4_ids_must_follow() {
    let no_df = |seq, id| {
        let mut p = tcp(false, 1, seq, 1000, TCP_ACK, id);
        p[6] = 0;
        seal(&mut p);
        p
    };
    let packets = vec![no_df(0, 0), no_df(1000, 5), no_df(2000, 6)];
    let (w, back) = roundtrip(BOTH, &packets);
    assert_eq!(w.len(), 2);
    assert_eq!(back, packets);
}

#[test]
fn flows_interleave_and_others_pass_as_they_are() {
    let mut packets = Vec::new();
    for i in 0..4u32 {
        packets.push(tcp(false, 1, i * 1000, 1000, TCP_ACK, i as u16));
        packets.push(tcp(true, 2, i * 800, 800, TCP_ACK, 0));
        // A SYN and a pure ACK do not coalesce.
        packets.push(tcp(false, 3, i, 0, 0x02, 0));
        packets.push(tcp(false, 4, i, 0, TCP_ACK, 0));
        packets.push(udp(true, 5, 1200, 0));
        packets.push(udp(false, 6, 1200, i as u16));
        // Not IP.
        packets.push(vec![0u8; 30]);
    }
    let (w, back) = roundtrip(BOTH, &packets);
    // TCP v4, TCP v6, UDP v6, UDP v4 once each; the rest one by one.
    assert_eq!(w.len(), 4 + 3 * 4);
    assert_same_per_flow(&packets, &back);
    // Without UDP offloads the datagrams go one by one.
    let (w, back) = roundtrip(
        Offloads {
            vnet_hdr: true,
            udp: false,
        },
        &packets,
    );
    assert_eq!(w.len(), 2 + 5 * 4);
    assert_same_per_flow(&packets, &back);
}

#[test]
fn without_a_virtio_header_every_packet_is_written_as_it_is() {
    let packets: Vec<_> = (0..10)
        .map(|i| tcp(false, 1, i * 100, 100, TCP_ACK, i as u16))
        .collect();
    let (w, _) = roundtrip(
        Offloads {
            vnet_hdr: false,
            udp: false,
        },
        &packets,
    );
    assert_eq!(w, packets);
}

#[test]
fn more_flows_than_tracked_stay_correct() {
    // Ten flows in turn: tracked are eight at a time, so each is evicted
    // before its next segment, and all go one by one.
    let mut packets = Vec::new();
    for round in 0..3u32 {
        for port in 0..10u16 {
            packets.push(tcp(false, port, round * 100, 100, TCP_ACK, round as u16));
        }
    }
    let (w, back) = roundtrip(BOTH, &packets);
    assert_eq!(w.len(), packets.len());
    assert_same_per_flow(&packets, &back);
    // In bursts, each flow's segments coalesce.
    packets.sort_by_key(|p| flow(p));
    let (w, back) = roundtrip(BOTH, &packets);
    assert_eq!(w.len(), 10);
    assert_eq!(back, packets);
}

proptest! {
    /// Whatever the mix (flows, sizes, gaps, PSH, versions), the writes cut
    /// back into exactly the packets, each flow's in order, and no write
    /// exceeds the kernel's limits.
    #[test]
    fn writes_cut_back_into_the_packets(
        steps in prop::collection::vec((0u16..5, 0usize..4, any::<bool>(), 0u8..8), 1..200)
    ) {
        let mut seq = [0u32; 5];
        let mut id = [0u16; 5];
        let mut packets = Vec::new();
        for (flow, size, psh, gap) in steps {
            let f = usize::from(flow);
            let len = [1200, 1200, 1200, 300][size];
            if gap == 0 {
                seq[f] = seq[f].wrapping_add(7);
            }
            let flags = if psh && gap < 2 { TCP_ACK | TCP_PSH } else { TCP_ACK };
            let p = match flow {
                0 | 1 => tcp(flow == 1, flow, seq[f], len, flags, id[f]),
                2 => tcp(false, flow, seq[f], 0, TCP_ACK, id[f]),
                _ => udp(flow == 4, flow, len, id[f]),
            };
            seq[f] = seq[f].wrapping_add(len as u32);
            id[f] = id[f].wrapping_add(1);
            packets.push(p);
        }
        let (w, back) = roundtrip(BOTH, &packets);
        for w in &w {
            prop_assert!(w.len() - VNET_HDR <= COALESCED_MAX);
        }
        assert_same_per_flow(&packets, &back);
    }
}
