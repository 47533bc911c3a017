//! Quantized bases on disk: `peft quantize`, `peft merge` over a quantized
//! base and with a quantized `--dtype`, `peft inspect` of a base, and
//! refused storage metadata. Run on the PEFT fixture `lora_qv` (its
//! `ref.safetensors` holds PEFT's `merge_and_unload` weights as
//! `merged.<name>`, so `merged - base` is PEFT's own update).
//!
//! Stored bytes are read here with the `safetensors` crate (the `U8` tensor
//! and the `peft.storage.*` metadata), not this crate's reader, and checked
//! byte for byte against `peft_core::storage::quantize` of the expected f32
//! values: the layout is GGUF's blocks (int8: scale, then the row).
#![cfg(feature = "cli")]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use peft_core::storage::{Format, StoredWeight, dequantize, error_bound};
use peft_core::storage::{Quantized, quantize};
use peft_faer::Faer;
use peft_faer::hf::HfAdapter;
use peft_faer::hf::base::Base;
use peft_faer::hf::merge::{MergeOptions, MergeReport, merge_many};
use peft_faer::hf::st::StFile;
use safetensors::{Dtype, SafeTensors};

use common::{fixture, load, scratch};

const QUANTIZED: [Format; 3] = [Format::Int8, Format::Q8_0, Format::Q4_0];

/// A file's tensors as stored: dtype, stored shape, bytes; and its metadata.
type Raw = (HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>, HashMap<String, String>);

fn raw(path: &Path) -> Raw {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors =
        st.tensors().into_iter().map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect();
    (tensors, meta.metadata().clone().unwrap_or_default())
}

/// `w [rows, cols]` quantized by `peft_core` into a file's row layout.
fn stored_rows(f: Format, w: &[f32], rows: usize, cols: usize) -> Vec<u8> {
    match f {
        Format::Int8 => {
            let (mut q, mut s) = (vec![0i8; w.len()], vec![0f32; rows]);
            quantize(w, rows, cols, Quantized::Int8(&mut q, &mut s)).unwrap();
            s.iter()
                .zip(q.chunks_exact(cols))
                .flat_map(|(s, row)| s.to_le_bytes().into_iter().chain(row.iter().map(|&v| v as u8)))
                .collect()
        }
        Format::Q8_0 | Format::Q4_0 => {
            let mut b = vec![0u8; rows * f.row_bytes(cols).unwrap()];
            let dst = if f == Format::Q8_0 { Quantized::Q8_0(&mut b) } else { Quantized::Q4_0(&mut b) };
            quantize(w, rows, cols, dst).unwrap();
            b
        }
        _ => unreachable!(),
    }
}

/// A file's rows in format `f` dequantized by `peft_core`.
fn dequantized(f: Format, bytes: &[u8], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    match f {
        Format::Int8 => {
            for (row, dst) in bytes.chunks_exact(cols + 4).zip(out.chunks_exact_mut(cols)) {
                let s = f32::from_le_bytes(row[..4].try_into().unwrap());
                let q: Vec<i8> = row[4..].iter().map(|&b| b as i8).collect();
                dequantize(&StoredWeight::int8(&q, &[s], 1, cols).unwrap(), dst).unwrap();
            }
        }
        Format::Q8_0 => dequantize(&StoredWeight::q8_0(bytes, rows, cols).unwrap(), &mut out).unwrap(),
        Format::Q4_0 => dequantize(&StoredWeight::q4_0(bytes, rows, cols).unwrap(), &mut out).unwrap(),
        _ => unreachable!(),
    }
    out
}

fn run(base: &Path, adapters: &[&Path], out: &Path, dtype: Option<Format>) -> MergeReport {
    let read: Vec<HfAdapter> = adapters.iter().map(|d| HfAdapter::read_dir(d).unwrap()).collect();
    let ads: Vec<(&HfAdapter, f64)> = read.iter().map(|a| (a, 1.0)).collect();
    let options = MergeOptions { dtype, ..MergeOptions::default() };
    merge_many(&Base::open(base).unwrap(), &ads, out, &options, &Faer::new(), |_| {}).unwrap()
}

