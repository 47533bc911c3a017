//! RoAd (Liao et al., 2024): 2D rotations with scaling of a frozen layer's
//! outputs, in pairs within groups, as PEFT's `road.Linear` computes it,
//! in its three variants.
//!
//! ```text
//! theta, alpha: out/2 (road_1), out (road_2) or 2 out (road_4) entries
//! c_j, s_j (j < out):
//!   road_1: c = alpha cos theta, s = alpha sin theta, one (alpha, theta) per pair:
//!           entry q (g/2) + k of group q serves outputs q g + k and q g + g/2 + k
//!   road_2: c_j = alpha_j cos theta_j, s_j = alpha_j sin theta_j
//!   road_4: group q's 2 g entries: c from the first g (alpha, theta), s from the second g
//! h = x W^T + b; in each group of g outputs, pair (k, k') with k' = k + g/2:
//!   y_k  = c_k  h_k  - s_k  h_k'
//!   y_k' = c_k' h_k' + s_k' h_k
//! merged: W' = R W and b' = R b (the bias is rotated too), R the 2 x 2 blocks above
//! ```
//!
//! The backward, with `G = dL/dy`:
//!
//! ```text
//! dh_k  = c_k G_k + s_k' G_k'        dh_k' = c_k' G_k' - s_k G_k        dx = dh W
//! dc_j  = sum_t G_tj h_tj            ds_k = -sum_t G_tk h_tk'           ds_k' = sum_t G_tk' h_tk
//! d(alpha, theta) from c = alpha cos theta, s = alpha sin theta (road_1 sums the pair's two outputs)
//! ```
//!
//! PEFT's fresh adapter: `theta = 0`, `alpha = 1` (`c = 1`, `s = 0`), the
//! base exactly. Merging transforms whole groups of rows: row blocks start
//! and end on multiples of `g`. The unmerge inverts each pair's 2 x 2 block
//! and is refused when one is singular (`c_k c_k' + s_k s_k' = 0`).
use core::marker::PhantomData;

use crate::backend::{Accum, Backend, Outcome};
use crate::base::FrozenLinear;
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len, split_scratch};
use crate::lora::ParamReport;
use crate::matrix::{MatMut, checked_len};
use crate::method::{BackwardPass, Direction, ForwardPass, LinearAdapter, UpdateBlock, UpdateKind, WeightUpdate};

/// PEFT's three RoAd variants: how many `(theta, alpha)` pairs per output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoadVariant {
    /// `out / 2` entries: one per rotated pair.
    Road1,
    /// `out` entries: one per output.
    Road2,
    /// `2 out` entries: separate `(alpha, theta)` for `c` and for `s`.
    Road4,
}

impl RoadVariant {
    /// Entries of `theta` (and of `alpha`) for `out` outputs.
    pub fn len(self, out: usize) -> usize {
        match self {
            RoadVariant::Road1 => out / 2,
            RoadVariant::Road2 => out,
            RoadVariant::Road4 => out.saturating_mul(2),
        }
    }
}

/// A RoAd adapter for a linear layer `in -> out` with groups of `g`.
#[derive(Clone, Debug)]
pub struct Road<E, S> {
    theta: S,
    alpha: S,
    variant: RoadVariant,
    group: usize,
    in_features: usize,
    out_features: usize,
    _element: PhantomData<fn() -> E>,
}

/// Gradient buffers of a RoAd adapter, accumulated into (`+=`).
#[derive(Debug)]
pub struct RoadGrads<'g, E> {
    /// `dL/dtheta`.
    pub theta: &'g mut [E],
    /// `dL/dalpha`.
    pub alpha: &'g mut [E],
}

impl<E: Element, S: AsRef<[E]>> Road<E, S> {
    /// A RoAd adapter over `theta` and `alpha` (each
    /// [`RoadVariant::len`]`(out)` long), which keep their values.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a group size that is 0, odd, or does
    /// not divide `out`; [`Error::ShapeMismatch`] (`Parameter`) for a
    /// vector of the wrong length.
    pub fn new(
        variant: RoadVariant,
        group: usize,
        in_features: usize,
        out_features: usize,
        theta: S,
        alpha: S,
    ) -> Result<Self> {
        if group == 0 || !group.is_multiple_of(2) || !out_features.is_multiple_of(group) {
            return Err(Error::InvalidParameter { name: "group_size", rule: "must be even and divide out" });
        }
        check_len(Operand::Parameter, variant.len(out_features), theta.as_ref().len())?;
        check_len(Operand::Parameter, variant.len(out_features), alpha.as_ref().len())?;
        Ok(Self { theta, alpha, variant, group, in_features, out_features, _element: PhantomData })
    }

    /// `theta`.
    pub fn theta(&self) -> &[E] {
        self.theta.as_ref()
    }

