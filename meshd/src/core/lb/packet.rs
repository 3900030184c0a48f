//! IPv4 packet surgery for the load balancer: parsing the few fields it
//! needs, rewriting addresses and ports with incremental checksum updates
//! (RFC 1624), translating the packet quoted inside an ICMP error, and
//! building the answers meshd gives itself (ICMP echo reply, TCP RST,
//! ICMP destination unreachable).
//!
//! Must not: keep state, know about services or flows, or allocate except
//! into the caller's reply buffer.

use std::net::{Ipv4Addr, SocketAddrV4};

/// IP protocol numbers (IANA "Assigned Internet Protocol Numbers").
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// ICMP types and codes (RFC 792).
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACHABLE: u8 = 3;
pub const ICMP_SOURCE_QUENCH: u8 = 4;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;
pub const ICMP_CODE_PORT_UNREACHABLE: u8 = 3;
/// ICMP destination unreachable code: communication administratively
/// prohibited (RFC 1812 §5.2.7.1).
pub const ICMP_CODE_ADMIN_PROHIBITED: u8 = 13;

/// TCP header flags (RFC 793 §3.1).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;

/// TTL of packets meshd originates (RFC 1700's recommended default).
const DEFAULT_TTL: u8 = 64;
/// Minimal IPv4 header length.
const IPV4_MIN_HDR: usize = 20;
/// ICMP header length (type, code, checksum, 4 bytes rest-of-header).
const ICMP_HDR: usize = 8;
/// Bytes of the offending datagram's data an ICMP error quotes (RFC 792).
const ICMP_QUOTED_DATA: usize = 8;

/// The transport protocols the balancer translates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }

    /// The protocol for an IP protocol number, if translated.
    pub fn from_number(n: u8) -> Option<Proto> {
        match n {
            IPPROTO_TCP => Some(Proto::Tcp),
            IPPROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }

    /// Offset of the checksum inside the transport header.
    fn checksum_offset(self) -> usize {
        match self {
            Proto::Tcp => 16,
            Proto::Udp => 6,
        }
    }

    /// Bytes of transport header needed to translate (ports + checksum).
    fn min_header(self) -> usize {
        match self {
            Proto::Tcp => 20,
            Proto::Udp => 8,
        }
    }
}

/// Why a packet could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Not an IPv4 packet at all (IPv6, garbage): not ours to judge.
    NotIpv4,
    /// IPv4 with inconsistent lengths.
    Malformed,
}

/// The IPv4 header fields the balancer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Hdr {
    /// Header length in bytes.
    pub ihl: usize,
    /// Total length in bytes (≤ the buffer length; trailing bytes ignored).
    pub total_len: usize,
    pub proto: u8,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub id: u16,
    pub more_fragments: bool,
    /// Fragment offset in 8-byte units.
    pub frag_offset: u16,
}

impl Ipv4Hdr {
    /// Whether this packet is a fragment other than the first (it carries
    /// no transport header).
    pub fn is_later_fragment(&self) -> bool {
        self.frag_offset != 0
    }

    /// Whether this is the first fragment of a fragmented datagram.
    pub fn is_first_fragment(&self) -> bool {
        self.frag_offset == 0 && self.more_fragments
    }
}

