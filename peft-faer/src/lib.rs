//! # peft-faer
//!
//! The std side of `peft`: [`Faer`], `peft-core`'s [`Backend`](peft_core::Backend)
//! on faer's SIMD matmul (f32, f64) and [`FaerHalf`] for f16/bf16 staged
//! through f32.
#![deny(missing_docs)]

pub mod backend;
pub mod hf;
pub mod io;
pub mod tiny;
pub mod train;

pub use backend::{Faer, FaerHalf};
pub use peft_core as core;
