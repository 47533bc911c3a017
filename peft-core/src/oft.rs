//! OFT (Qiu et al., 2023; Liu et al., 2024): block-diagonal rotations of a
//! frozen layer's inputs, as PEFT's `oft.Linear` computes them, with the
//! Cayley-Neumann series or the exact Cayley transform, COFT's
//! projection, and one block shared by all.
//!
//! ```text
//! in = r b: r blocks of b inputs; oft_R [r_s, b(b-1)/2], r_s = r (or 1 with block_share)
//! Q_k [b, b]: Q[i, j] = v_k[(i, j)], Q[j, i] = -v_k[(i, j)] for i < j
//!             ((i, j) in torch.triu_indices(b, b, 1) order: row-major strict upper triangle)
//! COFT (eps):  eps' = eps / sqrt(r_s); ||Q_k||_F > eps'  =>  Q_k <- eps' Q_k / ||Q_k||_F
//! Neumann, T terms:  R = I + 2Q + 2Q^2 + ... + 2Q^(m-1) + Q^m, m = T - 1
//!                    (T = 1: I; T = 2: I + 2Q; T = 3 is evaluated as T = 4, PEFT's loop)
//! exact:             R = (I - Q)(I + Q)^-1
//! y = (x R_bd) W0^T + b,  R_bd = diag(R_0, ..., R_{r-1})
//! merged: W0' = W0 R_bd^T (row blocks w_k -> w_k R_k^T), b' = b; unmerge: w_k -> w_k R_k^-T
//! ```
//!
//! The two forms rotate in opposite directions for the same vector: the
//! series approximates `(I + Q)(I - Q)^-1 = R_exact^T`, as in PEFT. The
//! series is not exactly orthogonal, so the unmerge inverts each block (as
//! PEFT's `torch.linalg.inv`) rather than transposing it.
//!
//! The backward, with `G = dL/dy` and `g = G W0` (`dL/dz`, `z = x R_bd`):
//!
//! ```text
//! D_k = dL/dR_k = x_k^T g_k       (block_share: D = sum_k D_k)
//! dx_k = g_k R_k^T
//! Neumann:  dL/dQ = sum_d c_d sum_{a < d} (Q^T)^a D (Q^T)^(d-1-a)
//! exact:    dL/dQ = -(I + R)^T D (I + Q)^-T
//! dL/dv[(i, j)] = dL/dQ[i, j] - dL/dQ[j, i]
//! ```
//!
//! COFT's projection is outside the gradient, as in PEFT (a
//! `torch.no_grad()` copy into the parameter): the gradient is the one at
//! the projected vector. PEFT also writes the projection back into the
//! parameter on every pass; here the stored vector is left as it is and
//! projected where it is used, which gives the same passes and merges (a
//! saved COFT vector is already inside its ball).
//!
//! PEFT's fresh adapter is `v = 0`: `R = I` exactly, the base output. The
//! rotations are built in the element type by the backend's gemm (each
//! product summed in the element's accumulation type, as PEFT's `bmm`),
//! and so are the blocks' products with the inputs.
//! `module_dropout` (PEFT's `MultiplicativeDropoutLayer`) is never called
//! by PEFT 0.21's `Linear.forward`, so it has no counterpart here.
use core::marker::PhantomData;

use crate::backend::Op;
use crate::backend::{Accum, Backend, Outcome};
use crate::base::FrozenLinear;
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len, split_scratch};
use crate::lora::ParamReport;
use crate::matrix::{MatMut, MatRef, checked_len};
use crate::method::{BackwardPass, Direction, ForwardPass, LinearAdapter, UpdateBlock, UpdateKind, WeightUpdate};

/// How a skew-symmetric `Q` becomes a block's rotation (PEFT's
/// `use_cayley_neumann` and `num_cayley_neumann_terms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cayley {
    /// The truncated series `I + 2Q + 2Q^2 + ... + Q^m` of `terms` terms
    /// (PEFT's default, 5).
    Neumann {
        /// `num_cayley_neumann_terms`, at least 1.
        terms: usize,
    },
    /// `(I - Q)(I + Q)^-1`, by Gauss-Jordan elimination with partial
    /// pivoting.
    Exact,
}

