//! LoRA against tensors written by Hugging Face PEFT 0.21.2 and torch
//! autograd (`tests/fixtures/peft/lora_qv`, see its README): an independent
//! implementation is the oracle for the forward pass, every gradient, the
//! merged weights and a two-layer model.
use peft_core::method::{LinearAdapter, MergeTarget, WeightUpdate};
use std::collections::HashMap;
use std::path::PathBuf;

use peft_core::lora::{Lora, LoraConfig, LoraGrads};
use peft_core::{Backend, Reference};
use peft_core::{Dense, FrozenLinear, MatMut, MatRef};
use safetensors::{Dtype, SafeTensors};

const MODULES: [&str; 4] = ["layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"];

/// Every f32 tensor of a safetensors file, by name, with its shape.
fn load(name: &str) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let path = fixture_dir().join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            assert_eq!(v.dtype(), Dtype::F32, "{k}");
            let data = v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            (k, (v.shape().to_vec(), data))
        })
        .collect()
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft/lora_qv")
}

/// `r` and `lora_alpha` from `adapter_config.json`.
fn config() -> (usize, f64) {
    let text = std::fs::read_to_string(fixture_dir().join("adapter_config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["use_rslora"], false);
    (v["r"].as_u64().unwrap() as usize, v["lora_alpha"].as_f64().unwrap())
}

/// max |got - want| / max |want|.
fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    got.iter().zip(want).fold(0.0f64, |m, (g, w)| m.max((*g as f64 - *w as f64).abs())) / scale
}

const TOL: f64 = 1e-5;

struct Fixture {
    base: HashMap<String, (Vec<usize>, Vec<f32>)>,
    adapter: HashMap<String, (Vec<usize>, Vec<f32>)>,
    refs: HashMap<String, (Vec<usize>, Vec<f32>)>,
    rank: usize,
    alpha: f64,
}

impl Fixture {
    fn new() -> Self {
        let (rank, alpha) = config();
        Self {
            base: load("base.safetensors"),
            adapter: load("adapter_model.safetensors"),
            refs: load("ref.safetensors"),
            rank,
            alpha,
        }
    }

    /// `(W, bias, A, B, in, out)` of module `k`, copied.
    #[allow(clippy::type_complexity)]
    fn module(&self, k: &str) -> (Vec<f32>, Option<Vec<f32>>, Vec<f32>, Vec<f32>, usize, usize) {
        let (shape, w) = &self.base[&format!("{k}.weight")];
        let bias = self.base.get(&format!("{k}.bias")).map(|(_, b)| b.clone());
        let a = &self.adapter[&format!("base_model.model.{k}.lora_A.weight")];
        let b = &self.adapter[&format!("base_model.model.{k}.lora_B.weight")];
        assert_eq!(a.0, vec![self.rank, shape[1]]);
        assert_eq!(b.0, vec![shape[0], self.rank]);
        (w.clone(), bias, a.1.clone(), b.1.clone(), shape[1], shape[0])
    }
}

/// Forward and every gradient of each adapted module, through `backend`.
pub fn check_modules<B: Backend<f32, Error = peft_core::Error>>(backend: &B) {
    let fx = Fixture::new();
    assert_eq!((fx.rank, fx.alpha), (4, 8.0));
    let cfg = LoraConfig::new(fx.rank, fx.alpha);
    for k in MODULES {
        let (w, bias, a, b, n_in, n_out) = fx.module(k);
        let base = Dense::new(&w, n_out, n_in).unwrap();
        let base = match &bias {
            Some(bias) => base.with_bias(bias).unwrap(),
            None => base,
        };
        let layer = Lora::new(&cfg, n_in, n_out, &a[..], &b[..]).unwrap();
        assert_eq!(layer.scale(), 2.0);
        let (xs, x) = &fx.refs[&format!("x_{k}")];
        let t = xs[0];
        let xv = MatRef::new(x, t, n_in).unwrap();

        let mut y = vec![0.0f32; t * n_out];
        let mut scratch = vec![0.0f32; layer.backward_scratch_len(t)];
        layer.forward(backend, &base, xv, MatMut::new(&mut y, t, n_out).unwrap(), &mut scratch).unwrap();
        let e = rel_err(&y, &fx.refs[&format!("y_{k}")].1);
        assert!(e < TOL, "{k}: y rel err {e}");

        let g = &fx.refs[&format!("g_{k}")].1;
        let (mut gx, mut ga, mut gb) =
            (vec![0.0f32; t * n_in], vec![0.0f32; fx.rank * n_in], vec![0.0f32; n_out * fx.rank]);
        layer
            .backward(
                backend,
                &base,
                xv,
                MatRef::new(g, t, n_out).unwrap(),
                Some(MatMut::new(&mut gx, t, n_in).unwrap()),
                LoraGrads::new(&mut ga, &mut gb),
                &mut scratch,
            )
            .unwrap();
        for (name, got) in [("gx", &gx), ("gA", &ga), ("gB", &gb)] {
            let e = rel_err(got, &fx.refs[&format!("{name}_{k}")].1);
            assert!(e < TOL, "{k}: {name} rel err {e}");
        }
    }
}

/// Merged weights and the two-layer model
/// `h = o_proj(v_proj(h)) + q_proj(h) + k_proj(h)`, unmerged and merged.
pub fn check_model<B: Backend<f32, Error = peft_core::Error>>(backend: &B) {
    let fx = Fixture::new();
    let cfg = LoraConfig::new(fx.rank, fx.alpha);
    let (xs, x) = &fx.refs["x"];
    let t = xs[0];
    for merge in [false, true] {
        let mut h = x.clone();
        for layer_idx in 0..2 {
            let lin = |name: &str, input: &[f32]| -> Vec<f32> {
                let full = format!("layers.{layer_idx}.{name}");
                let (mut w, bias, a, b, n_in, n_out) = if cfg.targets(&full) {
                    fx.module(&full)
                } else {
                    let (shape, w) = &fx.base[&format!("{full}.weight")];
                    // An untargeted module is a plain linear layer: run it as
                    // a LoRA layer with B = 0, which is exactly the base.
                    let (n_out, n_in) = (shape[0], shape[1]);
                    (w.clone(), None, vec![0.0; fx.rank * n_in], vec![0.0; n_out * fx.rank], n_in, n_out)
                };
                let layer = Lora::new(&cfg, n_in, n_out, &a[..], &b[..]).unwrap();
                let (x, mut y) = (MatRef::new(input, t, n_in).unwrap(), vec![0.0f32; t * n_out]);
                if merge {
                    let merged = layer.merge_into(backend, MergeTarget::new(&mut w), &mut []).unwrap();
                    if cfg.targets(&full) {
                        let want = &fx.refs[&format!("merged.{full}.weight")].1;
                        let e = rel_err(merged.weight(), want);
                        assert!(e < 1e-6, "{full}: merged W rel err {e}");
                    }
                    let base = merged.base();
                    let base = match &bias {
                        Some(bias) => base.with_bias(bias).unwrap(),
                        None => base,
                    };
                    base.forward(backend, x, MatMut::new(&mut y, t, n_out).unwrap()).unwrap();
                } else {
                    let base = Dense::new(&w, n_out, n_in).unwrap();
                    let base = match &bias {
                        Some(bias) => base.with_bias(bias).unwrap(),
                        None => base,
                    };
                    let mut scratch = vec![0.0f32; layer.forward_scratch_len(t)];
                    layer.forward(backend, &base, x, MatMut::new(&mut y, t, n_out).unwrap(), &mut scratch).unwrap();
                }
                y
            };
            let v = lin("v_proj", &h);
            let o = lin("o_proj", &v);
            let q = lin("q_proj", &h);
            let kk = lin("k_proj", &h);
            h = o.iter().zip(&q).zip(&kk).map(|((o, q), k)| o + q + k).collect();
        }
        let want = &fx.refs[if merge { "ym_model" } else { "y_model" }].1;
        let e = rel_err(&h, want);
        assert!(e < TOL, "model (merged: {merge}) rel err {e}");
    }
}

#[test]
fn reference_backend_reproduces_peft_modules() {
    check_modules(&Reference);
}

#[test]
fn reference_backend_reproduces_peft_model_and_merge() {
    check_model(&Reference);
}

#[test]
fn faer_backend_reproduces_peft_modules() {
    check_modules(&peft_faer::Faer::new());
    check_modules(&peft_faer::Faer::with_threads(2));
}

#[test]
fn faer_backend_reproduces_peft_model_and_merge() {
    check_model(&peft_faer::Faer::new());
}
