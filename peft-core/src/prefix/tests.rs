//! Prefix tuning tests.

extern crate std;
use std::vec;
use std::vec::Vec;

use super::*;
use crate::attention::backward;
use crate::attention::forward;
use crate::attention::{AttentionGrads, Mask, backward_scratch_len, forward_scratch_len};
use crate::backend::Reference;

#[test]
fn layer_views_follow_peft_interleaved_layout() {
    // 2 layers, kv width 2 (1 kv head of size 2), 2 prefix tokens: a row is
    // [K0 K0 V0 V0 K1 K1 V1 V1]. Value at (row, col) = 10 row + col.
    let shape = AttentionShape::new(2, 1, 2).unwrap();
    let cfg = PrefixConfig::new(2, 2, &shape).unwrap();
    assert_eq!(cfg.row_width(), 8);
    let mut kv: Vec<f32> = (0..16).map(|i| (10 * (i / 8) + i % 8) as f32).collect();
    let pt = PrefixTuning::new(cfg, &mut kv).unwrap();
    let l1 = pt.layer(1).unwrap();
    assert_eq!(l1.keys.row(0), &[4.0, 5.0]);
    assert_eq!(l1.values.row(1), &[16.0, 17.0]);
    assert_eq!(
        pt.layer(2).unwrap_err(),
        Error::InvalidParameter { name: "layer index", rule: "must be below n_layers" }
    );
    let mut g = vec![0.0f32; 16];
    let mut lg = cfg.layer_grads(&mut g, 1).unwrap();
    lg.kv.row_mut(1).copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
    assert_eq!(&g[8..], &[0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn config_errors() {
    let shape = AttentionShape::new(2, 2, 2).unwrap();
    assert_eq!(
        PrefixConfig::new(0, 2, &shape).unwrap_err(),
        Error::InvalidParameter { name: "n_prefix", rule: "must be positive" }
    );
    assert_eq!(
        PrefixConfig::new(2, 0, &shape).unwrap_err(),
        Error::InvalidParameter { name: "n_layers", rule: "must be positive" }
    );
    let cfg = PrefixConfig::new(2, 1, &shape).unwrap();
    let mut kv = vec![0.0f32; 15];
    assert_eq!(
        PrefixTuning::new(cfg, &mut kv).unwrap_err(),
        Error::ShapeMismatch { operand: Operand::Prefix, expected: 16, found: 15 }
    );
}

struct Enc {
    emb: Vec<f64>,
    w1: Vec<f64>,
    b1: Vec<f64>,
    w2: Vec<f64>,
    b2: Vec<f64>,
}

impl Enc {
    fn zeros(cfg: &PrefixConfig, d: usize, h: usize) -> Self {
        let o = cfg.row_width();
        Self {
            emb: vec![0.0; cfg.n_prefix() * d],
            w1: vec![0.0; h * d],
            b1: vec![0.0; h],
            w2: vec![0.0; o * h],
            b2: vec![0.0; o],
        }
    }
    fn params(&mut self) -> EncoderParams<'_, f64> {
        EncoderParams {
            embedding: &mut self.emb,
            w1: &mut self.w1,
            b1: &mut self.b1,
            w2: &mut self.w2,
            b2: &mut self.b2,
        }
    }
    fn slot(&mut self, i: usize) -> &mut Vec<f64> {
        match i {
            0 => &mut self.emb,
            1 => &mut self.w1,
            2 => &mut self.b1,
            3 => &mut self.w2,
            _ => &mut self.b2,
        }
    }
}

/// Layer `layer` of a 2-layer prefix computed by the encoder, then
/// attention with a causal mask; loss = sum(O * g).
fn end_to_end(
    enc: &mut Enc,
    cfg: &PrefixConfig,
    d: usize,
    h: usize,
    shape: &AttentionShape,
    qkv: &[Vec<f64>; 3],
    g: &[f64],
) -> f64 {
    let e = PrefixEncoder::new(*cfg, d, h, enc.params()).unwrap();
    let mut kv = vec![0.0; cfg.len()];
    let mut s = vec![0.0; e.forward_scratch_len()];
    e.forward(&Reference, &mut kv, &mut s).unwrap();
    let pt = PrefixTuning::new(*cfg, &mut kv).unwrap();
    let prefix = pt.layer(1).unwrap();
    let (tq, qw, kw) = (3, shape.q_width(), shape.kv_width());
    let mut out = vec![0.0; tq * qw];
    let mut s = vec![0.0; forward_scratch_len(tq, tq, cfg.n_prefix())];
    forward(
        &Reference,
        shape,
        MatRef::new(&qkv[0], tq, qw).unwrap(),
        MatRef::new(&qkv[1], tq, kw).unwrap(),
        MatRef::new(&qkv[2], tq, kw).unwrap(),
        Some(&prefix),
        &Mask::causal(),
        MatMut::new(&mut out, tq, qw).unwrap(),
        &mut s,
    )
    .unwrap();
    out.iter().zip(g).map(|(a, b)| a * b).sum()
}

#[test]
fn reparameterized_prefix_gradients_match_finite_differences_through_attention() {
    let mut rng = Rng::new(77);
    let shape = AttentionShape::new(4, 2, 2).unwrap(); // GQA
    let cfg = PrefixConfig::new(2, 2, &shape).unwrap();
    let (d, hid, tq) = (3, 5, 3);
    let mut enc = Enc::zeros(&cfg, d, hid);
    PrefixEncoder::new(cfg, d, hid, enc.params()).unwrap().init(&mut rng);
    let mut r = |n: usize| (0..n).map(|_| rng.uniform_range(-1.0, 1.0)).collect::<Vec<f64>>();
    let qkv = [r(tq * 8), r(tq * 4), r(tq * 4)];
    let g = r(tq * 8);

    // Analytic: attention backward into layer 1's block of dL/dkv, then the
    // encoder backward.
    let mut kv = vec![0.0; cfg.len()];
    let mut grad_kv = vec![0.0; cfg.len()];
    let mut genc = Enc::zeros(&cfg, d, hid);
    {
        let e = PrefixEncoder::new(cfg, d, hid, enc.params()).unwrap();
        let mut s = vec![0.0; e.backward_scratch_len()];
        e.forward(&Reference, &mut kv, &mut s).unwrap();
        let pt = PrefixTuning::new(cfg, &mut kv).unwrap();
        let prefix = pt.layer(1).unwrap();
        let (mut dq, mut dk, mut dv) = (vec![0.0; tq * 8], vec![0.0; tq * 4], vec![0.0; tq * 4]);
        let grads = AttentionGrads {
            q: MatMut::new(&mut dq, tq, 8).unwrap(),
            k: MatMut::new(&mut dk, tq, 4).unwrap(),
            v: MatMut::new(&mut dv, tq, 4).unwrap(),
            prefix: Some(cfg.layer_grads(&mut grad_kv, 1).unwrap()),
        };
        let mut sa = vec![0.0; backward_scratch_len(tq, tq, 2)];
        backward(
            &Reference,
            &shape,
            MatRef::new(&qkv[0], tq, 8).unwrap(),
            MatRef::new(&qkv[1], tq, 4).unwrap(),
            MatRef::new(&qkv[2], tq, 4).unwrap(),
            Some(&prefix),
            &Mask::causal(),
            MatRef::new(&g, tq, 8).unwrap(),
            grads,
            &mut sa,
        )
        .unwrap();
        // Layer 0 gets no gradient from layer 1's attention.
        assert!(grad_kv.chunks(16).all(|row| row[..8].iter().all(|&v| v == 0.0)));
        e.backward(&Reference, &grad_kv, genc.params(), &mut s).unwrap();
    }
    let h = 1e-6;
    for which in 0..5 {
        let n = enc.slot(which).len();
        for idx in 0..n {
            let orig = enc.slot(which)[idx];
            enc.slot(which)[idx] = orig + h;
            let up = end_to_end(&mut enc, &cfg, d, hid, &shape, &qkv, &g);
            enc.slot(which)[idx] = orig - h;
            let down = end_to_end(&mut enc, &cfg, d, hid, &shape, &qkv, &g);
            enc.slot(which)[idx] = orig;
            let fd = (up - down) / (2.0 * h);
            let want = genc.slot(which)[idx];
            assert!((fd - want).abs() <= 1e-6 * want.abs().max(1.0), "param {which} idx {idx}: fd {fd} vs {want}");
        }
    }
}

#[test]
fn encoder_errors_write_nothing() {
    let shape = AttentionShape::new(1, 1, 2).unwrap();
    let cfg = PrefixConfig::new(1, 1, &shape).unwrap();
    let mut enc = Enc::zeros(&cfg, 2, 3);
    assert_eq!(
        PrefixEncoder::new(cfg, 2, 0, enc.params()).unwrap_err(),
        Error::InvalidParameter { name: "encoder hidden size", rule: "must be positive" }
    );
    let e = PrefixEncoder::new(cfg, 2, 3, enc.params()).unwrap();
    let mut kv = vec![7.0; 4];
    assert_eq!(e.forward(&Reference, &mut kv, &mut [0.0; 2]), Err(Error::ScratchTooSmall { needed: 3, len: 2 }));
    assert_eq!(kv, vec![7.0; 4]);
}
