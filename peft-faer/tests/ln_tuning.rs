//! LN tuning against the `ln_tuning` fixture PEFT 0.21.2 wrote (see
//! `tests/fixtures/peft/README.md`: `LNTuningConfig(target_modules=
//! ["norm"])` on two `LayerNorm(64)`s, eps 1e-5): `peft merge` against
//! PEFT's `merge_and_unload` (the saved weight and bias replace the
//! base's), `peft_core::ln_tuning` against PEFT's unmerged module outputs,
//! the folder written back and converted bit for bit, `inspect`, and the
//! refusals.
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use peft_core::ln_tuning::Norm;
use peft_core::{MatMut, MatRef};
use peft_faer::Faer;
use peft_faer::hf::base::Base;
use peft_faer::hf::merge::{MergeOptions, merge_many};
use peft_faer::hf::{HfAdapter, PeftConfig};

use common::{assert_converts_bit_for_bit, assert_merge_matches, case_dir, edited, load, max_rel, scratch};

#[test]
fn ln_tuning_merge_and_forward_match_peft() {
    let dir = case_dir("ln_tuning");
    let (merged, refs, base) = assert_merge_matches(&dir);
    let ad = HfAdapter::read_dir(&dir).unwrap();
    assert!(matches!(ad.config, PeftConfig::LnTuning(_)));
    assert_eq!(ad.ln_tuning.len(), 2);
    let saved = load(&dir.join("adapter_model.safetensors"));
    for m in &ad.ln_tuning {
        // The merge is a replacement: the saved values exactly, not within a tolerance.
        for p in ["weight", "bias"] {
            let want = &saved[&format!("base_model.model.{}.ln_tuning_layers.{p}", m.name)].2;
            assert_eq!(&merged[&format!("{}.{p}", m.name)].2, want, "{}.{p}", m.name);
        }
        // PEFT's unmerged forward: the trained copy's LayerNorm (eps 1e-5, the base module's).
        let layer = m.layer(Norm::Layer, 1e-5).unwrap();
        let x = &refs[&format!("x.{}", m.name)].2;
        let t = x.len() / 64;
        let mut y = vec![0.0f32; t * 64];
        layer.forward(MatRef::new(x, t, 64).unwrap(), MatMut::new(&mut y, t, 64).unwrap()).unwrap();
        let rel = max_rel(&y, &refs[&format!("y.{}", m.name)].2);
        assert!(rel <= 1e-5, "{}: relative error {rel:.2e}", m.name);
    }
    assert!(base.contains_key("layers.0.norm.weight"));
    let back = scratch("ln-tuning-back");
    ad.write_dir(&back.join("back"), false).unwrap();
    assert_eq!(load(&back.join("back/adapter_model.safetensors")), saved);
    assert_converts_bit_for_bit(&dir);
    let res = Command::new(env!("CARGO_BIN_EXE_peft")).arg("inspect").arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success() && text.contains("method ln_tuning"), "{text}");
    // By hand: a weight and a bias of 64 on each of the two norms.
    assert!(text.contains("total: 2 modules, 256 trainable parameters"), "{text}");
}

#[test]
fn ln_tuning_refusals_name_the_module_or_field() {
    // A module the config does not target.
    let dir = edited("ln_tuning", "ln-tuning-untargeted", |c| c["target_modules"] = serde_json::json!(["other"]));
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("layers.0.norm"), "{err}");
    // A multiplier has nothing to scale in a replacement.
    let case = case_dir("ln_tuning");
    let (ad, base) = (HfAdapter::read_dir(&case).unwrap(), Base::open(&case.join("base.safetensors")).unwrap());
    let out = scratch("ln-tuning-scaled").join("merged.safetensors");
    let err =
        merge_many(&base, &[(&ad, 0.5)], &out, &MergeOptions::default(), &Faer::new(), |_| {}).unwrap_err().to_string();
    assert!(err.contains("multiplier") && err.contains("LN_TUNING"), "{err}");
    assert!(!out.exists(), "nothing written");
    // A LayerNorm's copy read as an RMSNorm: refused by `peft-core`, naming the bias.
    let err = ad.ln_tuning[0].layer(Norm::Rms, 1e-5).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("bias"), "an RMSNorm has no bias: {err}");
}
