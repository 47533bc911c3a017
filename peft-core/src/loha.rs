//! LoHa (Hyeon-Woo et al., FedPara, 2022; LyCORIS): a Hadamard product of
//! two low-rank products, as PEFT's `loha.Linear` computes it.
//!
//! ```text
//! dW = s (W1a W1b) * (W2a W2b)          [out, in]   (elementwise product), s = alpha / r
//! y  = x W^T + b + x dW^T               merged: W' = W + dW, b' = b
//! W1a, W2a [out, r]   W1b, W2b [r, in]
//! ```
//!
//! The rank of `dW` can reach `r^2` with `2 r (in + out)` parameters. Like
//! PEFT, the passes form `dW` (in scratch, `out x in`): there is no cheaper
//! way to apply a Hadamard product of products. The backward, with `P1 =
//! W1a W1b`, `P2 = W2a W2b` and `Gd = G^T x`:
//!
//! ```text
//! M1 = s Gd * P2:   dW1a += M1 W1b^T   dW1b += W1a^T M1
//! M2 = s Gd * P1:   dW2a += M2 W2b^T   dW2b += W2a^T M2
//! dx = G W + G dW
//! ```
//!
//! PEFT's fresh adapter: `W1a`, `W1b`, `W2a` Kaiming-uniform
//! (`U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, `a = sqrt(5)`), `W2b = 0`, so `dW =
//! 0`.
use core::marker::PhantomData;

use crate::backend::{Accum, Backend, Op, Outcome};
use crate::base::FrozenLinear;
use crate::delta::{DeltaBlock, DeltaRows};
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len};
use crate::lora::LoraConfig;
use crate::matrix::{MatMut, MatRef, checked_len};
use crate::method::{BackwardPass, ForwardPass, LinearAdapter};
use crate::rng::Rng;

/// PEFT's names of the four factors, in [`Loha::factors`]' order.
pub const KEYS: [&str; 4] = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"];

/// A LoHa adapter for a linear layer `in -> out`.
#[derive(Clone, Debug)]
pub struct Loha<E, S> {
    w1a: S,
    w1b: S,
    w2a: S,
    w2b: S,
    in_features: usize,
    out_features: usize,
    rank: usize,
    scale: f64,
    _element: PhantomData<fn() -> E>,
}

/// Gradient buffers of a LoHa adapter, accumulated into (`+=`).
#[derive(Debug)]
pub struct LohaGrads<'g, E> {
    /// `dL/dW1a` `[out, r]`.
    pub w1a: &'g mut [E],
    /// `dL/dW1b` `[r, in]`.
    pub w1b: &'g mut [E],
    /// `dL/dW2a` `[out, r]`.
    pub w2a: &'g mut [E],
    /// `dL/dW2b` `[r, in]`.
    pub w2b: &'g mut [E],
}

impl<E: Element, S: AsRef<[E]>> Loha<E, S> {
    /// A LoHa adapter over `[w1a, w1b, w2a, w2b]` (which keep their
    /// values), rank and `alpha` from `config` (`s = alpha / r`; LoHa has
    /// no rsLoRA variant, so `config`'s is refused).
    ///
    /// # Errors
    /// As [`LoraConfig::scale`] (`r = 0`, a non-finite or zero alpha; a rank
    /// above `min(in, out)` is accepted, as PEFT accepts it);
    /// [`Error::InvalidParameter`] for rsLoRA;
    /// [`Error::ShapeMismatch`] (`Parameter`) for a factor of the wrong
    /// length.
    pub fn new(config: &LoraConfig<'_>, in_features: usize, out_features: usize, factors: [S; 4]) -> Result<Self> {
        if config.use_rslora {
            return Err(Error::InvalidParameter { name: "use_rslora", rule: "does not apply to LoHa" });
        }
        // Any r >= 1, as PEFT accepts it: the Hadamard product of two rank-r
        // products has rank up to r^2, so r above min(in, out) still
        // parameterizes a full-rank dW (LoRA's bound does not apply).
        let scale = config.scale()?;
        let rank = config.rank;
        let [w1a, w1b, w2a, w2b] = factors;
        let (na, nb) = (checked_len(out_features, rank)?, checked_len(rank, in_features)?);
        for (f, n) in [(&w1a, na), (&w1b, nb), (&w2a, na), (&w2b, nb)] {
            check_len(Operand::Parameter, n, f.as_ref().len())?;
        }
        Ok(Self { w1a, w1b, w2a, w2b, in_features, out_features, rank, scale, _element: PhantomData })
    }

