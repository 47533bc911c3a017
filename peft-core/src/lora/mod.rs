//! LoRA (Hu et al., 2021) and rsLoRA (Kalajdzievski, 2023).
//!
//! A frozen linear layer `y = x W^T + b` gains a trainable low-rank path:
//!
//! ```text
//! y = x W^T + b + s (x A^T) B^T        s = alpha / r   (rsLoRA: alpha / sqrt(r))
//! x [tokens, in]   W [out, in]   b [out]   A [r, in]   B [out, r]   y [tokens, out]
//! ```
//!
//! * [`LoraConfig`]: rank, alpha, scaling, init, target modules; validation.
//! * [`Lora`], the adapter's own tensors (borrowed or owned); the base is a
//!   read-only [`FrozenLinear`](crate::FrozenLinear) argument of every
//!   pass, shared by any number of adapters.
//! * The passes (sections below, each with its derivation) and their
//!   scratch ([`forward_scratch_len`], [`backward_scratch_len`], `const
//!   fn`s).
//! * LoRA's rows of `dW = s B A`, which merge through the one guard
//!   ([`WeightUpdate::merge_into`](crate::method::WeightUpdate::merge_into)).
//! * [`ParamReport`]: trainable versus frozen parameter counts.
//! * [`LoraEmbedding`]: LoRA on an embedding table (PEFT's `lora.Embedding`).
//! * `LoraParams` (feature `alloc`): heap-owned adapter buffers.
//!
//! ## LoRA forward pass
//!
//! ```text
//! y = x W^T + b + s (x A^T) B^T     (t = x A^T is [tokens, r], in scratch)
//! ```
//!
//! The scale multiplies the low-rank path only, never the base output
//! (mistake 3 in `peft_verify::mistakes`, and a bug in at least one
//! published crate). The sum is formed in PEFT's order: base and bias first,
//! then the low-rank term added, then `s lora_bias` (PEFT's `lora_bias`:
//! `lora_B` has a bias, scaled with it). A merged base runs its own forward
//! alone ([`Merged::forward`](crate::method::Merged::forward)). The pass
//! itself is [`LinearAdapter::forward`](crate::method::LinearAdapter::forward)
//! (implemented by [`Lora`]).
//!
//! ## LoRA backward pass
//!
//! With `t = x A^T` `[tokens, r]` and `G = dL/dy` `[tokens, out]`, the
//! forward `y = x W^T + b + s t B^T` gives, element by element
//! (`y_ij = ... + s sum_k t_ik B_jk`, `t_ik = sum_l x_il A_kl`):
//!
//! ```text
//! dL/dB = s G^T t              [out, r]   = s G^T (x A^T)
//! u     = G B                  [tokens, r]
//! dL/dA = s u^T x              [r, in]    = s B^T G^T x
//! dL/dx = G W + s u A          [tokens, in] = G (W + s B A), without forming B A
//! dL/dlb = s sum_t G[t, :]     [out]      (PEFT's lora_bias, when present)
//! ```
//!
//! The mistakes note's `grad_B = (x A^T)^T (s G)` has shape `[r, out]`, the
//! transpose of `B`; the correct `s G^T (x A^T)` is `[out, r]`. Every formula
//! here is checked against central finite differences in f64.
//!
//! There is no `dL/dW` and no `dL/db`: the base is frozen (mistakes 1 and
//! 12 in `peft_verify::mistakes`), and it is a read-only
//! [`FrozenLinear`](crate::base::FrozenLinear) here. The pass itself is
//! [`LinearAdapter::backward`](crate::method::LinearAdapter::backward)
//! (implemented by [`Lora`]).
//!
//! ## LoRA's update for merging: `dW = s B A`, added row block by row block
//!
//! ```text
//! merge:    W[rows] += s B[rows] A        (one gemm with Accum::Add, alpha = s)
//!           b       += s lora_bias        (when the adapter has PEFT's lora_bias)
//! unmerge:  the same with -s, or the backup (bit-exact)
//! ```
//!
//! LoRA is a [`DeltaRows`](crate::delta::DeltaRows), so it merges through the one guard:
//! [`WeightUpdate::merge_into`](crate::method::WeightUpdate::merge_into)
//! returns a [`Merged`](crate::method::Merged) that owns the weight until
//! it is restored (see [`method`](crate::method) for what it prevents and
//! the drift bound without a backup).
//!
//! ## LoRA on an embedding table (PEFT's `lora.Embedding`)
//!
//! ```text
//! E [vocab, dim]   A [r, vocab]   B [dim, r]   ids [n]   y [n, dim]
//! y_t  = E[id_t] + s B A[:, id_t]          (t_k = A[k, id_t]: a lookup, then t B^T)
//! dE   = s (B A)^T                         (merged: E' = E + s (B A)^T)
//! dA[:, id_t] += s (G_t B)^T               dB += s G^T T      (T [n, r] the looked-up rows)
//! ```
//!
//! PEFT stores `lora_embedding_A` and `lora_embedding_B` under those names
//! (no `.weight`), in this layout. Its fresh adapter has `A = 0` and `B`
//! normal, the reverse of a linear layer's, so that `B A = 0` still. The
//! table is frozen: no gradient for it, and ids outside the vocabulary are
//! refused ([`Error::TokenOutOfRange`](crate::Error::TokenOutOfRange)) before anything is written.

mod backward;
mod config;
mod embedding;
mod forward;
mod layer;
mod merge;
#[cfg(feature = "alloc")]
mod owned;
mod params;

pub use backward::LoraGrads;
pub use config::{DEFAULT_TARGET_MODULES, LOW_SAVINGS_RATIO, LoraConfig, LoraInit, module_matches};
pub use embedding::{LoraEmbedding, LoraEmbeddingGrads};
pub use layer::{Lora, backward_scratch_len, forward_scratch_len};
#[cfg(feature = "alloc")]
pub use owned::LoraParams;
pub use params::ParamReport;

#[cfg(test)]
mod tests;
