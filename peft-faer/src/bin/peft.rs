//! The `peft` command.
//!
//! `peft finetune` trains adapters of each method on a small frozen Llama
//! and a built-in task (see `peft_faer::llama::train`), then prints one
//! table.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use peft_core::activation::Activation;
use peft_core::adapter::AdapterConfig;
use peft_core::optim::AdamW;
use peft_core::storage::Format;
use peft_faer::Faer;
use peft_faer::files::{check_output, read_bounded, write_file};
use peft_faer::hf::base::Base;
use peft_faer::hf::convert::{own_to_peft_dir, peft_dir_to_own};
use peft_faer::hf::merge::{MergeOptions, MergeReport, merge_many};
use peft_faer::hf::{CONFIG_FILE, HfAdapter, HfError, MAX_ADAPTER_BYTES, PeftConfig, WEIGHTS_FILE};
use peft_faer::llama::train::{Distill, Method as LlamaMethod, Trainable, Trainer as LlamaTrainer, init_adapter};
use peft_faer::llama::{Bottleneck, KvCache, Llama, LlamaAdapter, LlamaConfig};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "peft",
    version,
    about = "Parameter-efficient fine-tuning: train, inspect, merge, quantize, combine, convert and run adapters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train adapters of every method on a small frozen Llama and a built-in task (no
    /// download), save and reload them, and print a table.
    Finetune(FinetuneArgs),
    /// Describe a Hugging Face PEFT adapter directory (method, per module its
    /// base tensor, in, out, r, alpha, scale, parameters; totals; warnings),
    /// or a base checkpoint (each tensor's storage, shape and bytes).
    Inspect {
        /// The adapter directory (adapter_config.json + adapter_model.safetensors),
        /// or a base: a .safetensors file or a checkpoint folder.
        adapter: PathBuf,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write the base checkpoint with every adapted weight replaced by
    /// `W + sum_i m_i s_i B_i A_i` (f32, rounded once), everything else
    /// copied unchanged.
    Merge {
        /// Base weights: a .safetensors file or a sharded checkpoint folder.
        #[arg(long)]
        base: PathBuf,
        /// A PEFT adapter directory, optionally with a multiplier `m`
        /// (`DIR:0.5`; default 1). Repeat to merge several in one pass.
        #[arg(long = "adapter", required = true, value_parser = weighted_dir)]
        adapters: Vec<(PathBuf, f64)>,
        /// Output: a .safetensors file (single-file base) or a new folder (sharded base).
        #[arg(long)]
        out: PathBuf,
        /// Storage of the output's float and quantized tensors (default: each
        /// as in the base). int8, q8_0 and q4_0 apply to the matrices they
        /// fit; each quantized tensor's max error against the f32 merge is
        /// printed.
        #[arg(long, value_enum)]
        dtype: Option<DtypeArg>,
        /// Threads per matrix product.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        threads: u32,
        /// Replace OUT if it exists (once the new output is complete).
        #[arg(long)]
        force: bool,
        /// Write NaN or infinite merged values instead of refusing them.
        #[arg(long)]
        allow_nonfinite: bool,
    },
    /// Quantize a safetensors base: every matrix the format fits becomes
    /// int8 (one scale per row), GGUF Q8_0 or GGUF Q4_0, stored as U8 with
    /// its format and shape in the header metadata; prints each tensor's
    /// max error.
    Quantize {
        /// Base weights: a .safetensors file or a sharded checkpoint folder.
        #[arg(long)]
        base: PathBuf,
        /// Output: a .safetensors file (single-file base) or a new folder (sharded base).
        #[arg(long)]
        out: PathBuf,
        /// The format.
        #[arg(long, value_enum)]
        format: QuantArg,
        /// Replace OUT if it exists (once the new output is complete).
        #[arg(long)]
        force: bool,
    },
    /// Run a Llama checkpoint (optionally with a PEFT adapter of any method
    /// this crate reads) over token ids and print the top next tokens.
    Forward {
        #[command(flatten)]
        run: RunArgs,
        /// Write the logits [1, rows, vocab] (f32) to this .safetensors file
        /// (prompt tuning: rows include the virtual tokens, as PEFT's output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// How many next tokens to print.
        #[arg(long, default_value_t = 5)]
        top: usize,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
        /// Replace OUT if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Greedy decoding with a KV cache (prefix tuning enters as the cache's
    /// first entries): print the new token ids.
    Generate {
        #[command(flatten)]
        run: RunArgs,
        /// Tokens to generate.
        #[arg(long)]
        max_new_tokens: usize,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Combine LoRA adapters into a new PEFT adapter directory, as PEFT's
    /// `add_weighted_adapter` (same math, same config; PEFT loads it).
    Combine {
        /// A PEFT LoRA directory and its weight (`DIR:0.7`; default 1), in
        /// order. Repeat for each source.
        #[arg(long = "adapter", required = true, value_parser = weighted_dir)]
        adapters: Vec<(PathBuf, f64)>,
        /// How to combine (PEFT's `combination_type`).
        #[arg(long, value_enum)]
        combination: CombinationArg,
        /// Rank kept by `svd` (default: the largest source rank).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        svd_rank: Option<u64>,
        /// Fraction kept by ties, dare_linear, dare_ties and magnitude_prune.
        #[arg(long)]
        density: Option<f64>,
        /// How ties and dare_ties elect each entry's sign.
        #[arg(long, value_enum, default_value = "total")]
        majority_sign: MajoritySignArg,
        /// Seed of DARE's random masks.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The adapter directory to write.
        #[arg(long)]
        out: PathBuf,
        /// Replace OUT if it exists (once the new output is complete).
        #[arg(long)]
        force: bool,
    },
    /// Convert between this project's .peft files and PEFT directories (the
    /// direction follows SRC: a folder becomes a .peft file, a file becomes
    /// a folder). Bit-exact both ways.
    Convert {
        /// A PEFT directory or a .peft file.
        src: PathBuf,
        /// The .peft file or PEFT directory to write.
        dst: PathBuf,
        /// Replace DST if it exists (once the new output is complete).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
    Bf16,
    Int8,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
}

impl DtypeArg {
    fn format(self) -> Format {
        match self {
            DtypeArg::F32 => Format::F32,
            DtypeArg::F16 => Format::F16,
            DtypeArg::Bf16 => Format::Bf16,
            DtypeArg::Int8 => Format::Int8,
            DtypeArg::Q8_0 => Format::Q8_0,
            DtypeArg::Q4_0 => Format::Q4_0,
        }
    }
}

/// The formats `peft quantize` writes.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum QuantArg {
    Int8,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_0")]
    Q4_0,
}

/// PEFT's `combination_type` names, written as PEFT writes them.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
enum CombinationArg {
    Linear,
    Cat,
    Svd,
    Ties,
    DareLinear,
    DareTies,
    MagnitudePrune,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MajoritySignArg {
    Total,
    Frequency,
}

/// `DIR[:WEIGHT]`: the text after the last `:` is the weight when it parses
/// as a finite number; otherwise the whole text is the folder (weight 1).
/// What `peft forward` and `peft generate` run.
#[derive(clap::Args)]
struct RunArgs {
    /// A Hugging Face LlamaForCausalLM folder (config.json and
    /// model.safetensors, or a sharded checkpoint).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT adapter directory.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Token ids (the prompt's, for generate), comma-separated.
    #[arg(long, value_parser = token_ids)]
    ids: TokenIds,
}

/// Token ids given on the command line.
#[derive(Clone, Debug)]
struct TokenIds(Vec<u32>);

fn token_ids(text: &str) -> Result<TokenIds, String> {
    let ids: Result<Vec<u32>, String> = text
        .split(',')
        .map(|t| t.trim().parse::<u32>().map_err(|_| format!("{t:?} is not a token id (a non-negative integer)")))
        .collect();
    let ids = ids?;
    if ids.is_empty() {
        return Err("no token ids".into());
    }
    Ok(TokenIds(ids))
}

fn weighted_dir(text: &str) -> Result<(PathBuf, f64), String> {
    if let Some((dir, w)) = text.rsplit_once(':') {
        if let Ok(w) = w.parse::<f64>() {
            if !w.is_finite() {
                return Err(format!("the weight {w} of {dir} is not finite"));
            }
            return Ok((PathBuf::from(dir), w));
        }
    }
    Ok((PathBuf::from(text), 1.0))
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MethodArg {
    Lora,
    Dora,
    Ia3,
    Loha,
    Lokr,
    Vera,
    Adapter,
    Prompt,
    Prefix,
    /// Every method above, in that order.
    All,
}

impl MethodArg {
    /// Every method, in the table's order.
    const EACH: [MethodArg; 9] = [
        MethodArg::Lora,
        MethodArg::Dora,
        MethodArg::Ia3,
        MethodArg::Loha,
        MethodArg::Lokr,
        MethodArg::Vera,
        MethodArg::Adapter,
        MethodArg::Prompt,
        MethodArg::Prefix,
    ];
}

#[derive(clap::Args)]
struct FinetuneArgs {
    /// Which method to train.
    #[arg(long, value_enum, default_value = "all")]
    method: MethodArg,
    /// Optimizer steps per method (batches of 8 sequences).
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,
    /// Rank of LoRA, DoRA, LoHa and LoKr (alpha = 2 r); VeRA's shared
    /// projections get 8 times it, as VeRA trains only `r + out` numbers per
    /// layer.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    rank: u64,
    /// Seed of the frozen model, the task and the adapters.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Threads per matrix product (faer over rayon); 1 is single-threaded.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    threads: u32,
    /// Learning rate for every method (default: each method's own, see
    /// `peft_core::optim`): positive and finite.
    #[arg(long, value_parser = positive_finite)]
    lr: Option<f64>,
    /// Folder for the model (`model/`, unless --model) and the adapters
    /// (`<method>/`, a PEFT folder; `adapter.safetensors`).
    #[arg(long, default_value = "peft-out")]
    out: PathBuf,
    /// A Hugging Face LlamaForCausalLM folder to train on (default: a small
    /// Llama from --seed, written to OUT/model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    json: bool,
}

fn positive_finite(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(v) => Err(format!("{v} is not positive and finite")),
        Err(e) => Err(e.to_string()),
    }
}

/// `println!` that returns write errors instead of panicking on them: a
/// closed pipe (`peft inspect DIR | head`) ends the command quietly (see
/// `main`).
macro_rules! outln {
    ($($arg:tt)*) => {
        std::io::Write::write_fmt(&mut std::io::stdout().lock(), format_args!("{}\n", format_args!($($arg)*)))?
    };
}

/// Sequences per optimizer step.
const BATCH: usize = 8;
/// Tokens per training sequence.
const SEQ: usize = 16;
/// Tokens of the hidden context the teacher reads.
const CONTEXT: usize = 8;
/// Training and held-out sequences.
const TRAIN: usize = 64;
const HELD_OUT: usize = 32;

/// One method's row of the table.
struct Row {
    name: &'static str,
    params: usize,
    base_params: usize,
    state_bytes: usize,
    lr: f64,
    initial: f64,
    final_loss: f64,
    seconds: f64,
    merge_diff: Option<f32>,
    file: PathBuf,
    file_bytes: u64,
    reload_identical: bool,
}

/// The default model of `peft finetune`: a small Llama with grouped-query
/// attention.
fn default_llama() -> Result<LlamaConfig, HfError> {
    LlamaConfig::parse(
        r#"{"vocab_size": 64, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}"#,
    )
}

/// Each method's configuration for `peft finetune`, PEFT's defaults for
/// Llama models where PEFT has them: LoRA, DoRA, LoHa and LoKr on `q_proj`
/// and `v_proj` with `alpha = 2 r`; (IA)^3 on `k_proj`, `v_proj` and the
/// input of `down_proj` (PEFT's Llama targets); VeRA on `q_proj`, `v_proj`
/// at rank `8 r`; bottleneck adapters of width 16 (GELU); prompt and prefix
/// tuning with as many virtual tokens as the hidden context.
fn trainable(model: &Llama, method: MethodArg, rank: usize, seed: u64) -> Result<Trainable, HfError> {
    let qv = || vec!["q_proj".to_string(), "v_proj".to_string()];
    let (r, alpha) = (rank, 2.0 * rank as f64);
    let m = match method {
        MethodArg::Lora | MethodArg::All => LlamaMethod::Lora { r, alpha, dora: false, targets: qv() },
        MethodArg::Dora => LlamaMethod::Lora { r, alpha, dora: true, targets: qv() },
        MethodArg::Ia3 => LlamaMethod::Ia3 {
            targets: vec!["k_proj".into(), "v_proj".into(), "down_proj".into()],
            feedforward: vec!["down_proj".into()],
        },
        MethodArg::Loha => LlamaMethod::Loha { r, alpha, targets: qv() },
        MethodArg::Lokr => LlamaMethod::Lokr { r, alpha, targets: qv() },
        MethodArg::Vera => LlamaMethod::Vera { r: 8 * r, targets: qv() },
        MethodArg::Adapter => {
            let config = AdapterConfig::width(16).with_activation(Activation::GeluErf);
            return Ok(Trainable::Bottleneck(Bottleneck::new(model, config, seed)?));
        }
        MethodArg::Prompt => LlamaMethod::Prompt { n: CONTEXT },
        MethodArg::Prefix => LlamaMethod::Prefix { n: CONTEXT },
    };
    Ok(Trainable::Peft(Box::new(init_adapter(model, &m, seed)?)))
}

/// The method's name in the table and `peft_core::Method`'s default
/// learning rate.
fn method_info(method: MethodArg) -> (&'static str, peft_core::Method) {
    use peft_core::Method as M;
    match method {
        MethodArg::Lora | MethodArg::All => ("lora", M::Lora),
        MethodArg::Dora => ("dora", M::Lora),
        MethodArg::Ia3 => ("ia3", M::Ia3),
        MethodArg::Loha => ("loha", M::Loha),
        MethodArg::Lokr => ("lokr", M::Lokr),
        MethodArg::Vera => ("vera", M::Vera),
        MethodArg::Adapter => ("adapter", M::Adapter),
        MethodArg::Prompt => ("prompt", M::Prompt),
        MethodArg::Prefix => ("prefix", M::Prefix),
    }
}

/// The logits of every held-out sequence, concatenated.
fn held_out_logits(
    model: &Llama,
    adapter: Option<&Trainable>,
    task: &Distill,
    backend: &Faer,
) -> Result<Vec<f32>, HfError> {
    let hosted = adapter.map(|a| a.hosted(model)).transpose()?;
    let mut all = Vec::new();
    for (ids, _) in &task.held_out {
        all.extend(model.forward(backend, ids, hosted.as_ref(), &mut KvCache::new())?);
    }
    Ok(all)
}

/// Bytes of a file, or of the files of a folder.
fn bytes_of(path: &Path) -> u64 {
    match std::fs::read_dir(path) {
        Ok(dir) => dir.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum(),
        Err(_) => std::fs::metadata(path).map_or(0, |m| m.len()),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_method(
    model: &Llama,
    base_dir: &Path,
    task: &Distill,
    which: MethodArg,
    args: &FinetuneArgs,
    backend: &Faer,
) -> Result<Row, Box<dyn std::error::Error>> {
    let base_params = model.num_params();
    let mut adapter = trainable(model, which, args.rank as usize, args.seed ^ 0xada)?;
    let (name, method) = method_info(which);
    let lr = args.lr.unwrap_or(method.default_lr());
    let mut trainer = LlamaTrainer::with_optimizer(AdamW::new(lr).with_weight_decay(0.0).with_max_grad_norm(Some(1.0)));
    let initial = task.held_out_loss(backend, model, Some(&adapter))?;

    let bar = if std::io::stderr().is_terminal() && !args.json {
        let b = ProgressBar::new(args.steps);
        b.set_style(ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg}")?.progress_chars("=> "));
        b.set_prefix(name);
        Some(b)
    } else {
        None
    };
    let every = (args.steps as usize / 5).max(1);
    let start = Instant::now();
    for step in 0..args.steps as usize {
        let batch: Vec<usize> = (0..BATCH).map(|i| step * BATCH + i).collect();
        let l = trainer.step(backend, model, &mut adapter, task, &batch)?;
        match &bar {
            Some(b) => {
                b.set_position(step as u64 + 1);
                b.set_message(format!("train loss {l:.4}"));
            }
            None if !args.json && (step + 1) % every == 0 => {
                eprintln!("{name:>8} step {:>5}/{}  train loss {l:.5}", step + 1, args.steps);
            }
            None => {}
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let final_loss = task.held_out_loss(backend, model, Some(&adapter))?;
    let unmerged = held_out_logits(model, Some(&adapter), task, backend)?;

    // Saved (a PEFT folder, or this crate's bottleneck file), read back:
    // the same logits, bit for bit. Each run replaces its own output.
    let (file, reloaded) = match &adapter {
        Trainable::Peft(ad) => {
            let dir = args.out.join(name);
            ad.write_dir(&dir, true)?;
            (dir.clone(), Trainable::Peft(Box::new(HfAdapter::read_dir(&dir)?)))
        }
        Trainable::Bottleneck(b) => {
            let file = args.out.join(format!("{name}.safetensors"));
            b.save(&file, true)?;
            (file.clone(), Trainable::Bottleneck(Bottleneck::load(&file)?))
        }
    };
    let again = held_out_logits(model, Some(&reloaded), task, backend)?;
    let reload_identical =
        again.len() == unmerged.len() && again.iter().zip(&unmerged).all(|(a, b)| a.to_bits() == b.to_bits());

    // The methods that merge: `peft merge` of the saved folder into the
    // saved model gives the same logits (up to rounding).
    let merge_diff = match &adapter {
        Trainable::Peft(ad) if !matches!(ad.config, PeftConfig::Prompt(_)) => {
            let merged_file = args.out.join(format!(".{name}-merged.safetensors"));
            let base = Base::open(base_dir)?;
            let saved = HfAdapter::read_dir(&file)?;
            merge_many(
                &base,
                &[(&saved, 1.0)],
                &merged_file,
                &MergeOptions { force: true, ..Default::default() },
                backend,
                |_| {},
            )?;
            let merged = Llama::load(&base_dir.join("config.json"), &merged_file);
            std::fs::remove_file(&merged_file)?;
            let merged = held_out_logits(&merged?, None, task, backend)?;
            Some(unmerged.iter().zip(&merged).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max))
        }
        _ => None,
    };
    let mut adapter = adapter;
    Ok(Row {
        name,
        params: adapter.num_params(),
        base_params,
        state_bytes: trainer.state_bytes(),
        lr,
        initial,
        final_loss,
        seconds,
        merge_diff,
        file_bytes: bytes_of(&file),
        file,
        reload_identical,
    })
}

fn finetune(args: &FinetuneArgs) -> Result<bool, Box<dyn std::error::Error>> {
    let backend = Faer::with_threads(args.threads as usize);
    std::fs::create_dir_all(&args.out)?;
    // The frozen model: a checkpoint, or the default small Llama saved to
    // OUT/model (the base `peft merge` and `peft forward` read).
    let (model, base_dir) = match &args.model {
        Some(dir) => (Llama::load_dir(dir)?, dir.clone()),
        None => {
            let model = Llama::random(default_llama()?, args.seed);
            let dir = args.out.join("model");
            model.save_dir(&dir, true)?;
            (model, dir)
        }
    };
    let frozen = model.clone();
    let c = model.config.clone();
    let mut rng = peft_core::Rng::new(args.seed ^ 0xc0de);
    let context: Vec<u32> = (0..CONTEXT).map(|_| (rng.next_u64() % c.vocab_size as u64) as u32).collect();
    let task = Distill::new(&backend, &model, &context, SEQ, TRAIN, HELD_OUT, args.seed)?;
    let methods: Vec<MethodArg> = match args.method {
        MethodArg::All => MethodArg::EACH.to_vec(),
        one => vec![one],
    };
    if !args.json {
        eprintln!(
            "llama: hidden={} layers={} heads={} kv_heads={} vocab={}, {} frozen parameters ({}); task: match the model's next-token distributions when it reads a hidden {CONTEXT}-token context first ({TRAIN} train, {HELD_OUT} held-out sequences of {SEQ} tokens)",
            c.hidden_size,
            c.num_layers,
            c.num_heads,
            c.num_kv_heads,
            c.vocab_size,
            model.num_params(),
            base_dir.display()
        );
    }
    let base_loss = task.held_out_loss(&backend, &model, None)?;
    let mut rows = Vec::new();
    for m in methods {
        rows.push(run_method(&model, &base_dir, &task, m, args, &backend)?);
    }
    let base_identical = model == frozen;
    let full_state = 2 * 4 * model.num_params();
    // A failed check is an error exit; a method still above the frozen
    // model (too few steps) is reported, not an error.
    let ok = base_identical && rows.iter().all(|r| r.reload_identical && r.final_loss < r.initial);
    if args.json {
        let methods: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "method": r.name,
                    "trainable_params": r.params,
                    "percent_of_base": 100.0 * r.params as f64 / r.base_params as f64,
                    "optimizer_state_bytes": r.state_bytes,
                    "full_finetune_optimizer_state_bytes": full_state,
                    "lr": r.lr,
                    "initial_held_out_loss": r.initial,
                    "final_held_out_loss": r.final_loss,
                    "beats_frozen_model": r.final_loss < base_loss,
                    "seconds": r.seconds,
                    "merged_vs_unmerged_max_abs_diff": r.merge_diff,
                    "adapter_file": r.file.display().to_string(),
                    "adapter_file_bytes": r.file_bytes,
                    "reload_identical": r.reload_identical,
                })
            })
            .collect();
        let doc = json!({
            "model": { "hidden_size": c.hidden_size, "layers": c.num_layers, "heads": c.num_heads,
                       "kv_heads": c.num_kv_heads, "vocab": c.vocab_size, "frozen_params": model.num_params(),
                       "path": base_dir.display().to_string() },
            "task": { "hidden_context_tokens": CONTEXT, "sequence_tokens": SEQ, "train_sequences": TRAIN,
                      "held_out_sequences": HELD_OUT, "loss": "mean KL(teacher || student) per token" },
            "steps": args.steps, "batch": BATCH, "rank": args.rank, "seed": args.seed, "threads": args.threads,
            "frozen_model_held_out_loss": base_loss,
            "methods": methods,
            "frozen_base_bit_identical": base_identical,
        });
        outln!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        outln!("frozen model alone (no adapter): held-out loss {base_loss:.4e}");
        print_table(&rows, full_state, base_identical, &args.out)?;
    }
    Ok(ok)
}

fn print_table(rows: &[Row], full_state: usize, base_identical: bool, out: &Path) -> std::io::Result<()> {
    outln!(
        "{:<8} {:>9} {:>7} {:>21} {:>7} {:>10} {:>10} {:>7} {:>11} {:>9} {:>7}",
        "method",
        "trainable",
        "% base",
        "optim state / full",
        "lr",
        "held-out0",
        "held-out",
        "time s",
        "merge diff",
        "file B",
        "reload"
    );
    for r in rows {
        outln!(
            "{:<8} {:>9} {:>6.2}% {:>21} {:>7.0e} {:>10.4e} {:>10.4e} {:>7.1} {:>11} {:>9} {:>7}",
            r.name,
            r.params,
            100.0 * r.params as f64 / r.base_params as f64,
            format!("{} / {}", r.state_bytes, full_state),
            r.lr,
            r.initial,
            r.final_loss,
            r.seconds,
            r.merge_diff.map_or("-".to_string(), |d| format!("{d:.1e}")),
            r.file_bytes,
            if r.reload_identical { "exact" } else { "DIFFERS" },
        );
    }
    outln!("frozen base bit-identical after training: {}", if base_identical { "yes" } else { "NO" });
    outln!("adapters written to {}", out.display());
    Ok(())
}

/// A base checkpoint: each tensor's storage, logical shape and stored
/// bytes, in storage order, then the totals per storage.
fn inspect_base(path: &Path, as_json: bool) -> Result<bool, Box<dyn std::error::Error>> {
    let b = Base::open(path)?;
    let storage =
        |e: &peft_faer::hf::st::Entry| e.format().map_or_else(|| format!("{:?}", e.dtype), |f| f.name().into());
    let mut totals: std::collections::BTreeMap<String, (usize, u64, u64)> = Default::default();
    for (_, e) in b.entries() {
        let t = totals.entry(storage(e)).or_default();
        *t = (t.0 + 1, t.1 + e.numel() as u64, t.2 + e.len);
    }
    if as_json {
        let tensors: Vec<_> = b
            .entries()
            .map(|(_, e)| json!({ "tensor": e.name, "storage": storage(e), "shape": e.shape, "bytes": e.len }))
            .collect();
        let totals: serde_json::Map<String, serde_json::Value> = totals
            .iter()
            .map(|(k, (n, p, by))| (k.clone(), json!({ "tensors": n, "values": p, "bytes": by })))
            .collect();
        let doc = json!({ "base": path, "tensors": tensors, "totals": totals, "bytes": b.total_bytes() });
        outln!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(true);
    }
    outln!("base {}: {} tensors, {} bytes", path.display(), b.entries().count(), b.total_bytes());
    outln!("{:<56} {:>7} {:>16} {:>12}", "tensor", "storage", "shape", "bytes");
    for (_, e) in b.entries() {
        outln!("{:<56} {:>7} {:>16} {:>12}", e.name, storage(e), format!("{:?}", e.shape), e.len);
    }
    for (k, (n, values, bytes)) in &totals {
        let per = if *values > 0 { *bytes as f64 / *values as f64 } else { 0.0 };
        outln!("{k}: {n} tensors, {values} values, {bytes} bytes ({per:.4} bytes per value)");
    }
    Ok(true)
}

fn inspect(dir: &Path, as_json: bool) -> Result<bool, Box<dyn std::error::Error>> {
    let is_base = dir.is_file()
        || (!dir.join(CONFIG_FILE).exists()
            && (dir.join(peft_faer::hf::base::INDEX_FILE).exists() || dir.join("model.safetensors").exists()));
    if is_base {
        return inspect_base(dir, as_json);
    }
    // Headers and a chunked scan for NaN/Inf: memory does not grow with the adapter.
    let ad = HfAdapter::summarize(dir)?;
    let nonfinite: Vec<String> =
        ad.nonfinite.iter().map(|(t, i, v)| format!("{t}: element {i} is {v} (not finite)")).collect();
    match &ad.config {
        PeftConfig::Prompt(p) => {
            let shape = ad.prompt_shape.as_ref().ok_or("no prompt tensor")?;
            let kind = if p.prefix { "prefix" } else { "prompt" };
            let params: usize = shape.iter().product();
            if as_json {
                let doc = json!({ "method": kind, "num_virtual_tokens": p.num_virtual_tokens, "token_dim": p.token_dim,
                    "num_layers": p.num_layers, "shape": shape, "total_params": params, "warnings": nonfinite });
                outln!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                outln!(
                    "method {kind}: {} virtual tokens, token_dim {}, prompt_embeddings {shape:?}, {params} parameters",
                    p.num_virtual_tokens,
                    p.token_dim
                );
                for w in &nonfinite {
                    outln!("warning: {w}");
                }
            }
        }
        PeftConfig::Loha(c) => {
            let params = |r: usize, i: usize, o: usize| 2 * r * (i + o);
            let total: usize = ad.loha.iter().map(|&(_, i, o, r, _)| params(r, i, o)).sum();
            if as_json {
                let modules: Vec<_> = ad
                    .loha
                    .iter()
                    .map(|(name, i, o, r, alpha)| json!({ "module": name, "base_tensor": format!("{name}.weight"),
                        "in": i, "out": o, "r": r, "alpha": alpha, "scale": alpha / *r as f64, "params": params(*r, *i, *o) }))
                    .collect();
                let doc = json!({ "method": "loha", "r": c.r, "alpha": c.alpha, "dtype": format!("{:?}", ad.dtype),
                    "modules": modules, "total_params": total, "warnings": nonfinite });
                outln!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                outln!("method loha: r={} alpha={} (dW = s (W1a W1b) * (W2a W2b), s = alpha / r)", c.r, c.alpha);
                outln!(
                    "{:<40} {:<48} {:>6} {:>6} {:>4} {:>7} {:>9}",
                    "module",
                    "base tensor",
                    "in",
                    "out",
                    "r",
                    "alpha",
                    "params"
                );
                for (name, i, o, r, alpha) in &ad.loha {
                    outln!(
                        "{:<40} {:<48} {:>6} {:>6} {:>4} {:>7} {:>9}",
                        name,
                        format!("{name}.weight"),
                        i,
                        o,
                        r,
                        alpha,
                        params(*r, *i, *o)
                    );
                }
                outln!("total: {} modules, {total} trainable parameters", ad.loha.len());
                for w in &nonfinite {
                    outln!("warning: {w}");
                }
            }
        }
        PeftConfig::Lokr(c) => {
            let total: usize = ad.lokr.iter().map(|m| m.6).sum();
            if as_json {
                let modules: Vec<_> = ad
                    .lokr
                    .iter()
                    .map(|(name, i, o, r, alpha, d, p)| json!({ "module": name, "base_tensor": format!("{name}.weight"),
                        "in": i, "out": o, "r": r, "alpha": alpha, "w1": [d[0], d[1]], "w2": [d[2], d[3]], "params": p }))
                    .collect();
                let doc = json!({ "method": "lokr", "r": c.common.r, "alpha": c.common.alpha,
                    "decompose_both": c.decompose_both, "decompose_factor": c.decompose_factor,
                    "modules": modules, "total_params": total, "warnings": nonfinite });
                outln!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                outln!(
                    "method lokr: r={} alpha={} decompose_factor={} (dW = s kron(W1, W2), s = alpha / r)",
                    c.common.r,
                    c.common.alpha,
                    c.decompose_factor
                );
                outln!(
                    "{:<40} {:>6} {:>6} {:>4} {:>7} {:>10} {:>10} {:>9}",
                    "module",
                    "in",
                    "out",
                    "r",
                    "alpha",
                    "W1",
                    "W2",
                    "params"
                );
                for (name, i, o, r, alpha, d, p) in &ad.lokr {
                    let (w1, w2) = (format!("{}x{}", d[0], d[1]), format!("{}x{}", d[2], d[3]));
                    outln!("{:<40} {:>6} {:>6} {:>4} {:>7} {:>10} {:>10} {:>9}", name, i, o, r, alpha, w1, w2, p);
                }
                outln!("total: {} modules, {total} trainable parameters", ad.lokr.len());
                for w in &nonfinite {
                    outln!("warning: {w}");
                }
            }
        }
        PeftConfig::Vera(c) => {
            let (r, max_in, max_out) = ad.vera_projections.ok_or("no VeRA projections")?;
            let total: usize = ad.vera.iter().map(|(_, r, o)| r + o).sum();
            if as_json {
                let modules: Vec<_> = ad
                    .vera
                    .iter()
                    .map(|(name, r, o)| {
                        json!({ "module": name, "base_tensor": format!("{name}.weight"),
                        "out": o, "r": r, "params": r + o })
                    })
                    .collect();
                let doc = json!({ "method": "vera", "r": c.r, "d_initial": c.d_initial,
                    "projections": { "vera_A": [r, max_in], "vera_B": [max_out, r], "frozen_params": r * (max_in + max_out) },
                    "dtype": format!("{:?}", ad.dtype), "modules": modules, "total_params": total, "warnings": nonfinite });
                outln!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                outln!("method vera: r={} (dW = diag(lambda_b) B diag(lambda_d) A, no alpha / r)", c.r);
                outln!(
                    "shared frozen projections: vera_A [{r}, {max_in}], vera_B [{max_out}, {r}] ({} parameters)",
                    r * (max_in + max_out)
                );
                outln!("{:<40} {:<48} {:>6} {:>4} {:>9}", "module", "base tensor", "out", "r", "params");
                for (name, r, o) in &ad.vera {
                    outln!("{:<40} {:<48} {:>6} {:>4} {:>9}", name, format!("{name}.weight"), o, r, r + o);
                }
                outln!("total: {} modules, {total} trainable parameters", ad.vera.len());
                for w in &nonfinite {
                    outln!("warning: {w}");
                }
            }
        }
        PeftConfig::Ia3(_) => {
            let total: usize = ad.ia3.iter().map(|m| m.2).sum();
            if as_json {
                let modules: Vec<_> = ad
                    .ia3
                    .iter()
                    .map(|(name, ff, n)| {
                        json!({ "module": name, "base_tensor": format!("{name}.weight"),
                        "scales": if *ff { "input" } else { "output" }, "params": n })
                    })
                    .collect();
                let doc = json!({ "method": "ia3", "dtype": format!("{:?}", ad.dtype), "modules": modules,
                    "total_params": total, "warnings": nonfinite });
                outln!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                outln!("method ia3: a learned vector scales each module's output (or a feedforward module's input)");
                outln!("{:<40} {:<48} {:>8} {:>9}", "module", "base tensor", "scales", "params");
                for (name, ff, n) in &ad.ia3 {
                    let scales = if *ff { "input" } else { "output" };
                    outln!("{:<40} {:<48} {:>8} {:>9}", name, format!("{name}.weight"), scales, n);
                }
                outln!("total: {} modules, {total} trainable parameters", ad.ia3.len());
                for w in &nonfinite {
                    outln!("warning: {w}");
                }
            }
        }
        PeftConfig::Lora(c) => {
            let mut warnings = nonfinite;
            let mut rows = Vec::new();
            for m in &ad.modules {
                let params = m.params();
                if !(m.scale as f32).is_finite() {
                    warnings.push(format!(
                        "{}: the scale {} overflows f32; a merge would write infinities",
                        m.name, m.scale
                    ));
                }
                let min = m.n_in.min(m.n_out);
                if 2 * m.r >= min {
                    warnings.push(format!(
                        "{}: rank {} is close to min(in, out) = {min}; LoRA saves little there",
                        m.name, m.r
                    ));
                }
                rows.push(json!({ "module": m.name, "base_tensor": format!("{}.weight", m.name), "in": m.n_in,
                    "out": m.n_out, "r": m.r, "alpha": m.alpha, "scale": m.scale, "params": params }));
            }
            let total: usize = ad.modules.iter().map(|m| m.params()).sum();
            if as_json {
                let doc = json!({ "method": "lora", "use_dora": c.use_dora, "r": c.r, "lora_alpha": c.lora_alpha, "use_rslora": c.use_rslora,
                    "dtype": format!("{:?}", ad.dtype), "modules": rows, "total_params": total,
                    "replaced_tensors": ad.replacements.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), "warnings": warnings });
                outln!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                outln!(
                    "method lora{}: r={} lora_alpha={} use_rslora={} dtype {:?}",
                    if c.use_dora { " (DoRA: a magnitude per output row)" } else { "" },
                    c.r,
                    c.lora_alpha,
                    c.use_rslora,
                    ad.dtype
                );
                outln!(
                    "{:<40} {:<48} {:>6} {:>6} {:>4} {:>7} {:>8} {:>9}",
                    "module",
                    "base tensor",
                    "in",
                    "out",
                    "r",
                    "alpha",
                    "scale",
                    "params"
                );
                for m in &ad.modules {
                    outln!(
                        "{:<40} {:<48} {:>6} {:>6} {:>4} {:>7} {:>8} {:>9}",
                        m.name,
                        format!("{}.weight", m.name),
                        m.n_in,
                        m.n_out,
                        m.r,
                        m.alpha,
                        m.scale,
                        m.params()
                    );
                }
                outln!("total: {} modules, {total} trainable parameters", ad.modules.len());
                for r in &ad.replacements {
                    outln!("replaces {} {:?} whole", r.0, r.1);
                }
                for w in &warnings {
                    outln!("warning: {w}");
                }
            }
        }
    }
    Ok(true)
}

struct MergeArgs<'a> {
    base: &'a Path,
    adapters: &'a [(PathBuf, f64)],
    out: &'a Path,
    dtype: Option<DtypeArg>,
    threads: u32,
    force: bool,
    allow_nonfinite: bool,
}

