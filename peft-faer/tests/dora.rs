//! DoRA against the `lora_dora` fixture PEFT 0.21.2 wrote (see
//! `tests/fixtures/peft/README.md`): `peft merge` against PEFT's
//! `merge_and_unload`, `peft_core::dora` against PEFT's unmerged module
//! outputs, and `peft convert` both ways.
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use peft_core::dora::Dora;

use peft_faer::hf::{HfAdapter, PeftConfig};

use common::{assert_converts_bit_for_bit, assert_merge_matches, assert_module_forward, case_dir, load};

#[test]
fn dora_merge_matches_pefts_merge_and_unload() {
    let (got, _, base) = assert_merge_matches(&case_dir("lora_dora"));
    assert_eq!(got["layers.0.v_proj.bias"].2, base["layers.0.v_proj.bias"].2, "DoRA leaves the bias alone");
}

#[test]
fn dora_forward_matches_pefts_module_outputs() {
    let ad = HfAdapter::read_dir(&case_dir("lora_dora")).unwrap();
    let PeftConfig::Lora(lc) = &ad.config else { panic!("not LoRA") };
    assert!(lc.use_dora);
    let (base, refs) =
        (load(&case_dir("lora_dora").join("base.safetensors")), load(&case_dir("lora_dora").join("ref.safetensors")));
    assert_eq!(ad.modules.len(), 6);
    for m in &ad.modules {
        let mag = m.magnitude.as_deref().expect("a DoRA module has its magnitude");
        let mut dora =
            Dora::new(&lc.core_config_for(&m.name), m.n_in, m.n_out, &m.a[..], &m.b[..], mag, vec![0.0; m.n_out])
                .unwrap();
        assert_module_forward(&base, &refs, &m.name, &mut dora);
    }
}

#[test]
fn dora_converts_both_ways_bit_for_bit() {
    assert_converts_bit_for_bit(&case_dir("lora_dora"));
    let want = load(&case_dir("lora_dora").join("adapter_model.safetensors"));
    assert!(want.keys().any(|k| k.ends_with(".lora_magnitude_vector")));
    // inspect names the method.
    let res = Command::new(env!("CARGO_BIN_EXE_peft")).arg("inspect").arg(case_dir("lora_dora")).output().unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success() && text.contains("DoRA"), "{text}");
}