    /// The scale `s = alpha / r`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The factors `[W1a, W1b, W2a, W2b]`.
    pub fn factors(&self) -> [&[E]; 4] {
        [self.w1a.as_ref(), self.w1b.as_ref(), self.w2a.as_ref(), self.w2b.as_ref()]
    }

    fn views(&self) -> Result<[MatRef<'_, E>; 4]> {
        let (o, i, r) = (self.out_features, self.in_features, self.rank);
        Ok([
            MatRef::new(self.w1a.as_ref(), o, r)?,
            MatRef::new(self.w1b.as_ref(), r, i)?,
            MatRef::new(self.w2a.as_ref(), o, r)?,
            MatRef::new(self.w2b.as_ref(), r, i)?,
        ])
    }

    /// `P1 = W1a W1b` and `P2 = W2a W2b` into the two halves of `buf`.
    fn products<B: Backend<E> + ?Sized>(&self, backend: &B, p1: &mut [E], p2: &mut [E]) -> Outcome<E, B> {
        let (o, i) = (self.out_features, self.in_features);
        let one = <E::Accum as Element>::from_f64(1.0);
        let [w1a, w1b, w2a, w2b] = self.views()?;
        backend.gemm(MatMut::new(p1, o, i)?, Accum::Replace, w1a, Op::N, w1b, Op::N, one)?;
        backend.gemm(MatMut::new(p2, o, i)?, Accum::Replace, w2a, Op::N, w2b, Op::N, one)
    }
}

impl<E: Element, S: AsRef<[E]>> LinearAdapter<E> for Loha<E, S> {
    type Grads<'g>
        = LohaGrads<'g, E>
    where
        E: 'g;

    fn in_features(&self) -> usize {
        self.in_features
    }

    fn out_features(&self) -> usize {
        self.out_features
    }

    /// `2 out in` (`dW` is formed whole), whatever the tokens.
    fn forward_scratch_len(&self, _tokens: usize) -> usize {
        self.out_features.saturating_mul(self.in_features).saturating_mul(2)
    }

    /// `4 out in`.
    fn backward_scratch_len(&self, tokens: usize) -> usize {
        self.forward_scratch_len(tokens).saturating_mul(2)
    }

    /// `W1a`, `W2a` `[out, r]`, `W1b`, `W2b` `[r, in]` (`Gradient`).
    fn check_grads(&self, grads: &LohaGrads<'_, E>) -> Result<()> {
        let (o, i, r) = (self.out_features, self.in_features, self.rank);
        let (na, nb) = (checked_len(o, r)?, checked_len(r, i)?);
        for (g, n) in [(&grads.w1a, na), (&grads.w1b, nb), (&grads.w2a, na), (&grads.w2b, nb)] {
            check_len(Operand::Gradient, n, g.len())?;
        }
        Ok(())
    }

