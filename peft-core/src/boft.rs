//! BOFT (Liu et al., 2024): butterfly products of block-diagonal
//! orthogonal matrices on a frozen layer's inputs, and a scale on its
//! outputs, as PEFT's `boft.Linear` computes them.
//!
//! ```text
//! in = N b; boft_R [F, N, b, b] (full matrices), boft_s [out]
//! B_{f,k} = (I - S)(I + S)^-1,  S = (R_{f,k} - R_{f,k}^T) / 2      (exact Cayley)
//! M_f = P_f diag(B_{f,0}, ..., B_{f,N-1}) P_f^T,  P_f[j, perm_f[j]] = 1
//! M = M_{F-1} ... M_1 M_0
//! y = (x M W0^T) * s + b                      (s scales each output; the bias is not scaled)
//! merged: W0' = (W0 M^T) * s (row o times s_o), b' = b; unmerge: / s, then M (M is orthogonal)
//! ```
//!
//! `perm_f` is PEFT's `block_butterfly_perm(in, N / 2^f, b / 2, F - 1)`:
//! the identity for one factor; otherwise, within each run of `b 2^f`
//! indices, chunks of `b / 2` reordered even chunks first, then odd.
//!
//! The backward, with `G = dL/dy`, `h = z W0^T` (`z = x M`), the factors'
//! inputs `a_f` kept from the forward (`a_{F-1} = x`):
//!
//! ```text
//! ds_o = sum_t G_to h_to,  dL/dz = (G * s) W0
//! through M_f (out = a M_f, p = a P_f, u = p B_f, out = u P_f^T):
//!   g_u[perm[j]] = g_out[j];  D_{f,k} = p_k^T (g_u)_k;  g_p = g_u B_f^T;  g_a[j] = g_p[perm[j]]
//! dL/dS = -(I + B)^T D (I + S)^-T,  dL/dR = (dL/dS - dL/dS^T) / 2
//! ```
//!
//! PEFT's fresh adapter is `R = 0`, `s = 1`: `M = I`, the base output
//! exactly. PEFT on a CPU without its CUDA extension keeps one factor
//! whatever the config asks (`boft_n_butterfly_factor` is reset to 1 for
//! the layer): the factor count here is the tensor's, `F`. The
//! multiplicative dropout (`boft_dropout`) acts in training only and has
//! no counterpart here.
use core::marker::PhantomData;

use crate::backend::Op;
use crate::backend::{Accum, Backend, Outcome};
use crate::base::FrozenLinear;
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len, split_scratch};
use crate::lora::ParamReport;
use crate::matrix::{MatMut, MatRef, checked_len};
use crate::method::{BackwardPass, Direction, ForwardPass, LinearAdapter, UpdateBlock, UpdateKind, WeightUpdate};
use crate::oft::{Slots, add, at, prod};

/// A BOFT adapter for a linear layer `in -> out`: `boft_R [F, N, b, b]`
/// and `boft_s [out]`.
#[derive(Clone, Debug)]
pub struct Boft<E, S> {
    r: S,
    s: S,
    factors: usize,
    block: usize,
    in_features: usize,
    out_features: usize,
    _element: PhantomData<fn() -> E>,
}

/// Gradient buffers of a BOFT adapter, accumulated into (`+=`).
#[derive(Debug)]
pub struct BoftGrads<'g, E> {
    /// `dL/dboft_R`.
    pub r: &'g mut [E],
    /// `dL/dboft_s`.
    pub s: &'g mut [E],
}

