//! Bottleneck adapter tests.

extern crate std;
use std::vec;
use std::vec::Vec;

use super::*;
use crate::backend::Reference;
use crate::error::{Error, Operand};
use crate::matrix::{MatMut, MatRef};

struct Owned {
    wd: Vec<f64>,
    bd: Vec<f64>,
    wu: Vec<f64>,
    bu: Vec<f64>,
}

impl Owned {
    fn random(rng: &mut Rng, d: usize, m: usize) -> Self {
        let mut r = |n: usize| (0..n).map(|_| rng.uniform_range(-1.0, 1.0)).collect::<Vec<f64>>();
        Self { wd: r(m * d), bd: r(m), wu: r(d * m), bu: r(d) }
    }
    fn adapter(&mut self, cfg: &AdapterConfig, d: usize) -> BottleneckAdapter<f64, &mut Vec<f64>> {
        let params =
            AdapterParams { w_down: &mut self.wd, b_down: &mut self.bd, w_up: &mut self.wu, b_up: &mut self.bu };
        BottleneckAdapter::new(cfg, d, params).unwrap()
    }
}

fn forward<S: AsRef<[f64]>>(ad: &BottleneckAdapter<f64, S>, x: &[f64], t: usize) -> Vec<f64> {
    let d = ad.dim();
    let mut h = vec![f64::NAN; t * d];
    let mut s = vec![0.0; ad.forward_scratch_len(t)];
    ad.forward(&Reference, MatRef::new(x, t, d).unwrap(), MatMut::new(&mut h, t, d).unwrap(), &mut s).unwrap();
    h
}

#[test]
fn width_from_reduction_factor() {
    assert_eq!(AdapterConfig::reduction(16).bottleneck(768), Ok(48));
    assert_eq!(AdapterConfig::width(7).bottleneck(768), Ok(7));
    for bad in [AdapterConfig::reduction(0), AdapterConfig::reduction(1000), AdapterConfig::width(0)] {
        assert_eq!(
            bad.bottleneck(768),
            Err(Error::InvalidParameter {
                name: "bottleneck width",
                rule: "must be positive (a zero reduction factor, or one above the model width, gives 0)"
            })
        );
    }
}

#[test]
fn mistake8_fresh_adapter_is_identity_bit_for_bit() {
    let mut rng = Rng::new(3);
    let (d, t) = (12, 5);
    for init in [AdapterInit::KaimingUniform, AdapterInit::Bert] {
        for act in [Activation::Relu, Activation::GeluErf, Activation::GeluTanh, Activation::Silu] {
            let cfg = AdapterConfig::reduction(4).with_activation(act).with_init(init).with_scale(2.0);
            let mut o = Owned::random(&mut rng, d, 3);
            let mut ad = o.adapter(&cfg, d);
            ad.init(&mut rng);
            let mut x: Vec<f64> = (0..t * d).map(|_| rng.uniform_range(-3.0, 3.0)).collect();
            x[0] = -0.0;
            let h = forward(&ad, &x, t);
            // Without the residual a fresh adapter would output zeros.
            assert!(h.iter().zip(&x).all(|(a, b)| a.to_bits() == b.to_bits()), "{init:?} {act:?}");
            let (wd, _, _, _) = ad.params();
            assert!(wd.iter().any(|&v| v != 0.0));
        }
    }
}

#[test]
fn mistake8_hand_computed_output_includes_residual() {
    // d = 2, m = 1, ReLU, scale 0.5. W_down = [1, -1], b_down = 0.5,
    // W_up = [2, 4]^T, b_up = [1, 0]. x = [3, 1]:
    // z = 3 - 1 + 0.5 = 2.5, a = 2.5, branch = a W_up^T + b_up = [6, 10],
    // h = x + 0.5 * branch = [6, 6]. Without the residual: [3, 5].
    let (wd, bd, wu, bu) = ([1.0, -1.0], [0.5], [2.0, 4.0], [1.0, 0.0]);
    let cfg = AdapterConfig::width(1).with_scale(0.5);
    // A read-only adapter (as from flash): `&[f64]` storage.
    let ad = BottleneckAdapter::new(
        &cfg,
        2,
        AdapterParams { w_down: &wd[..], b_down: &bd[..], w_up: &wu[..], b_up: &bu[..] },
    )
    .unwrap();
    assert_eq!(forward(&ad, &[3.0, 1.0], 1), vec![6.0, 6.0]);
    // x = [-3, 1]: z = -3.5, ReLU gives 0, h = x + 0.5 * b_up = [-2.5, 1].
    assert_eq!(forward(&ad, &[-3.0, 1.0], 1), vec![-2.5, 1.0]);
}