    /// `y = x W^T + b + x dW^T`.
    fn run_forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        pass: ForwardPass<'_, E, B, L>,
    ) -> Outcome<E, B> {
        let ForwardPass { backend, base, x, mut y, scratch } = pass;
        let (o, i) = (self.out_features, self.in_features);
        base.forward(backend, x, y.rb_mut())?;
        let (dw, rest) = scratch.split_at_mut(o * i);
        let mut dwm = MatMut::new(dw, o, i)?;
        // P1 in `dw`, P2 in `rest`, then dw = s P1 * P2 in place.
        let p2 = rest.get_mut(..o * i).ok_or(Error::ScratchTooSmall { needed: 2 * o * i, len: o * i })?;
        self.products(backend, dwm.rb_mut().into_slice(), p2)?;
        let s = self.scale;
        for (d, b) in dwm.rb_mut().into_slice().iter_mut().zip(p2.iter()) {
            *d = E::from_f64(s * d.to_f64() * b.to_f64());
        }
        let one = <E::Accum as Element>::from_f64(1.0);
        backend.gemm(y, Accum::Add, x, Op::N, dwm.as_ref(), Op::T, one)
    }

    /// Accumulates the four factors' gradients into `grads` and, if
    /// `grad_x` is given, writes `dL/dx = G W + G dW` into it (formulas in
    /// the [module docs](self)).
    fn run_backward<B, L>(&self, pass: BackwardPass<'_, E, B, L, Self::Grads<'_>>) -> Outcome<E, B>
    where
        B: Backend<E> + ?Sized,
        L: FrozenLinear<E> + ?Sized,
    {
        let BackwardPass { backend, base, x, grad_y, grad_x, grads, scratch } = pass;
        let (o, i, r) = (self.out_features, self.in_features, self.rank);
        let n = o * i;
        let (p1, rest) = scratch.split_at_mut(n);
        let (p2, rest) = rest.split_at_mut(n);
        let (gd, rest) = rest.split_at_mut(n);
        let (m, _) = rest.split_at_mut(n);
        self.products(backend, p1, p2)?;
        let one = <E::Accum as Element>::from_f64(1.0);
        backend.gemm(MatMut::new(&mut *gd, o, i)?, Accum::Replace, grad_y, Op::T, x, Op::N, one)?;
        let s = self.scale;
        let [w1a, w1b, w2a, w2b] = self.views()?;
        let hadamard = |m: &mut [E], a: &[E], b: &[E], s: f64| {
            for ((d, u), v) in m.iter_mut().zip(a).zip(b) {
                *d = E::from_f64(s * u.to_f64() * v.to_f64());
            }
        };
        // M1 = s Gd * P2: dW1a += M1 W1b^T, dW1b += W1a^T M1.
        hadamard(m, gd, p2, s);
        backend.gemm(MatMut::new(grads.w1a, o, r)?, Accum::Add, MatRef::new(m, o, i)?, Op::N, w1b, Op::T, one)?;
        backend.gemm(MatMut::new(grads.w1b, r, i)?, Accum::Add, w1a, Op::T, MatRef::new(m, o, i)?, Op::N, one)?;
        // M2 = s Gd * P1.
        hadamard(m, gd, p1, s);
        backend.gemm(MatMut::new(grads.w2a, o, r)?, Accum::Add, MatRef::new(m, o, i)?, Op::N, w2b, Op::T, one)?;
        backend.gemm(MatMut::new(grads.w2b, r, i)?, Accum::Add, w2a, Op::T, MatRef::new(m, o, i)?, Op::N, one)?;
        // dx = G W + G dW, dW = s P1 * P2.
        if let Some(mut gx) = grad_x {
            hadamard(m, p1, p2, s);
            base.apply_transpose(backend, grad_y, gx.rb_mut(), Accum::Replace)?;
            backend.gemm(gx, Accum::Add, grad_y, Op::N, MatRef::new(m, o, i)?, Op::N, one)?;
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>> DeltaRows<E> for Loha<E, S> {
    /// `(out, in)`.
    fn delta_dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// `2 rows in`.
    fn delta_scratch_len(&self, rows: usize) -> usize {
        rows.saturating_mul(self.in_features).saturating_mul(2)
    }

    /// Rows `start..start + n` of `factor * dW`, `dW = s (W1a W1b) * (W2a
    /// W2b)`, with scratch `2 n in` (not `2 out in`).
    fn fill_delta_rows<B: Backend<E> + ?Sized>(&self, backend: &B, block: DeltaBlock<'_, E>) -> Outcome<E, B> {
        let DeltaBlock { start, mut dst, accum, factor, scratch } = block;
        let (i, n) = (self.in_features, dst.rows());
        let ni = checked_len(n, i)?;
        let (p1, rest) = scratch.split_at_mut(ni);
        let (p2, _) = rest.split_at_mut(ni);
        let one = <E::Accum as Element>::from_f64(1.0);
        let [w1a, w1b, w2a, w2b] = self.views()?;
        let (w1a, w2a) =
            (w1a.rows_range(start, n).ok_or(Error::Overflow)?, w2a.rows_range(start, n).ok_or(Error::Overflow)?);
        backend.gemm(MatMut::new(&mut *p1, n, i)?, Accum::Replace, w1a, Op::N, w1b, Op::N, one)?;
        backend.gemm(MatMut::new(&mut *p2, n, i)?, Accum::Replace, w2a, Op::N, w2b, Op::N, one)?;
        let s = factor * self.scale;
        for (k, row) in dst.row_iter_mut().enumerate() {
            let (r1, r2) = (p1.get(k * i..(k + 1) * i).unwrap_or(&[]), p2.get(k * i..(k + 1) * i).unwrap_or(&[]));
            for ((d, a), b) in row.iter_mut().zip(r1).zip(r2) {
                accum.store_f64(d, s * a.to_f64() * b.to_f64());
            }
        }
        Ok(())
    }
}

crate::delta::additive_update!([E: Element, S: AsRef<[E]>] Loha<E, S>);

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>> Loha<E, S> {
    /// Initializes as PEFT does: `W1a`, `W1b`, `W2a` Kaiming-uniform
    /// (`U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, fan_in = the factor's
    /// columns), `W2b = 0`: `dW = 0`.
    pub fn init_adapter(&mut self, rng: &mut Rng) {
        let (r, i) = (self.rank as f64, self.in_features as f64);
        rng.fill_uniform(self.w1a.as_mut(), -1.0 / libm::sqrt(r), 1.0 / libm::sqrt(r));
        rng.fill_uniform(self.w1b.as_mut(), -1.0 / libm::sqrt(i), 1.0 / libm::sqrt(i));
        rng.fill_uniform(self.w2a.as_mut(), -1.0 / libm::sqrt(r), 1.0 / libm::sqrt(r));
        self.w2b.as_mut().fill(E::ZERO);
    }

    /// The factors mutably, for an optimizer step or a load.
    pub fn factors_mut(&mut self) -> [&mut [E]; 4] {
        [self.w1a.as_mut(), self.w1b.as_mut(), self.w2a.as_mut(), self.w2b.as_mut()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::DeltaRows;

    use crate::backend::Reference;

    /// Row blocks of the delta (a streaming merge's) are the delta's rows.
    #[test]
    fn delta_rows_are_the_deltas_rows() {
        let mut rng = Rng::new(4);
        let mut f = [[0.0f64; 15]; 4];
        f.iter_mut().for_each(|v| rng.fill_uniform(v, -1.0, 1.0));
        // out 5, in 3, r 3: W1a, W2a [5, 3]; W1b, W2b [3, 3] (first 9 values).
        let l = Loha::new(&LoraConfig::new(3, 2.0), 3, 5, [&f[0][..], &f[1][..9], &f[2][..], &f[3][..9]]).unwrap();
        let (mut whole, mut parts) = ([0.5f64; 15], [0.5f64; 15]);
        let mut sc = [0.0; 30];
        l.delta_rows(&Reference, 0, MatMut::new(&mut whole, 5, 3).unwrap(), Accum::Add, 1.0, &mut sc).unwrap();
        for (start, n) in [(0, 1), (1, 3), (4, 1)] {
            let dst = MatMut::new(&mut parts[start * 3..(start + n) * 3], n, 3).unwrap();
            l.delta_rows(&Reference, start, dst, Accum::Add, 1.0, &mut sc).unwrap();
        }
        assert_eq!(whole, parts);
        let past = l.delta_rows(&Reference, 4, MatMut::new(&mut parts[..6], 2, 3).unwrap(), Accum::Add, 1.0, &mut sc);
        assert!(matches!(past, Err(Error::ShapeMismatch { operand: Operand::Weight, expected: 5, found: 6 })));
    }

    #[test]
    fn a_rank_above_min_in_out_is_accepted() {
        // in = out = 1, r = 2, alpha = 2 (s = 1): W1a W1b = 1*3 + 2*4 = 11,
        // W2a W2b = 1*2 + 1*(-1) = 1; dW = s * 11 * 1 = 11.
        let l =
            Loha::new(&LoraConfig::new(2, 2.0), 1, 1, [[1.0f64, 2.0], [3.0, 4.0], [1.0, 1.0], [2.0, -1.0]]).unwrap();
        let mut dw = [0.0f64];
        l.delta_rows(&Reference, 0, MatMut::new(&mut dw, 1, 1).unwrap(), Accum::Replace, 1.0, &mut [0.0; 2]).unwrap();
        assert_eq!(dw, [11.0]);
    }

    #[test]
    fn delta_by_hand() {
        // out 1, in 2, r 1, alpha 2 (s 2): P1 = [1] [2, 3] = [2, 3],
        // P2 = [2] [1, -1] = [2, -2]: dW = 2 [4, -6] = [8, -12].
        let l = Loha::new(&LoraConfig::new(1, 2.0), 2, 1, [&[1.0f64][..], &[2.0, 3.0], &[2.0], &[1.0, -1.0]]).unwrap();
        let mut dw = [0.0; 2];
        let mut sc = [0.0; 4];
        l.delta_rows(&Reference, 0, MatMut::new(&mut dw, 1, 2).unwrap(), Accum::Replace, 1.0, &mut sc).unwrap();
        assert_eq!(dw, [8.0, -12.0]);
    }
}
