//! Byte-level BPE merging for one pre-tokenized piece (protocol.md §1.4).
//!
//! Symbols are token ids from the start: a piece's initial symbols are the ids of its single
//! bytes, and a merge rule maps an adjacent id pair to `(rank, merged id)`. The lowest rank
//! wins, ties go to the leftmost pair, until no adjacent pair has a rule. Short pieces (the
//! vast majority) use a linear scan over a small array; long ones use a heap so that a
//! multi-megabyte run of one letter stays O(n log n).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// A small multiplicative hasher: the keys (id pairs, short byte strings) are not attacker
/// controlled in a way that matters for a local tokenizer, and SipHash would dominate the
/// per-piece cost.
#[derive(Default, Clone, Copy)]
pub(crate) struct FastHasher(u64);

const K: u64 = 0x517c_c1b7_2722_0a95;

impl FastHasher {
    #[inline]
    fn add(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(K);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59));
        }
    }
    #[inline]
    fn write_u64(&mut self, x: u64) {
        self.add(x);
    }
    #[inline]
    fn write_usize(&mut self, x: usize) {
        self.add(x as u64);
    }
    /// A product's low bits depend only on the factors' low bits, and hashbrown picks buckets
    /// from the low bits: fold the well-mixed high half down so that, e.g., pair keys do not
    /// collide whenever their right ids share low bits.
    #[inline]
    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
}

pub(crate) type FastMap<Kk, V> = HashMap<Kk, V, BuildHasherDefault<FastHasher>>;

/// Merge rules keyed by `(left << 32) | right`, valued `(rank, merged id)`.
pub(crate) struct Merges {
    map: FastMap<u64, (u32, u32)>,
}

#[inline]
fn key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

/// Pieces with at most this many symbols use the linear scan.
const LINEAR_MAX: usize = 48;

