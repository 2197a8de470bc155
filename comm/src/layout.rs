//! The FPDT token layout.
//!
//! Notation of DESIGN.md: S tokens, P ranks, u chunks of C = S/u tokens,
//! c = C/P tokens per rank and chunk. The sequence is cut into u*P small
//! chunks of c tokens; rank `r` holds small chunks `r, r+P, r+2P, ...`, so
//! its local chunk `j` (local tokens `[j*c, (j+1)*c)`) is global small chunk
//! `j*P + r`. After the per-chunk head-parallel all-to-all (source rank
//! order = token order), every rank holds global chunk `j`, tokens
//! `[j*C, (j+1)*C)`, for its heads; causal attention work is balanced
//! because every rank holds a slice of every chunk.
//!
//! Tokens, labels and positions are permuted alike: compute labels (the next
//! token) and positions in global order, then [`FpdtLayout::shard`] each.
//! [`FpdtLayout::unshard`] is the inverse.

use std::ops::Range;

use crate::error::{CommError, Result};

/// Where each token of a sequence lives across the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FpdtLayout {
    seq_len: usize,
    ranks: usize,
    chunks: usize,
}

impl FpdtLayout {
    /// The layout of `seq_len` tokens over `ranks` ranks in `chunks` chunks.
    /// `seq_len` must be divisible by `chunks * ranks`.
    pub fn new(seq_len: usize, ranks: usize, chunks: usize) -> Result<FpdtLayout> {
        for (name, v) in [
            ("seq_len", seq_len),
            ("ranks (P)", ranks),
            ("chunks (u)", chunks),
        ] {
            if v == 0 {
                return Err(CommError::Invalid(format!(
                    "FPDT layout: {name} must be positive, got 0"
                )));
            }
        }
        let small = chunks.checked_mul(ranks).ok_or_else(|| {
            CommError::Invalid(format!(
                "FPDT layout: chunks ({chunks}) x ranks ({ranks}) overflows"
            ))
        })?;
        if seq_len % small != 0 {
            return Err(CommError::NotDivisible {
                what: "FPDT layout: seq_len".into(),
                value: seq_len,
                by_what: format!("chunks (u = {chunks}) x ranks (P = {ranks})"),
                by: small,
            });
        }
        Ok(FpdtLayout {
            seq_len,
            ranks,
            chunks,
        })
    }

    /// S, tokens in the sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// P, the ranks.
    pub fn ranks(&self) -> usize {
        self.ranks
    }

    /// u, the chunks.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// C = S/u, tokens of a global chunk.
    pub fn chunk_tokens(&self) -> usize {
        self.seq_len / self.chunks
    }

    /// c = C/P, tokens of a chunk on one rank.
    pub fn local_chunk_tokens(&self) -> usize {
        self.chunk_tokens() / self.ranks
    }

    /// S/P, tokens on one rank.
    pub fn local_len(&self) -> usize {
        self.seq_len / self.ranks
    }

    /// Global tokens of chunk `j`: `[j*C, (j+1)*C)`.
    pub fn chunk_range(&self, j: usize) -> Result<Range<usize>> {
        self.check_chunk(j)?;
        let c = self.chunk_tokens();
        Ok(j * c..(j + 1) * c)
    }

    /// Local tokens of chunk `j` on any rank: `[j*c, (j+1)*c)`.
    pub fn local_chunk_range(&self, j: usize) -> Result<Range<usize>> {
        self.check_chunk(j)?;
        let c = self.local_chunk_tokens();
        Ok(j * c..(j + 1) * c)
    }

    fn check_chunk(&self, j: usize) -> Result<()> {
        if j >= self.chunks {
            return Err(CommError::Invalid(format!(
                "FPDT layout: chunk {j} is out of range for {} chunks",
                self.chunks
            )));
        }
        Ok(())
    }

    fn check_rank(&self, rank: usize, what: &str) -> Result<()> {
        if rank >= self.ranks {
            return Err(CommError::RankOutOfRange {
                what: format!("FPDT layout: {what}"),
                rank,
                world: self.ranks,
            });
        }
        Ok(())
    }

    /// Global index of rank `rank`'s local token `local`.
    pub fn global_index(&self, rank: usize, local: usize) -> Result<usize> {
        self.check_rank(rank, "global_index")?;
        if local >= self.local_len() {
            return Err(CommError::Invalid(format!(
                "FPDT layout: local token {local} is out of range for {} tokens per rank",
                self.local_len()
            )));
        }
        Ok(self.global_unchecked(rank, local))
    }

    fn global_unchecked(&self, rank: usize, local: usize) -> usize {
        let c = self.local_chunk_tokens();
        let (j, t) = (local / c, local % c);
        (j * self.ranks + rank) * c + t
    }

    /// Where global token `global` lives: `(rank, local index)`.
    pub fn locate(&self, global: usize) -> Result<(usize, usize)> {
        if global >= self.seq_len {
            return Err(CommError::Invalid(format!(
                "FPDT layout: token {global} is out of range for a sequence of {}",
                self.seq_len
            )));
        }
        let c = self.local_chunk_tokens();
        let (small, t) = (global / c, global % c);
        let (j, rank) = (small / self.ranks, small % self.ranks);
        Ok((rank, j * c + t))
    }

