//! The Llama model against transformers + PEFT: the fixtures `prompt_llama`
//! and `prefix_llama` (a tiny `LlamaForCausalLM` with GQA, written by PEFT
//! 0.21.2 on transformers 5.24; see `tests/fixtures/peft/README.md`) hold
//! the model, the adapter, and PEFT's logits and intermediate tensors.
//! Hosted LoRA is checked against the same model with the adapter merged
//! by `peft merge` (an independent path: the merge is checked against
//! PEFT's own `merge_and_unload` in `tests/hf.rs`), and greedy decoding
//! through the KV cache against the full forward's argmax, step by step.
#![cfg(feature = "cli")]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use peft_faer::Faer;
use peft_faer::hf::HfAdapter;
use peft_faer::hf::base::Base;
use peft_faer::hf::merge::{MergeOptions, merge};
use peft_faer::llama::{KvCache, LAYER_NORMS, Llama, LlamaAdapter, LlamaGrads, Trace, argmax, lm_loss};
use safetensors::{Dtype, SafeTensors};

use common::{case_dir, scratch};

fn model(case: &str) -> Llama {
    let dir = if case == "tied_llama" { tied_llama() } else { case_dir(case) };
    Llama::load(&dir.join("base_config.json"), &dir.join("base.safetensors")).unwrap()
}

/// The `prompt_llama` model with its head tied to the embeddings
/// (`tie_word_embeddings`, no `lm_head.weight`), as SmolLM2's is.
fn tied_llama() -> PathBuf {
    let (dir, case) = (scratch("tied-llama"), case_dir("prompt_llama"));
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(case.join("base_config.json")).unwrap()).unwrap();
    cfg["tie_word_embeddings"] = true.into();
    std::fs::write(dir.join("base_config.json"), cfg.to_string()).unwrap();
    let bytes = std::fs::read(case.join("base.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st.tensors().into_iter().filter(|(k, _)| k != "lm_head.weight").collect();
    safetensors::serialize_to_file(kept, &None, &dir.join("base.safetensors")).unwrap();
    dir
}

/// `ref.safetensors`: f32 tensors as values, i64 ones (`input_ids`) widened.
fn refs(case: &str) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(case_dir(case).join("ref.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            let data = match v.dtype() {
                Dtype::F32 => {
                    v.data().chunks_exact(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap()))).collect()
                }
                Dtype::I64 => {
                    v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect()
                }
                d => panic!("{k}: {d:?}"),
            };
            (k, (v.shape().to_vec(), data))
        })
        .collect()
}

/// `max |got - want| / max |want|`.
fn rel(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    got.iter().zip(want).fold(0.0f64, |m, (g, w)| m.max((f64::from(*g) - w).abs())) / scale
}

fn ids(r: &HashMap<String, (Vec<usize>, Vec<f64>)>) -> Vec<u32> {
    r["input_ids"].1.iter().map(|&v| v as u32).collect()
}

#[test]
fn prompt_tuning_logits_match_peft() {
    let m = model("prompt_llama");
    let ad = HfAdapter::read_dir(&case_dir("prompt_llama")).unwrap();
    let hosted = LlamaAdapter::new(&m, &ad).unwrap();
    let r = refs("prompt_llama");
    let logits = m.forward(&Faer::new(), &ids(&r), Some(&hosted), &mut KvCache::new()).unwrap();
    // 5 virtual tokens + 7: PEFT's logits cover all 12 rows.
    assert_eq!(r["logits"].0, [1, 12, 100]);
    let e = rel(&logits, &r["logits"].1);
    eprintln!("prompt_llama: logits' relative error {e:.2e}");
    assert!(e <= 1e-4, "relative error {e}");
    // The prompt matters: without it the real rows differ by far more.
    let plain = m.forward(&Faer::new(), &ids(&r), None, &mut KvCache::new()).unwrap();
    assert!(rel(&plain, &r["logits"].1[5 * 100..]) > 1e-2);
}

#[test]
fn prefix_tuning_logits_match_peft_with_gqa() {
    let m = model("prefix_llama");
    let ad = HfAdapter::read_dir(&case_dir("prefix_llama")).unwrap();
    let hosted = LlamaAdapter::new(&m, &ad).unwrap();
    assert_eq!(hosted.virtual_tokens(), 4);
    let r = refs("prefix_llama");
    // RoPE of the real tokens, positions 4..10 (after the 4 prefix entries).
    let (pos_shape, pos) = &r["position_ids"];
    assert_eq!((pos_shape.as_slice(), pos[0]), ([1, 7].as_slice(), 4.0));
    for (i, &p) in pos.iter().enumerate() {
        let (cos, sin) = m.rope(p as usize);
        for k in 0..16 {
            let (wc, ws) = (r["rope_cos.0"].1[i * 16 + k], r["rope_sin.0"].1[i * 16 + k]);
            assert!((f64::from(cos[k % 8]) - wc).abs() <= 1e-6, "cos pos {p} {k}");
            assert!((f64::from(sin[k % 8]) - ws).abs() <= 1e-6, "sin pos {p} {k}");
        }
    }
    let logits = m.forward(&Faer::new(), &ids(&r), Some(&hosted), &mut KvCache::new()).unwrap();
    assert_eq!(r["logits"].0, [1, 7, 100]);
    let e = rel(&logits, &r["logits"].1);
    eprintln!("prefix_llama: logits' relative error {e:.2e}");
    assert!(e <= 1e-4, "relative error {e}");
}

/// A prefix-tuning folder with `prefix_projection = true` runs its saved
/// table as the prefix, as PEFT runs a folder loaded for inference (the
/// saved table is the projected prefix): the `prefix_llama` fixture with
/// that flag set gives PEFT's logits.
#[test]
fn a_projected_prefix_runs_its_saved_table() {
    let dir = scratch("prefix-projection");
    let case = case_dir("prefix_llama");
    std::fs::copy(case.join("adapter_model.safetensors"), dir.join("adapter_model.safetensors")).unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("adapter_config.json")).unwrap()).unwrap();
    config["prefix_projection"] = serde_json::json!(true);
    config["encoder_hidden_size"] = serde_json::json!(32);
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let m = model("prefix_llama");
    let ad = HfAdapter::read_dir(&dir).unwrap();
    let hosted = LlamaAdapter::new(&m, &ad).unwrap();
    let r = refs("prefix_llama");
    let logits = m.forward(&Faer::new(), &ids(&r), Some(&hosted), &mut KvCache::new()).unwrap();
    assert!(rel(&logits, &r["logits"].1) <= 1e-4);
    std::fs::remove_dir_all(&dir).ok();
}

/// A LoRA adapter on four projections of the `prompt_llama` base, written
/// as PEFT writes it (random `A` and `B`, so it changes the output).
fn lora_dir(dir: &Path) -> PathBuf {
    lora_dir_on(dir, "lora", &["q_proj", "v_proj", "gate_proj", "down_proj"])
}

/// [`lora_dir`] on the projections named (PEFT's short names).
fn lora_dir_on(dir: &Path, name: &str, targets: &[&str]) -> PathBuf {
    let config = serde_json::json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": targets, "fan_in_fan_out": false, "bias": "none", "use_rslora": false, "use_dora": false});
    let tensors = lora_tensors(&mut peft_core::Rng::new(16), targets);
    write_adapter(&dir.join(name), &config, &tensors)
}

/// Rank-4 LoRA factors `N(0, 0.04)` on the projections named, both layers,
/// under PEFT's keys.
fn lora_tensors(rng: &mut peft_core::Rng, targets: &[&str]) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut tensors = Vec::new();
    for l in 0..2 {
        for &(proj, n_out, n_in) in SHAPES.iter().filter(|(p, ..)| targets.iter().any(|t| p.ends_with(t))) {
            let key = format!("base_model.model.model.layers.{l}.{proj}");
            let (mut a, mut b) = (vec![0.0f32; 4 * n_in], vec![0.0f32; n_out * 4]);
            rng.fill_normal(&mut a, 0.2);
            rng.fill_normal(&mut b, 0.2);
            tensors.push((format!("{key}.lora_A.weight"), vec![4, n_in], a));
            tensors.push((format!("{key}.lora_B.weight"), vec![n_out, 4], b));
        }
    }
    tensors
}