impl<E: Element, S: AsRef<[E]>> Boft<E, S> {
    /// A BOFT adapter of `factors` butterfly factors in blocks of `block`
    /// over `r [factors, in / block, block, block]` and `s [out]`, which
    /// keeps their values.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a block size of 0 or one that does
    /// not divide `in` (`boft_block_size`), no factor, or more than one
    /// factor where PEFT refuses them (`boft_n_butterfly_factor`: the block
    /// size and count must be even, the count a multiple of `2^(F-1)`);
    /// [`Error::ShapeMismatch`] (`Parameter`) for `r` or `s` of the wrong
    /// length; [`Error::Overflow`].
    pub fn new(factors: usize, block: usize, in_features: usize, out_features: usize, r: S, s: S) -> Result<Self> {
        if block == 0 || !in_features.is_multiple_of(block) {
            return Err(Error::InvalidParameter { name: "boft_block_size", rule: "must be a positive divisor of in" });
        }
        let n = in_features / block;
        let butterfly_ok = factors == 1
            || (block.is_multiple_of(2)
                && n.is_multiple_of(2)
                && u32::try_from(factors - 1)
                    .ok()
                    .and_then(|m| 1usize.checked_shl(m))
                    .is_some_and(|p| n.is_multiple_of(p)));
        if factors == 0 || !butterfly_ok {
            return Err(Error::InvalidParameter {
                name: "boft_n_butterfly_factor",
                rule: "needs even blocks whose count is a multiple of 2^(factors - 1)",
            });
        }
        let len = checked_len(checked_len(factors, in_features)?, block)?;
        check_len(Operand::Parameter, len, r.as_ref().len())?;
        check_len(Operand::Parameter, out_features, s.as_ref().len())?;
        Ok(Self { r, s, factors, block, in_features, out_features, _element: PhantomData })
    }

    /// `boft_R` `[F, N, b, b]`.
    pub fn rotations(&self) -> &[E] {
        self.r.as_ref()
    }

    /// `boft_s` `[out]`.
    pub fn scales(&self) -> &[E] {
        self.s.as_ref()
    }

    /// The number of factors `F`.
    pub fn factors(&self) -> usize {
        self.factors
    }

    /// The block size `b`.
    pub fn block(&self) -> usize {
        self.block
    }

    /// Trainable (`F in b + out`) and frozen (the base's) parameter counts.
    ///
    /// # Errors
    /// [`Error::Overflow`].
    pub fn param_report(&self, bias: bool) -> Result<ParamReport> {
        let n = self.r.as_ref().len().checked_add(self.out_features).ok_or(Error::Overflow)?;
        ParamReport::over_base(n, self.in_features, self.out_features, bias)
    }

    /// `perm_f[j]` (module docs).
    pub fn perm(&self, f: usize, j: usize) -> usize {
        let b = self.block;
        if self.factors == 1 || b < 2 {
            return j;
        }
        let (run, r) = (b << f, b / 2);
        let (base, p) = (j - j % run, j % run);
        let (i, t) = (p / r, p % r);
        let half = (run / r).div_ceil(2);
        let seq = if i < half { 2 * i } else { 2 * (i - half) + 1 };
        base + seq * r + t
    }

