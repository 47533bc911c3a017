//! Attention backward pass. (its docs are in the [parent module](super))

use super::forward::{HeadViews, split_cols};
use super::{AttentionShape, Block, Mask, Prefix, backward_scratch_len, validate};
use crate::backend::{Accum, Backend, Op, Outcome};
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_scratch, check_shape, scratch_pair};
use crate::matrix::{MatMut, MatRef};

/// Gradients of the prefix of one layer, accumulated into (`+=`): one
/// `[p, 2 * kv_heads * d_head]` view, `dL/dPK` in the first
/// `kv_heads * d_head` columns and `dL/dPV` in the rest. This is exactly one
/// layer's block of PEFT's prefix layout (see `prefix::PrefixTuning`), so a
/// layer's gradient is a strided view of the whole gradient buffer.
#[derive(Debug)]
pub struct PrefixGrads<'g, E> {
    /// `[dL/dPK | dL/dPV]`.
    pub kv: MatMut<'g, E>,
}

/// Outputs of [`backward`]: `dq`, `dk`, `dv` are overwritten; the prefix
/// gradients, which belong to trainable parameters, are accumulated.
#[derive(Debug)]
pub struct AttentionGrads<'g, E> {
    /// `dL/dQ [tq, heads * d_head]`.
    pub q: MatMut<'g, E>,
    /// `dL/dK [tk, kv_heads * d_head]`.
    pub k: MatMut<'g, E>,
    /// `dL/dV [tk, kv_heads * d_head]`.
    pub v: MatMut<'g, E>,
    /// `dL/dPK`, `dL/dPV`, if the prefix is trained.
    pub prefix: Option<PrefixGrads<'g, E>>,
}

