//! LoRA with a variant that acts in PEFT's training only, against the
//! `lora_velora` and `lora_monteclora` fixtures PEFT 0.21.2 wrote (see
//! `tests/fixtures/peft/README.md`). Each module also saves tensors of the
//! variant (VeLoRA's `lora_velora_embed`, MonteCLoRA's sampler state), but
//! PEFT's eval forward and merge are plain LoRA: `peft merge` against
//! PEFT's `merge_and_unload`, each module's forward against PEFT's eval
//! output, and the folder written back and converted with the variant's
//! tensors unchanged.
#![cfg(feature = "cli")]

mod common;

use peft_faer::hf::{HfAdapter, HfError, PeftConfig};

use common::{assert_converts_bit_for_bit, assert_merge_matches, assert_module_forward, case_dir, load, scratch};

#[test]
fn velora_and_monteclora_run_and_merge_as_plain_lora() {
    // (fixture, the variant's key, its tensors per module)
    for (case, key, per_module) in
        [("lora_velora", ".lora_velora_embed", 1), ("lora_monteclora", ".lora_monteclora_sampler.", 4)]
    {
        let dir = case_dir(case);
        let (_, refs, base) = assert_merge_matches(&dir);
        let ad = HfAdapter::read_dir(&dir).unwrap();
        let PeftConfig::Lora(lc) = &ad.config else { panic!("{case}: not LoRA") };
        assert_eq!((lc.velora, lc.monteclora), (case == "lora_velora", case == "lora_monteclora"), "{case}");
        assert_eq!(ad.modules.len(), 6, "{case}: q, v and o in two layers");
        assert_eq!(ad.training_state.len(), 6 * per_module, "{case}");
        assert!(ad.training_state.iter().all(|t| t.name.contains(key)), "{case}");
        for m in &ad.modules {
            assert_module_forward(&base, &refs, &m.name, &mut m.lora().unwrap());
        }
        let out = scratch(&format!("{case}-back"));
        ad.write_dir(&out.join("back"), false).unwrap();
        assert_eq!(load(&out.join("back/adapter_model.safetensors")), load(&dir.join("adapter_model.safetensors")));
        assert_converts_bit_for_bit(&dir);
        let res = std::process::Command::new(env!("CARGO_BIN_EXE_peft")).arg("inspect").arg(&dir).output().unwrap();
        let text = String::from_utf8_lossy(&res.stdout);
        assert!(res.status.success() && text.contains("acts in training only"), "{case}: {text}");
        std::fs::remove_dir_all(&out).ok();
    }
}

/// Without `velora_config`, a `lora_velora_embed` is a key LoRA does not
/// have: refused, naming it.
#[test]
fn a_variant_tensor_without_its_config_is_refused() {
    let (src, dir) = (case_dir("lora_velora"), scratch("velora-no-config"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(src.join("adapter_model.safetensors"), dir.join("adapter_model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("adapter_config.json")).unwrap()).unwrap();
    config["velora_config"] = serde_json::Value::Null;
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let err = HfAdapter::read_dir(&dir).map_err(HfError::into_root).unwrap_err();
    assert!(
        matches!(&err, HfError::UnexpectedKey { key, method: "LoRA" } if key.ends_with(".lora_velora_embed")),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