fn merge_cmd(a: &MergeArgs<'_>) -> Result<bool, Box<dyn std::error::Error>> {
    let read: Vec<(HfAdapter, f64)> =
        a.adapters.iter().map(|(dir, m)| Ok((HfAdapter::read_dir(dir)?, *m))).collect::<Result<_, HfError>>()?;
    let ads: Vec<(&HfAdapter, f64)> = read.iter().map(|(ad, m)| (ad, *m)).collect();
    let b = Base::open(a.base)?;
    let dtype = a.dtype.map(DtypeArg::format);
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(b.total_bytes());
        if let Ok(style) = ProgressStyle::with_template("merge [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar
    });
    // A test hook: slow each tensor down so that a test can interrupt a
    // merge in progress (tests/cli.rs).
    let pause = std::env::var("PEFT_TEST_MERGE_PAUSE_MS").ok().and_then(|v| v.parse().ok());
    let start = Instant::now();
    let options = MergeOptions { dtype, force: a.force, allow_nonfinite: a.allow_nonfinite };
    let report = merge_many(&b, &ads, a.out, &options, &Faer::with_threads(a.threads as usize), |n| {
        if let Some(bar) = &bar {
            bar.inc(n);
        }
        if let Some(ms) = pause {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    eprintln!(
        "merged {} weights, replaced {}, copied {} tensors: {} bytes to {} in {:.2} s",
        report.merged,
        report.replaced,
        report.copied,
        report.bytes,
        a.out.display(),
        start.elapsed().as_secs_f64()
    );
    print_quant_report(&report, "the f32 merge")?;
    Ok(true)
}

/// Each quantized tensor's max error (and the format's bound for its
/// largest value), then the tensors the requested format did not fit.
fn print_quant_report(report: &MergeReport, against: &str) -> std::io::Result<()> {
    if !report.quantized.is_empty() {
        outln!("max |quantized - exact| per tensor, against {against}:");
        outln!("{:<56} {:>6} {:>12} {:>12} {:>12}", "tensor", "format", "max error", "bound", "max |value|");
        for q in &report.quantized {
            let bound = peft_core::storage::error_bound(q.format, q.max_abs);
            outln!(
                "{:<56} {:>6} {:>12.4e} {:>12.4e} {:>12.4e}",
                q.tensor,
                q.format.name(),
                q.max_error,
                bound,
                q.max_abs
            );
        }
    }
    for t in &report.kept {
        outln!("{t}: kept in its own storage (the format does not fit its shape)");
    }
    Ok(())
}

fn quantize_cmd(base: &Path, out: &Path, format: QuantArg, force: bool) -> Result<bool, Box<dyn std::error::Error>> {
    let b = Base::open(base)?;
    let format = match format {
        QuantArg::Int8 => Format::Int8,
        QuantArg::Q8_0 => Format::Q8_0,
        QuantArg::Q4_0 => Format::Q4_0,
    };
    let options = MergeOptions { dtype: Some(format), force, allow_nonfinite: false };
    let start = Instant::now();
    let report = merge_many(&b, &[], out, &options, &Faer::new(), |_| {})?;
    eprintln!(
        "{} tensors quantized to {}, {} kept: {} bytes (from {}) to {} in {:.2} s",
        report.quantized.len(),
        format.name(),
        report.kept.len(),
        report.bytes,
        b.total_bytes(),
        out.display(),
        start.elapsed().as_secs_f64()
    );
    print_quant_report(&report, "the base")?;
    Ok(true)
}

/// The model and, if given, the adapter read from its directory.
fn llama_and_adapter(model: &Path, adapter: Option<&Path>) -> Result<(Llama, Option<HfAdapter>), HfError> {
    let m = Llama::load_dir(model)?;
    let ad = adapter.map(HfAdapter::read_dir).transpose()?;
    Ok((m, ad))
}

fn forward_cmd(
    model: &Path,
    adapter: Option<&Path>,
    ids: &[u32],
    out: Option<&Path>,
    top: usize,
    as_json: bool,
    force: bool,
) -> Result<bool, Box<dyn std::error::Error>> {
    let (m, ad) = llama_and_adapter(model, adapter)?;
    if let Some(out) = out {
        let mut inputs: Vec<PathBuf> = Base::open(model)?.input_files();
        inputs.push(model.join("config.json"));
        inputs.extend(ad.iter().flat_map(HfAdapter::source_files));
        let refs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
        check_output(out, &refs, force)?;
    }
    let hosted = ad.as_ref().map(|a| LlamaAdapter::new(&m, a)).transpose()?;
    let logits = m.forward(&Faer::new(), ids, hosted.as_ref(), &mut KvCache::new())?;
    let vocab = m.config.vocab_size;
    let rows = logits.len() / vocab;
    let last = &logits[(rows - 1) * vocab..];
    // Softmax of the last row, in f64.
    let max = last.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let z: f64 = last.iter().map(|&v| (f64::from(v) - f64::from(max)).exp()).sum();
    let mut order: Vec<usize> = (0..vocab).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]).then(a.cmp(&b)));
    let best: Vec<(usize, f32, f64)> =
        order.iter().take(top).map(|&t| (t, last[t], (f64::from(last[t]) - f64::from(max)).exp() / z)).collect();
    if let Some(out) = out {
        let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
        let entries = [peft_faer::hf::st::OutEntry::plain("logits", safetensors::Dtype::F32, vec![1, rows, vocab])];
        let mut file = peft_faer::hf::st::header(&entries, &Default::default())?;
        file.extend_from_slice(&bytes);
        write_file(out, &file, force)?;
    }
    if as_json {
        let top: Vec<_> = best.iter().map(|(t, l, p)| json!({ "token": t, "logit": l, "probability": p })).collect();
        let doc = json!({ "rows": rows, "vocab": vocab, "next": top, "out": out });
        outln!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        outln!("next token after {} ids ({rows} rows of logits):", ids.len());
        outln!("{:>8} {:>12} {:>12}", "token", "logit", "probability");
        for (t, l, p) in &best {
            outln!("{t:>8} {l:>12.5} {p:>12.5}");
        }
        if let Some(out) = out {
            outln!("logits [1, {rows}, {vocab}] written to {}", out.display());
        }
    }
    Ok(true)
}

