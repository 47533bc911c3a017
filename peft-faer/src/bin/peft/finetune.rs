//! `peft finetune`: the task and the training live in
//! `peft_faer::llama::finetune`; this file parses nothing (see `cli.rs`),
//! shows progress and prints the table or the JSON document.

use std::io::IsTerminal;
use std::path::Path;

use indicatif::{ProgressBar, ProgressStyle};
use peft_core::method::{MethodSpec, find};
use peft_faer::Faer;
use peft_faer::llama::finetune::{
    BATCH, CONTEXT, FinetuneReport, HELD_OUT, MethodRun, Options, SEQ, TRAIN, all_methods, setup, train_all,
};
use serde_json::json;

use crate::cli::FinetuneArgs;

/// The library's options from the command line.
fn options(args: &FinetuneArgs) -> Result<Options, String> {
    let methods = match args.method.as_deref().unwrap_or("all") {
        "all" => all_methods(),
        name => vec![find(name).ok_or_else(|| format!("--method {name}: no such method"))?],
    };
    Ok(Options {
        methods,
        steps: args.steps.unwrap_or(2000) as usize,
        rank: args.rank as usize,
        seed: args.seed,
        threads: args.threads as usize,
        lr: args.lr,
        out: args.out.clone(),
        model: args.model.clone(),
        force: args.force,
    })
}

/// A progress bar per method on a terminal, a line every fifth of the run
/// otherwise, nothing with `--json`.
struct Progress {
    steps: usize,
    json: bool,
    bar: Option<(&'static str, ProgressBar)>,
}

impl Progress {
    fn step(&mut self, method: &MethodSpec, step: usize, loss: f64) {
        let name = method.name;
        if self.json {
            return;
        }
        if !std::io::stderr().is_terminal() {
            if (step + 1).is_multiple_of((self.steps / 5).max(1)) {
                eprintln!("{name:>8} step {:>5}/{}  train loss {loss:.5}", step + 1, self.steps);
            }
            return;
        }
        if self.bar.as_ref().is_none_or(|(n, _)| *n != name) {
            if let Some((_, b)) = self.bar.take() {
                b.finish_and_clear();
            }
            let b = ProgressBar::new(self.steps as u64);
            if let Ok(style) = ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg}") {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_prefix(name);
            self.bar = Some((name, b));
        }
        if let Some((_, b)) = &self.bar {
            b.set_position(step as u64 + 1);
            b.set_message(format!("train loss {loss:.4}"));
            if step + 1 == self.steps {
                b.finish_and_clear();
            }
        }
    }
}

pub(crate) fn finetune(args: &FinetuneArgs) -> Result<bool, Box<dyn std::error::Error>> {
    if args.data.data.is_some() {
        return crate::sft::sft_cmd(args);
    }
    let options = options(args)?;
    let backend = Faer::with_threads(options.threads);
    let (model, model_dir, task) = setup(&options, &backend)?;
    let c = &model.config;
    if !args.json {
        eprintln!(
            "llama: hidden={} layers={} heads={} kv_heads={} vocab={}, {} frozen parameters ({}); task: match the model's next-token distributions when it reads a hidden {CONTEXT}-token context first ({TRAIN} train, {HELD_OUT} held-out sequences of {SEQ} tokens)",
            c.hidden_size,
            c.num_layers,
            c.num_heads,
            c.num_kv_heads,
            c.vocab_size,
            model.num_params(),
            model_dir.display()
        );
    }
    let mut progress = Progress { steps: options.steps, json: args.json, bar: None };
    let report = train_all(&model, &model_dir, &task, &options, &backend, &mut |m, s, l| progress.step(m, s, l))?;
    if args.json {
        print_json(&report, args)?;
    } else {
        outln!("frozen model alone (no adapter): held-out loss {:.4e}", report.base_loss);
        print_table(&report.runs, 2 * 4 * report.frozen_params, report.base_identical, &args.out)?;
    }
    // A failed check is an error exit; a method still above the frozen
    // model (too few steps) is reported, not an error.
    Ok(report.ok())
}

/// The report as one JSON document.
fn print_json(report: &FinetuneReport, args: &FinetuneArgs) -> Result<(), Box<dyn std::error::Error>> {
    let (c, full_state) = (&report.config, 2 * 4 * report.frozen_params);
    let methods: Vec<_> = report
        .runs
        .iter()
        .map(|r| {
            json!({
                "method": r.method.name,
                "trainable_params": r.params,
                "percent_of_base": 100.0 * r.params as f64 / r.base_params as f64,
                "optimizer_state_bytes": r.state_bytes,
                "full_finetune_optimizer_state_bytes": full_state,
                "lr": r.lr,
                "initial_held_out_loss": r.initial,
                "final_held_out_loss": r.final_loss,
                "beats_frozen_model": r.final_loss < report.base_loss,
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
                   "kv_heads": c.num_kv_heads, "vocab": c.vocab_size, "frozen_params": report.frozen_params,
                   "path": report.model_dir.display().to_string() },
        "task": { "hidden_context_tokens": CONTEXT, "sequence_tokens": SEQ, "train_sequences": TRAIN,
                  "held_out_sequences": HELD_OUT, "loss": "mean KL(teacher || student) per token" },
        "steps": options(args)?.steps, "batch": BATCH, "rank": args.rank, "seed": args.seed, "threads": args.threads,
        "frozen_model_held_out_loss": report.base_loss,
        "methods": methods,
        "frozen_base_bit_identical": report.base_identical,
    });
    outln!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

fn print_table(rows: &[MethodRun], full_state: usize, base_identical: bool, out: &Path) -> std::io::Result<()> {
    // The method column as wide as the longest name run.
    let w = rows.iter().map(|r| r.method.name.len()).max().unwrap_or(0).max(8);
    outln!(
        "{:<w$} {:>9} {:>7} {:>21} {:>7} {:>10} {:>10} {:>7} {:>11} {:>9} {:>7}",
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
            "{:<w$} {:>9} {:>6.2}% {:>21} {:>7.0e} {:>10.4e} {:>10.4e} {:>7.1} {:>11} {:>9} {:>7}",
            r.method.name,
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
