//! `peft combine` and multi-adapter `peft merge` against PEFT's
//! `add_weighted_adapter` on the `lora_weighted` fixture (PEFT 0.21.2; see
//! `tests/fixtures/peft/README.md`): sources `a` (r 4, s 2), `b` (r 8,
//! s 0.5), `c` (r 4, s 3), weights 0.7 / 0.3, PEFT's merged weights as
//! `merged.<cat|linear|svd>.<param>` in `ref.safetensors`.
#![cfg(feature = "cli")]

mod common;

use std::path::Path;
use std::process::Command;

use common::{case_dir, load, max_rel, scratch};

fn peft(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_peft")).args(args).output().unwrap()
}

fn ok(args: &[&str]) {
    let out = peft(args);
    assert!(out.status.success(), "peft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn arg(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn combined_adapters_merge_to_pefts_weights() {
    let dir = scratch("combine");
    let refs = load(&case_dir("lora_weighted").join("ref.safetensors"));
    let base = arg(&case_dir("lora_weighted").join("base.safetensors"));
    for (kind, sources, extra) in [
        ("cat", ["a:0.7", "b:0.3"], vec![]),
        ("linear", ["a:0.7", "c:0.3"], vec![]),
        ("svd", ["a:0.7", "b:0.3"], vec!["--svd-rank", "6"]),
    ] {
        let out = dir.join(format!("comb_{kind}"));
        let [s1, s2] = sources.map(|s| arg(&case_dir("lora_weighted").join(s)));
        let mut args = vec!["combine", "--adapter", &s1, "--adapter", &s2, "--combination", kind];
        args.extend(extra.iter().copied());
        let out_arg = arg(&out);
        args.extend(["--out", &out_arg]);
        ok(&args);
        // PEFT's own combined folder and ours: the same config fields that
        // matter, and (for cat and linear) the same factors.
        let ours = std::fs::read_to_string(out.join("adapter_config.json")).unwrap();
        let pefts = std::fs::read_to_string(case_dir("lora_weighted").join(format!("comb_{kind}/adapter_config.json")))
            .unwrap();
        let (ours, pefts): (serde_json::Value, serde_json::Value) =
            (serde_json::from_str(&ours).unwrap(), serde_json::from_str(&pefts).unwrap());
        for field in ["r", "lora_alpha", "use_rslora", "peft_type"] {
            assert_eq!(ours[field], pefts[field], "{kind}: {field}");
        }
        if kind != "svd" {
            let (got, want) = (
                load(&out.join("adapter_model.safetensors")),
                load(&case_dir("lora_weighted").join(format!("comb_{kind}/adapter_model.safetensors"))),
            );
            assert_eq!(got.len(), want.len());
            for (name, (_, shape, data)) in &want {
                let (_, gshape, gdata) = &got[name];
                assert_eq!(gshape, shape, "{kind} {name}");
                assert!(max_rel(gdata, data) <= 1e-6, "{kind} {name}: {}", max_rel(gdata, data));
            }
        }
        let merged = dir.join(format!("merged_{kind}.safetensors"));
        ok(&["merge", "--base", &base, "--adapter", &out_arg, "--out", &arg(&merged)]);
        let got = load(&merged);
        let prefix = format!("merged.{kind}.");
        let mut n = 0;
        for (name, (_, _, want)) in refs.iter().filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?, v))) {
            let rel = max_rel(&got[name].2, want);
            assert!(rel <= 1e-5, "{kind} {name}: relative error {rel:.2e}");
            n += 1;
        }
        assert_eq!(n, 10, "{kind}: every base tensor compared");
    }
}

#[test]
fn several_adapters_merge_in_one_pass_with_multipliers() {
    // Oracle in f64 from the source files: W + 1 * 2 B_a A_a + 0.5 * 3 B_c A_c.
    let dir = scratch("merge-many");
    let base = load(&case_dir("lora_weighted").join("base.safetensors"));
    let a = load(&case_dir("lora_weighted").join("a/adapter_model.safetensors"));
    let c = load(&case_dir("lora_weighted").join("c/adapter_model.safetensors"));
    let out = dir.join("m.safetensors");
    let (sa, sc) = (arg(&case_dir("lora_weighted").join("a")), arg(&case_dir("lora_weighted").join("c:0.5")));
    ok(&[
        "merge",
        "--base",
        &arg(&case_dir("lora_weighted").join("base.safetensors")),
        "--adapter",
        &sa,
        "--adapter",
        &sc,
        "--out",
        &arg(&out),
    ]);
    let got = load(&out);
    for module in ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"] {
        let w = &base[&format!("{module}.weight")];
        let (n_out, n_in) = (w.1[0], w.1[1]);
        let mut want: Vec<f64> = w.2.iter().map(|v| f64::from(*v)).collect();
        for (ad, f) in [(&a, 2.0), (&c, 0.5 * 3.0)] {
            let la = &ad[&format!("base_model.model.{module}.lora_A.weight")];
            let lb = &ad[&format!("base_model.model.{module}.lora_B.weight")];
            let r = la.1[0];
            for i in 0..n_out {
                for j in 0..n_in {
                    let d: f64 = (0..r).map(|l| f64::from(lb.2[i * r + l]) * f64::from(la.2[l * n_in + j])).sum();
                    want[i * n_in + j] += f * d;
                }
            }
        }
        let want: Vec<f32> = want.iter().map(|v| *v as f32).collect();
        let rel = max_rel(&got[&format!("{module}.weight")].2, &want);
        assert!(rel <= 1e-6, "{module}: {rel:.2e}");
    }
    assert_eq!(got["layers.0.k_proj.weight"].2, base["layers.0.k_proj.weight"].2, "untouched tensors are copied");
}