fn generate_cmd(
    model: &Path,
    adapter: Option<&Path>,
    ids: &[u32],
    max_new: usize,
    as_json: bool,
) -> Result<bool, Box<dyn std::error::Error>> {
    let (m, ad) = llama_and_adapter(model, adapter)?;
    let hosted = ad.as_ref().map(|a| LlamaAdapter::new(&m, a)).transpose()?;
    let new = m.generate(&Faer::new(), ids, hosted.as_ref(), max_new)?;
    if as_json {
        outln!("{}", serde_json::to_string_pretty(&json!({ "prompt": ids, "new_tokens": new }))?);
    } else {
        let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        outln!("prompt:     {}", list(ids));
        outln!("new tokens: {}", list(&new));
    }
    Ok(true)
}

struct CombineArgs<'a> {
    adapters: &'a [(PathBuf, f64)],
    combination: CombinationArg,
    svd_rank: Option<u64>,
    density: Option<f64>,
    majority_sign: MajoritySignArg,
    seed: u64,
    out: &'a Path,
    force: bool,
}

fn combine_cmd(a: &CombineArgs<'_>) -> Result<bool, Box<dyn std::error::Error>> {
    use peft_core::combine::{Combination, MajoritySign};
    let sign = match a.majority_sign {
        MajoritySignArg::Total => MajoritySign::Total,
        MajoritySignArg::Frequency => MajoritySign::Frequency,
    };
    let density = || a.density.ok_or("--density is required by ties, dare_linear, dare_ties and magnitude_prune");
    let combination = match a.combination {
        CombinationArg::Linear => Combination::Linear,
        CombinationArg::Cat => Combination::Cat,
        CombinationArg::Svd => Combination::Svd { rank: a.svd_rank.map(|r| r as usize) },
        CombinationArg::Ties => Combination::Ties { density: density()?, sign },
        CombinationArg::DareLinear => Combination::DareLinear { density: density()? },
        CombinationArg::DareTies => Combination::DareTies { density: density()?, sign },
        CombinationArg::MagnitudePrune => Combination::MagnitudePrune { density: density()? },
    };
    if a.svd_rank.is_some() && a.combination != CombinationArg::Svd {
        return Err("--svd-rank applies to --combination svd only".into());
    }
    if a.density.is_some()
        && matches!(a.combination, CombinationArg::Linear | CombinationArg::Cat | CombinationArg::Svd)
    {
        return Err("--density applies to ties, dare_linear, dare_ties and magnitude_prune only".into());
    }
    let mut inputs: Vec<PathBuf> = Vec::new();
    for (dir, _) in a.adapters {
        inputs.extend([dir.clone(), dir.join(CONFIG_FILE), dir.join(WEIGHTS_FILE)]);
    }
    let input_refs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    check_output(a.out, &input_refs, a.force)?;
    let read: Vec<(HfAdapter, f64)> =
        a.adapters.iter().map(|(dir, w)| Ok((HfAdapter::read_dir(dir)?, *w))).collect::<Result<_, HfError>>()?;
    let sources: Vec<(&HfAdapter, f64)> = read.iter().map(|(ad, w)| (ad, *w)).collect();
    let combined = peft_faer::hf::combine::combine(&sources, combination, a.seed)?;
    combined.write_dir(a.out, a.force)?;
    let rank = combined.modules.first().map_or(0, |m| m.r);
    eprintln!(
        "combined {} adapters ({}): {} modules of rank {rank} -> {}",
        sources.len(),
        if sources.len() == 1 { "linear: a single source" } else { combination.name() },
        combined.modules.len(),
        a.out.display()
    );
    Ok(true)
}

