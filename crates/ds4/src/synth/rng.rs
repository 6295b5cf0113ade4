//! Counter-based random numbers for the synthetic weights.
//!
//! Every chunk of every tensor gets its own stream, derived by hashing (seed, tensor name,
//! chunk index). Chunks are fixed by byte offsets, not by threads, so the bytes are the same
//! whatever the thread count or the order rayon runs the chunks in, and any tensor can be
//! generated alone (e.g. to check it) without generating the ones before it.
//!
//! The generator is SplitMix64 (Steele, Lea & Flood, "Fast splittable pseudorandom number
//! generators", OOPSLA 2014): one add and a 64-bit finaliser per output, about 1 ns for 8
//! bytes; the fill loops use a handful of operations per output on top of that. Statistical quality far
//! beyond what random test weights need; not cryptographic.

/// The SplitMix64 finaliser: a bijective 64-bit mix with full avalanche.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a over the tensor name: a stable 64-bit identity (independent of tensor order).
pub(crate) fn name_hash(name: &str) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Key of one tensor's random streams.
pub(crate) fn tensor_key(seed: u64, name: &str) -> u64 {
    mix64(mix64(seed ^ 0x5d53_7f3c_9a1e_0b47) ^ name_hash(name))
}

#[derive(Clone, Debug)]
pub(crate) struct Rng(u64);

/// Golden-ratio increment of SplitMix64.
const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

impl Rng {
    /// The stream of chunk `index` of the tensor with key `key`.
    pub(crate) fn stream(key: u64, index: u64) -> Rng {
        Rng(mix64(key ^ mix64(index.wrapping_add(GAMMA))))
    }

    #[inline]
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix64(self.0)
    }

    /// Uniform in [0, 1) with 24 bits (exact in f32).
    #[inline]
    pub(crate) fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Uniform integer in [0, n), by the multiply-high method (bias below 2⁻⁵⁰ for the
    /// small n used here, irrelevant for test weights).
    #[inline]
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Fills `out` with random bytes, 8 at a time.
    pub(crate) fn fill_bytes(&mut self, out: &mut [u8]) {
        let mut words = out.chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = words.into_remainder();
        if !rest.is_empty() {
            let last = self.next_u64().to_le_bytes();
            let n = rest.len();
            rest.copy_from_slice(&last[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_and_below_stay_in_range() {
        let mut r = Rng::stream(3, 4);
        let mut seen = [false; 7];
        for _ in 0..10_000 {
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
            let k = r.below(7) as usize;
            seen[k] = true;
        }
        assert!(
            seen.iter().all(|&s| s),
            "every value of below(7) should occur"
        );
    }

    #[test]
    fn streams_differ_by_key_and_index() {
        let a = Rng::stream(tensor_key(1, "x"), 0).next_u64();
        assert_ne!(a, Rng::stream(tensor_key(1, "x"), 1).next_u64());
        assert_ne!(a, Rng::stream(tensor_key(1, "y"), 0).next_u64());
        assert_ne!(a, Rng::stream(tensor_key(2, "x"), 0).next_u64());
        assert_eq!(a, Rng::stream(tensor_key(1, "x"), 0).next_u64());
    }
}