    /// `alpha`.
    pub fn alpha(&self) -> &[E] {
        self.alpha.as_ref()
    }

    /// The variant.
    pub fn variant(&self) -> RoadVariant {
        self.variant
    }

    /// The group size `g`.
    pub fn group_size(&self) -> usize {
        self.group
    }

    /// Trainable (`theta` and `alpha`) and frozen (the base's) parameter
    /// counts.
    ///
    /// # Errors
    /// [`Error::Overflow`].
    pub fn param_report(&self, bias: bool) -> Result<ParamReport> {
        let n = self.theta.as_ref().len().checked_mul(2).ok_or(Error::Overflow)?;
        ParamReport::over_base(n, self.in_features, self.out_features, bias)
    }

    /// Output `j`'s `(c, s)` entries: the index of the `(alpha, theta)`
    /// giving `c` and the one giving `s`.
    fn entries(&self, j: usize) -> (usize, usize) {
        let (g, q, k) = (self.group, j / self.group, j % self.group);
        match self.variant {
            RoadVariant::Road1 => {
                let e = q * (g / 2) + k % (g / 2);
                (e, e)
            }
            RoadVariant::Road2 => (j, j),
            RoadVariant::Road4 => (q * 2 * g + k, q * 2 * g + g + k),
        }
    }

    /// `(c_j, s_j)` in f64.
    fn cs(&self, j: usize) -> (f64, f64) {
        let (ec, es) = self.entries(j);
        let at = |v: &S, i: usize| v.as_ref().get(i).map_or(0.0, |x| x.to_f64());
        let c = at(&self.alpha, ec) * libm::cos(at(&self.theta, ec));
        let s = at(&self.alpha, es) * libm::sin(at(&self.theta, es));
        (c, s)
    }

    /// `c` and `s` for every output into `cs [2 out]` (`c` then `s`).
    fn fill_cs(&self, cs: &mut [E]) {
        let (c, s) = cs.split_at_mut(self.out_features.min(cs.len()));
        for (j, (cv, sv)) in c.iter_mut().zip(s.iter_mut()).enumerate() {
            let (cj, sj) = self.cs(j);
            *cv = E::from_f64(cj);
            *sv = E::from_f64(sj);
        }
    }

    /// Output `j`'s partner in its pair, and whether `j` is the first half.
    fn partner(&self, j: usize) -> (usize, bool) {
        let half = self.group / 2;
        if j % self.group < half { (j + half, true) } else { (j - half, false) }
    }
}

/// `row <- R row` for one row of outputs (`h` the input, `y` the output):
/// `y_k = c_k h_k - s_k h_k'`, `y_k' = c_k' h_k' + s_k' h_k`.
fn rotate<E: Element, S: AsRef<[E]>>(road: &Road<E, S>, cs: &[E], h: &[E], y: &mut [E]) {
    let n = road.out_features;
    for (j, yv) in y.iter_mut().enumerate().take(n) {
        let (p, first) = road.partner(j);
        let get = |v: &[E], i: usize| v.get(i).map_or(0.0, |x| x.to_f64());
        let (c, s) = (get(cs, j), get(cs, n + j));
        let v = if first { c * get(h, j) - s * get(h, p) } else { c * get(h, j) + s * get(h, p) };
        *yv = E::from_f64(v);
    }
}

impl<E: Element, S: AsRef<[E]>> LinearAdapter<E> for Road<E, S> {
    type Grads<'g>
        = RoadGrads<'g, E>
    where
        E: 'g;

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    /// `2 out + tokens out` (`c`, `s`, `h`; saturating).
    fn forward_scratch_len(&self, tokens: usize) -> usize {
        self.out_features.saturating_mul(tokens.saturating_add(2))
    }

    /// `4 out + 2 tokens out` (`c`, `s`, their gradients, `h`, `dL/dh`;
    /// saturating).
    fn backward_scratch_len(&self, tokens: usize) -> usize {
        self.out_features.saturating_mul(tokens.saturating_mul(2).saturating_add(4))
    }

    /// `theta` and `alpha`'s lengths (`Gradient`).
    fn check_grads(&self, grads: &RoadGrads<'_, E>) -> Result<()> {
        check_len(Operand::Gradient, self.theta.as_ref().len(), grads.theta.len())?;
        check_len(Operand::Gradient, self.alpha.as_ref().len(), grads.alpha.len())
    }