fn convert_cmd(src: &Path, dst: &Path, force: bool) -> Result<bool, Box<dyn std::error::Error>> {
    let meta = std::fs::metadata(src).map_err(|e| format!("{}: {e}", src.display()))?;
    if meta.is_dir() {
        let inputs = [src.join(CONFIG_FILE), src.join(WEIGHTS_FILE)];
        check_output(dst, &[src, &inputs[0], &inputs[1]], force)?;
        let bytes = peft_dir_to_own(src)?;
        write_file(dst, &bytes, force)?;
        eprintln!("{} -> {} ({} bytes, peft format)", src.display(), dst.display(), bytes.len());
    } else {
        check_output(dst, &[src], force)?;
        let bytes = read_bounded(src, MAX_ADAPTER_BYTES)?;
        own_to_peft_dir(&bytes, dst, force).map_err(|e| e.in_file(src))?;
        eprintln!("{} -> {} (Hugging Face PEFT directory)", src.display(), dst.display());
    }
    Ok(true)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Signals run no destructors: remove this process's temporaries, then
    // exit as a shell expects of an interrupted command.
    let handler = ctrlc::set_handler(|| {
        peft_faer::files::remove_registered_temporaries();
        std::process::exit(130);
    });
    if let Err(e) = handler {
        eprintln!("peft: warning: no SIGINT/SIGTERM handler ({e}); an interrupted run may leave a temporary");
    }
    let result = match &cli.command {
        Command::Finetune(args) => finetune(args),
        Command::Inspect { adapter, json } => inspect(adapter, *json),
        Command::Merge { base, adapters, out, dtype, threads, force, allow_nonfinite } => merge_cmd(&MergeArgs {
            base,
            adapters,
            out,
            dtype: *dtype,
            threads: *threads,
            force: *force,
            allow_nonfinite: *allow_nonfinite,
        }),
        Command::Combine { adapters, combination, svd_rank, density, majority_sign, seed, out, force } => {
            combine_cmd(&CombineArgs {
                adapters,
                combination: *combination,
                svd_rank: *svd_rank,
                density: *density,
                majority_sign: *majority_sign,
                seed: *seed,
                out,
                force: *force,
            })
        }
        Command::Convert { src, dst, force } => convert_cmd(src, dst, *force),
        Command::Quantize { base, out, format, force } => quantize_cmd(base, out, *format, *force),
        Command::Forward { run, out, top, json, force } => {
            forward_cmd(&run.model, run.adapter.as_deref(), &run.ids.0, out.as_deref(), *top, *json, *force)
        }
        Command::Generate { run, max_new_tokens, json } => {
            generate_cmd(&run.model, run.adapter.as_deref(), &run.ids.0, *max_new_tokens, *json)
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("peft: a check failed (see the table)");
            ExitCode::FAILURE
        }
        // The reader of stdout went away (`| head`): nothing left to say.
        Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) => {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("peft: {e}");
            ExitCode::FAILURE
        }
    }
}
