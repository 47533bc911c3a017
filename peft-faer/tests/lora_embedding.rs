//! LoRA on an embedding table against the `lora_embedding` fixture PEFT
//! 0.21.2 wrote (see `tests/fixtures/peft/README.md`): `peft merge`
//! against `merge_and_unload` (`E' = E + s (B A)^T`), the lookup forward
//! against PEFT's module output for token ids, and `peft convert` both
//! ways.
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use peft_core::lora::LoraEmbedding;
use peft_core::{MatMut, Reference};
use peft_faer::hf::convert::{own_to_peft_dir, peft_dir_to_own};
use peft_faer::hf::{HfAdapter, PeftConfig};
use safetensors::{Dtype, SafeTensors};

use common::{case_dir, load, max_rel, scratch};

#[test]
fn embedding_merge_and_lookup_match_peft() {
    let dir = scratch("emb-merge");
    let out = dir.join("merged.safetensors");
    let res = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(["merge", "--base"])
        .arg(case_dir("lora_embedding").join("base.safetensors"))
        .arg("--adapter")
        .arg(case_dir("lora_embedding"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    // `ref.safetensors` holds int64 ids, which `load` does not: read the
    // float tensors from a filtered copy of its header instead.
    let bytes = std::fs::read(case_dir("lora_embedding").join("ref.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let f32s = |name: &str| -> Vec<f32> {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::F32);
        t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    };
    let got = load(&out);
    for name in st.names().into_iter().filter_map(|n| n.strip_prefix("merged.")) {
        let rel = max_rel(&got[name].2, &f32s(&format!("merged.{name}")));
        assert!(rel <= 1e-5, "{name}: relative error {rel:.2e}");
    }
    // The lookup forward for PEFT's ids.
    let ids_t = st.tensor("x.embed_tokens").unwrap();
    assert_eq!(ids_t.dtype(), Dtype::I64);
    let ids: Vec<usize> =
        ids_t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as usize).collect();
    let ad = HfAdapter::read_dir(&case_dir("lora_embedding")).unwrap();
    let PeftConfig::Lora(lc) = &ad.config else { panic!("not LoRA") };
    let m = ad.modules.iter().find(|m| m.embedding).expect("the embedding module");
    assert_eq!((m.name.as_str(), m.n_in, m.n_out), ("embed_tokens", 100, 64));
    let lora = LoraEmbedding::new(&lc.core_config_for(&m.name), m.n_in, m.n_out, &m.a[..], &m.b[..]).unwrap();
    let table = &load(&case_dir("lora_embedding").join("base.safetensors"))["embed_tokens.weight"].2;
    let mut y = vec![0.0f32; ids.len() * m.n_out];
    let mut sc = vec![0.0f32; lora.scratch_len(ids.len())];
    lora.forward(&Reference, table, &ids, MatMut::new(&mut y, ids.len(), m.n_out).unwrap(), &mut sc).unwrap();
    let rel = max_rel(&y, &f32s("y.embed_tokens"));
    assert!(rel <= 1e-5, "embed_tokens forward: relative error {rel:.2e}");
}

#[test]
fn embedding_adapters_convert_both_ways_bit_for_bit() {
    let dir = scratch("emb-convert");
    let own = peft_dir_to_own(&case_dir("lora_embedding")).unwrap();
    own_to_peft_dir(&own, &dir.join("back"), false).unwrap();
    let (got, want) = (
        load(&dir.join("back/adapter_model.safetensors")),
        load(&case_dir("lora_embedding").join("adapter_model.safetensors")),
    );
    assert_eq!(got, want);
    assert!(want.keys().any(|k| k.ends_with(".lora_embedding_A")));
    assert_eq!(peft_dir_to_own(&dir.join("back")).unwrap(), own);
}
