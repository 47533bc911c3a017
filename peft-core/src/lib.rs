//! # peft-core
//!
//! The math of parameter-efficient fine-tuning, `#![no_std]`, without a heap
//! and without `unsafe`.
//!
//! At the crate root, the vocabulary every method shares:
//!
//! * [`Element`]: the element types (f32, f64; f16 and bf16 behind the `half`
//!   feature, stored in half precision and computed in f32).
//! * [`MatRef`], [`MatMut`]: checked row-major views over slices.
//! * [`Backend`] (a gemm in faer's sense) and the portable [`Reference`]
//!   backend; [`Error`], the one error type of this crate.
//! * [`Rng`]: a seedable, bit-reproducible PRNG for initialization.
//! * [`FrozenLinear`]: the frozen base, read only and shared by any number
//!   of adapters; [`Dense`] holds `W` as a slice (in flash too).
//!
//! Each method and facility has a module of its own, and each public item
//! one path:
//! * [`method`]: the one trait of every weight-adapting method
//!   ([`LinearAdapter`](method::LinearAdapter): forward, backward, scratch lengths) and of its
//!   merge ([`WeightUpdate`](method::WeightUpdate), with the one guard [`method::Merged`]);
//!   [`delta`]: the additive methods' rows of `dW`.
//! * [`lora`]: LoRA and rsLoRA (and PEFT's `lora_bias`).
//! * [`dora`]: DoRA, LoRA with a learned magnitude per output row; the row
//!   norms of `W + s B A` cached until the adapter changes.
//! * [`ia3`]: (IA)^3, a learned vector scaling a layer's output (or a
//!   feedforward layer's input).
//! * [`loha`]: LoHa, the Hadamard product of two low-rank products.
//! * [`lokr`]: LoKr, the Kronecker product of two (possibly low-rank) factors.
//! * [`adapter`]: bottleneck adapters (Houlsby/Pfeiffer), with [`activation`]s.
//! * [`ln_tuning`]: LN tuning, a norm layer's own weight (and bias) trained in
//!   place of the frozen ones; merged by replacement.
//! * [`trainable_tokens`]: trainable tokens, chosen rows of an embedding table
//!   trained in place of the frozen ones (and of a tied output layer's).
//! * [`prompt`]: prompt tuning (soft prompts prepended to the input embeddings).
//! * [`attention`]: multi-head and grouped-query attention with masks, forward
//!   and backward, optionally with a trainable prefix.
//! * [`prefix`]: prefix tuning: per-layer prefix keys and values, and PEFT's
//!   MLP reparameterization.
//! * [`set`]: several LoRA adapters over one base: named, switched, scaled,
//!   hot-swapped, and mixed-adapter batches (one base gemm, each adapter on
//!   its own rows); a fixed-capacity form without a heap.
//! * [`combine`]: PEFT's weighted combinations of LoRA adapters (`linear`,
//!   `cat`, `svd` without forming the dense delta, `ties`, `dare_linear`,
//!   `dare_ties`, `magnitude_prune`).
//! * [`optim`]: SGD with momentum and AdamW over adapter parameters only,
//!   with global-norm clipping; non-finite steps are refused.
//! * [`format`]: the adapter-only file format, read and written in place.
//!
//! Layouts follow PyTorch and Hugging Face PEFT so files map across without
//! transposes: `W [out, in]`, `A [r, in]`, `B [out, r]`, `x [tokens, in]`,
//! `y [tokens, out]`, all row-major.
//!
//! ## Contracts
//!
//! * Every fallible public function returns [`Result`]; when it returns an
//!   error it has written nothing (heapless's contract).
//! * No function panics on caller input.
//! * Forward, backward and merge never allocate: temporaries come from a
//!   caller-provided scratch slice whose length a `*_scratch_len` function
//!   states.
//! * The frozen base is structural: forward and backward take it as a
//!   read-only [`FrozenLinear`] and have no gradient output for it. Only a
//!   merge writes a base weight, and it changes the type.
//! * A method that runs a [`Backend`] returns the backend's own error type
//!   ([`Backend::Error`], which every [`Error`] converts into).
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

#[cfg(any(test, feature = "alloc"))]
extern crate alloc;

pub mod activation;
pub mod adalora;
pub mod adapter;
pub mod attention;
mod backend;
mod base;
pub mod boft;
pub mod c3a;
pub mod combine;
pub mod delta;
pub mod dora;
mod element;
mod error;
pub mod format;
pub mod fourierft;
pub mod hra;
pub mod ia3;
pub mod ln_tuning;
pub mod loha;
pub mod lokr;
pub mod lora;
mod matrix;
pub mod method;
pub mod miss;
pub mod oft;
pub mod optim;
pub mod prefix;
pub mod prompt;
pub mod randlora;
mod rng;
pub mod road;
pub mod set;
pub mod shira;
pub mod storage;
pub mod trainable_tokens;
pub mod vblora;
pub mod vera;

pub use backend::{Accum, Backend, BackendError, ErrorKind, Op, Outcome, Reference, check_gemm};
pub use base::{Dense, FrozenLinear, Product};
pub use element::{Element, Real};
pub use error::{Error, Operand, Result};
pub use matrix::{MatMut, MatRef, checked_len};
pub use rng::Rng;

/// The README's examples, compiled and run as doctests so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