/// Parses the IPv4 header of `p`.
pub fn parse_ipv4(p: &[u8]) -> Result<Ipv4Hdr, ParseError> {
    if p.len() < IPV4_MIN_HDR || p[0] >> 4 != 4 {
        return Err(ParseError::NotIpv4);
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if ihl < IPV4_MIN_HDR || total_len < ihl || total_len > p.len() {
        return Err(ParseError::Malformed);
    }
    let frag = u16::from_be_bytes([p[6], p[7]]);
    Ok(Ipv4Hdr {
        ihl,
        total_len,
        proto: p[9],
        src: Ipv4Addr::new(p[12], p[13], p[14], p[15]),
        dst: Ipv4Addr::new(p[16], p[17], p[18], p[19]),
        id: u16::from_be_bytes([p[4], p[5]]),
        more_fragments: frag & 0x2000 != 0,
        frag_offset: frag & 0x1fff,
    })
}

/// The destination address of an IPv4 packet, if it has one to read.
pub fn raw_dst(p: &[u8]) -> Option<Ipv4Addr> {
    (p.len() >= IPV4_MIN_HDR && p[0] >> 4 == 4).then(|| Ipv4Addr::new(p[16], p[17], p[18], p[19]))
}

/// Ports and TCP flags of a TCP/UDP packet that carries its transport
/// header (unfragmented or first fragment).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L4 {
    pub proto: Proto,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags; 0 for UDP.
    pub flags: u8,
}

/// Reads the transport header; `None` if the packet is too short for it.
pub fn parse_l4(p: &[u8], h: &Ipv4Hdr, proto: Proto) -> Option<L4> {
    let t = p.get(h.ihl..h.total_len)?;
    if t.len() < proto.min_header() {
        return None;
    }
    let flags = match proto {
        Proto::Tcp => {
            let data_offset = usize::from(t[12] >> 4) * 4;
            if data_offset < 20 || data_offset > t.len() {
                return None;
            }
            t[13]
        }
        Proto::Udp => 0,
    };
    Some(L4 {
        proto,
        src_port: u16::from_be_bytes([t[0], t[1]]),
        dst_port: u16::from_be_bytes([t[2], t[3]]),
        flags,
    })
}

// ---------------------------------------------------------------- checksums

/// One's-complement sum of `data` as big-endian 16-bit words, added to
/// `acc` (RFC 1071).
pub(crate) fn ones_sum(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

pub(crate) fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `data` (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    !fold(ones_sum(data, 0))
}

/// Incremental update of checksum `hc` when the 16-bit words `old` become
/// `new` (RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')`).
fn adjust(hc: u16, old: &[u16], new: &[u16]) -> u16 {
    let mut acc = u32::from(!hc);
    for w in old {
        acc += u32::from(!*w);
    }
    for w in new {
        acc += u32::from(*w);
    }
    !fold(acc)
}

fn words(ip: Ipv4Addr) -> [u16; 2] {
    let o = ip.octets();
    [
        u16::from_be_bytes([o[0], o[1]]),
        u16::from_be_bytes([o[2], o[3]]),
    ]
}

fn read_u16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

fn write_u16(p: &mut [u8], at: usize, v: u16) {
    p[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Which end of a packet to rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Src,
    Dst,
}

impl End {
    fn ip_offset(self) -> usize {
        match self {
            End::Src => 12,
            End::Dst => 16,
        }
    }

    fn port_offset(self) -> usize {
        match self {
            End::Src => 0,
            End::Dst => 2,
        }
    }
}

/// Rewrites one address of the IPv4 header at `ip` (start of the header)
/// and fixes the header checksum. Returns the old address.
fn set_ip(p: &mut [u8], ip: usize, end: End, new: Ipv4Addr) -> Ipv4Addr {
    let at = ip + end.ip_offset();
    let old = Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3]);
    if old != new {
        p[at..at + 4].copy_from_slice(&new.octets());
        let hc = read_u16(p, ip + 10);
        write_u16(p, ip + 10, adjust(hc, &words(old), &words(new)));
    }
    old
}

