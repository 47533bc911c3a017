//! The `peft` command: one file per command, each a few calls into the
//! library (`cli.rs` holds the arguments).

use std::process::ExitCode;

use clap::Parser;

/// `println!` that returns write errors instead of panicking on them: a
/// closed pipe (`peft inspect DIR | head`) ends the command quietly (see
/// `main`).
macro_rules! outln {
    ($($arg:tt)*) => {
        std::io::Write::write_fmt(&mut std::io::stdout().lock(), format_args!("{}\n", format_args!($($arg)*)))?
    };
}

mod cli;
mod combine;
mod convert;
mod finetune;
mod inspect;
mod merge;
mod run;
mod sft;
mod text;

use cli::{Cli, Command};
use combine::{CombineArgs, combine_cmd};
use convert::convert_cmd;
use finetune::finetune;
use inspect::inspect;
use merge::{MergeArgs, merge_cmd, quantize_cmd};
use run::forward_cmd;
use text::{chat_cmd, generate_cmd};

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
        Command::Convert { src, dst, base, outtype, force } => convert_cmd(src, dst, base.as_deref(), *outtype, *force),
        Command::Quantize { base, out, format, force } => quantize_cmd(base, out, *format, *force),
        Command::Forward { run, out, top, json, force, threads } => {
            forward_cmd(run, out.as_deref(), *top, *json, *force, *threads)
        }
        Command::Generate(args) => generate_cmd(args),
        Command::Chat(args) => chat_cmd(args),
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
