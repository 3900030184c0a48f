#![allow(clippy::unwrap_used)]

use super::*;

const HEADROOM: usize = 16;

/// An IPv4 TCP segment (ACK) of `payload` bytes from port `sport`.
fn tcp4(sport: u16, payload: usize, flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; 40 + payload];
    p[0] = 0x45;
    let len = u16::try_from(p.len()).unwrap();
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[9] = 6;
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = flags;
    p
}

fn udp6(payload: usize) -> Vec<u8> {
    let mut p = vec![0u8; 48 + payload];
    p[0] = 0x60;
    p[6] = 17;
    p[8] = 0xfd;
    p[24] = 0xfd;
    p[39] = 1;
    p
}

fn batch(packets: &[Vec<u8>]) -> Packets {
    let mut b = Packets::new(128, HEADROOM);
    for p in packets {
        b.push(p);
    }
    b
}

fn big(b: &mut Packets, cap: usize) -> Vec<usize> {
    b.bufs_mut()
        .iter()
        .enumerate()
        .filter(|(_, v)| v.capacity() >= cap)
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn lends_to_each_head_and_takes_back() {
    // One bulk flow: 100 segments of 1380 bytes make three writes of at
    // most 64 KiB (47 + 47 + 6 segments).
    let packets: Vec<_> = (0..100).map(|_| tcp4(40000, 1380, 0x10)).collect();
    let mut b = batch(&packets);
    let mut c = Coalesce::new(HEADROOM, 8);
    c.lend(&mut b);
    assert_eq!(big(&mut b, c.cap), vec![0, 47, 94]);
    assert_eq!(c.spare(), 5);
    // The bytes are the same, only their buffer moved.
    assert!(b.packets().map(<[u8]>::to_vec).eq(packets.iter().cloned()));
    // The write may swap slots around: the buffers are found wherever.
    b.bufs_mut().swap(0, 99);
    c.reclaim(&mut b);
    assert_eq!(c.spare(), 8);
    assert!(b.is_empty());
    // Every slot has a small buffer again.
    assert!(b.packets().next().is_none());
    for p in &packets {
        b.push(p);
    }
    assert!(big(&mut b, c.cap).is_empty());
}

#[test]
fn flows_get_heads_of_their_own_and_others_none() {
    let mut packets = Vec::new();
    for _ in 0..4 {
        packets.push(tcp4(1, 1000, 0x18));
        packets.push(tcp4(2, 1000, 0x10));
        // A SYN and a pure ACK do not coalesce: no head.
        packets.push(tcp4(3, 0, 0x02));
        packets.push(tcp4(4, 0, 0x10));
        packets.push(udp6(1200));
        // Not IP.
        packets.push(vec![0u8; 30]);
    }
    let mut b = batch(&packets);
    let mut c = Coalesce::new(HEADROOM, 8);
    c.lend(&mut b);
    assert_eq!(big(&mut b, c.cap), vec![0, 1, 4]);
    c.reclaim(&mut b);
    assert_eq!(c.spare(), 8);
}

#[test]
fn runs_out_of_buffers_gracefully() {
    // More flows than buffers: the first two heads get one, the rest
    // stay as they are (written uncoalesced).
    let packets: Vec<_> = (0..20).map(|i| tcp4(i, 1000, 0x10)).collect();
    let mut b = batch(&packets);
    let mut c = Coalesce::new(HEADROOM, 2);
    c.lend(&mut b);
    assert_eq!(big(&mut b, c.cap), vec![0, 1]);
    assert_eq!(c.spare(), 0);
    assert!(b.packets().map(<[u8]>::to_vec).eq(packets.iter().cloned()));
    c.reclaim(&mut b);
    assert_eq!(c.spare(), 2);
    assert!(b.is_empty());
}

#[test]
fn more_flows_than_tracked_evict_the_oldest() {
    // Ten flows, each twice: tracked are eight at a time, so the second
    // round of flows 0 and 1 (evicted) heads again.
    let mut packets = Vec::new();
    for _ in 0..2 {
        for i in 0..10 {
            packets.push(tcp4(i, 100, 0x10));
        }
    }
    let mut b = batch(&packets);
    let mut c = Coalesce::new(HEADROOM, 16);
    c.lend(&mut b);
    assert_eq!(
        big(&mut b, c.cap),
        vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    );
    c.reclaim(&mut b);
    assert_eq!(c.spare(), 16);
}
