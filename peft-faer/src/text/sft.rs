//! Supervised fine-tuning on tokenized [`Example`]s, as transformers'
//! `Trainer` runs TRL's `SFTTrainer`: next-token cross-entropy over the
//! masked targets, summed over every sequence of an optimizer step and
//! divided by the step's number of targets (transformers'
//! `num_items_in_batch`, so gradient accumulation gives the same step as
//! one large batch); AdamW over the adapter's tensors with a constant or
//! warmup-plus-cosine learning rate; evaluation loss and perplexity;
//! checkpoints that resume.
//!
//! # Order of the data
//! Epoch `e` visits the sequences in a shuffle by `seed + e`; step `s`
//! takes the `batch_size * grad_accum` sequences after the first `s`
//! steps' in that endless order, so a run resumed at step `s` sees what
//! the uninterrupted run would have.

use std::path::{Path, PathBuf};
use std::time::Instant;

use peft_core::Backend;
use peft_core::method::MethodSpec;
use safetensors::Dtype;
use serde_json::json;

use super::TextError;
use super::data::{Example, shuffle};
use crate::hf::{HfAdapter, HfError};
use crate::llama::train::{Trainable, Trainer};
use crate::llama::{Bottleneck, Llama, LlamaAdapter, LlamaGrads, Trace};

/// The learning-rate schedule (transformers' `lr_scheduler_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schedule {
    /// The base rate at every step.
    Constant,
    /// `get_cosine_schedule_with_warmup`: `lr * s / w` for `s < w`, then
    /// `lr * (1 + cos(pi (s - w) / (total - w))) / 2`.
    Cosine {
        /// Warmup steps `w`.
        warmup: usize,
    },
}

