//! LN tuning (Zhao et al., 2023): a normalization layer's own parameters,
//! trained in place of the frozen ones, as PEFT's `LNTuningLayer` runs
//! them.
//!
//! ```text
//! LayerNorm:  y = (x - mean(x)) / sqrt(var(x) + eps) * w' + b'     (var biased, as torch)
//! RMSNorm:    y = x / sqrt(mean(x^2) + eps) * w'                    (Llama's norm)
//! w' [d], b' [d]: the adapter's copies; eps and d are the base layer's
//! merged: w <- w', b <- b' (replaced, nothing added); unmerged: the originals back
//! ```
//!
//! PEFT deep-copies the targeted module and trains the copy; the file
//! holds the copy's whole state (`ln_tuning_layers.weight`, and `.bias`
//! for a LayerNorm with one). Its merge swaps the two modules, so merging
//! is replacement ([`UpdateKind::Replacement`]): [`WeightUpdate`] writes
//! the adapter's values over the base's and keeps the originals at the
//! front of the merge's scratch, from which the unmerge restores them bit
//! for bit. Several LN tuning adapters do not combine (PEFT refuses to
//! merge two).
//!
//! The backward, with `G = dL/dy` and `xhat` the normalized row (`r =
//! 1 / sqrt(var + eps)` or `1 / sqrt(mean(x^2) + eps)`), `g = G * w'`:
//!
//! ```text
//! dw'[j] += sum_t G[t, j] xhat[t, j]      db'[j] += sum_t G[t, j]
//! LayerNorm: dx = r (g - mean(g) - xhat mean(g xhat))
//! RMSNorm:   dx = r (g - xhat mean(g xhat))
//! ```
//!
//! Every row is reduced in `f64` and each output rounds once, so the four
//! element types differ only in their final rounding.
//!
//! PEFT's fresh adapter is a copy of the base's parameters
//! ([`LnTuning::init_from_base`]): the adapted layer is the base exactly.
//! A LayerNorm without affine parameters has nothing to tune and is not
//! an LN tuning target.
use core::marker::PhantomData;

use crate::backend::{Backend, Outcome};
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len, check_shape};
use crate::matrix::{MatMut, MatRef};
use crate::method::{Direction, UpdateBlock, UpdateKind, WeightUpdate};

/// Which normalization the tuned layer computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Norm {
    /// torch's `LayerNorm` over the last dimension: centred, divided by the
    /// square root of the biased variance plus `eps`, then `* w + b`.
    Layer,
    /// Llama's `RMSNorm`: divided by the root mean square plus `eps`, then
    /// `* w` (no bias, no centring).
    Rms,
}

/// An LN tuning adapter: the trained weight `w' [d]` (and bias `b' [d]`
/// for a LayerNorm that has one) of a norm layer of width `d`.
#[derive(Clone, Debug)]
pub struct LnTuning<E, S> {
    weight: S,
    bias: Option<S>,
    norm: Norm,
    eps: f64,
    dim: usize,
    _element: PhantomData<fn() -> E>,
}

/// Gradient buffers of an LN tuning adapter, accumulated into (`+=`).
#[derive(Debug)]
pub struct LnTuningGrads<'g, E> {
    /// `dL/dw' [d]`.
    pub weight: &'g mut [E],
    /// `dL/db' [d]`, for an adapter with a bias.
    pub bias: Option<&'g mut [E]>,
}

impl<E: Element, S: AsRef<[E]>> LnTuning<E, S> {
    /// An adapter of a `norm` layer of width `dim` and the base's `eps`,
    /// over `weight [dim]` and, for a LayerNorm with a bias, `bias [dim]`,
    /// which keep their values.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a zero width, an `eps` that is
    /// negative or not finite, or a bias on an RMSNorm;
    /// [`Error::ShapeMismatch`] (`Weight`, `Bias`) for tensors of another
    /// length.
    pub fn new(norm: Norm, dim: usize, eps: f64, weight: S, bias: Option<S>) -> Result<Self> {
        if dim == 0 {
            return Err(Error::InvalidParameter { name: "LN tuning width", rule: "must be positive" });
        }
        if !(eps.is_finite() && eps >= 0.0) {
            return Err(Error::InvalidParameter { name: "eps", rule: "must be finite and not negative" });
        }
        check_len(Operand::Weight, dim, weight.as_ref().len())?;
        if let Some(b) = &bias {
            if norm == Norm::Rms {
                return Err(Error::InvalidParameter { name: "ln_tuning_layers.bias", rule: "an RMSNorm has no bias" });
            }
            check_len(Operand::Bias, dim, b.as_ref().len())?;
        }
        Ok(Self { weight, bias, norm, eps, dim, _element: PhantomData })
    }

