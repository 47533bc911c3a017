//! Attention forward pass (see the [module docs](super) for the formula).

use super::{AttentionShape, Block, Mask, Prefix, forward_scratch_len, masked_softmax, validate};
use crate::backend::{Accum, Backend, Op, Outcome};
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_scratch, check_shape};
use crate::matrix::{MatMut, MatRef};

/// `O = softmax(Q [PK; K]^T / sqrt(d_head) + M) [PV; V]`, head by head.
///
/// Shapes: `q [tq, heads * d_head]`, `k`, `v [tk, kv_heads * d_head]`,
/// prefix `[p, kv_heads * d_head]` each, `out [tq, heads * d_head]`
/// (overwritten), scratch at least [`forward_scratch_len(tq, tk, p)`](forward_scratch_len).
///
/// # Errors
/// [`Error::ShapeMismatch`] (`Query`, `Key`, `Value`, `Prefix`, `Mask`,
/// `Output`), [`Error::ScratchTooSmall`], before anything is written.
#[allow(clippy::too_many_arguments)]
pub fn forward<E: Element, B: Backend<E> + ?Sized>(
    backend: &B,
    shape: &AttentionShape,
    q: MatRef<'_, E>,
    k: MatRef<'_, E>,
    v: MatRef<'_, E>,
    prefix: Option<&Prefix<'_, E>>,
    mask: &Mask<'_, E>,
    mut out: MatMut<'_, E>,
    scratch: &mut [E],
) -> Outcome<E, B> {
    let dims = validate(shape, &q, &k, &v, prefix, mask)?;
    check_shape(Operand::Output, out.rows(), out.cols(), dims.tq, shape.q_width())?;
    let need = forward_scratch_len(dims.tq, dims.tk, dims.p);
    check_scratch(need, scratch.len())?;
    let one = <E::Accum as Element>::from_f64(1.0);
    for block in Block::all(dims, mask.causal) {
        let (q_b, k_b, v_b) = (block.query_rows(&q)?, block.key_rows(&k)?, block.key_rows(&v)?);
        let s_buf = scratch.get_mut(..block.rows * block.keys()).ok_or(Error::Overflow)?;
        let mut probs = MatMut::new(s_buf, block.rows, block.keys())?;
        let mut out_b = out.rb_mut().into_rows_range(block.row0, block.rows).ok_or(Error::Overflow)?;
        for h in 0..shape.heads() {
            let heads = HeadViews::new(shape, h, &q_b, &k_b, &v_b, prefix)?;
            heads.probabilities(backend, shape, block, mask, &mut probs)?;
            let (p_pre, p_real) = split_cols(&probs.as_ref(), block)?;
            let mut o_h = out_b.cols_range_mut(h * shape.head_dim(), shape.head_dim()).ok_or(Error::Overflow)?;
            backend.gemm(o_h.rb_mut(), Accum::Replace, p_pre, Op::N, heads.pv, Op::N, one)?;
            backend.gemm(o_h, Accum::Add, p_real, Op::N, heads.v, Op::N, one)?;
        }
    }
    Ok(())
}

/// One query head's operands and its key/value group's.
pub(crate) struct HeadViews<'a, E> {
    pub q: MatRef<'a, E>,
    pub k: MatRef<'a, E>,
    pub v: MatRef<'a, E>,
    pub pk: MatRef<'a, E>,
    pub pv: MatRef<'a, E>,
}

impl<'a, E: Element> HeadViews<'a, E> {
    pub(crate) fn new(
        shape: &AttentionShape,
        h: usize,
        q: &MatRef<'a, E>,
        k: &MatRef<'a, E>,
        v: &MatRef<'a, E>,
        prefix: Option<&Prefix<'a, E>>,
    ) -> Result<Self> {
        let dh = shape.head_dim();
        let g = shape.group_of(h) * dh;
        let cols = |m: &MatRef<'a, E>, start: usize| m.cols_range(start, dh).ok_or(Error::Overflow);
        let empty = MatRef::new(&[], 0, dh)?;
        let (pk, pv) = match prefix {
            Some(pr) => (cols(&pr.keys, g)?, cols(&pr.values, g)?),
            None => (empty, empty),
        };
        Ok(Self { q: cols(q, h * dh)?, k: cols(k, g)?, v: cols(v, g)?, pk, pv })
    }

    /// `probs = softmax(q [pk; k]^T / sqrt(d_head) + mask)` over one block
    /// (these views are the block's rows and keys).
    pub(crate) fn probabilities<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        shape: &AttentionShape,
        block: Block,
        mask: &Mask<'_, E>,
        probs: &mut MatMut<'_, E>,
    ) -> Outcome<E, B> {
        let scale = <E::Accum as Element>::from_f64(1.0 / libm::sqrt(shape.head_dim() as f64));
        let s_pre = probs.cols_range_mut(0, block.call.p).ok_or(Error::Overflow)?;
        backend.gemm(s_pre, Accum::Replace, self.q, Op::N, self.pk, Op::T, scale)?;
        let s_real = probs.cols_range_mut(block.call.p, block.tk).ok_or(Error::Overflow)?;
        backend.gemm(s_real, Accum::Replace, self.q, Op::N, self.k, Op::T, scale)?;
        masked_softmax(probs, block, mask);
        Ok(())
    }
}

/// `(m[:, ..p], m[:, p..])` of one block's `[rows, p + tk]` matrix.
pub(crate) fn split_cols<'a, E: Element>(m: &MatRef<'a, E>, block: Block) -> Result<(MatRef<'a, E>, MatRef<'a, E>)> {
    let p = block.call.p;
    Ok((m.cols_range(0, p).ok_or(Error::Overflow)?, m.cols_range(p, block.tk).ok_or(Error::Overflow)?))
}