impl Cayley {
    /// The series' highest power `m` (0 for the exact transform).
    fn degree(self) -> usize {
        match self {
            Cayley::Neumann { terms: 0..=1 } | Cayley::Exact => 0,
            Cayley::Neumann { terms: 2 } => 1,
            Cayley::Neumann { terms: 3 } => 3,
            Cayley::Neumann { terms } => terms - 1,
        }
    }

    /// The coefficient of `Q^d` in the series, `1 <= d <= m`: 2, except 1
    /// for the last power when there are three terms or more.
    fn coef(self, d: usize) -> f64 {
        match self {
            Cayley::Neumann { terms } if terms >= 3 && d == self.degree() => 1.0,
            _ => 2.0,
        }
    }
}

/// One OFT layer's settings, as PEFT's `OFTConfig` resolves them for a
/// layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OftSpec {
    /// The block size `b` (a divisor of `in`).
    pub block: usize,
    /// PEFT's `block_share`: one block for all `in / b`.
    pub shared: bool,
    /// The series or the exact transform.
    pub cayley: Cayley,
    /// COFT's `eps`, when `coft` is set.
    pub coft_eps: Option<f64>,
}

/// An OFT adapter for a linear layer `in -> out`: `oft_R [r_s,
/// b(b-1)/2]`.
#[derive(Clone, Debug)]
pub struct Oft<E, S> {
    v: S,
    spec: OftSpec,
    blocks: usize,
    in_features: usize,
    out_features: usize,
    _element: PhantomData<fn() -> E>,
}

/// `a[i, j]` of an `n x n` row-major matrix, as `f64` (0 past the end).
pub(crate) fn at<E: Element>(a: &[E], n: usize, i: usize, j: usize) -> f64 {
    a.get(i * n + j).map_or(0.0, |x| x.to_f64())
}

/// `out = s op(a) op(b)` for `n x n` matrices through the backend's gemm
/// (summed in `E`'s accumulation type).
#[allow(clippy::too_many_arguments)]
pub(crate) fn prod<E: Element, B: Backend<E> + ?Sized>(
    backend: &B,
    out: &mut [E],
    a: &[E],
    ta: bool,
    b: &[E],
    tb: bool,
    n: usize,
    s: f64,
) -> Outcome<E, B> {
    let op = |t: bool| if t { Op::T } else { Op::N };
    let (dst, lhs, rhs) = (MatMut::new(out, n, n)?, MatRef::new(a, n, n)?, MatRef::new(b, n, n)?);
    backend.gemm(dst, Accum::Replace, lhs, op(ta), rhs, op(tb), <E::Accum as Element>::from_f64(s))
}

/// `out += s a` elementwise.
pub(crate) fn add<E: Element>(out: &mut [E], a: &[E], s: f64) {
    for (o, x) in out.iter_mut().zip(a) {
        *o = E::from_f64(o.to_f64() + s * x.to_f64());
    }
}

/// `m <- I` (`n x n`).
pub(crate) fn identity<E: Element>(m: &mut [E], n: usize) {
    for (idx, x) in m.iter_mut().take(n * n).enumerate() {
        *x = if idx % (n + 1) == 0 { E::from_f64(1.0) } else { E::ZERO };
    }
}

/// `inv <- m^-1` by Gauss-Jordan with partial pivoting (`m` is consumed),
/// or [`Error::InvalidParameter`] naming the tensor `name` for a singular
/// block.
pub(crate) fn invert<E: Element>(m: &mut [E], inv: &mut [E], n: usize, name: &'static str) -> Result<()> {
    let singular = Error::InvalidParameter { name, rule: "gives a singular rotation block" };
    identity(inv, n);
    for col in 0..n {
        let pivot =
            (col..n).max_by(|&a, &b| at(m, n, a, col).abs().total_cmp(&at(m, n, b, col).abs())).ok_or(singular)?;
        let p = at(m, n, pivot, col);
        if p == 0.0 || !p.is_finite() {
            return Err(singular);
        }
        for mat in [&mut *m, &mut *inv] {
            for j in 0..n {
                let (a, b) = (col * n + j, pivot * n + j);
                if a != b && a < mat.len() && b < mat.len() {
                    mat.swap(a, b);
                }
            }
            for x in mat.iter_mut().skip(col * n).take(n) {
                *x = E::from_f64(x.to_f64() / p);
            }
        }
        for row in (0..n).filter(|&row| row != col) {
            let f = at(m, n, row, col);
            if f == 0.0 {
                continue;
            }
            for mat in [&mut *m, &mut *inv] {
                for j in 0..n {
                    let pv = at(mat, n, col, j);
                    if let Some(x) = mat.get_mut(row * n + j) {
                        *x = E::from_f64(x.to_f64() - f * pv);
                    }
                }
            }
        }
    }
    Ok(())
}

