//! Prefix tuning (Li and Liang, 2021): trainable keys and values prepended
//! in every attention layer.
//!
//! All layers' prefixes live in one matrix in Hugging Face PEFT's layout,
//! the one PEFT saves as `prompt_embeddings`:
//!
//! ```text
//! kv [n_prefix, n_layers * 2 * w]      w = kv_heads * d_head
//! layer l: keys   = kv[:, 2 l w     .. 2 l w + w]
//!          values = kv[:, 2 l w + w .. 2 (l + 1) w]
//! ```
//!
//! (PEFT views its encoder output as `[n_prefix, n_layers * 2, heads,
//! d_head]` and splits the second axis in pairs.) [`PrefixTuning::layer`]
//! returns strided views into it, with no copy, for
//! [`attention::forward`](crate::attention::forward), which extends
//! the mask so every query sees the prefix. The optional MLP
//! reparameterization is [`PrefixEncoder`].
//!
//! ## PEFT's prefix reparameterization (`prefix_projection=True`)
//!
//! PEFT's prefix reparameterization (`prefix_projection=True`):
//!
//! ```text
//! kv = tanh(E W1^T + b1) W2^T + b2
//! E [n_prefix, d]   W1 [hidden, d]   b1 [hidden]   W2 [n_layers * 2 * w, hidden]   b2 [n_layers * 2 * w]
//! ```
//!
//! Training updates `E`, `W1`, `b1`, `W2`, `b2`; for deployment,
//! [`PrefixEncoder::forward`] computes `kv` once and the MLP is dropped
//! (collapsed to the plain prefix of [`PrefixTuning`]).
//!
//! Backward, with `a = tanh(E W1^T + b1)` and `G = dL/dkv`:
//!
//! ```text
//! db2 += colsum(G)     dW2 += G^T a     da = G W2     dz = da * (1 - a^2)
//! db1 += colsum(dz)    dW1 += dz^T E    dE += dz W1
//! ```

mod reparam;

pub use reparam::{EncoderGrads, EncoderParams, PrefixEncoder, backward_scratch_len, forward_scratch_len};

use core::marker::PhantomData;

use crate::attention::{AttentionShape, Prefix, PrefixGrads};
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len};
use crate::matrix::{MatMut, MatRef, checked_len};
use crate::rng::Rng;

/// Sizes of a prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixConfig {
    n_prefix: usize,
    n_layers: usize,
    kv_width: usize,
}

impl PrefixConfig {
    /// `n_prefix` virtual tokens in each of `n_layers` attention layers of
    /// the given shape.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`"n_prefix"`, `"n_layers"`) for zero;
    /// [`Error::Overflow`].
    pub fn new(n_prefix: usize, n_layers: usize, shape: &AttentionShape) -> Result<Self> {
        if n_prefix == 0 {
            return Err(Error::InvalidParameter { name: "n_prefix", rule: "must be positive" });
        }
        if n_layers == 0 {
            return Err(Error::InvalidParameter { name: "n_layers", rule: "must be positive" });
        }
        let cfg = Self { n_prefix, n_layers, kv_width: shape.kv_width() };
        checked_len(n_prefix, checked_len(checked_len(n_layers, 2)?, cfg.kv_width)?)?;
        Ok(cfg)
    }

    /// Virtual tokens per layer.
    pub fn n_prefix(&self) -> usize {
        self.n_prefix
    }

    /// Layers.
    pub fn n_layers(&self) -> usize {
        self.n_layers
    }

    /// `kv_heads * d_head`.
    pub fn kv_width(&self) -> usize {
        self.kv_width
    }

    /// Columns of the prefix matrix: `n_layers * 2 * kv_width`.
    pub fn row_width(&self) -> usize {
        self.n_layers * 2 * self.kv_width
    }

    /// Elements of the prefix matrix (trainable parameters without the MLP).
    pub fn len(&self) -> usize {
        self.n_prefix * self.row_width()
    }

    /// Always `false`: a valid config has at least one parameter.
    pub fn is_empty(&self) -> bool {
        false
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.n_layers {
            return Err(Error::InvalidParameter { name: "layer index", rule: "must be below n_layers" });
        }
        Ok(())
    }

    /// Layer `layer`'s block of a gradient buffer laid out like the prefix,
    /// for [`attention::backward`](crate::attention::backward).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`"layer index"`);
    /// [`Error::ShapeMismatch`] (`Prefix`) for a buffer of the wrong length.
    pub fn layer_grads<'g, E: Element>(&self, grad: &'g mut [E], layer: usize) -> Result<PrefixGrads<'g, E>> {
        self.check_layer(layer)?;
        check_len(Operand::Prefix, self.len(), grad.len())?;
        let all = MatMut::new(grad, self.n_prefix, self.row_width())?;
        let start = layer * 2 * self.kv_width;
        let kv = all.into_cols_range(start, 2 * self.kv_width).ok_or(Error::Overflow)?;
        Ok(PrefixGrads { kv })
    }
}

/// All layers' prefix keys and values in storage `S` (`&[E]` in flash,
/// `&mut [E]` to train, `Vec<E>` to own). `Send` and `Sync` whenever `S` is.
#[derive(Clone, Debug)]
pub struct PrefixTuning<E, S> {
    kv: S,
    cfg: PrefixConfig,
    // A type tag only: `Send`/`Sync` follow `S`.
    _element: PhantomData<fn() -> E>,
}

impl<E: Element, S: AsRef<[E]>> PrefixTuning<E, S> {
    /// Wraps `kv [n_prefix, n_layers * 2 * kv_width]`, keeping its values.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Prefix`).
    pub fn new(cfg: PrefixConfig, kv: S) -> Result<Self> {
        check_len(Operand::Prefix, cfg.len(), kv.as_ref().len())?;
        Ok(Self { kv, cfg, _element: PhantomData })
    }

    /// The sizes.
    pub fn config(&self) -> PrefixConfig {
        self.cfg
    }

    /// The whole prefix matrix.
    pub fn kv(&self) -> &[E] {
        self.kv.as_ref()
    }

    /// Layer `layer`'s prefix keys and values, as strided views.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`"layer index"`).
    pub fn layer(&self, layer: usize) -> Result<Prefix<'_, E>> {
        self.cfg.check_layer(layer)?;
        let all = MatRef::new(self.kv.as_ref(), self.cfg.n_prefix, self.cfg.row_width())?;
        let w = self.cfg.kv_width;
        let start = layer * 2 * w;
        Ok(Prefix {
            keys: all.cols_range(start, w).ok_or(Error::Overflow)?,
            values: all.cols_range(start + w, w).ok_or(Error::Overflow)?,
        })
    }
}

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>> PrefixTuning<E, S> {
    /// PEFT's init without projection: `N(0, 1)` (an `nn.Embedding`).
    pub fn init_normal(&mut self, rng: &mut Rng) {
        rng.fill_normal(self.kv.as_mut(), 1.0);
    }

    /// The whole prefix matrix, mutably (optimizer steps, loads, or
    /// [`PrefixEncoder::forward`] collapsing a reparameterization into it).
    pub fn kv_mut(&mut self) -> &mut [E] {
        self.kv.as_mut()
    }
}

#[cfg(test)]
mod tests;