/// Writes a PEFT adapter folder: `config` and the f32 `tensors` (name,
/// shape, values; SHiRA's `shira_indices` as I32, as PEFT saves them),
/// with the `safetensors` crate.
fn write_adapter(out: &Path, config: &serde_json::Value, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> PathBuf {
    std::fs::create_dir_all(out).unwrap();
    std::fs::write(out.join("adapter_config.json"), config.to_string()).unwrap();
    let int = |k: &str| k.ends_with("shira_indices");
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(k, _, v)| {
            if int(k) {
                v.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect()
            } else {
                v.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((k, s, _), b)| {
            let dtype = if int(k) { Dtype::I32 } else { Dtype::F32 };
            (k.clone(), safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, &None, &out.join("adapter_model.safetensors")).unwrap();
    out.to_path_buf()
}

/// The tokens `trainable_tokens` and `lora_tokens` train: unsorted, the
/// first id among them, and most of the ids the tests run.
const TOKENS: [u32; 7] = [3, 14, 91, 0, 7, 55, 79];

/// The shapes `(out, in)` of the seven projections of the fixtures' model.
const SHAPES: [(&str, usize, usize); 7] = [
    ("self_attn.q_proj", 64, 64),
    ("self_attn.k_proj", 32, 64),
    ("self_attn.v_proj", 32, 64),
    ("self_attn.o_proj", 64, 64),
    ("mlp.gate_proj", 128, 64),
    ("mlp.up_proj", 128, 64),
    ("mlp.down_proj", 64, 128),
];

/// A PEFT adapter folder of `method` (`dora`, `ia3`, `loha`, `lokr`,
/// `vera`, `adalora`, `miss_bat` with r 8, `miss_mini` with r 6 over inputs
/// of 64 and 128, the padded path, `hra` with r 4, `hra_gs` with r 3,
/// `road_1` and `road_4` in groups of 16, `c3a` in blocks of 16, `shira` at every 7th position of each weight, `oft` in blocks of 16 (the series, 5 terms), `oft_exact` one shared block of 8 (the exact transform); COFT's projection is outside PEFT's gradient, so finite differences cannot check it here: peft-verify's properties and the `oft_coft` fixture do), `boft` one factor in blocks of 8, `boft_butterfly` two factors in blocks of 4, `fourierft` 50 frequencies (seed 5, scaling 300), `randlora` r 8 over shared bases without per-module copies, `vblora` r 4 over 8 bank vectors of 16, top 2 on all seven projections of both layers of the fixtures' model
/// (`ln_tuning`: every norm of the model, weights `1 + N(0, 0.2^2)`),
/// written as PEFT names and shapes its tensors, with random values (so
/// that it changes the output). (IA)^3 scales the inputs of `up_proj` and
/// `down_proj` (`feedforward_modules`).
fn method_dir(dir: &Path, method: &str) -> PathBuf {
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let config = match method {
        "dora" => serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": targets,
            "use_dora": true, "use_rslora": false, "fan_in_fan_out": false, "bias": "none"}),
        "ia3" => serde_json::json!({"peft_type": "IA3", "target_modules": targets,
            "feedforward_modules": ["up_proj", "down_proj"], "fan_in_fan_out": false}),
        "loha" => serde_json::json!({"peft_type": "LOHA", "r": 4, "alpha": 8, "target_modules": targets,
            "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": false, "init_weights": true}),
        "lokr" => serde_json::json!({"peft_type": "LOKR", "r": 4, "alpha": 8, "target_modules": targets,
            "decompose_both": false, "decompose_factor": -1, "rank_dropout": 0.0, "module_dropout": 0.0,
            "use_effective_conv2d": false, "init_weights": true}),
        "vera" => serde_json::json!({"peft_type": "VERA", "r": 4, "target_modules": targets, "save_projection": true,
            "projection_prng_key": 0, "d_initial": 0.1, "fan_in_fan_out": false, "bias": "none"}),
        "adalora" => serde_json::json!({"peft_type": "ADALORA", "init_r": 4, "lora_alpha": 8, "total_step": 10,
            "target_modules": targets, "fan_in_fan_out": false, "bias": "none"}),
        "miss_bat" => {
            serde_json::json!({"peft_type": "MISS", "r": 8, "init_weights": "bat", "target_modules": targets})
        }
        "miss_mini" => serde_json::json!({"peft_type": "MISS", "r": 6, "mini_r": 4, "init_weights": "mini",
            "target_modules": targets}),
        "hra" => serde_json::json!({"peft_type": "HRA", "r": 4, "apply_GS": false, "target_modules": targets}),
        "hra_gs" => serde_json::json!({"peft_type": "HRA", "r": 3, "apply_GS": true, "target_modules": targets}),
        "oft" => serde_json::json!({"peft_type": "OFT", "r": 0, "oft_block_size": 16, "target_modules": targets}),
        "oft_exact" => serde_json::json!({"peft_type": "OFT", "r": 0, "oft_block_size": 8, "block_share": true,
            "use_cayley_neumann": false, "target_modules": targets}),
        "vblora" => serde_json::json!({"peft_type": "VBLORA", "r": 4, "num_vectors": 8, "vector_length": 16,
            "topk": 2, "target_modules": targets}),
        "randlora" => serde_json::json!({"peft_type": "RANDLORA", "r": 8, "randlora_alpha": 16,
            "save_projection": true, "target_modules": targets}),
        "fourierft" => serde_json::json!({"peft_type": "FOURIERFT", "n_frequency": 50, "scaling": 300.0,
            "random_loc_seed": 5, "target_modules": targets}),
        "boft" => serde_json::json!({"peft_type": "BOFT", "boft_block_size": 8, "target_modules": targets}),
        "boft_butterfly" => serde_json::json!({"peft_type": "BOFT", "boft_block_size": 4,
            "boft_n_butterfly_factor": 2, "target_modules": targets}),
        "c3a" => serde_json::json!({"peft_type": "C3A", "block_size": 16, "target_modules": targets}),
        "shira" => serde_json::json!({"peft_type": "SHIRA", "r": 2, "target_modules": targets}),
        "road_1" | "road_4" => serde_json::json!({"peft_type": "ROAD", "variant": method, "group_size": 16,
            "target_modules": targets}),
        "ln_tuning" => serde_json::json!({"peft_type": "LN_TUNING",
            "target_modules": ["input_layernorm", "post_attention_layernorm", "norm"]}),
        "trainable_tokens" => serde_json::json!({"peft_type": "TRAINABLE_TOKENS",
            "token_indices": TOKENS, "target_modules": ["embed_tokens"]}),
        "lora_tokens" => serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj"], "trainable_token_indices": {"embed_tokens": TOKENS}}),
        other => panic!("{other}"),
    };
    let mut rng = peft_core::Rng::new(17);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut put = |name: String, shape: Vec<usize>, std: f64, offset: f32| {
        let mut v = vec![0.0f32; shape.iter().product()];
        rng.fill_normal(&mut v, std);
        v.iter_mut().for_each(|x| *x += offset);
        tensors.push((name, shape, v));
    };
    if method == "vblora" {
        put("base_model.vblora_vector_bank".into(), vec![8, 16], 0.3, 0.0);
    }
    if method == "randlora" {
        // The shared bases for the largest projection, [128, 64] (min 64, max 128, n_b 8).
        put("base_model.randlora_A".into(), vec![8, 1, 64], 1.0, 0.0);
        put("base_model.randlora_B".into(), vec![128, 8, 8], 1.0, 0.0);
    }
    if method == "trainable_tokens" || method == "lora_tokens" {
        let key =
            if method == "lora_tokens" { "token_adapter.trainable_tokens_delta" } else { "trainable_tokens_delta" };
        put(format!("base_model.model.model.embed_tokens.{key}"), vec![TOKENS.len(), 64], 1.0, 0.0);
        if method == "lora_tokens" {
            tensors.extend(lora_tensors(&mut peft_core::Rng::new(9), &["q_proj", "v_proj"]));
        }
        return write_adapter(&dir.join(method), &config, &tensors);
    }
    if method == "ln_tuning" {
        for name in ["layers.0.input_layernorm", "layers.0.post_attention_layernorm", "layers.1.input_layernorm"]
            .into_iter()
            .chain(["layers.1.post_attention_layernorm", "norm"])
        {
            put(format!("base_model.model.model.{name}.ln_tuning_layers.weight"), vec![64], 0.2, 1.0);
        }
        return write_adapter(&dir.join(method), &config, &tensors);
    }
    if method == "vera" {
        put("base_model.vera_A".into(), vec![4, 128], 0.3, 0.0);
        put("base_model.vera_B".into(), vec![128, 4], 0.3, 0.0);
    }
    for l in 0..2 {
        for &(proj, o, i) in &SHAPES {
            let key = format!("base_model.model.model.layers.{l}.{proj}");
            match method {
                "dora" => {
                    put(format!("{key}.lora_A.weight"), vec![4, i], 0.2, 0.0);
                    put(format!("{key}.lora_B.weight"), vec![o, 4], 0.2, 0.0);
                    put(format!("{key}.lora_magnitude_vector"), vec![o], 0.1, 1.0);
                }
                "ia3" if proj.ends_with("up_proj") || proj.ends_with("down_proj") => {
                    put(format!("{key}.ia3_l"), vec![1, i], 0.2, 1.0)
                }
                "ia3" => put(format!("{key}.ia3_l"), vec![o, 1], 0.2, 1.0),
                "loha" => {
                    for (name, shape) in
                        [("hada_w1_a", [o, 4]), ("hada_w1_b", [4, i]), ("hada_w2_a", [o, 4]), ("hada_w2_b", [4, i])]
                    {
                        put(format!("{key}.{name}"), shape.to_vec(), 0.3, 0.0);
                    }
                }
                "lokr" => {
                    for (name, shape) in peft_core::lokr::Layout::of(i, o, 4, false, -1).tensors(4) {
                        put(format!("{key}.{name}"), shape.to_vec(), 0.2, 0.0);
                    }
                }
                "vera" => {
                    put(format!("{key}.vera_lambda_d"), vec![4], 0.5, 0.0);
                    put(format!("{key}.vera_lambda_b"), vec![o], 0.5, 0.0);
                }
                "adalora" => {
                    put(format!("{key}.lora_A"), vec![4, i], 0.2, 0.0);
                    put(format!("{key}.lora_E"), vec![4, 1], 0.5, 0.0);
                    put(format!("{key}.lora_B"), vec![o, 4], 0.2, 0.0);
                }
                "miss_bat" => put(format!("{key}.miss_block"), vec![o / 8, 8, 8], 0.1, 0.0),
                "miss_mini" => put(format!("{key}.miss_block"), vec![6, 4], 0.1, 0.0),
                "hra" => put(format!("{key}.hra_u"), vec![i, 4], 1.0, 0.0),
                "hra_gs" => put(format!("{key}.hra_u"), vec![i, 3], 1.0, 0.0),
                "oft" => put(format!("{key}.oft_R.weight"), vec![i / 16, 120], 0.1, 0.0),
                "oft_exact" => put(format!("{key}.oft_R.weight"), vec![1, 28], 0.2, 0.0),
                "fourierft" => put(format!("{key}.fourierft_spectrum"), vec![50], 2.0, 0.0),
                "vblora" => {
                    put(format!("{key}.vblora_logits_A"), vec![4, i / 16, 8], 1.0, 0.0);
                    put(format!("{key}.vblora_logits_B"), vec![o / 16, 4, 8], 1.0, 0.0);
                }
                "randlora" => {
                    let nb = o.min(i).div_ceil(8);
                    put(format!("{key}.randlora_lambda"), vec![8, nb], 0.05, 0.0);
                    put(format!("{key}.randlora_gamma"), vec![nb, o.min(i)], 0.01, 0.01);
                }
                "boft" | "boft_butterfly" => {
                    let (f, b) = if method == "boft" { (1, 8) } else { (2, 4) };
                    put(format!("{key}.boft_R"), vec![f, i / b, b, b], 0.2, 0.0);
                    put(format!("{key}.boft_s"), vec![o, 1], 0.1, 1.0);
                }
                "c3a" => put(format!("{key}.c3a_kernel"), vec![o / 16, i / 16, 16], 1.0, 0.0),
                "shira" => {
                    // Every 7th position; the indices are filled in below.
                    put(format!("{key}.shira_weight"), vec![o * i / 7], 0.5, 0.0);
                    put(format!("{key}.shira_indices"), vec![2, o * i / 7], 0.0, 0.0);
                }
                "road_1" | "road_4" => {
                    let len = if method == "road_1" { o / 2 } else { 2 * o };
                    put(format!("{key}.road_theta"), vec![len], 0.5, 0.0);
                    put(format!("{key}.road_alpha"), vec![len], 0.2, 1.0);
                }
                _ => unreachable!(),
            }
        }
    }
    for (name, shape, v) in tensors.iter_mut().filter(|t| t.0.ends_with("shira_indices")) {
        let proj = SHAPES.iter().find(|(p, ..)| name.contains(p)).map_or(1, |&(_, _, i)| i);
        let n = shape[1];
        for k in 0..n {
            (v[k], v[n + k]) = (((7 * k) / proj) as f32, ((7 * k) % proj) as f32);
        }
    }
    write_adapter(&dir.join(method), &config, &tensors)
}

/// Every weight-adapting method hosted unmerged gives the logits of the
/// model its adapter was merged into by `peft merge`.
#[test]
fn every_hosted_method_equals_its_merged_model() {
    let dir = scratch("llama-methods");
    let case = case_dir("prompt_llama");
    let m = model("prompt_llama");
    let ids = [3, 14, 15, 92, 65, 35, 89, 79];
    let plain = m.forward(&Faer::new(), &ids, None, &mut KvCache::new()).unwrap();
    let methods = ["dora", "ia3", "loha", "lokr", "vera", "adalora", "miss_bat", "miss_mini", "hra", "hra_gs"];
    for method in methods.into_iter().chain([
        "road_1",
        "road_4",
        "c3a",
        "shira",
        "oft",
        "oft_exact",
        "boft",
        "boft_butterfly",
        "fourierft",
        "ln_tuning",
        "trainable_tokens",
        "lora_tokens",
    ]) {
        let ad = HfAdapter::read_dir(&method_dir(&dir, method)).unwrap();
        let hosted = LlamaAdapter::new(&m, &ad).unwrap();
        let merged_file = dir.join(format!("{method}-merged.safetensors"));
        let base = Base::open(&case.join("base.safetensors")).unwrap();
        merge(&base, &ad, &merged_file, &MergeOptions::default(), &Faer::new(), |_| {}).unwrap();
        let merged = Llama::load(&case.join("base_config.json"), &merged_file).unwrap();
        let got = m.forward(&Faer::new(), &ids, Some(&hosted), &mut KvCache::new()).unwrap();
        let want: Vec<f64> = merged
            .forward(&Faer::new(), &ids, None, &mut KvCache::new())
            .unwrap()
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let e = rel(&got, &want);
        eprintln!("{method}: hosted vs merged, relative error {e:.2e}");
        assert!(e <= 1e-5, "{method}: hosted vs merged {e}");
        assert!(rel(&plain, &want) > 1e-2, "{method}: the adapter changes the output");
    }
}

/// Trainable tokens on a tied head (the fixtures' model with `lm_head`
/// tied to the embeddings, as SmolLM2's is): hosted, the trained tokens'
/// logits come from their new rows, as in the model `peft merge` writes,
/// whose tied head reads the merged table.
#[test]
fn trainable_tokens_on_a_tied_head_equal_the_merged_model() {
    let (dir, tied) = (scratch("llama-tied-tokens"), tied_llama());
    let m = model("tied_llama");
    let ad = HfAdapter::read_dir(&method_dir(&dir, "trainable_tokens")).unwrap();
    let hosted = LlamaAdapter::new(&m, &ad).unwrap();
    let merged_file = dir.join("merged.safetensors");
    let base = Base::open(&tied.join("base.safetensors")).unwrap();
    merge(&base, &ad, &merged_file, &MergeOptions::default(), &Faer::new(), |_| {}).unwrap();
    let merged = Llama::load(&tied.join("base_config.json"), &merged_file).unwrap();
    let run = |model: &Llama, a: Option<&LlamaAdapter<'_>>, ids: &[u32]| {
        model.forward(&Faer::new(), ids, a, &mut KvCache::new()).unwrap()
    };
    let ids = [3, 14, 15, 92, 65, 35, 89, 8];
    let want: Vec<f64> = run(&merged, None, &ids).iter().map(|&v| f64::from(v)).collect();
    let e = rel(&run(&m, Some(&hosted), &ids), &want);
    assert!(e <= 1e-5, "hosted vs merged {e}");
    // Over untrained tokens alone the hidden states are the model's: only
    // the trained tokens' columns of the logits differ, through the head.
    let ids = [15, 92, 65, 35, 89, 8];
    let (p, g) = (run(&m, None, &ids), run(&m, Some(&hosted), &ids));
    for (i, (a, b)) in p.iter().zip(&g).enumerate() {
        let trained = TOKENS.contains(&((i % 100) as u32));
        assert!(trained != (a == b), "row {}, token {}: trained {trained}, {a} vs {b}", i / 100, i % 100);
    }
}

#[test]
fn hosted_lora_equals_the_merged_model() {
    let dir = scratch("llama-lora");
    let case = case_dir("prompt_llama");
    let lora = lora_dir(&dir);
    let ad = HfAdapter::read_dir(&lora).unwrap();
    let m = model("prompt_llama");
    let hosted = LlamaAdapter::new(&m, &ad).unwrap();
    let merged_file = dir.join("merged.safetensors");
    let base = Base::open(&case.join("base.safetensors")).unwrap();
    merge(&base, &ad, &merged_file, &MergeOptions::default(), &Faer::new(), |_| {}).unwrap();
    let merged = Llama::load(&case.join("base_config.json"), &merged_file).unwrap();
    let ids = [3, 14, 15, 92, 65, 35, 89, 79];
    let got = m.forward(&Faer::new(), &ids, Some(&hosted), &mut KvCache::new()).unwrap();
    let want = merged.forward(&Faer::new(), &ids, None, &mut KvCache::new()).unwrap();
    let want64: Vec<f64> = want.iter().map(|&v| f64::from(v)).collect();
    let e = rel(&got, &want64);
    eprintln!("hosted LoRA vs merged: relative error {e:.2e}");
    assert!(e <= 1e-5, "hosted vs merged: {e}");
    let plain = m.forward(&Faer::new(), &ids, None, &mut KvCache::new()).unwrap();
    assert!(rel(&plain, &want64) > 1e-2, "the adapter changes the output");
}

/// Greedy decoding through the cache: each new token is the argmax of the
/// full forward's last row over the sequence so far (with and without
/// each adapter kind).
#[test]
fn generate_follows_the_full_forward_argmax() {
    let dir = scratch("llama-generate");
    let lora = HfAdapter::read_dir(&lora_dir(&dir)).unwrap();
    for case in ["prompt_llama", "prefix_llama"] {
        let m = model(case);
        let ad = HfAdapter::read_dir(&case_dir(case)).unwrap();
        let kinds = [None, Some(LlamaAdapter::new(&m, &ad).unwrap())];
        let lora_kind = (case == "prompt_llama").then(|| LlamaAdapter::new(&m, &lora).unwrap());
        for hosted in kinds.iter().chain([&lora_kind]) {
            let prompt = [5u32, 17, 42];
            let new = m.generate(&Faer::new(), &prompt, hosted.as_ref(), 6).unwrap();
            assert_eq!(new.len(), 6);
            let mut seq = prompt.to_vec();
            for &t in &new {
                let logits = m.forward(&Faer::new(), &seq, hosted.as_ref(), &mut KvCache::new()).unwrap();
                let last = &logits[logits.len() - 100..];
                assert_eq!(argmax(last), Some(t as usize), "{case}: step {}", seq.len() - prompt.len());
                seq.push(t);
            }
        }
    }
}

#[test]
fn bad_ids_and_mismatched_adapters_are_refused() {
    let m = model("prompt_llama");
    let err = m.forward(&Faer::new(), &[1, 100], None, &mut KvCache::new()).unwrap_err().to_string();
    assert!(err.contains("token 100") && err.contains("vocab_size 100"), "{err}");
    // The prefix adapter was made for this architecture; a model with one
    // layer fewer is refused, naming the field.
    let ad = HfAdapter::read_dir(&case_dir("prefix_llama")).unwrap();
    let dir = case_dir("prompt_llama");
    let text = std::fs::read_to_string(dir.join("base_config.json")).unwrap();
    let one_layer = text.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1");
    let cfg = peft_faer::llama::LlamaConfig::parse(&one_layer).unwrap();
    let small = Llama::from_base(cfg, &Base::open(&dir.join("base.safetensors")).unwrap()).unwrap();
    let err = LlamaAdapter::new(&small, &ad).unwrap_err().to_string();
    assert!(err.contains("num_layers"), "{err}");
}

/// A Hugging Face folder `dir/name` with the `prefix_llama` fixture's
/// `config.json` and, with `weights`, its `model.safetensors`.
fn model_folder(dir: &Path, name: &str, weights: bool) -> PathBuf {
    let (case, folder) = (case_dir("prefix_llama"), dir.join(name));
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::copy(case.join("base_config.json"), folder.join("config.json")).unwrap();
    if weights {
        std::fs::copy(case.join("base.safetensors"), folder.join("model.safetensors")).unwrap();
    }
    folder
}

#[test]
fn cli_forward_and_generate() {
    let dir = scratch("llama-cli");
    // A Hugging Face folder: config.json + model.safetensors.
    let case = case_dir("prefix_llama");
    let model_dir = model_folder(&dir, "model", true);
    let r = refs("prefix_llama");
    let id_list = ids(&r).iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let out = dir.join("logits.safetensors");
    let run = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_peft")).args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let (md, cd) = (model_dir.to_str().unwrap(), case.to_str().unwrap());
    let text = run(&["forward", "--model", md, "--adapter", cd, "--ids", &id_list, "--out", out.to_str().unwrap()]);
    let bytes = std::fs::read(&out).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.shape(), [1, 7, 100]);
    let got: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    assert!(rel(&got, &r["logits"].1) <= 1e-4);
    // The top token printed is the argmax of the last row.
    let top = argmax(&got[600..]).unwrap();
    assert!(text.lines().any(|l| l.split_whitespace().next() == Some(&top.to_string())), "{top} not first:\n{text}");
    let json: serde_json::Value = serde_json::from_str(&run(&[
        "generate",
        "--model",
        md,
        "--adapter",
        cd,
        "--ids",
        &id_list,
        "--max-new-tokens",
        "4",
        "--json",
    ]))
    .unwrap();
    let new = json["new_tokens"].as_array().unwrap();
    assert_eq!(new.len(), 4);
    assert_eq!(new[0].as_u64(), Some(top as u64), "the first generated token is forward's argmax");
}

