//! PEFT's own test matrix (the configs of its `tests/test_custom_models.py`
//! over the Linear and Embedding models), rerun as a user would run it:
//! `tests/fixtures/peft/matrix/` holds what PEFT 0.21.2 wrote for each
//! config (`make.py` there) and, where PEFT merges it, the tensors
//! `merge_and_unload` changed. Every case whose `peft_type` this crate
//! reads merges within 1e-5 relative of PEFT, every other tensor bit for
//! bit the base's; every refusal names the `peft_type` or a field of the
//! adapter's config.
#![cfg(feature = "hf")]

use std::collections::BTreeMap;
use std::path::Path;

use peft_faer::Faer;
use peft_faer::hf::HfAdapter;
use peft_faer::hf::base::Base;
use peft_faer::hf::merge::{MergeOptions, merge};

mod common;
use common::{case_dir, load, max_rel, scratch};

/// The methods this crate merges.
const SUPPORTED: [&str; 18] = [
    "LORA",
    "IA3",
    "LOHA",
    "LOKR",
    "VERA",
    "ADALORA",
    "MISS",
    "HRA",
    "ROAD",
    "C3A",
    "SHIRA",
    "OFT",
    "BOFT",
    "FOURIERFT",
    "RANDLORA",
    "VBLORA",
    "LN_TUNING",
    "TRAINABLE_TOKENS",
];

/// The cases of those methods refused, each with the field its refusal
/// names (README, "PEFT's test matrix", says why): DoRA and VeRA on GPT-2's
/// `Conv1D`, DoRA on an embedding, LoRA on parameters, VB-LoRA on a
/// `Conv1D`.
const REFUSED: [(&str, &str); 6] = [
    ("Embedding + transformers Conv1D 1 DoRA", "`fan_in_fan_out`"),
    ("Embedding + transformers Conv1D 2 DoRA", "`use_dora`"),
    ("Embedding + transformers Conv1D 3 DoRA", "`fan_in_fan_out`"),
    ("MLP 2 using nn.Parameter LoRA", "`target_parameters`"),
    ("Embedding + transformers Conv1D 1 VeRA", "`fan_in_fan_out`"),
    ("Embedding + transformers Conv1D 1 VBLoRA", "`fan_in_fan_out`"),
];

/// Tensors PEFT's merged state dict does not hold under the base's names,
/// by case: LN tuning's `merge_and_unload`
/// (`LNTuningModel._unload_and_optionally_merge`) unwraps its own layers
/// only and leaves a `modules_to_save` module wrapped (its tensors under
/// `<module>.modules_to_save.default.*`), so the fixture's filter (the
/// base's keys that changed) did not record it. The merged model's forward
/// runs the saved copy, which is what this crate writes: those tensors must
/// equal the adapter's saved values bit for bit.
const WRAPPED_IN_PEFT: [(&str, &str); 1] = [("LayerNorm 3 LNTuning", "layernorm1.")];

/// What happened to one case.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Merged, within 1e-5 of PEFT.
    Merged,
    /// Refused, naming the type or a field.
    Refused,
}

/// Runs one case folder; panics on a wrong merge or an unnamed refusal.
fn run(dir: &Path, out: &Path) -> (String, Outcome) {
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    let peft_type = config["peft_type"].as_str().unwrap().to_string();
    let case: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("case.json")).unwrap()).unwrap();
    let (name, model) = (case["name"].as_str().unwrap(), case["model"].as_str().unwrap());
    let base_file = case_dir("matrix").join("base").join(format!("{model}.safetensors"));
    if let Some((_, field)) = REFUSED.iter().find(|(n, _)| *n == name) {
        let e = HfAdapter::read_dir(dir).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains(field), "{name}: expected a refusal naming {field}, got {e:?}");
        return (peft_type, Outcome::Refused);
    }
    let named = |e: &str| {
        e.contains(&peft_type)
            || config.as_object().unwrap().keys().any(|k| e.contains(&format!("`{k}`")) || e.contains(&format!("{k}:")))
    };
    let merged = HfAdapter::read_dir(dir).and_then(|ad| {
        let base = Base::open(&base_file)?;
        merge(&base, &ad, out, &MergeOptions { force: true, ..Default::default() }, &Faer::new(), |_| {})
    });
    if let Err(e) = merged {
        let e = e.to_string();
        assert!(named(&e), "{name} ({peft_type}): refusal names neither the type nor a field: {e}");
        return (peft_type, Outcome::Refused);
    }
    let reference = dir.join("merged.safetensors");
    assert!(reference.exists(), "{name} ({peft_type}): merged here, but PEFT has no merge for it");
    let (got, want, base) = (load(out), load(&reference), load(&base_file));
    let wrapped = WRAPPED_IN_PEFT.iter().find(|(n, _)| *n == name).map(|(_, prefix)| *prefix);
    let saved = load(&dir.join("adapter_model.safetensors"));
    for (param, (_, _, b)) in &base {
        let g = &got[param].2;
        if wrapped.is_some_and(|p| param.starts_with(p)) {
            let s = &saved[&format!("base_model.model.{param}")].2;
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert!(bits(g) == bits(s), "{name} ({peft_type}): {param} is not the saved copy");
            continue;
        }
        match want.get(param) {
            Some((_, _, w)) => {
                let rel = max_rel(g, w);
                assert!(rel <= 1e-5, "{name} ({peft_type}): {param}: relative error {rel:.2e}");
            }
            None => assert!(
                g.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name} ({peft_type}): {param} changed; PEFT left it"
            ),
        }
    }
    (peft_type, Outcome::Merged)
}

#[test]
fn peft_test_matrix_merges_exactly_or_refuses_by_name() {
    let root = case_dir("matrix");
    let out = scratch("peft-matrix").join("merged.safetensors");
    let mut dirs: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("adapter_config.json").exists())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 240, "{} cases", dirs.len());
    let mut tally: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut refused_supported = Vec::new();
    let mut failures = Vec::new();
    for dir in &dirs {
        let (t, outcome) = match std::panic::catch_unwind(|| run(dir, &out)) {
            Ok(r) => r,
            Err(e) => {
                let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
                failures.push(format!("{}: {msg}", dir.file_name().unwrap().to_string_lossy()));
                continue;
            }
        };
        let entry = tally.entry(t.clone()).or_default();
        match outcome {
            Outcome::Merged => entry.0 += 1,
            Outcome::Refused => entry.1 += 1,
        }
        if outcome == Outcome::Refused && SUPPORTED.contains(&t.as_str()) {
            refused_supported.push(dir.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    eprintln!("peft_type: merged, refused");
    for (t, (m, r)) in &tally {
        eprintln!("{t}: {m}, {r}");
    }
    assert!(failures.is_empty(), "{} cases failed:\n{}", failures.len(), failures.join("\n"));
    // Only the listed cases of the supported methods are refused.
    assert_eq!(refused_supported.len(), REFUSED.len(), "supported methods refused: {refused_supported:?}");
}
