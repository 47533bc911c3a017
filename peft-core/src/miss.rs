//! MiSS (Kang and Yin, 2024; formerly Bone): a shard of the weight shared
//! along its columns, as PEFT's `miss.MissLinear` computes it, in its three
//! variants (PEFT's `init_weights`: `True` = "balance", `"mini"`, `"bat"`).
//!
//! ```text
//! balance:  D [r, out]        D_full = D
//! mini:     D [r, m]          D_full[j, o] = D[j, o mod m]          (m = mini_r, out % m == 0)
//!           dW[o, c] = D_full[c mod r, o]                           [out, in]
//!           y = x W^T + b + s(x) D_full,  s(x)_j = sum_k x[k r + j] (x zero-padded to a multiple of r)
//! bat:      D [out/r, r, r]   (in % r == 0, out % r == 0)
//!           dW_{a,c} = W_{a,c} D[a] + D[a]                          (r x r blocks W_{a,c} of W)
//!           y = x (W + dW)^T + b
//! merged:   W' = W + dW, b' = b   (bat: dW computed from the unmerged W)
//! ```
//!
//! `s(x)` sums the input's chunks of `r` features (PEFT's
//! `x.reshape(..., in / r, r).sum(-2)`, after zero padding when `in % r !=
//! 0`), so the balance and mini updates repeat one `[r, out]` shard across
//! the columns, and column `c` of `dW` is row `c mod r` of `D_full`.
//!
//! The backward, with `G = dL/dy`:
//!
//! ```text
//! balance, mini:  dD_full = s(x)^T G;  mini sums the columns o = k (mod m) into dD[:, k]
//!                 dx = G W + e(G D_full^T)             e: [t, r] -> [t, in], column c takes column c mod r
//! bat:            H_a = G_a^T x  [r, in]               (G_a: G's columns of row block a)
//!                 dD[a] = sum_c W_{a,c}^T H_{a,c} + H_{a,c}
//!                 dx = G W + sum_a [ (G_a W_{a,c}) D[a] + G_a D[a] ]_c
//! ```
//!
//! The bat variant reads `W`'s rows through
//! [`FrozenLinear::rows`] (any storage, decoded), a row block of `r` rows
//! at a time. PEFT's fresh adapter is `D = 0` in every variant, so the
//! adapted layer is the base exactly.
use core::marker::PhantomData;

use crate::backend::{Accum, Backend, Op, Outcome};
use crate::base::FrozenLinear;
use crate::delta::{DeltaBlock, DeltaRows};
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len, split_scratch};
use crate::lora::ParamReport;
use crate::matrix::{MatMut, MatRef, checked_len};
use crate::method::{BackwardPass, Direction, ForwardPass, LinearAdapter, UpdateBlock, UpdateKind, WeightUpdate};

/// Which of PEFT's three MiSS variants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissVariant {
    /// `init_weights = true`: `D [r, out]`.
    Balance,
    /// `init_weights = "mini"`: `D [r, mini_r]`, tiled across the outputs.
    Mini {
        /// `mini_r`: a divisor of `out`.
        mini_r: usize,
    },
    /// `init_weights = "bat"`: `D [out / r, r, r]`, acting on `W`'s blocks.
    Bat,
}

/// A MiSS adapter for a linear layer `in -> out` with shard size `r`.
#[derive(Clone, Debug)]
pub struct Miss<E, S> {
    d: S,
    variant: MissVariant,
    rank: usize,
    in_features: usize,
    out_features: usize,
    _element: PhantomData<fn() -> E>,
}