/// Rewrites one port of the transport header at `l4` and the transport
/// checksum for that port and the pseudo-header address change. `avail`
/// is how many transport bytes are present (a quoted header inside an ICMP
/// error may be cut short; a checksum that is not there is not touched).
fn set_l4(
    p: &mut [u8],
    l4: usize,
    avail: usize,
    proto: Proto,
    end: End,
    old_ip: Ipv4Addr,
    new: SocketAddrV4,
) {
    let pa = l4 + end.port_offset();
    let old_port = read_u16(p, pa);
    write_u16(p, pa, new.port());
    let ca = l4 + proto.checksum_offset();
    if avail < proto.checksum_offset() + 2 {
        return;
    }
    let hc = read_u16(p, ca);
    if proto == Proto::Udp && hc == 0 {
        // RFC 768: zero means "no checksum"; it stays that way.
        return;
    }
    let [o1, o2] = words(old_ip);
    let [n1, n2] = words(*new.ip());
    let mut c = adjust(hc, &[o1, o2, old_port], &[n1, n2, new.port()]);
    if proto == Proto::Udp && c == 0 {
        // RFC 768: a computed zero is sent as all ones.
        c = 0xffff;
    }
    write_u16(p, ca, c);
}

/// Rewrites source and/or destination of a TCP/UDP packet (or, for a later
/// fragment, just the addresses), keeping every checksum valid.
pub fn rewrite(p: &mut [u8], h: &Ipv4Hdr, src: Option<SocketAddrV4>, dst: Option<SocketAddrV4>) {
    let proto = Proto::from_number(h.proto).filter(|_| !h.is_later_fragment());
    let avail = h.total_len - h.ihl;
    for (end, to) in [(End::Src, src), (End::Dst, dst)] {
        let Some(to) = to else { continue };
        let old_ip = set_ip(p, 0, end, *to.ip());
        if let Some(proto) = proto
            && avail >= proto.min_header()
        {
            set_l4(p, h.ihl, avail, proto, end, old_ip, to);
        }
    }
}

/// Rewrites only the addresses (later fragments carry no ports).
pub fn rewrite_addrs(p: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr) {
    set_ip(p, 0, End::Src, src);
    set_ip(p, 0, End::Dst, dst);
}

// ---------------------------------------------------------------- ICMP errors

/// An ICMP error message and the datagram it quotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpError {
    /// Offset of the quoted IPv4 header.
    pub inner: usize,
    pub inner_ihl: usize,
    pub proto: Proto,
    /// The quoted datagram's addresses and ports, as it was sent.
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

/// Whether an ICMP type is an error that quotes a datagram (RFC 792).
fn is_error_type(t: u8) -> bool {
    matches!(
        t,
        ICMP_DEST_UNREACHABLE | ICMP_SOURCE_QUENCH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    )
}

/// The ICMP type of an unfragmented ICMP packet.
pub fn icmp_type(p: &[u8], h: &Ipv4Hdr) -> Option<u8> {
    (h.proto == IPPROTO_ICMP && h.total_len >= h.ihl + ICMP_HDR).then(|| p[h.ihl])
}

/// Parses an ICMP error quoting a TCP/UDP datagram; `None` for anything
/// else (queries, truncated quotes, fragments).
pub fn parse_icmp_error(p: &[u8], h: &Ipv4Hdr) -> Option<IcmpError> {
    if h.is_later_fragment() || h.more_fragments || !is_error_type(icmp_type(p, h)?) {
        return None;
    }
    let inner = h.ihl + ICMP_HDR;
    let q = p.get(inner..h.total_len)?;
    if q.len() < IPV4_MIN_HDR || q[0] >> 4 != 4 {
        return None;
    }
    let inner_ihl = usize::from(q[0] & 0x0f) * 4;
    let proto = Proto::from_number(q[9])?;
    if inner_ihl < IPV4_MIN_HDR
        || q.len() < inner_ihl + 4
        || u16::from_be_bytes([q[6], q[7]]) & 0x1fff != 0
    {
        return None;
    }
    let t = &q[inner_ihl..];
    Some(IcmpError {
        inner,
        inner_ihl,
        proto,
        src: SocketAddrV4::new(Ipv4Addr::new(q[12], q[13], q[14], q[15]), read_u16(t, 0)),
        dst: SocketAddrV4::new(Ipv4Addr::new(q[16], q[17], q[18], q[19]), read_u16(t, 2)),
    })
}

