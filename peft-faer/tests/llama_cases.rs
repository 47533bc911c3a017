//! PEFT-fidelity cases over the tiny Llama (`tests/fixtures/peft/llama_cases`,
//! written by PEFT 0.21.2 with `make.py` there): `exclude_modules` as a list
//! and as a regex, and several adapters merged in order with DoRA, whose
//! norm PEFT takes over the weight merged so far. For each, `peft merge`
//! gives PEFT's `merge_and_unload` within 1e-5 relative (every tensor it
//! changed; every other tensor bit for bit the base's), and where PEFT's
//! forward is one adapter's, the hosted logits are PEFT's within 1e-4.
#![cfg(feature = "cli")]

use std::path::{Path, PathBuf};
use std::process::Command;

use peft_faer::Faer;
use peft_faer::hf::HfAdapter;
use peft_faer::llama::{KvCache, Llama, LlamaAdapter};

mod common;
use common::{case_dir, load, max_rel, scratch};

fn case(name: &str) -> PathBuf {
    case_dir("llama_cases").join(name)
}

fn base() -> (PathBuf, PathBuf) {
    let b = case_dir("prefix_llama");
    (b.join("base_config.json"), b.join("base.safetensors"))
}

/// `peft merge` of `adapters` (in order) over `base` (a model folder or a
/// file); its error text, or the output's path.
fn merge(name: &str, base: &Path, adapters: &[&Path]) -> Result<PathBuf, String> {
    // A folder of its own per call: tests running at once merge the same case.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = scratch(&format!("llama-cases-{name}-{n}")).join("merged.safetensors");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peft"));
    cmd.args(["merge", "--base"]).arg(base).arg("--out").arg(&out);
    for a in adapters {
        cmd.arg("--adapter").arg(a);
    }
    let o = cmd.output().unwrap();
    if o.status.success() { Ok(out) } else { Err(String::from_utf8_lossy(&o.stderr).into_owned()) }
}

/// `peft merge` of `adapters` (in order) over the tiny Llama against the
/// case's `merged.*` references; returns how many tensors the merge changed.
fn assert_merge(name: &str, adapters: &[&Path]) -> usize {
    assert_merge_over(name, &base().1, adapters)
}

/// [`assert_merge`] over the base weights `weights` (a file, or a folder
/// holding `model.safetensors`).
fn assert_merge_over(name: &str, weights: &Path, adapters: &[&Path]) -> usize {
    let out = merge(name, weights, adapters).unwrap_or_else(|e| panic!("{name}: {e}"));
    let file = if weights.is_dir() { weights.join("model.safetensors") } else { weights.to_path_buf() };
    let (got, refs, base) = (load(&out), load(&case(name).join("ref.safetensors")), load(&file));
    let mut changed = 0;
    for (param, (_, _, b)) in &base {
        let g = &got[param].2;
        match refs.get(&format!("merged.{param}")) {
            Some((_, _, want)) => {
                let rel = max_rel(g, want);
                assert!(rel <= 1e-5, "{name}: {param}: relative error {rel:.2e}");
                changed += 1;
            }
            None => assert!(g.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name}: {param} changed"),
        }
    }
    std::fs::remove_dir_all(out.parent().unwrap()).ok();
    changed
}

/// The hosted adapter's logits against PEFT's.
fn assert_logits(name: &str) {
    assert_logits_of(name, &case(name).join("adapter"));
}

/// The logits of the adapter folder `adapter` hosted against case
/// `name`'s.
fn assert_logits_of(name: &str, adapter: &Path) {
    let (cfg, weights) = base();
    assert_logits_over(name, adapter, &cfg, &weights);
}

/// [`assert_logits_of`] over the model `config`, `weights`.
fn assert_logits_over(name: &str, adapter: &Path, cfg: &Path, weights: &Path) {
    let mut m = Llama::load(cfg, weights).unwrap();
    let ad = HfAdapter::read_dir(adapter).unwrap();
    // As `peft forward` does: the adapter's saved modules replace the model's.
    m.apply_replacements(&ad).unwrap();
    let hosted = LlamaAdapter::new(&m, &ad).unwrap();
    let refs = load(&case(name).join("ref.safetensors"));
    let ids: Vec<u32> = refs["input_ids"].2.iter().map(|&v| v as u32).collect();
    let logits = m.forward(&Faer::new(), &ids, Some(&hosted), &mut KvCache::new()).unwrap();
    let rel = max_rel(&logits, &refs["logits"].2);
    assert!(rel <= 1e-4, "{name}: logits relative error {rel:.2e}");
}

#[test]
fn exclude_modules_as_peft_applies_them() {
    for name in ["exclude", "exclude_regex"] {
        // Three projections in each of two layers, less the one excluded.
        assert_eq!(assert_merge(name, &[&case(name).join("adapter")]), 5, "{name}");
        assert_logits(name);
    }
}

