//! LoKr (LyCORIS): a Kronecker product of two factors, each full or low
//! rank, as PEFT's `lokr.Linear` computes it.
//!
//! ```text
//! dW = s kron(W1, W2)          W1 [a, c], W2 [b, d], out = a b, in = c d, s = alpha / r (always)
//! dW[i b + k, j d + l] = s W1[i, j] W2[k, l]
//! W1 = lokr_w1,  or lokr_w1_a [a, r] @ lokr_w1_b [r, c]
//! W2 = lokr_w2,  or lokr_w2_a [b, r] @ lokr_w2_b [r, d]
//! y  = x W^T + b + x dW^T      merged: W' = W + dW, b' = b
//! ```
//!
//! [`factorization`] is PEFT's (LyCORIS') split of a dimension. As PEFT,
//! the passes form `dW` in scratch. The backward, with `Gd = G^T x`:
//!
//! ```text
//! dW1[i, j] = s sum_{k,l} Gd[i b + k, j d + l] W2[k, l]
//! dW2[k, l] = s sum_{i,j} Gd[i b + k, j d + l] W1[i, j]
//! (low rank: dW_a = dW W_b^T, dW_b = W_a^T dW)      dx = G W + G dW
//! ```
//!
//! [`Layout::of`] is PEFT's choice of factor shapes and forms for a layer;
//! [`Lokr::init_adapter`] its fresh adapter (`W1 = 0`, so `dW = 0`).
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

/// PEFT's (LyCORIS') `factorization(n, f)`: `(m, k)` with `m k = n`,
/// `m <= k` (unless `f` divides `n`: then `(f, n / f)`), `m` as large as
/// the loop below allows and at most `f` (`f = -1`: no bound).
///
/// ```text
/// if f > 0 and n % f == 0: return f, n // f
/// if f == -1: f = n
/// m, k = 1, n
/// while m < k:
///     m2 = m + 1
///     while n % m2 != 0: m2 += 1
///     if m2 + n // m2 > 1 + n or m2 > f: break
///     m, k = m2, n // m2
/// return (k, m) if m > k else (m, k)
/// ```
///
/// `factorization(64, -1) = (8, 8)`, `(48, -1) = (6, 8)`, `(96, -1) = (8,
/// 12)`, `(64, 16) = (16, 4)`. `n = 0` gives `(0, 0)`.
pub fn factorization(n: usize, f: i64) -> (usize, usize) {
    if n == 0 {
        return (0, 0);
    }
    if f > 0 && n.is_multiple_of(f as usize) {
        return (f as usize, n / f as usize);
    }
    let f = if f == -1 { n } else { f.max(0) as usize };
    let (mut m, mut k) = (1usize, n);
    while m < k {
        let mut m2 = m + 1;
        while !n.is_multiple_of(m2) {
            m2 += 1;
        }
        if m2 + n / m2 > 1 + n || m2 > f {
            break;
        }
        m = m2;
        k = n / m2;
    }
    if m > k { (k, m) } else { (m, k) }
}

/// The factor shapes and forms PEFT gives a linear layer `in -> out`
/// (`LoKrLayer.update_layer`): `(a, b) = factorization(out, f)`, `(c, d) =
/// factorization(in, f)`, `W1 [a, c]`, `W2 [b, d]`;
///
/// ```text
/// W1 low rank  iff  decompose_both and r < max(a, c) / 2
/// W2 low rank  iff  r < max(b, d) / 2
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// `(a, c)`: `W1 [a, c]`.
    pub d1: (usize, usize),
    /// `(b, d)`: `W2 [b, d]`.
    pub d2: (usize, usize),
    /// Whether `W1` is stored as `lokr_w1_a @ lokr_w1_b`.
    pub w1_low_rank: bool,
    /// Whether `W2` is stored as `lokr_w2_a @ lokr_w2_b`.
    pub w2_low_rank: bool,
}