impl Schedule {
    /// The rate of step `step` (0-based) of `total`.
    pub fn lr(&self, base: f64, step: usize, total: usize) -> f64 {
        match *self {
            Schedule::Constant => base,
            Schedule::Cosine { warmup } if step < warmup => base * step as f64 / warmup as f64,
            Schedule::Cosine { warmup } => {
                let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
                base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

/// `sum over targets of -log softmax(logits[skip + j])[ids[j + 1]]`
/// divided by `denom`, over the positions `j` whose next token is a target
/// (`mask[j + 1] == 1`); with `grad` (`[rows, vocab]`), `dL/dlogits`
/// there (zero elsewhere). Sums in f64.
pub fn masked_loss(
    logits: &[f32],
    vocab: usize,
    skip: usize,
    ex: &Example,
    denom: f64,
    mut grad: Option<&mut [f32]>,
) -> f64 {
    if let Some(g) = grad.as_deref_mut() {
        g.fill(0.0);
    }
    let (mut total, mut scratch) = (0.0f64, Vec::new());
    for (j, (&next, &m)) in ex.ids.iter().zip(&ex.mask).enumerate().skip(1) {
        if m == 0 {
            continue;
        }
        let row = skip + j - 1;
        let Some(z) = logits.get(row * vocab..(row + 1) * vocab) else { continue };
        let g = grad.as_deref_mut().and_then(|g| g.get_mut(row * vocab..(row + 1) * vocab));
        total += crate::llama::row_cross_entropy(z, next as usize, denom, g, &mut scratch);
    }
    total / denom
}

/// The loss of one optimizer step over `batch` and the adapter's
/// gradients (see the module docs for the normalization). The sequences
/// run `micro` at a time as one batched pass each
/// ([`Llama::forward_traced_batch`]: one product per projection for all
/// their rows); prompt tuning, whose virtual rows belong to one sequence,
/// runs them one at a time.
///
/// # Errors
/// The forward and backward passes' errors; [`HfError::Config`]
/// (`batch`) when it has no targets.
pub fn step_grads<B: Backend<f32> + ?Sized>(
    backend: &B,
    model: &Llama,
    hosted: &LlamaAdapter<'_>,
    batch: &[&Example],
    micro: usize,
) -> Result<(f64, LlamaGrads), HfError> {
    let denom = batch.iter().map(|e| e.targets()).sum::<usize>();
    if denom == 0 {
        return Err(HfError::Config { field: "batch".into(), reason: "no tokens to learn".into() });
    }
    let vocab = model.config.vocab_size;
    let mut grads = LlamaGrads::zeros(hosted);
    let mut trace = Trace::default();
    let mut loss = 0.0;
    // Prompt tuning's virtual rows belong to one sequence: a pass each.
    let size = if matches!(hosted, LlamaAdapter::Prompt { .. }) { 1 } else { micro.max(1) };
    for chunk in batch.chunks(size) {
        let seqs: Vec<&[u32]> = chunk.iter().map(|e| &e.ids[..]).collect();
        let logits = model.forward_traced_batch(backend, &seqs, Some(hosted), &mut trace)?;
        let skip = trace.virtual_rows();
        let mut dl = vec![0.0f32; logits.len()];
        let mut row = 0;
        for ex in chunk {
            let rows = skip + ex.ids.len();
            let (z, g) = (logits.get(row * vocab..(row + rows) * vocab), dl.get_mut(row * vocab..(row + rows) * vocab));
            let (Some(z), Some(g)) = (z, g) else { break };
            loss += masked_loss(z, vocab, skip, ex, denom as f64, Some(g));
            row += rows;
        }
        model.backward(backend, Some(hosted), &trace, &dl, Some(&mut grads))?;
    }
    Ok((loss, grads))
}

/// The mean loss per target token of `examples` (perplexity is its
/// exponential).
///
/// # Errors
/// The forward's errors.
pub fn eval_loss<B: Backend<f32> + ?Sized>(
    backend: &B,
    model: &Llama,
    adapter: Option<&Trainable>,
    examples: &[Example],
) -> Result<f64, HfError> {
    let hosted = adapter.map(|a| a.hosted(model)).transpose()?;
    let vocab = model.config.vocab_size;
    let (mut total, mut count) = (0.0, 0usize);
    for ex in examples {
        let logits = model.forward(backend, &ex.ids, hosted.as_ref(), &mut crate::llama::KvCache::new())?;
        let skip = logits.len() / vocab.max(1) - ex.ids.len();
        total += masked_loss(&logits, vocab, skip, ex, 1.0, None);
        count += ex.targets();
    }
    Ok(total / count.max(1) as f64)
}

/// How to train.
#[derive(Clone, Debug)]
pub struct SftOptions {
    /// The base learning rate.
    pub lr: f64,
    /// Its schedule.
    pub schedule: Schedule,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Optimizer steps in all (the run's length).
    pub steps: usize,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Save a checkpoint every this many steps (0: never).
    pub save_every: usize,
    /// Seed of the data order.
    pub seed: u64,
}

impl SftOptions {
    /// Sequences per optimizer step.
    pub fn per_step(&self) -> usize {
        self.batch_size.max(1) * self.grad_accum.max(1)
    }

    /// Steps for `epochs` passes over `n` sequences.
    pub fn steps_for_epochs(&self, epochs: f64, n: usize) -> usize {
        ((epochs * n as f64) / self.per_step() as f64).ceil().max(1.0) as usize
    }
}

/// What the loop reports.
#[derive(Clone, Debug)]
pub enum Event {
    /// An optimizer step finished.
    Step {
        /// Steps done.
        step: usize,
        /// The step's loss.
        loss: f64,
        /// Its learning rate.
        lr: f64,
        /// Tokens run since the loop started.
        tokens: usize,
        /// Seconds since the loop started.
        seconds: f64,
    },
    /// The held-out loss after `step` steps.
    Eval {
        /// Steps done.
        step: usize,
        /// Mean loss per target token.
        loss: f64,
    },
    /// A checkpoint was written.
    Saved {
        /// Steps done.
        step: usize,
        /// Its folder.
        path: PathBuf,
    },
}

/// The sequence indices of step `step` (see the module docs).
pub fn step_indices(n: usize, per_step: usize, seed: u64, step: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(per_step);
    let mut order: Option<(usize, Vec<usize>)> = None;
    for g in step * per_step..(step + 1) * per_step {
        let (epoch, pos) = (g / n.max(1), g % n.max(1));
        if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut o: Vec<usize> = (0..n).collect();
            shuffle(&mut o, seed.wrapping_add(epoch as u64));
            order = Some((epoch, o));
        }
        out.extend(order.as_ref().and_then(|(_, o)| o.get(pos)).copied());
    }
    out
}

/// The training loop from step `start` to `options.steps`; `save(step,
/// adapter, trainer)` writes a checkpoint every `save_every` steps (and
/// returns its path), `on` receives every [`Event`].
///
/// # Errors
/// The passes', AdamW's and `save`'s errors.
#[allow(clippy::too_many_arguments)]
pub fn train<B: Backend<f32> + ?Sized>(
    backend: &B,
    model: &Llama,
    data: &[Example],
    eval: Option<&[Example]>,
    adapter: &mut Trainable,
    trainer: &mut Trainer,
    options: &SftOptions,
    start: usize,
    save: &mut dyn FnMut(usize, &Trainable, &Trainer) -> Result<PathBuf, TextError>,
    on: &mut dyn FnMut(Event),
) -> Result<(), TextError> {
    let clock = Instant::now();
    let mut tokens = 0usize;
    for step in start..options.steps {
        let idx = step_indices(data.len(), options.per_step(), options.seed, step);
        let batch: Vec<&Example> = idx.iter().filter_map(|&i| data.get(i)).collect();
        let lr = options.schedule.lr(options.lr, step, options.steps);
        trainer.opt.lr = lr;
        let (loss, grads) = {
            let hosted = adapter.hosted(model)?;
            step_grads(backend, model, &hosted, &batch, options.batch_size)?
        };
        // A warmup's first step has rate 0: AdamW refuses it, so the step
        // is counted and its moments skipped, as in transformers the update
        // is zero.
        if lr > 0.0 {
            trainer.apply(adapter, &grads, loss)?;
        }
        tokens += batch.iter().map(|e| e.ids.len()).sum::<usize>();
        let done = step + 1;
        on(Event::Step { step: done, loss, lr, tokens, seconds: clock.elapsed().as_secs_f64() });
        if let Some(ev) = eval.filter(|_| options.eval_every > 0 && done % options.eval_every == 0) {
            on(Event::Eval { step: done, loss: eval_loss(backend, model, Some(adapter), ev)? });
        }
        if options.save_every > 0 && done % options.save_every == 0 && done < options.steps {
            let path = save(done, adapter, trainer)?;
            on(Event::Saved { step: done, path });
        }
    }
    Ok(())
}

/// What a checkpoint's `trainer_state.json` records.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointState {
    /// Optimizer steps done.
    pub step: usize,
    /// The method's name.
    pub method: String,
    /// AdamW's step count.
    pub optimizer_steps: u64,
}

/// Writes a checkpoint folder atomically: `adapter/` (a PEFT folder, or
/// `adapter.safetensors` for the bottleneck adapters), `optimizer.safetensors`
/// (AdamW's moments, one F32 tensor `state.<i>` per adapter tensor) and
/// `trainer_state.json`.
///
/// # Errors
/// The writers' errors.
pub fn save_checkpoint(
    dir: &Path,
    method: &MethodSpec,
    options: &SftOptions,
    step: usize,
    adapter: &Trainable,
    trainer: &Trainer,
    force: bool,
) -> Result<(), TextError> {
    let staging = crate::files::Staging::dir(dir).map_err(HfError::from)?;
    let tmp = staging.path().to_path_buf();
    match adapter {
        Trainable::Peft(ad) => ad.write_dir(&tmp.join("adapter"), false)?,
        Trainable::Bottleneck(b) => b.save(&tmp.join("adapter.safetensors"), false)?,
    }
    let entries: Vec<crate::hf::st::OutEntry> = trainer
        .state()
        .iter()
        .enumerate()
        .map(|(i, s)| crate::hf::st::OutEntry::plain(format!("state.{i}"), Dtype::F32, vec![s.len()]))
        .collect();
    let mut bytes = crate::hf::st::header(&entries, &Default::default())?;
    for s in trainer.state() {
        crate::hf::st::from_f32(Dtype::F32, s, &mut bytes)?;
    }
    let state = json!({"step": step, "method": method.name, "optimizer_steps": trainer.opt.steps(),
        "sequences_per_step": options.per_step(), "seed": options.seed});
    for (name, data) in [("optimizer.safetensors", bytes), ("trainer_state.json", state.to_string().into_bytes())] {
        crate::files::write_synced(&tmp.join(name), &dir.join(name), &data).map_err(HfError::from)?;
    }
    staging.commit(force).map_err(HfError::from)?;
    Ok(())
}

/// Reads a checkpoint [`save_checkpoint`] wrote: the adapter, the
/// optimizer state into `trainer`, and the step. The checkpoint must have
/// been written by a run with the same method, sequences per step and
/// seed (the data order depends on them).
///
/// # Errors
/// [`TextError::Data`] naming the file and what is wrong or differs; the
/// readers' errors.
pub fn load_checkpoint(
    dir: &Path,
    method: &MethodSpec,
    options: &SftOptions,
    trainer: &mut Trainer,
) -> Result<(Trainable, CheckpointState), TextError> {
    let state_path = dir.join("trainer_state.json");
    let bad = |file: &Path, reason: String| TextError::Data { file: file.to_path_buf(), line: 0, reason };
    let v: serde_json::Value = serde_json::from_str(&super::tokenizer::read_text(&state_path, 1 << 20)?)
        .map_err(|e| bad(&state_path, format!("not JSON: {e}")))?;
    let field = |k: &str| {
        v.get(k).and_then(serde_json::Value::as_u64).ok_or_else(|| bad(&state_path, format!("no integer \"{k}\"")))
    };
    let state = CheckpointState {
        step: usize::try_from(field("step")?).map_err(|e| bad(&state_path, e.to_string()))?,
        optimizer_steps: field("optimizer_steps")?,
        method: v.get("method").and_then(serde_json::Value::as_str).unwrap_or_default().to_owned(),
    };
    let (per_step, seed) = (field("sequences_per_step")?, field("seed")?);
    let same = [
        ("method", state.method == method.name, format!("{:?}", state.method), method.name.to_owned()),
        (
            "sequences_per_step",
            per_step == options.per_step() as u64,
            per_step.to_string(),
            options.per_step().to_string(),
        ),
        ("seed", seed == options.seed, seed.to_string(), options.seed.to_string()),
    ];
    if let Some((k, _, was, now)) = same.into_iter().find(|(_, ok, _, _)| !ok) {
        return Err(bad(
            &state_path,
            format!("{k} was {was}, this run has {now}: resume with the options the checkpoint was trained with"),
        ));
    }
    let adapter = if dir.join("adapter").is_dir() {
        Trainable::Peft(Box::new(HfAdapter::read_dir(&dir.join("adapter"))?))
    } else {
        Trainable::Bottleneck(Bottleneck::load(&dir.join("adapter.safetensors"))?)
    };
    let opt_path = dir.join("optimizer.safetensors");
    let bytes = crate::files::read_bounded(&opt_path, 1 << 34).map_err(HfError::from)?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(&opt_path, e.to_string()))?;
    let mut moments = Vec::with_capacity(st.len());
    for i in 0..st.len() {
        let t = st.tensor(&format!("state.{i}")).map_err(|e| bad(&opt_path, format!("state.{i}: {e}")))?;
        if t.dtype() != Dtype::F32 {
            return Err(bad(&opt_path, format!("state.{i} is {:?}, not F32", t.dtype())));
        }
        let mut m = vec![0.0f32; t.data().len() / 4];
        crate::hf::st::to_f32(Dtype::F32, t.data(), &mut m)?;
        moments.push(m);
    }
    trainer.restore(moments, state.optimizer_steps);
    Ok((adapter, state))
}