/// `combine` of adapters `a` and `c` by `kind` at density 0.5, seed 3, into `out`.
fn prune_args<'a>(a: &'a str, c: &'a str, kind: &'a str, out: &'a str) -> [&'a str; 13] {
    ["combine", "--adapter", a, "--adapter", c, "--combination", kind, "--density", "0.5", "--seed", "3", "--out", out]
}

#[test]
fn pruning_kinds_write_loadable_adapters_and_refuse_bad_arguments() {
    let dir = scratch("combine-prune");
    let (sa, sc) = (arg(&case_dir("lora_weighted").join("a:0.7")), arg(&case_dir("lora_weighted").join("c:0.3")));
    for kind in ["ties", "dare_linear", "dare_ties", "magnitude_prune"] {
        let out = arg(&dir.join(kind));
        ok(&prune_args(&sa, &sc, kind, &out));
        let got = load(&dir.join(kind).join("adapter_model.safetensors"));
        let a = &got["base_model.model.layers.0.q_proj.lora_A.weight"].2;
        let kept = a.iter().filter(|v| **v != 0.0).count();
        // A of `a` and `c` are dense; after pruning each to half, their sum
        // (or merge) has at most all 256 entries and at least half of them.
        assert!(kept >= a.len() / 2 && kept <= a.len(), "{kind}: {kept} of {}", a.len());
        assert!(a.iter().all(|v| v.is_finite()));
    }
    // DARE is reproducible from the seed.
    let again = arg(&dir.join("again"));
    ok(&prune_args(&sa, &sc, "dare_ties", &again));
    let bytes = |d: &str| std::fs::read(dir.join(d).join("adapter_model.safetensors")).unwrap();
    assert_eq!(bytes("again"), bytes("dare_ties"));
    // Refusals, each naming the problem, nothing written.
    for (args, says) in [
        (vec!["--combination", "ties"], "--density is required"),
        (vec!["--combination", "linear", "--density", "0.5"], "--density applies to"),
        (vec!["--combination", "ties", "--density", "1.5"], "density"),
        (vec!["--combination", "cat", "--svd-rank", "2"], "--svd-rank applies"),
    ] {
        let out = dir.join("refused");
        let mut full = vec!["combine", "--adapter", &sa, "--adapter", &sc];
        full.extend(args.iter().copied());
        let out_arg = arg(&out);
        full.extend(["--out", &out_arg]);
        let res = peft(&full);
        let err = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success() && err.contains(says), "{args:?}: {err}");
        assert!(!out.exists());
    }
    // Linear needs equal ranks: a (r 4) and b (r 8) are refused.
    let sb = arg(&case_dir("lora_weighted").join("b:0.3"));
    let res = peft(&[
        "combine",
        "--adapter",
        &sa,
        "--adapter",
        &sb,
        "--combination",
        "linear",
        "--out",
        &arg(&dir.join("r")),
    ]);
    assert!(!res.status.success() && String::from_utf8_lossy(&res.stderr).contains("must be equal"));
    // The output may not be an input.
    let res = peft(&[
        "combine",
        "--adapter",
        &sa,
        "--adapter",
        &sc,
        "--combination",
        "cat",
        "--out",
        &arg(&case_dir("lora_weighted").join("a")),
        "--force",
    ]);
    assert!(!res.status.success());
}

/// An SVD rank above min(in, out) is refused, naming `svd_rank`, before
/// anything is allocated from it (issue 27, class 3: u64::MAX overflowed
/// `rank * in` and panicked); nothing is written.
#[test]
fn an_svd_rank_beyond_the_module_is_refused() {
    let dir = scratch("combine-svd-rank");
    let out = dir.join("out");
    let a = format!("{}:1", arg(&case_dir("lora_weighted").join("a")));
    // The adapted modules are q_proj [64, 64] and v_proj [48, 64]: 49 > 48.
    for rank in ["18446744073709551615", "49"] {
        let o = peft(&[
            "combine",
            "--adapter",
            &a,
            "--adapter",
            &a,
            "--combination",
            "svd",
            "--svd-rank",
            rank,
            "--out",
            &arg(&out),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{rank}: {err}");
        assert!(err.contains("svd_rank") && err.contains("min(in, out)"), "{rank}: {err}");
        assert!(!out.exists());
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Weights whose combination overflows f32 (issue 27, class 7: `cat` with
/// 1e39 and `linear` with 1e300 wrote infinite factors, `svd` with 1e200
/// zeros) are refused, naming the module's factor, and nothing is written.
#[test]
fn weights_that_overflow_the_factors_are_refused() {
    let dir = scratch("combine-huge");
    for (kind, sources) in
        [("cat", ["a:1e39", "b:0.3"]), ("linear", ["a:1e300", "c:0.3"]), ("svd", ["a:1e200", "b:0.3"])]
    {
        let out = dir.join(kind);
        let [s1, s2] = sources.map(|s| arg(&case_dir("lora_weighted").join(s)));
        let out_arg = arg(&out);
        let res = peft(&["combine", "--adapter", &s1, "--adapter", &s2, "--combination", kind, "--out", &out_arg]);
        let msg = String::from_utf8_lossy(&res.stderr);
        assert!(!res.status.success() && msg.contains("overflows f32"), "{kind}: {msg}");
        assert!(msg.contains(".lora_A.weight") || msg.contains(".lora_B.weight"), "{kind}: {msg}");
        assert!(!out.exists(), "{kind}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