/// Rewrites an ICMP error: the outer addresses and the quoted datagram's
/// addresses and ports, then recomputes the ICMP checksum.
pub fn rewrite_icmp_error(
    p: &mut [u8],
    h: &Ipv4Hdr,
    e: &IcmpError,
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    inner_src: SocketAddrV4,
    inner_dst: SocketAddrV4,
) {
    let l4 = e.inner + e.inner_ihl;
    let avail = h.total_len - l4;
    for (end, to) in [(End::Src, inner_src), (End::Dst, inner_dst)] {
        let old = set_ip(p, e.inner, end, *to.ip());
        set_l4(p, l4, avail, e.proto, end, old, to);
    }
    write_u16(p, h.ihl + 2, 0);
    let c = checksum(&p[h.ihl..h.total_len]);
    write_u16(p, h.ihl + 2, c);
    set_ip(p, 0, End::Src, outer_src);
    set_ip(p, 0, End::Dst, outer_dst);
}

// ---------------------------------------------------------------- builders

/// Appends a 20-byte IPv4 header (no options, DF set: an atomic datagram
/// whose ID may be zero, RFC 6864 §4.1) for `payload_len` bytes.
fn push_ipv4_header(
    out: &mut Vec<u8>,
    proto: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    payload_len: usize,
) {
    let start = out.len();
    let total = (IPV4_MIN_HDR + payload_len) as u16;
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0x40, 0, DEFAULT_TTL, proto, 0, 0]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    let c = checksum(&out[start..start + IPV4_MIN_HDR]);
    write_u16(out, start + 10, c);
}

/// An echo reply (RFC 792) to the echo request `req`, into `out`; the
/// identifier, sequence number and data are echoed. `false` if `req` is
/// not an unfragmented echo request.
pub fn build_echo_reply(req: &[u8], h: &Ipv4Hdr, out: &mut Vec<u8>) -> bool {
    out.clear();
    if h.more_fragments || h.is_later_fragment() || icmp_type(req, h) != Some(ICMP_ECHO_REQUEST) {
        return false;
    }
    let icmp = &req[h.ihl..h.total_len];
    push_ipv4_header(out, IPPROTO_ICMP, h.dst, h.src, icmp.len());
    let at = out.len();
    out.extend_from_slice(icmp);
    out[at] = ICMP_ECHO_REPLY;
    out[at + 1] = 0;
    write_u16(out, at + 2, 0);
    let c = checksum(&out[at..]);
    write_u16(out, at + 2, c);
    true
}

/// A TCP reset answering segment `seg` (RFC 793 §3.4, "Reset
/// Generation", case 1: no such connection), into `out`:
/// if the segment has ACK, `<SEQ=SEG.ACK><CTL=RST>`; otherwise
/// `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`, where SYN and FIN each
/// count one in SEG.LEN. `false` (nothing built) for a segment that is
/// itself a reset, which must never be answered.
pub fn build_tcp_rst(seg: &[u8], h: &Ipv4Hdr, l4: &L4, out: &mut Vec<u8>) -> bool {
    out.clear();
    if l4.flags & TCP_RST != 0 {
        return false;
    }
    let t = &seg[h.ihl..h.total_len];
    let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
    let ack = u32::from_be_bytes([t[8], t[9], t[10], t[11]]);
    let data_offset = usize::from(t[12] >> 4) * 4;
    let (rst_seq, rst_ack, flags) = if l4.flags & TCP_ACK != 0 {
        (ack, 0, TCP_RST)
    } else {
        let mut len = (t.len() - data_offset) as u32;
        len += u32::from(l4.flags & TCP_SYN != 0) + u32::from(l4.flags & TCP_FIN != 0);
        (0, seq.wrapping_add(len), TCP_RST | TCP_ACK)
    };
    push_ipv4_header(out, IPPROTO_TCP, h.dst, h.src, 20);
    let at = out.len();
    out.extend_from_slice(&l4.dst_port.to_be_bytes());
    out.extend_from_slice(&l4.src_port.to_be_bytes());
    out.extend_from_slice(&rst_seq.to_be_bytes());
    out.extend_from_slice(&rst_ack.to_be_bytes());
    out.extend_from_slice(&[5 << 4, flags, 0, 0, 0, 0, 0, 0]);
    let mut pseudo = ones_sum(&h.dst.octets(), 0);
    pseudo = ones_sum(&h.src.octets(), pseudo);
    pseudo += u32::from(IPPROTO_TCP) + 20;
    let c = !fold(ones_sum(&out[at..], pseudo));
    write_u16(out, at + 16, c);
    true
}

