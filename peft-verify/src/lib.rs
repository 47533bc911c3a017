//! # peft-verify
//!
//! Checks that any `peft-core` backend keeps the invariants of the methods.
pub use peft_core as core;