/// Checks that `file` holds every matrix of `want` (f32 values by name)
/// that `f` fits as `f`, byte for byte `peft_core`'s quantization of it,
/// with the metadata naming format and shape; the others as `fallback`
/// dtypes with the values of `want`. Checks the report's errors against
/// the file's. Returns the dequantized values by name.
fn check_quantized(
    file: &Path,
    f: Format,
    want: &HashMap<String, (Dtype, Vec<usize>, Vec<f32>)>,
    report: &MergeReport,
) -> HashMap<String, Vec<f32>> {
    let (tensors, meta) = raw(file);
    assert_eq!(tensors.len(), want.len());
    let mut values = HashMap::new();
    let mut reported = 0;
    for (name, (_, shape, w)) in want {
        let (dtype, stored_shape, bytes) = &tensors[name];
        let fits = matches!(shape.as_slice(), &[_, c] if f == Format::Int8 || c % 32 == 0);
        if !fits {
            assert_ne!(*dtype, Dtype::U8, "{name} does not fit {f:?}");
            assert_eq!(*dtype, Dtype::F32, "{name}");
            let kept: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            assert_eq!(&kept, w, "{name}: kept values");
            assert_eq!(report.kept.contains(name), shape.len() == 2, "{name}: kept is reported for matrices");
            values.insert(name.clone(), w.clone());
            continue;
        }
        let (rows, cols) = (shape[0], shape[1]);
        assert_eq!(*dtype, Dtype::U8, "{name}");
        let info: serde_json::Value = serde_json::from_str(&meta[&format!("peft.storage.{name}")]).unwrap();
        assert_eq!(info, serde_json::json!({ "format": f.name(), "shape": shape }), "{name}");
        let expect = stored_rows(f, w, rows, cols);
        assert_eq!(stored_shape, &vec![rows, expect.len() / rows], "{name}");
        assert_eq!(bytes, &expect, "{name}: the stored bytes are peft_core's {f:?} blocks of the f32 values");
        let deq = dequantized(f, bytes, rows, cols);
        // This crate's reader sees the same values and the logical shape.
        let st = StFile::open(file).unwrap();
        let e = st.entry(name).unwrap();
        assert_eq!((e.quant, &e.shape), (Some(f), shape));
        assert_eq!(st.read_f32(e).unwrap(), deq, "{name}: read_f32 dequantizes");
        // The report's error is the file's, within the format's bound.
        let err = w.iter().zip(&deq).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let q = report.quantized.iter().find(|q| &q.tensor == name).unwrap_or_else(|| panic!("{name} not reported"));
        assert_eq!((q.format, q.max_error, q.max_abs), (f, err, amax), "{name}");
        assert!(f64::from(err) <= error_bound(f, amax), "{name}: error {err} over the bound");
        assert!(err > 0.0, "{name}: quantizing changed nothing (the test would not see a wrong layout)");
        reported += 1;
        values.insert(name.clone(), deq);
    }
    assert_eq!(report.quantized.len(), reported);
    values
}

#[test]
fn quantize_writes_gguf_blocks_with_their_error() {
    let dir = scratch("quantize");
    let base = fixture().join("base.safetensors");
    let want = load(&base);
    for f in QUANTIZED {
        let out = dir.join(format!("{}.safetensors", f.name()));
        let report = run(&base, &[], &out, Some(f));
        check_quantized(&out, f, &want, &report);
        // Quantizing a quantized base again in its own format copies it.
        let again = dir.join(format!("{}-again.safetensors", f.name()));
        let report = run(&out, &[], &again, Some(f));
        assert!(report.quantized.is_empty());
        assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&out).unwrap());
    }
}

