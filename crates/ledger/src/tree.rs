//! The RFC 6962 / RFC 9162 Merkle tree of the ledger, with proofs at any past tree size.
//!
//! `ct-merkle` defines the proof formats, their verification and the node layout; its
//! `MemoryBackedTree` can only prove against its *current* size, while a proof must be made
//! against a signed checkpoint (an older size). So this tree keeps every complete, aligned subtree
//! hash (level `k`, position `j` = leaves `[j·2^k, (j+1)·2^k)`), which are the same in every
//! larger tree, and computes the few right-edge nodes of a given size on demand: a proof costs
//! O(log² n) hashes. The node indices of a proof come from `ct_merkle::indices_for_*_proof`, so
//! the output is exactly what `ct_merkle::RootHash::verify_*` checks (and the known-answer tests
//! compare it with the transparency-dev vectors).

use ct_merkle::{ConsistencyProof, InclusionProof, RootHash};
use sha2_011::{Digest, Sha256};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// RFC 6962 leaf hash: SHA-256(0x00 || leaf).
pub fn leaf_hash(leaf: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(leaf);
    h.finalize().into()
}

/// RFC 6962 interior node hash: SHA-256(0x01 || left || right).
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// `ct-merkle`'s root type for a root hash and size.
pub fn root_of(hash: &Hash, size: u64) -> RootHash<Sha256> {
    RootHash::new((*hash).into(), size)
}

/// Levels of a pruned tree ([`Tree::pruned`]) below which only the newest, incomplete block of
/// `2^PRUNED_BELOW_LEVEL` leaves is kept in memory: the complete blocks' lower nodes are
/// recomputed from their leaves (read back from the store) when a proof needs them.
///
/// Why: the daemon's log gains a leaf for every audited read, so it reaches millions of leaves
/// within weeks; keeping every node costs 64 bytes a leaf (250 MiB at 3.9M leaves, measured),
/// growing without end. Kept from level 8 up it is a quarter of a byte a leaf, and a proof reads
/// at most three blocks of 256 leaves.
pub const PRUNED_BELOW_LEVEL: usize = 8;

/// Reads the leaf hashes `[start, end)` of complete blocks back (the store's `ledger_leaves`).
pub type LoadLeaves<'a, E> = &'a dyn Fn(u64, u64) -> Result<Vec<Hash>, E>;

/// An append-only tree of leaf hashes.
#[derive(Debug, Default, Clone)]
pub struct Tree {
    /// `levels[k][j - base[k]]`: hash of the complete subtree of leaves `[j·2^k, (j+1)·2^k)`.
    levels: Vec<Vec<Hash>>,
    /// Index of the first node kept at each level (non-zero only below `prune_below`).
    base: Vec<u64>,
    /// Levels below this keep only the newest block ([`PRUNED_BELOW_LEVEL`]); `None`: every
    /// node is kept.
    prune_below: Option<usize>,
}

/// For the methods of a tree that keeps every node: never called.
fn nothing_to_load(_: u64, _: u64) -> Result<Vec<Hash>, std::convert::Infallible> {
    unreachable!("a tree made by Tree::new keeps every node")
}

/// MTH of a run of leaf hashes (RFC 6962 2.1).
fn mth(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest(b"").into(),
        1 => leaves[0],
        n => {
            let split = 1usize << (usize::BITS - 1 - (n - 1).leading_zeros());
            node_hash(&mth(&leaves[..split]), &mth(&leaves[split..]))
        }
    }
}

impl Tree {
    /// A tree that keeps every node in memory (`hms-edge audit check`, tests).
    pub fn new() -> Self {
        Self::default()
    }

    /// A tree that keeps only the nodes from [`PRUNED_BELOW_LEVEL`] up, plus the newest block;
    /// its proofs read older leaves back through a [`LoadLeaves`] (the daemon's cache).
    pub fn pruned() -> Self {
        Tree { prune_below: Some(PRUNED_BELOW_LEVEL), ..Self::default() }
    }

