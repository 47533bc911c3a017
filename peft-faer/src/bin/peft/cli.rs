//! The command line: every subcommand's arguments (clap derive).

use std::path::PathBuf;

use clap::builder::PossibleValuesParser;
use clap::{Parser, Subcommand, ValueEnum};
use peft_core::method::METHODS;
use peft_core::storage::Format;

#[derive(Parser)]
#[command(
    name = "peft",
    version,
    about = "Parameter-efficient fine-tuning: train, inspect, merge, quantize, combine, convert and run adapters"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
        /// Base weights: a .safetensors file, a sharded checkpoint folder,
        /// or a llama.cpp .gguf Llama (LoRA adapters only; OUT is then a
        /// .gguf, --dtype sets the merged matrices' type).
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
        /// as in the base). int8 and the block formats apply to the matrices they
        /// fit; each quantized tensor's max error against the f32 merge is
        /// printed.
        #[arg(long, value_parser = format_parser(false))]
        dtype: Option<Format>,
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
    /// int8 (one scale per row) or one of GGUF's block formats (ggml's
    /// reference rounding), stored as U8 with its format and shape in the
    /// header metadata; prints each tensor's max error.
    Quantize {
        /// Base weights: a .safetensors file or a sharded checkpoint folder.
        #[arg(long)]
        base: PathBuf,
        /// Output: a .safetensors file (single-file base) or a new folder (sharded base).
        #[arg(long)]
        out: PathBuf,
        /// The format.
        #[arg(long, value_parser = format_parser(true))]
        format: Format,
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
        /// Threads per matrix product.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        threads: u32,
    },
    /// Generate text (or token ids) with a KV cache: greedy by default,
    /// sampling with --temperature (transformers' order: repetition
    /// penalty, temperature, top-k, top-p, min-p). Text streams to stdout
    /// as it is produced; prefill and decode rates go to stderr.
    Generate(GenerateArgs),
    /// Talk to the model: each line read from stdin is a user turn,
    /// rendered with the model's chat template; the key/value cache is
    /// kept across turns. `/exit` or end of input ends it.
    Chat(ChatArgs),
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
        /// Fraction kept by ties, dare_linear, dare_ties and magnitude_prune:
        /// in [0, 1] (DARE's, which divides by it, in (0, 1]).
        #[arg(long, value_parser = unit_interval)]
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
    /// Convert between this project's .peft files, PEFT directories and
    /// llama.cpp LoRA .gguf files (the direction follows SRC and DST: a
    /// folder becomes a .peft file or, when DST ends in .gguf, a llama.cpp
    /// adapter; a .peft file or a .gguf adapter becomes a folder). .peft is
    /// bit-exact both ways; .gguf is exact in f32.
    Convert {
        /// A PEFT directory, a .peft file or a llama.cpp LoRA .gguf.
        src: PathBuf,
        /// The .peft file, PEFT directory or .gguf to write.
        dst: PathBuf,
        /// The base model (a Hugging Face folder or a .gguf), needed for a
        /// .gguf adapter: its head size orders the query and key rows.
        #[arg(long)]
        base: Option<PathBuf>,
        /// The element type of a .gguf adapter's tensors.
        #[arg(long, value_enum, default_value = "f32")]
        outtype: OutType,
        /// Replace DST if it exists (once the new output is complete).
        #[arg(long)]
        force: bool,
    },
}

/// A llama.cpp LoRA's tensor type (`convert_lora_to_gguf.py --outtype`).
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutType {
    F32,
    F16,
}

/// A storage format by its name (`f32`, `int8`, `q4_k`, ...:
/// [`Format::name`]); `quantized` limits it to int8 and the block formats
/// (what `peft quantize` writes). The possible values are listed in
/// `--help` and in the error for any other name.
pub(crate) fn format_parser(quantized: bool) -> impl clap::builder::TypedValueParser<Value = Format> {
    use clap::builder::TypedValueParser;
    let names: Vec<&'static str> =
        Format::ALL.into_iter().filter(|f| !quantized || f.is_quantized()).map(Format::name).collect();
    clap::builder::PossibleValuesParser::new(names)
        .map(|name| Format::ALL.into_iter().find(|f| f.name() == name).unwrap_or(Format::F32))
}

/// PEFT's `combination_type` names, written as PEFT writes them.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub(crate) enum CombinationArg {
    Linear,
    Cat,
    Svd,
    Ties,
    DareLinear,
    DareTies,
    MagnitudePrune,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum MajoritySignArg {
    Total,
    Frequency,
}