/// `peft merge` over a quantized base dequantizes, adds PEFT's update in
/// f32, and writes f32 (`--dtype f32`) or the base's own format again.
#[test]
fn merge_over_a_quantized_base() {
    let dir = scratch("merge-quantized");
    let base = fixture().join("base.safetensors");
    let f32_base = load(&base);
    let refs = load(&fixture().join("ref.safetensors"));
    for f in QUANTIZED {
        let qbase = dir.join(format!("{}.safetensors", f.name()));
        let report = run(&base, &[], &qbase, Some(f));
        let deq = check_quantized(&qbase, f, &f32_base, &report);

        // f32: deq(W) + PEFT's update (merged - base, from the fixture).
        let out = dir.join(format!("{}-merged-f32.safetensors", f.name()));
        let report = run(&qbase, &[&fixture()], &out, Some(Format::F32));
        assert!(report.quantized.is_empty());
        let merged = load(&out);
        let mut expect = HashMap::new();
        for (name, (_, shape, w)) in &f32_base {
            let peft = &refs[&format!("merged.{name}")].2;
            let want: Vec<f32> = deq[name].iter().zip(peft).zip(w).map(|((d, m), w)| d + (m - w)).collect();
            let got = &merged[name].2;
            let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= 1e-6, "{f:?} {name}: |merge - (deq(W) + PEFT's update)| = {err}");
            if peft == w {
                assert_eq!(got, &deq[name], "{name}: an unadapted tensor is its dequantized value");
            }
            expect.insert(name.clone(), (Dtype::F32, shape.clone(), got.clone()));
        }

        // Default: requantized to the base's format, once, from that f32 merge.
        let out = dir.join(format!("{}-merged.safetensors", f.name()));
        let report = run(&qbase, &[&fixture()], &out, None);
        let (tensors, _) = raw(&out);
        let (qtensors, _) = raw(&qbase);
        for q in &report.quantized {
            assert!(q.tensor.contains("q_proj") || q.tensor.contains("v_proj"), "{} was not adapted", q.tensor);
        }
        assert_eq!(report.quantized.len(), 4, "the four adapted matrices are requantized");
        for (name, (_, shape, w)) in &expect {
            let (dtype, _, bytes) = &tensors[name];
            if *dtype != Dtype::U8 {
                continue;
            }
            if report.quantized.iter().any(|q| &q.tensor == name) {
                assert_eq!(bytes, &stored_rows(f, w, shape[0], shape[1]), "{name}: requantized from the f32 merge");
            } else {
                assert_eq!(bytes, &qtensors[name].2, "{name}: copied as stored");
            }
        }
    }
    // An f32 base merged with `--dtype q4_0`: the same as quantizing its f32 merge.
    let f32_merged = dir.join("f32-merged.safetensors");
    run(&base, &[&fixture()], &f32_merged, None);
    let out = dir.join("merged-q4.safetensors");
    let report = run(&base, &[&fixture()], &out, Some(Format::Q4_0));
    let q4 = dir.join("merged-then-q4.safetensors");
    run(&f32_merged, &[], &q4, Some(Format::Q4_0));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&q4).unwrap());
    check_quantized(&out, Format::Q4_0, &load(&f32_merged), &report);
}

