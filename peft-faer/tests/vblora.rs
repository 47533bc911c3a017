//! VB-LoRA against the `vblora` (logits saved whole, top 2) and
//! `vblora_topk` (`save_only_topk_weights`, top 3, U8 indices) fixtures
//! PEFT 0.21.2 wrote (see `tests/fixtures/peft/README.md`; r = 4, 32 bank
//! vectors of 16): `peft merge` against PEFT's `merge_and_unload`,
//! `peft_core::vblora` against PEFT's unmerged module outputs, the folder
//! written back bit for bit (the top-k form as saved), `inspect`, and the
//! refusals.
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use peft_faer::hf::{HfAdapter, PeftConfig, VbLoraStored};

use common::{
    assert_converts_bit_for_bit, assert_merge_matches, assert_module_forward, case_dir, edited, load, scratch,
};

fn check_case(case: &str, topk: usize, topk_form: bool) {
    let dir = case_dir(case);
    let (_, refs, base) = assert_merge_matches(&dir);
    let ad = HfAdapter::read_dir(&dir).unwrap();
    let PeftConfig::VbLora(c) = &ad.config else { panic!("{case}: not VB-LoRA") };
    assert_eq!((c.r, c.num_vectors, c.vector_length, c.topk), (4, 32, 16, topk));
    assert_eq!(ad.vblora.len(), 6);
    let bank = ad.vblora_bank.as_ref().unwrap();
    for m in &ad.vblora {
        assert_eq!(matches!(m.stored, VbLoraStored::TopK(_)), topk_form, "{case}: {}", m.name);
        let shape = &base[&format!("{}.weight", m.name)].1;
        assert_module_forward(&base, &refs, &m.name, &mut m.layer(bank, shape[1], shape[0]).unwrap());
    }
    let back = scratch(&format!("{case}-back"));
    ad.write_dir(&back.join("back"), false).unwrap();
    assert_eq!(load(&back.join("back/adapter_model.safetensors")), load(&dir.join("adapter_model.safetensors")));
}

#[test]
fn vblora_merge_and_forward_match_peft() {
    check_case("vblora", 2, false);
    check_case("vblora_topk", 3, true);
    assert_converts_bit_for_bit(&case_dir("vblora"));
    let res = Command::new(env!("CARGO_BIN_EXE_peft")).arg("inspect").arg(case_dir("vblora")).output().unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success() && text.contains("method vblora: r=4 num_vectors=32 vector_length=16 topk=2"),
        "{text}"
    );
    // By hand, the logits per layer: q_proj [4, 4, 32] + [4, 4, 32], v_proj [4, 4, 32] + [3, 4, 32], o_proj
    // [4, 3, 32] + [4, 4, 32]: 512 + 512 + 512 + 384 + 384 + 512 = 2816; two layers.
    assert!(text.contains("total: 6 modules, 5632 trainable parameters"), "{text}");
}

#[test]
fn vblora_refusals_name_the_field() {
    // The top-k form has integer indices: no .peft element type.
    let err = peft_faer::hf::convert::peft_dir_to_own(&case_dir("vblora_topk")).unwrap_err().to_string();
    assert!(err.contains("top-k"), "{err}");
    let dir = edited("vblora", "vblora-bank", |c| c["num_vectors"] = 16.into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("vblora_vector_bank") && err.contains("16"), "{err}");
    let dir = edited("vblora", "vblora-topk", |c| c["topk"] = 0.into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("topk"), "{err}");
}
