//! VB-LoRA (Li et al., 2024): LoRA factors assembled from a shared bank of
//! vectors, each sub-vector a softmax-weighted mix of its top-k bank
//! entries, as PEFT's `vblora.Linear` computes it.
//!
//! ```text
//! bank V [nv, L] (shared by every layer); logits_A [r, in / L, nv], logits_B [out / L, r, nv]
//! each logits row z [nv]: (top, idx) = topk(z, k), w = softmax(top), v = sum_t w[t] V[idx[t]]   [L]
//! A [r, in]:  A[q, s L + l] = vA[q, s][l]
//! B [out, r]: B[o L + l, q] = vB[o, q][l]
//! y = x W^T + b + (x A^T) B^T;  merged: W' = W + B A (no alpha / r), b' = b
//! ```
//!
//! The backward, with `G = dL/dy`: LoRA's, `h = x A^T`, `g = G B`, `dB = G^T
//! h`, `dA = g^T x`, `dx = G W + g A`; then through each row's mix, `dv` its
//! rows of `dA` or `dB`:
//!
//! ```text
//! dw[t] = dv . V[idx[t]];  dz[idx[t]] = w[t] (dw[t] - sum_s w[s] dw[s]);  dV[idx[t]] += w[t] dv
//! ```
//!
//! (the top-k selection is piecewise constant: the other logits get no
//! gradient). PEFT's `save_only_topk_weights` files hold only the top-k
//! indices and the first `k - 1` weights; their logits are `log w` at the
//! indices and `-inf` elsewhere, which give the same mix (the reader builds
//! them). Ties among equal logits are taken lowest index first; the mix
//! does not depend on their order beyond rounding. `k` is at most
//! [`MAX_TOPK`] (the selection keeps its indices on the stack).
use core::marker::PhantomData;

use crate::backend::{Accum, Backend, Op, Outcome};
use crate::base::FrozenLinear;
use crate::delta::{DeltaBlock, DeltaRows};
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len, split_scratch};
use crate::lora::ParamReport;
use crate::matrix::{MatMut, MatRef, checked_len};
use crate::method::{BackwardPass, ForwardPass, LinearAdapter};

/// The largest `topk` taken (PEFT's default is 2).
pub const MAX_TOPK: usize = 64;

/// A VB-LoRA layer `in -> out` over a vector bank.
#[derive(Clone, Debug)]
pub struct VbLora<E, S, P> {
    bank: P,
    logits_a: S,
    logits_b: S,
    r: usize,
    num_vectors: usize,
    len: usize,
    topk: usize,
    in_features: usize,
    out_features: usize,
    _element: PhantomData<fn() -> E>,
}

/// Gradient buffers of a VB-LoRA layer, accumulated into (`+=`).
#[derive(Debug)]
pub struct VbLoraGrads<'g, E> {
    /// `dL/dlogits_A`.
    pub logits_a: &'g mut [E],
    /// `dL/dlogits_B`.
    pub logits_b: &'g mut [E],
    /// `dL/dV` (`None`: the bank held frozen).
    pub bank: Option<&'g mut [E]>,
}

/// The top `k` of `z` (largest first, ties lowest index first) and their
/// softmax weights.
fn top<E: Element>(z: &[E], k: usize) -> ([usize; MAX_TOPK], [f64; MAX_TOPK]) {
    let (mut idx, mut w) = ([0usize; MAX_TOPK], [0.0f64; MAX_TOPK]);
    let at = |i: usize| z.get(i).map_or(f64::NEG_INFINITY, |v| v.to_f64());
    for t in 0..k.min(MAX_TOPK) {
        let taken = |i: usize| idx.iter().take(t).any(|&j| j == i);
        let best = (0..z.len()).filter(|&i| !taken(i)).fold(None, |b: Option<usize>, i| match b {
            Some(j) if at(j) >= at(i) => Some(j),
            _ => Some(i),
        });
        if let (Some(b), Some(slot)) = (best, idx.get_mut(t)) {
            *slot = b;
        }
    }
    let val = |t: usize| at(idx.get(t).copied().unwrap_or(0));
    let m = val(0);
    let sum: f64 = (0..k.min(MAX_TOPK)).map(|t| libm::exp(val(t) - m)).sum();
    for (t, slot) in w.iter_mut().enumerate().take(k) {
        *slot = libm::exp(val(t) - m) / sum;
    }
    (idx, w)
}

