//! # peft-faer
//!
//! The std side of `peft`:
//!
//! * [`Faer`], `peft-core`'s [`Backend`](peft_core::Backend)
//!   on faer's SIMD matmul (f32, f64), and [`FaerHalf`] for f16/bf16 staged
//!   through f32 and rounded once; [`stored`]: `Faer`'s kernels for frozen
//!   bases stored as f16, bf16, int8, Q8_0 or Q4_0.
//! * [`hf`]: Hugging Face PEFT adapter directories (read, write, convert),
//!   base checkpoints (single or sharded safetensors) and the streaming
//!   merge behind `peft merge`.
//! * [`gguf`]: llama.cpp's GGUF files, read as untrusted input; their
//!   block types are `peft-core` storage formats.
//! * [`llama`]: a Llama-architecture decoder (random, or loaded from a
//!   Hugging Face checkpoint) hosting every method, with its backward and
//!   trainer, behind `peft finetune`, `peft forward` and `peft generate`.
//!
//! * [`text`]: tokenizers (`tokenizer.json` or GGUF metadata), chat
//!   templates, sampling, text generation and fine-tuning on JSONL data.
//! * [`files`]: the one way outputs are written: atomically, never over
//!   an input, never over an existing path without `force`, temporaries
//!   cleaned up on failure, on SIGINT/SIGTERM, and (for killed processes)
//!   by the next run.
//!
//! The `peft` command (`src/bin/peft.rs`): `finetune`, `inspect`, `merge`,
//! `quantize`, `combine`, `convert`, `forward`, `generate`, `chat`.
//!
//! # Features
//! Without default features the crate is the backend alone (its
//! dependencies: faer, half and peft-core). `hf` adds [`hf`] and
//! [`files`]; `llama` (which needs `hf`) adds [`llama`]; `cli` (default)
//! adds both and the `peft` command; `text` (which needs `llama`) adds
//! [`text`]; `cli` (default) adds all of them and the `peft` command.
#![deny(missing_docs)]

mod backend;
#[cfg(feature = "hf")]
pub mod files;
#[cfg(feature = "hf")]
pub mod gguf;
#[cfg(feature = "hf")]
pub mod hf;
#[cfg(feature = "llama")]
pub mod llama;
mod pool;
pub mod stored;
#[cfg(feature = "text")]
pub mod text;

pub use backend::{Faer, FaerHalf, HalfError, PAR_MIN_MACS};
