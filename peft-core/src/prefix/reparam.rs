//! PEFT's prefix reparameterization (`prefix_projection=True`): (its docs are in the [parent module](super))

use super::PrefixConfig;
use crate::adapter::add_colsum;
use crate::backend::{Accum, Backend, Op, Outcome};
use crate::element::{Element, Real};
use crate::error::{Error, Operand, Result, check_len, check_scratch, scratch_pair};
use crate::matrix::{MatMut, MatRef, checked_len};
use crate::rng::Rng;

/// The encoder's parameters (borrowed mutably), or their gradients.
#[derive(Debug)]
pub struct EncoderParams<'p, E> {
    /// `E [n_prefix, d]`.
    pub embedding: &'p mut [E],
    /// `W1 [hidden, d]`.
    pub w1: &'p mut [E],
    /// `b1 [hidden]`.
    pub b1: &'p mut [E],
    /// `W2 [n_layers * 2 * w, hidden]`.
    pub w2: &'p mut [E],
    /// `b2 [n_layers * 2 * w]`.
    pub b2: &'p mut [E],
}

/// Gradient buffers of the encoder, accumulated into (`+=`); same shapes.
pub type EncoderGrads<'g, E> = EncoderParams<'g, E>;

/// The MLP that produces every layer's prefix from a small embedding.
#[derive(Debug)]
pub struct PrefixEncoder<'a, E> {
    p: EncoderParams<'a, E>,
    cfg: PrefixConfig,
    d: usize,
    hidden: usize,
}

impl<E> EncoderParams<'_, E> {
    fn check(&self, cfg: &PrefixConfig, d: usize, hidden: usize) -> Result<()> {
        let out = cfg.row_width();
        check_len(Operand::PrefixEncoder, checked_len(cfg.n_prefix(), d)?, self.embedding.len())?;
        check_len(Operand::PrefixEncoder, checked_len(hidden, d)?, self.w1.len())?;
        check_len(Operand::PrefixEncoder, hidden, self.b1.len())?;
        check_len(Operand::PrefixEncoder, checked_len(out, hidden)?, self.w2.len())?;
        check_len(Operand::PrefixEncoder, out, self.b2.len())
    }
}

/// Scratch [`PrefixEncoder::forward`] needs: `n_prefix * hidden`
/// (saturating). A `const fn`, for buffers sized at compile time.
pub const fn forward_scratch_len(n_prefix: usize, hidden: usize) -> usize {
    n_prefix.saturating_mul(hidden)
}

/// Scratch [`PrefixEncoder::backward`] needs: `2 * n_prefix * hidden`
/// (saturating).
pub const fn backward_scratch_len(n_prefix: usize, hidden: usize) -> usize {
    forward_scratch_len(n_prefix, hidden).saturating_mul(2)
}

impl<'a, E: Element> PrefixEncoder<'a, E> {
    /// Wraps parameters for embedding width `d` and MLP width `hidden`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`"embedding width"`, `"encoder hidden
    /// size"`) for zero; [`Error::ShapeMismatch`] (`PrefixEncoder`).
    pub fn new(cfg: PrefixConfig, d: usize, hidden: usize, params: EncoderParams<'a, E>) -> Result<Self> {
        if d == 0 {
            return Err(Error::InvalidParameter { name: "embedding width", rule: "must be positive" });
        }
        if hidden == 0 {
            return Err(Error::InvalidParameter { name: "encoder hidden size", rule: "must be positive" });
        }
        params.check(&cfg, d, hidden)?;
        Ok(Self { p: params, cfg, d, hidden })
    }

    /// PyTorch's defaults, as PEFT gets them: `E ~ N(0, 1)`
    /// (`nn.Embedding`), each `Linear`'s weight and bias
    /// `~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
    pub fn init(&mut self, rng: &mut Rng) {
        rng.fill_normal(self.p.embedding, 1.0);
        let b1 = 1.0 / libm::sqrt(self.d as f64);
        rng.fill_uniform(self.p.w1, -b1, b1);
        rng.fill_uniform(self.p.b1, -b1, b1);
        let b2 = 1.0 / libm::sqrt(self.hidden as f64);
        rng.fill_uniform(self.p.w2, -b2, b2);
        rng.fill_uniform(self.p.b2, -b2, b2);
    }

