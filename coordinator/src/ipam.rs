//! Address and key allocation: overlay IPs for gateways, VIPs for services,
//! pre-shared keys for cluster pairs.
//!
//! Choosing a free address is pure ([`next_free`]); making it stick is the
//! caller's store transaction, which writes an allocation key
//! (`/ipam/<pool>/<ip>`) guarded by `Compare::Absent`. Two allocators racing
//! for one address (also on two coordinators sharing a store) cannot both
//! win; the loser retries with the next free address.
//!
//! A freed address is not handed out again at once: clients may still
//! have it cached (DNS answers, connections), and would reach whatever got
//! it next. Each pool has a cursor in the store (`/ipam-cursor/overlay`,
//! `/ipam-cursor/vip`: the last address handed out); the next allocation
//! takes the first free address after it, wrapping around the pool. A
//! freed address is thus reused only once the cursor has gone round the
//! pool, or when it is the only one left. The cursor survives restarts and
//! is shared by coordinators on one store. It is a hint, not a lock: the
//! allocating transaction does not pin it (all allocations of a pool would
//! then contend on one key), so allocators racing each other may leave it
//! a few addresses back; only uniqueness is enforced by the store.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use rand::RngCore as _;

use crate::keyspace::PSKS as PSK_PREFIX;
#[cfg(test)]
use crate::keyspace::VIPS as VIP_PREFIX;

/// How far past the cursor an allocator that lost a race may start its
/// next search (a random number of addresses below this).
pub const RETRY_SPREAD: u64 = 64;

/// The first usable host address of `pool` after `cursor` (the last one
/// handed out) and `skip` more, wrapping around, that is not in `used`;
/// `None` when the pool is exhausted. Without a cursor, or with one outside
/// the pool (the pool was changed), the search starts at the pool's first
/// host. Network and broadcast addresses are never handed out (for /31 and
/// /32 every address is usable, RFC 3021).
pub fn next_free(
    pool: Ipv4Net,
    used: &BTreeSet<Ipv4Addr>,
    cursor: Option<Ipv4Addr>,
    skip: u64,
) -> Option<Ipv4Addr> {
    let first = u32::from(pool.hosts().next()?);
    let cap = capacity(pool);
    // Host number (0-based) where the search starts.
    let start = cursor
        .map(|c| u64::from(u32::from(c).wrapping_sub(first)))
        .filter(|&i| i < cap)
        .map_or(0, |i| i + 1)
        .saturating_add(skip)
        % cap;
    (0..cap)
        .map(|k| {
            let i = (start + k) % cap;
            Ipv4Addr::from(first + u32::try_from(i).expect("a host number is below 2^32"))
        })
        .find(|a| !used.contains(a))
}

/// Number of addresses [`next_free`] can hand out from `pool`.
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

/// Parses a pool cursor's value (the address, as text).
pub fn parse_cursor(value: &[u8]) -> Option<Ipv4Addr> {
    std::str::from_utf8(value).ok()?.parse().ok()
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

    fn ip(d: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, d)
    }

    #[test]
    fn next_free_skips_used_network_and_broadcast() {
        let pool: Ipv4Net = "10.0.0.0/30".parse().unwrap();
        let mut used = BTreeSet::new();
        assert_eq!(next_free(pool, &used, None, 0), Some(ip(1)));
        used.insert(ip(1));
        assert_eq!(next_free(pool, &used, Some(ip(1)), 0), Some(ip(2)));
        used.insert(ip(2));
        assert_eq!(
            next_free(pool, &used, Some(ip(2)), 0),
            None,
            "broadcast is not handed out"
        );
        assert_eq!(capacity(pool), 2);
        let one: Ipv4Net = "10.0.0.7/32".parse().unwrap();
        assert_eq!(next_free(one, &used, Some(ip(7)), 0), Some(ip(7)));
    }

    #[test]
    fn a_freed_address_waits_until_the_cursor_comes_round() {
        let pool: Ipv4Net = "10.0.0.0/29".parse().unwrap(); // .1 - .6
        let mut used = BTreeSet::new();
        let mut cursor = None;
        let take = |used: &mut BTreeSet<Ipv4Addr>, cursor: &mut Option<Ipv4Addr>| {
            let a = next_free(pool, used, *cursor, 0).unwrap();
            used.insert(a);
            *cursor = Some(a);
            a
        };
        assert_eq!(take(&mut used, &mut cursor), ip(1));
        assert_eq!(take(&mut used, &mut cursor), ip(2));
        used.remove(&ip(2));
        assert_eq!(
            take(&mut used, &mut cursor),
            ip(3),
            "the freed .2 is not reused at once"
        );
        used.remove(&ip(1));
        assert_eq!(take(&mut used, &mut cursor), ip(4));
        assert_eq!(take(&mut used, &mut cursor), ip(5));
        assert_eq!(take(&mut used, &mut cursor), ip(6));
        assert_eq!(
            take(&mut used, &mut cursor),
            ip(1),
            "wraps around to the oldest freed"
        );
        assert_eq!(take(&mut used, &mut cursor), ip(2));
        assert_eq!(next_free(pool, &used, cursor, 0), None, "full");
        used.remove(&ip(4));
        assert_eq!(
            take(&mut used, &mut cursor),
            ip(4),
            "when it is the only free one, a freed address is reused"
        );
    }

    #[test]
    fn a_retry_skips_ahead_and_wraps() {
        let pool: Ipv4Net = "10.0.0.0/29".parse().unwrap(); // .1 - .6
        let used: BTreeSet<_> = [ip(5)].into();
        assert_eq!(next_free(pool, &used, Some(ip(2)), 1), Some(ip(4)));
        assert_eq!(
            next_free(pool, &used, Some(ip(2)), 2),
            Some(ip(6)),
            "skips used .5"
        );
        assert_eq!(next_free(pool, &used, Some(ip(2)), 4), Some(ip(1)), "wraps");
        assert_eq!(next_free(pool, &used, Some(ip(2)), 6 + 1), Some(ip(4)));
        assert_eq!(next_free(pool, &used, None, u64::MAX), Some(ip(4)));
    }

    #[test]
    fn a_cursor_outside_the_pool_starts_at_its_first_host() {
        let pool: Ipv4Net = "10.0.0.0/29".parse().unwrap();
        let used = BTreeSet::new();
        for c in [ip(0), ip(7), ip(200), Ipv4Addr::new(192, 168, 0, 1)] {
            assert_eq!(next_free(pool, &used, Some(c), 0), Some(ip(1)), "{c}");
        }
        assert_eq!(parse_cursor(b"10.0.0.3"), Some(ip(3)));
        assert_eq!(parse_cursor(b"junk"), None);
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
