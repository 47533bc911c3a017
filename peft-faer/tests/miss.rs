//! MiSS against the `miss` (balance, r = 12: `in` 64 is not a multiple, the
//! padded path), `miss_mini` (mini_r = 8) and `miss_bat` (r = 16) fixtures
//! PEFT 0.21.2 wrote (see `tests/fixtures/peft/README.md`): `peft merge`
//! against PEFT's `merge_and_unload`, `peft_core::miss` against PEFT's
//! unmerged module outputs, the folder written back and converted both
//! ways bit for bit, `inspect`, and the refusals.
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use peft_core::miss::MissVariant;
use peft_faer::hf::{HfAdapter, PeftConfig};

use common::{
    assert_converts_bit_for_bit, assert_merge_matches, assert_module_forward, case_dir, edited, load, scratch,
};

fn check_case(case: &str, variant: MissVariant, r: usize) {
    let dir = case_dir(case);
    let (_, refs, base) = assert_merge_matches(&dir);
    let ad = HfAdapter::read_dir(&dir).unwrap();
    let PeftConfig::Miss(c) = &ad.config else { panic!("{case}: not MiSS") };
    assert_eq!((c.variant, c.r), (variant, r));
    assert_eq!(ad.miss.len(), 6);
    for m in &ad.miss {
        let shape = &base[&format!("{}.weight", m.name)].1;
        assert_module_forward(&base, &refs, &m.name, &mut m.layer(shape[1], shape[0]).unwrap());
    }
    let back = scratch(&format!("{case}-back"));
    ad.write_dir(&back.join("back"), false).unwrap();
    assert_eq!(load(&back.join("back/adapter_model.safetensors")), load(&dir.join("adapter_model.safetensors")));
    assert_converts_bit_for_bit(&dir);
}

#[test]
fn miss_variants_merge_and_forward_match_peft() {
    check_case("miss", MissVariant::Balance, 12);
    check_case("miss_mini", MissVariant::Mini { mini_r: 8 }, 12);
    check_case("miss_bat", MissVariant::Bat, 16);
    let res = Command::new(env!("CARGO_BIN_EXE_peft")).arg("inspect").arg(case_dir("miss_bat")).output().unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success() && text.contains("method miss: r=16 bat"), "{text}");
    // By hand: q_proj and o_proj [4, 16, 16] = 1024 twice each, v_proj [3, 16, 16] = 768 twice.
    assert!(text.contains("total: 6 modules, 5632 trainable parameters"), "{text}");
}

#[test]
fn miss_refusals_name_the_field() {
    // bat over a shape its blocks do not tile: r = 12 does not divide 64.
    let dir = edited("miss", "miss-bat-12", |c| c["init_weights"] = "bat".into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("miss_block") && err.contains("bat"), "{err}");
    let dir = edited("miss_mini", "miss-mini-r", |c| c["mini_r"] = 4.into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("miss_block") && err.contains("mini_r"), "{err}");
    let dir = edited("miss", "miss-init", |c| c["init_weights"] = "gaussian".into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("init_weights"), "{err}");
    let dir = edited("miss", "miss-bias", |c| c["bias"] = "all".into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("bias"), "{err}");
}
