//! LoRA (Hu et al., 2021) and rsLoRA (Kalajdzievski, 2023).
//!
//! A frozen linear layer `y = x W^T + b` gains a trainable low-rank path:
//!
//! ```text
//! y = x W^T + b + s (x A^T) B^T        s = alpha / r   (rsLoRA: alpha / sqrt(r))
//! x [tokens, in]   W [out, in]   b [out]   A [r, in]   B [out, r]   y [tokens, out]
//! ```
//!
//! * [`config`]: rank, alpha, scaling, init, target modules; validation.
//! * [`layer`]: [`LoraLinear`], which borrows the base weight and the
//!   adapter and tracks whether the adapter is merged.
//! * [`forward`], [`backward`], [`merge`]: the three verbs, each with its
//!   derivation and its scratch requirement.
//! * [`params`]: trainable versus frozen parameter counts.
//! * `owned` (feature `alloc`): `LoraParams`, heap-owned adapter buffers.

pub mod backward;
pub mod config;
pub mod forward;
pub mod layer;
pub mod merge;
#[cfg(feature = "alloc")]
pub mod owned;
pub mod params;

pub use backward::LoraGrads;
pub use config::{DEFAULT_TARGET_MODULES, LOW_SAVINGS_RATIO, LoraConfig, LoraInit};
pub use layer::LoraLinear;
#[cfg(feature = "alloc")]
pub use owned::LoraParams;
pub use params::ParamReport;

#[cfg(test)]
mod tests;