/// A way to reach one tensor's values in an adapter.
type Reach = Box<dyn Fn(&mut HfAdapter) -> &mut Vec<f32>>;

/// Tensor `k` of module `name`, in `Module::tensor_lens`' order, whatever
/// its method.
fn reach(ad: &HfAdapter, name: &str, k: usize) -> Reach {
    let name = name.to_string();
    if let Some(i) = ad.modules.iter().position(|m| m.name == name) {
        return Box::new(move |a: &mut HfAdapter| match k {
            0 => &mut a.modules[i].a,
            1 => &mut a.modules[i].b,
            _ => a.modules[i].magnitude.as_mut().unwrap(),
        });
    }
    if let Some(i) = ad.ia3.iter().position(|m| m.name == name) {
        return Box::new(move |a: &mut HfAdapter| &mut a.ia3[i].l);
    }
    if let Some(i) = ad.loha.iter().position(|m| m.name == name) {
        return Box::new(move |a: &mut HfAdapter| &mut a.loha[i].factors[k]);
    }
    if let Some(i) = ad.lokr.iter().position(|m| m.name == name) {
        return Box::new(move |a: &mut HfAdapter| {
            let n1 = a.lokr[i].w1.len();
            if k < n1 { &mut a.lokr[i].w1[k] } else { &mut a.lokr[i].w2[k - n1] }
        });
    }
    if let Some(i) = ad.adalora.iter().position(|m| m.name == name) {
        return Box::new(move |a: &mut HfAdapter| match k {
            0 => &mut a.adalora[i].a,
            1 => &mut a.adalora[i].e,
            _ => &mut a.adalora[i].b,
        });
    }
    if let Some(i) = ad.miss.iter().position(|m| m.name == name) {
        return Box::new(move |a: &mut HfAdapter| &mut a.miss[i].d);
    }
    if let Some(i) = ad.hra.iter().position(|m| m.name == name) {
        return Box::new(move |a: &mut HfAdapter| &mut a.hra[i].u);
    }
    if let Some(i) = ad.vblora.iter().position(|m| m.name == name) {
        return Box::new(
            move |a: &mut HfAdapter| if k == 0 { &mut a.vblora[i].logits_a } else { &mut a.vblora[i].logits_b },
        );
    }
    if let Some(i) = ad.randlora.iter().position(|m| m.name == name) {
        return Box::new(
            move |a: &mut HfAdapter| if k == 0 { &mut a.randlora[i].lambda } else { &mut a.randlora[i].gamma },
        );
    }
    if let Some(i) = ad.fourierft.iter().position(|m| m.name == name) {
        return Box::new(move |a: &mut HfAdapter| &mut a.fourierft[i].spectrum);
    }
    if let Some(i) = ad.boft.iter().position(|m| m.name == name) {
        return Box::new(move |a: &mut HfAdapter| if k == 0 { &mut a.boft[i].r } else { &mut a.boft[i].s });
    }
    if let Some(i) = ad.oft.iter().position(|m| m.name == name) {
        return Box::new(move |a: &mut HfAdapter| &mut a.oft[i].v);
    }
    if let Some(i) = ad.shira.iter().position(|m| m.name == name) {
        return Box::new(move |a: &mut HfAdapter| &mut a.shira[i].weight);
    }
    if let Some(i) = ad.c3a.iter().position(|m| m.name == name) {
        return Box::new(move |a: &mut HfAdapter| &mut a.c3a[i].kernel);
    }
    if let Some(i) = ad.road.iter().position(|m| m.name == name) {
        return Box::new(move |a: &mut HfAdapter| if k == 0 { &mut a.road[i].theta } else { &mut a.road[i].alpha });
    }
    let i = ad.vera.iter().position(|m| m.name == name).unwrap();
    Box::new(move |a: &mut HfAdapter| if k == 0 { &mut a.vera[i].lambda_d } else { &mut a.vera[i].lambda_b })
}