    /// The width `d`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The normalization.
    pub fn norm(&self) -> Norm {
        self.norm
    }

    /// The trained weight `w' [d]`.
    pub fn weight(&self) -> &[E] {
        self.weight.as_ref()
    }

    /// The trained bias `b' [d]`, when the layer has one.
    pub fn bias(&self) -> Option<&[E]> {
        self.bias.as_ref().map(AsRef::as_ref)
    }

    /// `(mean, r)` of one row: `r = 1 / sqrt(var + eps)` (LayerNorm, `mean`
    /// the row's) or `1 / sqrt(mean(x^2) + eps)` (RMSNorm, `mean = 0`).
    fn stats(&self, row: &[E]) -> (f64, f64) {
        let d = self.dim as f64;
        let mean = match self.norm {
            Norm::Layer => row.iter().map(|v| v.to_f64()).sum::<f64>() / d,
            Norm::Rms => 0.0,
        };
        let ms = row.iter().map(|v| (v.to_f64() - mean) * (v.to_f64() - mean)).sum::<f64>() / d;
        (mean, 1.0 / libm::sqrt(ms + self.eps))
    }

    /// `y = norm(x) * w' (+ b')`, row by row: `x [tokens, d]`, `y [tokens,
    /// d]` (overwritten).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Input`, `Output`), before anything is
    /// written.
    pub fn forward(&self, x: MatRef<'_, E>, mut y: MatMut<'_, E>) -> Result<()> {
        let (t, d) = (x.rows(), self.dim);
        check_shape(Operand::Input, t, x.cols(), t, d)?;
        check_shape(Operand::Output, y.rows(), y.cols(), t, d)?;
        let (w, b) = (self.weight.as_ref(), self.bias());
        for (i, out) in y.row_iter_mut().enumerate() {
            let row = x.row(i);
            let (mean, r) = self.stats(row);
            for (j, (o, v)) in out.iter_mut().zip(row).enumerate() {
                let xhat = (v.to_f64() - mean) * r;
                let shift = b.and_then(|b| b.get(j)).map_or(0.0, |b| b.to_f64());
                *o = E::from_f64(xhat * w.get(j).map_or(0.0, |w| w.to_f64()) + shift);
            }
        }
        Ok(())
    }

