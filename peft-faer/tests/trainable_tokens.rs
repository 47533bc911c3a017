//! Trainable tokens against the `trainable_tokens` fixture PEFT 0.21.2
//! wrote (see `tests/fixtures/peft/README.md`:
//! `TrainableTokensConfig(token_indices=[42, 7, 99, 0, 13])` on
//! `embed_tokens` = `Embedding(100, 64)`, unsorted and holding the first
//! and last ids): `peft merge` against PEFT's `merge_and_unload`,
//! `peft_core::trainable_tokens` against PEFT's unmerged lookup, the folder
//! written back and converted bit for bit, `inspect`, and the refusals.
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use peft_core::MatMut;
use peft_faer::Faer;
use peft_faer::hf::base::Base;
use peft_faer::hf::merge::{MergeOptions, merge, merge_many};
use peft_faer::hf::{HfAdapter, PeftConfig};

use common::{assert_converts_bit_for_bit, assert_merge_matches, case_dir, edited, load, scratch};

#[test]
fn trainable_tokens_merge_and_lookup_match_peft() {
    let dir = case_dir("trainable_tokens");
    let (merged, refs, base) = assert_merge_matches(&dir);
    let ad = HfAdapter::read_dir(&dir).unwrap();
    assert!(matches!(ad.config, PeftConfig::TrainableTokens(_)));
    let [m] = &ad.trainable_tokens[..] else { panic!("one embedding") };
    assert_eq!((m.name.as_str(), &m.indices[..], m.dim), ("embed_tokens", &[42, 7, 99, 0, 13][..], 64));
    // The merge replaces rows: PEFT's merged table exactly, every other row the base's.
    let (table, got) = (&base["embed_tokens.weight"].2, &merged["embed_tokens.weight"].2);
    assert_eq!(got, &refs["merged.embed_tokens.weight"].2);
    for v in 0..100 {
        let row = &got[v * 64..(v + 1) * 64];
        match m.indices.iter().position(|&i| i as usize == v) {
            Some(i) => assert_eq!(row, &m.rows[i * 64..(i + 1) * 64], "token {v}: row {i} of the adapter"),
            None => assert_eq!(row, &table[v * 64..(v + 1) * 64], "token {v}: the base's"),
        }
    }
    // PEFT's unmerged lookup of 8 ids (every trained token, 7 twice, and 5 and 64 untrained): exact.
    let ids: Vec<usize> = refs["x.embed_tokens"].2.iter().map(|&v| v as usize).collect();
    let mut y = vec![0.0f32; ids.len() * 64];
    m.layer(100).unwrap().forward(table, &ids, MatMut::new(&mut y, ids.len(), 64).unwrap()).unwrap();
    assert_eq!(y, refs["y.embed_tokens"].2);
    let back = scratch("trainable-tokens-back");
    ad.write_dir(&back.join("back"), false).unwrap();
    assert_eq!(load(&back.join("back/adapter_model.safetensors")), load(&dir.join("adapter_model.safetensors")));
    assert_converts_bit_for_bit(&dir);
    let res = Command::new(env!("CARGO_BIN_EXE_peft")).arg("inspect").arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success() && text.contains("method trainable_tokens"), "{text}");
    // By hand: 5 rows of 64.
    assert!(text.contains("total: 1 modules, 320 trainable parameters"), "{text}");
}

#[test]
fn trainable_tokens_refusals_name_the_field() {
    let merge_err = |dir: &std::path::Path| {
        let case = case_dir("trainable_tokens");
        let out = scratch("trainable-tokens-refused").join("merged.safetensors");
        let err = HfAdapter::read_dir(dir).and_then(|ad| {
            let base = Base::open(&case.join("base.safetensors"))?;
            merge(&base, &ad, &out, &MergeOptions::default(), &Faer::new(), |_| {}).map(|_| ())
        });
        assert!(!out.exists(), "nothing written");
        err.unwrap_err().to_string()
    };
    // A token listed twice: PEFT's index_copy leaves the winner unspecified.
    let dir = edited("trainable_tokens", "tt-twice", |c| c["token_indices"] = serde_json::json!([42, 7, 42, 0, 13]));
    let err = merge_err(&dir);
    assert!(err.contains("token_indices") && err.contains("once"), "{err}");
    // A token outside the base's vocabulary of 100.
    let dir = edited("trainable_tokens", "tt-outside", |c| c["token_indices"] = serde_json::json!([42, 7, 100, 0, 13]));
    let err = merge_err(&dir);
    assert!(err.contains("token_indices") && err.contains("embed_tokens"), "{err}");
    // Four indices for five saved rows: the tensor's shape is named.
    let dir = edited("trainable_tokens", "tt-four", |c| c["token_indices"] = serde_json::json!([42, 7, 99, 0]));
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("trainable_tokens_delta") && err.contains("[4, dim]"), "{err}");
    // A multiplier has nothing to scale in a replacement.
    let case = case_dir("trainable_tokens");
    let (ad, base) = (HfAdapter::read_dir(&case).unwrap(), Base::open(&case.join("base.safetensors")).unwrap());
    let out = scratch("tt-scaled").join("merged.safetensors");
    let err = merge_many(&base, &[(&ad, 2.0)], &out, &MergeOptions::default(), &Faer::new(), |_| {});
    let err = err.unwrap_err().to_string();
    assert!(err.contains("multiplier") && err.contains("TRAINABLE_TOKENS"), "{err}");
}
