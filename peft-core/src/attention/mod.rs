//! Multi-head scaled dot-product attention, with grouped-query attention,
//! causal, padding and additive masks, and an optional trainable prefix.
//!
//! ```text
//! O_h = softmax(Q_h [PK_g; K_g]^T / sqrt(d_head) + M) [PV_g; V_g]      g = h / (heads / kv_heads)
//! Q [tq, heads * d_head]   K, V [tk, kv_heads * d_head]   PK, PV [p, kv_heads * d_head]
//! O [tq, heads * d_head]   M [tq, p + tk]
//! ```
//!
//! Head `h` occupies columns `h * d_head .. (h + 1) * d_head` (PyTorch's
//! `view(tokens, heads, d_head)` layout). The prefix is concatenated in
//! front of the keys and values without a copy: the score matrix is computed
//! in two column blocks.
//!
//! ## The mask, extended (mistake 11 in `peft_verify::mistakes`)
//!
//! Key column `j < p` is a prefix column and is visible to every query.
//! A real key `j = p + r` is visible to query `i` unless the mask hides it:
//! causality applies among real tokens only (`r <= i + tk - tq`, the
//! bottom-right alignment that also serves a key cache), and
//! `key_padding[r] == 0` hides a padded key. An optional additive mask
//! covers the whole extended width `[tq, p + tk]`, so a caller may still
//! hide prefix columns explicitly; entries of `-inf` exclude a key.
//! [`extend_additive_mask`] builds the extended mask from a `[tq, tk]` one
//! the way the mistakes note's fix does (zeros in front).
//!
//! ## Blocks of queries
//!
//! Both passes run over the query rows in blocks of [`QUERY_BLOCK`], so the
//! scratch holds one block's scores, `min(tq, QUERY_BLOCK) * (p + tk)`
//! elements: memory is linear in the prompt. Under a causal mask a block
//! reads only the real keys its last row can see; the keys after them have
//! probability exactly 0 for every row of the block and are skipped, which
//! halves a long prompt's attention work. Each row's softmax is over its
//! whole visible key range, as before: blocking changes no formula.
//!
//! ## Softmax
//!
//! Each row subtracts its maximum over visible keys before `exp`, so no
//! finite input overflows. A row with no visible key yields an output of
//! zeros (and zero gradients), not NaN.
//!
//! ## Attention backward pass
//!
//! Per query head `h` (key/value group `g`), with `c = 1 / sqrt(d_head)`,
//! `P` the masked softmax probabilities `[tq, p + tk]`, `Kx = [PK_g; K_g]`,
//! `Vx = [PV_g; V_g]` and `G = dL/dO_h`:
//!
//! ```text
//! dP      = G Vx^T                                  [tq, p + tk]
//! dVx    += P^T G                                   (summed over the heads of group g)
//! dS      = P * (dP - rowsum(P * dP))               (softmax backward; hidden entries: P = 0, so dS = 0)
//! dQ_h    = c dS Kx
//! dKx    += c dS^T Q_h
//! ```
//!
//! The first `p` rows of `dKx`, `dVx` are the prefix gradients. The mask
//! has no parameters and gets no gradient.

mod backward;
mod forward;

pub use backward::{AttentionGrads, PrefixGrads, backward};
pub use forward::forward;

use crate::element::{Element, Real};
use crate::error::{Error, Operand, Result, check_len};
use crate::matrix::{MatMut, MatRef};

/// Head counts and head size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl AttentionShape {
    /// `heads` query heads sharing `kv_heads` key/value heads (GQA; equal
    /// counts give standard multi-head attention), each `head_dim` wide.
    ///
    /// # Errors
    /// [`Error::InvalidHeads`] unless all three are positive and `heads` is
    /// a multiple of `kv_heads`.
    pub fn new(heads: usize, kv_heads: usize, head_dim: usize) -> Result<Self> {
        if heads == 0 || kv_heads == 0 || head_dim == 0 || !heads.is_multiple_of(kv_heads) {
            return Err(Error::InvalidHeads { heads, kv_heads, head_dim });
        }
        Ok(Self { heads, kv_heads, head_dim })
    }

    /// Query heads.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// Size of one head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Width of `Q` and `O`: `heads * head_dim`.
    pub fn q_width(&self) -> usize {
        self.heads.saturating_mul(self.head_dim)
    }

    /// Width of `K`, `V` and the prefix: `kv_heads * head_dim`.
    pub fn kv_width(&self) -> usize {
        self.kv_heads.saturating_mul(self.head_dim)
    }

    /// The key/value head that query head `h` reads.
    pub(crate) fn group_of(&self, h: usize) -> usize {
        h / (self.heads / self.kv_heads)
    }
}