/// The composed backward (adapter tensors only) against central
/// differences of the next-token loss along a random direction, per
/// trainable tensor (five-point stencil, h = 1e-3: at h = 5e-3 the
/// stencil's truncation reaches 8% on layer 0's `q_proj`, whose attention
/// logits are the most curved, so the step is small). The tolerance is 2%
/// plus the stencil's f32 rounding, about 1.5 eps L / h = 4e-4 (5e-4
/// allowed), which only the smallest gradients (below 0.02) come near; a
/// missing or wrong term exceeds it by far.
/// LoRA, DoRA, (IA)^3, LoHa, LoKr, VeRA, AdaLoRA, MiSS (bat, mini), HRA
/// (with and without Gram-Schmidt), RoAd (road_1, road_4), C3A, SHiRA, OFT (the series; the exact transform, shared) BOFT (one factor; two butterfly factors), FourierFT, RandLoRA and VB-LoRA (the logits; its bank is held frozen in training) on all
/// seven projections of both layers, LN tuning on every norm, prompt tuning and prefix tuning (GQA). DoRA's `A` and `B`
/// are not compared: PEFT detaches the weight norm, so their gradient is
/// not the loss's full derivative (peft-verify's `dora_gradients_match_fd`
/// checks them with the norm held); the magnitude's is exact and checked.
#[test]
fn backward_matches_finite_differences() {
    let dir = scratch("llama-fd");
    let lora =
        lora_dir_on(&dir, "lora-all", &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]);
    let ids = [7u32, 3, 91, 12, 55, 40, 8, 23];
    let be = Faer::new();
    let mut cases: Vec<(&str, PathBuf)> = vec![
        ("prompt_llama", lora),
        ("prompt_llama", case_dir("prompt_llama")),
        ("prefix_llama", case_dir("prefix_llama")),
    ];
    let methods = ["dora", "ia3", "loha", "lokr", "vera", "adalora", "miss_bat", "miss_mini", "hra", "hra_gs"];
    for method in methods.into_iter().chain([
        "road_1",
        "road_4",
        "c3a",
        "shira",
        "oft",
        "oft_exact",
        "boft",
        "boft_butterfly",
        "fourierft",
        "ln_tuning",
        "trainable_tokens",
    ]) {
        cases.push(("prompt_llama", method_dir(&dir, method)));
    }
    // On a tied head the trained rows also give their tokens' logits.
    cases.push(("tied_llama", method_dir(&dir, "trainable_tokens")));
    for (case, adapter_dir) in cases {
        let m = model(case);
        let ad = HfAdapter::read_dir(&adapter_dir).unwrap();
        let loss = |ad: &HfAdapter| {
            let hosted = LlamaAdapter::new(&m, ad).unwrap();
            let logits = m.forward(&be, &ids, Some(&hosted), &mut KvCache::new()).unwrap();
            lm_loss(
                &logits,
                100,
                hosted.virtual_tokens() * usize::from(matches!(hosted, LlamaAdapter::Prompt { .. })),
                &ids,
                None,
            )
        };
        let hosted = LlamaAdapter::new(&m, &ad).unwrap();
        let mut trace = Trace::default();
        let logits = m.forward_traced(&be, &ids, Some(&hosted), &mut trace).unwrap();
        let mut dl = vec![0.0f32; logits.len()];
        lm_loss(&logits, 100, trace.virtual_rows(), &ids, Some(&mut dl));
        let mut grads = LlamaGrads::zeros(&hosted);
        m.backward(&be, Some(&hosted), &trace, &dl, Some(&mut grads)).unwrap();
        // (tensor name, analytic gradient, a way to reach its values)
        let mut checks: Vec<(String, Vec<f32>, Reach)> = Vec::new();
        match &grads {
            LlamaGrads::Prompt(g) | LlamaGrads::Prefix(g) => {
                checks.push((
                    "prompt_embeddings".into(),
                    g.clone(),
                    Box::new(|a: &mut HfAdapter| &mut a.prompt.as_mut().unwrap().data),
                ));
            }
            LlamaGrads::Modules(layers) => {
                for (l, projs) in layers.iter().enumerate() {
                    for (p, g) in projs.iter().enumerate() {
                        let Some(g) = g else { continue };
                        let name = format!("model.layers.{l}.{}", peft_faer::llama::PROJECTIONS[p]);
                        for (k, gk) in g.iter().enumerate() {
                            checks.push((format!("{name} tensor {k}"), gk.clone(), reach(&ad, &name, k)));
                        }
                    }
                }
                assert!(checks.len() >= 14, "every projection of both layers");
            }
            LlamaGrads::Norms { layers, last } => {
                let names = layers.iter().enumerate().flat_map(|(l, norms)| {
                    norms.iter().zip(LAYER_NORMS).map(move |(g, n)| (format!("model.layers.{l}.{n}"), g))
                });
                for (name, g) in names.chain([("model.norm".to_string(), last)]) {
                    let i = ad.ln_tuning.iter().position(|m| m.name == name).unwrap();
                    let g = g.clone().unwrap_or_else(|| panic!("{name}: tuned, without a gradient"));
                    checks.push((name, g, Box::new(move |a: &mut HfAdapter| &mut a.ln_tuning[i].params[0].data)));
                }
            }
            LlamaGrads::Tokens(g) => checks.push((
                "trainable_tokens_delta".into(),
                g.clone(),
                Box::new(|a: &mut HfAdapter| &mut a.trainable_tokens[0].rows),
            )),
            LlamaGrads::Bottleneck(_) => unreachable!("no PEFT adapter is a bottleneck adapter"),
        }
        let mut rng = peft_core::Rng::new(5);
        for (name, analytic_grad, values) in &checks {
            // DoRA's A and B: the norm is detached (see above).
            let dora = adapter_dir.ends_with("dora");
            if dora && (name.ends_with("tensor 0") || name.ends_with("tensor 1")) {
                continue;
            }
            let mut probe = ad.clone();
            let orig = values(&mut probe).clone();
            let dir: Vec<f32> = (0..orig.len()).map(|_| rng.uniform_range(-1.0, 1.0) as f32).collect();
            let analytic: f64 = analytic_grad.iter().zip(&dir).map(|(g, u)| f64::from(*g) * f64::from(*u)).sum();
            let h = 1e-3f32;
            let mut at = |sign: f32| {
                let v = values(&mut probe);
                for ((v, o), u) in v.iter_mut().zip(&orig).zip(&dir) {
                    *v = o + sign * h * u;
                }
                loss(&probe)
            };
            let (l2, l1, m1, m2) = (at(2.0), at(1.0), at(-1.0), at(-2.0));
            let numeric = (-l2 + 8.0 * l1 - 8.0 * m1 + m2) / (12.0 * f64::from(h));
            assert!(
                (numeric - analytic).abs() <= 2e-2 * numeric.abs().max(analytic.abs()) + 5e-4,
                "{case} {} {name}: finite differences {numeric}, analytic {analytic}",
                adapter_dir.display()
            );
        }
    }
}

