//! The properties, one module per method (see the table in the crate docs).

pub mod adapter;
pub mod attention;
pub mod dora;
pub mod embedding;
pub mod errors;
pub mod gemm;
pub mod ia3;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod optim;
pub mod prompt;
pub mod set;
pub mod training;
pub mod vera;

use proptest::prelude::*;

/// `n` values uniform in `[-1, 1)`.
pub fn vals(n: usize) -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(-1.0f64..1.0, n)
}