impl<E: Element, S: AsRef<[E]>> Miss<E, S> {
    /// A MiSS adapter over `d`, which keeps its values: `[r, out]`
    /// (balance), `[r, mini_r]` (mini) or `[out / r, r, r]` (bat).
    ///
    /// # Errors
    /// [`Error::InvalidRank`] for `r = 0` or `r > in` (PEFT requires `r <=
    /// in`); [`Error::InvalidParameter`] for a `mini_r` of 0 or not
    /// dividing `out`, and for bat when `r` does not divide both `in` and
    /// `out`; [`Error::ShapeMismatch`] (`Parameter`) for `d` of the wrong
    /// length; [`Error::Overflow`].
    pub fn new(variant: MissVariant, rank: usize, in_features: usize, out_features: usize, d: S) -> Result<Self> {
        if rank == 0 || rank > in_features {
            return Err(Error::InvalidRank { rank, max: in_features });
        }
        let len = match variant {
            MissVariant::Balance => checked_len(rank, out_features)?,
            MissVariant::Mini { mini_r } => {
                if mini_r == 0 || !out_features.is_multiple_of(mini_r) {
                    return Err(Error::InvalidParameter { name: "mini_r", rule: "must divide out" });
                }
                checked_len(rank, mini_r)?
            }
            MissVariant::Bat => {
                if !in_features.is_multiple_of(rank) || !out_features.is_multiple_of(rank) {
                    return Err(Error::InvalidParameter { name: "MiSS r", rule: "must divide in and out for bat" });
                }
                checked_len(out_features, rank)?
            }
        };
        check_len(Operand::Parameter, len, d.as_ref().len())?;
        Ok(Self { d, variant, rank, in_features, out_features, _element: PhantomData })
    }

    /// `D`.
    pub fn block(&self) -> &[E] {
        self.d.as_ref()
    }

    /// The variant.
    pub fn variant(&self) -> MissVariant {
        self.variant
    }

    /// The shard size `r`.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Trainable (`D`'s length) and frozen (the base's) parameter counts.
    ///
    /// # Errors
    /// [`Error::Overflow`].
    pub fn param_report(&self, bias: bool) -> Result<ParamReport> {
        ParamReport::over_base(self.d.as_ref().len(), self.in_features, self.out_features, bias)
    }

    /// `D`'s columns: `out` (balance), `mini_r` (mini), `r` (bat).
    fn d_cols(&self) -> usize {
        match self.variant {
            MissVariant::Balance => self.out_features,
            MissVariant::Mini { mini_r } => mini_r,
            MissVariant::Bat => self.rank,
        }
    }

    /// `D[a]` (bat) as an `[r, r]` matrix.
    fn bat_block(&self, a: usize) -> Result<MatRef<'_, E>> {
        let rr = self.rank * self.rank;
        let d = self.d.as_ref().get(a * rr..(a + 1) * rr).ok_or(Error::Overflow)?;
        MatRef::new(d, self.rank, self.rank)
    }
}

/// `s(x)`: `s[t, j] = sum_k x[t, k r + j]`, into `s [t, r]`.
fn chunk_sums<E: Element>(x: MatRef<'_, E>, r: usize, s: &mut MatMut<'_, E>) {
    for (t, row) in s.row_iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            let zero = <E::Accum as Element>::from_f64(0.0);
            *v = E::from_accum(x.row(t).iter().skip(j).step_by(r).fold(zero, |a, x| a + x.to_accum()));
        }
    }
}

impl<E: Element, S: AsRef<[E]>> LinearAdapter<E> for Miss<E, S> {
    /// `dL/dD`, as `D`.
    type Grads<'g>
        = &'g mut [E]
    where
        E: 'g;

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    /// `tokens (r + mini_r)` for balance and mini; for bat `tokens (in + 2
    /// r) + r (in + out)` (`s(x)`, `x D[a]^T`, a product, `W`'s row block
    /// and the scratch [`FrozenLinear::rows`] provides for, `r out`; a base
    /// whose `rows` needs more is refused with
    /// [`Error::ScratchTooSmall`]; saturating).
    fn forward_scratch_len(&self, tokens: usize) -> usize {
        let (r, i, o) = (self.rank, self.in_features, self.out_features);
        match self.variant {
            MissVariant::Bat => tokens
                .saturating_mul(i.saturating_add(r.saturating_mul(2)))
                .saturating_add(r.saturating_mul(i.saturating_add(o))),
            _ => tokens.saturating_mul(r.saturating_add(self.d_cols())),
        }
    }

