//! Keyed hashing for the balancer: SipHash-1-3 (Aumasson & Bernstein,
//! "SipHash: a fast short-input PRF", 2012; the variant std's `HashMap`
//! uses), written out so that its output depends only on the key and the
//! input — not on the Rust version or a per-process random state — and so
//! tests are deterministic.
//!
//! Must not: be used where the output is kept across versions of meshd
//! (nothing here is a wire or disk format).

/// SipHash with `C` compression and `D` finalization rounds.
fn siphash<const C: usize, const D: usize>(key: [u64; 2], data: &[u8]) -> u64 {
    let mut v = [
        key[0] ^ 0x736f_6d65_7073_6575,
        key[1] ^ 0x646f_7261_6e64_6f6d,
        key[0] ^ 0x6c79_6765_6e65_7261,
        key[1] ^ 0x7465_6462_7974_6573,
    ];
    let round = |v: &mut [u64; 4]| {
        v[0] = v[0].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(13) ^ v[0];
        v[0] = v[0].rotate_left(32);
        v[2] = v[2].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(16) ^ v[2];
        v[0] = v[0].wrapping_add(v[3]);
        v[3] = v[3].rotate_left(21) ^ v[0];
        v[2] = v[2].wrapping_add(v[1]);
        v[1] = v[1].rotate_left(17) ^ v[2];
        v[2] = v[2].rotate_left(32);
    };
    let compress = |v: &mut [u64; 4], m: u64| {
        v[3] ^= m;
        for _ in 0..C {
            round(v);
        }
        v[0] ^= m;
    };
    let mut blocks = data.chunks_exact(8);
    for b in &mut blocks {
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        compress(&mut v, u64::from_le_bytes(w));
    }
    let mut last = [0u8; 8];
    let rest = blocks.remainder();
    last[..rest.len()].copy_from_slice(rest);
    last[7] = data.len() as u8;
    compress(&mut v, u64::from_le_bytes(last));
    v[2] ^= 0xff;
    for _ in 0..D {
        round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// SipHash-1-3 of `data` under `key`.
pub fn sip13(key: [u64; 2], data: &[u8]) -> u64 {
    siphash::<1, 3>(key, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn siphash24_matches_the_paper_test_vector() {
        // Appendix A of the SipHash paper: key 00..0f, message 00..0e.
        let key = [
            u64::from_le_bytes([0, 1, 2, 3, 4, 5, 6, 7]),
            u64::from_le_bytes([8, 9, 10, 11, 12, 13, 14, 15]),
        ];
        let msg: Vec<u8> = (0..15).collect();
        assert_eq!(siphash::<2, 4>(key, &msg), 0xa129_ca61_49be_45e5);
    }

    #[test]
    fn key_changes_output() {
        assert_ne!(sip13([1, 2], b"flow"), sip13([1, 3], b"flow"));
        assert_eq!(sip13([1, 2], b"flow"), sip13([1, 2], b"flow"));
    }
}
