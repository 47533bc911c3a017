//! Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020).
//!
//! ```text
//! h = x + scale * (act(x W_down^T + b_down) W_up^T + b_up)
//! x, h [tokens, d]   W_down [m, d]   b_down [m]   W_up [d, m]   b_up [d]
//! ```
//!
//! The residual `x + ...` is part of the layer and cannot be switched off
//! (mistake 8 in `peft_verify::mistakes`: an adapter without it replaces the sublayer's
//! output instead of refining it). `W_up` and `b_up` start at zero, so a
//! fresh adapter returns its input bit for bit.
//!
//! The forward pass and the gradients of all four parameters and of `x`
//! follow, each with its scratch.
//!
//! ## Bottleneck adapter forward pass
//!
//! ```text
//! z = x W_down^T + b_down         [tokens, m]   (scratch)
//! a = act(z)                      [tokens, m]   (in place)
//! h = x + scale * (a W_up^T + b_up)
//! ```
//!
//! Adding an exactly-zero branch leaves `x` bit for bit (including the sign
//! of a zero), so a fresh adapter is the identity exactly.
//!
//! ## Bottleneck adapter backward pass
//!
//! With `z = x W_down^T + b_down`, `a = act(z)`, `h = x + s (a W_up^T + b_up)`
//! and `G = dL/dh` `[tokens, d]`:
//!
//! ```text
//! dL/db_up   = s sum_rows(G)                 [d]
//! dL/dW_up   = s G^T a                       [d, m]
//! dL/da      = s G W_up                      [tokens, m]
//! dL/dz      = dL/da * act'(z)  (elementwise)
//! dL/db_down = sum_rows(dL/dz)               [m]
//! dL/dW_down = (dL/dz)^T x                   [m, d]
//! dL/dx      = G + (dL/dz) W_down            [tokens, d]   (G: the residual path)
//! ```

mod backward;
mod forward;

pub use backward::AdapterGrads;
pub(crate) use backward::add_colsum;

use core::marker::PhantomData;

use crate::activation::Activation;
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len};
use crate::matrix::checked_len;
use crate::rng::Rng;

/// Scratch [`BottleneckAdapter::forward`] needs for `tokens` rows at
/// bottleneck width `m`: `tokens * m` (saturating). A `const fn`, so firmware
/// sizes its buffers at compile time.
pub const fn forward_scratch_len(tokens: usize, m: usize) -> usize {
    tokens.saturating_mul(m)
}

/// Scratch [`BottleneckAdapter::backward`] needs: `2 * tokens * m`
/// (saturating).
pub const fn backward_scratch_len(tokens: usize, m: usize) -> usize {
    tokens.saturating_mul(m).saturating_mul(2)
}

/// The bottleneck width `m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// `m` given directly.
    Explicit(usize),
    /// `m = d / factor` (integer division), the `adapters` library's
    /// `reduction_factor`.
    Reduction(usize),
}

/// How `W_down` is initialized (`b_down`, `W_up`, `b_up` start at zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AdapterInit {
    /// `U(-1/sqrt(d), 1/sqrt(d))`, as PyTorch's default `nn.Linear` init.
    #[default]
    KaimingUniform,
    /// `N(0, 0.02^2)`: the `adapters` library's `init_weights="bert"`.
    Bert,
}

/// Bottleneck adapter hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdapterConfig {
    /// The bottleneck width.
    pub width: Width,
    /// The nonlinearity.
    pub activation: Activation,
    /// The factor on the adapter's branch (1 for Houlsby/Pfeiffer).
    pub scale: f64,
    /// How `W_down` is initialized.
    pub init: AdapterInit,
}

impl AdapterConfig {
    /// Width from a reduction factor, ReLU, scale 1, Kaiming-uniform init.
    pub const fn reduction(factor: usize) -> Self {
        Self {
            width: Width::Reduction(factor),
            activation: Activation::Relu,
            scale: 1.0,
            init: AdapterInit::KaimingUniform,
        }
    }

    /// An explicit width `m`, ReLU, scale 1, Kaiming-uniform init.
    pub const fn width(m: usize) -> Self {
        Self { width: Width::Explicit(m), activation: Activation::Relu, scale: 1.0, init: AdapterInit::KaimingUniform }
    }

    /// Sets the activation.
    pub const fn with_activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }

    /// Sets the branch scale.
    pub const fn with_scale(mut self, scale: f64) -> Self {
        self.scale = scale;
        self
    }

    /// Sets the init of `W_down`.
    pub const fn with_init(mut self, init: AdapterInit) -> Self {
        self.init = init;
        self
    }

    /// The bottleneck width `m` for model width `d`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`"bottleneck width"`) if `m` would be 0
    /// (including a zero reduction factor or a factor above `d`).
    pub fn bottleneck(&self, d: usize) -> Result<usize> {
        let m = match self.width {
            Width::Explicit(m) => m,
            Width::Reduction(f) => d.checked_div(f).unwrap_or(0),
        };
        if m == 0 {
            return Err(Error::InvalidParameter {
                name: "bottleneck width",
                rule: "must be positive (a zero reduction factor, or one above the model width, gives 0)",
            });
        }
        Ok(m)
    }
}