#[test]
fn several_adapters_with_dora_merge_in_order_as_peft_does() {
    for name in ["lora_then_dora", "dora_then_dora"] {
        let (first, second) = (case(name).join("first"), case(name).join("second"));
        assert_eq!(assert_merge(name, &[&first, &second]), 4, "{name}");
    }
}

/// GPT-2's `Conv1D` weights are `[in, out]`: PEFT merges `s (B A)^T`, the
/// square `attn.c_proj` included, which only the model's `config.json`
/// (`model_type: gpt2`) can tell from an `nn.Linear`; without it a square
/// weight with `fan_in_fan_out` is refused, naming the field.
#[test]
fn conv1d_weights_merge_transposed_as_peft_does() {
    let (dir, ad) = (case("gpt2_conv1d").join("gpt2"), case("gpt2_conv1d").join("adapter"));
    assert_eq!(assert_merge_over("gpt2_conv1d", &dir, &[&ad]), 4);
    // The same weights alone in a folder without config.json.
    let bare = scratch("llama-cases-bare").join("model.safetensors");
    std::fs::copy(dir.join("model.safetensors"), &bare).unwrap();
    let err = merge("gpt2_bare", &bare, &[&ad]).unwrap_err();
    assert!(err.contains("fan_in_fan_out") && err.contains("attn.c_proj.weight is square"), "{err}");
}

/// PEFT ignores `fan_in_fan_out: true` on an `nn.Linear` (it warns and sets
/// it false): the Llama adapter of case `exclude` with the field set runs
/// and merges as written by PEFT, given the model's `config.json`
/// (`model_type: llama`); over the bare weights file its square q_proj and o_proj are
/// refused, naming the field.
#[test]
fn fan_in_fan_out_on_a_linear_layer_is_ignored_as_peft_does() {
    let dir = scratch("llama-cases-fifo");
    let ad = dir.join("adapter");
    std::fs::create_dir_all(&ad).unwrap();
    let src = case("exclude").join("adapter");
    std::fs::copy(src.join("adapter_model.safetensors"), ad.join("adapter_model.safetensors")).unwrap();
    let text = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    let edited = text.replace("\"fan_in_fan_out\": false", "\"fan_in_fan_out\": true");
    assert_ne!(edited, text);
    std::fs::write(ad.join("adapter_config.json"), edited).unwrap();
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(base().0, model.join("config.json")).unwrap();
    std::fs::copy(base().1, model.join("model.safetensors")).unwrap();
    assert_eq!(assert_merge_over("exclude", &model, &[&ad]), 5);
    assert_logits_of("exclude", &ad);
    let err = merge("exclude_bare", &base().1, &[&ad]).unwrap_err();
    assert!(err.contains("fan_in_fan_out") && err.contains("_proj.weight is square"), "{err}");
}

/// `modules_to_save` (PEFT matches by plain suffix: `["norm"]` saves every
/// `*norm`, the layer norms included), LoRA on `embed_tokens` and `lm_head`
/// with the base copies `save_embedding_layers="auto"` writes, and LoHa with
/// a rank above `min(in, out)`: hosted logits as PEFT's, merges as its
/// `merge_and_unload`.
#[test]
fn saved_modules_embeddings_and_large_ranks_run_and_merge_as_peft_does() {
    for (name, changed) in
        [("save_head", 5), ("save_embed", 5), ("save_norm", 9), ("lora_embed_head", 4), ("loha_big_rank", 4)]
    {
        assert_eq!(assert_merge(name, &[&case(name).join("adapter")]), changed, "{name}");
        assert_logits(name);
    }
}

/// Two LoKr, LoHa, (IA)^3 or VeRA adapters on the same modules merge as
/// PEFT merges them in turn: sums of deltas, products of scalings.
#[test]
fn two_adapters_of_one_method_merge_as_peft_does() {
    for name in ["lokr_pair", "loha_pair", "ia3_pair", "vera_pair"] {
        let (first, second) = (case(name).join("first"), case(name).join("second"));
        assert_eq!(assert_merge(name, &[&first, &second]), 4, "{name}");
    }
}

/// Trained biases (`bias="all"`: every bias of the model; `"lora_only"`:
/// those of the adapted projections, saved as `base_layer.bias`) over a
/// Llama with `attention_bias` and `mlp_bias`, and prefix tuning saved with
/// `prefix_projection=True` (the file holds the projected prefix, which is
/// what runs).
#[test]
fn trained_biases_and_projected_prefixes_run_as_peft_runs_them() {
    let model = case("bias_llama");
    let (cfg, weights) = (model.join("config.json"), model.join("model.safetensors"));
    for (name, changed) in [("bias_all", 18), ("bias_lora_only", 8)] {
        let ad = case(name).join("adapter");
        assert_eq!(assert_merge_over(name, &model, &[&ad]), changed, "{name}");
        assert_logits_over(name, &ad, &cfg, &weights);
    }
    assert_logits("prefix_projection");
}