/// Gradients of [`forward`](super::forward::forward) given `grad_out =
/// dL/dO [tq, heads * d_head]`.
///
/// # Errors
/// [`Error::ShapeMismatch`] (`Query`, `Key`, `Value`, `Prefix`, `Mask`,
/// `GradOutput`), [`Error::ScratchTooSmall`] (needs
/// [`backward_scratch_len`]), before anything is written. Prefix gradients
/// without a prefix are a `Prefix` mismatch.
#[allow(clippy::too_many_arguments)]
pub fn backward<E: Element, B: Backend<E> + ?Sized>(
    backend: &B,
    shape: &AttentionShape,
    q: MatRef<'_, E>,
    k: MatRef<'_, E>,
    v: MatRef<'_, E>,
    prefix: Option<&Prefix<'_, E>>,
    mask: &Mask<'_, E>,
    grad_out: MatRef<'_, E>,
    mut grads: AttentionGrads<'_, E>,
    scratch: &mut [E],
) -> Outcome<E, B> {
    let dims = validate(shape, &q, &k, &v, prefix, mask)?;
    check_shape(Operand::GradOutput, grad_out.rows(), grad_out.cols(), dims.tq, shape.q_width())?;
    check_shape(Operand::Query, grads.q.rows(), grads.q.cols(), dims.tq, shape.q_width())?;
    check_shape(Operand::Key, grads.k.rows(), grads.k.cols(), dims.tk, shape.kv_width())?;
    check_shape(Operand::Value, grads.v.rows(), grads.v.cols(), dims.tk, shape.kv_width())?;
    if let Some(pg) = &grads.prefix {
        if prefix.is_none() {
            return Err(Error::ShapeMismatch { operand: Operand::Prefix, expected: 0, found: pg.kv.rows() }.into());
        }
        check_shape(Operand::Prefix, pg.kv.rows(), pg.kv.cols(), dims.p, shape.kv_width().saturating_mul(2))?;
    }
    let need = backward_scratch_len(dims.tq, dims.tk, dims.p);
    check_scratch(need, scratch.len())?;

    let one = <E::Accum as Element>::from_f64(1.0);
    let c = <E::Accum as Element>::from_f64(1.0 / libm::sqrt(shape.head_dim() as f64));
    let dh = shape.head_dim();

    for row in grads.k.row_iter_mut().chain(grads.v.row_iter_mut()) {
        row.fill(E::ZERO);
    }
    for block in Block::all(dims, mask.causal) {
        let len = block.rows * block.keys();
        let (p_buf, dp_buf) = scratch_pair(scratch, need / 2)?;
        let mut probs = MatMut::new(p_buf.get_mut(..len).ok_or(Error::Overflow)?, block.rows, block.keys())?;
        let mut dprobs = MatMut::new(dp_buf.get_mut(..len).ok_or(Error::Overflow)?, block.rows, block.keys())?;
        let (q_b, k_b, v_b) = (block.query_rows(&q)?, block.key_rows(&k)?, block.key_rows(&v)?);
        let go_b = block.query_rows(&grad_out)?;
        for h in 0..shape.heads() {
            let g = shape.group_of(h) * dh;
            let views = HeadViews::new(shape, h, &q_b, &k_b, &v_b, prefix)?;
            views.probabilities(backend, shape, block, mask, &mut probs)?;
            let go = go_b.cols_range(h * dh, dh).ok_or(Error::Overflow)?;
            // dP = G [PV; V]^T
            let d_pre = dprobs.cols_range_mut(0, dims.p).ok_or(Error::Overflow)?;
            backend.gemm(d_pre, Accum::Replace, go, Op::N, views.pv, Op::T, one)?;
            let d_real = dprobs.cols_range_mut(dims.p, block.tk).ok_or(Error::Overflow)?;
            backend.gemm(d_real, Accum::Replace, go, Op::N, views.v, Op::T, one)?;
            // d[PV; V] += P^T G
            let (p_pre, p_real) = split_cols(&probs.as_ref(), block)?;
            let dv = key_block(&mut grads.v, g, dh, block.tk)?;
            backend.gemm(dv, Accum::Add, p_real, Op::T, go, Op::N, one)?;
            if let Some(pg) = grads.prefix.as_mut() {
                let dpv = pg.kv.cols_range_mut(shape.kv_width() + g, dh).ok_or(Error::Overflow)?;
                backend.gemm(dpv, Accum::Add, p_pre, Op::T, go, Op::N, one)?;
            }
            softmax_backward(&mut dprobs, &probs.as_ref());
            let (ds_pre, ds_real) = split_cols(&dprobs.as_ref(), block)?;
            // dQ_h = c dS [PK; K]
            let dq_rows = grads.q.rb_mut().into_rows_range(block.row0, block.rows).ok_or(Error::Overflow)?;
            let mut dq = dq_rows.into_cols_range(h * dh, dh).ok_or(Error::Overflow)?;
            backend.gemm(dq.rb_mut(), Accum::Replace, ds_pre, Op::N, views.pk, Op::N, c)?;
            backend.gemm(dq, Accum::Add, ds_real, Op::N, views.k, Op::N, c)?;
            // d[PK; K] += c dS^T Q_h
            let dk = key_block(&mut grads.k, g, dh, block.tk)?;
            backend.gemm(dk, Accum::Add, ds_real, Op::T, views.q, Op::N, c)?;
            if let Some(pg) = grads.prefix.as_mut() {
                let dpk = pg.kv.cols_range_mut(g, dh).ok_or(Error::Overflow)?;
                backend.gemm(dpk, Accum::Add, ds_pre, Op::T, views.q, Op::N, c)?;
            }
        }
    }
    Ok(())
}

/// `dS = P * (dP - rowsum(P * dP))`, into `dP`'s buffer (softmax's backward
/// pass, row by row).
fn softmax_backward<E: Element>(dprobs: &mut MatMut<'_, E>, probs: &MatRef<'_, E>) {
    for (dp_row, p_row) in dprobs.row_iter_mut().zip(probs.row_iter()) {
        let mut dot = E::Accum::ZERO;
        for (&d, &p) in dp_row.iter().zip(p_row) {
            dot += d.to_accum() * p.to_accum();
        }
        for (d, &p) in dp_row.iter_mut().zip(p_row) {
            *d = E::from_accum(p.to_accum() * (d.to_accum() - dot));
        }
    }
}

/// Rows `..tk`, columns `g .. g + dh` of a key or value gradient.
fn key_block<'a, E: Element>(m: &'a mut MatMut<'_, E>, g: usize, dh: usize, tk: usize) -> Result<MatMut<'a, E>> {
    m.rb_mut().into_rows_range(0, tk).and_then(|r| r.into_cols_range(g, dh)).ok_or(Error::Overflow)
}