#[test]
fn cli_quantize_merge_and_inspect_print_their_reports() {
    let dir = scratch("quantize-cli");
    let peft = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_peft")).args(args).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        text
    };
    let base = fixture().join("base.safetensors");
    let q8 = dir.join("q8.safetensors");
    let (b, q, a) = (base.to_str().unwrap(), q8.to_str().unwrap(), fixture());
    let text = peft(&["quantize", "--base", b, "--out", q, "--format", "q8_0"]);
    for t in ["layers.0.q_proj.weight", "layers.1.v_proj.weight", "layers.0.k_proj.weight"] {
        let line = text.lines().find(|l| l.starts_with(t)).unwrap_or_else(|| panic!("{t} missing:\n{text}"));
        assert!(line.contains("q8_0"), "{line}");
    }
    assert!(text.contains("layers.0.o_proj.weight: kept"), "24 columns are not Q8_0 blocks:\n{text}");
    let text = peft(&["inspect", q]);
    let row = |name: &str| text.lines().find(|l| l.starts_with(name)).unwrap().split_whitespace().collect::<Vec<_>>();
    assert_eq!(row("layers.0.q_proj.weight")[1..], ["q8_0", "[32,", "32]", "1088"]);
    assert_eq!(row("layers.0.o_proj.weight")[1..], ["f32", "[32,", "24]", "3072"]);
    assert!(text.contains("q8_0: 6 tensors, 5632 values, 5984 bytes"), "{text}");
    let m = dir.join("m.safetensors");
    let text = peft(&["merge", "--base", q, "--adapter", a.to_str().unwrap(), "--out", m.to_str().unwrap()]);
    assert!(text.contains("against the f32 merge"), "{text}");
    assert_eq!(text.lines().filter(|l| l.contains(" q8_0 ")).count(), 4, "{text}");
    // Nothing is written over an input.
    let before = std::fs::read(&q8).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(["quantize", "--base", q, "--out", q, "--format", "q4_0", "--force"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(std::fs::read(&q8).unwrap(), before);
}

/// Storage metadata that does not describe its tensor is refused with the
/// tensor's name.
#[test]
fn bad_storage_metadata_is_refused() {
    let dir = scratch("quantized-malformed");
    let write = |name: &str, dtype: Dtype, shape: Vec<usize>, meta: &str| {
        let path = dir.join(format!("{name}.safetensors"));
        let n: usize = shape.iter().product::<usize>() * dtype.size();
        let data = vec![0u8; n];
        let view = safetensors::tensor::TensorView::new(dtype, shape, &data).unwrap();
        let meta = HashMap::from([(format!("peft.storage.{name}"), meta.to_string())]);
        safetensors::serialize_to_file([(name.to_string(), view)], &Some(meta), &path).unwrap();
        StFile::open(&path).map(|_| ()).unwrap_err().to_string()
    };
    let cases = [
        ("w_unknown", Dtype::U8, vec![2, 34], r#"{"format":"iq2_xxs","shape":[2,32]}"#, "unknown storage format"),
        ("w_shape", Dtype::U8, vec![2, 34], r#"{"format":"q8_0","shape":[2,64]}"#, "stored as"),
        ("w_dtype", Dtype::F32, vec![2, 32], r#"{"format":"int8","shape":[2,28]}"#, "stored as"),
        ("w_blocks", Dtype::U8, vec![2, 18], r#"{"format":"q4_0","shape":[2,16]}"#, "whole blocks of 32"),
        ("w_json", Dtype::U8, vec![2, 34], r#"q8_0 [2, 32]"#, "want"),
        ("w_rank", Dtype::U8, vec![68], r#"{"format":"q8_0","shape":[64]}"#, "stored as"),
    ];
    for (name, dtype, shape, meta, says) in cases {
        let err = write(name, dtype, shape, meta);
        assert!(err.contains(name) && err.contains(says), "{name}: {err}");
    }
    // Metadata naming a tensor the file does not hold.
    let path = dir.join("orphan.safetensors");
    let view = safetensors::tensor::TensorView::new(Dtype::U8, vec![1, 34], &[0u8; 34]).unwrap();
    let meta = HashMap::from([("peft.storage.other".to_string(), r#"{"format":"q8_0","shape":[1,32]}"#.to_string())]);
    safetensors::serialize_to_file([("w".to_string(), view)], &Some(meta), &path).unwrap();
    let err = StFile::open(&path).unwrap_err().to_string();
    assert!(err.contains("peft.storage.other") && err.contains("names no tensor"), "{err}");
}
