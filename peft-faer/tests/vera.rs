//! VeRA against the `vera` fixture PEFT 0.21.2 wrote (see
//! `tests/fixtures/peft/README.md`): `peft merge` against PEFT's
//! `merge_and_unload`, `peft_core::vera` against PEFT's unmerged module
//! outputs (the shared projections sliced per layer: `q_proj` 64->64 and
//! `v_proj` 64->48 share one `vera_B [64, 8]`), the folder written back and
//! converted both ways bit for bit, `inspect`, and the refusals.
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use peft_core::vera::{Vera, VeraProjection};

use peft_faer::hf::{HfAdapter, PeftConfig};

use common::{
    assert_converts_bit_for_bit, assert_merge_matches, assert_module_forward, case_dir, edited, load, scratch,
};

#[test]
fn vera_merge_and_forward_match_peft() {
    let case = case_dir("vera");
    let (_, refs, base) = assert_merge_matches(&case);
    let ad = HfAdapter::read_dir(&case).unwrap();
    assert!(matches!(ad.config, PeftConfig::Vera(_)));
    let p = ad.vera_projections.as_ref().unwrap();
    assert_eq!((p.r, p.max_in, p.max_out), (8, 64, 64));
    let proj = VeraProjection::new(p.r, p.max_in, p.max_out, &p.a[..], &p.b[..]).unwrap();
    assert_eq!(ad.vera.len(), 4);
    for m in &ad.vera {
        let n_in = base[&format!("{}.weight", m.name)].1[1];
        let vera = Vera::new(p.r, n_in, m.lambda_b.len(), &m.lambda_d[..], &m.lambda_b[..]).unwrap();
        assert_module_forward(&base, &refs, &m.name, &mut vera.bound(&proj));
    }
    let dir = scratch("vera-back");
    ad.write_dir(&dir.join("back"), false).unwrap();
    assert_eq!(load(&dir.join("back/adapter_model.safetensors")), load(&case.join("adapter_model.safetensors")));
    assert_converts_bit_for_bit(&case);
    let res = Command::new(env!("CARGO_BIN_EXE_peft")).arg("inspect").arg(&case).output().unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success() && text.contains("method vera") && text.contains("vera_B [64, 8]"), "{text}");
    assert!(text.contains("total: 4 modules, 256 trainable parameters"), "2 (8 + 64) + 2 (8 + 48) = 256: {text}");
}

#[test]
fn vera_refusals_name_the_field() {
    let no_proj = edited("vera", "vera-no-proj", |c| c["save_projection"] = false.into());
    let err = HfAdapter::read_dir(&no_proj).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("unsupported") && text.contains("`save_projection` = false"), "{text}");
    let rank = edited("vera", "vera-rank", |c| c["r"] = 4.into());
    let err = HfAdapter::read_dir(&rank).unwrap_err();
    assert!(err.to_string().contains("vera_A"), "{err}");
    // A base wider than vera_A: the merge refuses before writing.
    let dir = scratch("vera-wide");
    let mut tensors = load(&case_dir("vera/base.safetensors"));
    let wide: Vec<f32> = vec![0.5; 64 * 80];
    tensors.insert("layers.0.q_proj.weight".into(), (safetensors::Dtype::F32, vec![64, 80], wide));
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, (_, s, v))| (k.clone(), v.iter().flat_map(|f| f.to_le_bytes()).collect(), s.clone()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(k, b, s)| {
            (k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, &None, &dir.join("base.safetensors")).unwrap();
    let out = dir.join("out.safetensors");
    let res = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(["merge", "--base"])
        .arg(dir.join("base.safetensors"))
        .arg("--adapter")
        .arg(case_dir("vera"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success() && err.contains("layers.0.q_proj.weight") && err.contains("vera_A"), "{err}");
    assert!(!out.exists());
}
