//! RoAd against the `road_1`, `road_2` and `road_4` fixtures PEFT 0.21.2
//! wrote (see `tests/fixtures/peft/README.md`; groups of 16): `peft merge`
//! against PEFT's `merge_and_unload` (the bias of `v_proj` is rotated
//! too), `peft_core::road` against PEFT's unmerged module outputs, the
//! folder written back and converted both ways bit for bit, `inspect`, and
//! the refusals.
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use peft_core::road::RoadVariant;
use peft_faer::hf::{HfAdapter, PeftConfig};

use common::{
    assert_converts_bit_for_bit, assert_merge_matches, assert_module_forward, case_dir, edited, load, scratch,
};

fn check_case(case: &str, variant: RoadVariant) {
    let dir = case_dir(case);
    let (merged, _, base) = assert_merge_matches(&dir);
    let refs = load(&dir.join("ref.safetensors"));
    let ad = HfAdapter::read_dir(&dir).unwrap();
    let PeftConfig::Road(c) = &ad.config else { panic!("{case}: not RoAd") };
    assert_eq!((c.variant, c.group_size), (variant, 16));
    assert_eq!(ad.road.len(), 6);
    for m in &ad.road {
        let n_in = base[&format!("{}.weight", m.name)].1[1];
        assert_module_forward(&base, &refs, &m.name, &mut m.layer(n_in).unwrap());
    }
    // The trap: PEFT rotates the bias as well.
    let bias = "layers.0.v_proj.bias";
    assert_ne!(merged[bias].2, base[bias].2, "{case}: the bias is rotated");
    let back = scratch(&format!("{case}-back"));
    ad.write_dir(&back.join("back"), false).unwrap();
    assert_eq!(load(&back.join("back/adapter_model.safetensors")), load(&dir.join("adapter_model.safetensors")));
    assert_converts_bit_for_bit(&dir);
}

#[test]
fn road_variants_merge_and_forward_match_peft() {
    check_case("road_1", RoadVariant::Road1);
    check_case("road_2", RoadVariant::Road2);
    check_case("road_4", RoadVariant::Road4);
    let res = Command::new(env!("CARGO_BIN_EXE_peft")).arg("inspect").arg(case_dir("road_4")).output().unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success() && text.contains("method road: road_4 group_size=16"), "{text}");
    // By hand: 2 vectors of 2 out each: q_proj and o_proj 256, v_proj 192, two layers: 2 (256 + 256 + 192).
    assert!(text.contains("total: 6 modules, 1408 trainable parameters"), "{text}");
}

#[test]
fn road_refusals_name_the_field() {
    // Groups of 32 do not divide v_proj's 48 outputs.
    let dir = edited("road_2", "road-group", |c| c["group_size"] = 32.into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("road_theta") && err.contains("group_size 32"), "{err}");
    let dir = edited("road_2", "road-odd", |c| c["group_size"] = 15.into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("group_size"), "{err}");
    let dir = edited("road_2", "road-variant", |c| c["variant"] = "road_3".into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("variant") && err.contains("road_3"), "{err}");
}