    /// Block `(f, k)`'s rotation `B` into `w.r`, with `S` in `w.q` and `(I
    /// + S)^-1` in `w.b` (`w.a` spare).
    fn rotation<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        (f, k): (usize, usize),
        w: &mut Slots<'_, E>,
    ) -> Outcome<E, B> {
        let b = self.block;
        let n = self.in_features / b;
        let r = self.r.as_ref().get((f * n + k) * b * b..).unwrap_or(&[]);
        for (idx, e) in w.q.iter_mut().enumerate() {
            *e = E::from_f64(0.5 * (at(r, b, idx / b, idx % b) - at(r, b, idx % b, idx / b)));
        }
        // B = (I - S)(I + S)^-1.
        w.cayley_exact(backend, b, "boft_R")
    }

    /// Each row of `data` (`rows x in`, in place) through factor `f`:
    /// `a -> a M_f`, or `a -> a M_f^T` when `transpose`; `p` and `u` as
    /// `data`, `w` four `b^2` slots.
    fn factor_rows<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        f: usize,
        data: &mut [E],
        (p, u): (&mut [E], &mut [E]),
        transpose: bool,
        w: &mut Slots<'_, E>,
    ) -> Outcome<E, B> {
        let (n, b) = (self.in_features, self.block);
        let rows = data.len() / n.max(1);
        let one = <E::Accum as Element>::from_f64(1.0);
        self.permute_into(f, data, p, true);
        let (pm, mut um) = (MatRef::new(p, rows, n)?, MatMut::new(u, rows, n)?);
        let cols = Error::ShapeMismatch { operand: Operand::Input, expected: n, found: n };
        for k in 0..n / b {
            self.rotation(backend, (f, k), w)?;
            let (src, dst) = (pm.cols_range(k * b, b).ok_or(cols)?, um.cols_range_mut(k * b, b).ok_or(cols)?);
            let op = if transpose { Op::T } else { Op::N };
            backend.gemm(dst, Accum::Replace, src, Op::N, MatRef::new(w.r, b, b)?, op, one)?;
        }
        self.permute_into(f, um.as_ref().as_slice(), data, false);
        Ok(())
    }

    /// Row by row, `dst[perm[j]] = src[j]` (`forward`) or `dst[j] =
    /// src[perm[j]]`, as copies of the permutation's contiguous chunks of
    /// `b / 2` (a plain copy for one factor).
    fn permute_into(&self, f: usize, src: &[E], dst: &mut [E], forward: bool) {
        let (n, b) = (self.in_features, self.block);
        if self.factors == 1 || b < 2 {
            dst.iter_mut().zip(src).for_each(|(d, s)| *d = *s);
            return;
        }
        let (run, r) = (b << f, b / 2);
        let half = (run / r).div_ceil(2);
        for (s, d) in src.chunks_exact(n).zip(dst.chunks_exact_mut(n)) {
            for (sr, dr) in s.chunks_exact(run).zip(d.chunks_exact_mut(run)) {
                for i in 0..run / r {
                    let seq = if i < half { 2 * i } else { 2 * (i - half) + 1 };
                    let (from, to) = if forward { (i * r, seq * r) } else { (seq * r, i * r) };
                    if let (Some(a), Some(o)) = (sr.get(from..from + r), dr.get_mut(to..to + r)) {
                        o.copy_from_slice(a);
                    }
                }
            }
        }
    }

    /// `dL/dR` of block `(f, k)` `+=` from `D = dL/dB`, `w` as
    /// [`rotation`](Self::rotation) left it; `work` `2 b^2`.
    fn chain<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        (f, k, w): (usize, usize, &Slots<'_, E>),
        d: &[E],
        work: &mut [E],
        grads: &mut [E],
    ) -> Outcome<E, B> {
        let b = self.block;
        let (tmp, ds) = split_scratch(work, b * b)?;
        // tmp = (I + B)^T D, ds = -tmp (I + S)^-T.
        prod(backend, tmp, w.r, true, d, false, b, 1.0)?;
        add(tmp, d, 1.0);
        prod(backend, ds, tmp, false, w.b, true, b, -1.0)?;
        let n = self.in_features / b;
        let g = grads.iter_mut().skip((f * n + k) * b * b).take(b * b);
        for (idx, e) in g.enumerate() {
            let (i, j) = (idx / b, idx % b);
            *e = E::from_f64(e.to_f64() + 0.5 * (at(ds, b, i, j) - at(ds, b, j, i)));
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>> LinearAdapter<E> for Boft<E, S> {
    type Grads<'g>
        = BoftGrads<'g, E>
    where
        E: 'g;

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    /// `3 tokens in + 4 b^2` (`x M`, the permuted rows and their
    /// product, four slots; saturating).
    fn forward_scratch_len(&self, tokens: usize) -> usize {
        let b2 = self.block.saturating_mul(self.block);
        tokens.saturating_mul(self.in_features).saturating_mul(3).saturating_add(b2.saturating_mul(4))
    }

    /// `(F + 4) tokens in + tokens out + 7 b^2` (each factor's input, `z`,
    /// three permuted copies, `h`, four slots, `D`, two products;
    /// saturating).
    fn backward_scratch_len(&self, tokens: usize) -> usize {
        let b2 = self.block.saturating_mul(self.block);
        let ti = tokens.saturating_mul(self.in_features);
        ti.saturating_mul(self.factors.saturating_add(4))
            .saturating_add(tokens.saturating_mul(self.out_features))
            .saturating_add(b2.saturating_mul(7))
    }

    /// `boft_R`'s and `boft_s`'s lengths (`Gradient`).
    fn check_grads(&self, g: &BoftGrads<'_, E>) -> Result<()> {
        check_len(Operand::Gradient, self.r.as_ref().len(), g.r.len())?;
        check_len(Operand::Gradient, self.out_features, g.s.len())
    }

    /// `y = (x M W0^T) * s + b`.
    fn run_forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        pass: ForwardPass<'_, E, B, L>,
    ) -> Outcome<E, B> {
        let ForwardPass { backend, base, x, mut y, scratch } = pass;
        let (t, n) = (x.rows(), self.in_features);
        let (z, rest) = split_scratch(scratch, checked_len(t, n)?)?;
        let (p, rest) = split_scratch(rest, checked_len(t, n)?)?;
        let (u, rest) = split_scratch(rest, checked_len(t, n)?)?;
        let (mut w, _) = Slots::split(rest, self.block * self.block)?;
        for (dst, src) in z.chunks_exact_mut(n.max(1)).zip(x.row_iter()) {
            dst.copy_from_slice(src);
        }
        for f in (0..self.factors).rev() {
            self.factor_rows(backend, f, z, (&mut *p, &mut *u), false, &mut w)?;
        }
        base.apply(backend, MatRef::new(z, t, n)?, y.rb_mut(), Accum::Replace)?;
        scale_rows(&mut y, self.s.as_ref(), base.bias());
        Ok(())
    }

    /// Accumulates `dL/dR`, `dL/ds` into `grads` and, if `grad_x` is
    /// given, writes `dL/dx` (formulas in the [module docs](self)).
    fn run_backward<B, L>(&self, pass: BackwardPass<'_, E, B, L, Self::Grads<'_>>) -> Outcome<E, B>
    where
        B: Backend<E> + ?Sized,
        L: FrozenLinear<E> + ?Sized,
    {
        let BackwardPass { backend, base, x, grad_y, grad_x, grads, scratch } = pass;
        let (t, n, o, b) = (x.rows(), self.in_features, self.out_features, self.block);
        let ti = checked_len(t, n)?;
        let (inputs, rest) = split_scratch(scratch, checked_len(ti, self.factors)?)?;
        let (z, rest) = split_scratch(rest, ti)?;
        let (p, rest) = split_scratch(rest, ti)?;
        let (gu, rest) = split_scratch(rest, ti)?;
        let (gp, rest) = split_scratch(rest, ti)?;
        let (h, rest) = split_scratch(rest, checked_len(t, o)?)?;
        let (mut w, rest) = Slots::split(rest, b * b)?;
        let (d, rest) = split_scratch(rest, b * b)?;
        let (work, _) = split_scratch(rest, 2 * b * b)?;
        // The factors' inputs: slot f holds a_f, the input of M_f (slot F-1 is x).
        let last = inputs.chunks_exact_mut(ti.max(1)).last().unwrap_or(&mut []);
        for (dst, src) in last.chunks_exact_mut(n.max(1)).zip(x.row_iter()) {
            dst.copy_from_slice(src);
        }
        for f in (0..self.factors).rev() {
            let (below, from) = inputs.split_at_mut(f * ti);
            let src = from.get(..ti).unwrap_or(&[]);
            let dst = if f == 0 { &mut *z } else { below.get_mut((f - 1) * ti..).unwrap_or(&mut []) };
            dst.copy_from_slice(src);
            self.factor_rows(backend, f, dst, (&mut *p, &mut *gu), false, &mut w)?;
        }
        // h = z W0^T; ds = sum_t G h; then h <- G * s and dL/dz = h W0 (into z).
        let mut hm = MatMut::new(h, t, o)?;
        base.apply(backend, MatRef::new(z, t, n)?, hm.rb_mut(), Accum::Replace)?;
        for (idx, (hv, g)) in hm.as_ref().as_slice().iter().zip(grad_y.row_iter().flatten()).enumerate() {
            if let Some(e) = grads.s.get_mut(idx % o.max(1)) {
                *e = E::from_f64(e.to_f64() + hv.to_f64() * g.to_f64());
            }
        }
        for (row, grow) in hm.row_iter_mut().zip(grad_y.row_iter()) {
            for ((hv, g), s) in row.iter_mut().zip(grow).zip(self.s.as_ref()) {
                *hv = E::from_f64(g.to_f64() * s.to_f64());
            }
        }
        base.apply_transpose(backend, hm.as_ref(), MatMut::new(z, t, n)?, Accum::Replace)?;
        // Back through M_0, ..., M_{F-1}: z holds the gradient of each factor's output.
        let one = <E::Accum as Element>::from_f64(1.0);
        let cols = Error::ShapeMismatch { operand: Operand::Input, expected: n, found: n };
        for f in 0..self.factors {
            let a = inputs.get(f * ti..(f + 1) * ti).unwrap_or(&[]);
            self.permute_into(f, a, p, true);
            self.permute_into(f, z, gu, true);
            let (pm, gum, mut gpm) = (MatRef::new(p, t, n)?, MatRef::new(gu, t, n)?, MatMut::new(gp, t, n)?);
            for k in 0..n / b.max(1) {
                self.rotation(backend, (f, k), &mut w)?;
                let (pk, gk) = (pm.cols_range(k * b, b).ok_or(cols)?, gum.cols_range(k * b, b).ok_or(cols)?);
                // D = p_k^T (g_u)_k; g_p = g_u B^T.
                backend.gemm(MatMut::new(d, b, b)?, Accum::Replace, pk, Op::T, gk, Op::N, one)?;
                let dst = gpm.cols_range_mut(k * b, b).ok_or(cols)?;
                backend.gemm(dst, Accum::Replace, gk, Op::N, MatRef::new(w.r, b, b)?, Op::T, one)?;
                self.chain(backend, (f, k, &w), d, work, grads.r)?;
            }
            self.permute_into(f, gpm.as_ref().as_slice(), z, false);
        }
        if let Some(mut gx) = grad_x {
            for (dst, src) in gx.row_iter_mut().zip(z.chunks_exact(n.max(1))) {
                dst.copy_from_slice(src);
            }
        }
        Ok(())
    }
}

/// `y <- y * s + b` (each output `o` scaled by `s_o`, the bias after).
fn scale_rows<E: Element>(y: &mut MatMut<'_, E>, s: &[E], bias: Option<&[E]>) {
    for row in y.row_iter_mut() {
        for (o, (v, sc)) in row.iter_mut().zip(s).enumerate() {
            let b = bias.and_then(|b| b.get(o)).map_or(0.0, |b| b.to_f64());
            *v = E::from_f64(v.to_f64() * sc.to_f64() + b);
        }
    }
}

impl<E: Element, S: AsRef<[E]>> WeightUpdate<E> for Boft<E, S> {
    /// `(out, in)`.
    fn weight_dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// [`UpdateKind::Multiplicative`]: each row is multiplied by `M^T` and
    /// scaled.
    fn kind(&self) -> UpdateKind {
        UpdateKind::Multiplicative
    }

    /// `3 rows in + 4 b^2` (the rows, their permutation and its product,
    /// four slots; saturating).
    fn update_scratch_len(&self, rows: usize) -> usize {
        let b2 = self.block.saturating_mul(self.block);
        rows.saturating_mul(self.in_features).saturating_mul(3).saturating_add(b2.saturating_mul(4))
    }

    /// Merge: `w_o -> (w_o M_0^T ... M_{F-1}^T) s_o`; unmerge: `w_o -> (w_o
    /// / s_o) M_{F-1} ... M_0` ([`Error::InvalidParameter`] for a zero
    /// scale).
    fn run_update<B: Backend<E> + ?Sized>(&self, backend: &B, block: UpdateBlock<'_, E>) -> Outcome<E, B> {
        let UpdateBlock { start, mut block, direction, scratch, .. } = block;
        let (rows, n) = (block.rows(), self.in_features);
        let (data, rest) = split_scratch(scratch, checked_len(rows, n)?)?;
        let (p, rest) = split_scratch(rest, checked_len(rows, n)?)?;
        let (u, rest) = split_scratch(rest, checked_len(rows, n)?)?;
        let (mut w, _) = Slots::split(rest, self.block * self.block)?;
        for (dst, src) in data.chunks_exact_mut(n.max(1)).zip(block.as_ref().row_iter()) {
            dst.copy_from_slice(src);
        }
        let scales = self.s.as_ref().iter().skip(start).take(rows);
        match direction {
            Direction::Merge => {
                for f in 0..self.factors {
                    self.factor_rows(backend, f, data, (&mut *p, &mut *u), true, &mut w)?;
                }
                for (row, s) in data.chunks_exact_mut(n.max(1)).zip(scales) {
                    row.iter_mut().for_each(|v| *v = E::from_f64(v.to_f64() * s.to_f64()));
                }
            }
            Direction::Unmerge => {
                for (row, s) in data.chunks_exact_mut(n.max(1)).zip(scales) {
                    if s.to_f64() == 0.0 {
                        return Err(
                            Error::InvalidParameter { name: "boft_s", rule: "a zero scale cannot be undone" }.into()
                        );
                    }
                    row.iter_mut().for_each(|v| *v = E::from_f64(v.to_f64() / s.to_f64()));
                }
                for f in (0..self.factors).rev() {
                    self.factor_rows(backend, f, data, (&mut *p, &mut *u), false, &mut w)?;
                }
            }
        }
        for (dst, src) in block.row_iter_mut().zip(data.chunks_exact(n.max(1))) {
            dst.copy_from_slice(src);
        }
        Ok(())
    }
}