impl<E: Element, S: AsRef<[E]>, P: AsRef<[E]>> VbLora<E, S, P> {
    /// A layer over `bank [nv, len]`, `logits_a [r, in / len, nv]` and
    /// `logits_b [out / len, r, nv]`, mixing the top `topk`.
    ///
    /// # Errors
    /// [`Error::InvalidRank`] for `r = 0`; [`Error::InvalidParameter`] for a
    /// vector length that does not divide `in` and `out`
    /// (`vector_length`) or a `topk` of 0, above [`MAX_TOPK`] or above
    /// `nv` (`topk`); [`Error::ShapeMismatch`] (`Parameter`) for tensors of
    /// other lengths; [`Error::Overflow`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        r: usize,
        len: usize,
        topk: usize,
        in_features: usize,
        out_features: usize,
        bank: P,
        logits_a: S,
        logits_b: S,
    ) -> Result<Self> {
        if r == 0 {
            return Err(Error::InvalidRank { rank: 0, max: 0 });
        }
        if len == 0 || !in_features.is_multiple_of(len) || !out_features.is_multiple_of(len) {
            return Err(Error::InvalidParameter { name: "vector_length", rule: "must divide in and out" });
        }
        let num_vectors = bank.as_ref().len() / len;
        if topk == 0 || topk > MAX_TOPK || topk > num_vectors {
            return Err(Error::InvalidParameter { name: "topk", rule: "must be in 1..=min(64, num_vectors)" });
        }
        check_len(Operand::Parameter, checked_len(num_vectors, len)?, bank.as_ref().len())?;
        let (na, nb) = (checked_len(r, in_features / len)?, checked_len(out_features / len, r)?);
        check_len(Operand::Parameter, checked_len(na, num_vectors)?, logits_a.as_ref().len())?;
        check_len(Operand::Parameter, checked_len(nb, num_vectors)?, logits_b.as_ref().len())?;
        Ok(Self {
            bank,
            logits_a,
            logits_b,
            r,
            num_vectors,
            len,
            topk,
            in_features,
            out_features,
            _element: PhantomData,
        })
    }

    /// Trainable (the logits and the bank) and frozen (the base's)
    /// parameter counts.
    ///
    /// # Errors
    /// [`Error::Overflow`].
    pub fn param_report(&self, bias: bool) -> Result<ParamReport> {
        let n = [self.logits_a.as_ref().len(), self.logits_b.as_ref().len(), self.bank.as_ref().len()]
            .into_iter()
            .try_fold(0usize, usize::checked_add)
            .ok_or(Error::Overflow)?;
        ParamReport::over_base(n, self.in_features, self.out_features, bias)
    }

    /// `V[i, c]`.
    fn v(&self, i: usize, c: usize) -> f64 {
        self.bank.as_ref().get(i * self.len + c).map_or(0.0, |x| x.to_f64())
    }

    /// Each logits row's mix `v [L]`, the rows of `out`.
    fn mix(&self, logits: &[E], out: &mut [E]) {
        let (l, nv) = (self.len.max(1), self.num_vectors);
        for (i, v) in out.chunks_exact_mut(l).enumerate() {
            let (idx, w) = top(logits.get(i * nv..(i + 1) * nv).unwrap_or(&[]), self.topk);
            for (c, e) in v.iter_mut().enumerate() {
                let s: f64 = idx.iter().zip(&w).take(self.topk).map(|(&j, wt)| wt * self.v(j, c)).sum();
                *e = E::from_f64(s);
            }
        }
    }

    /// `dlogits`, `dV` `+=` from `dv` (the rows of a factor's gradient).
    fn mix_grads(&self, logits: &[E], dv: &[E], dz: &mut [E], mut dbank: Option<&mut [E]>) {
        let (l, nv) = (self.len.max(1), self.num_vectors);
        for (i, d) in dv.chunks_exact(l).enumerate() {
            let (idx, w) = top(logits.get(i * nv..(i + 1) * nv).unwrap_or(&[]), self.topk);
            let k = self.topk;
            let mut dw = [0.0f64; MAX_TOPK];
            for (t, slot) in dw.iter_mut().enumerate().take(k) {
                let j = idx.get(t).copied().unwrap_or(0);
                *slot = d.iter().enumerate().map(|(c, x)| x.to_f64() * self.v(j, c)).sum();
            }
            let mean: f64 = (0..k).map(|t| w.get(t).copied().unwrap_or(0.0) * dw.get(t).copied().unwrap_or(0.0)).sum();
            for t in 0..k {
                let (j, wt, g) = (
                    idx.get(t).copied().unwrap_or(0),
                    w.get(t).copied().unwrap_or(0.0),
                    dw.get(t).copied().unwrap_or(0.0),
                );
                if let Some(e) = dz.get_mut(i * nv + j) {
                    *e = E::from_f64(e.to_f64() + wt * (g - mean));
                }
                if let Some(bank) = dbank.as_deref_mut() {
                    for (e, x) in bank.iter_mut().skip(j * l).take(l).zip(d) {
                        *e = E::from_f64(e.to_f64() + wt * x.to_f64());
                    }
                }
            }
        }
    }

    /// `r in + 2 out r`: `A`, `B` and the mixes of `logits_B` (saturating).
    fn factors_len(&self) -> usize {
        let or = self.out_features.saturating_mul(self.r);
        self.r.saturating_mul(self.in_features).saturating_add(or.saturating_mul(2))
    }

    /// `A [r, in]` and `B [out, r]` from the front of `scratch`, and the
    /// rest.
    fn factors<'w>(&self, scratch: &'w mut [E]) -> Result<(&'w mut [E], &'w mut [E], &'w mut [E])> {
        let (r, l) = (self.r, self.len.max(1));
        let (a, rest) = split_scratch(scratch, checked_len(r, self.in_features)?)?;
        let (b, rest) = split_scratch(rest, checked_len(self.out_features, r)?)?;
        let (m, rest) = split_scratch(rest, checked_len(self.out_features, r)?)?;
        self.mix(self.logits_a.as_ref(), a);
        self.mix(self.logits_b.as_ref(), m);
        // B[o L + c, q] = M[(o r + q) L + c].
        for (row, e) in b.chunks_exact_mut(r).enumerate() {
            let (o, c) = (row / l, row % l);
            for (q, v) in e.iter_mut().enumerate() {
                *v = m.get((o * r + q) * l + c).copied().unwrap_or(E::ZERO);
            }
        }
        Ok((a, b, rest))
    }
}

