//! Coalescing for the TUN write (GRO), as gather lists.
//!
//! A TUN opened with offloads (`IFF_VNET_HDR`) takes one large TCP segment
//! (or, from Linux 6.2, one UDP datagram train) per write, with a
//! virtio-net header that says how the kernel may cut it back: the
//! receiving stack then handles one packet instead of forty. [`Gro`]
//! plans those writes for a [`Packets`] batch, without copying a payload:
//! each write is a small header block (the virtio-net header and the
//! head packet's IP and transport headers, their lengths and checksums
//! rewritten for the whole write) followed by the payloads where they lie
//! in the batch's slots, for one `writev`.
//!
//! What coalesces is what the kernel would cut back into the same
//! packets: the segments of one flow in sequence (TCP: same ACK number,
//! options, TTL and TOS, only ACK and PSH set, PSH only on the last), all
//! of one size but the last; UDP datagrams of one flow of one size but
//! the last. Everything else is written as it is, in order.
//!
//! The packets' own checksums are not verified before they are merged
//! (tun-rs and wireguard-go do verify them): a data message authenticated
//! by its session cannot have been changed on the way, so the checksum
//! says nothing more. Kernel WireGuard marks what it decrypts as
//! `CHECKSUM_UNNECESSARY` for that reason.

use super::batch::Packets;
use super::lb::packet::{IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_PSH, checksum, fold, ones_sum};

/// Bytes of the virtio-net header in front of every offloading TUN write.
pub const VNET_HDR: usize = 10;

/// The largest packet a coalesced write may build (an IP length field).
const COALESCED_MAX: usize = u16::MAX as usize;

/// Segments one write may carry (the kernel's limit for UDP GSO; more
/// payload pieces would also make longer gather lists than a batch needs).
pub const MAX_SEGMENTS: usize = 64;

/// Flows tracked at a time per batch; beyond them a flow's packets are
/// less coalesced, never wrong.
const FLOWS: usize = 8;

/// Room for a header block: virtio-net header, IPv6 header, TCP header
/// with the longest options.
const HEAD_MAX: usize = VNET_HDR + 40 + 60;

// virtio-net header values (linux/virtio_net.h).
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;

/// What the TUN device takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offloads {
    /// Writes carry a virtio-net header, and TCP may be coalesced.
    pub vnet_hdr: bool,
    /// UDP may be coalesced too (`TUN_F_USO4`/`TUN_F_USO6`).
    pub udp: bool,
}

/// The writes planned for one batch ([`Gro::plan`], then
/// [`Gro::write_parts`] for each of [`Gro::writes`]).
#[derive(Debug)]
pub struct Gro {
    offloads: Offloads,
    writes: Vec<Write>,
    pieces: Vec<Piece>,
    flows: Vec<Flow>,
}

/// One TUN write: the header block, then its pieces.
#[derive(Debug, Clone)]
struct Write {
    head: [u8; HEAD_MAX],
    head_len: usize,
    first: usize,
    last: usize,
}

/// A packet's part of a write: slot `slot`'s packet from byte `skip` on;
/// `next` is the write's next piece (or `usize::MAX`).
#[derive(Debug, Clone, Copy)]
struct Piece {
    slot: usize,
    skip: usize,
    next: usize,
}

const END: usize = usize::MAX;

/// A flow whose last write may take more segments.
#[derive(Debug, Clone, Copy)]
struct Flow {
    key: Key,
    write: usize,
    /// The head packet's slot: the segments must match its headers.
    slot: usize,
    headers: usize,
    /// Payload bytes of the first segment: all but the last are this size.
    gso: usize,
    /// Bytes of the write's packet so far (headers included).
    len: usize,
    segments: usize,
    /// TCP: the sequence number the next segment must have.
    next_seq: u32,
    /// IPv4: the ID the next segment must have, unless DF is set.
    next_id: u16,
    /// A shorter segment, or PSH, ended the write.
    closed: bool,
    /// A later segment had PSH: the write's packet gets it.
    psh: bool,
    v6: bool,
    /// IP header bytes.
    ip: usize,
}

