//! Malformed adapters and checkpoints: each is a clear, typed error, and
//! `merge` writes no output file (not even a temporary one).
#![cfg(feature = "hf")]

mod common;

use std::path::Path;

use peft_faer::Faer;
use peft_faer::hf::base::Base;
use peft_faer::hf::merge::{MergeOptions, merge};
use peft_faer::hf::{HfAdapter, HfError};

use common::{fixture, scratch};

/// A copy of the fixture (adapter files and base) in `dir`.
fn copy_fixture(dir: &Path) {
    for f in ["adapter_config.json", "adapter_model.safetensors", "base.safetensors"] {
        std::fs::copy(fixture().join(f), dir.join(f)).unwrap();
    }
}

/// Runs a merge of `dir`'s adapter into `base`, expecting an error, and
/// checks that `dir` holds no new file afterwards.
fn merge_fails(dir: &Path, base: &Path) -> HfError {
    let before: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    let out = dir.join("out.safetensors");
    let err = HfAdapter::read_dir(dir).and_then(|ad| {
        let b = Base::open(base)?;
        merge(&b, &ad, &out, &MergeOptions::default(), &Faer::new(), |_| {})
    });
    let after: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(before, after, "files appeared");
    assert!(!out.exists());
    err.unwrap_err().into_root()
}

/// A safetensors file from a header string and data bytes.
fn raw_safetensors(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, v.to_string()).unwrap();
}

