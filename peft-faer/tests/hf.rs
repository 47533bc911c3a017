//! Hugging Face PEFT interoperability against the fixture written by PEFT
//! 0.21.2 (`tests/fixtures/peft/lora_qv`, a copy of peft-verify's: its `ref.safetensors`
//! holds PEFT's own `merge_and_unload` weights as `merged.<name>`), and a
//! suite of malformed inputs, each a clear error with no output written.
#![cfg(feature = "cli")]

mod common;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use peft_faer::Faer;
use peft_faer::hf::base::Base;
use peft_faer::hf::convert::{own_to_peft_dir, peft_dir_to_own};
use peft_faer::hf::merge::{MergeOptions, merge};
use peft_faer::hf::{HfAdapter, HfError};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use common::{fixture, load, max_rel, scratch};

/// Writes tensors with the `safetensors` crate.
fn save(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)], meta: Option<HashMap<String, String>>) {
    let views: Vec<(String, TensorView<'_>)> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, &meta, path).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn merge_into(base: &Path, adapter: &Path, out: &Path) -> Result<(), HfError> {
    let ad = HfAdapter::read_dir(adapter)?;
    let b = Base::open(base)?;
    merge(&b, &ad, out, &MergeOptions::default(), &Faer::new(), |_| {}).map(|_| ())
}

#[test]
fn merge_reproduces_peft_merge_and_unload() {
    let dir = scratch("merge");
    let out = dir.join("merged.safetensors");
    merge_into(&fixture().join("base.safetensors"), &fixture(), &out).unwrap();
    let merged = load(&out);
    let refs = load(&fixture().join("ref.safetensors"));
    let base = load(&fixture().join("base.safetensors"));
    assert_eq!(merged.len(), base.len());
    for (name, (_, shape, data)) in &merged {
        let (_, rshape, want) = &refs[&format!("merged.{name}")];
        assert_eq!(shape, rshape);
        let e = max_rel(data, want);
        assert!(e <= 1e-6, "{name}: relative error {e}");
    }
    // Untouched tensors are copied bit for bit.
    assert_eq!(merged["layers.0.k_proj.weight"].2, base["layers.0.k_proj.weight"].2);
    // Storage order is the base's.
    let order = |p: &Path| {
        let b = std::fs::read(p).unwrap();
        let (_, m) = SafeTensors::read_metadata(&b).unwrap();
        let mut v: Vec<(usize, String)> = m.tensors().into_iter().map(|(k, i)| (i.data_offsets.0, k)).collect();
        v.sort();
        v.into_iter().map(|(_, k)| k).collect::<Vec<_>>()
    };
    assert_eq!(order(&out), order(&fixture().join("base.safetensors")));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cli_inspect_and_merge_on_the_fixture() {
    let peft = env!("CARGO_BIN_EXE_peft");
    let out = Command::new(peft).args(["inspect", "--json"]).arg(fixture()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let modules: Vec<&str> = doc["modules"].as_array().unwrap().iter().map(|m| m["module"].as_str().unwrap()).collect();
    assert_eq!(modules, ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]);
    for m in doc["modules"].as_array().unwrap() {
        assert_eq!((m["r"].as_u64(), m["alpha"].as_f64(), m["scale"].as_f64()), (Some(4), Some(8.0), Some(2.0)));
    }
    assert_eq!(doc["modules"][1]["out"], 24);
    assert_eq!(doc["total_params"], 960);

    let dir = scratch("cli");
    let merged = dir.join("merged.safetensors");
    let st = Command::new(peft)
        .current_dir(fixture())
        .args(["merge", "--base", "base.safetensors", "--adapter", ".", "--out"])
        .arg(&merged)
        .status()
        .unwrap();
    assert!(st.success());
    let refs = load(&fixture().join("ref.safetensors"));
    for (name, (_, _, data)) in load(&merged) {
        assert!(max_rel(&data, &refs[&format!("merged.{name}")].2) <= 1e-6, "{name}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The fixture's base split into two shards with an index; the sharded
/// merge equals the single-file merge, shard by shard.
#[test]
fn sharded_base_merges_like_a_single_file() {
    let dir = scratch("sharded");
    let base = load(&fixture().join("base.safetensors"));
    let shard_dir = dir.join("base");
    std::fs::create_dir_all(&shard_dir).unwrap();
    let mut names: Vec<&String> = base.keys().collect();
    names.sort();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let tensors: Vec<_> = chunk
            .iter()
            .map(|n| {
                weight_map.insert((*n).clone(), file.clone().into());
                ((*n).clone(), Dtype::F32, base[*n].1.clone(), f32_bytes(&base[*n].2))
            })
            .collect();
        save(&shard_dir.join(&file), &tensors, None);
    }
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
    std::fs::write(shard_dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let out = dir.join("merged");
    merge_into(&shard_dir, &fixture(), &out).unwrap();
    let single = dir.join("single.safetensors");
    merge_into(&fixture().join("base.safetensors"), &fixture(), &single).unwrap();
    let want = load(&single);
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap()).unwrap();
    let mut seen = 0;
    for i in 1..=2 {
        for (name, (_, _, data)) in load(&out.join(format!("model-0000{i}-of-00002.safetensors"))) {
            assert_eq!(data, want[&name].2, "{name}");
            assert_eq!(index["weight_map"][&name], format!("model-0000{i}-of-00002.safetensors"));
            seen += 1;
        }
    }
    assert_eq!(seen, want.len());
    assert_eq!(index["metadata"]["total_size"], 28864);
    // A sharded output never overwrites an existing folder.
    assert!(matches!(merge_into(&shard_dir, &fixture(), &out), Err(HfError::OutputExists(_))));
    std::fs::remove_dir_all(&dir).ok();
}

/// A bf16 base merged to bf16: each adapted weight is round(W + s B A)
/// computed in f32 and rounded once (checked against an f64 oracle of the
/// same rounding: at most one bf16 ulp apart, where the f32 sum sits on a
/// rounding boundary), and copies stay bit-exact.
#[test]
fn half_precision_base_is_rounded_once() {
    let dir = scratch("bf16");
    let base = load(&fixture().join("base.safetensors"));
    let tensors: Vec<_> = base
        .iter()
        .map(|(n, (_, s, d))| {
            let b: Vec<u8> = d.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect();
            (n.clone(), Dtype::BF16, s.clone(), b)
        })
        .collect();
    let base16 = dir.join("base16.safetensors");
    save(&base16, &tensors, None);
    let out = dir.join("out.safetensors");
    merge_into(&base16, &fixture(), &out).unwrap();
    let got = load(&out);
    let b16 = load(&base16);
    let ad = load(&fixture().join("adapter_model.safetensors"));
    for (name, (dtype, shape, data)) in &got {
        assert_eq!(*dtype, Dtype::BF16);
        let module = name.strip_suffix(".weight").unwrap_or(name);
        let key = |x: &str| format!("base_model.model.{module}.lora_{x}.weight");
        let w = &b16[name].2;
        let Some((_, sa, a)) = ad.get(&key("A")) else {
            assert_eq!(data, w, "{name} copied");
            continue;
        };
        let (_, _, b) = &ad[&key("B")];
        let (r, n_in, n_out) = (sa[0], sa[1], shape[0]);
        for o in 0..n_out {
            for i in 0..n_in {
                let delta: f64 =
                    (0..r).map(|k| f64::from(b[o * r + k]) * f64::from(a[k * n_in + i])).sum::<f64>() * 2.0;
                let want = half::bf16::from_f64(f64::from(w[o * n_in + i]) + delta).to_f32();
                let g = data[o * n_in + i];
                let ulp = half::bf16::from_f32(want.abs()).to_f32() * 2f32.powi(-7);
                assert!((g - want).abs() <= ulp, "{name}[{o},{i}]: {g} vs {want}");
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A copy of the fixture adapter with its config edited.
fn adapter_with(dir: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("adapter_config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(d.join("adapter_config.json"), cfg.to_string()).unwrap();
    std::fs::copy(fixture().join("adapter_model.safetensors"), d.join("adapter_model.safetensors")).unwrap();
    d
}

#[test]
fn config_fields_that_change_the_math() {
    let dir = scratch("fields");
    // alpha_pattern (PEFT's rule: first key in file order whose regex
    // matches a dotted suffix), float alpha, rsLoRA.
    let d = adapter_with(&dir, "pat", |c| {
        c["alpha_pattern"] = serde_json::json!({ "0.q_proj": 16, "q_proj": 4.5 });
        c["lora_alpha"] = serde_json::json!(8.0);
        c["use_rslora"] = serde_json::json!(true);
    });
    let ad = HfAdapter::read_dir(&d).unwrap();
    let scales: Vec<(String, f64)> = ad.modules.iter().map(|m| (m.name.clone(), m.scale)).collect();
    assert_eq!(
        scales,
        [
            ("layers.0.q_proj".into(), 16.0 / 2.0),
            ("layers.0.v_proj".into(), 8.0 / 2.0),
            ("layers.1.q_proj".into(), 4.5 / 2.0),
            ("layers.1.v_proj".into(), 8.0 / 2.0),
        ]
    );
    // rank_pattern that disagrees with the tensors.
    let d = adapter_with(&dir, "rank", |c| c["rank_pattern"] = serde_json::json!({ "v_proj": 8 }));
    assert!(matches!(
        HfAdapter::read_dir(&d).map_err(HfError::into_root),
        Err(HfError::RankMismatch { config: 8, tensors: 4, .. })
    ));
    // target_modules as a regex, and layers_to_transform.
    let d = adapter_with(&dir, "regex", |c| c["target_modules"] = serde_json::json!(r"layers\.\d+\.(q|v)_proj"));
    assert!(HfAdapter::read_dir(&d).is_ok());
    let d = adapter_with(&dir, "regex_miss", |c| c["target_modules"] = serde_json::json!(r"layers\.\d+\.q_proj"));
    assert!(matches!(
        HfAdapter::read_dir(&d).map_err(HfError::into_root),
        Err(HfError::Untargeted { module, method: "LoRA" }) if module.ends_with("layers.0.v_proj")
    ));
    let d = adapter_with(&dir, "layers", |c| c["layers_to_transform"] = serde_json::json!([0]));
    assert!(matches!(
        HfAdapter::read_dir(&d).map_err(HfError::into_root),
        Err(HfError::Untargeted { module, .. }) if module.ends_with("layers.1.q_proj")
    ));
    // DoRA is read, and a DoRA config needs the magnitude vectors.
    let d = adapter_with(&dir, "dora", |c| c["use_dora"] = serde_json::json!(true));
    assert!(matches!(
        HfAdapter::read_dir(&d).map_err(HfError::into_root),
        Err(HfError::FieldTensor { field: "use_dora", tensor, present: false }) if tensor.ends_with("lora_magnitude_vector")
    ));
    // Fields whose math is not implemented are errors naming the field.
    // `init_lora_weights` is compared as PEFT's `LoraLayer.update_layer`
    // compares it: "OLoRA" (the documented spelling) is olora, and
    // "lora_ga..." / "corda..." are prefixes.
    for (i, (field, value)) in [
        ("eva_config", serde_json::json!({ "rho": 2.0 })),
        ("init_lora_weights", serde_json::json!("loftq")),
        ("init_lora_weights", serde_json::json!("OLoRA")),
        ("init_lora_weights", serde_json::json!("lora_ga")),
        ("init_lora_weights", serde_json::json!("corda_ipm")),
        ("init_lora_weights", serde_json::json!("pissa_niter_4")),
        ("use_qalora", serde_json::json!(true)),
        ("kasa_config", serde_json::json!({ "r": 4 })),
        ("arrow_config", serde_json::json!({ "top_k": 2 })),
        ("use_bdlora", serde_json::json!(true)),
    ]
    .into_iter()
    .enumerate()
    {
        let d = adapter_with(&dir, &format!("{field}{i}"), |c| c[field] = value.clone());
        let err = HfAdapter::read_dir(&d).unwrap_err().into_root();
        assert!(matches!(&err, HfError::Unsupported(m) if m.contains(field)), "{field} = {value}: {err}");
    }
    // An init that leaves the base alone is read.
    let d = adapter_with(&dir, "gaussian", |c| c["init_lora_weights"] = serde_json::json!("gaussian"));
    assert!(HfAdapter::read_dir(&d).is_ok());
    std::fs::remove_dir_all(&dir).ok();
}

/// `bias = "all"`: PEFT saves the trained bias of a targeted module under
/// its wrapper, `<module>.base_layer.bias`; the merge writes it in place of
/// the base's bias (as saved) and merges the LoRA as before (PEFT's
/// `merge_and_unload` of the unchanged factors: `ref.safetensors`).
#[test]
fn trained_biases_under_base_layer_are_written() {
    let dir = scratch("base-layer-bias");
    let mut tensors = load(&fixture().join("adapter_model.safetensors"));
    let bias = |l: usize| (0..24).map(|k| (l * 24 + k) as f32 * 0.01 - 0.1).collect::<Vec<f32>>();
    for l in 0..2 {
        tensors.insert(format!("base_model.model.layers.{l}.v_proj.base_layer.bias"), (Dtype::F32, vec![24], bias(l)));
    }
    let d = adapter_with(&dir, "biased", |c| c["bias"] = serde_json::json!("all"));
    let list: Vec<_> = tensors.iter().map(|(n, (_, s, v))| (n.clone(), Dtype::F32, s.clone(), f32_bytes(v))).collect();
    save(&d.join("adapter_model.safetensors"), &list, None);
    let out = dir.join("merged.safetensors");
    let peft = env!("CARGO_BIN_EXE_peft");
    let res = Command::new(peft)
        .arg("merge")
        .arg("--base")
        .arg(fixture().join("base.safetensors"))
        .arg("--adapter")
        .arg(&d)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let (got, refs) = (load(&out), load(&fixture().join("ref.safetensors")));
    for l in 0..2 {
        assert_eq!(got[&format!("layers.{l}.v_proj.bias")].2, bias(l), "the trained bias, as saved");
        let w = format!("layers.{l}.v_proj.weight");
        assert!(max_rel(&got[&w].2, &refs[&format!("merged.{w}")].2) <= 1e-6, "{w}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A folder holding both `model.safetensors` and an index is read from
/// `model.safetensors`, as transformers' `from_pretrained` reads it (here
/// the index names a shard that is not there: reading it would fail).
#[test]
fn a_single_file_beside_an_index_is_what_is_read() {
    let dir = scratch("single-and-index");
    std::fs::copy(fixture().join("base.safetensors"), dir.join("model.safetensors")).unwrap();
    let index = r#"{"metadata": {"total_size": 4}, "weight_map": {"w": "model-00001-of-00001.safetensors"}}"#;
    std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
    let base = Base::open(&dir).unwrap();
    let single = Base::open(&fixture().join("base.safetensors")).unwrap();
    let names = |b: &Base| b.entries().map(|(_, e)| e.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&base), names(&single));
    std::fs::remove_dir_all(&dir).ok();
}

/// fan_in_fan_out (GPT-2 `Conv1D`, weights `[in, out]`, the base's
/// `config.json` saying `gpt2`): the merge adds `s (B A)^T`, which equals
/// PEFT's merge of the transposed base.
#[test]
fn fan_in_fan_out_merges_the_transpose() {
    let dir = scratch("fifo");
    let base = load(&fixture().join("base.safetensors"));
    let tensors: Vec<_> = base
        .iter()
        .map(|(n, (_, s, d))| {
            if s.len() == 2 {
                let (r, c) = (s[0], s[1]);
                let t: Vec<f32> = (0..c * r).map(|k| d[(k % r) * c + k / r]).collect();
                (n.clone(), Dtype::F32, vec![c, r], f32_bytes(&t))
            } else {
                (n.clone(), Dtype::F32, s.clone(), f32_bytes(d))
            }
        })
        .collect();
    let bt = dir.join("base_t.safetensors");
    save(&bt, &tensors, None);
    // q_proj is square: only the model type beside the base says it is a Conv1D.
    std::fs::write(dir.join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    let ad = adapter_with(&dir, "fifo", |c| c["fan_in_fan_out"] = serde_json::json!(true));
    let out = dir.join("out.safetensors");
    merge_into(&bt, &ad, &out).unwrap();
    let refs = load(&fixture().join("ref.safetensors"));
    for (name, (_, s, data)) in load(&out) {
        let (_, _, want) = &refs[&format!("merged.{name}")];
        if s.len() == 2 {
            let (c, r) = (s[0], s[1]);
            let back: Vec<f32> = (0..r * c).map(|k| data[(k % c) * r + k / c]).collect();
            assert!(max_rel(&back, want) <= 1e-6, "{name}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Written adapters read back equal, with PEFT's key names, shapes and
/// `{"format": "pt"}`.
#[test]
fn writer_produces_peft_layout() {
    let dir = scratch("write");
    let ad = HfAdapter::read_dir(&fixture()).unwrap();
    let out = dir.join("copy");
    ad.write_dir(&out, false).unwrap();
    let back = HfAdapter::read_dir(&out).unwrap();
    assert_eq!(back.modules, ad.modules);
    let want = load(&fixture().join("adapter_model.safetensors"));
    let got = load(&out.join("adapter_model.safetensors"));
    assert_eq!(got, want);
    let bytes = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    let cfg = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap()).unwrap()
    };
    assert_eq!(cfg(&out), cfg(&fixture()));
    assert!(matches!(ad.write_dir(&out, false), Err(HfError::OutputExists(_))));
    std::fs::remove_dir_all(&dir).ok();
}

/// The `.peft` file the firmware smoke test embeds and runs on the
/// Cortex-M4F (`peft-verify/firmware/adapters/lora_qv.peft`) is what `peft
/// convert` writes of the PEFT fixture, byte for byte: regenerate it with
/// `peft convert peft-faer/tests/fixtures/peft/lora_qv
/// peft-verify/firmware/adapters/lora_qv.peft --force` when the format
/// changes.
#[test]
fn the_firmware_embeds_the_converted_fixture() {
    let embedded =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../peft-verify/firmware/adapters/lora_qv.peft"));
    let Ok(embedded) = embedded else {
        // A packaged crate has no sibling folders; the workspace always does.
        eprintln!("peft-verify/firmware is not beside this crate: skipped");
        return;
    };
    assert_eq!(peft_dir_to_own(&fixture()).unwrap(), embedded);
}

/// PEFT -> .peft -> PEFT keeps every tensor bit for bit and the config,
/// and .peft -> PEFT -> .peft gives the same bytes, for PEFT-written LoRA,
/// prompt-tuning and prefix-tuning folders; a `.peft` file of bottleneck
/// adapters (no PEFT equivalent) is refused and nothing is written.
#[test]
fn convert_round_trips_are_bit_exact() {
    let dir = scratch("convert");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft");
    for (i, case) in ["lora_qv", "prompt_llama", "prefix_llama"].into_iter().enumerate() {
        let src = fixtures.join(case);
        let own = peft_dir_to_own(&src).unwrap();
        let back = dir.join(format!("back{i}"));
        own_to_peft_dir(&own, &back, false).unwrap();
        assert_eq!(
            load(&back.join("adapter_model.safetensors")),
            load(&src.join("adapter_model.safetensors")),
            "{case}"
        );
        assert_eq!(peft_dir_to_own(&back).unwrap(), own, "{case}: .peft -> PEFT -> .peft");
        let (a, b) = (HfAdapter::read_dir(&src).unwrap(), HfAdapter::read_dir(&back).unwrap());
        assert_eq!(std::mem::discriminant(&a.config), std::mem::discriminant(&b.config), "{case}");
        let mut b = b;
        match case {
            "prompt_llama" => assert_eq!(b.prompt_tuning().unwrap().prompt().len() % 8, 0),
            "prefix_llama" => assert!(!b.prefix_tuning().unwrap().kv().is_empty()),
            _ => assert!(b.prompt_tuning().is_err() && b.prefix_tuning().is_err()),
        }
    }
    // Bottleneck adapters: a valid `.peft` file, written with peft-core's
    // encoder, that has no PEFT folder.
    let w = [0.5f32; 4];
    let tensors = [peft_core::format::Tensor { name: "layers.0.down", shape: &[2, 2], data: &w[..] }];
    let config = [("bottleneck", peft_core::format::Value::U64(2))];
    let mut bytes = vec![0u8; peft_core::format::encoded_len(&config, &tensors).unwrap()];
    let n = peft_core::format::encode(peft_core::optim::Method::Adapter, &config, &tensors, &mut bytes).unwrap();
    bytes.truncate(n);
    assert!(matches!(own_to_peft_dir(&bytes, &dir.join("adapter"), false), Err(HfError::Unsupported(_))));
    assert!(!dir.join("adapter").exists());
    std::fs::remove_dir_all(&dir).ok();
}
