//! Helpers shared by the integration tests that read the PEFT fixture.
#![allow(dead_code)] // each test file uses a part

use std::path::PathBuf;

/// The adapter folder (and base, and references) PEFT 0.21.2 wrote: see
/// `tests/fixtures/peft/README.md`.
pub fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft/lora_qv")
}

/// A fresh, empty scratch folder for one test (per process and name).
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("peft-test-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}