impl<E: Element, S: AsRef<[E]>, P: AsRef<[E]>> LinearAdapter<E> for VbLora<E, S, P> {
    type Grads<'g>
        = VbLoraGrads<'g, E>
    where
        E: 'g;

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    /// The factors and `tokens r` (saturating).
    fn forward_scratch_len(&self, tokens: usize) -> usize {
        self.factors_len().saturating_add(tokens.saturating_mul(self.r))
    }

    /// The factors, `2 tokens r`, `dA`, `dB` and `dB`'s rows as mixes
    /// (saturating).
    fn backward_scratch_len(&self, tokens: usize) -> usize {
        let (r, o) = (self.r, self.out_features);
        self.factors_len()
            .saturating_add(tokens.saturating_mul(r).saturating_mul(2))
            .saturating_add(r.saturating_mul(self.in_features))
            .saturating_add(o.saturating_mul(r).saturating_mul(2))
    }

    /// The logits' (and the bank's, when given) lengths (`Gradient`).
    fn check_grads(&self, g: &VbLoraGrads<'_, E>) -> Result<()> {
        check_len(Operand::Gradient, self.logits_a.as_ref().len(), g.logits_a.len())?;
        check_len(Operand::Gradient, self.logits_b.as_ref().len(), g.logits_b.len())?;
        match &g.bank {
            Some(b) => check_len(Operand::Gradient, self.bank.as_ref().len(), b.len()),
            None => Ok(()),
        }
    }