impl Layout {
    /// PEFT's layout for `in -> out` at rank `rank` (see the type docs);
    /// `decompose_factor` is `f` (`-1`: none).
    pub fn of(
        in_features: usize,
        out_features: usize,
        rank: usize,
        decompose_both: bool,
        decompose_factor: i64,
    ) -> Self {
        let (a, b) = factorization(out_features, decompose_factor);
        let (c, d) = factorization(in_features, decompose_factor);
        // `r < max / 2` in Python's true division: `2 r < max`.
        let below = |m: usize| rank.saturating_mul(2) < m;
        Self { d1: (a, c), d2: (b, d), w1_low_rank: decompose_both && below(a.max(c)), w2_low_rank: below(b.max(d)) }
    }

    /// The stored tensors' lengths, `W1`'s then `W2`'s (one each for a
    /// full factor, two for a low-rank one), as PEFT names them:
    /// `lokr_w1` or `lokr_w1_a`, `lokr_w1_b`; then `W2`'s.
    pub fn tensors(&self, rank: usize) -> impl Iterator<Item = (&'static str, [usize; 2])> {
        let ((a, c), (b, d)) = (self.d1, self.d2);
        let w1: [Option<(&'static str, [usize; 2])>; 2] = if self.w1_low_rank {
            [Some(("lokr_w1_a", [a, rank])), Some(("lokr_w1_b", [rank, c]))]
        } else {
            [Some(("lokr_w1", [a, c])), None]
        };
        let w2: [Option<(&'static str, [usize; 2])>; 2] = if self.w2_low_rank {
            [Some(("lokr_w2_a", [b, rank])), Some(("lokr_w2_b", [rank, d]))]
        } else {
            [Some(("lokr_w2", [b, d])), None]
        };
        w1.into_iter().chain(w2).flatten()
    }
}

/// One Kronecker factor: a full matrix `[rows, cols]`, or `A [rows, r] @ B
/// [r, cols]`.
#[derive(Clone, Debug)]
pub enum Factor<S> {
    /// The matrix itself.
    Full(S),
    /// Its low-rank form `(A, B)`.
    LowRank(S, S),
}

/// A LoKr adapter for a linear layer `in -> out`.
#[derive(Clone, Debug)]
pub struct Lokr<E, S> {
    w1: Factor<S>,
    w2: Factor<S>,
    /// `(a, c)`: `W1 [a, c]`.
    d1: (usize, usize),
    /// `(b, d)`: `W2 [b, d]`.
    d2: (usize, usize),
    rank: usize,
    scale: f64,
    _element: PhantomData<fn() -> E>,
}

/// Gradient buffers of a LoKr adapter, in the factors' own forms,
/// accumulated into (`+=`).
#[derive(Debug)]
pub struct LokrGrads<'g, E> {
    /// `W1`'s gradient: one buffer, or two for the low-rank form.
    pub w1: Factor<&'g mut [E]>,
    /// `W2`'s gradient.
    pub w2: Factor<&'g mut [E]>,
}

impl<E: Element, S: AsRef<[E]>> Lokr<E, S> {
    /// A LoKr adapter with `W1 [a, c]` and `W2 [b, d]` (`d1 = (a, c)`,
    /// `d2 = (b, d)`), low-rank factors of rank `config.rank`;
    /// `s = alpha / r`.
    ///
    /// # Errors
    /// [`Error::InvalidRank`] for rank 0, [`Error::InvalidAlpha`],
    /// [`Error::InvalidParameter`] for rsLoRA; [`Error::ShapeMismatch`]
    /// (`Parameter`) for a factor of the wrong length.
    pub fn new(
        config: &LoraConfig<'_>,
        d1: (usize, usize),
        d2: (usize, usize),
        w1: Factor<S>,
        w2: Factor<S>,
    ) -> Result<Self> {
        if config.use_rslora {
            return Err(Error::InvalidParameter { name: "use_rslora", rule: "does not apply to LoKr" });
        }
        if config.rank == 0 {
            return Err(Error::InvalidRank { rank: 0, max: usize::MAX });
        }
        if !config.alpha.is_finite() || config.alpha == 0.0 {
            return Err(Error::InvalidAlpha);
        }
        let r = config.rank;
        for (f, (rows, cols)) in [(&w1, d1), (&w2, d2)] {
            match f {
                Factor::Full(m) => check_len(Operand::Parameter, checked_len(rows, cols)?, m.as_ref().len())?,
                Factor::LowRank(a, b) => {
                    check_len(Operand::Parameter, checked_len(rows, r)?, a.as_ref().len())?;
                    check_len(Operand::Parameter, checked_len(r, cols)?, b.as_ref().len())?;
                }
            }
        }
        Ok(Self { w1, w2, d1, d2, rank: r, scale: config.alpha / r as f64, _element: PhantomData })
    }