/// A bottleneck adapter: its four tensors and nothing else. All four are
/// trainable; the sublayer it follows is frozen and not its business.
///
/// `S` is the storage of each tensor: `&[E]` to apply an adapter held in
/// flash, `&mut [E]` (or `&mut Vec<E>`, `&mut [E; N]`) to train one in
/// caller buffers, `Vec<E>` (feature `alloc`) to own it. The adapter is
/// `Send` and `Sync` whenever `S` is.
#[derive(Clone, Debug)]
pub struct BottleneckAdapter<E, S> {
    pub(crate) w_down: S,
    pub(crate) b_down: S,
    pub(crate) w_up: S,
    pub(crate) b_up: S,
    pub(crate) dim: usize,
    pub(crate) width: usize,
    pub(crate) activation: Activation,
    pub(crate) scale: f64,
    pub(crate) init: AdapterInit,
    // A type tag only: `Send`/`Sync` follow `S`.
    _element: PhantomData<fn() -> E>,
}

/// The four parameters of an adapter, in storage `S`: what
/// [`BottleneckAdapter::new`] takes, and (as `&mut [E]`) what
/// [`BottleneckAdapter::params_mut`] lends for an optimizer step.
#[derive(Debug)]
pub struct AdapterParams<S> {
    /// `W_down [m, d]`.
    pub w_down: S,
    /// `b_down [m]`.
    pub b_down: S,
    /// `W_up [d, m]`.
    pub w_up: S,
    /// `b_up [d]`.
    pub b_up: S,
}

impl<E: Element, S: AsRef<[E]>> BottleneckAdapter<E, S> {
    /// Wraps parameters for model width `dim`; they keep their values (call
    /// [`init`](Self::init) for a fresh adapter).
    ///
    /// Shapes: `w_down [m, dim]`, `b_down [m]`, `w_up [dim, m]`, `b_up [dim]`
    /// with `m = config.bottleneck(dim)`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a zero width or `dim`, or a
    /// non-finite scale; [`Error::ShapeMismatch`]; [`Error::Overflow`].
    pub fn new(config: &AdapterConfig, dim: usize, params: AdapterParams<S>) -> Result<Self> {
        if dim == 0 {
            return Err(Error::InvalidParameter { name: "model width", rule: "must be positive" });
        }
        if !config.scale.is_finite() {
            return Err(Error::InvalidParameter { name: "adapter scale", rule: "must be finite" });
        }
        let m = config.bottleneck(dim)?;
        let AdapterParams { w_down, b_down, w_up, b_up } = params;
        check_len(Operand::AdapterDown, checked_len(m, dim)?, w_down.as_ref().len())?;
        check_len(Operand::AdapterBias, m, b_down.as_ref().len())?;
        check_len(Operand::AdapterUp, checked_len(dim, m)?, w_up.as_ref().len())?;
        check_len(Operand::AdapterBias, dim, b_up.as_ref().len())?;
        Ok(Self {
            w_down,
            b_down,
            w_up,
            b_up,
            dim,
            width: m,
            activation: config.activation,
            scale: config.scale,
            init: config.init,
            _element: PhantomData,
        })
    }

    /// Model width `d`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Bottleneck width `m`.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Trainable parameters: `2 m d + m + d`.
    pub fn num_params(&self) -> usize {
        let (a, b, c, d) = self.params();
        a.len() + b.len() + c.len() + d.len()
    }

    /// `(W_down, b_down, W_up, b_up)`.
    pub fn params(&self) -> (&[E], &[E], &[E], &[E]) {
        (self.w_down.as_ref(), self.b_down.as_ref(), self.w_up.as_ref(), self.b_up.as_ref())
    }

    /// Gives the storage back.
    pub fn into_params(self) -> AdapterParams<S> {
        AdapterParams { w_down: self.w_down, b_down: self.b_down, w_up: self.w_up, b_up: self.b_up }
    }
}

impl<E: Element, S: AsRef<[E]> + AsMut<[E]>> BottleneckAdapter<E, S> {
    /// A fresh adapter: `W_down` by the configured [`AdapterInit`],
    /// `b_down = 0`, `W_up = 0`, `b_up = 0`, so the adapter is the identity.
    pub fn init(&mut self, rng: &mut Rng) {
        match self.init {
            AdapterInit::KaimingUniform => {
                let bound = 1.0 / libm::sqrt(self.dim as f64);
                rng.fill_uniform(self.w_down.as_mut(), -bound, bound);
            }
            AdapterInit::Bert => rng.fill_normal(self.w_down.as_mut(), 0.02),
        }
        self.b_down.as_mut().fill(E::ZERO);
        self.w_up.as_mut().fill(E::ZERO);
        self.b_up.as_mut().fill(E::ZERO);
    }

    /// The parameters, mutably.
    pub fn params_mut(&mut self) -> AdapterParams<&mut [E]> {
        AdapterParams {
            w_down: self.w_down.as_mut(),
            b_down: self.b_down.as_mut(),
            w_up: self.w_up.as_mut(),
            b_up: self.b_up.as_mut(),
        }
    }
}

#[cfg(test)]
mod tests;
