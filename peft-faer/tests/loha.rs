//! LoHa against the `loha` fixture PEFT 0.21.2 wrote (see
//! `tests/fixtures/peft/README.md`): `peft merge` against PEFT's
//! `merge_and_unload`, `peft_core::loha` against PEFT's unmerged module
//! outputs, the folder written back unchanged, `inspect`.
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use peft_core::loha::Loha;
use peft_core::lora::LoraConfig;

use peft_faer::hf::{HfAdapter, PeftConfig};

use common::{
    assert_converts_bit_for_bit, assert_merge_matches, assert_module_forward, case_dir, load, max_rel, scratch,
};

#[test]
fn loha_merge_and_forward_match_peft() {
    let (_, refs, base) = assert_merge_matches(&case_dir("loha"));
    assert_converts_bit_for_bit(&case_dir("loha"));
    let ad = HfAdapter::read_dir(&case_dir("loha")).unwrap();
    assert!(matches!(ad.config, PeftConfig::Loha(_)));
    assert_eq!(ad.loha.len(), 4);
    for m in &ad.loha {
        let [f0, f1, f2, f3] = &m.factors;
        let mut l =
            Loha::new(&LoraConfig::new(m.r, m.alpha), m.n_in, m.n_out, [&f0[..], &f1[..], &f2[..], &f3[..]]).unwrap();
        assert_module_forward(&base, &refs, &m.name, &mut l);
    }
    let dir = scratch("loha-back");
    ad.write_dir(&dir.join("back"), false).unwrap();
    assert_eq!(
        load(&dir.join("back/adapter_model.safetensors")),
        load(&case_dir("loha").join("adapter_model.safetensors"))
    );
    let res = Command::new(env!("CARGO_BIN_EXE_peft")).arg("inspect").arg(case_dir("loha")).output().unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success() && text.contains("method loha") && text.contains("layers.1.v_proj"), "{text}");
}

/// Two LoHa adapters on one weight merge as PEFT merges them: the sum of
/// their deltas. The fixture given twice equals the fixture given once at
/// multiplier 2 (`W + dW + dW` against `W + 2 dW`: equal up to one f32
/// rounding of each sum), and PEFT's own merge at multiplier 1 is the
/// half-way point (`ref.safetensors`: `W + dW`).
#[test]
fn two_loha_adapters_on_one_weight_add_their_deltas() {
    let dir = scratch("loha-twice");
    let merge = |adapters: &[&str], out: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_peft"));
        cmd.args(["merge", "--base"]).arg(case_dir("loha").join("base.safetensors"));
        for a in adapters {
            cmd.arg("--adapter").arg(format!("{}{a}", case_dir("loha").display()));
        }
        let res = cmd.arg("--out").arg(dir.join(out)).output().unwrap();
        assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
        load(&dir.join(out))
    };
    let twice = merge(&["", ""], "twice.safetensors");
    let doubled = merge(&[":2"], "doubled.safetensors");
    let (base, refs) =
        (load(&case_dir("loha").join("base.safetensors")), load(&case_dir("loha").join("ref.safetensors")));
    let modules: Vec<String> =
        HfAdapter::read_dir(&case_dir("loha")).unwrap().loha.iter().map(|m| format!("{}.weight", m.name)).collect();
    let mut adapted = 0;
    for (name, (_, _, w2)) in &twice {
        if !modules.contains(name) {
            assert_eq!(w2, &base[name].2, "{name}: not adapted, copied");
            continue;
        }
        let once = &refs[&format!("merged.{name}")].2;
        adapted += 1;
        assert!(max_rel(w2, &doubled[name].2) <= 1e-6, "{name}: twice vs doubled");
        // (W + 2 dW + W) / 2 = W + dW, PEFT's single merge.
        let mid: Vec<f32> = w2.iter().zip(&base[name].2).map(|(t, w)| (t + w) / 2.0).collect();
        assert!(max_rel(&mid, once) <= 1e-5, "{name}: half-way is not PEFT's merge");
    }
    assert_eq!(adapted, 4, "every LoHa module's weight");
    std::fs::remove_dir_all(&dir).ok();
}