    /// Accumulates `dL/dw'` (and `dL/db'`) into `grads` and, when `grad_x`
    /// is given, writes `dL/dx` into it (overwriting), from the forward
    /// input `x [tokens, d]` and `grad_y = dL/dy [tokens, d]` (the formulas
    /// in the module docs).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Input`, `GradOutput`, `GradInput`,
    /// `Gradient` for a buffer of another length or a bias buffer missing
    /// or extra), before anything is written.
    pub fn backward(
        &self,
        x: MatRef<'_, E>,
        grad_y: MatRef<'_, E>,
        mut grad_x: Option<MatMut<'_, E>>,
        grads: LnTuningGrads<'_, E>,
    ) -> Result<()> {
        let (t, d) = (x.rows(), self.dim);
        check_shape(Operand::Input, t, x.cols(), t, d)?;
        check_shape(Operand::GradOutput, grad_y.rows(), grad_y.cols(), t, d)?;
        if let Some(gx) = &grad_x {
            check_shape(Operand::GradInput, gx.rows(), gx.cols(), t, d)?;
        }
        let LnTuningGrads { weight: gw, mut bias } = grads;
        check_len(Operand::Gradient, d, gw.len())?;
        let want_bias = if self.bias.is_some() { d } else { 0 };
        check_len(Operand::Gradient, want_bias, bias.as_ref().map_or(0, |g| g.len()))?;
        let w = self.weight.as_ref();
        let centred = self.norm == Norm::Layer;
        for i in 0..t {
            let (row, g) = (x.row(i), grad_y.row(i));
            let (mean, r) = self.stats(row);
            let xhat = |j: usize| row.get(j).map_or(0.0, |v| (v.to_f64() - mean) * r);
            for (j, gv) in g.iter().enumerate() {
                if let Some(a) = gw.get_mut(j) {
                    *a = E::from_f64(a.to_f64() + gv.to_f64() * xhat(j));
                }
                if let Some(a) = bias.as_deref_mut().and_then(|b| b.get_mut(j)) {
                    *a = E::from_f64(a.to_f64() + gv.to_f64());
                }
            }
            let Some(gx) = grad_x.as_mut() else { continue };
            // g = G * w'; mean(g) (LayerNorm only) and mean(g xhat).
            let gw_j = |j: usize| g.get(j).map_or(0.0, |v| v.to_f64()) * w.get(j).map_or(0.0, |v| v.to_f64());
            let dn = d as f64;
            let g_mean = if centred { (0..d).map(gw_j).sum::<f64>() / dn } else { 0.0 };
            let gx_mean = (0..d).map(|j| gw_j(j) * xhat(j)).sum::<f64>() / dn;
            for (j, o) in gx.row_mut(i).iter_mut().enumerate() {
                *o = E::from_f64(r * (gw_j(j) - g_mean - xhat(j) * gx_mean));
            }
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>> WeightUpdate<E> for LnTuning<E, S> {
    /// `(d, 1)`: the norm's weight as a column, so that its bias `[d]` is
    /// the bias of the same rows.
    fn weight_dims(&self) -> (usize, usize) {
        (self.dim, 1)
    }

    /// [`UpdateKind::Replacement`]: the values are the adapter's.
    fn kind(&self) -> UpdateKind {
        UpdateKind::Replacement
    }

    /// When the adapter has a bias.
    fn touches_bias(&self) -> bool {
        self.bias.is_some()
    }

    /// `2 rows`: the originals of the weight's and the bias's rows, kept
    /// by the merge for the unmerge (saturating).
    fn update_scratch_len(&self, rows: usize) -> usize {
        rows.saturating_mul(2)
    }

    /// Merge: the block's values (and the bias's) go to the front of the
    /// scratch and the adapter's take their place. Unmerge: the scratch's
    /// are put back, bit for bit (the scratch must be the merge's, handed
    /// back unchanged).
    fn run_update<B: Backend<E> + ?Sized>(&self, _backend: &B, block: UpdateBlock<'_, E>) -> Outcome<E, B> {
        let UpdateBlock { start, mut block, bias, direction, scratch } = block;
        let n = block.rows();
        let (kept_w, rest) = scratch.split_at_mut(n.min(scratch.len()));
        let kept_b = rest.get_mut(..n).unwrap_or(&mut []);
        let own_w = self.weight.as_ref().get(start..).unwrap_or(&[]);
        let own_b = self.bias().and_then(|b| b.get(start..)).unwrap_or(&[]);
        for k in 0..n {
            let Some(v) = block.row_mut(k).first_mut() else { continue };
            swap_in(v, kept_w.get_mut(k), own_w.get(k), direction);
        }
        if let Some(b) = bias {
            for (k, v) in b.iter_mut().enumerate() {
                swap_in(v, kept_b.get_mut(k), own_b.get(k), direction);
            }
        }
        Ok(())
    }
}

/// One element of a replacement: on merge `kept <- v, v <- own`; on
/// unmerge `v <- kept`.
fn swap_in<E: Copy>(v: &mut E, kept: Option<&mut E>, own: Option<&E>, direction: Direction) {
    match (direction, kept) {
        (Direction::Merge, Some(k)) => {
            *k = *v;
            if let Some(o) = own {
                *v = *o;
            }
        }
        (Direction::Unmerge, Some(k)) => *v = *k,
        (_, None) => {}
    }
}

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>> LnTuning<E, S> {
    /// Initializes as PEFT does: a copy of the base layer's `weight [d]`
    /// (and `bias [d]`), so the adapted layer is the base exactly.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Weight`, `Bias`) for tensors of another
    /// length, or a bias given to an adapter without one (or none to one
    /// with), before anything is written.
    pub fn init_from_base(&mut self, weight: &[E], bias: Option<&[E]>) -> Result<()> {
        check_len(Operand::Weight, self.dim, weight.len())?;
        let have = self.bias.is_some();
        check_len(Operand::Bias, usize::from(have) * self.dim, bias.map_or(0, <[E]>::len))?;
        self.weight.as_mut().copy_from_slice(weight);
        if let (Some(own), Some(b)) = (self.bias.as_mut(), bias) {
            own.as_mut().copy_from_slice(b);
        }
        Ok(())
    }

    /// `(w', b')` mutably, for an optimizer step or a load.
    pub fn params_mut(&mut self) -> (&mut [E], Option<&mut [E]>) {
        (self.weight.as_mut(), self.bias.as_mut().map(AsMut::as_mut))
    }
}
