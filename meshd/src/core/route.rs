//! Cryptokey routing table: longest-prefix match of IPv4 addresses onto
//! peers (WireGuard whitepaper §2, "Cryptokey Routing"). Pure.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// The one rule for an address field of the netmap (a peer's allowed IPs,
/// this gateway's overlay IP and workload CIDRs): an IPv4 CIDR, or a bare
/// IPv4 address meaning its /32. Host bits of a CIDR are cleared.
pub fn parse_allowed(s: &str) -> Option<Ipv4Net> {
    s.parse::<Ipv4Net>()
        .map(|n| n.trunc())
        .ok()
        .or_else(|| s.parse::<Ipv4Addr>().ok().map(Ipv4Net::from))
}

/// Maps prefixes to values; lookups return the value of the longest prefix
/// containing the address.
#[derive(Debug, Clone)]
pub struct RouteTable<T> {
    /// Sorted by prefix length, longest first, so the first hit wins.
    entries: Vec<(Ipv4Net, T)>,
}

impl<T> Default for RouteTable<T> {
    fn default() -> Self {
        RouteTable {
            entries: Vec::new(),
        }
    }
}

impl<T: Clone + PartialEq> RouteTable<T> {
    /// A table from `(prefix, value)` pairs; a prefix given twice keeps its
    /// last value.
    pub fn new(routes: impl IntoIterator<Item = (Ipv4Net, T)>) -> Self {
        let mut entries: Vec<(Ipv4Net, T)> = Vec::new();
        for (net, v) in routes {
            let net = net.trunc();
            entries.retain(|(n, _)| *n != net);
            entries.push((net, v));
        }
        entries.sort_by(|a, b| b.0.prefix_len().cmp(&a.0.prefix_len()).then(a.0.cmp(&b.0)));
        RouteTable { entries }
    }

    /// The value of the longest prefix containing `ip`.
    pub fn lookup(&self, ip: Ipv4Addr) -> Option<&T> {
        self.entries
            .iter()
            .find(|(n, _)| n.contains(&ip))
            .map(|(_, v)| v)
    }

    /// Every prefix and value, longest prefixes first.
    pub fn iter(&self) -> impl Iterator<Item = &(Ipv4Net, T)> {
        self.entries.iter()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn allowed_ips_are_cidrs_or_bare_addresses() {
        let p = |s| super::parse_allowed(s).map(|n| n.to_string());
        assert_eq!(p("10.1.0.0/16").as_deref(), Some("10.1.0.0/16"));
        assert_eq!(p("10.1.2.3/16").as_deref(), Some("10.1.0.0/16"));
        assert_eq!(p("100.64.0.7").as_deref(), Some("100.64.0.7/32"));
        assert_eq!(p("fd00::/8"), None);
        assert_eq!(p("10.1.0.0/33"), None);
        assert_eq!(p(""), None);
    }

    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    /// The obviously-correct reference: scan everything, keep the longest.
    fn slow<T: Clone>(routes: &[(Ipv4Net, T)], ip: Ipv4Addr) -> Option<T> {
        routes
            .iter()
            .filter(|(n, _)| n.contains(&ip))
            .max_by_key(|(n, _)| n.prefix_len())
            .map(|(_, v)| v.clone())
    }

    #[test]
    fn longest_prefix_wins() {
        let t = RouteTable::new([
            (net("10.0.0.0/8"), 1),
            (net("10.1.0.0/16"), 2),
            (net("10.1.2.3/32"), 3),
        ]);
        assert_eq!(t.lookup("10.1.2.3".parse().unwrap()), Some(&3));
        assert_eq!(t.lookup("10.1.2.4".parse().unwrap()), Some(&2));
        assert_eq!(t.lookup("10.9.0.1".parse().unwrap()), Some(&1));
        assert_eq!(t.lookup("11.0.0.1".parse().unwrap()), None);
    }

    #[test]
    fn matches_naive_reference_on_random_tables() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let routes: Vec<(Ipv4Net, u64)> = (0..20)
                .map(|i| {
                    let addr = Ipv4Addr::from((next() as u32) & 0x0a0f_ffff);
                    let len = (next() % 33) as u8;
                    (Ipv4Net::new(addr, len).unwrap().trunc(), i)
                })
                .collect();
            // Deduplicate like the table does (last value wins).
            let mut dedup: Vec<(Ipv4Net, u64)> = Vec::new();
            for (n, v) in &routes {
                dedup.retain(|(m, _)| m != n);
                dedup.push((*n, *v));
            }
            let t = RouteTable::new(routes);
            for _ in 0..50 {
                let ip = Ipv4Addr::from((next() as u32) & 0x0a0f_ffff);
                assert_eq!(t.lookup(ip).copied(), slow(&dedup, ip), "{ip}");
            }
        }
    }
}