#[test]
fn gradients_match_central_finite_differences() {
    let mut rng = Rng::new(8);
    let (d, m, t) = (6, 3, 4);
    for act in [Activation::Relu, Activation::GeluErf, Activation::GeluTanh, Activation::Silu] {
        let cfg = AdapterConfig::width(m).with_activation(act).with_scale(0.7);
        let mut o = Owned::random(&mut rng, d, m);
        let mut x: Vec<f64> = (0..t * d).map(|_| rng.uniform_range(-1.0, 1.0)).collect();
        let g: Vec<f64> = (0..t * d).map(|_| rng.uniform_range(-1.0, 1.0)).collect();
        let (mut gwd, mut gbd, mut gwu, mut gbu, mut gx) =
            (vec![0.0; m * d], vec![0.0; m], vec![0.0; d * m], vec![0.0; d], vec![0.0; t * d]);
        {
            let ad = o.adapter(&cfg, d);
            let mut s = vec![0.0; ad.backward_scratch_len(t)];
            let grads = AdapterGrads { w_down: &mut gwd, b_down: &mut gbd, w_up: &mut gwu, b_up: &mut gbu };
            ad.backward(
                &Reference,
                MatRef::new(&x, t, d).unwrap(),
                MatRef::new(&g, t, d).unwrap(),
                Some(MatMut::new(&mut gx, t, d).unwrap()),
                grads,
                &mut s,
            )
            .unwrap();
        }
        let loss = |o: &mut Owned, x: &[f64]| -> f64 {
            let ad = o.adapter(&cfg, d);
            forward(&ad, x, t).iter().zip(&g).map(|(a, b)| a * b).sum()
        };
        let h = 1e-6;
        let check = |numeric: f64, analytic: f64, what: &str| {
            let rel = (numeric - analytic).abs() / analytic.abs().max(1.0);
            assert!(rel < 1e-6, "{act:?} {what}: fd {numeric} vs {analytic}");
        };
        for (p, analytic) in [(0usize, gwd.clone()), (1, gbd.clone()), (2, gwu.clone()), (3, gbu.clone())] {
            for (idx, &want) in analytic.iter().enumerate() {
                let orig = slot(&mut o, p)[idx];
                slot(&mut o, p)[idx] = orig + h;
                let up = loss(&mut o, &x);
                slot(&mut o, p)[idx] = orig - h;
                let down = loss(&mut o, &x);
                slot(&mut o, p)[idx] = orig;
                check((up - down) / (2.0 * h), want, "param");
            }
        }
        for idx in 0..x.len() {
            let orig = x[idx];
            x[idx] = orig + h;
            let up = loss(&mut o, &x);
            x[idx] = orig - h;
            let down = loss(&mut o, &x);
            x[idx] = orig;
            check((up - down) / (2.0 * h), gx[idx], "dx");
        }
    }
}

fn slot(o: &mut Owned, p: usize) -> &mut Vec<f64> {
    match p {
        0 => &mut o.wd,
        1 => &mut o.bd,
        2 => &mut o.wu,
        _ => &mut o.bu,
    }
}

#[test]
fn errors_leave_outputs_unchanged() {
    let mut rng = Rng::new(1);
    let (d, m, t) = (4, 2, 3);
    let mut o = Owned::random(&mut rng, d, m);
    let ad = o.adapter(&AdapterConfig::width(m), d);
    let x = vec![1.0; t * (d + 1)];
    let sentinel = 4.5;
    let mut h = vec![sentinel; t * d];
    let mut s = vec![0.0; 100];
    let wide = MatRef::new(&x, t, d + 1).unwrap();
    let err = ad.forward(&Reference, wide, MatMut::new(&mut h, t, d).unwrap(), &mut s).unwrap_err();
    assert_eq!(err, Error::ShapeMismatch { operand: Operand::Input, expected: d, found: d + 1 });
    let good = MatRef::new(&x[..t * d], t, d).unwrap();
    let err = ad.forward(&Reference, good, MatMut::new(&mut h[..(t - 1) * d], t - 1, d).unwrap(), &mut s).unwrap_err();
    assert_eq!(err, Error::ShapeMismatch { operand: Operand::Output, expected: t, found: t - 1 });
    let err = ad.forward(&Reference, good, MatMut::new(&mut h, t, d).unwrap(), &mut s[..t * m - 1]).unwrap_err();
    assert_eq!(err, Error::ScratchTooSmall { needed: t * m, len: t * m - 1 });
    assert!(h.iter().all(|&v| v == sentinel));

    let (mut gwd, mut gbd, mut gwu, mut gbu, mut gx) =
        (vec![sentinel; m * d], vec![sentinel; m], vec![sentinel; d * m], vec![sentinel; d + 1], vec![sentinel; t * d]);
    let err = ad
        .backward(
            &Reference,
            good,
            good,
            Some(MatMut::new(&mut gx, t, d).unwrap()),
            AdapterGrads { w_down: &mut gwd, b_down: &mut gbd, w_up: &mut gwu, b_up: &mut gbu },
            &mut s,
        )
        .unwrap_err();
    assert_eq!(err, Error::ShapeMismatch { operand: Operand::AdapterBias, expected: d, found: d + 1 });
    assert!(gwd.iter().chain(&gbd).chain(&gwu).chain(&gbu).chain(&gx).all(|&v| v == sentinel));

    let (mut wd, mut bd, mut wu, mut bu) = (vec![0.0; 8], vec![0.0; 2], vec![0.0; 7], vec![0.0; 4]);
    let err = BottleneckAdapter::new(
        &AdapterConfig::width(2),
        4,
        AdapterParams { w_down: &mut wd, b_down: &mut bd, w_up: &mut wu, b_up: &mut bu },
    )
    .unwrap_err();
    assert_eq!(err, Error::ShapeMismatch { operand: Operand::AdapterUp, expected: 8, found: 7 });
    let err = BottleneckAdapter::new(
        &AdapterConfig::width(2).with_scale(f64::NAN),
        4,
        AdapterParams { w_down: &mut wd, b_down: &mut bd, w_up: &mut wu, b_up: &mut bu },
    )
    .unwrap_err();
    assert_eq!(err, Error::InvalidParameter { name: "adapter scale", rule: "must be finite" });
}
