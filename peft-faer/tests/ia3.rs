//! (IA)^3 against the `ia3` fixture PEFT 0.21.2 wrote (see
//! `tests/fixtures/peft/README.md`): `peft merge` against PEFT's
//! `merge_and_unload`, `peft_core::ia3` against PEFT's unmerged module
//! outputs (both kinds), and the folder written back unchanged.
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use peft_core::ia3::Ia3;

use peft_faer::hf::{HfAdapter, PeftConfig};

use common::{assert_converts_bit_for_bit, assert_merge_matches, assert_module_forward, case_dir, load, scratch};

#[test]
fn ia3_merge_matches_pefts_merge_and_unload() {
    let (got, _, base) = assert_merge_matches(&case_dir("ia3"));
    // The output kind scales its bias; the feedforward kind does not.
    assert_ne!(got["layers.0.v_proj.bias"].2, base["layers.0.v_proj.bias"].2);
    assert_eq!(got["layers.0.mlp.fc1.bias"].2, base["layers.0.mlp.fc1.bias"].2);
}

#[test]
fn ia3_forward_matches_pefts_module_outputs() {
    let ad = HfAdapter::read_dir(&case_dir("ia3")).unwrap();
    assert!(matches!(ad.config, PeftConfig::Ia3(_)));
    let (base, refs) =
        (load(&case_dir("ia3").join("base.safetensors")), load(&case_dir("ia3").join("ref.safetensors")));
    assert_eq!(ad.ia3.len(), 8);
    assert_eq!(ad.ia3.iter().filter(|m| m.feedforward).count(), 4, "fc1 and fc2 in both layers");
    for m in &ad.ia3 {
        let (n_out, n_in) = (base[&format!("{}.weight", m.name)].1[0], base[&format!("{}.weight", m.name)].1[1]);
        assert_module_forward(&base, &refs, &m.name, &mut Ia3::new(n_in, n_out, m.feedforward, &m.l[..]).unwrap());
    }
}

#[test]
fn ia3_folders_are_written_back_converted_and_inspected() {
    let dir = scratch("ia3-write");
    let ad = HfAdapter::read_dir(&case_dir("ia3")).unwrap();
    ad.write_dir(&dir.join("back"), false).unwrap();
    assert_eq!(
        load(&dir.join("back/adapter_model.safetensors")),
        load(&case_dir("ia3").join("adapter_model.safetensors"))
    );
    let res = Command::new(env!("CARGO_BIN_EXE_peft")).arg("inspect").arg(case_dir("ia3")).output().unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success() && text.contains("method ia3") && text.contains("input"), "{text}");
    // Each vector's length from the fixture's shapes: k 64, fc1 64, fc2 96, v 48, two layers.
    assert!(text.contains("total: 8 modules, 544 trainable parameters"), "{text}");
    assert_converts_bit_for_bit(&case_dir("ia3"));
}
