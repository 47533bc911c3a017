//! HRA against the `hra` (r = 4) and `hra_gs` (r = 5, `apply_GS`) fixtures
//! PEFT 0.21.2 wrote (see `tests/fixtures/peft/README.md`): `peft merge`
//! against PEFT's `merge_and_unload`, `peft_core::hra` against PEFT's
//! unmerged module outputs, the folder written back and converted both
//! ways bit for bit, `inspect`, and the refusals.
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use peft_faer::hf::{HfAdapter, PeftConfig};

use common::{
    assert_converts_bit_for_bit, assert_merge_matches, assert_module_forward, case_dir, edited, load, scratch,
};

fn check_case(case: &str, gs: bool, r: usize) {
    let dir = case_dir(case);
    let (_, refs, base) = assert_merge_matches(&dir);
    let ad = HfAdapter::read_dir(&dir).unwrap();
    let PeftConfig::Hra(c) = &ad.config else { panic!("{case}: not HRA") };
    assert_eq!((c.apply_gs, c.r), (gs, r));
    assert_eq!(ad.hra.len(), 6);
    for m in &ad.hra {
        let n_out = base[&format!("{}.weight", m.name)].1[0];
        assert_module_forward(&base, &refs, &m.name, &mut m.layer(n_out).unwrap());
    }
    let back = scratch(&format!("{case}-back"));
    ad.write_dir(&back.join("back"), false).unwrap();
    assert_eq!(load(&back.join("back/adapter_model.safetensors")), load(&dir.join("adapter_model.safetensors")));
    assert_converts_bit_for_bit(&dir);
}

#[test]
fn hra_merge_and_forward_match_peft() {
    check_case("hra", false, 4);
    check_case("hra_gs", true, 5);
    let res = Command::new(env!("CARGO_BIN_EXE_peft")).arg("inspect").arg(case_dir("hra_gs")).output().unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success() && text.contains("method hra: r=5 apply_GS=true"), "{text}");
    // By hand: q_proj and v_proj [64, 5] = 320, o_proj [48, 5] = 240, two layers: 2 (320 + 320 + 240).
    assert!(text.contains("total: 6 modules, 1760 trainable parameters"), "{text}");
}

#[test]
fn hra_refusals_name_the_field() {
    let dir = edited("hra", "hra-rank", |c| c["r"] = 3.into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("layers.0") && err.contains('3') && err.contains('4'), "{err}");
    let dir = edited("hra", "hra-bias", |c| c["bias"] = "hra_only".into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("bias"), "{err}");
}