/// A quantized checkpoint (`peft quantize`'s output) runs in place: the
/// logits over an int8, Q8_0 or Q4_0 model equal those of the f32 model
/// holding the dequantized weights (written by `peft merge --dtype f32`
/// from the quantized file), and stay near PEFT's f32 logits.
#[test]
fn quantized_checkpoints_run_in_place() {
    use peft_core::storage::Format;
    use peft_faer::hf::merge::merge_many;
    let dir = scratch("llama-quantized");
    let case = case_dir("prompt_llama");
    let ad = HfAdapter::read_dir(&case).unwrap();
    let r = refs("prompt_llama");
    let config = case.join("base_config.json");
    for format in [Format::Int8, Format::Q8_0, Format::Q4_0] {
        let q = dir.join(format!("{}.safetensors", format.name()));
        let base = Base::open(&case.join("base.safetensors")).unwrap();
        let options = MergeOptions { dtype: Some(format), ..MergeOptions::default() };
        let report = merge_many(&base, &[], &q, &options, &Faer::new(), |_| {}).unwrap();
        assert_eq!(report.quantized.len(), 16, "{format:?}: every matrix (7 per layer, embeddings, lm_head)");
        let deq = dir.join(format!("{}-f32.safetensors", format.name()));
        let options = MergeOptions { dtype: Some(Format::F32), ..MergeOptions::default() };
        merge_many(&Base::open(&q).unwrap(), &[], &deq, &options, &Faer::new(), |_| {}).unwrap();
        let (mq, mf) = (Llama::load(&config, &q).unwrap(), Llama::load(&config, &deq).unwrap());
        let hq = LlamaAdapter::new(&mq, &ad).unwrap();
        let hf = LlamaAdapter::new(&mf, &ad).unwrap();
        let got = mq.forward(&Faer::new(), &ids(&r), Some(&hq), &mut KvCache::new()).unwrap();
        let want: Vec<f64> = mf
            .forward(&Faer::new(), &ids(&r), Some(&hf), &mut KvCache::new())
            .unwrap()
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let e = rel(&got, &want);
        let vs_peft = rel(&got, &r["logits"].1);
        eprintln!("{format:?}: vs the dequantized f32 model {e:.2e}, vs PEFT's f32 logits {vs_peft:.2e}");
        assert!(e <= 1e-5, "{format:?}: {e}");
        // Measured: int8 2.0e-2, Q8_0 1.8e-2, Q4_0 0.30 (4 bits on rows of
        // 64 values move this tiny model's logits by that much); the
        // bounds only say the model is not garbage.
        let bound = if format == Format::Q4_0 { 0.5 } else { 0.05 };
        assert!(vs_peft <= bound, "{format:?}: {vs_peft}");
    }
}

