//! `ratios --save` / `--compare` on synthetic results: an unchanged run
//! passes, an instruction count up by 2% or a wall-time ratio worse by 6%
//! exits 1, changes inside the thresholds pass. The figures are written by
//! hand in the layouts criterion and iai-callgrind use.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("peft-ratios-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One criterion group with a LoRA forward (`ratio` times the base gemm).
fn write_criterion(root: &Path, ratio: f64) {
    for (bench, ns) in [("lora_forward_unmerged", 1000.0 * ratio), ("base_gemm", 1000.0)] {
        let dir = root.join("lora_forward_unmerged.t1_1024_r8.1t").join(bench).join("new");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("estimates.json"), format!(r#"{{"mean":{{"point_estimate":{ns}}}}}"#)).unwrap();
        std::fs::write(dir.join("benchmark.json"), "{}").unwrap();
    }
}

/// One iai-callgrind result with `ir` instructions.
fn write_iai(root: &Path, ir: u64) {
    let dir = root.join("peft-benches/icount/kernels/lora_forward.t8_d64_r4");
    std::fs::create_dir_all(&dir).unwrap();
    let body = format!(
        "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\n\nfn=main\n0 {ir}\n\nsummary: {ir}\n\ntotals: {ir}\n"
    );
    std::fs::write(dir.join("callgrind.lora_forward.t8_d64_r4.out"), body).unwrap();
    // The previous run's file must be ignored.
    std::fs::write(dir.join("callgrind.lora_forward.t8_d64_r4.out.old"), "summary: 1\n").unwrap();
}

/// Runs `ratios` over the scratch results: (exit code, stdout).
fn ratios(s: &Scratch, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ratios"))
        .args(["--criterion", s.0.join("criterion").to_str().unwrap()])
        .args(["--iai", s.0.join("iai").to_str().unwrap()])
        .args(["--baselines", s.0.join("baselines").to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn save_then_compare_flags_exactly_the_regressions() {
    let s = Scratch::new("compare");
    write_criterion(&s.0.join("criterion"), 1.00);
    write_iai(&s.0.join("iai"), 1_000_000);
    assert_eq!(ratios(&s, &["--save", "base"]).0, 0);

    let (code, out) = ratios(&s, &["--compare", "base"]);
    assert_eq!(code, 0, "unchanged:\n{out}");
    assert!(out.contains("icount lora_forward.t8_d64_r4 1000000 instructions  (+0.00% vs base)"), "{out}");

    // +0.5% instructions, ratio 4% worse, both inside the thresholds.
    write_iai(&s.0.join("iai"), 1_005_000);
    write_criterion(&s.0.join("criterion"), 1.04);
    let (code, out) = ratios(&s, &["--compare", "base"]);
    assert_eq!(code, 0, "inside the thresholds:\n{out}");

    // +2% instructions: a regression.
    write_iai(&s.0.join("iai"), 1_020_000);
    write_criterion(&s.0.join("criterion"), 1.00);
    let (code, out) = ratios(&s, &["--compare", "base"]);
    assert_eq!(code, 1, "instruction count +2%:\n{out}");
    assert!(out.contains("(+2.00% vs base)  REGRESSED"), "{out}");

    // The ratio 6% worse (its target is <= 1.05): a regression; 10% better
    // is not.
    write_iai(&s.0.join("iai"), 1_000_000);
    write_criterion(&s.0.join("criterion"), 1.06);
    assert_eq!(ratios(&s, &["--compare", "base"]).0, 1, "ratio +6%");
    write_criterion(&s.0.join("criterion"), 0.90);
    assert_eq!(ratios(&s, &["--compare", "base"]).0, 0, "ratio -10% is an improvement");
    // A looser wall-time threshold lets the 6% through.
    write_criterion(&s.0.join("criterion"), 1.06);
    assert_eq!(ratios(&s, &["--compare", "base", "--ratio-limit", "10"]).0, 0);

    // A missing baseline is an error, not a pass.
    assert_eq!(ratios(&s, &["--compare", "nope"]).0, 1);
}

#[test]
fn json_lists_name_unit_value() {
    let s = Scratch::new("json");
    write_criterion(&s.0.join("criterion"), 1.25);
    write_iai(&s.0.join("iai"), 4242);
    let (code, out) = ratios(&s, &["--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 2, "{out}");
    assert_eq!(arr[0]["name"], "lora_forward_unmerged/base_gemm [t1_1024_r8 1t]");
    assert_eq!(arr[0]["unit"], "ratio");
    assert_eq!(arr[0]["value"], 1.25);
    assert_eq!(arr[1]["name"], "icount lora_forward.t8_d64_r4");
    assert_eq!(arr[1]["unit"], "instructions");
    assert_eq!(arr[1]["value"], 4242.0);
}
