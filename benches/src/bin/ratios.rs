//! Prints every performance figure of the last bench run, one per line:
//! each speed target of `benches/benches/peft.rs` as a ratio of two
//! criterion means measured back to back in one group (from
//! `target/criterion`), and each instruction count of
//! `benches/benches/icount.rs` (from iai-callgrind's callgrind files in
//! `target/iai`):
//!
//! ```text
//! lora_forward_unmerged/base_gemm [t128_4096_r16 1t] 1.012  (target <= 1.05: ok)
//! icount lora_forward.t8_d64_r4 1203456 instructions
//! ```
//!
//! Options:
//!
//! * `--save NAME`: also store every figure as the baseline `NAME`
//!   (`target/peft-bench/NAME.json`).
//! * `--compare NAME`: print each figure with its change against baseline
//!   `NAME`, and exit 1 on a regression: an instruction count that grew by
//!   more than 1% ([`ICOUNT_LIMIT`]), or a wall-time ratio with a target
//!   that moved more than 5% ([`RATIO_LIMIT`]) in the wrong direction.
//!   `--ratio-limit PCT` changes the latter (see the README: wall time on a
//!   shared machine moves by more than 5% between identical runs).
//! * `--json`: print the figures as one JSON array of `{name, unit,
//!   value}` instead (the shape of github-action-benchmark's
//!   `customSmallerIsBetter`; GFLOP/s rates, where bigger is better, are
//!   left out of it).
//! * `--criterion DIR`, `--iai DIR`, `--baselines DIR`: where to read and
//!   store (defaults under `$CARGO_TARGET_DIR`, else `target/`).
//!
//! Run `benches/report` to bench and print this in one step.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// An instruction count that grows by more than this fraction regresses.
pub const ICOUNT_LIMIT: f64 = 0.01;
/// A wall-time ratio with a target that moves by more than this fraction in
/// the wrong direction regresses (default of `--ratio-limit`).
pub const RATIO_LIMIT: f64 = 0.05;

