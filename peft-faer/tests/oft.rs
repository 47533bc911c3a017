//! OFT against the `oft` (Cayley-Neumann, 5 terms, blocks of 16),
//! `oft_cayley_exact` (blocks of 8), `oft_coft` (r = 4, COFT with eps 0.3)
//! and `oft_block_share` (one block of 16, 3 terms) fixtures PEFT 0.21.2
//! wrote (see `tests/fixtures/peft/README.md`): `peft merge` against PEFT's
//! `merge_and_unload`, `peft_core::oft` against PEFT's unmerged module
//! outputs, the folder written back and converted both ways bit for bit,
//! `inspect`, and the refusals.
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use peft_faer::Faer;
use peft_faer::hf::base::Base;
use peft_faer::hf::merge::{MergeOptions, merge};
use peft_faer::hf::{HfAdapter, PeftConfig};

use common::{
    assert_converts_bit_for_bit, assert_merge_matches, assert_module_forward, case_dir, edited, load, scratch,
};

/// The case's merge, module outputs, write-back and conversion; the block
/// sizes of `q_proj` (in 64) and `o_proj` (in 48).
fn check_case(case: &str, blocks: (usize, usize)) {
    let dir = case_dir(case);
    let (_, refs, base) = assert_merge_matches(&dir);
    let ad = HfAdapter::read_dir(&dir).unwrap();
    assert!(matches!(ad.config, PeftConfig::Oft(_)), "{case}: not OFT");
    assert_eq!(ad.oft.len(), 6);
    for m in &ad.oft {
        let shape = &base[&format!("{}.weight", m.name)].1;
        let want = if shape[1] == 64 { blocks.0 } else { blocks.1 };
        assert_eq!(m.spec.block, want, "{case}: {}", m.name);
        assert_module_forward(&base, &refs, &m.name, &mut m.layer(shape[1], shape[0]).unwrap());
    }
    let back = scratch(&format!("{case}-back"));
    ad.write_dir(&back.join("back"), false).unwrap();
    assert_eq!(load(&back.join("back/adapter_model.safetensors")), load(&dir.join("adapter_model.safetensors")));
    assert_converts_bit_for_bit(&dir);
}

#[test]
fn oft_merge_and_forward_match_peft() {
    check_case("oft", (16, 16));
    check_case("oft_cayley_exact", (8, 8));
    check_case("oft_coft", (16, 12));
    check_case("oft_block_share", (16, 16));
    // Parameters by hand, two layers of q_proj, v_proj (in 64) and o_proj (in 48):
    // oft: 4 x 120 twice and 3 x 120, = 1320 a layer; the exact case: 8 x 28 twice and 6 x 28, = 616;
    // COFT: 4 x 120 twice and 4 x 66, = 1224; shared: 120 each, = 360.
    for (case, total, headline) in [
        ("oft", 2640, "method oft: r=0 oft_block_size=16 block_share=false (W' = W R_bd^T, Cayley-Neumann, 5 terms)"),
        ("oft_cayley_exact", 1232, "exact Cayley"),
        ("oft_coft", 2448, "coft eps=0.3"),
        ("oft_block_share", 720, "block_share=true"),
    ] {
        let res = Command::new(env!("CARGO_BIN_EXE_peft")).arg("inspect").arg(case_dir(case)).output().unwrap();
        let text = String::from_utf8_lossy(&res.stdout);
        assert!(res.status.success() && text.contains(headline), "{case}: {text}");
        assert!(text.contains(&format!("total: 6 modules, {total} trainable parameters")), "{case}: {text}");
    }
}

#[test]
fn oft_refusals_name_the_field() {
    // Both r and oft_block_size set: PEFT's update_layer refuses it too.
    let dir = edited("oft", "oft-both", |c| c["r"] = 4.into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("oft_block_size") && err.contains("`r`"), "{err}");
    let dir = edited("oft", "oft-fan", |c| c["fan_in_fan_out"] = true.into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("fan_in_fan_out"), "{err}");
    let dir = edited("oft", "oft-terms", |c| c["num_cayley_neumann_terms"] = 0.into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("num_cayley_neumann_terms"), "{err}");
    // A config whose block size is not the file's: the layer names the tensor and the block PEFT would use.
    let dir = edited("oft", "oft-block", |c| c["oft_block_size"] = 8.into());
    let ad = HfAdapter::read_dir(&dir).unwrap();
    let err = ad.oft[0].layer(64, 64).unwrap_err().to_string();
    assert!(err.contains("oft_R.weight") && err.contains("blocks of 8"), "{err}");
    // PEFT adjusts a block size that does not divide the input (10 -> 8 for 64 inputs) and so does the check.
    let dir = edited("oft_cayley_exact", "oft-adjusted", |c| c["oft_block_size"] = 10.into());
    let ad = HfAdapter::read_dir(&dir).unwrap();
    assert!(ad.oft.iter().filter(|m| m.name.ends_with("q_proj")).all(|m| m.layer(64, 64).is_ok()));
}

/// A NaN an OFT adapter holds is refused before anything is written, naming
/// the tensor and its index (the merge's check reads every method's
/// tensors; it once skipped the methods after AdaLoRA).
#[test]
fn oft_nonfinite_values_are_refused_naming_the_tensor() {
    let dir = case_dir("oft");
    let mut ad = HfAdapter::read_dir(&dir).unwrap();
    let name = ad.oft[1].name.clone();
    ad.oft[1].v[7] = f32::NAN;
    let out = scratch("oft-nan").join("merged.safetensors");
    let base = Base::open(&dir.join("base.safetensors")).unwrap();
    let err = merge(&base, &ad, &out, &MergeOptions::default(), &Faer::new(), |_| {}).unwrap_err().to_string();
    assert!(err.contains(&format!("{name}.oft_R.weight")) && err.contains('7'), "{err}");
    assert!(!out.exists(), "nothing is written");
}
