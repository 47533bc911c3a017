//! SHiRA against the `shira` fixture PEFT 0.21.2 wrote (see
//! `tests/fixtures/peft/README.md`; r = 2: 256 positions on `q_proj`, 224
//! on `v_proj` and `o_proj`, saved as I32 indices): `peft merge` against
//! PEFT's `merge_and_unload`, `peft_core::shira` against PEFT's unmerged
//! module outputs, the folder written back bit for bit (indices as I32),
//! `inspect`, and the refusals.
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use peft_faer::hf::{HfAdapter, PeftConfig};

use common::{assert_merge_matches, assert_module_forward, case_dir, edited, load, scratch};

#[test]
fn shira_merge_and_forward_match_peft() {
    let dir = case_dir("shira");
    let (_, refs, base) = assert_merge_matches(&dir);
    let ad = HfAdapter::read_dir(&dir).unwrap();
    assert!(matches!(ad.config, PeftConfig::Shira(_)));
    assert_eq!(ad.shira.len(), 6);
    for m in &ad.shira {
        let shape = &base[&format!("{}.weight", m.name)].1;
        assert_eq!(m.rows.len(), 2 * (shape[0] + shape[1]), "{}: r (in + out) positions", m.name);
        assert_module_forward(&base, &refs, &m.name, &mut m.layer(shape[1], shape[0]).unwrap());
    }
    let back = scratch("shira-back");
    ad.write_dir(&back.join("back"), false).unwrap();
    // `load` widens every tensor to f32; the I32 indices compare exactly (all below 2^24).
    assert_eq!(load(&back.join("back/adapter_model.safetensors")), load(&dir.join("adapter_model.safetensors")));
    let res = Command::new(env!("CARGO_BIN_EXE_peft")).arg("inspect").arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success() && text.contains("method shira"), "{text}");
    // By hand: 2 (64 + 64) = 256 on q_proj, 2 (64 + 48) = 224 on v_proj and o_proj; two layers.
    assert!(text.contains("total: 6 modules, 1408 trainable parameters"), "{text}");
}

#[test]
fn shira_refusals_name_the_field() {
    let dir = edited("shira", "shira-fan", |c| c["fan_in_fan_out"] = true.into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("fan_in_fan_out"), "{err}");
    // .peft files have no I32 element type: conversion is refused, naming why.
    let err = peft_faer::hf::convert::peft_dir_to_own(&case_dir("shira")).unwrap_err().to_string();
    assert!(err.contains("SHiRA") && err.contains("I32"), "{err}");
}
