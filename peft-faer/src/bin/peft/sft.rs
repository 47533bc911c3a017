//! `peft finetune --model M --data FILE`: fine-tuning on the user's data
//! (the library's `text::data` and `text::sft`), with a progress bar,
//! evaluation, checkpoints and a PEFT folder at the end.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use peft_core::method::{MethodSpec, find};
use peft_core::optim::AdamW;
use peft_faer::Faer;
use peft_faer::llama::Llama;
use peft_faer::llama::finetune::trainable;
use peft_faer::llama::train::{MethodSetup, Trainable, Trainer, init_adapter};
use peft_faer::text::data::{Dataset, Encoder, Example, Shaping, shape};
use peft_faer::text::sft::{Event, Schedule, SftOptions, eval_loss, load_checkpoint, save_checkpoint, train};
use peft_faer::text::{ChatTemplate, Tokenizer};
use serde_json::json;

use crate::cli::{FinetuneArgs, ScheduleArg};

/// The training and held-out sequences, the tokenizer's source, and how
/// many records truncation left with nothing to learn.
struct Data {
    train: Vec<Example>,
    eval: Option<Vec<Example>>,
    dropped: usize,
}

fn load_data(args: &FinetuneArgs, model: &Path) -> Result<Data, Box<dyn std::error::Error>> {
    let d = &args.data;
    let tok = Tokenizer::open(model)?;
    let tpl = match &d.chat_template {
        Some(p) => Some(ChatTemplate::from_file(p, &tok)?),
        None => ChatTemplate::of(&tok).ok(),
    };
    let enc = Encoder::new(&tok, tpl.as_ref());
    let file = d.data.as_deref().ok_or("--data is required here")?;
    let train = Dataset::load(file, &enc)?;
    let (train, eval) = match (&d.eval, d.eval_split) {
        (Some(e), _) => (train, Some(Dataset::load(e, &enc)?)),
        (None, Some(f)) if f > 0.0 => {
            let (t, e) = train.split(f, args.seed)?;
            (t, Some(e))
        }
        _ => (train, None),
    };
    let shaping = Shaping { max_len: d.max_len as usize, packing: d.packing };
    let (train_seqs, dropped) = shape(train.examples, shaping);
    if train_seqs.is_empty() {
        return Err(
            format!("{}: no record has a token to learn after truncation to {}", file.display(), d.max_len).into()
        );
    }
    let eval = eval.map(|e| shape(e.examples, Shaping { packing: false, ..shaping }).0);
    Ok(Data { train: train_seqs, eval, dropped })
}

fn sft_options(args: &FinetuneArgs, n: usize) -> SftOptions {
    let d = &args.data;
    let mut o = SftOptions {
        lr: 0.0,
        schedule: match d.lr_schedule {
            ScheduleArg::Constant => Schedule::Constant,
            ScheduleArg::Cosine => Schedule::Cosine { warmup: d.warmup as usize },
        },
        batch_size: d.batch_size as usize,
        grad_accum: d.grad_accum as usize,
        steps: 0,
        eval_every: d.eval_every as usize,
        save_every: d.save_every as usize,
        seed: args.seed,
    };
    o.steps = match args.steps {
        Some(s) => s as usize,
        None => o.steps_for_epochs(d.epochs, n),
    };
    o
}

/// The final adapter's path: a PEFT folder, or this crate's file for the
/// bottleneck adapters.
fn adapter_out(out: &Path, method: &MethodSpec) -> PathBuf {
    match method.peft_type {
        Some(_) => out.join("adapter"),
        None => out.join("adapter.safetensors"),
    }
}

/// Every output the run will write, refused before training when it
/// exists (without --force).
fn check_outputs(args: &FinetuneArgs, method: &MethodSpec, o: &SftOptions, start: usize) -> Result<(), String> {
    if args.force {
        return Ok(());
    }
    let mut paths = vec![adapter_out(&args.out, method)];
    if o.save_every > 0 {
        let steps = (start + 1..o.steps).filter(|s| s % o.save_every == 0);
        paths.extend(steps.map(|s| args.out.join(format!("checkpoint-{s}"))));
    }
    match paths.into_iter().find(|p| p.symlink_metadata().is_ok()) {
        Some(p) => Err(format!("{} exists (pass --force to replace it)", p.display())),
        None => Ok(()),
    }
}

/// A bar with tokens/s and ETA on a terminal; a line every tenth of the
/// run otherwise; nothing with --json.
struct Bar {
    bar: Option<ProgressBar>,
    steps: usize,
    quiet: bool,
}

impl Bar {
    fn new(steps: usize, start: usize, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(steps as u64);
            if let Ok(style) = ProgressStyle::with_template("[{bar:30}] {pos}/{len} {msg} ETA {eta}") {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_position(start as u64);
            b
        });
        Self { bar, steps, quiet }
    }

    fn event(&self, e: &Event, history: &mut Vec<serde_json::Value>) {
        let line = match e {
            Event::Step { step, loss, lr, tokens, seconds } => {
                let rate = *tokens as f64 / seconds.max(1e-9);
                if let Some(b) = &self.bar {
                    b.set_position(*step as u64);
                    b.set_message(format!("loss {loss:.4} lr {lr:.1e} {rate:.0} tok/s"));
                }
                history.push(json!({"step": step, "loss": loss, "lr": lr}));
                let every = (self.steps / 10).max(1);
                (step % every == 0 || *step == self.steps)
                    .then(|| format!("step {step}/{}  loss {loss:.4}  lr {lr:.2e}  {rate:.0} tokens/s", self.steps))
            }
            Event::Eval { step, loss } => {
                history.push(json!({"step": step, "eval_loss": loss, "eval_perplexity": loss.exp()}));
                Some(format!("step {step}: eval loss {loss:.4}, perplexity {:.3}", loss.exp()))
            }
            Event::Saved { step, path } => Some(format!("step {step}: checkpoint {}", path.display())),
        };
        if let (Some(l), false) = (line, self.quiet) {
            match &self.bar {
                Some(b) => b.println(l),
                None => eprintln!("{l}"),
            }
        }
    }
}