/// A flow as the kernel's GRO tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    proto: u8,
    addrs: [u8; 32],
    ports: [u8; 4],
}

/// A packet the TUN write could coalesce: its flow and layout.
#[derive(Debug, Clone, Copy)]
struct Seg {
    key: Key,
    v6: bool,
    /// IP header bytes.
    ip: usize,
    /// IP and transport header bytes.
    headers: usize,
    payload: usize,
    /// TCP: sequence number, flags.
    seq: u32,
    flags: u8,
    id: u16,
    df: bool,
}

impl Gro {
    pub fn new(offloads: Offloads) -> Gro {
        Gro {
            offloads,
            writes: Vec::with_capacity(crate::core::engine::TUN_SLOTS),
            pieces: Vec::with_capacity(2 * crate::core::engine::TUN_SLOTS),
            flows: Vec::with_capacity(FLOWS),
        }
    }

    /// Plans the writes of batch `p`, in order of their first packet (so
    /// each flow's packets stay in order).
    pub fn plan(&mut self, p: &Packets) {
        self.writes.clear();
        self.pieces.clear();
        self.flows.clear();
        for (slot, pkt) in p.packets().enumerate() {
            if self.offloads.vnet_hdr
                && let Some(seg) = segment(pkt, self.offloads.udp)
            {
                if self.append(p, slot, pkt, &seg) {
                    continue;
                }
                self.open(p, slot, &seg);
            } else {
                self.single(slot);
            }
        }
        for i in 0..self.flows.len() {
            let f = self.flows[i];
            self.finish(p, &f);
        }
    }

    /// Writes planned.
    pub fn writes(&self) -> usize {
        self.writes.len()
    }

    /// The byte ranges of write `w`, in order, for one `writev`.
    pub fn write_parts<'a>(&'a self, w: usize, p: &'a Packets) -> impl Iterator<Item = &'a [u8]> {
        let write = self.writes.get(w);
        let head = write.map(|w| &w.head[..w.head_len]);
        let mut at = write.map_or(END, |w| w.first);
        let pieces = std::iter::from_fn(move || {
            let piece = self.pieces.get(at)?;
            at = piece.next;
            p.get(piece.slot).and_then(|b| b.get(piece.skip..))
        });
        head.into_iter().filter(|h| !h.is_empty()).chain(pieces)
    }

    /// A write of the packet as it is (a zero virtio-net header: nothing
    /// for the kernel to do but check it).
    fn single(&mut self, slot: usize) {
        let piece = self.pieces.len();
        self.pieces.push(Piece {
            slot,
            skip: 0,
            next: END,
        });
        self.writes.push(Write {
            head: [0; HEAD_MAX],
            head_len: if self.offloads.vnet_hdr { VNET_HDR } else { 0 },
            first: piece,
            last: piece,
        });
    }

    /// A new write headed by this packet; its flow's earlier write (if
    /// tracked) takes no more.
    fn open(&mut self, p: &Packets, slot: usize, seg: &Seg) {
        let write = self.writes.len();
        self.single(slot);
        let flow = Flow {
            key: seg.key,
            write,
            slot,
            headers: seg.headers,
            gso: seg.payload,
            len: seg.headers + seg.payload,
            segments: 1,
            next_seq: seg.seq.wrapping_add(seg.payload as u32),
            next_id: seg.id.wrapping_add(1),
            closed: seg.flags & TCP_PSH != 0,
            psh: false,
            v6: seg.v6,
            ip: seg.ip,
        };
        let gone = match self.flows.iter().position(|f| f.key == seg.key) {
            Some(i) => Some(std::mem::replace(&mut self.flows[i], flow)),
            None if self.flows.len() < FLOWS => {
                self.flows.push(flow);
                None
            }
            // The oldest flow gives way.
            None => {
                let oldest = self.flows.remove(0);
                self.flows.push(flow);
                Some(oldest)
            }
        };
        if let Some(f) = gone {
            self.finish(p, &f);
        }
    }