    /// The parameters, mutably.
    pub fn params_mut(&mut self) -> &mut EncoderParams<'a, E> {
        &mut self.p
    }

    /// Trainable parameters of the encoder.
    pub fn num_params(&self) -> usize {
        self.p.embedding.len() + self.p.w1.len() + self.p.b1.len() + self.p.w2.len() + self.p.b2.len()
    }

    /// Scratch [`forward`](Self::forward) needs: `n_prefix * hidden`.
    pub fn forward_scratch_len(&self) -> usize {
        forward_scratch_len(self.cfg.n_prefix(), self.hidden)
    }

    /// Scratch [`backward`](Self::backward) needs: `2 * n_prefix * hidden`.
    pub fn backward_scratch_len(&self) -> usize {
        backward_scratch_len(self.cfg.n_prefix(), self.hidden)
    }

    /// `kv = tanh(E W1^T + b1) W2^T + b2`, written into `kv` (the plain
    /// prefix of every layer; this is also how the MLP is collapsed for
    /// deployment).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Prefix`), [`Error::ScratchTooSmall`];
    /// nothing is written.
    pub fn forward<B: Backend<E> + ?Sized>(&self, backend: &B, kv: &mut [E], scratch: &mut [E]) -> Outcome<E, B> {
        check_len(Operand::Prefix, self.cfg.len(), kv.len())?;
        let need = self.forward_scratch_len();
        check_scratch(need, scratch.len())?;
        let (a_buf, _) = scratch.split_at_mut(need);
        let mut a = MatMut::new(a_buf, self.cfg.n_prefix(), self.hidden)?;
        self.hidden_layer(backend, &mut a)?;
        let out = MatMut::new(kv, self.cfg.n_prefix(), self.cfg.row_width())?;
        self.output_layer(backend, a.as_ref(), out)
    }

    /// `a = tanh(E W1^T + b1)`.
    fn hidden_layer<B: Backend<E> + ?Sized>(&self, backend: &B, a: &mut MatMut<'_, E>) -> Outcome<E, B> {
        let one = <E::Accum as Element>::from_f64(1.0);
        let emb = MatRef::new(self.p.embedding, self.cfg.n_prefix(), self.d)?;
        let w1 = MatRef::new(self.p.w1, self.hidden, self.d)?;
        backend.gemm(a.rb_mut(), Accum::Replace, emb, Op::N, w1, Op::T, one)?;
        for row in a.row_iter_mut() {
            for (v, &b) in row.iter_mut().zip(self.p.b1.iter()) {
                *v = E::from_accum((v.to_accum() + b.to_accum()).tanh());
            }
        }
        Ok(())
    }

    /// `out = a W2^T + b2`.
    fn output_layer<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        a: MatRef<'_, E>,
        mut out: MatMut<'_, E>,
    ) -> Outcome<E, B> {
        let one = <E::Accum as Element>::from_f64(1.0);
        let w2 = MatRef::new(self.p.w2, self.cfg.row_width(), self.hidden)?;
        backend.gemm(out.rb_mut(), Accum::Replace, a, Op::N, w2, Op::T, one)?;
        for row in out.row_iter_mut() {
            for (v, &b) in row.iter_mut().zip(self.p.b2.iter()) {
                *v = E::from_accum(v.to_accum() + b.to_accum());
            }
        }
        Ok(())
    }

    /// Accumulates the gradients of all five parameters given
    /// `grad_kv = dL/dkv [n_prefix, n_layers * 2 * w]` (e.g. the buffer
    /// that every layer's [`PrefixConfig::layer_grads`] wrote into).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Prefix`, `PrefixEncoder`),
    /// [`Error::ScratchTooSmall`]; nothing is written.
    pub fn backward<B: Backend<E> + ?Sized>(
        &self,
        backend: &B,
        grad_kv: &[E],
        grads: EncoderGrads<'_, E>,
        scratch: &mut [E],
    ) -> Outcome<E, B> {
        check_len(Operand::Prefix, self.cfg.len(), grad_kv.len())?;
        grads.check(&self.cfg, self.d, self.hidden)?;
        let need = self.backward_scratch_len();
        check_scratch(need, scratch.len())?;
        let (n, h, o) = (self.cfg.n_prefix(), self.hidden, self.cfg.row_width());
        let one = <E::Accum as Element>::from_f64(1.0);
        let (a_buf, da_buf) = scratch_pair(scratch, need / 2)?;
        let mut a = MatMut::new(a_buf, n, h)?;
        let mut da = MatMut::new(da_buf, n, h)?;
        self.hidden_layer(backend, &mut a)?;
        let g = MatRef::new(grad_kv, n, o)?;
        // db2 += colsum(G); dW2 += G^T a; da = G W2.
        add_colsum(grads.b2, &g, one);
        backend.gemm(MatMut::new(grads.w2, o, h)?, Accum::Add, g, Op::T, a.as_ref(), Op::N, one)?;
        let w2 = MatRef::new(self.p.w2, o, h)?;
        backend.gemm(da.rb_mut(), Accum::Replace, g, Op::N, w2, Op::N, one)?;
        // dz = da * (1 - a^2), into da.
        for (d_row, a_row) in da.row_iter_mut().zip(a.as_ref().row_iter()) {
            for (d, &av) in d_row.iter_mut().zip(a_row) {
                let t = av.to_accum();
                *d = E::from_accum(d.to_accum() * (<E::Accum as Real>::ONE - t * t));
            }
        }
        let dz = da.as_ref();
        // db1 += colsum(dz); dW1 += dz^T E; dE += dz W1.
        add_colsum(grads.b1, &dz, one);
        let emb = MatRef::new(self.p.embedding, n, self.d)?;
        backend.gemm(MatMut::new(grads.w1, h, self.d)?, Accum::Add, dz, Op::T, emb, Op::N, one)?;
        let w1 = MatRef::new(self.p.w1, h, self.d)?;
        backend.gemm(MatMut::new(grads.embedding, n, self.d)?, Accum::Add, dz, Op::N, w1, Op::N, one)?;
        Ok(())
    }
}
