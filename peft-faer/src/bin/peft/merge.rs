//! `peft merge` and `peft quantize` (a merge without adapters).

use std::path::{Path, PathBuf};
use std::time::Instant;

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use peft_core::storage::Format;
use peft_faer::Faer;
use peft_faer::files::{check_output, write_file};
use peft_faer::hf::base::Base;
use peft_faer::hf::merge::{MergeOptions, MergeReport, merge_many};
use peft_faer::hf::{HfAdapter, HfError};

pub(crate) struct MergeArgs<'a> {
    pub(crate) base: &'a Path,
    pub(crate) adapters: &'a [(PathBuf, f64)],
    pub(crate) out: &'a Path,
    pub(crate) dtype: Option<Format>,
    pub(crate) threads: u32,
    pub(crate) force: bool,
    pub(crate) allow_nonfinite: bool,
}

/// `peft merge --base model.gguf`: LoRA adapters merged into a GGUF
/// Llama, written as a GGUF file (`peft_faer::gguf::merge`).
fn merge_gguf_cmd(a: &MergeArgs<'_>, ads: &[(&HfAdapter, f64)]) -> Result<bool, Box<dyn std::error::Error>> {
    let mut inputs: Vec<PathBuf> = vec![a.base.to_path_buf()];
    inputs.extend(ads.iter().flat_map(|(ad, _)| ad.source_files()));
    let refs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    check_output(a.out, &refs, a.force)?;
    let start = Instant::now();
    let dtype = a.dtype;
    let backend = Faer::with_threads(a.threads as usize);
    let (bytes, report) = peft_faer::gguf::merge::merge_gguf(a.base, ads, dtype, &backend)?;
    write_file(a.out, &bytes, a.force)?;
    eprintln!(
        "merged {} matrices, copied {} tensors: {} bytes to {} in {:.2} s",
        report.merged.len(),
        report.copied,
        report.bytes,
        a.out.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(true)
}

pub(crate) fn merge_cmd(a: &MergeArgs<'_>) -> Result<bool, Box<dyn std::error::Error>> {
    let read: Vec<(HfAdapter, f64)> =
        a.adapters.iter().map(|(dir, m)| Ok((HfAdapter::read_dir(dir)?, *m))).collect::<Result<_, HfError>>()?;
    let ads: Vec<(&HfAdapter, f64)> = read.iter().map(|(ad, m)| (ad, *m)).collect();
    if peft_faer::llama::gguf::is_gguf(a.base) {
        return merge_gguf_cmd(a, &ads);
    }
    let b = Base::open(a.base)?;
    let dtype = a.dtype;
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
pub(crate) fn print_quant_report(report: &MergeReport, against: &str) -> std::io::Result<()> {
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

pub(crate) fn quantize_cmd(
    base: &Path,
    out: &Path,
    format: Format,
    force: bool,
) -> Result<bool, Box<dyn std::error::Error>> {
    let b = Base::open(base)?;
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