/// Bottleneck adapters (after attention and after the MLP of each layer):
/// the model is unchanged at init (bit for bit), and the backward of every
/// adapter tensor passes the same finite-difference check as the PEFT
/// methods (after a random perturbation, so that `W_up` is not zero).
#[test]
fn bottleneck_adapters_identity_and_gradients() {
    use peft_core::activation::Activation;
    use peft_core::adapter::AdapterConfig;
    use peft_faer::llama::Bottleneck;
    let m = model("prompt_llama");
    let be = Faer::new();
    let ids = [7u32, 3, 91, 12, 55, 40, 8, 23];
    let config = AdapterConfig::width(8).with_activation(Activation::GeluTanh);
    let mut b = Bottleneck::new(&m, config, 3).unwrap();
    let plain = m.forward(&be, &ids, None, &mut KvCache::new()).unwrap();
    let at_init = m.forward(&be, &ids, Some(&LlamaAdapter::bottleneck(&m, &b).unwrap()), &mut KvCache::new()).unwrap();
    assert_eq!(plain, at_init, "W_up = b_up = 0: the adapters change nothing");
    let mut rng = peft_core::Rng::new(8);
    for site in b.sites.iter_mut().flatten() {
        for v in [&mut site.w_down, &mut site.b_down, &mut site.w_up, &mut site.b_up] {
            v.iter_mut().for_each(|x| *x += rng.uniform_range(-0.3, 0.3) as f32);
        }
    }
    let loss = |b: &Bottleneck| {
        let hosted = LlamaAdapter::bottleneck(&m, b).unwrap();
        lm_loss(&m.forward(&be, &ids, Some(&hosted), &mut KvCache::new()).unwrap(), 100, 0, &ids, None)
    };
    let hosted = LlamaAdapter::bottleneck(&m, &b).unwrap();
    let mut trace = Trace::default();
    let logits = m.forward_traced(&be, &ids, Some(&hosted), &mut trace).unwrap();
    let mut dl = vec![0.0f32; logits.len()];
    lm_loss(&logits, 100, 0, &ids, Some(&mut dl));
    let mut grads = LlamaGrads::zeros(&hosted);
    m.backward(&be, Some(&hosted), &trace, &dl, Some(&mut grads)).unwrap();
    let LlamaGrads::Bottleneck(g) = grads else { panic!("bottleneck gradients") };
    for l in 0..2 {
        for site in 0..2 {
            for k in 0..4 {
                let analytic_grad = &g[l][site][k];
                fn tensor(b: &mut Bottleneck, l: usize, site: usize, k: usize) -> &mut Vec<f32> {
                    let t = &mut b.sites[l][site];
                    [&mut t.w_down, &mut t.b_down, &mut t.w_up, &mut t.b_up].into_iter().nth(k).unwrap()
                }
                let mut probe = b.clone();
                let orig = tensor(&mut probe, l, site, k).clone();
                let dir: Vec<f32> = (0..orig.len()).map(|_| rng.uniform_range(-1.0, 1.0) as f32).collect();
                let analytic: f64 = analytic_grad.iter().zip(&dir).map(|(g, u)| f64::from(*g) * f64::from(*u)).sum();
                let h = 1e-3f32;
                let mut at = |sign: f32| {
                    for ((v, o), u) in tensor(&mut probe, l, site, k).iter_mut().zip(&orig).zip(&dir) {
                        *v = o + sign * h * u;
                    }
                    loss(&probe)
                };
                let (l2, l1, m1, m2) = (at(2.0), at(1.0), at(-1.0), at(-2.0));
                let numeric = (-l2 + 8.0 * l1 - 8.0 * m1 + m2) / (12.0 * f64::from(h));
                assert!(
                    (numeric - analytic).abs() <= 2e-2 * numeric.abs().max(analytic.abs()) + 5e-4,
                    "layer {l} site {site} tensor {k}: finite differences {numeric}, analytic {analytic}"
                );
            }
        }
    }
}