    /// `y = x W^T + b + (x A^T) B^T`.
    fn run_forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        pass: ForwardPass<'_, E, B, L>,
    ) -> Outcome<E, B> {
        let ForwardPass { backend, base, x, mut y, scratch } = pass;
        let (t, r) = (x.rows(), self.r);
        base.forward(backend, x, y.rb_mut())?;
        let (a, b, rest) = self.factors(scratch)?;
        let (h, _) = split_scratch(rest, checked_len(t, r)?)?;
        let one = <E::Accum as Element>::from_f64(1.0);
        let (am, bm) = (MatRef::new(a, r, self.in_features)?, MatRef::new(b, self.out_features, r)?);
        let mut hm = MatMut::new(h, t, r)?;
        backend.gemm(hm.rb_mut(), Accum::Replace, x, Op::N, am, Op::T, one)?;
        backend.gemm(y, Accum::Add, hm.as_ref(), Op::N, bm, Op::T, one)
    }

    /// Accumulates the logits' (and the bank's) gradients into `grads` and,
    /// if `grad_x` is given, writes `dL/dx` (formulas in the [module
    /// docs](self)).
    fn run_backward<B, L>(&self, pass: BackwardPass<'_, E, B, L, Self::Grads<'_>>) -> Outcome<E, B>
    where
        B: Backend<E> + ?Sized,
        L: FrozenLinear<E> + ?Sized,
    {
        let BackwardPass { backend, base, x, grad_y, grad_x, grads, scratch } = pass;
        let (t, r, n, o, l) = (x.rows(), self.r, self.in_features, self.out_features, self.len.max(1));
        let (a, b, rest) = self.factors(scratch)?;
        let (h, rest) = split_scratch(rest, checked_len(t, r)?)?;
        let (g, rest) = split_scratch(rest, checked_len(t, r)?)?;
        let (da, rest) = split_scratch(rest, checked_len(r, n)?)?;
        let (db, rest) = split_scratch(rest, checked_len(o, r)?)?;
        let (dm, _) = split_scratch(rest, checked_len(o, r)?)?;
        let one = <E::Accum as Element>::from_f64(1.0);
        let (am, bm) = (MatRef::new(a, r, n)?, MatRef::new(b, o, r)?);
        let (mut hm, mut gm) = (MatMut::new(h, t, r)?, MatMut::new(g, t, r)?);
        backend.gemm(hm.rb_mut(), Accum::Replace, x, Op::N, am, Op::T, one)?;
        backend.gemm(gm.rb_mut(), Accum::Replace, grad_y, Op::N, bm, Op::N, one)?;
        backend.gemm(MatMut::new(db, o, r)?, Accum::Replace, grad_y, Op::T, hm.as_ref(), Op::N, one)?;
        backend.gemm(MatMut::new(da, r, n)?, Accum::Replace, gm.as_ref(), Op::T, x, Op::N, one)?;
        // dB's rows back to the mixes' layout: dM[(o r + q) L + c] = dB[o L + c, q].
        for (idx, e) in dm.iter_mut().enumerate() {
            let (oq, c) = (idx / l, idx % l);
            let (ob, q) = (oq / r.max(1), oq % r.max(1));
            *e = db.get((ob * l + c) * r + q).copied().unwrap_or(E::ZERO);
        }
        let VbLoraGrads { logits_a, logits_b, mut bank } = grads;
        self.mix_grads(self.logits_a.as_ref(), da, logits_a, bank.as_deref_mut());
        self.mix_grads(self.logits_b.as_ref(), dm, logits_b, bank);
        if let Some(mut gx) = grad_x {
            base.apply_transpose(backend, grad_y, gx.rb_mut(), Accum::Replace)?;
            backend.gemm(gx, Accum::Add, gm.as_ref(), Op::N, am, Op::N, one)?;
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>, P: AsRef<[E]>> DeltaRows<E> for VbLora<E, S, P> {
    /// `(out, in)`.
    fn delta_dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// The factors.
    fn delta_scratch_len(&self, _rows: usize) -> usize {
        self.factors_len()
    }

    /// Rows `start..start + n` of `factor * B A`.
    fn fill_delta_rows<B: Backend<E> + ?Sized>(&self, backend: &B, block: DeltaBlock<'_, E>) -> Outcome<E, B> {
        let DeltaBlock { start, dst, accum, factor, scratch } = block;
        let (n, r) = (dst.rows(), self.r);
        let (a, b, _) = self.factors(scratch)?;
        let (am, bm) = (MatRef::new(a, r, self.in_features)?, MatRef::new(b, self.out_features, r)?);
        let rows = Error::ShapeMismatch { operand: Operand::Weight, expected: start + n, found: self.out_features };
        let f = <E::Accum as Element>::from_f64(factor);
        backend.gemm(dst, accum, bm.rows_range(start, n).ok_or(rows)?, Op::N, am, Op::N, f)
    }
}

crate::delta::additive_update!([E: Element, S: AsRef<[E]>, P: AsRef<[E]>] VbLora<E, S, P>);
