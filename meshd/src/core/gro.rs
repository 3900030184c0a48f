//! Room for the TUN write's coalescing (GRO).
//!
//! A TUN write with offloads coalesces the TCP segments (and UDP
//! datagrams) of a flow into the buffer of the flow's first packet, one
//! write of up to 64 KiB, so the kernel's receiving stack handles one
//! large packet instead of forty small ones. The write only appends where
//! that buffer already has the capacity (it never allocates), and a
//! [`Packets`] slot holds one packet. [`Coalesce`] lends a few 64 KiB
//! buffers to the packets that will head a coalesced write, just before
//! the write, and takes them back after it: the batches stay small, and
//! the memory for coalescing is a fixed handful of buffers per writer, not
//! 64 KiB per slot.

use super::batch::Packets;
use super::lb::packet;

/// The largest packet a coalesced write may build (an IP length field).
const COALESCED_MAX: usize = u16::MAX as usize;

/// Flows tracked per batch; beyond them a flow's packets go uncoalesced
/// or less coalesced, never wrong.
const FLOWS: usize = 8;

/// Which flow a packet belongs to, as the TUN write's GRO tells them
/// apart: protocol, addresses and ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FlowKey {
    proto: u8,
    addrs: [u8; 32],
    ports: [u8; 4],
}

/// The head a flow's next packets would be coalesced into.
#[derive(Debug, Clone, Copy)]
struct Head {
    key: FlowKey,
    /// Bytes the head would hold with the packets coalesced so far.
    len: usize,
    /// Whether it has the capacity to take more.
    roomy: bool,
}

/// The big buffers one TUN writer lends to the heads of coalesced writes
/// ([`Coalesce::lend`] before the write, [`Coalesce::reclaim`] after).
#[derive(Debug)]
pub struct Coalesce {
    /// Capacity of a lent buffer: a whole coalesced packet and the
    /// headroom the write wants twice.
    cap: usize,
    /// Buffers not lent.
    spare: Vec<Vec<u8>>,
    /// The slots' own buffers, while a big one is lent to them.
    small: Vec<Vec<u8>>,
    heads: Vec<Head>,
}

impl Coalesce {
    /// `buffers` big buffers for batches with `headroom` in front of each
    /// packet.
    pub fn new(headroom: usize, buffers: usize) -> Coalesce {
        let cap = 2 * headroom + COALESCED_MAX;
        Coalesce {
            cap,
            spare: (0..buffers).map(|_| Vec::with_capacity(cap)).collect(),
            small: Vec::with_capacity(buffers),
            heads: Vec::with_capacity(FLOWS),
        }
    }

    /// Before the write: gives each packet that will head a coalesced
    /// write (the first of its flow in the batch, or the first after the
    /// previous head is full) a big buffer, while there are any, copying
    /// it over.
    pub fn lend(&mut self, p: &mut Packets) {
        let headroom = p.headroom();
        self.heads.clear();
        for buf in p.bufs_mut() {
            let Some((key, headers)) = buf.get(headroom..).and_then(flow_of) else {
                continue;
            };
            let len = buf.len() - headroom;
            let payload = len - headers;
            let at = self.heads.iter().position(|h| h.key == key);
            if let Some(h) = at.map(|i| &mut self.heads[i])
                && h.roomy
                && h.len + payload <= COALESCED_MAX
            {
                h.len += payload;
                continue;
            }
            // A new head for this flow.
            let roomy = buf.capacity() >= self.cap || self.lend_to(buf);
            let head = Head { key, len, roomy };
            match at {
                Some(i) => self.heads[i] = head,
                None if self.heads.len() < FLOWS => self.heads.push(head),
                // The oldest flow gives way.
                None => {
                    self.heads.remove(0);
                    self.heads.push(head);
                }
            }
        }
    }

    /// Swaps a spare big buffer in for `buf`, with `buf`'s bytes.
    fn lend_to(&mut self, buf: &mut Vec<u8>) -> bool {
        let Some(mut big) = self.spare.pop() else {
            return false;
        };
        big.clear();
        big.extend_from_slice(buf);
        self.small.push(std::mem::replace(buf, big));
        true
    }

    /// After the write: takes the big buffers back (the write may have
    /// moved them to other slots of the batch), each slot getting a small
    /// one again (not its own: so the batch is emptied).
    pub fn reclaim(&mut self, p: &mut Packets) {
        for buf in p.bufs_mut() {
            if buf.capacity() < self.cap {
                continue;
            }
            let Some(small) = self.small.pop() else {
                break;
            };
            self.spare.push(std::mem::replace(buf, small));
        }
        p.clear();
    }

    /// Big buffers not lent (all of them between writes).
    pub fn spare(&self) -> usize {
        self.spare.len()
    }
}

/// The flow of an IPv4 or IPv6 TCP segment (plain ACK, or ACK and PSH,
/// with payload) or UDP datagram, and its header length: what the TUN
/// write could coalesce.
fn flow_of(pkt: &[u8]) -> Option<(FlowKey, usize)> {
    let mut addrs = [0u8; 32];
    let (proto, ip_len) = match pkt.first()? >> 4 {
        4 => {
            let h = packet::parse_ipv4(pkt).ok()?;
            // Fragments are not coalesced.
            if h.more_fragments || h.is_later_fragment() {
                return None;
            }
            addrs[..4].copy_from_slice(&h.src.octets());
            addrs[4..8].copy_from_slice(&h.dst.octets());
            (h.proto, h.ihl)
        }
        6 => {
            addrs.copy_from_slice(pkt.get(8..40)?);
            (*pkt.get(6)?, 40)
        }
        _ => return None,
    };
    let headers = match proto {
        // TCP: only plain ACK or ACK+PSH segments coalesce.
        packet::IPPROTO_TCP => {
            let flags = *pkt.get(ip_len + 13)?;
            if flags != packet::TCP_ACK && flags != packet::TCP_ACK | packet::TCP_PSH {
                return None;
            }
            ip_len + usize::from(pkt.get(ip_len + 12)? >> 4) * 4
        }
        packet::IPPROTO_UDP => ip_len + 8,
        _ => return None,
    };
    if pkt.len() <= headers {
        return None;
    }
    let ports = pkt.get(ip_len..ip_len + 4)?.try_into().ok()?;
    Some((
        FlowKey {
            proto,
            addrs,
            ports,
        },
        headers,
    ))
}

#[cfg(test)]
mod tests;