    /// balance, mini: `tokens (2 r + mini_r)`; bat: `tokens (in + r) + r (2
    /// in + out)` (`H_a`, `G_a W_a`, `G_a D[a]`, `W`'s row block, the rows'
    /// scratch; saturating).
    fn backward_scratch_len(&self, tokens: usize) -> usize {
        let (r, i, o) = (self.rank, self.in_features, self.out_features);
        match self.variant {
            MissVariant::Bat => tokens
                .saturating_mul(i.saturating_add(r))
                .saturating_add(r.saturating_mul(i.saturating_mul(2).saturating_add(o))),
            _ => tokens.saturating_mul(r.saturating_mul(2).saturating_add(self.d_cols())),
        }
    }

    /// `D`'s length (`Gradient`).
    fn check_grads(&self, grads: &&mut [E]) -> Result<()> {
        check_len(Operand::Gradient, self.d.as_ref().len(), grads.len())
    }

    /// `y = x W^T + b + s(x) D_full` (balance, mini) or `x (W + dW)^T + b`
    /// (bat).
    fn run_forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        pass: ForwardPass<'_, E, B, L>,
    ) -> Outcome<E, B> {
        let ForwardPass { backend, base, x, mut y, scratch } = pass;
        base.forward(backend, x, y.rb_mut())?;
        let (t, r, m) = (x.rows(), self.rank, self.d_cols());
        let one = <E::Accum as Element>::from_f64(1.0);
        let (s_buf, rest) = split_scratch(scratch, checked_len(t, r)?)?;
        let mut s = MatMut::new(s_buf, t, r)?;
        chunk_sums(x, r, &mut s);
        match self.variant {
            MissVariant::Balance => {
                let d = MatRef::new(self.d.as_ref(), r, m)?;
                backend.gemm(y, Accum::Add, s.as_ref(), Op::N, d, Op::N, one)
            }
            MissVariant::Mini { .. } => {
                let mut z = MatMut::new(rest.get_mut(..t * m).unwrap_or(&mut []), t, m)?;
                let d = MatRef::new(self.d.as_ref(), r, m)?;
                backend.gemm(z.rb_mut(), Accum::Replace, s.as_ref(), Op::N, d, Op::N, one)?;
                // Column o takes z[:, o mod m]: z's row, cycled.
                for (yr, zr) in y.row_iter_mut().zip(z.as_ref().row_iter()) {
                    for (v, zv) in yr.iter_mut().zip(zr.iter().cycle()) {
                        *v = E::from_accum(v.to_accum() + zv.to_accum());
                    }
                }
                Ok(())
            }
            MissVariant::Bat => self.bat_forward(backend, base, x, s.as_ref(), y, rest),
        }
    }

    /// Accumulates `dL/dD` into `grads` and, if `grad_x` is given, writes
    /// `dL/dx` (formulas in the [module docs](self)).
    fn run_backward<B, L>(&self, pass: BackwardPass<'_, E, B, L, Self::Grads<'_>>) -> Outcome<E, B>
    where
        B: Backend<E> + ?Sized,
        L: FrozenLinear<E> + ?Sized,
    {
        let BackwardPass { backend, base, x, grad_y, mut grad_x, grads, scratch } = pass;
        if let Some(gx) = grad_x.as_mut() {
            base.apply_transpose(backend, grad_y, gx.rb_mut(), Accum::Replace)?;
        }
        if self.variant == MissVariant::Bat {
            return self.bat_backward(backend, base, x, grad_y, grad_x, grads, scratch);
        }
        let (t, r, m, o) = (x.rows(), self.rank, self.d_cols(), self.out_features);
        let one = <E::Accum as Element>::from_f64(1.0);
        let (s_buf, rest) = split_scratch(scratch, checked_len(t, r)?)?;
        let (ds_buf, rest) = split_scratch(rest, checked_len(t, r)?)?;
        let mut s = MatMut::new(s_buf, t, r)?;
        chunk_sums(x, r, &mut s);
        // gm = G with the columns o = k (mod m) summed (mini), or G itself.
        let gm_buf = rest.get_mut(..checked_len(t, m)?).unwrap_or(&mut []);
        if m != o {
            let mut gm = MatMut::new(&mut *gm_buf, t, m)?;
            for (gr, yr) in gm.row_iter_mut().zip(grad_y.row_iter()) {
                for (k, v) in gr.iter_mut().enumerate() {
                    let zero = <E::Accum as Element>::from_f64(0.0);
                    *v = E::from_accum(yr.iter().skip(k).step_by(m).fold(zero, |a, g| a + g.to_accum()));
                }
            }
        }
        let gm = if m == o { grad_y } else { MatRef::new(gm_buf, t, m)? };
        let d = MatRef::new(self.d.as_ref(), r, m)?;
        backend.gemm(MatMut::new(grads, r, m)?, Accum::Add, s.as_ref(), Op::T, gm, Op::N, one)?;
        if let Some(mut gx) = grad_x {
            let mut ds = MatMut::new(ds_buf, t, r)?;
            backend.gemm(ds.rb_mut(), Accum::Replace, gm, Op::N, d, Op::T, one)?;
            for (gr, dr) in gx.row_iter_mut().zip(ds.as_ref().row_iter()) {
                // Column c takes ds[:, c mod r]: ds's row, cycled.
                for (v, dv) in gr.iter_mut().zip(dr.iter().cycle()) {
                    *v = E::from_accum(v.to_accum() + dv.to_accum());
                }
            }
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>> Miss<E, S> {
    /// Bat's adapter term: for each row block `a` of `r` outputs, `y_a +=
    /// (x_c D[a]^T)_c W_a^T + s(x) D[a]^T`.
    fn bat_forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        backend: &B,
        base: &L,
        x: MatRef<'_, E>,
        s: MatRef<'_, E>,
        mut y: MatMut<'_, E>,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        let (t, r, n_in) = (x.rows(), self.rank, self.in_features);
        let one = <E::Accum as Element>::from_f64(1.0);
        let (xd_buf, rest) = split_scratch(scratch, checked_len(t, n_in)?)?;
        let (z_buf, rest) = split_scratch(rest, checked_len(t, r)?)?;
        let (w_buf, rows_scratch) = split_scratch(rest, checked_len(r, n_in)?)?;
        for a in 0..self.out_features / r {
            let da = self.bat_block(a)?;
            let mut wa = MatMut::new(&mut *w_buf, r, n_in)?;
            base.rows(backend, a * r, wa.rb_mut(), rows_scratch)?;
            let mut xd = MatMut::new(&mut *xd_buf, t, n_in)?;
            for c in 0..n_in / r {
                let xc = x.cols_range(c * r, r).ok_or(Error::Overflow)?;
                let dst = xd.cols_range_mut(c * r, r).ok_or(Error::Overflow)?;
                backend.gemm(dst, Accum::Replace, xc, Op::N, da, Op::T, one)?;
            }
            let mut z = MatMut::new(&mut *z_buf, t, r)?;
            backend.gemm(z.rb_mut(), Accum::Replace, xd.as_ref(), Op::N, wa.as_ref(), Op::T, one)?;
            backend.gemm(z.rb_mut(), Accum::Add, s, Op::N, da, Op::T, one)?;
            let ya = y.cols_range_mut(a * r, r).ok_or(Error::Overflow)?;
            add_into(ya, z.as_ref());
        }
        Ok(())
    }

    /// Bat's backward (see the [module docs](self)); `grad_x` already
    /// holds `G W`.
    #[allow(clippy::too_many_arguments)]
    fn bat_backward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        backend: &B,
        base: &L,
        x: MatRef<'_, E>,
        grad_y: MatRef<'_, E>,
        mut grad_x: Option<MatMut<'_, E>>,
        grads: &mut [E],
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        let (t, r, n_in) = (x.rows(), self.rank, self.in_features);
        let one = <E::Accum as Element>::from_f64(1.0);
        let (h_buf, rest) = split_scratch(scratch, checked_len(r, n_in)?)?;
        let (gw_buf, rest) = split_scratch(rest, checked_len(t, n_in)?)?;
        let (u_buf, rest) = split_scratch(rest, checked_len(t, r)?)?;
        let (w_buf, rows_scratch) = split_scratch(rest, checked_len(r, n_in)?)?;
        let rr = r * r;
        for a in 0..self.out_features / r {
            let da = self.bat_block(a)?;
            let ga = grad_y.cols_range(a * r, r).ok_or(Error::Overflow)?;
            let mut wa = MatMut::new(&mut *w_buf, r, n_in)?;
            base.rows(backend, a * r, wa.rb_mut(), rows_scratch)?;
            // H_a = G_a^T x; dD[a] += sum_c W_{a,c}^T H_{a,c} + H_{a,c}.
            let mut h = MatMut::new(&mut *h_buf, r, n_in)?;
            backend.gemm(h.rb_mut(), Accum::Replace, ga, Op::T, x, Op::N, one)?;
            let gd = grads.get_mut(a * rr..(a + 1) * rr).ok_or(Error::Overflow)?;
            let mut gd = MatMut::new(gd, r, r)?;
            for c in 0..n_in / r {
                let wc = wa.as_ref().cols_range(c * r, r).ok_or(Error::Overflow)?;
                let hc = h.as_ref().cols_range(c * r, r).ok_or(Error::Overflow)?;
                backend.gemm(gd.rb_mut(), Accum::Add, wc, Op::T, hc, Op::N, one)?;
                add_into(gd.rb_mut(), hc);
            }
            // dx_c += (G_a W_{a,c}) D[a] + G_a D[a].
            if let Some(gx) = grad_x.as_mut() {
                let mut gw = MatMut::new(&mut *gw_buf, t, n_in)?;
                backend.gemm(gw.rb_mut(), Accum::Replace, ga, Op::N, wa.as_ref(), Op::N, one)?;
                let mut u = MatMut::new(&mut *u_buf, t, r)?;
                backend.gemm(u.rb_mut(), Accum::Replace, ga, Op::N, da, Op::N, one)?;
                for c in 0..n_in / r {
                    let gwc = gw.as_ref().cols_range(c * r, r).ok_or(Error::Overflow)?;
                    let mut dst = gx.cols_range_mut(c * r, r).ok_or(Error::Overflow)?;
                    backend.gemm(dst.rb_mut(), Accum::Add, gwc, Op::N, da, Op::N, one)?;
                    add_into(dst, u.as_ref());
                }
            }
        }
        Ok(())
    }
}

