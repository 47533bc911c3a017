//! The file paths under hostile or careless use: one test per class of
//! failure found by trying them (issue "File I/O that loses nothing and
//! never lies"), each through the `peft` command where the command is what
//! a user runs, with the library's typed error checked where it matters.
#![cfg(feature = "cli")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use peft_core::format::{self, AdapterFile, Tensor, Value};
use peft_faer::hf::base::Base;
use peft_faer::hf::{HfAdapter, HfError};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

use common::{fixture, scratch};

/// The fixture's adapter folder copied to `dir/adapter`, its base to
/// `dir/base.safetensors`.
fn copy_fixture(dir: &Path) -> (PathBuf, PathBuf) {
    let ad = dir.join("adapter");
    std::fs::create_dir_all(&ad).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture().join(f), ad.join(f)).unwrap();
    }
    let base = dir.join("base.safetensors");
    std::fs::copy(fixture().join("base.safetensors"), &base).unwrap();
    (ad, base)
}

fn peft(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peft"));
    for a in args {
        c.arg(a);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fn edit_config(ad: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = ad.join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Every tensor of a safetensors file: name, dtype, shape, bytes (read
/// with the `safetensors` crate, independent of this crate's reader).
fn tensors_of(path: &Path) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> =
        st.tensors().into_iter().map(|(k, t)| (k, t.dtype(), t.shape().to_vec(), t.data().to_vec())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Sets element `index` of the f32 tensor `name` in the file `path`.
fn poke(path: &Path, name: &str, index: usize, value: f32) {
    let mut t = tensors_of(path);
    let x = t.iter_mut().find(|t| t.0 == name).unwrap();
    x.3[4 * index..4 * index + 4].copy_from_slice(&value.to_le_bytes());
    save(path, &t);
}

fn save(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, &None, path).unwrap();
}

/// Class 1: a tensor stored in two shards is refused when the base is
/// opened (it used to panic in the merge, or be written twice), and a
/// merge leaves nothing behind.
#[test]
fn a_tensor_in_two_shards_is_refused() {
    let dir = scratch("twoshards");
    let (ad, _) = copy_fixture(&dir);
    let all = tensors_of(&fixture().join("base.safetensors"));
    let shards = dir.join("sharded");
    std::fs::create_dir(&shards).unwrap();
    // Shard 1 holds everything; shard 2 holds a 1-D bias and an adapted
    // weight again. The index names shard 1 for all of them.
    let dup: Vec<_> =
        all.iter().filter(|t| t.0 == "layers.0.v_proj.bias" || t.0 == "layers.0.q_proj.weight").cloned().collect();
    save(&shards.join("model-1.safetensors"), &all);
    save(&shards.join("model-2.safetensors"), &dup);
    let mut map = serde_json::Map::new();
    for t in &all {
        map.insert(t.0.clone(), "model-1.safetensors".into());
    }
    map.insert("unused".into(), "model-2.safetensors".into());
    let index = serde_json::json!({ "weight_map": map });
    std::fs::write(shards.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = Base::open(&shards).unwrap_err().into_root();
    assert!(matches!(&e, HfError::Base(m) if m.contains("stored twice") && m.contains("model-2")), "{e}");

    let out = dir.join("merged");
    let o = peft(&[&"merge", &"--base", &shards, &"--adapter", &ad, &"--out", &out]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("stored twice"), "{}", stderr(&o));
    assert_eq!(names(&dir), ["adapter", "base.safetensors", "sharded"]);

    // The index puts a tensor in a shard that does not hold it: the
    // message says which shard does.
    let second =
        |t: &&(String, Dtype, Vec<usize>, Vec<u8>)| t.0 == "layers.1.k_proj.weight" || t.0 == "layers.1.o_proj.weight";
    let moved: Vec<_> = all.iter().filter(|t| !second(t)).cloned().collect();
    let k: Vec<_> = all.iter().filter(second).cloned().collect();
    save(&shards.join("model-1.safetensors"), &moved);
    save(&shards.join("model-2.safetensors"), &k);
    map.remove("unused");
    map.insert("layers.1.o_proj.weight".into(), "model-2.safetensors".into());
    std::fs::write(shards.join("model.safetensors.index.json"), serde_json::json!({ "weight_map": map }).to_string())
        .unwrap();
    let e = Base::open(&shards).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("layers.1.k_proj.weight") && msg.contains("model-2.safetensors holds it"), "{msg}");
    assert!(msg.contains("model.safetensors.index.json"), "{msg}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Class 2: after `convert X.peft DIR`, an edit of `lora_alpha` or
/// `use_rslora` in DIR's config is what `convert DIR Y.peft` writes (the
/// tool's own metadata no longer overrides it); unedited, the round trip
/// is still byte for byte.
#[test]
fn the_config_file_wins_over_embedded_metadata() {
    let dir = scratch("config-wins");
    let own = dir.join("a.peft");
    let o = peft(&[&"convert", &fixture(), &own]);
    assert!(o.status.success(), "{}", stderr(&o));
    let hf = dir.join("hf");
    assert!(peft(&[&"convert", &own, &hf]).status.success());
    let back = dir.join("back.peft");
    assert!(peft(&[&"convert", &hf, &back]).status.success());
    assert_eq!(std::fs::read(&own).unwrap(), std::fs::read(&back).unwrap());

    edit_config(&hf, |c| {
        c["lora_alpha"] = 32.into();
        c["use_rslora"] = true.into();
    });
    let edited = dir.join("edited.peft");
    assert!(peft(&[&"convert", &hf, &edited]).status.success());
    let bytes = std::fs::read(&edited).unwrap();
    let f = AdapterFile::parse(&bytes).unwrap();
    assert_eq!(f.get_f64("lora_alpha").unwrap(), 32.0);
    assert!(f.get_bool("use_rslora").unwrap());
    // And the scale PEFT would use: 32 / sqrt(4) = 16 (hand calculation).
    let back_dir = dir.join("hf2");
    assert!(peft(&[&"convert", &edited, &back_dir]).status.success());
    let ad = HfAdapter::read_dir(&back_dir).unwrap();
    assert!(ad.modules.iter().all(|m| m.scale == 16.0));
    std::fs::remove_dir_all(&dir).ok();
}

/// Class 3: no output may be an input (the base, the adapter's files, a
/// folder holding them); an existing output needs `--force`, for files and
/// folders alike, and `--force` replaces it whole.
#[test]
fn outputs_never_overwrite_inputs_and_need_force() {
    let dir = scratch("overwrite");
    let (ad, base) = copy_fixture(&dir);
    let base_bytes = std::fs::read(&base).unwrap();
    let weights = ad.join("adapter_model.safetensors");
    let ad_bytes = std::fs::read(&weights).unwrap();
    for out in [base.clone(), weights.clone(), ad.clone(), dir.join("adapter/../base.safetensors")] {
        for force in [false, true] {
            let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
                vec![&"merge", &"--base", &base, &"--adapter", &ad, &"--out", &out];
            if force {
                args.push(&"--force");
            }
            let o = peft(&args);
            assert!(!o.status.success());
            assert!(stderr(&o).contains("would overwrite the input"), "{out:?}: {}", stderr(&o));
        }
    }
    assert_eq!(std::fs::read(&base).unwrap(), base_bytes);
    assert_eq!(std::fs::read(&weights).unwrap(), ad_bytes);
    // convert over its own source config, or into its source folder.
    let own = dir.join("a.peft");
    assert!(peft(&[&"convert", &ad, &own]).status.success());
    for out in [ad.join("adapter_config.json"), ad.clone()] {
        let o = peft(&[&"convert", &ad, &out, &"--force"]);
        assert!(stderr(&o).contains("would overwrite the input"), "{}", stderr(&o));
    }
    let o = peft(&[&"convert", &own, &own, &"--force"]);
    assert!(stderr(&o).contains("would overwrite the input"), "{}", stderr(&o));

    // One policy: an existing file or folder output is refused without
    // --force and replaced with it.
    let merged = dir.join("merged.safetensors");
    assert!(peft(&[&"merge", &"--base", &base, &"--adapter", &ad, &"--out", &merged]).status.success());
    let o = peft(&[&"merge", &"--base", &base, &"--adapter", &ad, &"--out", &merged]);
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert!(peft(&[&"merge", &"--base", &base, &"--adapter", &ad, &"--out", &merged, &"--force"]).status.success());
    let hf = dir.join("hf");
    assert!(peft(&[&"convert", &own, &hf]).status.success());
    let o = peft(&[&"convert", &own, &hf]);
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    std::fs::write(hf.join("stray"), b"x").unwrap();
    assert!(peft(&[&"convert", &own, &hf, &"--force"]).status.success());
    assert_eq!(names(&hf), ["adapter_config.json", "adapter_model.safetensors"]);
    assert!(!names(&dir).iter().any(|n| n.starts_with(".peft-tmp")), "{:?}", names(&dir));
    std::fs::remove_dir_all(&dir).ok();
}

/// Class 4: a scale that overflows f32, or a NaN in `A`, is refused by
/// `merge` naming the tensor and index (nothing written), written with
/// `--allow-nonfinite`, and warned about by `inspect`.
#[test]
fn nonfinite_merges_are_refused_by_default() {
    let dir = scratch("nonfinite");
    let (ad, base) = copy_fixture(&dir);
    let out = dir.join("out.safetensors");
    // alpha = 1e40 is a finite f64; the scale alpha / r = 1e40 / 4 = 2.5e39
    // is above f32's largest value (3.4e38).
    edit_config(&ad, |c| c["lora_alpha"] = serde_json::json!(1e40));
    let o = peft(&[&"merge", &"--base", &base, &"--adapter", &ad, &"--out", &out]);
    assert!(stderr(&o).contains("overflows f32") && stderr(&o).contains("layers.0.q_proj.weight"), "{}", stderr(&o));
    assert!(!out.exists());
    let o = peft(&[&"inspect", &ad]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("overflows f32"));

    // A NaN in one lora_A element.
    let (ad, _) = copy_fixture(&dir);
    let w = ad.join("adapter_model.safetensors");
    let mut t = tensors_of(&w);
    let a = t.iter_mut().find(|t| t.0.ends_with("layers.1.v_proj.lora_A.weight")).unwrap();
    a.3[12..16].copy_from_slice(&f32::NAN.to_le_bytes());
    save(&w, &t);
    let o = peft(&[&"merge", &"--base", &base, &"--adapter", &ad, &"--out", &out]);
    let msg = stderr(&o);
    assert!(msg.contains("layers.1.v_proj.lora_A.weight") && msg.contains("element 3 is NaN"), "{msg}");
    assert!(!out.exists());
    let o = peft(&[&"inspect", &ad]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("lora_A.weight: element 3 is NaN"));
    let o = peft(&[&"merge", &"--base", &base, &"--adapter", &ad, &"--out", &out, &"--allow-nonfinite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let merged = tensors_of(&out);
    let v = &merged.iter().find(|t| t.0 == "layers.1.v_proj.weight").unwrap().3;
    assert!(v.chunks(4).any(|c| f32::from_le_bytes(c.try_into().unwrap()).is_nan()));
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 27, class 1: `merge` never writes an infinity into a half-precision
/// output. A finite value above 65504 converted with `--dtype f16` (an
/// unadapted tensor) and an f16 base whose merged weights pass 65504 (a
/// large alpha) are refused naming the tensor, nothing written;
/// `--allow-nonfinite` writes them; bf16, whose range is f32's, holds them.
#[test]
fn half_precision_outputs_never_overflow_to_infinity() {
    let dir = scratch("f16-overflow");
    let (ad, base) = copy_fixture(&dir);
    let out = dir.join("out.safetensors");
    poke(&base, "layers.0.k_proj.weight", 2, 70000.0);
    let o = peft(&[&"merge", &"--base", &base, &"--adapter", &ad, &"--out", &out, &"--dtype", &"f16"]);
    let msg = stderr(&o);
    assert!(!o.status.success() && msg.contains("layers.0.k_proj.weight") && msg.contains("element 2"), "{msg}");
    assert!(msg.contains("65504") && !out.exists(), "{msg}");
    let o = peft(&[&"merge", &"--base", &base, &"--adapter", &ad, &"--out", &out, &"--dtype", &"bf16"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // An f16 base; alpha 1e7 (s = 2.5e6) takes s B A past 65504.
    let f16 = dir.join("base_f16.safetensors");
    let half: Vec<_> = tensors_of(&fixture().join("base.safetensors"))
        .into_iter()
        .map(|(n, _, s, b)| {
            let v: Vec<u8> = b
                .chunks_exact(4)
                .flat_map(|c| half::f16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
                .collect();
            (n, Dtype::F16, s, v)
        })
        .collect();
    save(&f16, &half);
    edit_config(&ad, |c| c["lora_alpha"] = serde_json::json!(1e7));
    let out2 = dir.join("out2.safetensors");
    let o = peft(&[&"merge", &"--base", &f16, &"--adapter", &ad, &"--out", &out2]);
    let msg = stderr(&o);
    assert!(!o.status.success() && msg.contains("layers.0.q_proj.weight") && msg.contains("65504"), "{msg}");
    assert!(!out2.exists());
    let o = peft(&[&"merge", &"--base", &f16, &"--adapter", &ad, &"--out", &out2, &"--allow-nonfinite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let q = tensors_of(&out2).into_iter().find(|t| t.0 == "layers.0.q_proj.weight").unwrap();
    assert!(q.3.chunks_exact(2).any(|c| half::f16::from_le_bytes([c[0], c[1]]).is_infinite()));
    std::fs::remove_dir_all(&dir).ok();
}

/// Class 5: SIGINT and SIGTERM during a merge remove the temporary output;
/// a temporary left by a killed process is removed by the next run.
#[cfg(unix)]
#[test]
fn interrupted_merges_leave_no_temporary() {
    let dir = scratch("signals");
    let (ad, base) = copy_fixture(&dir);
    for signal in ["INT", "TERM"] {
        let out = dir.join(format!("out-{signal}.safetensors"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_peft"))
            .args(["merge", "--base"])
            .arg(&base)
            .arg("--adapter")
            .arg(&ad)
            .arg("--out")
            .arg(&out)
            .env("PEFT_TEST_MERGE_PAUSE_MS", "300")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !names(&dir).iter().any(|n| n.starts_with(".peft-tmp-")) {
            assert!(start.elapsed() < Duration::from_secs(30), "no temporary appeared");
            std::thread::sleep(Duration::from_millis(5));
        }
        let kill = Command::new("kill").args([format!("-{signal}"), child.id().to_string()]).status().unwrap();
        assert!(kill.success());
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(130), "SIG{signal}");
        assert_eq!(names(&dir), ["adapter", "base.safetensors"], "SIG{signal}");
    }
    // A stale temporary of a dead process (pid above Linux's 2^22 limit).
    let stale = dir.join(".peft-tmp-4194999-deadbeef");
    std::fs::write(&stale, b"partial").unwrap();
    let out = dir.join("out.safetensors");
    assert!(peft(&[&"merge", &"--base", &base, &"--adapter", &ad, &"--out", &out]).status.success());
    assert!(!stale.exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// Class 6: an adapter with an f16 `lora_A` and an f32 `lora_B` keeps each
/// tensor's type through `convert` both ways, bit for bit.
#[test]
fn mixed_dtypes_are_kept_per_tensor() {
    let dir = scratch("mixed");
    let (ad, _) = copy_fixture(&dir);
    let w = ad.join("adapter_model.safetensors");
    let mut t = tensors_of(&w);
    for x in t.iter_mut().filter(|x| x.0.contains("lora_A")) {
        let h: Vec<u8> =
            x.3.chunks(4)
                .flat_map(|c| half::f16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes())
                .collect();
        *x = (x.0.clone(), Dtype::F16, x.2.clone(), h);
    }
    save(&w, &t);
    let own = dir.join("mixed.peft");
    assert!(peft(&[&"convert", &ad, &own]).status.success());
    let bytes = std::fs::read(&own).unwrap();
    let f = AdapterFile::parse(&bytes).unwrap();
    for v in f.tensors() {
        let want = if v.name().contains("lora_A") { format::Dtype::F16 } else { format::Dtype::F32 };
        assert_eq!(v.dtype(), want, "{}", v.name());
    }
    let back = dir.join("back");
    assert!(peft(&[&"convert", &own, &back]).status.success());
    assert_eq!(tensors_of(&back.join("adapter_model.safetensors")), t);
    std::fs::remove_dir_all(&dir).ok();
}

/// A `.peft` LoRA file from entries and f32 tensors.
fn own_file(config: &[(&str, Value<'_>)], tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let ts: Vec<Tensor<'_, f32>> = tensors.iter().map(|(n, s, d)| Tensor { name: n, shape: s, data: d }).collect();
    let mut out = vec![0u8; format::encoded_len(config, &ts).unwrap()];
    let n = format::encode(peft_core::optim::Method::Lora, config, &ts, &mut out).unwrap();
    out.truncate(n);
    out
}

/// Class 7: `.peft` to folder refuses what `inspect` would refuse: an
/// orphan `lora_B`, a rank the config does not say, duplicate config keys.
#[test]
fn peft_to_folder_is_validated() {
    let dir = scratch("validate");
    let lora = |r: u64| {
        vec![
            ("r", Value::U64(r)),
            ("lora_alpha", Value::F64(8.0)),
            ("use_rslora", Value::Bool(false)),
            ("target_modules", Value::Str("q_proj")),
        ]
    };
    let a = ("l.q_proj.lora_A.weight", vec![2, 3], vec![0.5; 6]);
    let b = ("l.q_proj.lora_B.weight", vec![3, 2], vec![0.25; 6]);
    let orphan = ("l.k_proj.lora_B.weight", vec![3, 2], vec![0.25; 6]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("orphan", own_file(&lora(2), &[a.clone(), b.clone(), orphan]), "l.k_proj.lora_A.weight is missing"),
        ("rank", own_file(&lora(4), &[a.clone(), b.clone()]), "rank"),
    ];
    for (name, bytes, want) in cases {
        let p = dir.join(format!("{name}.peft"));
        std::fs::write(&p, bytes).unwrap();
        let out = dir.join(name);
        let o = peft(&[&"convert", &p, &out]);
        assert!(!o.status.success() && stderr(&o).contains(want), "{name}: {}", stderr(&o));
        assert!(!out.exists());
    }
    // Duplicate keys: "r" twice, written by patching a second key and
    // re-sealing the checksum.
    let mut cfg = lora(2);
    cfg.push(("s", Value::U64(4)));
    let mut bytes = own_file(&cfg, &[a, b]);
    let at = bytes.windows(3).position(|w| w == [1, b's', 0]).unwrap();
    bytes[at + 1] = b'r';
    let n = bytes.len();
    let crc = format::crc32(&bytes[..n - 4]);
    bytes[n - 4..].copy_from_slice(&crc.to_le_bytes());
    let p = dir.join("dup.peft");
    std::fs::write(&p, bytes).unwrap();
    let o = peft(&[&"convert", &p, &dir.join("dup")]);
    assert!(stderr(&o).contains("share a key"), "{}", stderr(&o));
    assert_eq!(names(&dir), ["dup.peft", "orphan.peft", "rank.peft"]);
    std::fs::remove_dir_all(&dir).ok();
}

/// Runs `peft` with a deadline (a FIFO input used to hang forever).
fn peft_within(args: &[&dyn AsRef<std::ffi::OsStr>], limit: Duration) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peft"));
    for a in args {
        c.arg(a);
    }
    let mut child = c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().ok();
            panic!("peft {:?} did not finish in {limit:?}", args.iter().map(|a| a.as_ref()).collect::<Vec<_>>());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// Class 8: reads are bounded: a config over 16 MiB is refused before it
/// is read, a device or FIFO input is refused without reading or blocking.
#[test]
fn reads_are_bounded() {
    let dir = scratch("bounded");
    let (ad, base) = copy_fixture(&dir);
    let cfg = ad.join("adapter_config.json");
    let f = std::fs::File::create(&cfg).unwrap();
    f.set_len((16 << 20) + 1).unwrap();
    drop(f);
    let o = peft_within(&[&"inspect", &ad], Duration::from_secs(20));
    assert!(stderr(&o).contains("adapter_config.json") && stderr(&o).contains("limit"), "{}", stderr(&o));
    let out = dir.join("x");
    for src in [Path::new("/dev/zero"), Path::new("/dev/null")] {
        if src.exists() {
            let o = peft_within(&[&"convert", &src, &out], Duration::from_secs(20));
            assert!(stderr(&o).contains("not a regular file"), "{}", stderr(&o));
        }
    }
    #[cfg(unix)]
    {
        let fifo = dir.join("fifo");
        if Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success()) {
            let o = peft_within(&[&"convert", &fifo, &out], Duration::from_secs(20));
            assert!(stderr(&o).contains("not a regular file"), "{}", stderr(&o));
            let o = peft_within(
                &[&"merge", &"--base", &fifo, &"--adapter", &fixture(), &"--out", &out],
                Duration::from_secs(20),
            );
            assert!(stderr(&o).contains("not a regular file"), "{}", stderr(&o));
        }
    }
    assert!(!out.exists() && base.exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// Class 9: a shard index of 160k tensors in one shard opens (the check
/// was quadratic: 42 s in release, against 1 s for the shard alone). No
/// time is asserted here (speed lives in benchmarks); the test shows the
/// size works and every tensor is found through the index.
#[test]
fn a_large_shard_index_opens() {
    let dir = scratch("bigindex");
    let n = 160_000;
    let names: Vec<String> = (0..n).map(|i| format!("model.layers.{}.t{i}.weight", i % 80)).collect();
    let tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> =
        names.iter().map(|k| (k.clone(), Dtype::F32, vec![1], vec![0; 4])).collect();
    save(&dir.join("model-1.safetensors"), &tensors);
    let map: serde_json::Map<String, serde_json::Value> =
        names.iter().map(|k| (k.clone(), "model-1.safetensors".into())).collect();
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::json!({ "weight_map": map }).to_string())
        .unwrap();
    let b = Base::open(&dir).unwrap();
    assert_eq!(b.entries().count(), n);
    assert!(names.iter().all(|k| b.find(k).is_some()));
    std::fs::remove_dir_all(&dir).ok();
}

/// Class 10: a config over 64 KiB (a long explicit `target_modules`)
/// converts to `.peft` and back to the same config.
#[test]
fn configs_over_64k_convert() {
    let dir = scratch("bigconfig");
    let (ad, _) = copy_fixture(&dir);
    edit_config(&ad, |c| {
        let mut list: Vec<String> = (0..4000).map(|i| format!("model.layers.{i}.mlp.some_long_projection")).collect();
        list.extend(["q_proj".into(), "v_proj".into()]);
        c["target_modules"] = list.into();
    });
    assert!(std::fs::metadata(ad.join("adapter_config.json")).unwrap().len() > 65_536);
    let own = dir.join("big.peft");
    let o = peft(&[&"convert", &ad, &own]);
    assert!(o.status.success(), "{}", stderr(&o));
    let back = dir.join("back");
    assert!(peft(&[&"convert", &own, &back]).status.success());
    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap()).unwrap()
    };
    assert_eq!(read(&back), read(&ad));
    std::fs::remove_dir_all(&dir).ok();
}

/// Class 11: a regex `target_modules` must match the whole module name, as
/// Python's `re.fullmatch` does, not merely its leftmost match.
#[test]
fn regex_targets_full_match() {
    let dir = scratch("regex");
    let (ad, _) = copy_fixture(&dir);
    // On "layers.0.q_proj" the leftmost-first match of the first branch is
    // "layers.0.q" (not the whole name); fullmatch takes the second.
    edit_config(&ad, |c| c["target_modules"] = r"layers\.\d\.q|layers\.\d\.(q|v)_proj".into());
    let a = HfAdapter::read_dir(&ad).unwrap();
    assert_eq!(a.modules.len(), 4);
    // And a pattern that matches only a prefix does not target the module.
    edit_config(&ad, |c| c["target_modules"] = r"layers\.\d\.(q|v)".into());
    assert!(HfAdapter::read_dir(&ad).unwrap_err().to_string().contains("does not target"));
    std::fs::remove_dir_all(&dir).ok();
}

/// Class 12: output names of 245 to 255 bytes work (the temporary's name
/// no longer grows with the output's).
#[test]
fn long_output_names_work() {
    let dir = scratch("long");
    let (ad, base) = copy_fixture(&dir);
    for len in [245, 255] {
        let out = dir.join(format!("{}.safetensors", "m".repeat(len - 12)));
        assert_eq!(out.file_name().unwrap().len(), len);
        let o = peft(&[&"merge", &"--base", &base, &"--adapter", &ad, &"--out", &out]);
        assert!(o.status.success(), "{len}: {}", stderr(&o));
        let own = dir.join(format!("{}.peft", "c".repeat(len - 5)));
        assert!(peft(&[&"convert", &ad, &own]).status.success());
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Class 13: errors name the file and the tensor.
#[test]
fn errors_name_the_file_and_tensor() {
    let dir = scratch("names");
    let o = peft(&[&"convert", &"/nonexistent/a.peft", &dir.join("x")]);
    assert!(stderr(&o).contains("/nonexistent/a.peft"), "{}", stderr(&o));
    let (ad, base) = copy_fixture(&dir);
    // A missing lora_B: the folder's file and the tensor.
    let w = ad.join("adapter_model.safetensors");
    let t: Vec<_> = tensors_of(&w).into_iter().filter(|t| !t.0.ends_with("layers.0.q_proj.lora_B.weight")).collect();
    save(&w, &t);
    let o = peft(&[&"inspect", &ad]);
    let msg = stderr(&o);
    assert!(msg.contains("adapter_model.safetensors") && msg.contains("layers.0.q_proj.lora_B.weight"), "{msg}");
    // A header whose sizes disagree: the file and the tensor.
    let bad = dir.join("bad.safetensors");
    let header = r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0; 12]);
    std::fs::write(&bad, bytes).unwrap();
    copy_fixture(&dir);
    let o = peft(&[&"merge", &"--base", &bad, &"--adapter", &ad, &"--out", &dir.join("o")]);
    let msg = stderr(&o);
    assert!(msg.contains("bad.safetensors") && msg.contains("tensor \"w\""), "{msg}");
    assert!(base.exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// Class 14: `r = 0` is refused (its scale is infinite); `--threads 0`,
/// `--steps 0`, `--rank 0` and `--lr nan` are refused before anything is
/// created.
#[test]
fn bad_numbers_are_refused_before_any_output() {
    let dir = scratch("numbers");
    let (ad, _) = copy_fixture(&dir);
    edit_config(&ad, |c| {
        c["r"] = 0.into();
        c["rank_pattern"] = serde_json::json!({ "q_proj": 4, "v_proj": 4 });
    });
    // Every module has rank 4 by the pattern, but the default r = 0 is
    // still an invalid config (PEFT refuses it).
    let e = HfAdapter::read_dir(&ad).unwrap_err();
    assert!(e.to_string().contains("`r`"), "{e}");
    for (arg, flag) in [
        ("--threads=0", "--threads"),
        ("--steps=0", "--steps"),
        ("--rank=0", "--rank"),
        ("--lr=nan", "--lr"),
        ("--lr=-1", "--lr"),
    ] {
        let out = dir.join("never");
        let o = peft(&[&"finetune", &arg, &"--out", &out]);
        assert!(!o.status.success(), "{arg}");
        assert!(stderr(&o).contains(flag), "{arg}: {}", stderr(&o));
        assert!(!out.exists(), "{arg} created --out");
    }
    let o = peft(&[&"merge", &"--threads", &"0", &"--base", &"b", &"--adapter", &"a", &"--out", &"o"]);
    assert!(stderr(&o).contains("--threads"));
    std::fs::remove_dir_all(&dir).ok();
}

/// The config is read with serde: a mistyped field is an error naming it
/// (also inside a pattern), and `rank_pattern` keeps the file's order,
/// which PEFT's first match depends on (a JSON map would sort the keys).
#[test]
fn config_fields_are_typed_and_patterns_keep_file_order() {
    let dir = scratch("typed");
    for (field, value, want) in [
        ("r", serde_json::json!("four"), "r"),
        ("use_rslora", serde_json::json!(1), "use_rslora"),
        ("rank_pattern", serde_json::json!({ "q_proj": "x" }), "rank_pattern.q_proj"),
        ("target_modules", serde_json::json!(7), "target_modules"),
    ] {
        let (ad, _) = copy_fixture(&dir);
        edit_config(&ad, |c| c[field] = value.clone());
        let e = HfAdapter::read_dir(&ad).unwrap_err().into_root();
        assert!(matches!(&e, HfError::Config { field: f, .. } if f == want), "{field}: {e}");
    }
    // Written in this order, "q_proj" is the first key matching
    // "layers.0.q_proj" (rank 4, as the tensors have); sorted, "0.q_proj"
    // would come first and say 8.
    let (ad, _) = copy_fixture(&dir);
    let text = std::fs::read_to_string(ad.join("adapter_config.json")).unwrap();
    let text = text.replacen('{', r#"{"rank_pattern": {"q_proj": 4, "0.q_proj": 8}, "#, 1);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(v.get("rank_pattern").is_some());
    // serde_json would reorder on re-serialization: write the text as is,
    // with the original `rank_pattern` removed.
    let text = text.replacen(r#""rank_pattern": {},"#, "", 1);
    std::fs::write(ad.join("adapter_config.json"), &text).unwrap();
    let a = HfAdapter::read_dir(&ad).unwrap();
    assert!(a.modules.iter().all(|m| m.r == 4));
    std::fs::remove_dir_all(&dir).ok();
}

/// `peft inspect DIR | head -1`: a reader that closes the pipe ends the
/// command quietly (it used to panic "failed printing to stdout").
#[test]
fn a_closed_stdout_is_not_a_panic() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_peft"))
        .arg("inspect")
        .arg(fixture())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close the read end before the command (still starting) writes.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("panicked"), "{err}");
}

/// Issue 27, class 4: `finetune` never replaces an output without
/// `--force`: a second run into the same OUT is refused, naming the first
/// output that exists, before any training, and a file a user put in
/// `OUT/lora/` survives; `--force` replaces the outputs.
#[test]
fn finetune_needs_force_to_replace_its_outputs() {
    let dir = scratch("finetune-force");
    let out = dir.join("out");
    let run = |force: bool| {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
            vec![&"finetune", &"--method", &"lora", &"--steps", &"1", &"--json", &"--out", &out];
        if force {
            args.push(&"--force");
        }
        peft(&args)
    };
    // A temporary a killed finetune left (a dead pid, above Linux's 2^22
    // limit): its merge check's folder is such a temporary now (issue 27,
    // class 10), removed by the next run.
    let stale = out.join(".peft-tmp-4194999-deadbeef");
    std::fs::create_dir_all(stale.join("model.safetensors")).unwrap();
    assert!(run(false).status.success());
    assert!(!stale.exists(), "the stale temporary is removed");
    assert_eq!(names(&out), ["lora", "model"], "nothing else left in OUT");
    std::fs::write(out.join("lora/notes.txt"), b"mine").unwrap();
    let o = run(false);
    let msg = stderr(&o);
    assert!(!o.status.success() && msg.contains("already exists") && msg.contains("model"), "{msg}");
    assert_eq!(std::fs::read(out.join("lora/notes.txt")).unwrap(), b"mine");
    let o = run(true);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!out.join("lora/notes.txt").exists(), "--force replaced OUT/lora");
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 27, class 2: `finetune --model` on a sharded checkpoint (two
/// shards and `model.safetensors.index.json`) trains, merges into a
/// folder of shards for its merged-vs-unmerged check, and leaves no
/// temporary behind (it used to fail with "Is a directory (os error 21)",
/// no path, and leave a model-sized hidden folder).
#[test]
fn finetune_trains_on_a_sharded_checkpoint() {
    let dir = scratch("finetune-sharded");
    let first = dir.join("first");
    assert!(peft(&[&"finetune", &"--method", &"lora", &"--steps", &"1", &"--json", &"--out", &first]).status.success());
    let sharded = dir.join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    std::fs::copy(first.join("model/config.json"), sharded.join("config.json")).unwrap();
    let tensors = tensors_of(&first.join("model/model.safetensors"));
    let mut map = serde_json::Map::new();
    let half = tensors.len() / 2;
    for (i, part) in [&tensors[..half], &tensors[half..]].into_iter().enumerate() {
        let file = format!("model-{:05}-of-00002.safetensors", i + 1);
        save(&sharded.join(&file), part);
        for t in part {
            map.insert(t.0.clone(), file.clone().into());
        }
    }
    let total: usize = tensors.iter().map(|t| t.3.len()).sum();
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": map });
    std::fs::write(sharded.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let out = dir.join("out");
    let o =
        peft(&[&"finetune", &"--method", &"lora", &"--steps", &"2", &"--json", &"--model", &sharded, &"--out", &out]);
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(doc["methods"][0]["merged_vs_unmerged_max_abs_diff"].as_f64().unwrap() < 1e-4);
    assert_eq!(names(&out), ["lora"], "no temporary left in OUT");
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 27, class 8: `quantize` of a finite 1e6 (a Q4_0 block scale of
/// 125000, past f16's 65504) is refused as out of range, naming the tensor
/// and the element, not called "non-finite" nor pointed at an
/// `--allow-nonfinite` that `quantize` does not have.
#[test]
fn quantize_names_an_out_of_range_value_as_such() {
    let dir = scratch("quantize-range");
    let (_, base) = copy_fixture(&dir);
    poke(&base, "layers.1.q_proj.weight", 40, 1e6);
    let out = dir.join("q.safetensors");
    let o = peft(&[&"quantize", &"--base", &base, &"--out", &out, &"--format", &"q4_0"]);
    let msg = stderr(&o);
    assert!(!o.status.success() && msg.contains("layers.1.q_proj.weight") && msg.contains("element 32"), "{msg}");
    assert!(msg.contains("beyond what its format stores"), "{msg}");
    assert!(!msg.contains("allow-nonfinite") && !msg.contains("non-finite") && !msg.contains("NaN"), "{msg}");
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 27, class 11: a header listing more than `MAX_TENSORS` (2^18)
/// tensors (here 2^18 + 1 empty ones, 16 MB of header) is refused, naming
/// the file and the limit, before every entry is held (1.3M entries took
/// `quantize` and `merge` to 1.93 GB).
#[test]
fn a_header_of_too_many_tensors_is_refused() {
    use peft_faer::hf::st::MAX_TENSORS;
    let dir = scratch("many-tensors");
    std::fs::create_dir_all(&dir).unwrap();
    let mut header = String::from("{");
    for i in 0..=MAX_TENSORS {
        header.push_str(&format!(r#""t{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}},"#));
    }
    header.pop();
    header.push('}');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    let base = dir.join("many.safetensors");
    std::fs::write(&base, &bytes).unwrap();
    let out = dir.join("q.safetensors");
    let o = peft(&[&"quantize", &"--base", &base, &"--out", &out, &"--format", &"int8"]);
    let msg = stderr(&o);
    assert!(!o.status.success() && msg.contains("many.safetensors") && msg.contains("262144 tensors"), "{msg}");
    assert!(!out.exists());
    std::fs::remove_dir_all(&dir).ok();
}