    /// Number of leaves.
    pub fn len(&self) -> u64 {
        self.levels.first().map_or(0, |l| self.base[0] + l.len() as u64)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Nodes held in memory (what pruning bounds).
    pub fn nodes_in_memory(&self) -> usize {
        self.levels.iter().map(Vec::len).sum()
    }

    /// Appends a leaf (its data; hashed here).
    pub fn push_leaf(&mut self, leaf: &[u8]) {
        self.push_hash(leaf_hash(leaf));
    }

    /// Appends a leaf by its leaf hash.
    pub fn push_hash(&mut self, h: Hash) {
        if self.levels.is_empty() {
            self.levels.push(Vec::new());
            self.base.push(0);
        }
        self.levels[0].push(h);
        let mut k = 0;
        // Each completed pair at level k makes one node at level k+1 (`base` is even below the
        // pruning level, so the parity of the kept run is the level's).
        while self.levels[k].len().is_multiple_of(2) {
            let n = self.levels[k].len();
            let parent = node_hash(&self.levels[k][n - 2], &self.levels[k][n - 1]);
            if self.levels.len() == k + 1 {
                self.levels.push(Vec::new());
                self.base.push(0);
            }
            self.levels[k + 1].push(parent);
            k += 1;
        }
        // A block just completed: its lower nodes leave memory.
        if let Some(p) = self.prune_below
            && k >= p
        {
            for level in 0..p {
                self.base[level] += self.levels[level].len() as u64;
                self.levels[level].clear();
            }
        }
    }

    /// The node at level `k`, position `j`, when it is in memory.
    fn kept(&self, k: usize, j: u64) -> Option<Hash> {
        let i = j.checked_sub(*self.base.get(k)?)?;
        self.levels[k].get(i as usize).copied()
    }

    /// The leaf hash at `idx`.
    pub fn leaf_with<E>(&self, idx: u64, load: LoadLeaves<'_, E>) -> Result<Option<Hash>, E> {
        if idx >= self.len() {
            return Ok(None);
        }
        match self.kept(0, idx) {
            Some(h) => Ok(Some(h)),
            None => Ok(load(idx, idx + 1)?.first().copied()),
        }
    }

    /// MTH(D[start:end]) for `start` aligned to the largest power of two below `end - start`
    /// (true for every node of the tree): complete subtrees are looked up (or recomputed from
    /// their leaves when pruned), the right edge is computed.
    fn range_hash<E>(&self, start: u64, end: u64, load: LoadLeaves<'_, E>) -> Result<Hash, E> {
        let n = end - start;
        debug_assert!(n > 0 && end <= self.len());
        if n.is_power_of_two() {
            let k = n.trailing_zeros() as usize;
            return match self.kept(k, start >> k) {
                Some(h) => Ok(h),
                None => Ok(mth(&load(start, end)?)),
            };
        }
        let split = 1u64 << (63 - (n - 1).leading_zeros());
        Ok(node_hash(
            &self.range_hash(start, start + split, load)?,
            &self.range_hash(start + split, end, load)?,
        ))
    }

    /// Root hash of the first `size` leaves. The empty tree's root is SHA-256("").
    pub fn root_with<E>(&self, size: u64, load: LoadLeaves<'_, E>) -> Result<Hash, E> {
        assert!(size <= self.len(), "tree has {} leaves, not {size}", self.len());
        if size == 0 {
            return Ok(Sha256::digest(b"").into());
        }
        self.range_hash(0, size, load)
    }

    /// Hash of `ct-merkle` node `idx` (in-order layout: leaf i at 2i, level = trailing ones) in
    /// the tree of the first `size` leaves. Nodes on the right edge cover fewer leaves.
    fn node<E>(&self, idx: u64, size: u64, load: LoadLeaves<'_, E>) -> Result<Hash, E> {
        let level = idx.trailing_ones();
        let start = (idx >> (level + 1)) << level;
        let end = (start + (1u64 << level)).min(size);
        self.range_hash(start, end, load)
    }

    /// Inclusion proof (audit path) of leaf `idx` in the tree of the first `size` leaves.
    pub fn inclusion_proof_with<E>(
        &self,
        idx: u64,
        size: u64,
        load: LoadLeaves<'_, E>,
    ) -> Result<Vec<Hash>, E> {
        assert!(idx < size && size <= self.len());
        ct_merkle::indices_for_inclusion_proof(size, idx)
            .into_iter()
            .map(|i| self.node(i, size, load))
            .collect()
    }

    /// Consistency proof from the first `old` leaves to the first `new` leaves (0 < old ≤ new).
    pub fn consistency_proof_with<E>(
        &self,
        old: u64,
        new: u64,
        load: LoadLeaves<'_, E>,
    ) -> Result<Vec<Hash>, E> {
        assert!(0 < old && old <= new && new <= self.len());
        ct_merkle::indices_for_consistency_proof(old, new - old)
            .into_iter()
            .map(|i| self.node(i, new, load))
            .collect()
    }

    /// Root hash of the whole tree: needs only the nodes kept in memory, pruned or not (the
    /// right edge lies in the newest block).
    pub fn current_root(&self) -> Hash {
        self.root_with(self.len(), &nothing_to_load).unwrap_or_else(|e| match e {})
    }

    /// [`Tree::leaf_with`] of a tree made by [`Tree::new`].
    pub fn leaf(&self, idx: u64) -> Option<Hash> {
        self.leaf_with(idx, &nothing_to_load).unwrap_or_else(|e| match e {})
    }

    /// [`Tree::root_with`] of a tree made by [`Tree::new`].
    pub fn root(&self, size: u64) -> Hash {
        self.root_with(size, &nothing_to_load).unwrap_or_else(|e| match e {})
    }

    /// [`Tree::inclusion_proof_with`] of a tree made by [`Tree::new`].
    pub fn inclusion_proof(&self, idx: u64, size: u64) -> Vec<Hash> {
        self.inclusion_proof_with(idx, size, &nothing_to_load).unwrap_or_else(|e| match e {})
    }

    /// [`Tree::consistency_proof_with`] of a tree made by [`Tree::new`].
    pub fn consistency_proof(&self, old: u64, new: u64) -> Vec<Hash> {
        self.consistency_proof_with(old, new, &nothing_to_load).unwrap_or_else(|e| match e {})
    }
}

/// Checks that `leaf` is at `idx` in the tree of `size` leaves with root `root` (via ct-merkle).
pub fn verify_inclusion(
    leaf: &[u8],
    idx: u64,
    size: u64,
    root: &Hash,
    path: &[Hash],
) -> Result<(), String> {
    let proof = InclusionProof::<Sha256>::try_from_bytes(path.concat())
        .map_err(|e| format!("malformed inclusion proof: {e}"))?;
    root_of(root, size)
        .verify_inclusion(&leaf, idx, &proof)
        .map_err(|e| format!("inclusion proof does not verify: {e}"))
}

/// Checks that the tree (`old_size`, `old_root`) is a prefix of (`new_size`, `new_root`).
pub fn verify_consistency(
    old_size: u64,
    old_root: &Hash,
    new_size: u64,
    new_root: &Hash,
    path: &[Hash],
) -> Result<(), String> {
    if old_size == new_size {
        return if old_root == new_root && path.is_empty() {
            Ok(())
        } else {
            Err("same size, different roots".into())
        };
    }
    let proof = ConsistencyProof::<Sha256>::try_from_bytes(path.concat())
        .map_err(|e| format!("malformed consistency proof: {e}"))?;
    root_of(new_root, new_size)
        .verify_consistency(&root_of(old_root, old_size), &proof)
        .map_err(|e| format!("consistency proof does not verify: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ct_merkle::mem_backed_tree::MemoryBackedTree;

    /// Every root and proof equals what ct-merkle's in-memory tree makes at its current size.
    #[test]
    fn matches_ct_merkle_at_every_size() {
        let mut ours = Tree::new();
        let mut theirs = MemoryBackedTree::<Sha256, Vec<u8>>::new();
        for n in 1..=70u64 {
            let leaf = format!("leaf {n}").into_bytes();
            ours.push_leaf(&leaf);
            theirs.push(leaf);
            assert_eq!(&ours.root(n)[..], &theirs.root().as_bytes()[..], "root at {n}");
            for i in 0..n {
                let p = ours.inclusion_proof(i, n);
                assert_eq!(p.concat(), theirs.prove_inclusion(i as usize).as_bytes(), "{i}/{n}");
                verify_inclusion(format!("leaf {}", i + 1).as_bytes(), i, n, &ours.root(n), &p)
                    .unwrap();
            }
            for old in 1..n {
                let p = ours.consistency_proof(old, n);
                let t = theirs.prove_consistency((n - old) as usize);
                assert_eq!(p.concat(), t.as_bytes(), "consistency {old}->{n}");
                verify_consistency(old, &ours.root(old), n, &ours.root(n), &p).unwrap();
            }
        }
    }

    /// Proofs against an older size stay valid after the tree grew (what checkpoints need).
    #[test]
    fn proofs_at_past_sizes_verify_against_past_roots() {
        let mut t = Tree::new();
        for i in 0..100u32 {
            t.push_leaf(&i.to_be_bytes());
        }
        for size in [1u64, 2, 3, 7, 8, 9, 33, 64, 99, 100] {
            let root = t.root(size);
            for idx in [0, size / 2, size - 1] {
                let p = t.inclusion_proof(idx, size);
                verify_inclusion(&(idx as u32).to_be_bytes(), idx, size, &root, &p).unwrap();
                assert!(verify_inclusion(b"other", idx, size, &root, &p).is_err());
            }
        }
        let p = t.consistency_proof(9, 64);
        let mut bad = p.clone();
        bad[0][0] ^= 1;
        assert!(verify_consistency(9, &t.root(9), 64, &t.root(64), &bad).is_err());
    }

    /// A pruned tree keeps a bounded number of nodes and makes the same roots and proofs as a
    /// full one at every past size, reading only complete blocks' leaves back.
    #[test]
    fn pruned_tree_proves_like_the_full_tree() {
        let block = 1u64 << PRUNED_BELOW_LEVEL;
        let n = 5 * block + 37;
        let leaves: Vec<Hash> = (0..n).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let (mut full, mut pruned) = (Tree::new(), Tree::pruned());
        let mut most = 0;
        for (i, h) in leaves.iter().enumerate() {
            full.push_hash(*h);
            pruned.push_hash(*h);
            most = most.max(pruned.nodes_in_memory());
            assert_eq!(pruned.len(), i as u64 + 1);
            assert_eq!(pruned.current_root(), full.root(i as u64 + 1));
        }
        // Below the pruning level only the newest block; above it n / 2^8 nodes per level.
        assert!(most < 2 * block as usize + 16, "{most} nodes kept");
        assert!(full.nodes_in_memory() > 2 * n as usize - 8);
        let reads = std::cell::RefCell::new(Vec::new());
        let load = |s: u64, e: u64| -> Result<Vec<Hash>, String> {
            assert!(s < e && e <= n);
            // Only leaves of complete blocks are read back, never more than one block.
            assert!(e <= (n / block) * block && e - s <= block, "read {s}..{e}");
            reads.borrow_mut().push(e - s);
            Ok(leaves[s as usize..e as usize].to_vec())
        };
        for size in [1, 2, 255, 256, 257, 511, 512, 700, 1024, 1100, n - 1, n] {
            assert_eq!(pruned.root_with(size, &load).unwrap(), full.root(size), "root {size}");
            for idx in [0, 1, size / 3, size / 2, size - 1].into_iter().filter(|i| *i < size) {
                let p = pruned.inclusion_proof_with(idx, size, &load).unwrap();
                assert_eq!(p, full.inclusion_proof(idx, size), "inclusion {idx}/{size}");
                assert_eq!(pruned.leaf_with(idx, &load).unwrap(), full.leaf(idx));
            }
            for old in [1, 3, 256, 300, size / 2 + 1, size] {
                if old <= size {
                    let p = pruned.consistency_proof_with(old, size, &load).unwrap();
                    assert_eq!(p, full.consistency_proof(old, size), "consistency {old}->{size}");
                }
            }
        }
        assert!(!reads.borrow().is_empty(), "the test reads pruned blocks back");
        // A failing read is the proof's error, not a wrong proof.
        let fail = |_: u64, _: u64| -> Result<Vec<Hash>, String> { Err("disk".into()) };
        assert_eq!(pruned.inclusion_proof_with(3, n, &fail), Err("disk".into()));
    }

    fn h(s: &serde_json::Value) -> Hash {
        hex::decode(s.as_str().unwrap()).unwrap().try_into().unwrap()
    }

    /// Known-answer tests: the RFC 6962 reference vectors of transparency-dev/merkle (data file
    /// `testdata/rfc6962-vectors.json`): roots at every size, inclusion and consistency proofs
    /// made by this tree equal the published ones and verify; every one-bit change is refused.
    #[test]
    fn transparency_dev_known_answers() {
        let v: serde_json::Value =
            serde_json::from_str(include_str!("testdata/rfc6962-vectors.json")).unwrap();
        let leaves: Vec<Vec<u8>> = v["leaves"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| hex::decode(l.as_str().unwrap()).unwrap())
            .collect();
        let mut t = Tree::new();
        assert_eq!(t.root(0), h(&v["roots"][0]));
        for (i, l) in leaves.iter().enumerate() {
            t.push_leaf(l);
            assert_eq!(t.root(i as u64 + 1), h(&v["roots"][i + 1]), "root at size {}", i + 1);
        }
        let mut checked = 0;
        for case in v["inclusion"].as_array().unwrap() {
            let (size, idx) = (case["size"].as_u64().unwrap(), case["index"].as_u64().unwrap());
            let want: Vec<Hash> = case["proof"].as_array().unwrap().iter().map(h).collect();
            assert_eq!(t.inclusion_proof(idx, size), want, "inclusion {idx} in {size}");
            let root = h(&v["roots"][size as usize]);
            verify_inclusion(&leaves[idx as usize], idx, size, &root, &want).unwrap();
            for j in 0..want.len() {
                for bit in [0u8, 4, 7] {
                    let mut bad = want.clone();
                    bad[j][bit as usize] ^= 1 << bit;
                    assert!(
                        verify_inclusion(&leaves[idx as usize], idx, size, &root, &bad).is_err()
                    );
                }
            }
            if size > 1 {
                let other = (idx + 1) % size;
                assert!(
                    verify_inclusion(&leaves[idx as usize], other, size, &root, &want).is_err()
                );
            }
            let mut longer = want.clone();
            longer.push([0; 32]);
            assert!(verify_inclusion(&leaves[idx as usize], idx, size, &root, &longer).is_err());
            checked += 1;
        }
        for case in v["consistency"].as_array().unwrap() {
            let (a, b) = (case["size1"].as_u64().unwrap(), case["size2"].as_u64().unwrap());
            let want: Vec<Hash> = case["proof"].as_array().unwrap().iter().map(h).collect();
            let (ra, rb) = (h(&v["roots"][a as usize]), h(&v["roots"][b as usize]));
            if a < b {
                assert_eq!(t.consistency_proof(a, b), want, "consistency {a}->{b}");
            }
            verify_consistency(a, &ra, b, &rb, &want).unwrap();
            for j in 0..want.len() {
                let mut bad = want.clone();
                bad[j][31] ^= 0x80;
                assert!(verify_consistency(a, &ra, b, &rb, &bad).is_err());
            }
            if a < b {
                assert!(verify_consistency(a, &rb, b, &rb, &want).is_err());
            }
            checked += 1;
        }
        assert_eq!(checked, 11);
    }
}
