//! Address and key allocation: overlay IPs for gateways, VIPs for services,
//! pre-shared keys for cluster pairs.
//!
//! Choosing a free address is pure ([`first_free`]); making it stick is the
//! caller's store transaction, which writes an allocation key
//! (`/ipam/<pool>/<ip>`) guarded by `Compare::Absent`. Two allocators racing
//! for one address (also on two coordinators sharing a store) cannot both
//! win; the loser retries with the next free address.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rand::RngCore as _;

use crate::keyspace::PSKS as PSK_PREFIX;
#[cfg(test)]
use crate::keyspace::VIPS as VIP_PREFIX;

/// The lowest usable host address of `pool` not in `used`, or `None` when
/// the pool is exhausted. Network and broadcast addresses are never handed
/// out (for /31 and /32 every address is usable, RFC 3021).
pub fn first_free(pool: Ipv4Net, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    pool.hosts().find(|a| !used.contains(a))
}

/// The first free address at or after host number `offset` (wrapping), so
/// allocators that lost a race spread out instead of all retrying the same
/// lowest address.
pub fn free_from(pool: Ipv4Net, used: &BTreeSet<Ipv4Addr>, offset: u64) -> Option<Ipv4Addr> {
    let cap = capacity(pool);
    let skip = usize::try_from(offset % cap).unwrap_or(0);
    pool.hosts()
        .skip(skip)
        .chain(pool.hosts().take(skip))
        .find(|a| !used.contains(a))
}

/// Number of addresses [`first_free`] can hand out from `pool`.
pub fn capacity(pool: Ipv4Net) -> u64 {
    match pool.prefix_len() {
        32 => 1,
        31 => 2,
        p => (1u64 << (32 - p)) - 2,
    }
}

/// Allocation key of `ip` under `prefix`.
pub fn alloc_key(prefix: &str, ip: Ipv4Addr) -> String {
    format!("{prefix}{ip}")
}

/// Parses the address out of an allocation key.
pub fn parse_alloc_key(prefix: &str, key: &str) -> Option<Ipv4Addr> {
    key.strip_prefix(prefix)?.parse().ok()
}

/// Key of the pre-shared key of the pair `{a, b}` (order does not matter).
pub fn psk_key(a: &str, b: &str) -> String {
    let (x, y) = if a <= b { (a, b) } else { (b, a) };
    format!("{PSK_PREFIX}{x}/{y}")
}

/// The other cluster of a PSK key, if `me` is one of the pair.
pub fn psk_peer<'a>(key: &'a str, me: &str) -> Option<&'a str> {
    let (x, y) = key.strip_prefix(PSK_PREFIX)?.split_once('/')?;
    if x == me {
        Some(y)
    } else if y == me {
        Some(x)
    } else {
        None
    }
}

/// A fresh 32-byte random secret (WireGuard PSK, tokens), from the thread's
/// CSPRNG.
pub fn random_secret() -> [u8; 32] {
    let mut k = [0u8; 32];
    rand::rng().fill_bytes(&mut k);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_free_skips_used_network_and_broadcast() {
        let pool: Ipv4Net = "10.0.0.0/30".parse().unwrap();
        let mut used = BTreeSet::new();
        assert_eq!(first_free(pool, &used), Some(Ipv4Addr::new(10, 0, 0, 1)));
        used.insert(Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(first_free(pool, &used), Some(Ipv4Addr::new(10, 0, 0, 2)));
        used.insert(Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(first_free(pool, &used), None, "broadcast is not handed out");
        assert_eq!(capacity(pool), 2);
        used.remove(&Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(
            first_free(pool, &used),
            Some(Ipv4Addr::new(10, 0, 0, 1)),
            "reuse after free"
        );
    }

    #[test]
    fn free_from_wraps_around() {
        let pool: Ipv4Net = "10.0.0.0/29".parse().unwrap();
        let used: BTreeSet<_> = [Ipv4Addr::new(10, 0, 0, 5), Ipv4Addr::new(10, 0, 0, 6)].into();
        assert_eq!(free_from(pool, &used, 4), Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(free_from(pool, &used, 2), Some(Ipv4Addr::new(10, 0, 0, 3)));
        assert_eq!(
            free_from(pool, &used, 6 + 2),
            Some(Ipv4Addr::new(10, 0, 0, 3))
        );
        let full: BTreeSet<_> = pool.hosts().collect();
        assert_eq!(free_from(pool, &full, 3), None);
    }

    #[test]
    fn psk_keys_are_symmetric() {
        assert_eq!(psk_key("b", "a"), psk_key("a", "b"));
        let k = psk_key("west", "east");
        assert_eq!(psk_peer(&k, "east"), Some("west"));
        assert_eq!(psk_peer(&k, "west"), Some("east"));
        assert_eq!(psk_peer(&k, "north"), None);
    }

    #[test]
    fn alloc_keys_round_trip() {
        let ip = Ipv4Addr::new(100, 65, 3, 7);
        assert_eq!(
            parse_alloc_key(VIP_PREFIX, &alloc_key(VIP_PREFIX, ip)),
            Some(ip)
        );
    }
}
