//! Criterion benches for `peft` (`benches/peft.rs`) and the `ratios`
//! report that prints each speed target as one line (`src/bin/ratios.rs`).