    /// `(out, in) = (a b, c d)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.d1.0 * self.d2.0, self.d1.1 * self.d2.1)
    }

    /// The scale `s = alpha / r`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// The full `W1` and `W2` into `m1 [a c]`, `m2 [b d]`.
    fn full<B: Backend<E> + ?Sized>(&self, backend: &B, m1: &mut [E], m2: &mut [E]) -> Outcome<E, B> {
        let one = <E::Accum as Element>::from_f64(1.0);
        for (f, (rows, cols), dst) in [(&self.w1, self.d1, m1), (&self.w2, self.d2, m2)] {
            match f {
                Factor::Full(m) => {
                    dst.iter_mut().zip(m.as_ref()).for_each(|(d, v)| *d = *v);
                }
                Factor::LowRank(a, b) => {
                    let (a, b) = (MatRef::new(a.as_ref(), rows, self.rank)?, MatRef::new(b.as_ref(), self.rank, cols)?);
                    backend.gemm(MatMut::new(dst, rows, cols)?, Accum::Replace, a, Op::N, b, Op::N, one)?;
                }
            }
        }
        Ok(())
    }

    /// `dw = s kron(m1, m2)` from the full factors.
    fn kron_into(&self, dw: &mut [E], m1: &[E], m2: &[E]) -> Result<()> {
        let ((_, c), (b, d)) = (self.d1, self.d2);
        let (_, i) = self.dims();
        for (idx, v) in dw.iter_mut().enumerate() {
            let (row, col) = (idx / i.max(1), idx % i.max(1));
            let w1 = m1.get((row / b) * c + col / d).map_or(0.0, |x| x.to_f64());
            let w2 = m2.get((row % b) * d + col % d).map_or(0.0, |x| x.to_f64());
            *v = E::from_f64(self.scale * w1 * w2);
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>> LinearAdapter<E> for Lokr<E, S> {
    type Grads<'g>
        = LokrGrads<'g, E>
    where
        E: 'g;

    fn in_features(&self) -> usize {
        self.dims().1
    }

    fn out_features(&self) -> usize {
        self.dims().0
    }

    /// `out in + a c + b d` (`dW` is formed whole), whatever the tokens.
    fn forward_scratch_len(&self, _tokens: usize) -> usize {
        let (o, i) = self.dims();
        o.saturating_mul(i).saturating_add(self.d1.0 * self.d1.1).saturating_add(self.d2.0 * self.d2.1)
    }

    /// Twice [`forward_scratch_len`](Self::forward_scratch_len).
    fn backward_scratch_len(&self, tokens: usize) -> usize {
        self.forward_scratch_len(tokens).saturating_mul(2)
    }

    /// Each factor's gradient of the factor's form and lengths
    /// (`Gradient`).
    fn check_grads(&self, grads: &LokrGrads<'_, E>) -> Result<()> {
        let r = self.rank;
        for (g, f, (rows, cols)) in [(&grads.w1, &self.w1, self.d1), (&grads.w2, &self.w2, self.d2)] {
            match (g, f) {
                (Factor::Full(g), Factor::Full(_)) => check_len(Operand::Gradient, rows * cols, g.len())?,
                (Factor::LowRank(ga, gb), Factor::LowRank(..)) => {
                    check_len(Operand::Gradient, rows * r, ga.len())?;
                    check_len(Operand::Gradient, r * cols, gb.len())?;
                }
                _ => return Err(Error::ShapeMismatch { operand: Operand::Gradient, expected: 0, found: 1 }),
            }
        }
        Ok(())
    }

    /// `y = x W^T + b + x dW^T`.
    fn run_forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        pass: ForwardPass<'_, E, B, L>,
    ) -> Outcome<E, B> {
        let ForwardPass { backend, base, x, mut y, scratch } = pass;
        let (o, i) = self.dims();
        base.forward(backend, x, y.rb_mut())?;
        let (dw, rest) = scratch.split_at_mut(o * i);
        self.delta_rows(backend, 0, MatMut::new(&mut *dw, o, i)?, Accum::Replace, 1.0, rest)?;
        backend.gemm(y, Accum::Add, x, Op::N, MatRef::new(dw, o, i)?, Op::T, <E::Accum as Element>::from_f64(1.0))
    }

    /// Accumulates the factors' gradients and, if `grad_x` is given,
    /// writes `dL/dx = G W + G dW` (formulas in the [module docs](self)).
    fn run_backward<B, L>(&self, pass: BackwardPass<'_, E, B, L, Self::Grads<'_>>) -> Outcome<E, B>
    where
        B: Backend<E> + ?Sized,
        L: FrozenLinear<E> + ?Sized,
    {
        let BackwardPass { backend, base, x, grad_y, grad_x, grads, scratch } = pass;
        let ((o, i), r) = (self.dims(), self.rank);
        let ((a, c), (b, d)) = (self.d1, self.d2);
        let (n1, n2) = (a * c, b * d);
        let (gd, rest) = scratch.split_at_mut(o * i);
        let (m1, rest) = rest.split_at_mut(n1);
        let (m2, rest) = rest.split_at_mut(n2);
        let (g1, rest) = rest.split_at_mut(n1);
        let (g2, _) = rest.split_at_mut(n2);
        let one = <E::Accum as Element>::from_f64(1.0);
        backend.gemm(MatMut::new(&mut *gd, o, i)?, Accum::Replace, grad_y, Op::T, x, Op::N, one)?;
        self.full(backend, m1, m2)?;
        let s = self.scale;
        let at = |v: &[E], k: usize| v.get(k).map_or(0.0, |x| x.to_f64());
        for ii in 0..a {
            for j in 0..c {
                let mut acc = 0.0;
                for k in 0..b {
                    for l in 0..d {
                        acc += at(gd, (ii * b + k) * i + j * d + l) * at(m2, k * d + l);
                    }
                }
                if let Some(v) = g1.get_mut(ii * c + j) {
                    *v = E::from_f64(s * acc);
                }
            }
        }
        for k in 0..b {
            for l in 0..d {
                let mut acc = 0.0;
                for ii in 0..a {
                    for j in 0..c {
                        acc += at(gd, (ii * b + k) * i + j * d + l) * at(m1, ii * c + j);
                    }
                }
                if let Some(v) = g2.get_mut(k * d + l) {
                    *v = E::from_f64(s * acc);
                }
            }
        }
        // Chain to the factors' own forms.
        for (grad, factor, dfull, (rows, cols)) in
            [(grads.w1, &self.w1, &*g1, self.d1), (grads.w2, &self.w2, &*g2, self.d2)]
        {
            let dm = MatRef::new(dfull, rows, cols)?;
            match (grad, factor) {
                (Factor::Full(g), _) => {
                    g.iter_mut().zip(dfull).for_each(|(g, v)| *g = E::from_f64(g.to_f64() + v.to_f64()))
                }
                (Factor::LowRank(ga, gb), Factor::LowRank(fa, fb)) => {
                    let (fa, fb) = (MatRef::new(fa.as_ref(), rows, r)?, MatRef::new(fb.as_ref(), r, cols)?);
                    backend.gemm(MatMut::new(ga, rows, r)?, Accum::Add, dm, Op::N, fb, Op::T, one)?;
                    backend.gemm(MatMut::new(gb, r, cols)?, Accum::Add, fa, Op::T, dm, Op::N, one)?;
                }
                _ => {}
            }
        }
        if let Some(mut gx) = grad_x {
            // dW in Gd's buffer, which is no longer needed.
            self.kron_into(gd, m1, m2)?;
            base.apply_transpose(backend, grad_y, gx.rb_mut(), Accum::Replace)?;
            backend.gemm(gx, Accum::Add, grad_y, Op::N, MatRef::new(gd, o, i)?, Op::N, one)?;
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>> DeltaRows<E> for Lokr<E, S> {
    /// `(out, in) = (a b, c d)`.
    fn delta_dims(&self) -> (usize, usize) {
        self.dims()
    }

    /// `a c + b d` (the full factors), whatever the rows.
    fn delta_scratch_len(&self, _rows: usize) -> usize {
        (self.d1.0 * self.d1.1).saturating_add(self.d2.0 * self.d2.1)
    }

    /// Rows `start..start + n` of `factor * s kron(W1, W2)` into `dst [n,
    /// in]` (what a streaming merge needs); scratch `a c + b d`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`]: `Weight` for rows past `out`, `Dst` for a
    /// `dst` of another width; [`Error::ScratchTooSmall`]; all before
    /// anything is written; the backend's own errors.
    fn fill_delta_rows<B: Backend<E> + ?Sized>(&self, backend: &B, block: DeltaBlock<'_, E>) -> Outcome<E, B> {
        let DeltaBlock { start, mut dst, accum, factor, scratch } = block;
        let (n1, n2) = (self.d1.0 * self.d1.1, self.d2.0 * self.d2.1);
        let (m1, rest) = scratch.split_at_mut(n1);
        let (m2, _) = rest.split_at_mut(n2);
        self.full(backend, m1, m2)?;
        let ((_, c), (b, d)) = (self.d1, self.d2);
        let s = factor * self.scale;
        for (row_idx, row) in dst.row_iter_mut().enumerate() {
            let (ii, k) = ((start + row_idx) / b, (start + row_idx) % b);
            for (col, v) in row.iter_mut().enumerate() {
                let (j, l) = (col / d, col % d);
                let w1 = m1.get(ii * c + j).map_or(0.0, |x| x.to_f64());
                let w2 = m2.get(k * d + l).map_or(0.0, |x| x.to_f64());
                let x = s * w1 * w2;
                accum.store_f64(v, x);
            }
        }
        Ok(())
    }
}

crate::delta::additive_update!([E: Element, S: AsRef<[E]>] Lokr<E, S>);

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>> Lokr<E, S> {
    /// Initializes as PEFT does (`reset_adapter_parameters`): `W1 = 0`
    /// (full: `lokr_w1 = 0`; low rank: `lokr_w1_a = 0`, `lokr_w1_b`
    /// Kaiming-uniform), `W2`'s tensors Kaiming-uniform
    /// (`U(-1/sqrt(fan_in), 1/sqrt(fan_in))`, fan_in = the tensor's
    /// columns). `dW = 0`.
    pub fn init_adapter(&mut self, rng: &mut Rng) {
        let r = self.rank;
        let kaiming = |rng: &mut Rng, t: &mut [E], fan_in: usize| {
            let bound = 1.0 / libm::sqrt(fan_in.max(1) as f64);
            rng.fill_uniform(t, -bound, bound);
        };
        match &mut self.w1 {
            Factor::Full(m) => m.as_mut().fill(E::ZERO),
            Factor::LowRank(a, b) => {
                a.as_mut().fill(E::ZERO);
                kaiming(rng, b.as_mut(), self.d1.1);
            }
        }
        match &mut self.w2 {
            Factor::Full(m) => kaiming(rng, m.as_mut(), self.d2.1),
            Factor::LowRank(a, b) => {
                kaiming(rng, a.as_mut(), r);
                kaiming(rng, b.as_mut(), self.d2.1);
            }
        }
    }

    /// The factors mutably, for an optimizer step or a load.
    pub fn factors_mut(&mut self) -> (&mut Factor<S>, &mut Factor<S>) {
        (&mut self.w1, &mut self.w2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::DeltaRows;

    use crate::backend::Reference;

    #[test]
    fn layout_is_pefts() {
        // The fixtures' modules (CASES.md): r = 4, q_proj 64 -> 64 has both
        // full; fc1 64 -> 96 has W2 = [12, 8] low rank (4 < 12 / 2).
        let q = Layout::of(64, 64, 4, false, -1);
        assert_eq!((q.d1, q.d2, q.w1_low_rank, q.w2_low_rank), ((8, 8), (8, 8), false, false));
        let fc1 = Layout::of(64, 96, 4, false, -1);
        assert_eq!((fc1.d1, fc1.d2, fc1.w1_low_rank, fc1.w2_low_rank), ((8, 8), (12, 8), false, true));
        // decompose_both, f = 16, r = 2 (the second fixture's fc1): W1 [16, 16] low rank.
        let both = Layout::of(64, 96, 2, true, 16);
        assert_eq!((both.d1, both.d2, both.w1_low_rank, both.w2_low_rank), ((16, 16), (6, 4), true, true));
        let want = [("lokr_w1_a", [16, 2]), ("lokr_w1_b", [2, 16]), ("lokr_w2_a", [6, 2]), ("lokr_w2_b", [2, 4])];
        assert!(both.tensors(2).eq(want));
    }

    #[test]
    fn factorization_is_pefts() {
        // The values CASES.md lists, from PEFT's own function.
        assert_eq!(factorization(64, -1), (8, 8));
        assert_eq!(factorization(48, -1), (6, 8));
        assert_eq!(factorization(96, -1), (8, 12));
        assert_eq!(factorization(64, 16), (16, 4));
        assert_eq!(factorization(48, 16), (16, 3));
        assert_eq!(factorization(96, 16), (16, 6));
    }

    /// Row blocks of the delta (a streaming merge's) are the delta's rows,
    /// also when a block starts inside a `W2`-high band of rows.
    #[test]
    fn delta_rows_are_the_deltas_rows() {
        // W1 [2, 1], W2 [3, 2] low rank (r 1): out 6, in 2.
        let l = Lokr::new(
            &LoraConfig::new(1, 2.0),
            (2, 1),
            (3, 2),
            Factor::Full(&[1.5f64, -2.0][..]),
            Factor::LowRank(&[1.0, 2.0, -1.0][..], &[0.5, 3.0][..]),
        )
        .unwrap();
        let (mut whole, mut parts) = ([0.25f64; 12], [0.25f64; 12]);
        let mut sc = [0.0; 8];
        l.delta_rows(&Reference, 0, MatMut::new(&mut whole, 6, 2).unwrap(), Accum::Add, 1.0, &mut sc).unwrap();
        for (start, n) in [(0, 2), (2, 3), (5, 1)] {
            let dst = MatMut::new(&mut parts[start * 2..(start + n) * 2], n, 2).unwrap();
            l.delta_rows(&Reference, start, dst, Accum::Add, 1.0, &mut sc).unwrap();
        }
        assert_eq!(whole, parts);
        // Row 4 = W1[1] W2[1]: s (-2) (2 * [0.5, 3]) = 2 * -2 * [1, 6] = [-4, -24].
        assert_eq!(&whole[8..10], &[0.25 - 4.0, 0.25 - 24.0]);
    }

    #[test]
    fn kron_by_hand() {
        // W1 = [[1, 2]] (1 x 2), W2 = [[3], [4]] (2 x 1), s = 2 (alpha 2, r 1):
        // kron = [[3, 6], [4, 8]] -> dW = [[6, 12], [8, 16]].
        let l = Lokr::new(
            &LoraConfig::new(1, 2.0),
            (1, 2),
            (2, 1),
            Factor::Full(&[1.0f64, 2.0][..]),
            Factor::Full(&[3.0, 4.0][..]),
        )
        .unwrap();
        let mut dw = [0.0; 4];
        let mut sc = [0.0; 4];
        l.delta_rows(&Reference, 0, MatMut::new(&mut dw, 2, 2).unwrap(), Accum::Replace, 1.0, &mut sc).unwrap();
        assert_eq!(dw, [6.0, 12.0, 8.0, 16.0]);
    }
}