/// `modules_to_save` runs in `peft forward` as PEFT runs it: the saved
/// copies (`lm_head`, and `model.norm` named by its suffix "norm", as PEFT
/// matches it) replace the checkpoint's tensors. The reference is the
/// model `peft merge` writes (which puts the copies in place and merges
/// the LoRA), run without an adapter.
#[test]
fn modules_to_save_run_in_forward_as_in_the_merged_model() {
    let dir = scratch("llama-modules-to-save");
    let model_dir = model_folder(&dir, "model", true);
    let targets = ["q_proj", "v_proj"];
    let config = serde_json::json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": targets, "bias": "none", "modules_to_save": ["lm_head", "norm"]});
    let mut rng = peft_core::Rng::new(29);
    let mut tensors = lora_tensors(&mut rng, &targets);
    let (mut head, mut norm) = (vec![0.0f32; 100 * 64], vec![0.0f32; 64]);
    rng.fill_normal(&mut head, 0.1);
    rng.fill_normal(&mut norm, 0.5);
    tensors.push(("base_model.model.lm_head.modules_to_save.default.weight".into(), vec![100, 64], head));
    tensors.push(("base_model.model.model.norm.modules_to_save.default.weight".into(), vec![64], norm));
    let adapter = write_adapter(&dir.join("adapter"), &config, &tensors);
    let peft = |args: &[&str]| {
        let o = Command::new(env!("CARGO_BIN_EXE_peft")).args(args).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
    };
    let merged_dir = model_folder(&dir, "merged", false);
    let (md, ad, mm) = (model_dir.to_str().unwrap(), adapter.to_str().unwrap(), merged_dir.to_str().unwrap());
    peft(&[
        "merge",
        "--base",
        &format!("{md}/model.safetensors"),
        "--adapter",
        ad,
        "--out",
        &format!("{mm}/model.safetensors"),
    ]);
    let logits = |args: &[&str], out: &str| {
        let path = dir.join(out);
        let mut all = args.to_vec();
        all.extend(["--ids", "3,14,15,92,65", "--out", path.to_str().unwrap()]);
        peft(&all);
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        st.tensor("logits")
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect::<Vec<f32>>()
    };
    let hosted = logits(&["forward", "--model", md, "--adapter", ad], "hosted.safetensors");
    let merged = logits(&["forward", "--model", mm], "merged.safetensors");
    let plain = logits(&["forward", "--model", md], "plain.safetensors");
    let want: Vec<f64> = merged.iter().map(|&v| f64::from(v)).collect();
    assert!(rel(&hosted, &want) <= 1e-5, "hosted vs merged: {:.2e}", rel(&hosted, &want));
    assert!(rel(&plain, &want) > 1e-2, "the copies change the output");
    std::fs::remove_dir_all(&dir).ok();
}