/// `(group prefix, numerator, denominator, bound)`: the ratio of mean times
/// `numerator / denominator`, and its target (`Le(x)`: at most `x`).
const RATIOS: [(&str, &str, &str, Bound); 47] = [
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
    // The index is one more JSON document as large as the shard's header.
    ("shard_index", "open_via_index", "open_shard", Bound::Le(2.0)),
    // DoRA scales each output element once more than LoRA.
    ("dora_forward", "dora_forward", "lora_forward", Bound::Le(1.10)),
    // Issue 29: each newer method's forward at most 1.3 times LoRA's.
    ("method_forward", "adalora_forward", "lora_forward", Bound::Le(1.3)),
    ("method_forward", "miss_forward", "lora_forward", Bound::Le(1.3)),
    ("method_forward", "hra_forward", "lora_forward", Bound::Le(1.3)),
    ("method_forward", "road_forward", "lora_forward", Bound::Le(1.3)),
    ("method_forward", "c3a_forward", "lora_forward", Bound::Le(1.3)),
    ("method_forward", "shira_forward", "lora_forward", Bound::Le(1.3)),
    ("method_forward", "oft_forward", "lora_forward", Bound::Le(1.3)),
    ("method_forward", "boft_forward", "lora_forward", Bound::Le(1.3)),
    ("method_forward", "boft_butterfly_forward", "lora_forward", Bound::Le(1.3)),
    ("method_forward", "fourierft_forward", "lora_forward", Bound::Le(1.3)),
    ("method_forward", "randlora_forward", "lora_forward", Bound::Le(1.3)),
    ("method_forward", "vblora_forward", "lora_forward", Bound::Le(1.3)),
    ("method_forward", "ln_tuning_forward", "lora_forward", Bound::Le(1.3)),
    ("method_forward", "trainable_tokens_forward", "lora_forward", Bound::Le(1.3)),
    // Issue 31, at SmolLM2-135M's shapes: a hosted LoRA at no less than
    // 0.93x the plain model's speed (time ratio at most 1 / 0.93); two
    // threads at least 1.6x one.
    ("model", "prefill_lora_1t", "prefill_1t", Bound::Le(1.075)),
    ("model", "prefill_lora_2t", "prefill_2t", Bound::Le(1.075)),
    ("model", "decode_lora_1t", "decode_1t", Bound::Le(1.075)),
    ("model", "decode_lora_2t", "decode_2t", Bound::Le(1.075)),
    ("model", "prefill_1t", "prefill_2t", Bound::Ge(1.6)),
    ("model", "decode_1t", "decode_2t", Bound::Ge(1.6)),
    ("model", "prefill_lora_1t", "prefill_lora_2t", Bound::Ge(1.6)),
    ("model", "decode_lora_1t", "decode_lora_2t", Bound::Ge(1.6)),
    ("model_train", "lora_step_1t", "lora_step_2t", Bound::Ge(1.6)),
    // Q8_0 and Q4_0 decode through the opt-in integer path within 1.3x
    // one read of every byte the step multiplies by (same threads), and
    // two threads at least 1.6x one; the exact path's time over it.
    ("model", "decode_int8_1t", "stream_weights_1t", Bound::Le(1.3)),
    ("model", "decode_int8_2t", "stream_weights_2t", Bound::Le(1.3)),
    ("model", "decode_int8_1t", "decode_int8_2t", Bound::Ge(1.6)),
    ("model", "decode_1t", "decode_int8_1t", Bound::None),
    // Four adapters' low-rank paths on 32 rows each beside one base gemm.
    ("mixed_batch", "mixed_forward", "single_forward", Bound::Le(1.15)),
    // A stored base's LoRA forward at t = 1 against one read of its bytes.
    ("storage", "lora_forward", "stream", Bound::Le(1.3)),
    // GGUF's formats at t = 1 (x deq(W)^T alone) against one read of the bytes.
    ("gguf", "forward", "stream", Bound::Le(1.3)),
    // The portable kernels' speed as a share of faer's (time ratio faer / reference).
    ("storage", "lora_forward", "reference_lora_forward", Bound::Ge(0.25)),
    // t = 1: how much faster than f32 (f32 time / stored time).
    ("storage_vs_f32_t1", "f32_lora_forward", "bf16_lora_forward", Bound::Ge(1.7)),
    ("storage_vs_f32_t1", "f32_lora_forward", "q4_0_lora_forward", Bound::Ge(4.0)),
    // t = 128: the stored base's cost over f32's.
    ("storage_vs_f32_t128", "bf16_lora_forward", "f32_lora_forward", Bound::Le(1.15)),
    ("storage_vs_f32_t128", "q8_0_lora_forward", "f32_lora_forward", Bound::Le(1.15)),
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Bound {
    Le(f64),
    Ge(f64),
    None,
}

/// One figure of a run.
#[derive(Clone, Debug, PartialEq)]
struct Figure {
    name: String,
    /// `"ratio"`, `"instructions"` or `"GFLOP/s"`.
    unit: &'static str,
    value: f64,
    bound: Bound,
}

impl Figure {
    /// The line the plain report prints.
    fn line(&self) -> String {
        match (self.unit, self.bound) {
            ("instructions", _) => format!("{} {:.0} instructions", self.name, self.value),
            ("GFLOP/s", _) => format!("{} {:.1} GFLOP/s", self.name, self.value),
            (_, Bound::Le(x)) => {
                format!("{} {:.3}  (target <= {x}: {})", self.name, self.value, ok(self.value <= x))
            }
            (_, Bound::Ge(x)) => {
                format!("{} {:.3}  (target >= {x}: {})", self.name, self.value, ok(self.value >= x))
            }
            (_, Bound::None) => format!("{} {:.3}", self.name, self.value),
        }
    }

    fn missed(&self) -> bool {
        match self.bound {
            Bound::Le(x) => self.value > x,
            Bound::Ge(x) => self.value < x,
            Bound::None => false,
        }
    }
}

fn ok(b: bool) -> &'static str {
    if b { "ok" } else { "MISSED" }
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
fn collect_criterion(root: &Path) -> BTreeMap<String, BTreeMap<String, Estimate>> {
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

/// The ratios and rates of the criterion run under `root`.
fn wall_figures(root: &Path) -> Vec<Figure> {
    let all = collect_criterion(root);
    let mut out = Vec::new();
    for (prefix, num, den, bound) in RATIOS {
        for (group, benches) in all.iter().filter(|(g, _)| g.split('.').next() == Some(prefix)) {
            let (Some(n), Some(d)) = (benches.get(num), benches.get(den)) else { continue };
            let tag = group.split('.').skip(1).collect::<Vec<_>>().join(" ");
            if num == den {
                let gflops = n.flops.map_or(f64::NAN, |f| f / n.mean_ns);
                out.push(Figure { name: format!("{num} [{tag}]"), unit: "GFLOP/s", value: gflops, bound });
            } else {
                let value = n.mean_ns / d.mean_ns;
                out.push(Figure { name: format!("{num}/{den} [{tag}]"), unit: "ratio", value, bound });
            }
        }
    }
    out
}

/// The instruction count (`Ir`) in a callgrind output file: its `summary:`
/// or `totals:` line.
fn callgrind_ir(path: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Every instruction count under `root` (iai-callgrind's
/// `target/iai/<package>/<bench>/<group>/<function>.<id>/callgrind.*.out`).
fn icount_figures(root: &Path) -> Vec<Figure> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let file = e.file_name().to_string_lossy().into_owned();
            // The current run's file; `.old` is the previous run's.
            if !(file.starts_with("callgrind.") && file.ends_with(".out")) {
                continue;
            }
            let Some(ir) = callgrind_ir(&path) else { continue };
            let bench = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            out.push(Figure { name: format!("icount {bench}"), unit: "instructions", value: ir, bound: Bound::None });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Figures as the JSON array of `{name, unit, value}` objects.
fn to_json(figures: &[Figure]) -> serde_json::Value {
    serde_json::Value::Array(
        figures.iter().map(|f| serde_json::json!({ "name": f.name, "unit": f.unit, "value": f.value })).collect(),
    )
}

/// `(name -> value)` of a saved baseline.
fn read_baseline(path: &Path) -> Result<BTreeMap<String, f64>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let arr = v.as_array().ok_or_else(|| format!("{}: not a JSON array", path.display()))?;
    Ok(arr.iter().filter_map(|f| Some((f["name"].as_str()?.to_string(), f["value"].as_f64()?))).collect())
}

/// Whether `f` regressed against `old`, and the change as a fraction.
fn regressed(f: &Figure, old: f64, ratio_limit: f64) -> (bool, f64) {
    let change = f.value / old - 1.0;
    let bad = match (f.unit, f.bound) {
        ("instructions", _) => change > ICOUNT_LIMIT,
        ("ratio", Bound::Le(_)) => change > ratio_limit,
        ("ratio", Bound::Ge(_)) => change < -ratio_limit,
        _ => false,
    };
    (bad, change)
}

struct Args {
    save: Option<String>,
    compare: Option<String>,
    json: bool,
    ratio_limit: f64,
    criterion: PathBuf,
    iai: PathBuf,
    baselines: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let mut a = Args {
        save: None,
        compare: None,
        json: false,
        ratio_limit: RATIO_LIMIT,
        criterion: target.join("criterion"),
        iai: target.join("iai"),
        baselines: target.join("peft-bench"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--save" => a.save = Some(value("--save")?),
            "--compare" => a.compare = Some(value("--compare")?),
            "--json" => a.json = true,
            "--ratio-limit" => {
                let v = value("--ratio-limit")?;
                let pct: f64 = v.parse().map_err(|_| format!("--ratio-limit {v}: not a number"))?;
                if !(pct.is_finite() && pct >= 0.0) {
                    return Err(format!("--ratio-limit {v}: must be a percentage >= 0"));
                }
                a.ratio_limit = pct / 100.0;
            }
            "--criterion" => a.criterion = value("--criterion")?.into(),
            "--iai" => a.iai = value("--iai")?.into(),
            "--baselines" => a.baselines = value("--baselines")?.into(),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    for name in a.save.iter().chain(&a.compare) {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(format!("baseline name {name:?}: use letters, digits, '-' and '_'"));
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("ratios: {e}");
            return ExitCode::from(2);
        }
    };
    let mut figures = wall_figures(&args.criterion);
    figures.extend(icount_figures(&args.iai));
    if figures.is_empty() {
        eprintln!(
            "no results under {} or {}: run `benches/report` (or `cargo bench -p peft-benches`) first",
            args.criterion.display(),
            args.iai.display()
        );
        return ExitCode::FAILURE;
    }
    if let Some(name) = &args.save {
        let path = args.baselines.join(format!("{name}.json"));
        let text = serde_json::to_string_pretty(&to_json(&figures)).unwrap_or_default();
        if let Err(e) = std::fs::create_dir_all(&args.baselines).and_then(|()| std::fs::write(&path, text)) {
            eprintln!("ratios: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        eprintln!("saved {} figures as baseline {name:?} ({})", figures.len(), path.display());
    }
    if args.json {
        let rates_left_out: Vec<Figure> = figures.iter().filter(|f| f.unit != "GFLOP/s").cloned().collect();
        println!("{}", serde_json::to_string_pretty(&to_json(&rates_left_out)).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    let Some(name) = &args.compare else {
        for f in &figures {
            println!("{}", f.line());
        }
        let missed = figures.iter().filter(|f| f.missed()).count();
        if missed > 0 {
            println!("{missed} target(s) missed");
        }
        return ExitCode::SUCCESS;
    };
    let path = args.baselines.join(format!("{name}.json"));
    let base = match read_baseline(&path) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("ratios: baseline {name:?}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut regressions = 0;
    for f in &figures {
        match base.get(&f.name) {
            Some(&old) if old != 0.0 && old.is_finite() => {
                let (bad, change) = regressed(f, old, args.ratio_limit);
                let verdict = if bad {
                    regressions += 1;
                    "  REGRESSED"
                } else {
                    ""
                };
                println!("{}  ({:+.2}% vs {name}){verdict}", f.line(), 100.0 * change);
            }
            _ => println!("{}  (new: not in {name})", f.line()),
        }
    }
    for old in base.keys().filter(|k| !figures.iter().any(|f| &f.name == *k)) {
        println!("{old}: in {name}, not measured in this run");
    }
    if regressions > 0 {
        println!(
            "{regressions} regression(s) against {name} (instruction counts: more than {:.0}%; wall-time ratios: more than {:.0}% in the wrong direction)",
            100.0 * ICOUNT_LIMIT,
            100.0 * args.ratio_limit
        );
        return ExitCode::FAILURE;
    }
    println!("no regression against {name}");
    ExitCode::SUCCESS
}
