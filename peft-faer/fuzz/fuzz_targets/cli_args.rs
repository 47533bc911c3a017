//! The `peft` command line (the binary's own clap definitions, included
//! from `src/bin/peft/cli.rs`) on arbitrary arguments: the input split at
//! NUL bytes, each piece one argument (any bytes, not only UTF-8). Parsing
//! must return, never panic, and what it accepts must hold the ranges the
//! arguments promise: token ids present, multipliers and weights finite,
//! thread, step and rank counts at least 1, a learning rate positive and
//! finite, a density in [0, 1], a method that exists.
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
        Command::Forward { run, .. } | Command::Generate { run, .. } => assert!(!run.ids.0.is_empty()),
        Command::Finetune(a) => {
            assert!(a.steps >= 1 && a.rank >= 1 && a.threads >= 1);
            assert!(a.lr.is_none_or(|lr| lr.is_finite() && lr > 0.0));
            assert!(a.method == "all" || peft_core::method::METHODS.iter().any(|m| m.name == a.method));
        }
        Command::Inspect { .. } | Command::Quantize { .. } | Command::Convert { .. } => {}
    }
});
