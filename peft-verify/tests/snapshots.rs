//! insta snapshots, rounded so they hold across platforms: trainable
//! parameter counts of each method on standard model shapes, and
//! fixed-seed output summaries of each method (an unintended numeric change
//! shows up in review as a snapshot diff).
//!
//! Independent anchors: LLaMA-7B has 6,738,415,616 parameters, and PEFT's
//! `print_trainable_parameters` reports 4,194,304 trainable (0.0622%) for
//! LoRA r=8 on q_proj and v_proj (its README's example output).

use peft_core::activation::Activation;
use peft_core::adapter::{AdapterConfig, AdapterParams, BottleneckAdapter};
use peft_core::attention::forward;
use peft_core::attention::{AttentionShape, Mask};
use peft_core::lora::{Lora, LoraConfig, ParamReport};
use peft_core::method::LinearAdapter;
use peft_core::prefix::{PrefixConfig, PrefixTuning};
use peft_core::prompt::PromptTuning;
use peft_core::{Dense, MatMut, MatRef, Reference, Rng};

struct Model {
    name: &'static str,
    vocab: usize,
    d: usize,
    layers: usize,
    ffn: usize,
    heads: usize,
    kv_heads: usize,
}

impl Model {
    fn kv_width(&self) -> usize {
        self.d / self.heads * self.kv_heads
    }

    /// LLaMA architecture: embeddings and an untied head, per layer q, k,
    /// v, o, gate, up, down and two RMSNorms, a final norm.
    fn params(&self) -> usize {
        let (d, kv) = (self.d, self.kv_width());
        let layer = 2 * d * d + 2 * d * kv + 3 * d * self.ffn + 2 * d;
        2 * self.vocab * d + self.layers * layer + d
    }

    /// `(in, out)` of q, k, v, o.
    fn projections(&self) -> [(usize, usize); 4] {
        let (d, kv) = (self.d, self.kv_width());
        [(d, d), (d, kv), (d, kv), (d, d)]
    }
}

const MODELS: [Model; 4] = [
    Model { name: "TinyLlama-1.1B", vocab: 32000, d: 2048, layers: 22, ffn: 5632, heads: 32, kv_heads: 4 },
    Model { name: "LLaMA-7B", vocab: 32000, d: 4096, layers: 32, ffn: 11008, heads: 32, kv_heads: 32 },
    Model { name: "Mistral-7B", vocab: 32000, d: 4096, layers: 32, ffn: 14336, heads: 32, kv_heads: 8 },
    Model { name: "LLaMA-2-13B", vocab: 32000, d: 5120, layers: 40, ffn: 13824, heads: 40, kv_heads: 40 },
];

fn lora(m: &Model, r: usize, targets: &[usize]) -> usize {
    let per_layer = targets
        .iter()
        .map(|&t| {
            let (i, o) = m.projections()[t];
            ParamReport::for_layer(i, o, r, false).unwrap().trainable
        })
        .sum::<usize>();
    per_layer * m.layers
}

#[test]
fn parameter_counts() {
    assert_eq!(MODELS[1].params(), 6_738_415_616);
    assert_eq!(lora(&MODELS[1], 8, &[0, 2]), 4_194_304);
    let mut table = String::from("model            method                       trainable   % of base\n");
    for m in &MODELS {
        let shape = AttentionShape::new(m.heads, m.kv_heads, m.d / m.heads).unwrap();
        let width = AdapterConfig::reduction(16).bottleneck(m.d).unwrap();
        let rows = [
            ("LoRA r=8 q,v", lora(m, 8, &[0, 2])),
            ("LoRA r=16 q,k,v,o", lora(m, 16, &[0, 1, 2, 3])),
            ("prompt tuning 20 tokens", 20 * m.d),
            ("prefix tuning 30 tokens", PrefixConfig::new(30, m.layers, &shape).unwrap().len()),
            ("adapters d/16, 2 per layer", m.layers * 2 * (2 * m.d * width + width + m.d)),
        ];
        for (method, n) in rows {
            table +=
                &format!("{:<16} {:<26} {:>12} {:>10.4}%\n", m.name, method, n, 100.0 * n as f64 / m.params() as f64);
        }
        table += &format!("{:<16} {:<26} {:>12}\n", m.name, "(base)", m.params());
    }
    insta::assert_snapshot!("parameter_counts", table);
}

