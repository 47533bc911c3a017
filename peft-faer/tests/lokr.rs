//! LoKr against the `lokr` and `lokr_decompose_both` fixtures PEFT 0.21.2
//! wrote (see `tests/fixtures/peft/README.md`): `peft merge` against
//! `merge_and_unload`, `peft_core::lokr` against PEFT's unmerged module
//! outputs, the folder written back unchanged, `inspect`.
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use peft_core::lokr::{Factor, Lokr};
use peft_core::lora::LoraConfig;

use peft_faer::hf::{HfAdapter, PeftConfig};

use common::{assert_converts_bit_for_bit, assert_merge_matches, assert_module_forward, case_dir, load, scratch};

fn as_factor(f: &[Vec<f32>]) -> Factor<&[f32]> {
    match f {
        [m] => Factor::Full(&m[..]),
        [a, b] => Factor::LowRank(&a[..], &b[..]),
        _ => panic!("a factor has one or two tensors"),
    }
}

#[test]
fn lokr_merge_and_forward_match_peft() {
    for name in ["lokr", "lokr_decompose_both"] {
        let (_, refs, base) = assert_merge_matches(&case_dir(name));
        assert_converts_bit_for_bit(&case_dir(name));
        let ad = HfAdapter::read_dir(&case_dir(name)).unwrap();
        assert!(matches!(ad.config, PeftConfig::Lokr(_)));
        assert_eq!(ad.lokr.len(), 6, "{name}");
        for m in &ad.lokr {
            let mut l =
                Lokr::new(&LoraConfig::new(m.r, m.alpha), m.d1, m.d2, as_factor(&m.w1), as_factor(&m.w2)).unwrap();
            assert_module_forward(&base, &refs, &m.name, &mut l);
        }
        let dir = scratch(&format!("{name}-back"));
        ad.write_dir(&dir.join("back"), false).unwrap();
        assert_eq!(
            load(&dir.join("back/adapter_model.safetensors")),
            load(&case_dir(name).join("adapter_model.safetensors"))
        );
        let res = Command::new(env!("CARGO_BIN_EXE_peft")).arg("inspect").arg(case_dir(name)).output().unwrap();
        let text = String::from_utf8_lossy(&res.stdout);
        assert!(res.status.success() && text.contains("method lokr"), "{text}");
    }
}
