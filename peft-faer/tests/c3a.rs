//! C3A against the `c3a` fixture PEFT 0.21.2 wrote (see
//! `tests/fixtures/peft/README.md`; blocks of 16, `q_proj` 32 through
//! `block_size_pattern`): `peft merge` against PEFT's `merge_and_unload`,
//! `peft_core::c3a` against PEFT's unmerged module outputs (PEFT's FFTs,
//! divided by the full input width), the folder written back and converted
//! both ways bit for bit, `inspect`, and the refusals.
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use peft_faer::hf::{HfAdapter, PeftConfig};

use common::{
    assert_converts_bit_for_bit, assert_merge_matches, assert_module_forward, case_dir, edited, load, scratch,
};

#[test]
fn c3a_merge_and_forward_match_peft() {
    let dir = case_dir("c3a");
    let (_, refs, base) = assert_merge_matches(&dir);
    let ad = HfAdapter::read_dir(&dir).unwrap();
    let PeftConfig::C3a(c) = &ad.config else { panic!("not C3A") };
    assert_eq!((c.block_size, c.block_size_for("layers.0.q_proj"), c.block_size_for("layers.1.v_proj")), (16, 32, 16));
    assert_eq!(ad.c3a.len(), 6);
    for m in &ad.c3a {
        assert_module_forward(&base, &refs, &m.name, &mut m.layer().unwrap());
    }
    let back = scratch("c3a-back");
    ad.write_dir(&back.join("back"), false).unwrap();
    assert_eq!(load(&back.join("back/adapter_model.safetensors")), load(&dir.join("adapter_model.safetensors")));
    assert_converts_bit_for_bit(&dir);
    let res = Command::new(env!("CARGO_BIN_EXE_peft")).arg("inspect").arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success() && text.contains("method c3a: block_size=16"), "{text}");
    // By hand: out in / b: q_proj 64 * 64 / 32 = 128, v_proj 48 * 64 / 16 = 192, o_proj 64 * 48 / 16 = 192; twice.
    assert!(text.contains("total: 6 modules, 1024 trainable parameters"), "{text}");
}

#[test]
fn c3a_refusals_name_the_field() {
    // Without the pattern q_proj's kernel [2, 2, 32] is not the block size 16's.
    let dir = edited("c3a", "c3a-pattern", |c| c["block_size_pattern"] = serde_json::json!({}));
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("c3a_kernel") && err.contains("block size 16"), "{err}");
    let dir = edited("c3a", "c3a-bias", |c| c["bias"] = "c3a_only".into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("bias"), "{err}");
}
