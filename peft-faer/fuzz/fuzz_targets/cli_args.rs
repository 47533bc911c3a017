//! The `peft` command line (the binary's own clap definitions, included
//! from `src/bin/peft/cli.rs`) on arbitrary arguments: the input split at
//! NUL bytes, each piece one argument (any bytes, not only UTF-8). Parsing
//! must return, never panic, and what it accepts must hold the ranges the
//! arguments promise: a prompt present (ids, text or chat), multipliers
//! and weights finite, thread, step, rank and batch counts at least 1, a
//! learning rate positive and finite, a density and an eval split in
//! [0, 1], a method that exists, data options only with --data.
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use clap::Parser;
use libfuzzer_sys::fuzz_target;

#[allow(dead_code, unreachable_pub)]
#[path = "../../src/bin/peft/cli.rs"]
mod cli;

use cli::{Cli, Command};

fuzz_target!(|data: &[u8]| {
    let args =
        std::iter::once(OsString::from("peft")).chain(data.split(|&b| b == 0).map(|a| OsString::from_vec(a.to_vec())));
    let Ok(cli) = Cli::try_parse_from(args) else { return };
    match cli.command {
        Command::Merge { adapters, threads, .. } => {
            assert!(adapters.iter().all(|(_, w)| w.is_finite()) && threads >= 1);
        }
        Command::Combine { adapters, svd_rank, density, .. } => {
            assert!(adapters.iter().all(|(_, w)| w.is_finite()) && svd_rank.is_none_or(|r| r >= 1));
            assert!(density.is_none_or(|d| (0.0..=1.0).contains(&d)));
        }
        Command::Forward { run, .. } | Command::Generate(cli::GenerateArgs { run, .. }) => {
            let n = run.ids.as_ref().map_or(0, |i| i.0.len()) + run.prompt.len() + run.chat.len();
            assert!(n >= 1, "no prompt accepted");
            assert!(run.ids.as_ref().is_none_or(|i| !i.0.is_empty()));
        }
        Command::Chat(c) => assert!(c.sampling.threads >= 1),
        Command::Finetune(a) => {
            assert!(a.steps.is_none_or(|s| s >= 1) && a.rank >= 1 && a.threads >= 1);
            assert!(a.lr.is_none_or(|lr| lr.is_finite() && lr > 0.0));
            let m = a.method.as_deref().unwrap_or("all");
            assert!(m == "all" || peft_core::method::METHODS.iter().any(|x| x.name == m));
            let d = &a.data;
            assert!(d.batch_size >= 1 && d.grad_accum >= 1 && d.max_len >= 2 && d.epochs > 0.0);
            assert!(d.eval_split.is_none_or(|f| (0.0..=1.0).contains(&f)));
            assert!(d.data.is_some() || (d.eval.is_none() && d.eval_split.is_none() && d.resume.is_none()));
        }
        Command::Inspect { .. } | Command::Quantize { .. } | Command::Convert { .. } => {}
    }
});
