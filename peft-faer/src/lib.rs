//! # peft-faer
//!
//! The std side of `peft`:
//!
//! * [`backend`]: [`Faer`], `peft-core`'s [`Backend`](peft_core::Backend)
//!   on faer's SIMD matmul (f32, f64), and [`FaerHalf`] for f16/bf16 staged
//!   through f32 and rounded once.
//! * [`hf`]: Hugging Face PEFT adapter directories (read, write, convert),
//!   base checkpoints (single or sharded safetensors) and the streaming
//!   merge behind `peft merge`.
//! * [`io`]: this project's adapter-only files for the tiny model, with
//!   atomic writes.
//! * [`tiny`]: a tiny frozen decoder hosting every method, and [`train`]:
//!   its built-in task and the AdamW trainer behind `peft finetune`.
//!
//! The `peft` command (`src/bin/peft.rs`): `finetune`, `inspect`, `merge`,
//! `convert`.
#![deny(missing_docs)]

pub mod backend;
pub mod hf;
pub mod io;
pub mod tiny;
pub mod train;

pub use backend::{Faer, FaerHalf, HalfError};
pub use peft_core as core;
