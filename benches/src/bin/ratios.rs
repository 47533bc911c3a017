//! Prints each speed target of `benches/benches/peft.rs` as a ratio on one
//! line, from the estimates criterion left in `target/criterion` (or the
//! directory given as the first argument):
//!
//! ```text
//! lora_forward_unmerged/base_gemm [t128_4096_r16 1t] 1.012  (target <= 1.05: ok)
//! ```
//!
//! Times are criterion's mean estimates; a ratio of times compares the two
//! benches of one group, measured back to back in the same run. Run
//! `benches/report` to bench briefly and print this.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `(group prefix, numerator, denominator, bound)`: the ratio of mean times
/// `numerator / denominator`, and its target (`Le(x)`: at most `x`).
const RATIOS: [(&str, &str, &str, Bound); 10] = [
    ("lora_forward_unmerged", "lora_forward_unmerged", "base_gemm", Bound::Le(1.05)),
    ("lora_forward_merged", "lora_forward_merged", "base_gemm", Bound::Le(1.02)),
    ("lora_backward", "lora_backward", "base_gemm", Bound::Le(1.10)),
    ("lora_backward", "lora_backward", "full_backward", Bound::Le(0.60)),
    ("merge", "merge", "copy_w", Bound::Le(2.0)),
    ("reference", "reference_base_gemm", "base_gemm", Bound::None),
    ("reference", "reference_lora_forward_unmerged", "base_gemm", Bound::None),
    // Throughput share = faer time / reference time.
    ("ref_vs_faer", "base_gemm", "reference_base_gemm", Bound::Ge(0.15)),
    ("vzeroupper", "adapter_forward_without_vzeroupper", "adapter_forward", Bound::None),
    ("gemm_rate", "base_gemm", "base_gemm", Bound::None),
];

#[derive(Clone, Copy)]
enum Bound {
    Le(f64),
    Ge(f64),
    None,
}

/// Mean time in ns and FLOPs (if the bench declared element throughput).
struct Estimate {
    mean_ns: f64,
    flops: Option<f64>,
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn estimate(bench_dir: &Path) -> Option<Estimate> {
    let est = read_json(&bench_dir.join("new/estimates.json"))?;
    let mean_ns = est["mean"]["point_estimate"].as_f64()?;
    let meta = read_json(&bench_dir.join("new/benchmark.json"));
    let flops = meta.and_then(|m| m["throughput"]["Elements"].as_f64());
    Some(Estimate { mean_ns, flops })
}

/// `group -> bench -> estimate` for every bench criterion has recorded.
fn collect(root: &Path) -> BTreeMap<String, BTreeMap<String, Estimate>> {
    let mut out = BTreeMap::new();
    let Ok(groups) = std::fs::read_dir(root) else { return out };
    for g in groups.flatten() {
        let Ok(benches) = std::fs::read_dir(g.path()) else { continue };
        let group = g.file_name().to_string_lossy().into_owned();
        for b in benches.flatten() {
            if let Some(e) = estimate(&b.path()) {
                out.entry(group.clone())
                    .or_insert_with(BTreeMap::new)
                    .insert(b.file_name().to_string_lossy().into_owned(), e);
            }
        }
    }
    out
}

fn main() -> ExitCode {
    let root = std::env::args_os().nth(1).map(PathBuf::from).unwrap_or_else(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
        target.join("criterion")
    });
    let all = collect(&root);
    if all.is_empty() {
        eprintln!("no criterion estimates under {}: run `cargo bench -p peft-benches` first", root.display());
        return ExitCode::FAILURE;
    }
    let mut missed = 0;
    for (prefix, num, den, bound) in RATIOS {
        for (group, benches) in all.iter().filter(|(g, _)| g.split('.').next() == Some(prefix)) {
            let (Some(n), Some(d)) = (benches.get(num), benches.get(den)) else { continue };
            let tag = group.split('.').skip(1).collect::<Vec<_>>().join(" ");
            if num == den {
                let gflops = n.flops.map_or(f64::NAN, |f| f / n.mean_ns);
                println!("{num} [{tag}] {gflops:.1} GFLOP/s");
                continue;
            }
            let ratio = n.mean_ns / d.mean_ns;
            let verdict = match bound {
                Bound::Le(x) if ratio <= x => format!("  (target <= {x}: ok)"),
                Bound::Le(x) => {
                    missed += 1;
                    format!("  (target <= {x}: MISSED)")
                }
                Bound::Ge(x) if ratio >= x => format!("  (target >= {x}: ok)"),
                Bound::Ge(x) => {
                    missed += 1;
                    format!("  (target >= {x}: MISSED)")
                }
                Bound::None => String::new(),
            };
            println!("{num}/{den} [{tag}] {ratio:.3}{verdict}");
        }
    }
    if missed > 0 {
        println!("{missed} target(s) missed");
    }
    ExitCode::SUCCESS
}
