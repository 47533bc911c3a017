//! FourierFT against the `fourierft` fixture PEFT 0.21.2 wrote (see
//! `tests/fixtures/peft/README.md`; 200 frequencies on `q_proj` and
//! `v_proj`, 100 on `o_proj` by `n_frequency_pattern`, seed 782): the
//! frequencies regenerated as torch's `randperm` draws them, `peft merge`
//! against PEFT's `merge_and_unload`, `peft_core::fourierft` against PEFT's
//! unmerged module outputs, the folder written back and converted both
//! ways bit for bit, `inspect`, and the refusals.
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use peft_faer::hf::{HfAdapter, PeftConfig, torch_randperm_prefix};

use common::{
    assert_converts_bit_for_bit, assert_merge_matches, assert_module_forward, case_dir, edited, load, scratch,
};

#[test]
fn fourierft_frequencies_merge_and_forward_match_peft() {
    let dir = case_dir("fourierft");
    let (_, refs, base) = assert_merge_matches(&dir);
    let ad = HfAdapter::read_dir(&dir).unwrap();
    let PeftConfig::FourierFt(c) = &ad.config else { panic!("not FourierFT") };
    assert_eq!((c.n_frequency, c.random_loc_seed, c.scaling), (200, 782, 150.0));
    assert_eq!(ad.fourierft.len(), 6);
    for m in &ad.fourierft {
        let shape = &base[&format!("{}.weight", m.name)].1;
        // The frequencies PEFT drew at load ([2, n]: rows, then columns), bit for bit.
        let want = &refs[&format!("fourierft_indices.{}", m.name)];
        let (rows, cols) = m.frequencies(shape[1], shape[0]).unwrap();
        let n = rows.len();
        assert_eq!(want.1, [2, n], "{}", m.name);
        let got: Vec<f32> = rows.iter().chain(cols).map(|&v| v as f32).collect();
        assert_eq!(got, want.2, "{}: frequencies", m.name);
        assert_module_forward(&base, &refs, &m.name, &mut m.layer(shape[1], shape[0]).unwrap());
    }
    let back = scratch("fourierft-back");
    ad.write_dir(&back.join("back"), false).unwrap();
    assert_eq!(load(&back.join("back/adapter_model.safetensors")), load(&dir.join("adapter_model.safetensors")));
    assert_converts_bit_for_bit(&dir);
    let res = Command::new(env!("CARGO_BIN_EXE_peft")).arg("inspect").arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success() && text.contains("method fourierft: n_frequency=200 scaling=150"), "{text}");
    // By hand: 200 + 200 + 100 a layer, two layers.
    assert!(text.contains("total: 6 modules, 1000 trainable parameters"), "{text}");
}

#[test]
fn fourierft_refusals_name_the_field() {
    // A spectrum of another length than the pattern gives its module.
    let dir = edited("fourierft", "fourierft-n", |c| c["n_frequency_pattern"] = serde_json::json!({}));
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("fourierft_spectrum") && err.contains("[200]"), "{err}");
    let dir = edited("fourierft", "fourierft-fan", |c| c["fan_in_fan_out"] = true.into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("fan_in_fan_out"), "{err}");
    // More frequencies than the layer has weights, and layers past torch's 32-bit randperm.
    assert!(torch_randperm_prefix(6, 7, 777).unwrap_err().to_string().contains('7'));
    let big = torch_randperm_prefix(1 << 28, 1, 777).unwrap_err().to_string();
    assert!(big.contains("64-bit"), "{big}");
}
