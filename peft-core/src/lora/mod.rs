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
//! * [`layer`]: [`Lora`], the adapter's own tensors (borrowed or owned);
//!   the base is a read-only [`FrozenLinear`](crate::base::FrozenLinear)
//!   argument of every pass, shared by any number of adapters.
//! * [`forward`], [`backward`]: the passes, each with its derivation and
//!   its scratch requirement ([`forward_scratch_len`],
//!   [`backward_scratch_len`], `const fn`s).
//! * [`merge`]: LoRA's rows of `dW = s B A`, which merge through the one
//!   guard ([`WeightUpdate::merge_into`](crate::method::WeightUpdate::merge_into)).
//! * [`params`]: trainable versus frozen parameter counts.
//! * [`embedding`]: LoRA on an embedding table (PEFT's `lora.Embedding`).
//! * `owned` (feature `alloc`): `LoraParams`, heap-owned adapter buffers.

pub mod backward;
pub mod config;
pub mod embedding;
pub mod forward;
pub mod layer;
pub mod merge;
#[cfg(feature = "alloc")]
pub mod owned;
pub mod params;

pub use backward::LoraGrads;
pub use config::{DEFAULT_TARGET_MODULES, LOW_SAVINGS_RATIO, LoraConfig, LoraInit};
pub use embedding::{LoraEmbedding, LoraEmbeddingGrads};
pub use layer::{Lora, backward_scratch_len, forward_scratch_len};
#[cfg(feature = "alloc")]
pub use owned::LoraParams;
pub use params::ParamReport;

#[cfg(test)]
mod tests;