/// LoRA on `embed_tokens` (PEFT's `lora_embedding_A [r, vocab]`,
/// `lora_embedding_B [dim, r]`) and on `lm_head`, with the layers' weights
/// PEFT saves beside them (`save_embedding_layers`), runs in the host:
/// the logits equal those of the model `peft merge` writes, run without an
/// adapter. Training them is refused, naming what.
#[test]
fn lora_on_embeddings_and_lm_head_runs_as_merged() {
    let dir = scratch("llama-embed-head");
    let case = case_dir("prefix_llama");
    let model_dir = model_folder(&dir, "model", true);
    let config = serde_json::json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": ["q_proj", "embed_tokens", "lm_head"], "bias": "none"});
    let mut rng = peft_core::Rng::new(31);
    let mut tensors = lora_tensors(&mut rng, &["q_proj"]);
    let mut normal = |n: usize, std: f64| {
        let mut v = vec![0.0f32; n];
        rng.fill_normal(&mut v, std);
        v
    };
    let e = "base_model.model.model.embed_tokens";
    tensors.push((format!("{e}.lora_embedding_A"), vec![4, 100], normal(400, 0.5)));
    tensors.push((format!("{e}.lora_embedding_B"), vec![64, 4], normal(256, 0.5)));
    tensors.push(("base_model.model.lm_head.lora_A.weight".into(), vec![4, 64], normal(256, 0.2)));
    tensors.push(("base_model.model.lm_head.lora_B.weight".into(), vec![100, 4], normal(400, 0.2)));
    // PEFT's `save_embedding_layers="auto"` saves the targeted embedding
    // layers' weights beside their LoRA, under `base_layer`.
    let base = common::load(&case.join("base.safetensors"));
    for (key, name) in [
        (format!("{e}.base_layer.weight"), "model.embed_tokens.weight"),
        ("base_model.model.lm_head.base_layer.weight".to_string(), "lm_head.weight"),
    ] {
        tensors.push((key, base[name].1.clone(), base[name].2.clone()));
    }
    let adapter = write_adapter(&dir.join("adapter"), &config, &tensors);
    let merged_dir = model_folder(&dir, "merged", false);
    let o = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(["merge", "--base"])
        .arg(model_dir.join("model.safetensors"))
        .arg("--adapter")
        .arg(&adapter)
        .arg("--out")
        .arg(merged_dir.join("model.safetensors"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (m, merged) = (Llama::load_dir(&model_dir).unwrap(), Llama::load_dir(&merged_dir).unwrap());
    let ad = HfAdapter::read_dir(&adapter).unwrap();
    let hosted = LlamaAdapter::new(&m, &ad).unwrap();
    let ids = [3u32, 14, 15, 92, 65];
    let got = m.forward(&Faer::new(), &ids, Some(&hosted), &mut KvCache::new()).unwrap();
    let want = merged.forward(&Faer::new(), &ids, None, &mut KvCache::new()).unwrap();
    let plain = m.forward(&Faer::new(), &ids, None, &mut KvCache::new()).unwrap();
    let want64: Vec<f64> = want.iter().map(|&v| f64::from(v)).collect();
    assert!(rel(&got, &want64) <= 1e-5, "hosted vs merged: {:.2e}", rel(&got, &want64));
    assert!(rel(&plain, &want64) > 1e-2, "the adapter changes the output");
    let mut trace = peft_faer::llama::Trace::default();
    m.forward_traced(&Faer::new(), &ids, Some(&hosted), &mut trace).unwrap();
    let err = m.backward(&Faer::new(), Some(&hosted), &trace, &vec![0.0; got.len()], None).unwrap_err();
    assert!(err.to_string().contains("lm_head"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A model whose logits are NaN (one NaN in `lm_head`): `peft generate`
/// and `peft forward` fail naming the logits, instead of stopping early
/// with exit 0 or ranking the NaN first (issue 27, class 6).
#[test]
fn nan_logits_are_an_error_not_an_argmax() {
    let dir = scratch("llama-nan-logits");
    let case = case_dir("prefix_llama");
    let model_dir = model_folder(&dir, "model", false);
    let mut base = common::load(&case.join("base.safetensors"));
    base.get_mut("lm_head.weight").unwrap().2[5 * 64] = f32::NAN; // token 5's row
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = base
        .iter()
        .map(|(n, (_, s, v))| (n.clone(), s.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, &None, &model_dir.join("model.safetensors")).unwrap();
    let md = model_dir.to_str().unwrap();
    // The same checkpoint loaded twice is bit-identical, NaN and all, where
    // `==` calls it different (issue 27, class 9: finetune's check).
    let (a, b) = (Llama::load_dir(&model_dir).unwrap(), Llama::load_dir(&model_dir).unwrap());
    assert!(a != b && a.bit_identical(&b));
    // 2^40 new tokens: nothing is reserved for them up front (issue 27,
    // class 3: a 4.4 TB allocation), so the NaN is reached and reported.
    for args in [
        vec!["generate", "--model", md, "--ids", "3,14,15", "--max-new-tokens", "4"],
        vec!["generate", "--model", md, "--ids", "3,14,15", "--max-new-tokens", "1099511627776"],
        vec!["forward", "--model", md, "--ids", "3,14,15"],
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_peft")).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{}: exit 0", args[0]);
        assert!(err.contains("logits") && err.contains("token 5") && err.contains("NaN"), "{}: {err}", args[0]);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A model `config.json` error names that file and the field, not
/// `adapter_config.json` (issue 27, class 8).
#[test]
fn model_config_errors_name_config_json() {
    let dir = scratch("llama-config-error");
    let case = case_dir("prefix_llama");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("base_config.json")).unwrap()).unwrap();
    config["hidden_act"] = serde_json::json!("gelu");
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(case.join("base.safetensors"), dir.join("model.safetensors")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(["forward", "--model", dir.to_str().unwrap(), "--ids", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("config.json") && err.contains("hidden_act"), "{err}");
    assert!(!err.contains("adapter_config.json"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `peft quantize --format FORMAT --base SRC --out OUT`.
fn quantize_cli(format: &str, src: &Path, out: &Path) -> std::process::Output {
    let args = ["quantize", "--format", format, "--base"];
    Command::new(env!("CARGO_BIN_EXE_peft")).args(args).arg(src).arg("--out").arg(out).output().unwrap()
}

/// The folder `dir/name` with the tiny Llama quantized to `format` (it
/// loads), and its weights file.
fn quantized_model(dir: &Path, name: &str, format: &str) -> (PathBuf, PathBuf) {
    let model = model_folder(dir, &format!("{name}-f32"), true);
    let q = model_folder(dir, name, false);
    let file = q.join("model.safetensors");
    let o = quantize_cli(format, &model.join("model.safetensors"), &file);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(Llama::load_dir(&q).is_ok());
    (q, file)
}

/// Overwrites the bytes of tensor `name` of the safetensors `file` from
/// `offset` (within its data) with `new`.
fn poke_tensor(file: &Path, name: &str, offset: usize, new: &[u8]) {
    let mut bytes = std::fs::read(file).unwrap();
    let (header, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let start = 8 + header + meta.info(name).unwrap().data_offsets.0 + offset;
    bytes[start..start + new.len()].copy_from_slice(new);
    std::fs::write(file, &bytes).unwrap();
}

/// Issue 27, class 8: a Q8_0 block whose f16 scale is NaN in a stored
/// checkpoint is refused when the model loads, naming the tensor and the
/// block's first element (it passed silently, and every product through
/// that block came out NaN).
#[test]
fn a_nan_block_scale_is_refused_when_the_model_loads() {
    let dir = scratch("llama-nan-scale");
    let (q, file) = quantized_model(&dir, "q8", "q8_0");
    // The second block's scale (bytes 34..36 of the tensor) set to an f16 NaN.
    let name = "model.layers.1.self_attn.q_proj.weight";
    poke_tensor(&file, name, 34, &0x7e00u16.to_le_bytes());
    let err = Llama::load_dir(&q).unwrap_err().to_string();
    assert!(err.contains(name) && err.contains("element 32") && err.contains("scale"), "{err}");
    // Reading the rows for another format refuses it too, naming the file, the tensor and the element.
    let out = dir.join("int8.safetensors");
    let o = quantize_cli("int8", &file, &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("model.safetensors") && err.contains(name), "{err}");
    assert!(err.contains("element 32") && err.contains("scale") && !out.exists(), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// An int8 row whose scale times its largest value overflows f32 (a
/// `-128` with a scale of 3e36: 128 * 3e36 > f32::MAX = 3.4e38 while
/// 127 * 3e36 is not, found by the `quantized_storage` fuzz target) is
/// refused when a model loads and when `peft quantize` reads the base, naming
/// the tensor and the row, instead of decoding to an infinity.
#[test]
fn an_int8_row_that_overflows_is_refused_where_it_is_read() {
    let dir = scratch("llama-int8-overflow");
    let (q, file) = quantized_model(&dir, "int8", "int8");
    // Row 2 of q_proj (64 columns: 4 scale bytes, then 64 int8): scale 3e36, first value -128.
    let name = "model.layers.1.self_attn.q_proj.weight";
    let mut row = 3e36f32.to_le_bytes().to_vec();
    row.push(0x80);
    poke_tensor(&file, name, 2 * (4 + 64), &row);
    let err = Llama::load_dir(&q).unwrap_err().to_string();
    assert!(err.contains(name) && err.contains("row 2") && err.contains("overflows"), "{err}");
    let out = dir.join("q8.safetensors");
    let o = quantize_cli("q8_0", &file, &out);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(name) && err.contains("row 2"), "{err}");
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// A prompt longer than `PREFILL_CHUNK` runs in chunks through the cache;
/// its logits equal one unchunked pass (`forward_traced` runs the whole
/// sequence at once) to rounding, with prompt tuning's virtual rows in the
/// first chunk, and `forward_last` is the last of those rows.
#[test]
fn long_prompts_run_in_chunks_with_the_logits_of_one_pass() {
    use peft_faer::llama::PREFILL_CHUNK;
    let ids: Vec<u32> = (0..2 * PREFILL_CHUNK as u32 + 37).map(|i| (i * 13 + 5) % 100).collect();
    for case in ["prefix_llama", "prompt_llama"] {
        let m = model(case);
        let ad = HfAdapter::read_dir(&case_dir(case)).unwrap();
        let hosted = LlamaAdapter::new(&m, &ad).unwrap();
        let b = Faer::new();
        for adapter in [None, Some(&hosted)] {
            let chunked = m.forward(&b, &ids, adapter, &mut KvCache::new()).unwrap();
            let whole = m.forward_traced(&b, &ids, adapter, &mut Trace::default()).unwrap();
            assert_eq!(chunked.len(), whole.len(), "{case}");
            let whole64: Vec<f64> = whole.iter().map(|&v| f64::from(v)).collect();
            assert!(rel(&chunked, &whole64) <= 1e-5, "{case}: {}", rel(&chunked, &whole64));
            let last = m.forward_last(&b, &ids, adapter, &mut KvCache::new()).unwrap();
            assert!(rel(&last, &whole64[whole.len() - 100..]) <= 1e-5, "{case}");
        }
    }
}

/// The loss's gradient writes a value too small for a normal f32 as 0
/// (subnormal operands slow the head's backward product 20x on x86). Row
/// `[0, 0, -92]`, target 0, by hand: `p = (1, 1, e^-92) / (2 + e^-92)`,
/// `e^-92 = 1.1e-40`, so the gradient `(p - onehot) / 1` rounds to `-0.5,
/// 0.5` and the third value, `5.5e-41`, is subnormal in f32: 0. The loss,
/// `ln(2 + e^-92)`, is `ln 2` in f64.
#[test]
fn the_loss_gradient_has_no_subnormal_values() {
    let mut dl = vec![1.0f32; 6];
    let loss = lm_loss(&[0.0, 0.0, -92.0, 0.0, 0.0, 0.0], 3, 0, &[7, 0], Some(&mut dl));
    assert_eq!(&dl[..3], &[-0.5, 0.5, 0.0]);
    assert!(dl[2].to_bits() == 0, "the subnormal value is +0");
    assert_eq!(&dl[3..], &[0.0; 3], "the last row predicts nothing");
    assert!((loss - core::f64::consts::LN_2).abs() < 1e-15, "{loss}");
}