pub(crate) fn sft_cmd(args: &FinetuneArgs) -> Result<bool, Box<dyn std::error::Error>> {
    let model_path = args.model.as_deref().ok_or("--data needs --model")?;
    let name = args.method.as_deref().unwrap_or("lora");
    if name == "all" {
        return Err("--method all trains the built-in task; with --data, name one method".into());
    }
    let method = find(name).ok_or_else(|| format!("--method {name}: no such method"))?;
    let data = load_data(args, model_path)?;
    let mut o = sft_options(args, data.train.len());
    o.lr = args.lr.unwrap_or(method.default_lr());
    let model = Llama::open(model_path)?;
    let backend = Faer::with_threads(args.threads as usize);
    let mut trainer = Trainer::with_optimizer(AdamW::new(o.lr).with_weight_decay(0.0).with_max_grad_norm(Some(1.0)));
    let (mut adapter, start) = match &args.data.resume {
        Some(dir) => {
            let (a, state) = load_checkpoint(dir, method, &o, &mut trainer)?;
            (a, state.step)
        }
        None if !args.data.token_indices.is_empty() => {
            if name != "trainable_tokens" {
                return Err(format!("--token-indices: only with --method trainable_tokens, not {name}").into());
            }
            let setup = MethodSetup::TrainableTokens { tokens: args.data.token_indices.clone() };
            (Trainable::Peft(Box::new(init_adapter(&model, &setup, args.seed ^ 0xada)?)), 0)
        }
        None => {
            let unknown = || format!("--method {name} has no trainer");
            (trainable(&model, method, args.rank as usize, args.seed ^ 0xada)?.ok_or_else(unknown)?, 0)
        }
    };
    check_outputs(args, method, &o, start)?;
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let eval = data.eval.as_deref();
    let base = eval.map(|e| eval_loss(&backend, &model, None, e)).transpose()?;
    let before = eval.map(|e| eval_loss(&backend, &model, Some(&adapter), e)).transpose()?;
    if !args.json {
        let tokens: usize = data.train.iter().map(|e| e.ids.len()).sum();
        eprintln!(
            "{name} on {}: {} sequences ({tokens} tokens; {} dropped with nothing to learn), {} per step, steps {start}..{}, lr {:.1e}",
            model_path.display(),
            data.train.len(),
            data.dropped,
            o.per_step(),
            o.steps,
            o.lr
        );
        if let (Some(b), Some(a)) = (base, before) {
            eprintln!("eval loss: base model {b:.4} (perplexity {:.3}); with the new adapter {a:.4}", b.exp());
        }
    }
    let frozen = model.clone();
    let bar = Bar::new(o.steps, start, args.json);
    let mut history = Vec::new();
    let clock = std::time::Instant::now();
    let mut save = |step: usize, a: &Trainable, t: &Trainer| {
        let dir = args.out.join(format!("checkpoint-{step}"));
        save_checkpoint(&dir, method, &o, step, a, t, args.force)?;
        Ok(dir)
    };
    let mut on = |e: Event| bar.event(&e, &mut history);
    train(&backend, &model, &data.train, eval, &mut adapter, &mut trainer, &o, start, &mut save, &mut on)?;
    let seconds = clock.elapsed().as_secs_f64();
    if let Some(b) = &bar.bar {
        b.finish_and_clear();
    }
    let after = eval.map(|e| eval_loss(&backend, &model, Some(&adapter), e)).transpose()?;
    let out = adapter_out(&args.out, method);
    match &adapter {
        Trainable::Peft(ad) => ad.write_dir(&out, args.force)?,
        Trainable::Bottleneck(b) => b.save(&out, args.force)?,
    }
    let tokens = (start..o.steps).count() * o.per_step();
    let report = json!({
        "method": name, "model": model_path, "adapter": out, "steps": o.steps, "resumed_at": start,
        "sequences_per_step": o.per_step(), "seconds": seconds, "sequences_trained": tokens,
        "eval_loss_base": base, "eval_loss_before": before, "eval_loss_after": after,
        "eval_perplexity_base": base.map(f64::exp), "eval_perplexity_after": after.map(f64::exp),
        "base_bit_identical": model.bit_identical(&frozen), "history": history,
    });
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        outln!("trained {} steps in {seconds:.1} s; adapter written to {}", o.steps - start, out.display());
        if let (Some(b), Some(a)) = (base, after) {
            outln!("eval loss {b:.4} -> {a:.4}, perplexity {:.3} -> {:.3}", b.exp(), a.exp());
        }
    }
    Ok(model.bit_identical(&frozen))
}
