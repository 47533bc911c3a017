//! Helpers shared by the integration tests that read the PEFT fixture.
#![allow(dead_code)] // each test file uses a part

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

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

/// Every tensor of a safetensors file as f32 (F32/F16/BF16), read with the
/// `safetensors` crate (independent of this crate's reader).
pub fn load(path: &Path) -> HashMap<String, (Dtype, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let data = match v.dtype() {
                Dtype::F32 => v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
                Dtype::F16 => {
                    v.data().chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
                }
                Dtype::BF16 => {
                    v.data().chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
                }
                d => panic!("{d:?}"),
            };
            (k, (v.dtype(), v.shape().to_vec(), data))
        })
        .collect()
}

/// `max |got - want| / max |want|`: the relative error of a tensor.
pub fn max_rel(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(f64::from(v.abs())));
    got.iter().zip(want).fold(0.0f64, |m, (g, w)| m.max(f64::from((g - w).abs()))) / scale
}