/// The `n x n` slots of a workspace: the rotation, `Q` (the skew matrix),
/// and two more (OFT's and BOFT's).
pub(crate) struct Slots<'w, E> {
    pub(crate) r: &'w mut [E],
    pub(crate) q: &'w mut [E],
    pub(crate) a: &'w mut [E],
    pub(crate) b: &'w mut [E],
}

impl<'w, E: Element> Slots<'w, E> {
    /// Four slots of `n2` elements from the front of `ws`, and the rest.
    pub(crate) fn split(ws: &'w mut [E], n2: usize) -> Result<(Self, &'w mut [E])> {
        let (r, rest) = split_scratch(ws, n2)?;
        let (q, rest) = split_scratch(rest, n2)?;
        let (a, rest) = split_scratch(rest, n2)?;
        let (b, rest) = split_scratch(rest, n2)?;
        Ok((Self { r, q, a, b }, rest))
    }

    /// The exact Cayley transform of the skew matrix in `q` (`n x n`):
    /// `a = I + Q`, `b = a^-1`, `r = (I - Q) b`, written as `a = -Q b`,
    /// `r = b + a` (OFT's exact form and every BOFT block).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] naming `name` when `I + Q` is singular;
    /// the backend's own errors.
    pub(crate) fn cayley_exact<B: Backend<E> + ?Sized>(
        &mut self,
        backend: &B,
        n: usize,
        name: &'static str,
    ) -> Outcome<E, B> {
        identity(self.a, n);
        add(self.a, self.q, 1.0);
        invert(self.a, self.b, n, name)?;
        prod(backend, self.a, self.q, false, self.b, false, n, -1.0)?;
        self.r.copy_from_slice(self.b);
        add(self.r, self.a, 1.0);
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>> Oft<E, S> {
    /// An OFT adapter over `v [r_s, b(b-1)/2]` (`r_s = in / b`, or 1 when
    /// shared), which keeps its values.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a block size of 0 or one that does
    /// not divide `in` (`oft_block_size`), a series of no terms
    /// (`num_cayley_neumann_terms`) or a COFT `eps` not positive and finite
    /// (`eps`); [`Error::ShapeMismatch`] (`Parameter`) for `v` of the wrong
    /// length; [`Error::Overflow`].
    pub fn new(spec: OftSpec, in_features: usize, out_features: usize, v: S) -> Result<Self> {
        let b = spec.block;
        if b == 0 || !in_features.is_multiple_of(b) {
            return Err(Error::InvalidParameter { name: "oft_block_size", rule: "must be a positive divisor of in" });
        }
        if spec.cayley == (Cayley::Neumann { terms: 0 }) {
            return Err(Error::InvalidParameter { name: "num_cayley_neumann_terms", rule: "must be at least 1" });
        }
        if spec.coft_eps.is_some_and(|e| !(e > 0.0 && e.is_finite())) {
            return Err(Error::InvalidParameter { name: "eps", rule: "must be positive and finite" });
        }
        let blocks = in_features / b;
        let stored = if spec.shared { 1 } else { blocks };
        check_len(Operand::Parameter, checked_len(stored, b * (b - 1) / 2)?, v.as_ref().len())?;
        Ok(Self { v, spec, blocks, in_features, out_features, _element: PhantomData })
    }

    /// `oft_R` `[r_s, b(b-1)/2]`.
    pub fn vectors(&self) -> &[E] {
        self.v.as_ref()
    }

    /// The settings.
    pub fn spec(&self) -> OftSpec {
        self.spec
    }

    /// The number of blocks `r = in / b`.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Trainable (`r_s b(b-1)/2`) and frozen (the base's) parameter counts.
    ///
    /// # Errors
    /// [`Error::Overflow`].
    pub fn param_report(&self, bias: bool) -> Result<ParamReport> {
        ParamReport::over_base(self.v.as_ref().len(), self.in_features, self.out_features, bias)
    }

    /// The stored blocks `r_s`.
    fn stored(&self) -> usize {
        if self.spec.shared { 1 } else { self.blocks }
    }

    /// `b(b-1)/2`, one block's vector length.
    fn n_el(&self) -> usize {
        self.spec.block * (self.spec.block - 1) / 2
    }

    /// `b^2`.
    fn b2(&self) -> usize {
        self.spec.block * self.spec.block
    }

    /// Stored block `k`'s skew-symmetric `Q` into `q` (COFT projected).
    fn skew(&self, k: usize, q: &mut [E]) {
        let (b, n_el) = (self.spec.block, self.n_el());
        let v = self.v.as_ref().iter().skip(k * n_el).take(n_el);
        let scale = match self.spec.coft_eps {
            Some(eps) => {
                let eps = eps / libm::sqrt(self.stored() as f64);
                let norm = libm::sqrt(2.0 * v.clone().map(|x| x.to_f64() * x.to_f64()).sum::<f64>());
                if norm <= eps { 1.0 } else { eps / norm }
            }
            None => 1.0,
        };
        q.iter_mut().take(b * b).for_each(|x| *x = E::ZERO);
        let pairs = (0..b).flat_map(|i| (i + 1..b).map(move |j| (i, j)));
        for ((i, j), x) in pairs.zip(v) {
            let s = x.to_f64() * scale;
            if let Some(e) = q.get_mut(i * b + j) {
                *e = E::from_f64(s);
            }
            if let Some(e) = q.get_mut(j * b + i) {
                *e = E::from_f64(-s);
            }
        }
    }

    /// Stored block `k`'s rotation into `w.r`, with `Q` in `w.q`; the
    /// exact transform leaves `(I + Q)^-1` in `w.b`.
    fn rotation<B: Backend<E> + ?Sized>(&self, backend: &B, k: usize, w: &mut Slots<'_, E>) -> Outcome<E, B> {
        let b = self.spec.block;
        self.skew(k, w.q);
        identity(w.r, b);
        match self.spec.cayley {
            Cayley::Neumann { .. } => {
                // a holds Q^d; b the next power.
                w.a.copy_from_slice(w.q);
                for d in 1..=self.spec.cayley.degree() {
                    if d > 1 {
                        prod(backend, w.b, w.a, false, w.q, false, b, 1.0)?;
                        w.a.copy_from_slice(w.b);
                    }
                    add(w.r, w.a, self.spec.cayley.coef(d));
                }
            }
            Cayley::Exact => w.cayley_exact(backend, b, "oft_R")?,
        }
        Ok(())
    }

    /// `dL/dv` of stored block `k` `+=` from `D = dL/dR` (the module
    /// docs' chain), `w` as [`rotation`](Self::rotation) left it; `work`
    /// `(2 + m) b^2` (two products, the series' powers).
    fn chain<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        (k, w): (usize, &Slots<'_, E>),
        d: &[E],
        work: &mut [E],
        grads: &mut [E],
    ) -> Outcome<E, B> {
        let (b, b2) = (self.spec.block, self.b2());
        let (tmp, rest) = split_scratch(work, b2)?;
        let (dq, pow) = split_scratch(rest, b2)?;
        match self.spec.cayley {
            Cayley::Neumann { .. } => {
                let m = self.spec.cayley.degree();
                // pow[a] = (Q^T)^a, a < m.
                let mut prev: Option<usize> = None;
                for a in 0..m {
                    let (done, rest) = pow.split_at_mut(a * b2);
                    let slot = rest.get_mut(..b2).unwrap_or(&mut []);
                    match prev {
                        None => identity(slot, b),
                        Some(p) => prod(
                            backend,
                            slot,
                            done.get(p * b2..(p + 1) * b2).unwrap_or(&[]),
                            false,
                            w.q,
                            true,
                            b,
                            1.0,
                        )?,
                    }
                    prev = Some(a);
                }
                dq.iter_mut().for_each(|x| *x = E::ZERO);
                let power = |a: usize| pow.get(a * b2..(a + 1) * b2).unwrap_or(&[]);
                for deg in 1..=m {
                    for a in 0..deg {
                        // dq += c (Q^T)^a D (Q^T)^(deg-1-a); the product's second half in f64 per element.
                        prod(backend, tmp, power(a), false, d, false, b, 1.0)?;
                        let right = power(deg - 1 - a);
                        let c = self.spec.cayley.coef(deg);
                        for (idx, o) in dq.iter_mut().take(b2).enumerate() {
                            let (i, j) = (idx / b, idx % b);
                            let s: f64 = (0..b).map(|l| at(tmp, b, i, l) * at(right, b, l, j)).sum();
                            *o = E::from_f64(o.to_f64() + c * s);
                        }
                    }
                }
            }
            Cayley::Exact => {
                // tmp = (I + R)^T D, dq = -tmp (I + Q)^-T.
                prod(backend, tmp, w.r, true, d, false, b, 1.0)?;
                add(tmp, d, 1.0);
                prod(backend, dq, tmp, false, w.b, true, b, -1.0)?;
            }
        }
        let n_el = self.n_el();
        let pairs = (0..b).flat_map(|i| (i + 1..b).map(move |j| (i, j)));
        for ((i, j), g) in pairs.zip(grads.iter_mut().skip(k * n_el).take(n_el)) {
            *g = E::from_f64(g.to_f64() + at(dq, b, i, j) - at(dq, b, j, i));
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>> LinearAdapter<E> for Oft<E, S> {
    /// `dL/dv`, as `oft_R`.
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

    /// `tokens in + 5 b^2` (`x R_bd`, four slots, `R^T`; saturating).
    fn forward_scratch_len(&self, tokens: usize) -> usize {
        tokens.saturating_mul(self.in_features).saturating_add(self.b2().saturating_mul(5))
    }

    /// `tokens in + (7 + m) b^2` (`g`, four slots, `D`, two products, the
    /// series' `m` powers; saturating).
    fn backward_scratch_len(&self, tokens: usize) -> usize {
        let slots = 7usize.saturating_add(self.spec.cayley.degree());
        tokens.saturating_mul(self.in_features).saturating_add(self.b2().saturating_mul(slots))
    }

    /// `oft_R`'s length (`Gradient`).
    fn check_grads(&self, grads: &&mut [E]) -> Result<()> {
        check_len(Operand::Gradient, self.v.as_ref().len(), grads.len())
    }

    /// `y = (x R_bd) W0^T + b`.
    fn run_forward<B: Backend<E> + ?Sized, L: FrozenLinear<E> + ?Sized>(
        &self,
        pass: ForwardPass<'_, E, B, L>,
    ) -> Outcome<E, B> {
        let ForwardPass { backend, base, x, y, scratch } = pass;
        let (t, n, b) = (x.rows(), self.in_features, self.spec.block);
        let (z_buf, rest) = split_scratch(scratch, checked_len(t, n)?)?;
        let (mut w, _) = Slots::split(rest, self.b2())?;
        let mut z = MatMut::new(z_buf, t, n)?;
        let one = <E::Accum as Element>::from_f64(1.0);
        let cols = |j: usize| Error::ShapeMismatch { operand: Operand::Input, expected: (j + 1) * b, found: n };
        for j in 0..self.blocks {
            if j == 0 || !self.spec.shared {
                self.rotation(backend, j, &mut w)?;
            }
            // z_j = x_j R_j.
            let zj = z.cols_range_mut(j * b, b).ok_or(cols(j))?;
            let xj = x.cols_range(j * b, b).ok_or(cols(j))?;
            backend.gemm(zj, Accum::Replace, xj, Op::N, MatRef::new(w.r, b, b)?, Op::N, one)?;
        }
        base.forward(backend, z.as_ref(), y)
    }

    /// Accumulates `dL/dv` into `grads` and, if `grad_x` is given, writes
    /// `dL/dx` (formulas in the [module docs](self)).
    fn run_backward<B, L>(&self, pass: BackwardPass<'_, E, B, L, Self::Grads<'_>>) -> Outcome<E, B>
    where
        B: Backend<E> + ?Sized,
        L: FrozenLinear<E> + ?Sized,
    {
        let BackwardPass { backend, base, x, grad_y, mut grad_x, grads, scratch } = pass;
        let (t, n, b, b2) = (x.rows(), self.in_features, self.spec.block, self.b2());
        let (g_buf, rest) = split_scratch(scratch, checked_len(t, n)?)?;
        let (mut w, rest) = Slots::split(rest, b2)?;
        let (d, rest) = split_scratch(rest, b2)?;
        let (work, _) = split_scratch(rest, checked_len(self.spec.cayley.degree().saturating_add(2), b2)?)?;
        let mut g = MatMut::new(g_buf, t, n)?;
        base.apply_transpose(backend, grad_y, g.rb_mut(), Accum::Replace)?;
        let g = g.as_ref();
        let one = <E::Accum as Element>::from_f64(1.0);
        let cols = |j: usize| Error::ShapeMismatch { operand: Operand::Input, expected: (j + 1) * b, found: n };
        for j in 0..self.blocks {
            if j == 0 || !self.spec.shared {
                self.rotation(backend, j, &mut w)?;
            }
            // D (+)= x_j^T g_j (summed over the blocks when shared).
            let (xj, gj) = (x.cols_range(j * b, b).ok_or(cols(j))?, g.cols_range(j * b, b).ok_or(cols(j))?);
            let acc = if j > 0 && self.spec.shared { Accum::Add } else { Accum::Replace };
            backend.gemm(MatMut::new(d, b, b)?, acc, xj, Op::T, gj, Op::N, one)?;
            // dx_j = g_j R_j^T.
            if let Some(gx) = grad_x.as_mut() {
                let dst = gx.cols_range_mut(j * b, b).ok_or(cols(j))?;
                backend.gemm(dst, Accum::Replace, gj, Op::N, MatRef::new(w.r, b, b)?, Op::T, one)?;
            }
            if !self.spec.shared {
                self.chain(backend, (j, &w), d, work, grads)?;
            }
        }
        if self.spec.shared {
            self.chain(backend, (0, &w), d, work, grads)?;
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]>> WeightUpdate<E> for Oft<E, S> {
    /// `(out, in)`.
    fn weight_dims(&self) -> (usize, usize) {
        (self.out_features, self.in_features)
    }

    /// [`UpdateKind::Multiplicative`]: each row's blocks are multiplied by
    /// `R_k^T`.
    fn kind(&self) -> UpdateKind {
        UpdateKind::Multiplicative
    }

    /// `5 b^2 + b` (four slots, the inverse, one row block).
    fn update_scratch_len(&self, _rows: usize) -> usize {
        self.b2().saturating_mul(5).saturating_add(self.spec.block)
    }

    /// Merge: `w_k -> w_k R_k^T`; unmerge: `w_k -> w_k R_k^-T` (each block
    /// inverted; [`Error::InvalidParameter`] when one is singular).
    fn run_update<B: Backend<E> + ?Sized>(&self, backend: &B, block: UpdateBlock<'_, E>) -> Outcome<E, B> {
        let UpdateBlock { block, direction, scratch, .. } = block;
        self.rotate_rows(backend, block, direction, false, scratch)
    }
}

impl<E: Element, S: AsRef<[E]>> Oft<E, S> {
    /// PEFT's OFT on an embedding table `[vocab, dim]` (`in = dim`): the
    /// looked-up rows are rotated as inputs are, `e -> e R_bd`, so merging
    /// is `E' = E R_bd` (PEFT's `Embedding.merge`, without the transpose
    /// of the linear layer's `W R_bd^T`) and unmerging `E' R_bd^-1`.
    /// `scratch`: [`update_scratch_len`](WeightUpdate::update_scratch_len).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Weight`) for a block of other than `in`
    /// columns; [`Error::ScratchTooSmall`]; [`Error::InvalidParameter`] for
    /// a singular block on unmerge.
    pub fn embedding_rows<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        block: MatMut<'_, E>,
        direction: Direction,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        check_len(Operand::Weight, self.in_features, block.cols())?;
        self.rotate_rows(backend, block, direction, true, scratch)
    }

    /// Each row's blocks `w_k -> w_k X^T` with `X = R_k` (merge) or
    /// `R_k^-1` (unmerge), or `w_k -> w_k X` when `embedding`.
    fn rotate_rows<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        mut block: MatMut<'_, E>,
        direction: Direction,
        embedding: bool,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        let (b, b2) = (self.spec.block, self.b2());
        let (mut w, rest) = Slots::split(scratch, b2)?;
        let (inv, rest) = split_scratch(rest, b2)?;
        let (row, _) = split_scratch(rest, b)?;
        for j in 0..self.blocks {
            if j == 0 || !self.spec.shared {
                self.rotation(backend, j, &mut w)?;
                match direction {
                    Direction::Merge => inv.copy_from_slice(w.r),
                    Direction::Unmerge => {
                        w.a.copy_from_slice(w.r);
                        invert(w.a, inv, b, "oft_R")?;
                    }
                }
                if embedding {
                    w.a.copy_from_slice(inv);
                    for (idx, e) in inv.iter_mut().enumerate() {
                        *e = E::from_f64(at(w.a, b, idx % b, idx / b));
                    }
                }
            }
            // Merge: w'[c] = w . R[c, :]; unmerge: w[k] = w' . R^-1[k, :] (rows of the transposes for an embedding).
            for wr in block.row_iter_mut() {
                let Some(ws) = wr.chunks_exact_mut(b).nth(j) else { continue };
                row.copy_from_slice(ws);
                for (e, m) in ws.iter_mut().zip(inv.chunks_exact(b)) {
                    *e = E::from_f64(row.iter().zip(m).map(|(a, c)| a.to_f64() * c.to_f64()).sum());
                }
            }
        }
        Ok(())
    }
}

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>> Oft<E, S> {
    /// Initializes as PEFT does (`init_weights=True`): `v = 0`, every
    /// block the identity.
    pub fn init_adapter(&mut self) {
        self.v.as_mut().fill(E::ZERO);
    }

    /// `oft_R` mutably, for an optimizer step or a load.
    pub fn vectors_mut(&mut self) -> &mut [E] {
        self.v.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Reference;
    use crate::base::Dense;
    use crate::matrix::MatRef;

    fn spec(cayley: Cayley) -> OftSpec {
        OftSpec { block: 2, shared: false, cayley, coft_eps: None }
    }

    #[test]
    fn one_block_by_hand() {
        // b = 2, v = [t]: Q = [[0, t], [-t, 0]], Q^2 = -t^2 I.
        // Neumann T = 5: R = I + 2Q + 2Q^2 + 2Q^3 + Q^4 = [[1 - 2t^2 + t^4, 2t - 2t^3], [-(2t - 2t^3), ...]].
        // Exact: (I - Q)(I + Q)^-1 = [[1 - t^2, -2t], [2t, 1 - t^2]] / (1 + t^2).
        let t = 0.5f64;
        let w = [1.0f64, 0.0, 0.0, 1.0];
        let base = Dense::new(&w, 2, 2).unwrap();
        let x = MatRef::new(&[1.0, 0.0], 1, 2).unwrap();
        let mut y = [0.0; 2];
        let neumann = Oft::new(spec(Cayley::Neumann { terms: 5 }), 2, 2, [t]).unwrap();
        let mut sc = [0.0; 22];
        assert_eq!(neumann.forward_scratch_len(1), sc.len());
        neumann.forward(&Reference, &base, x, MatMut::new(&mut y, 1, 2).unwrap(), &mut sc).unwrap();
        // x R = first row of R.
        assert_eq!(y, [1.0 - 2.0 * t * t + t.powi(4), 2.0 * t - 2.0 * t.powi(3)]);
        let exact = Oft::new(spec(Cayley::Exact), 2, 2, [t]).unwrap();
        exact.forward(&Reference, &base, x, MatMut::new(&mut y, 1, 2).unwrap(), &mut sc).unwrap();
        let want = [(1.0 - t * t) / (1.0 + t * t), -2.0 * t / (1.0 + t * t)];
        assert!(y.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-15), "{y:?}");
        // COFT with eps 0.1 (one block): ||Q||_F = sqrt(2) t > 0.1, so t -> 0.1 / sqrt 2.
        let coft = OftSpec { coft_eps: Some(0.1), ..spec(Cayley::Neumann { terms: 2 }) };
        let c = Oft::new(coft, 2, 2, [t]).unwrap();
        c.forward(&Reference, &base, x, MatMut::new(&mut y, 1, 2).unwrap(), &mut sc).unwrap();
        assert!((y[1] - 2.0 * 0.1 / 2f64.sqrt()).abs() < 1e-15, "{y:?}");
        // A block size that does not divide the input is refused.
        assert!(matches!(
            Oft::new(OftSpec { block: 3, ..spec(Cayley::Exact) }, 4, 2, [0.0f64; 3]),
            Err(Error::InvalidParameter { name: "oft_block_size", .. })
        ));
    }
}