/// `DIR[:WEIGHT]`: the text after the last `:` is the weight when it parses
/// as a finite number; otherwise the whole text is the folder (weight 1).
/// What `peft forward` and `peft generate` run.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["ids", "prompt", "chat"])))]
pub(crate) struct RunArgs {
    /// A Hugging Face LlamaForCausalLM folder (config.json and
    /// model.safetensors, or a sharded checkpoint), or a llama.cpp `.gguf`
    /// file.
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// A PEFT adapter directory, or a llama.cpp LoRA .gguf.
    #[arg(long)]
    pub(crate) adapter: Option<PathBuf>,
    /// Token ids (the prompt's, for generate), comma-separated.
    #[arg(long, value_parser = token_ids)]
    pub(crate) ids: Option<TokenIds>,
    /// A text prompt, encoded with the model's tokenizer (with its special
    /// tokens, e.g. BOS). Repeat for several prompts (generate).
    #[arg(long)]
    pub(crate) prompt: Vec<String>,
    /// A user message, rendered with the model's chat template (and
    /// --system) with the assistant's header after it. Repeat for several.
    #[arg(long)]
    pub(crate) chat: Vec<String>,
    #[command(flatten)]
    pub(crate) text: TextArgs,
}

/// Where the tokenizer and chat template come from.
#[derive(clap::Args, Clone)]
pub(crate) struct TextArgs {
    /// A system message for --chat.
    #[arg(long)]
    pub(crate) system: Option<String>,
    /// The tokenizer: a folder with tokenizer.json or a .gguf (default:
    /// the model's).
    #[arg(long)]
    pub(crate) tokenizer: Option<PathBuf>,
    /// A Jinja chat template file (default: the model's).
    #[arg(long)]
    pub(crate) chat_template: Option<PathBuf>,
}

/// Sampling and stopping, as transformers' `generate` names them.
#[derive(clap::Args, Clone)]
pub(crate) struct SamplingArgs {
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 256)]
    pub(crate) max_new_tokens: usize,
    /// Sampling temperature; 0 (default) decodes greedily.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) temperature: f64,
    /// Keep the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub(crate) top_k: usize,
    /// Nucleus sampling: keep the most likely tokens up to this mass.
    #[arg(long, default_value_t = 1.0)]
    pub(crate) top_p: f64,
    /// Drop tokens below this fraction of the top probability.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) min_p: f64,
    /// CTRL's repetition penalty (1: none).
    #[arg(long, default_value_t = 1.0)]
    pub(crate) repetition_penalty: f64,
    /// The sampler's seed.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Stop when this text appears (not printed). Repeat for several.
    #[arg(long)]
    pub(crate) stop: Vec<String>,
    /// Go on past the model's end-of-sequence token.
    #[arg(long)]
    pub(crate) ignore_eos: bool,
    /// Threads per matrix product.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) threads: u32,
    /// Q8_0 and Q4_0 models: each decode step quantizes its activations to
    /// int8 per block of 32 and multiplies with integer dot products, as
    /// llama.cpp does (faster; a looser numerical contract, whose error
    /// bound `peft_faer::Faer::int8_activations` states). Without it every
    /// product is the exact f32 one over the dequantized weights.
    #[arg(long)]
    pub(crate) int8_activations: bool,
}

/// `peft generate`'s arguments.
#[derive(clap::Args)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    pub(crate) run: RunArgs,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
    /// One JSON document instead of streamed text.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `peft chat`'s arguments.
#[derive(clap::Args)]
pub(crate) struct ChatArgs {
    /// A Hugging Face LlamaForCausalLM folder or a llama.cpp `.gguf` file.
    #[arg(long)]
    pub(crate) model: PathBuf,
    /// A PEFT adapter directory, or a llama.cpp LoRA .gguf.
    #[arg(long)]
    pub(crate) adapter: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) text: TextArgs,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
}

/// Token ids given on the command line.
#[derive(Clone, Debug)]
pub(crate) struct TokenIds(pub(crate) Vec<u32>);