    /// Appends the packet to its flow's open write if it continues it.
    fn append(&mut self, p: &Packets, slot: usize, pkt: &[u8], seg: &Seg) -> bool {
        let Some(f) = self.flows.iter_mut().find(|f| f.key == seg.key) else {
            return false;
        };
        let Some(head) = p.get(f.slot) else {
            return false;
        };
        let fits = !f.closed
            && f.segments < MAX_SEGMENTS
            && seg.payload <= f.gso
            && f.len + seg.payload <= COALESCED_MAX
            && seg.headers == f.headers
            && same_headers(head, pkt, seg)
            && (seg.key.proto != IPPROTO_TCP || seg.seq == f.next_seq)
            // IPv4 IDs must follow, as the kernel numbers the segments it
            // cuts; with DF set an ID carries nothing (RFC 6864), so the
            // renumbering changes nothing.
            && (seg.v6 || seg.df || seg.id == f.next_id);
        if !fits {
            return false;
        }
        let piece = self.pieces.len();
        self.pieces.push(Piece {
            slot,
            skip: seg.headers,
            next: END,
        });
        let w = &mut self.writes[f.write];
        if f.segments == 1 {
            // The head's own piece now starts after its headers, which
            // the header block will hold.
            self.pieces[w.first].skip = seg.headers;
        }
        self.pieces[w.last].next = piece;
        w.last = piece;
        f.len += seg.payload;
        f.segments += 1;
        f.next_seq = seg.seq.wrapping_add(seg.payload as u32);
        f.next_id = seg.id.wrapping_add(1);
        if seg.payload < f.gso {
            f.closed = true;
        }
        if seg.flags & TCP_PSH != 0 {
            // PSH moves to the write's packet (the kernel leaves it on
            // the last segment when it cuts it back).
            f.closed = true;
            f.psh = true;
        }
        true
    }