/// Turns TCP segment `p` into a reset that keeps its sequence and
/// acknowledgment numbers (and its payload, which a receiver ignores in a
/// RST, RFC 9293 §3.5.3): the flags become RST, plus ACK if it had one,
/// and the checksum is fixed. To the segment's receiver it is in order, so
/// it is taken at once (RFC 5961 §3.2: a RST must carry the next expected
/// sequence number; in SYN-SENT its ACK must acknowledge the SYN). `false`
/// if `p` is no TCP segment with a whole header.
pub fn make_rst(p: &mut [u8], h: &Ipv4Hdr) -> bool {
    if h.proto != IPPROTO_TCP || h.is_later_fragment() || h.total_len < h.ihl + 20 {
        return false;
    }
    let word = h.ihl + 12;
    let old = read_u16(p, word);
    let flags = (old as u8 & TCP_ACK) | TCP_RST;
    let new = (old & 0xff00) | u16::from(flags);
    write_u16(p, word, new);
    let ca = h.ihl + Proto::Tcp.checksum_offset();
    let hc = read_u16(p, ca);
    write_u16(p, ca, adjust(hc, &[old], &[new]));
    true
}

/// An ICMP destination unreachable (type 3, `code`) from `from` about
/// datagram `orig`, quoting its IP header and the first 8 bytes of its
/// data (RFC 792), into `out`.
pub fn build_icmp_unreachable(
    orig: &[u8],
    h: &Ipv4Hdr,
    from: Ipv4Addr,
    code: u8,
    out: &mut Vec<u8>,
) {
    out.clear();
    let quoted = &orig[..h.total_len.min(h.ihl + ICMP_QUOTED_DATA)];
    push_ipv4_header(out, IPPROTO_ICMP, from, h.src, ICMP_HDR + quoted.len());
    let at = out.len();
    out.extend_from_slice(&[ICMP_DEST_UNREACHABLE, code, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(quoted);
    let c = checksum(&out[at..]);
    write_u16(out, at + 2, c);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_update_matches_recomputation() {
        let mut data = [
            0x45u8, 0, 0, 40, 1, 2, 0, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let c = checksum(&data);
        write_u16(&mut data, 10, c);
        assert_eq!(checksum(&data), 0);
        let old = set_ip(&mut data, 0, End::Dst, Ipv4Addr::new(192, 168, 200, 254));
        assert_eq!(old, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(checksum(&data), 0, "header still sums to zero");
    }

    #[test]
    fn odd_length_sum_pads_with_zero() {
        assert_eq!(ones_sum(&[0x12, 0x34, 0x56], 0), 0x1234 + 0x5600);
    }

    #[test]
    fn rejects_truncated_and_inconsistent_headers() {
        assert_eq!(parse_ipv4(&[0x60; 40]), Err(ParseError::NotIpv4));
        assert_eq!(parse_ipv4(&[0x45; 10]), Err(ParseError::NotIpv4));
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[3] = 60; // claims 60 bytes, has 20
        assert_eq!(parse_ipv4(&p), Err(ParseError::Malformed));
        p[0] = 0x44; // IHL 16 bytes
        p[3] = 20;
        assert_eq!(parse_ipv4(&p), Err(ParseError::Malformed));
    }
}
