//! RandLoRA against the `randlora` (dense bases) and `randlora_sparse`
//! (ternary bases) fixtures PEFT 0.21.2 wrote, both with the bases saved
//! (see `tests/fixtures/peft/README.md`; r = 16, alpha 320): `peft merge`
//! against PEFT's `merge_and_unload`, `peft_core::randlora` against PEFT's
//! unmerged module outputs (its `UB`/`UA` index pairing included), the
//! folder written back (the per-module copies of the bases too) and
//! converted both ways bit for bit, `inspect`, and the refusals:
//! `randlora_noproj`, whose bases PEFT would draw again from torch's
//! generator, is refused naming `save_projection`.
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use peft_faer::hf::{HfAdapter, PeftConfig};

use common::{
    assert_converts_bit_for_bit, assert_merge_matches, assert_module_forward, case_dir, edited, load, scratch,
};

fn check_case(case: &str) {
    let dir = case_dir(case);
    let (_, refs, base) = assert_merge_matches(&dir);
    let ad = HfAdapter::read_dir(&dir).unwrap();
    let PeftConfig::RandLora(c) = &ad.config else { panic!("{case}: not RandLoRA") };
    assert_eq!((c.r, c.randlora_alpha), (16, 320.0));
    assert_eq!(ad.randlora.len(), 6);
    let bases = ad.randlora_bases.as_ref().unwrap().bases().unwrap();
    for m in &ad.randlora {
        assert!(m.copies, "{case}: {} has its copies of the bases", m.name);
        let shape = &base[&format!("{}.weight", m.name)].1;
        assert_module_forward(&base, &refs, &m.name, &mut m.layer(&bases, shape[1], shape[0]).unwrap());
    }
    let back = scratch(&format!("{case}-back"));
    ad.write_dir(&back.join("back"), false).unwrap();
    assert_eq!(load(&back.join("back/adapter_model.safetensors")), load(&dir.join("adapter_model.safetensors")));
    assert_converts_bit_for_bit(&dir);
    let res = Command::new(env!("CARGO_BIN_EXE_peft")).arg("inspect").arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success() && text.contains("method randlora: r=16 randlora_alpha=320"), "{text}");
    // By hand: lambda [16, nb] + gamma [nb, mn]: q_proj (64 x 64) 64 + 256, v_proj and o_proj (mn 48, nb 3)
    // 48 + 144 each; 704 a layer, two layers.
    assert!(text.contains("total: 6 modules, 1408 trainable parameters"), "{text}");
}

#[test]
fn randlora_merge_and_forward_match_peft() {
    check_case("randlora");
    check_case("randlora_sparse");
}

#[test]
fn randlora_refusals_name_the_field() {
    let err = HfAdapter::read_dir(&case_dir("randlora_noproj")).unwrap_err().to_string();
    assert!(err.contains("save_projection"), "{err}");
    let dir = edited("randlora", "randlora-rank", |c| c["r"] = 8.into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("randlora_A") && err.contains('8'), "{err}");
    let dir = edited("randlora", "randlora-fan", |c| c["fan_in_fan_out"] = true.into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("fan_in_fan_out"), "{err}");
}