/// Which keys each query may see (see the [module docs](self)).
#[derive(Clone, Copy, Debug)]
pub struct Mask<'m, E> {
    /// Real key `r` is hidden from query `i` when `r > i + tk - tq`.
    pub causal: bool,
    /// `[tk]`: 0 hides a padded real key.
    pub key_padding: Option<&'m [u8]>,
    /// `[tq, p + tk]`, added to the scaled scores; `-inf` hides a key.
    /// Must not hold NaN or `+inf`.
    pub additive: Option<MatRef<'m, E>>,
}

impl<E> Mask<'_, E> {
    /// Every key visible.
    pub const fn none() -> Self {
        Self { causal: false, key_padding: None, additive: None }
    }

    /// Causal among real tokens; prefix visible.
    pub const fn causal() -> Self {
        Self { causal: true, key_padding: None, additive: None }
    }
}

/// Trainable prefix keys and values of one layer, `[p, kv_heads * d_head]`
/// each (strided views are fine: see `prefix::PrefixTuning::layer`).
#[derive(Clone, Copy, Debug)]
pub struct Prefix<'p, E> {
    /// Prefix keys.
    pub keys: MatRef<'p, E>,
    /// Prefix values.
    pub values: MatRef<'p, E>,
}

/// Validated dimensions of one attention call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub tq: usize,
    pub tk: usize,
    pub p: usize,
}

impl Dims {
    /// Extended key count `p + tk`.
    pub fn keys(&self) -> usize {
        self.p + self.tk
    }
}

/// Checks every operand's shape and returns the dimensions.
pub(crate) fn validate<E: Element>(
    shape: &AttentionShape,
    q: &MatRef<'_, E>,
    k: &MatRef<'_, E>,
    v: &MatRef<'_, E>,
    prefix: Option<&Prefix<'_, E>>,
    mask: &Mask<'_, E>,
) -> Result<Dims> {
    check_len(Operand::Query, shape.q_width(), q.cols())?;
    check_len(Operand::Key, shape.kv_width(), k.cols())?;
    check_len(Operand::Value, shape.kv_width(), v.cols())?;
    check_len(Operand::Value, k.rows(), v.rows())?;
    let p = match prefix {
        Some(pr) => {
            check_len(Operand::Prefix, shape.kv_width(), pr.keys.cols())?;
            check_len(Operand::Prefix, shape.kv_width(), pr.values.cols())?;
            check_len(Operand::Prefix, pr.keys.rows(), pr.values.rows())?;
            pr.keys.rows()
        }
        None => 0,
    };
    let dims = Dims { tq: q.rows(), tk: k.rows(), p };
    if let Some(pad) = mask.key_padding {
        check_len(Operand::Mask, dims.tk, pad.len())?;
    }
    if let Some(add) = &mask.additive {
        check_len(Operand::Mask, dims.tq, add.rows())?;
        check_len(Operand::Mask, dims.keys(), add.cols())?;
    }
    Ok(dims)
}

/// Query rows per block. Attention runs over the queries in blocks of this
/// many rows, so its scratch holds one block's scores: memory grows
/// linearly with the prompt, not with its square.
pub const QUERY_BLOCK: usize = 64;

/// Scratch [`forward`](forward::forward) needs: `min(tq, QUERY_BLOCK) * (p + tk)`
/// (one head's probabilities for one block of query rows at a time).
pub const fn forward_scratch_len(tq: usize, tk: usize, p: usize) -> usize {
    let rows = if tq < QUERY_BLOCK { tq } else { QUERY_BLOCK };
    rows.saturating_mul(p.saturating_add(tk))
}

/// Scratch [`backward`](backward::backward) needs: twice
/// [`forward_scratch_len`], `2 * min(tq, QUERY_BLOCK) * (p + tk)`.
pub const fn backward_scratch_len(tq: usize, tk: usize, p: usize) -> usize {
    forward_scratch_len(tq, tk, p).saturating_mul(2)
}

/// One block of query rows, `row0 .. row0 + rows` of the call, and the real
/// keys it reads: all `tk` of them, or under a causal mask only the first
/// `tk` the block's last row can see (a later key's probability is exactly
/// 0 for every row of the block, so it is not computed).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Block {
    /// The whole call's dimensions (the causal alignment needs them).
    pub call: Dims,
    /// First query row of the block.
    pub row0: usize,
    /// Query rows in the block.
    pub rows: usize,
    /// Real keys the block reads (`<= call.tk`).
    pub tk: usize,
}