/// `dst += src`, rounding once per element.
fn add_into<E: Element>(mut dst: MatMut<'_, E>, src: MatRef<'_, E>) {
    for (dr, sr) in dst.row_iter_mut().zip(src.row_iter()) {
        for (v, s) in dr.iter_mut().zip(sr) {
            *v = E::from_accum(v.to_accum() + s.to_accum());
        }
    }
}

impl<E: Element, S: AsRef<[E]>> DeltaRows<E> for Miss<E, S> {
    /// `(out, in)`.
    fn delta_dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// Rows `start..start + n` of `factor * dW`. Bat's `dW` depends on
    /// `W`: this fills the balance and mini variants only, and refuses bat
    /// ([`Error::InvalidParameter`]); bat merges through
    /// [`Miss::bat_update_rows`], which reads the rows being merged.
    fn fill_delta_rows<B: Backend<E> + ?Sized>(&self, _backend: &B, block: DeltaBlock<'_, E>) -> Outcome<E, B> {
        let DeltaBlock { start, mut dst, accum, factor, .. } = block;
        let (r, m) = (self.rank, self.d_cols());
        if self.variant == MissVariant::Bat {
            return Err(
                Error::InvalidParameter { name: "MiSS bat", rule: "its dW depends on W: merge the rows" }.into()
            );
        }
        let d = self.d.as_ref();
        for (k, row) in dst.row_iter_mut().enumerate() {
            let col = (start + k) % m;
            for (c, v) in row.iter_mut().enumerate() {
                accum.store_f64(v, factor * d.get((c % r) * m + col).map_or(0.0, |x| x.to_f64()));
            }
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>> Miss<E, S> {
    /// Bat's merge of rows `start..start + n` of `W` in place (`n` and
    /// `start` multiples of `r`): each row block `W_a` becomes `W_a +
    /// [W_{a,c} D[a] + D[a]]_c` (`factor` 1), computed from the rows as
    /// given. The unmerge of bat needs `(I + D[a])^-1` and is not offered:
    /// merge with a backup ([`Merged`](crate::method::Merged)) to undo it.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for another variant or rows not aligned
    /// to `r`; [`Error::ScratchTooSmall`] for `scratch` shorter than `r
    /// in`; [`Error::ShapeMismatch`]; the backend's errors.
    pub fn bat_update_rows<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        start: usize,
        mut block: MatMut<'_, E>,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        let (r, n_in, n) = (self.rank, self.in_features, block.rows());
        if self.variant != MissVariant::Bat || !start.is_multiple_of(r) || n % r != 0 {
            return Err(Error::InvalidParameter { name: "MiSS bat rows", rule: "whole blocks of r rows" }.into());
        }
        crate::base::check_rows(start, n, self.out_features, n_in, &block)?;
        let need = checked_len(r, n_in)?;
        let len = scratch.len();
        let tmp = scratch.get_mut(..need).ok_or(Error::ScratchTooSmall { needed: need, len })?;
        let one = <E::Accum as Element>::from_f64(1.0);
        for b in 0..n / r {
            let da = self.bat_block(start / r + b)?;
            let mut rows = block.rb_mut().into_rows_range(b * r, r).ok_or(Error::Overflow)?;
            let mut t = MatMut::new(&mut *tmp, r, n_in)?;
            for c in 0..n_in / r {
                let wc = rows.as_ref().cols_range(c * r, r).ok_or(Error::Overflow)?;
                let mut dst = t.cols_range_mut(c * r, r).ok_or(Error::Overflow)?;
                backend.gemm(dst.rb_mut(), Accum::Replace, wc, Op::N, da, Op::N, one)?;
                add_into(dst, da);
            }
            add_into(rows.rb_mut(), t.as_ref());
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>> WeightUpdate<E> for Miss<E, S> {
    /// `(out, in)`.
    fn weight_dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// [`UpdateKind::Additive`] for balance and mini;
    /// [`UpdateKind::Multiplicative`] for bat (`W_a (I + D[a]) + D[a]` per
    /// block).
    fn kind(&self) -> UpdateKind {
        if self.variant == MissVariant::Bat { UpdateKind::Multiplicative } else { UpdateKind::Additive }
    }

    /// Bat: `r in` (one block's update); none otherwise.
    fn update_scratch_len(&self, _rows: usize) -> usize {
        if self.variant == MissVariant::Bat { self.rank.saturating_mul(self.in_features) } else { 0 }
    }

    /// Bat's unmerge is not offered (it would invert `I + D[a]`): merge
    /// with a backup. Refused here so a merge without one is refused
    /// before `W` changes.
    fn check_invertible(&self) -> Result<()> {
        if self.variant == MissVariant::Bat {
            return Err(Error::InvalidParameter { name: "MiSS bat", rule: "unmerges only from a backup" });
        }
        Ok(())
    }

    /// Balance, mini: `W[rows] += dW[rows]` (merge) or `-=` (unmerge).
    /// Bat: [`Miss::bat_update_rows`] (merge; rows in whole blocks of
    /// `r`), and the unmerge refused.
    fn run_update<B: Backend<E> + ?Sized>(&self, backend: &B, block: UpdateBlock<'_, E>) -> Outcome<E, B> {
        if self.variant != MissVariant::Bat {
            return crate::delta::update_additive(self, backend, block);
        }
        let UpdateBlock { start, block, direction, scratch, .. } = block;
        if direction == Direction::Unmerge {
            self.check_invertible()?;
        }
        self.bat_update_rows(backend, start, block, scratch)
    }
}

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>> Miss<E, S> {
    /// Initializes as PEFT does: `D = 0` in every variant (the adapted
    /// layer is the base exactly).
    pub fn init_adapter(&mut self) {
        self.d.as_mut().fill(E::ZERO);
    }

    /// `D` mutably, for an optimizer step or a load.
    pub fn block_mut(&mut self) -> &mut [E] {
        self.d.as_mut()
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;

    use super::*;
    use crate::backend::Reference;
    use crate::base::Dense;

    #[test]
    fn balance_and_mini_by_hand() {
        // in 3, r 2: x = [1, 2, 3] pads to [1, 2, 3, 0]: s = [1 + 3, 2] = [4, 2].
        // balance, out 2: D = [[1, 0], [0, 1]]: y += [4, 2]; dW[o, c] = D[c % 2, o].
        let w = [0.0f64; 6];
        let base = Dense::new(&w, 2, 3).unwrap();
        let x = MatRef::new(&[1.0, 2.0, 3.0], 1, 3).unwrap();
        let bal = Miss::new(MissVariant::Balance, 2, 3, 2, [1.0f64, 0.0, 0.0, 1.0]).unwrap();
        let mut y = [0.0; 2];
        let mut sc = [0.0; 8];
        bal.forward(&Reference, &base, x, MatMut::new(&mut y, 1, 2).unwrap(), &mut sc).unwrap();
        assert_eq!(y, [4.0, 2.0]);
        let mut dw = [0.0; 6];
        bal.delta_rows(&Reference, 0, MatMut::new(&mut dw, 2, 3).unwrap(), Accum::Replace, 1.0, &mut []).unwrap();
        assert_eq!(dw, [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
        // mini, out 4, mini_r 2: D [2, 2] = [[1, 2], [3, 4]]: s D = [4 + 6, 8 + 8] = [10, 16], tiled.
        let w4 = [0.0f64; 12];
        let base4 = Dense::new(&w4, 4, 3).unwrap();
        let mini = Miss::new(MissVariant::Mini { mini_r: 2 }, 2, 3, 4, [1.0f64, 2.0, 3.0, 4.0]).unwrap();
        let mut y4 = [0.0; 4];
        mini.forward(&Reference, &base4, x, MatMut::new(&mut y4, 1, 4).unwrap(), &mut sc).unwrap();
        assert_eq!(y4, [10.0, 16.0, 10.0, 16.0]);
        assert!(Miss::new(MissVariant::Mini { mini_r: 3 }, 2, 3, 4, [0.0f64; 6]).is_err());
        assert!(Miss::new(MissVariant::Balance, 4, 3, 2, [0.0f64; 8]).is_err(), "r > in");
    }

    #[test]
    fn bat_by_hand() {
        // r 1, in 2, out 1: D [1, 1, 1] = [2]; W = [3, 5]:
        // dW = [3 * 2 + 2, 5 * 2 + 2] = [8, 12], W + dW = [11, 17]; x = [1, 1]: y = 28.
        let w = [3.0f64, 5.0];
        let base = Dense::new(&w, 1, 2).unwrap();
        let bat = Miss::new(MissVariant::Bat, 1, 2, 1, [2.0f64]).unwrap();
        let x = MatRef::new(&[1.0, 1.0], 1, 2).unwrap();
        let mut y = [0.0];
        let mut sc = vec![0.0; bat.forward_scratch_len(1)];
        bat.forward(&Reference, &base, x, MatMut::new(&mut y, 1, 1).unwrap(), &mut sc).unwrap();
        assert_eq!(y, [28.0]);
        let mut wm = w;
        bat.bat_update_rows(&Reference, 0, MatMut::new(&mut wm, 1, 2).unwrap(), &mut [0.0; 2]).unwrap();
        assert_eq!(wm, [11.0, 17.0]);
    }
}