pub(crate) fn token_ids(text: &str) -> Result<TokenIds, String> {
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

pub(crate) fn weighted_dir(text: &str) -> Result<(PathBuf, f64), String> {
    if let Some((dir, w)) = text.rsplit_once(':')
        && let Ok(w) = w.parse::<f64>()
    {
        if !w.is_finite() {
            return Err(format!("the weight {w} of {dir} is not finite"));
        }
        return Ok((PathBuf::from(dir), w));
    }
    Ok((PathBuf::from(text), 1.0))
}

#[derive(clap::Args)]
pub(crate) struct FinetuneArgs {
    /// Which method to train (`all`: every one, in the table's order; the
    /// built-in task only). Default: `all` for the built-in task, `lora`
    /// with --data.
    #[arg(long, value_parser = method_names())]
    pub(crate) method: Option<String>,
    /// Optimizer steps per method (default: 2000 batches of 8 sequences
    /// for the built-in task; with --data, --epochs over the data).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) steps: Option<u64>,
    #[command(flatten)]
    pub(crate) data: DataArgs,
    /// Rank of LoRA, DoRA, LoHa and LoKr (alpha = 2 r); VeRA's shared
    /// projections get 8 times it, as VeRA trains only `r + out` numbers per
    /// layer.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) rank: u64,
    /// Seed of the frozen model, the task and the adapters.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Threads per matrix product (faer over rayon); 1 is single-threaded.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) threads: u32,
    /// Learning rate for every method (default: each method's own, see
    /// `peft_core::optim`): positive and finite.
    #[arg(long, value_parser = positive_finite)]
    pub(crate) lr: Option<f64>,
    /// Folder for the model (`model/`, unless --model) and the adapters
    /// (`<method>/`, a PEFT folder; `adapter.safetensors`).
    #[arg(long, default_value = "peft-out")]
    pub(crate) out: PathBuf,
    /// A Hugging Face LlamaForCausalLM folder or a llama.cpp .gguf file to
    /// train on, in its stored format (default: a small Llama from --seed,
    /// written to OUT/model).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// Print one JSON document instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Replace outputs that exist (`OUT/model`, `OUT/<method>`,
    /// `OUT/adapter.safetensors`); without it they are refused before
    /// training starts.
    #[arg(long)]
    pub(crate) force: bool,
}

/// Fine-tuning on the user's data (`peft finetune --data`).
#[derive(clap::Args)]
pub(crate) struct DataArgs {
    /// Training data: JSONL records `{"text"}`, `{"prompt", "completion"}`
    /// (loss on the completion) or `{"messages"}` (loss on the assistant
    /// turns), as TRL's SFTTrainer takes them; or a .txt file (paragraphs).
    /// Needs --model.
    #[arg(long, requires = "model")]
    pub(crate) data: Option<PathBuf>,
    /// Held-out data in the same forms.
    #[arg(long, requires = "data", conflicts_with = "eval_split")]
    pub(crate) eval: Option<PathBuf>,
    /// Hold out this fraction of --data (shuffled by --seed) instead.
    #[arg(long, requires = "data", value_parser = unit_interval)]
    pub(crate) eval_split: Option<f64>,
    /// A Jinja chat template for `messages` records (default: the model's).
    #[arg(long, requires = "data")]
    pub(crate) chat_template: Option<PathBuf>,
    /// Tokens per sequence at most (longer records are cut from the right).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(2..))]
    pub(crate) max_len: u64,
    /// Concatenate the records and cut the stream into --max-len sequences.
    #[arg(long)]
    pub(crate) packing: bool,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) batch_size: u64,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) grad_accum: u64,
    /// Passes over the data (when --steps is not given).
    #[arg(long, default_value_t = 1.0, value_parser = positive_finite)]
    pub(crate) epochs: f64,
    /// The learning-rate schedule.
    #[arg(long, value_enum, default_value = "constant")]
    pub(crate) lr_schedule: ScheduleArg,
    /// Warmup steps of the cosine schedule.
    #[arg(long, default_value_t = 0)]
    pub(crate) warmup: u64,
    /// Evaluate every this many steps (0: before and after training only).
    #[arg(long, default_value_t = 0)]
    pub(crate) eval_every: u64,
    /// Save a checkpoint (OUT/checkpoint-STEP) every this many steps.
    #[arg(long, default_value_t = 0)]
    pub(crate) save_every: u64,
    /// Continue from a checkpoint folder (with the same data and options).
    #[arg(long, requires = "data")]
    pub(crate) resume: Option<PathBuf>,
    /// The tokens `--method trainable_tokens` trains, comma-separated ids
    /// (default: the first 16 r of the vocabulary).
    #[arg(long, requires = "data", value_delimiter = ',')]
    pub(crate) token_indices: Vec<u32>,
}

/// `--lr-schedule`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ScheduleArg {
    Constant,
    Cosine,
}

pub(crate) fn positive_finite(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(v) => Err(format!("{v} is not positive and finite")),
        Err(e) => Err(e.to_string()),
    }
}

/// A number in `[0, 1]`.
pub(crate) fn unit_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        Ok(v) => Err(format!("{v} is not in [0, 1]")),
        Err(e) => Err(e.to_string()),
    }
}

/// `--method`'s values: every name in the list of methods, and `all`.
fn method_names() -> PossibleValuesParser {
    PossibleValuesParser::new(METHODS.iter().map(|m| m.name).chain(["all"]))
}