#[test]
fn config_problems() {
    let dir = scratch("config");
    copy_fixture(&dir);
    let base = dir.join("base.safetensors");

    std::fs::remove_file(dir.join("adapter_config.json")).unwrap();
    let e = merge_fails(&dir, &base);
    assert!(matches!(&e, HfError::Io(p, _) if p.ends_with("adapter_config.json")), "{e}");

    std::fs::write(dir.join("adapter_config.json"), b"{\"peft_type\": \"LORA\", \xff\xfe}").unwrap();
    let e = merge_fails(&dir, &base);
    assert!(matches!(&e, HfError::Config { reason, .. } if reason.contains("UTF-8")), "{e}");

    std::fs::write(dir.join("adapter_config.json"), b"{ not json").unwrap();
    assert!(matches!(merge_fails(&dir, &base), HfError::Json(_)));

    for method in ["POLY", "XLORA", "GRALORA", "WAVEFT"] {
        copy_fixture(&dir);
        edit_config(&dir, |c| c["peft_type"] = method.into());
        let e = merge_fails(&dir, &base);
        assert!(matches!(&e, HfError::Unsupported(m) if m.contains("peft_type") && m.contains(method)), "{e}");
    }
    // An IA3 config over LoRA tensors: the tensors are refused, named.
    copy_fixture(&dir);
    edit_config(&dir, |c| c["peft_type"] = "IA3".into());
    let e = merge_fails(&dir, &base);
    assert!(matches!(&e, HfError::UnexpectedKey { key, method: "(IA)^3" } if key.contains("lora_A")), "{e}");

    copy_fixture(&dir);
    edit_config(&dir, |c| c["r"] = 8.into());
    let e = merge_fails(&dir, &base);
    assert!(
        matches!(&e, HfError::RankMismatch { config: 8, tensors: 4, module } if module == "layers.0.q_proj"),
        "{e}"
    );
    assert!(e.to_string().contains("rank 8"));

    copy_fixture(&dir);
    edit_config(&dir, |c| {
        c.as_object_mut().unwrap().remove("lora_alpha");
    });
    let e = merge_fails(&dir, &base);
    assert!(matches!(&e, HfError::Config { field, .. } if field == "lora_alpha"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn base_problems() {
    let dir = scratch("base");
    copy_fixture(&dir);
    // A base without layers.0.q_proj.weight, and one where it has another
    // shape (written with the safetensors crate from the fixture's bytes).
    let bytes = std::fs::read(dir.join("base.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let rest: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.tensors().into_iter().filter(|(k, _)| k != "layers.0.q_proj.weight").collect();
    let missing = dir.join("missing.safetensors");
    safetensors::serialize_to_file(rest.clone(), &None, &missing).unwrap();
    let e = merge_fails(&dir, &missing);
    assert!(matches!(&e, HfError::Base(m) if m.contains("layers.0.q_proj.weight") && m.contains("missing")), "{e}");

    let q = st.tensor("layers.0.q_proj.weight").unwrap();
    let reshaped = safetensors::tensor::TensorView::new(q.dtype(), vec![16, 64], q.data()).unwrap();
    let mut all = rest;
    all.push(("layers.0.q_proj.weight".into(), reshaped));
    let wrong = dir.join("wrong.safetensors");
    safetensors::serialize_to_file(all, &None, &wrong).unwrap();
    let e = merge_fails(&dir, &wrong);
    assert!(matches!(&e, HfError::Base(m) if m.contains("[16, 64]")), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn safetensors_problems() {
    let dir = scratch("st");
    copy_fixture(&dir);
    let base = dir.join("base.safetensors");
    let good = std::fs::read(&base).unwrap();

    // Truncated base (header intact, data cut).
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &good[..good.len() - 100]).unwrap();
    assert!(matches!(merge_fails(&dir, &cut), HfError::Safetensors(..)));
    // Truncated inside the header, and shorter than the length prefix.
    std::fs::write(&cut, &good[..20]).unwrap();
    assert!(matches!(merge_fails(&dir, &cut), HfError::Safetensors(..)));
    std::fs::write(&cut, &good[..5]).unwrap();
    assert!(matches!(merge_fails(&dir, &cut), HfError::Safetensors(..)));

    // A header that claims more data than the file holds.
    let big =
        raw_safetensors(r#"{"w":{"dtype":"F32","shape":[1000000,1000],"data_offsets":[0,4000000000]}}"#, &[0; 16]);
    let p = dir.join("big.safetensors");
    std::fs::write(&p, big).unwrap();
    let e = merge_fails(&dir, &p);
    assert!(matches!(&e, HfError::Safetensors(..)), "{e}");

    // A header length beyond the file.
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&p, huge).unwrap();
    assert!(matches!(merge_fails(&dir, &p), HfError::Safetensors(..)));

    // Duplicate keys (a JSON map would silently keep the last one).
    let dup = raw_safetensors(
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
        &[0; 8],
    );
    std::fs::write(&p, dup).unwrap();
    let e = merge_fails(&dir, &p);
    assert!(matches!(&e, HfError::DuplicateKey(_, k) if k == "a"), "{e}");

    // The same problems in the adapter file.
    std::fs::write(dir.join("adapter_model.safetensors"), &good[..good.len() / 2]).unwrap();
    assert!(matches!(merge_fails(&dir, &base), HfError::Safetensors(..)));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn index_naming_a_missing_shard() {
    let dir = scratch("shard");
    copy_fixture(&dir);
    let sharded = dir.join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    std::fs::copy(dir.join("base.safetensors"), sharded.join("model-00001-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({ "weight_map": {
        "layers.0.q_proj.weight": "model-00001-of-00002.safetensors",
        "layers.1.q_proj.weight": "model-00002-of-00002.safetensors",
    }});
    std::fs::write(sharded.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = merge_fails(&dir, &sharded);
    assert!(matches!(&e, HfError::MissingShard(p) if p.ends_with("model-00002-of-00002.safetensors")), "{e}");
    // A shard name that tries to leave the folder.
    let index = serde_json::json!({ "weight_map": { "layers.0.q_proj.weight": "../base.safetensors" } });
    std::fs::write(sharded.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert!(matches!(merge_fails(&dir, &sharded), HfError::Base(_)));
    std::fs::remove_dir_all(&dir).ok();
}

/// A DoRA magnitude in an adapter whose config does not say `use_dora`.
#[test]
fn unexpected_adapter_key() {
    let dir = scratch("key");
    copy_fixture(&dir);
    let bytes = std::fs::read(fixture().join("adapter_model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut all = st.tensors();
    let (_, v) = all[0].clone();
    all.push(("base_model.model.layers.0.q_proj.lora_magnitude_vector".into(), v));
    safetensors::serialize_to_file(all, &None, &dir.join("adapter_model.safetensors")).unwrap();
    let e = merge_fails(&dir, &dir.join("base.safetensors"));
    assert!(matches!(&e, HfError::FieldTensor { field: "use_dora", present: true, .. }), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