    /// Fills in the header block of flow `f`'s write, if it coalesced.
    fn finish(&mut self, p: &Packets, f: &Flow) {
        if f.segments < 2 {
            return;
        }
        let Some(head) = p.get(f.slot).and_then(|b| b.get(..f.headers)) else {
            return;
        };
        let proto = f.key.proto;
        let w = &mut self.writes[f.write];
        let block = &mut w.head[VNET_HDR..VNET_HDR + f.headers];
        block.copy_from_slice(head);
        let l4_len = f.len - f.ip;
        let addrs = if f.v6 {
            put16(block, 4, l4_len as u16);
            8..40
        } else {
            put16(block, 2, f.len as u16);
            put16(block, 10, 0);
            let sum = checksum(&block[..20]);
            put16(block, 10, sum);
            12..20
        };
        // The pseudo-header's sum, not complemented: the kernel adds the
        // rest from `csum_start` on (CHECKSUM_PARTIAL).
        let pseudo = fold(ones_sum(&block[addrs], u32::from(proto)) + l4_len as u32);
        let (gso_type, csum_offset) = match (proto, f.v6) {
            (IPPROTO_TCP, false) => (VIRTIO_NET_HDR_GSO_TCPV4, 16),
            (IPPROTO_TCP, true) => (VIRTIO_NET_HDR_GSO_TCPV6, 16),
            _ => (VIRTIO_NET_HDR_GSO_UDP_L4, 6),
        };
        if proto == IPPROTO_TCP {
            if f.psh {
                block[f.ip + 13] |= TCP_PSH;
            }
        } else {
            put16(block, f.ip + 4, l4_len as u16);
        }
        put16(block, f.ip + csum_offset, pseudo);
        // virtio-net header fields are in the host's byte order (legacy
        // virtio, which a TUN speaks unless told otherwise).
        let v = &mut w.head[..VNET_HDR];
        v[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        v[1] = gso_type;
        v[2..4].copy_from_slice(&(f.headers as u16).to_ne_bytes());
        v[4..6].copy_from_slice(&(f.gso as u16).to_ne_bytes());
        v[6..8].copy_from_slice(&(f.ip as u16).to_ne_bytes());
        v[8..10].copy_from_slice(&(csum_offset as u16).to_ne_bytes());
        w.head_len = VNET_HDR + f.headers;
    }
}

/// Whether `pkt` may be merged into the write headed by `head`: every
/// header field the kernel copies to each segment when it cuts the write
/// back is the same.
fn same_headers(head: &[u8], pkt: &[u8], seg: &Seg) -> bool {
    let ip_same = if seg.v6 {
        // Version, traffic class, flow label; next header; hop limit.
        head.get(..4) == pkt.get(..4) && head.get(6..8) == pkt.get(6..8)
    } else {
        // TOS; flags (DF); TTL, protocol.
        head.get(1) == pkt.get(1)
            && head.get(6).map(|b| b & 0xe0) == pkt.get(6).map(|b| b & 0xe0)
            && head.get(8..10) == pkt.get(8..10)
    };
    if !ip_same {
        return false;
    }
    if seg.key.proto != IPPROTO_TCP {
        return true;
    }
    let t = seg.ip;
    // ACK number, data offset, window and options.
    head.get(t + 8..t + 13) == pkt.get(t + 8..t + 13)
        && head.get(t + 14..t + 16) == pkt.get(t + 14..t + 16)
        && head.get(t + 20..seg.headers) == pkt.get(t + 20..seg.headers)
}

/// `pkt`'s flow and layout, if it is a TCP segment (only ACK, or ACK and
/// PSH, with payload) or, with `udp`, a UDP datagram with payload: IPv4
/// without options or fragments, or IPv6 without extension headers, its
/// length fields matching the slice.
fn segment(pkt: &[u8], udp: bool) -> Option<Seg> {
    let mut addrs = [0u8; 32];
    let (v6, ip, proto, id, df) = match pkt.first()? >> 4 {
        4 => {
            if pkt[0] & 0x0f != 5 || usize::from(get16(pkt, 2)?) != pkt.len() {
                return None;
            }
            // MF, fragment offset.
            if get16(pkt, 6)? & 0x3fff != 0 {
                return None;
            }
            addrs[..8].copy_from_slice(pkt.get(12..20)?);
            (false, 20, *pkt.get(9)?, get16(pkt, 4)?, pkt[6] & 0x40 != 0)
        }
        6 => {
            if usize::from(get16(pkt, 4)?) + 40 != pkt.len() {
                return None;
            }
            addrs.copy_from_slice(pkt.get(8..40)?);
            (true, 40, *pkt.get(6)?, 0, false)
        }
        _ => return None,
    };
    let (headers, seq, flags) = match proto {
        IPPROTO_TCP => {
            let flags = *pkt.get(ip + 13)?;
            if flags != TCP_ACK && flags != TCP_ACK | TCP_PSH {
                return None;
            }
            let doff = usize::from(pkt.get(ip + 12)? >> 4) * 4;
            if doff < 20 {
                return None;
            }
            let seq = u32::from_be_bytes(pkt.get(ip + 4..ip + 8)?.try_into().ok()?);
            (ip + doff, seq, flags)
        }
        IPPROTO_UDP if udp => {
            if usize::from(get16(pkt, ip + 4)?) != pkt.len() - ip {
                return None;
            }
            (ip + 8, 0, 0)
        }
        _ => return None,
    };
    if pkt.len() <= headers {
        return None;
    }
    Some(Seg {
        key: Key {
            proto,
            addrs,
            ports: pkt.get(ip..ip + 4)?.try_into().ok()?,
        },
        v6,
        ip,
        headers,
        payload: pkt.len() - headers,
        seq,
        flags,
        id,
        df,
    })
}

fn get16(p: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(p.get(at..at + 2)?.try_into().ok()?))
}

fn put16(p: &mut [u8], at: usize, v: u16) {
    p[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests;