impl Merges {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Merges {
            map: FastMap::with_capacity_and_hasher(n, Default::default()),
        }
    }

    /// Later duplicates overwrite earlier ones, as HF's merge map does when it is collected.
    pub(crate) fn insert(&mut self, left: u32, right: u32, rank: u32, merged: u32) {
        self.map.insert(key(left, right), (rank, merged));
    }

    #[inline]
    fn get(&self, a: u32, b: u32) -> Option<(u32, u32)> {
        self.map.get(&key(a, b)).copied()
    }

    /// Merge `syms` in place (initial symbol ids of one piece) and append the result to `out`.
    pub(crate) fn apply(&self, syms: &mut Vec<u32>, scratch: &mut Scratch, out: &mut Vec<u32>) {
        if syms.len() <= LINEAR_MAX {
            self.apply_linear(syms, &mut scratch.ranks);
            out.extend_from_slice(syms);
        } else {
            self.apply_heap(syms, scratch, out);
        }
    }

    /// Quadratic-in-the-worst-case scan, fastest for short pieces: `ranks[i]` caches the rule
    /// of pair `(i, i+1)` so each step rescans only integers, not the hash map.
    fn apply_linear(&self, syms: &mut Vec<u32>, ranks: &mut Vec<(u32, u32)>) {
        const NONE: (u32, u32) = (u32::MAX, 0);
        if syms.len() < 2 {
            return;
        }
        ranks.clear();
        for w in syms.windows(2) {
            ranks.push(self.get(w[0], w[1]).unwrap_or(NONE));
        }
        loop {
            let mut best = u32::MAX;
            let mut at = 0usize;
            for (i, r) in ranks.iter().enumerate() {
                if r.0 < best {
                    best = r.0;
                    at = i;
                }
            }
            if best == u32::MAX {
                break;
            }
            let merged = ranks[at].1;
            syms[at] = merged;
            syms.remove(at + 1);
            ranks.remove(at);
            if at > 0 {
                ranks[at - 1] = self.get(syms[at - 1], merged).unwrap_or(NONE);
            }
            if at + 1 < syms.len() {
                ranks[at] = self.get(merged, syms[at + 1]).unwrap_or(NONE);
            }
        }
    }

    /// Heap-driven merging over a linked list of symbols. Heap entries may go stale when a
    /// neighbour merges; an entry is applied only if its left slot is alive and the current
    /// (left, right) ids are still the pair it was computed for. Merged ids always name longer
    /// strings than their parts, so a changed slot can never carry its old id again.
    fn apply_heap(&self, syms: &[u32], scratch: &mut Scratch, out: &mut Vec<u32>) {
        const NIL: u32 = u32::MAX;
        let n = syms.len();
        let nodes = &mut scratch.nodes;
        nodes.clear();
        for (i, &id) in syms.iter().enumerate() {
            let next = if i + 1 < n { i as u32 + 1 } else { NIL };
            nodes.push(Node {
                id,
                next,
                alive: true,
            });
        }
        let heap = &mut scratch.heap;
        heap.clear();
        for i in 0..n.saturating_sub(1) {
            if let Some((rank, _)) = self.get(syms[i], syms[i + 1]) {
                heap.push(Reverse((rank, i as u32, syms[i], syms[i + 1])));
            }
        }
        // Previous-pointers are only needed to find the left neighbour after a merge.
        let prev = &mut scratch.prev;
        prev.clear();
        prev.extend((0..n).map(|i| if i == 0 { NIL } else { i as u32 - 1 }));
        while let Some(Reverse((_, pos, left, right))) = heap.pop() {
            let p = pos as usize;
            let Some(node) = nodes.get(p).copied() else {
                continue;
            };
            if !node.alive || node.id != left || node.next == NIL {
                continue;
            }
            let r = node.next as usize;
            if nodes[r].id != right {
                continue;
            }
            let Some((_, merged)) = self.get(left, right) else {
                continue;
            };
            let after = nodes[r].next;
            nodes[r].alive = false;
            nodes[p].id = merged;
            nodes[p].next = after;
            if after != NIL {
                prev[after as usize] = pos;
                if let Some((rank, _)) = self.get(merged, nodes[after as usize].id) {
                    heap.push(Reverse((rank, pos, merged, nodes[after as usize].id)));
                }
            }
            let before = prev[p];
            if before != NIL {
                let bid = nodes[before as usize].id;
                if let Some((rank, _)) = self.get(bid, merged) {
                    heap.push(Reverse((rank, before, bid, merged)));
                }
            }
        }
        // Slot 0 is never absorbed (merges keep the left slot), so the list starts there.
        let mut i = 0usize;
        while let Some(node) = nodes.get(i) {
            out.push(node.id);
            i = node.next as usize;
        }
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Node {
    id: u32,
    next: u32,
    alive: bool,
}

/// Reusable buffers for [`Merges::apply`].
#[derive(Default)]
pub(crate) struct Scratch {
    ranks: Vec<(u32, u32)>,
    nodes: Vec<Node>,
    prev: Vec<u32>,
    heap: BinaryHeap<Reverse<(u32, u32, u32, u32)>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both strategies must agree; a tiny rule set with competing ranks and ties.
    #[test]
    fn linear_and_heap_agree() {
        // ids: 0=a 1=b 2=c, 3=ab 4=bc 5=aa 6=aab 7=abc
        let mut m = Merges::with_capacity(8);
        m.insert(0, 1, 2, 3);
        m.insert(1, 2, 1, 4);
        m.insert(0, 0, 0, 5);
        m.insert(5, 1, 3, 6);
        m.insert(3, 2, 4, 7);
        let mut seed = 12345u64;
        for len in 0..200 {
            let mut syms = Vec::new();
            for _ in 0..len {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                syms.push(((seed >> 33) % 3) as u32);
            }
            let mut scratch = Scratch::default();
            let mut a = syms.clone();
            m.apply_linear(&mut a, &mut scratch.ranks);
            let mut b = Vec::new();
            m.apply_heap(&syms, &mut scratch, &mut b);
            assert_eq!(a, b, "len {len}");
        }
        let mut s = vec![0, 0, 0];
        m.apply_linear(&mut s, &mut Vec::new());
        assert_eq!(s, [5, 0], "ties go to the leftmost pair");
    }
}
