//! # peft-faer
//!
//! The std side of `peft`. For now it re-exports `peft-core` for hosts; the
//! faer backend, adapter files and the `peft` command build on it.
pub use peft_core as core;