    /// Global positions of rank `rank`'s tokens, in local order (the RoPE
    /// positions, and the gather indices of [`FpdtLayout::shard`]).
    pub fn positions(&self, rank: usize) -> Result<Vec<usize>> {
        self.check_rank(rank, "positions")?;
        Ok((0..self.local_len())
            .map(|l| self.global_unchecked(rank, l))
            .collect())
    }

    /// The layout as one permutation: entry `rank * S/P + local` is the
    /// global index of that token (rank 0's tokens, then rank 1's, ...).
    pub fn permutation(&self) -> Vec<usize> {
        (0..self.ranks)
            .flat_map(|r| (0..self.local_len()).map(move |l| self.global_unchecked(r, l)))
            .collect()
    }

    /// The inverse of [`FpdtLayout::permutation`]: entry `g` is where global
    /// token `g` sits in the concatenation of the ranks' tokens.
    pub fn inverse_permutation(&self) -> Vec<usize> {
        let mut inv = vec![0; self.seq_len];
        for (i, g) in self.permutation().into_iter().enumerate() {
            inv[g] = i;
        }
        inv
    }

    /// Rank `rank`'s share of a per-token sequence (tokens, labels,
    /// positions) of length S.
    pub fn shard<T: Copy>(&self, global: &[T], rank: usize) -> Result<Vec<T>> {
        self.shard_rows(global, 1, rank)
    }

    /// Rank `rank`'s share of a token-major tensor `[S, row]`.
    pub fn shard_rows<T: Copy>(&self, global: &[T], row: usize, rank: usize) -> Result<Vec<T>> {
        self.check_rank(rank, "shard")?;
        if row == 0 || global.len() != self.seq_len * row {
            return Err(CommError::Invalid(format!(
                "FPDT layout: shard of {} elements, expected seq_len ({}) x row ({row})",
                global.len(),
                self.seq_len
            )));
        }
        let c = self.local_chunk_tokens() * row;
        let mut out = Vec::with_capacity(self.local_len() * row);
        for j in 0..self.chunks {
            let at = (j * self.ranks + rank) * c;
            out.extend_from_slice(&global[at..at + c]);
        }
        Ok(out)
    }

    /// The inverse of [`FpdtLayout::shard`]: the global sequence from every
    /// rank's share, in rank order.
    pub fn unshard<T: Copy>(&self, shards: &[Vec<T>]) -> Result<Vec<T>> {
        self.unshard_rows(shards, 1)
    }

    /// The inverse of [`FpdtLayout::shard_rows`].
    pub fn unshard_rows<T: Copy>(&self, shards: &[Vec<T>], row: usize) -> Result<Vec<T>> {
        if shards.len() != self.ranks {
            return Err(CommError::Invalid(format!(
                "FPDT layout: unshard of {} shards, expected one per rank ({})",
                shards.len(),
                self.ranks
            )));
        }
        if let Some((r, s)) = shards
            .iter()
            .enumerate()
            .find(|(_, s)| row == 0 || s.len() != self.local_len() * row)
        {
            return Err(CommError::Invalid(format!(
                "FPDT layout: shard of rank {r} has {} elements, expected S/P ({}) x row ({row})",
                s.len(),
                self.local_len()
            )));
        }
        let c = self.local_chunk_tokens() * row;
        let mut out = Vec::with_capacity(self.seq_len * row);
        for j in 0..self.chunks {
            for s in shards {
                out.extend_from_slice(&s[j * c..(j + 1) * c]);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_r_holds_small_chunks_r_plus_multiples_of_p() {
        // S = 12, P = 2, u = 3: C = 4, c = 2.
        let l = FpdtLayout::new(12, 2, 3).unwrap();
        assert_eq!((l.chunk_tokens(), l.local_chunk_tokens()), (4, 2));
        assert_eq!(l.positions(0).unwrap(), vec![0, 1, 4, 5, 8, 9]);
        assert_eq!(l.positions(1).unwrap(), vec![2, 3, 6, 7, 10, 11]);
        assert_eq!(l.locate(7).unwrap(), (1, 3));
        assert_eq!(l.global_index(1, 3).unwrap(), 7);
    }

    #[test]
    fn permutation_and_inverse_compose_to_identity() {
        for (s, p, u) in [(24, 3, 2), (16, 4, 4), (8, 1, 2), (30, 5, 3)] {
            let l = FpdtLayout::new(s, p, u).unwrap();
            let perm = l.permutation();
            let inv = l.inverse_permutation();
            for g in 0..s {
                assert_eq!(perm[inv[g]], g);
                let (r, loc) = l.locate(g).unwrap();
                assert_eq!(inv[g], r * l.local_len() + loc);
            }
        }
    }

    #[test]
    fn bad_layouts_name_the_rule() {
        let e = FpdtLayout::new(10, 4, 1).unwrap_err().to_string();
        assert!(e.contains("seq_len (10)") && e.contains("(4)"), "{e}");
        let e = FpdtLayout::new(8, 0, 1).unwrap_err().to_string();
        assert!(e.contains("ranks (P) must be positive"), "{e}");
        let l = FpdtLayout::new(8, 2, 2).unwrap();
        let e = l.positions(2).unwrap_err().to_string();
        assert!(
            e.contains("rank 2 is out of range") && e.contains("2 ranks"),
            "{e}"
        );
        assert!(l.shard(&[0u8; 7], 0).is_err());
        assert!(l.unshard(&[vec![0u8; 4]]).is_err());
    }
}