    /// `y = R (x W^T + b)`, pair by pair.
    fn run_forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        pass: ForwardPass<'_, E, B, L>,
    ) -> Outcome<E, B> {
        let ForwardPass { backend, base, x, mut y, scratch } = pass;
        let (t, o) = (x.rows(), self.out_features);
        let (cs, rest) = split_scratch(scratch, checked_len(2, o)?)?;
        self.fill_cs(cs);
        let mut h = MatMut::new(rest.get_mut(..checked_len(t, o)?).unwrap_or(&mut []), t, o)?;
        base.forward(backend, x, h.rb_mut())?;
        for (yr, hr) in y.row_iter_mut().zip(h.as_ref().row_iter()) {
            rotate(self, cs, hr, yr);
        }
        Ok(())
    }

    /// Accumulates `dL/dtheta` and `dL/dalpha` and, if `grad_x` is given,
    /// writes `dL/dx` (formulas in the [module docs](self)).
    fn run_backward<B, L>(&self, pass: BackwardPass<'_, E, B, L, Self::Grads<'_>>) -> Outcome<E, B>
    where
        B: Backend<E> + ?Sized,
        L: FrozenLinear<E> + ?Sized,
    {
        let BackwardPass { backend, base, x, grad_y, grad_x, grads, scratch } = pass;
        let (t, o) = (x.rows(), self.out_features);
        let (cs, rest) = split_scratch(scratch, checked_len(2, o)?)?;
        let (dcs, rest) = split_scratch(rest, checked_len(2, o)?)?;
        let (h_buf, rest) = split_scratch(rest, checked_len(t, o)?)?;
        let dh_buf = rest.get_mut(..checked_len(t, o)?).unwrap_or(&mut []);
        self.fill_cs(cs);
        let mut h = MatMut::new(h_buf, t, o)?;
        base.forward(backend, x, h.rb_mut())?;
        let get = |v: &[E], i: usize| v.get(i).map_or(0.0, |x| x.to_f64());
        // dc_j = sum_t G_tj h_tj; ds_j = -+ sum_t G_tj h_tj' (minus on the first half).
        for j in 0..o {
            let (p, first) = self.partner(j);
            let (mut dc, mut ds) = (0.0, 0.0);
            for (gr, hr) in grad_y.row_iter().zip(h.as_ref().row_iter()) {
                dc += get(gr, j) * get(hr, j);
                ds += get(gr, j) * get(hr, p);
            }
            if let Some(a) = dcs.get_mut(j) {
                *a = E::from_f64(dc);
            }
            if let Some(b) = dcs.get_mut(o + j) {
                *b = E::from_f64(if first { -ds } else { ds });
            }
        }
        self.chain(dcs, grads);
        if let Some(gx) = grad_x {
            // dh_k = c_k G_k + s_k' G_k',  dh_k' = c_k' G_k' - s_k G_k: R^T G.
            let mut dh = MatMut::new(dh_buf, t, o)?;
            for (dr, gr) in dh.row_iter_mut().zip(grad_y.row_iter()) {
                for (j, v) in dr.iter_mut().enumerate() {
                    let (p, first) = self.partner(j);
                    let (c, sp) = (get(cs, j), get(cs, o + p));
                    *v = E::from_f64(c * get(gr, j) + if first { sp } else { -sp } * get(gr, p));
                }
            }
            base.apply_transpose(backend, dh.as_ref(), gx, Accum::Replace)?;
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>> Road<E, S> {
    /// `d(theta, alpha)` from `dc`, `ds` (`dcs`: `dc` then `ds`, per
    /// output), accumulated into `grads`.
    fn chain(&self, dcs: &[E], grads: RoadGrads<'_, E>) {
        let o = self.out_features;
        let at = |v: &[E], i: usize| v.get(i).map_or(0.0, |x| x.to_f64());
        let add = |v: &mut [E], i: usize, d: f64| {
            if let Some(x) = v.get_mut(i) {
                *x = E::from_f64(x.to_f64() + d);
            }
        };
        let (theta, alpha) = (self.theta.as_ref(), self.alpha.as_ref());
        for j in 0..o {
            let (ec, es) = self.entries(j);
            let (dc, ds) = (at(dcs, j), at(dcs, o + j));
            // c = a cos th: dth = -a sin th dc, da = cos th dc; s = a sin th: dth = a cos th ds, da = sin th ds.
            let (tc, ac) = (at(theta, ec), at(alpha, ec));
            add(grads.theta, ec, -ac * libm::sin(tc) * dc);
            add(grads.alpha, ec, libm::cos(tc) * dc);
            let (ts, as_) = (at(theta, es), at(alpha, es));
            add(grads.theta, es, as_ * libm::cos(ts) * ds);
            add(grads.alpha, es, libm::sin(ts) * ds);
        }
    }
}

impl<E: Element, S: AsRef<[E]>> WeightUpdate<E> for Road<E, S> {
    /// `(out, in)`.
    fn weight_dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// [`UpdateKind::Multiplicative`]: pairs of rows rotate.
    fn kind(&self) -> UpdateKind {
        UpdateKind::Multiplicative
    }

    /// The bias rotates with the rows.
    fn touches_bias(&self) -> bool {
        true
    }

    /// None.
    fn update_scratch_len(&self, _rows: usize) -> usize {
        0
    }

    /// Refused when a pair's block `[[c_k, -s_k], [s_k', c_k']]` is
    /// singular: the unmerge inverts it.
    fn check_invertible(&self) -> Result<()> {
        for j in 0..self.out_features {
            let (p, first) = self.partner(j);
            if first {
                let ((c, s), (cp, sp)) = (self.cs(j), self.cs(p));
                if c * cp + s * sp == 0.0 {
                    return Err(Error::InvalidParameter { name: "RoAd", rule: "a pair's rotation is singular" });
                }
            }
        }
        Ok(())
    }

    /// Merge: each pair of rows (and bias entries) `[w_k; w_k'] <- [[c_k,
    /// -s_k], [s_k', c_k']] [w_k; w_k']`; unmerge: by the block's inverse.
    /// Rows in whole groups ([`Error::InvalidParameter`] otherwise).
    fn run_update<B: Backend<E> + ?Sized>(&self, _backend: &B, block: UpdateBlock<'_, E>) -> Outcome<E, B> {
        let UpdateBlock { start, mut block, bias, direction, .. } = block;
        let (g, n) = (self.group, block.rows());
        if start % g != 0 || n % g != 0 {
            return Err(Error::InvalidParameter { name: "RoAd rows", rule: "whole groups of group_size rows" }.into());
        }
        let half = g / 2;
        for k in (0..n).filter(|k| k % g < half) {
            let (m00, m01, m10, m11) = self.pair_matrix(start + k, direction);
            let pair = |a: f64, b: f64| (m00 * a + m01 * b, m10 * a + m11 * b);
            let (stride, cols) = (block.row_stride(), block.cols());
            let (lo, hi) = split_scratch(block.rb_mut().into_slice(), (k + half) * stride)?;
            let top = lo.get_mut(k * stride..k * stride + cols).ok_or(Error::Overflow)?;
            let bottom = hi.get_mut(..cols).ok_or(Error::Overflow)?;
            for (a, b) in top.iter_mut().zip(bottom.iter_mut()) {
                let (x, y) = pair(a.to_f64(), b.to_f64());
                (*a, *b) = (E::from_f64(x), E::from_f64(y));
            }
        }
        if let Some(b) = bias {
            self.update_bias(start, b, direction)?;
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>> Road<E, S> {
    /// The pair transform of [`WeightUpdate::run_update`] on bias entries
    /// `start..start + bias.len()` alone (`b' = R b` on merge, `R^-1 b` on
    /// unmerge): what a streaming merge applies to a bias stored apart from
    /// its weight.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] unless `start` and the length are whole
    /// groups and within `out`.
    pub fn update_bias(&self, start: usize, bias: &mut [E], direction: Direction) -> Result<()> {
        let (g, n) = (self.group, bias.len());
        if !start.is_multiple_of(g) || n % g != 0 || start.saturating_add(n) > self.out_features {
            return Err(Error::InvalidParameter { name: "RoAd bias", rule: "whole groups within out" });
        }
        let half = g / 2;
        for k in (0..n).filter(|k| k % g < half) {
            let (m00, m01, m10, m11) = self.pair_matrix(start + k, direction);
            let (lo, hi) = split_scratch(bias, k + half)?;
            if let (Some(a), Some(b)) = (lo.get_mut(k), hi.first_mut()) {
                let (x, y) = (a.to_f64(), b.to_f64());
                (*a, *b) = (E::from_f64(m00 * x + m01 * y), E::from_f64(m10 * x + m11 * y));
            }
        }
        Ok(())
    }

    /// The 2 x 2 block of the pair starting at output `j` (first half):
    /// `[[c_j, -s_j], [s_j', c_j']]`, or its inverse for an unmerge.
    fn pair_matrix(&self, j: usize, direction: Direction) -> (f64, f64, f64, f64) {
        let ((c, s), (cp, sp)) = (self.cs(j), self.cs(j + self.group / 2));
        match direction {
            Direction::Merge => (c, -s, sp, cp),
            Direction::Unmerge => {
                let det = c * cp + s * sp;
                (cp / det, s / det, -sp / det, c / det)
            }
        }
    }
}

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>> Road<E, S> {
    /// Initializes as PEFT does: `theta = 0`, `alpha = 1` (the identity).
    pub fn init_adapter(&mut self) {
        self.theta.as_mut().fill(E::ZERO);
        self.alpha.as_mut().fill(E::from_f64(1.0));
    }

    /// `[theta, alpha]` mutably, for an optimizer step or a load.
    pub fn vectors_mut(&mut self) -> [&mut [E]; 2] {
        [self.theta.as_mut(), self.alpha.as_mut()]
    }
}