/// `n, mean, rms, min, max`, to 6 significant digits.
fn summary(name: &str, v: &[f32]) -> String {
    let n = v.len() as f64;
    let mean = v.iter().map(|x| f64::from(*x)).sum::<f64>() / n;
    let rms = (v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>() / n).sqrt();
    let min = v.iter().cloned().fold(f32::INFINITY, f32::min);
    let max = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    format!("{name:<18} n={:<4} mean={mean:+.5e} rms={rms:.5e} min={min:+.5e} max={max:+.5e}\n", v.len())
}

#[test]
fn fixed_seed_outputs() {
    let mut rng = Rng::new(7);
    let mut out = String::new();
    let (t, n_in, n_out, r) = (4, 16, 12, 4);
    let normal = |rng: &mut Rng, n: usize, s: f64| {
        let mut v = vec![0.0f32; n];
        rng.fill_normal(&mut v, s);
        v
    };
    let x = normal(&mut rng, t * n_in, 1.0);
    let w = normal(&mut rng, n_out * n_in, 0.25);
    let base = Dense::new(&w, n_out, n_in).unwrap();
    let (mut a, mut b) = (vec![0.0f32; r * n_in], vec![0.0f32; n_out * r]);
    let cfg = LoraConfig::new(r, 8.0);
    let mut layer = Lora::new(&cfg, n_in, n_out, &mut a[..], &mut b[..]).unwrap();
    layer.init_adapter(&mut rng);
    rng.fill_normal(layer.adapter_mut().1, 0.1);
    let mut y = vec![0.0f32; t * n_out];
    let mut scratch = vec![0.0f32; t * r];
    let (xv, yv) = (MatRef::new(&x, t, n_in).unwrap(), MatMut::new(&mut y, t, n_out).unwrap());
    layer.forward(&Reference, &base, xv, yv, &mut scratch).unwrap();
    out += &summary("lora_forward", &y);

    let (mut wd, mut bd, mut wu, mut bu) =
        (vec![0.0f32; 4 * n_in], vec![0.0f32; 4], vec![0.0f32; n_in * 4], vec![0.0f32; n_in]);
    let acfg = AdapterConfig::width(4).with_activation(Activation::GeluTanh);
    let mut ad = BottleneckAdapter::new(
        &acfg,
        n_in,
        AdapterParams { w_down: &mut wd, b_down: &mut bd, w_up: &mut wu, b_up: &mut bu },
    )
    .unwrap();
    ad.init(&mut rng);
    rng.fill_normal(ad.params_mut().w_up, 0.1);
    let mut h = vec![0.0f32; t * n_in];
    let mut s2 = vec![0.0f32; t * 4];
    ad.forward(&Reference, MatRef::new(&x, t, n_in).unwrap(), MatMut::new(&mut h, t, n_in).unwrap(), &mut s2).unwrap();
    out += &summary("adapter_forward", &h);

    let mut prompt = vec![0.0f32; 3 * n_in];
    let mut pt = PromptTuning::new(&mut prompt, 3, n_in).unwrap();
    pt.init_normal(&mut rng);
    let mut ext = vec![0.0f32; (t + 3) * n_in];
    pt.prepend(&x, 1, t, &mut ext).unwrap();
    out += &summary("prompt_prepend", &ext);

    let shape = AttentionShape::new(4, 2, 4).unwrap();
    let pc = PrefixConfig::new(3, 1, &shape).unwrap();
    let mut kv = vec![0.0f32; pc.len()];
    let mut pre = PrefixTuning::new(pc, &mut kv).unwrap();
    pre.init_normal(&mut rng);
    let q = normal(&mut rng, t * 16, 1.0);
    let k = normal(&mut rng, t * 8, 1.0);
    let v = normal(&mut rng, t * 8, 1.0);
    let mut o = vec![0.0f32; t * 16];
    let mut s3 = vec![0.0f32; t * (t + 3)];
    let prefix = pre.layer(0).unwrap();
    let (qm, km, vm) =
        (MatRef::new(&q, t, 16).unwrap(), MatRef::new(&k, t, 8).unwrap(), MatRef::new(&v, t, 8).unwrap());
    forward(
        &Reference,
        &shape,
        qm,
        km,
        vm,
        Some(&prefix),
        &Mask::causal(),
        MatMut::new(&mut o, t, 16).unwrap(),
        &mut s3,
    )
    .unwrap();
    out += &summary("prefix_attention", &o);
    insta::assert_snapshot!("fixed_seed_outputs", out);
}