impl Block {
    /// The blocks of a call, in order.
    pub(crate) fn all(call: Dims, causal: bool) -> impl Iterator<Item = Block> {
        (0..call.tq).step_by(QUERY_BLOCK).map(move |row0| {
            let rows = QUERY_BLOCK.min(call.tq - row0);
            // Row i sees real key r iff r + tq <= i + tk; the block's last row is row0 + rows - 1.
            let tk = if causal { (row0 + rows + call.tk).saturating_sub(call.tq).min(call.tk) } else { call.tk };
            Block { call, row0, rows, tk }
        })
    }

    /// Columns of the block's scores: `p + tk`.
    pub(crate) fn keys(&self) -> usize {
        self.call.p + self.tk
    }

    /// The block's rows of a `[tq, _]` operand.
    pub(crate) fn query_rows<'a, E: Element>(&self, m: &MatRef<'a, E>) -> Result<MatRef<'a, E>> {
        m.rows_range(self.row0, self.rows).ok_or(Error::Overflow)
    }

    /// The keys the block reads of a `[tk, _]` operand.
    pub(crate) fn key_rows<'a, E: Element>(&self, m: &MatRef<'a, E>) -> Result<MatRef<'a, E>> {
        m.rows_range(0, self.tk).ok_or(Error::Overflow)
    }
}

/// The fix for mistake 11 (`peft_verify::mistakes`), for callers with their own attention:
/// `out = [0 (tq x n_prefix) | mask]`, so every query sees every prefix
/// column and the original mask applies to the real keys unchanged.
///
/// # Errors
/// [`Error::ShapeMismatch`] (`Mask`) unless `out` is
/// `[mask.rows, n_prefix + mask.cols]`; nothing is written.
pub fn extend_additive_mask<E: Element>(mask: MatRef<'_, E>, n_prefix: usize, mut out: MatMut<'_, E>) -> Result<()> {
    check_len(Operand::Mask, mask.rows(), out.rows())?;
    check_len(Operand::Mask, mask.cols().saturating_add(n_prefix), out.cols())?;
    for (i, row) in out.row_iter_mut().enumerate() {
        let (head, tail) = row.split_at_mut(n_prefix.min(row.len()));
        head.fill(E::ZERO);
        for (d, &s) in tail.iter_mut().zip(mask.row(i)) {
            *d = s;
        }
    }
    Ok(())
}

/// Softmax of each row of `s` (one block's scaled scores, `[rows, p + block.tk]`)
/// in place, under the mask, row `i` of `s` being the call's row `row0 + i`.
/// Hidden entries become exactly 0; a row with nothing visible becomes all
/// zeros.
pub(crate) fn masked_softmax<E: Element>(s: &mut MatMut<'_, E>, block: Block, mask: &Mask<'_, E>) {
    let neg_inf = <E::Accum as Element>::from_f64(f64::NEG_INFINITY);
    let Dims { tq, tk, p } = block.call;
    for (local, row) in s.row_iter_mut().enumerate() {
        let i = block.row0 + local;
        let add = mask.additive.as_ref().map(|m| m.row(i));
        let visible = |j: usize, v: E::Accum| -> E::Accum {
            let structural = j < p || {
                let r = j - p;
                (!mask.causal || r + tq <= i + tk) && mask.key_padding.is_none_or(|m| m.get(r).is_some_and(|&x| x != 0))
            };
            if !structural {
                return neg_inf;
            }
            match add.and_then(|a| a.get(j)) {
                Some(&m) => v + m.to_accum(),
                None => v,
            }
        };
        let mut max = neg_inf;
        for (j, v) in row.iter().enumerate() {
            let x = visible(j, v.to_accum());
            if x > max {
                max = x;
            }
        }
        if max == neg_inf {
            row.fill(E::ZERO);
            continue;
        }
        let mut sum = E::Accum::ZERO;
        for (j, v) in row.iter_mut().enumerate() {
            let x = visible(j, v.to_accum());
            let e = if x == neg_inf { E::Accum::ZERO } else { (x - max).exp() };
            sum += e;
            *v = E::from_accum(e);
        }
        let inv = <E::Accum as Element>::from_f64(1.0) / sum;
        for v in row.iter_mut() {
            *v = E::from_accum(v.to_accum() * inv);
        }
    }
}

#[cfg(test)]
mod tests;
