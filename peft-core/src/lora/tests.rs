//! LoRA unit tests, independent of `peft-verify`. Each names the mistake
//! (`peft_verify::mistakes`) it would catch.

extern crate std;
use crate::method::{LinearAdapter, MergeTarget, WeightUpdate};
use std::vec;
use std::vec::Vec;

use super::*;
use crate::backend::{Accum, Backend, Op, Reference};
use crate::base::{Dense, FrozenLinear};
use crate::error::{Error, Operand};
use crate::matrix::{MatMut, MatRef};
use crate::rng::Rng;

/// Owned buffers for one layer.
struct Bufs {
    w: Vec<f64>,
    bias: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
}

fn random(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.uniform_range(-1.0, 1.0)).collect()
}

fn bufs(rng: &mut Rng, n_in: usize, n_out: usize, r: usize) -> Bufs {
    Bufs { w: random(rng, n_out * n_in), bias: random(rng, n_out), a: random(rng, r * n_in), b: random(rng, n_out * r) }
}

/// f64 oracle: `x W^T + b + s (x A^T) B^T` by plain loops.
fn oracle(x: &[f64], t: usize, n_in: usize, n_out: usize, r: usize, bf: &Bufs, s: f64) -> Vec<f64> {
    let mut y = vec![0.0; t * n_out];
    for i in 0..t {
        for j in 0..n_out {
            let mut base = bf.bias[j];
            for l in 0..n_in {
                base += x[i * n_in + l] * bf.w[j * n_in + l];
            }
            let mut low = 0.0;
            for k in 0..r {
                let mut xa = 0.0;
                for l in 0..n_in {
                    xa += x[i * n_in + l] * bf.a[k * n_in + l];
                }
                low += xa * bf.b[j * r + k];
            }
            y[i * n_out + j] = base + s * low;
        }
    }
    y
}

fn forward<S: AsRef<[f64]>>(layer: &Lora<f64, S>, base: &Dense<'_, f64>, x: &[f64], t: usize) -> Vec<f64> {
    let mut y = vec![0.0; t * layer.out_features()];
    let mut scratch = vec![0.0; layer.forward_scratch_len(t)];
    layer
        .forward(
            &Reference,
            base,
            MatRef::new(x, t, layer.in_features()).unwrap(),
            MatMut::new(&mut y, t, layer.out_features()).unwrap(),
            &mut scratch,
        )
        .unwrap();
    y
}

/// [`LinearAdapter::backward`] of `layer` over `base` at `x [t, in]`, `g [t,
/// out]`: accumulates into `ga`, `gb` and writes `gx` when given.
fn backward<S: AsRef<[f64]>>(
    (layer, base): (&Lora<f64, S>, &Dense<'_, f64>),
    (x, g, t): (&[f64], &[f64], usize),
    (ga, gb): (&mut [f64], &mut [f64]),
    gx: Option<&mut [f64]>,
) {
    let (n_in, n_out) = (layer.in_features(), layer.out_features());
    let mut scratch = vec![0.0; layer.backward_scratch_len(t)];
    let (xv, gv) = (MatRef::new(x, t, n_in).unwrap(), MatRef::new(g, t, n_out).unwrap());
    let gx = gx.map(|gx| MatMut::new(gx, t, n_in).unwrap());
    layer.backward(&Reference, base, xv, gv, gx, LoraGrads::new(ga, gb), &mut scratch).unwrap();
}

fn max_rel_err(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
    got.iter().zip(want).fold(0.0f64, |m, (g, w)| m.max((g - w).abs())) / scale
}

#[test]
fn mistake2_fresh_adapter_output_equals_base_exactly() {
    let mut rng = Rng::new(1);
    let (n_in, n_out, r, t) = (13, 9, 4, 5);
    let mut bf = bufs(&mut rng, n_in, n_out, r);
    let x = random(&mut rng, t * n_in);
    // Base output through the same backend: x W^T, then + b.
    let mut base_y = vec![0.0; t * n_out];
    Reference
        .gemm(
            MatMut::new(&mut base_y, t, n_out).unwrap(),
            Accum::Replace,
            MatRef::new(&x, t, n_in).unwrap(),
            Op::N,
            MatRef::new(&bf.w, n_out, n_in).unwrap(),
            Op::T,
            1.0,
        )
        .unwrap();
    for row in base_y.chunks_mut(n_out) {
        for (v, b) in row.iter_mut().zip(&bf.bias) {
            *v += b;
        }
    }
    for init in [LoraInit::KaimingUniform, LoraInit::Gaussian] {
        let cfg = LoraConfig::new(r, 16.0).with_init(init);
        let base = Dense::new(&bf.w, n_out, n_in).unwrap().with_bias(&bf.bias).unwrap();
        let mut layer = Lora::new(&cfg, n_in, n_out, &mut bf.a[..], &mut bf.b[..]).unwrap();
        layer.init_adapter(&mut rng);
        assert!(layer.lora_b().iter().all(|&v| v == 0.0), "B must be zero at init");
        assert!(layer.lora_a().iter().any(|&v| v != 0.0), "A must be random");
        if init == LoraInit::KaimingUniform {
            let bound = 1.0 / (n_in as f64).sqrt();
            assert!(layer.lora_a().iter().all(|v| v.abs() <= bound));
        }
        let y = forward(&layer, &base, &x, t);
        assert_eq!(y, base_y, "{init:?}: fresh LoRA changed the base output");
    }
}

#[test]
fn kaiming_and_gaussian_spread() {
    // Var of U(-c, c) is c^2/3 = 1/(3 in); of N(0, 1/r^2) is 1/r^2.
    let mut rng = Rng::new(3);
    let (n_in, n_out, r) = (400, 400, 10);
    let mut bf = bufs(&mut rng, n_in, n_out, r);
    for (init, var) in [(LoraInit::KaimingUniform, 1.0 / (3.0 * n_in as f64)), (LoraInit::Gaussian, 0.01)] {
        let cfg = LoraConfig::new(r, 1.0).with_init(init);
        let mut layer = Lora::new(&cfg, n_in, n_out, &mut bf.a[..], &mut bf.b[..]).unwrap();
        layer.init_adapter(&mut rng);
        let a = layer.lora_a();
        let got = a.iter().map(|v| v * v).sum::<f64>() / a.len() as f64;
        assert!((got / var - 1.0).abs() < 0.05, "{init:?}: variance {got} vs {var}");
    }
}

#[test]
fn mistake3_scale_applies_to_low_rank_path_only() {
    // Hand calculation: in = out = 2, r = 1, alpha = 4, so s = 4.
    // W = I, b = [0.5, -1], A = [1, 2], B = [1, 0.5]^T, x = [1, 1].
    // x W^T + b = [1.5, 0]; x A^T = 3; s * 3 * B = [12, 6]; y = [13.5, 6].
    // Without the scale: [4.5, 1.5]. Scaling the base too: [16.5, 3].
    let (w, bias, mut a, mut b) = ([1.0, 0.0, 0.0, 1.0], [0.5, -1.0], [1.0, 2.0], [1.0, 0.5]);
    let cfg = LoraConfig::new(1, 4.0);
    let base = Dense::new(&w, 2, 2).unwrap().with_bias(&bias).unwrap();
    let layer = Lora::new(&cfg, 2, 2, &mut a[..], &mut b[..]).unwrap();
    assert_eq!(forward(&layer, &base, &[1.0, 1.0], 1), vec![13.5, 6.0]);

    // rsLoRA, hand calculation: r = 2, alpha = 4, s = 4/sqrt(2) = 2 sqrt(2);
    // W = 0, A = B = I, x = [1, 2]: y = s x = [2 sqrt 2, 4 sqrt 2].
    let (w, mut a, mut b) = ([0.0; 4], [1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]);
    let cfg = LoraConfig::new(2, 4.0).with_rslora(true);
    let base = Dense::new(&w, 2, 2).unwrap();
    let layer = Lora::new(&cfg, 2, 2, &mut a[..], &mut b[..]).unwrap();
    let y = forward(&layer, &base, &[1.0, 2.0], 1);
    let s = 2.0 * core::f64::consts::SQRT_2;
    assert!((y[0] - s).abs() < 1e-15 && (y[1] - 2.0 * s).abs() < 1e-15, "{y:?}");
}

#[test]
fn forward_matches_f64_oracle() {
    let mut rng = Rng::new(5);
    for &(n_in, n_out, r, t) in &[(7, 5, 2, 3), (33, 17, 8, 9), (1, 1, 1, 1), (130, 20, 3, 70)] {
        let mut bf = bufs(&mut rng, n_in, n_out, r);
        let x = random(&mut rng, t * n_in);
        let cfg = LoraConfig::new(r, 3.0);
        let s = cfg.scale().unwrap();
        let want = oracle(&x, t, n_in, n_out, r, &bf, s);
        let bias = bf.bias.clone();
        let base = Dense::new(&bf.w, n_out, n_in).unwrap().with_bias(&bias).unwrap();
        let layer = Lora::new(&cfg, n_in, n_out, &mut bf.a[..], &mut bf.b[..]).unwrap();
        assert!(max_rel_err(&forward(&layer, &base, &x, t), &want) < 1e-13);
    }
}

#[test]
fn mistake6_merged_forward_equals_unmerged_and_is_one_matmul() {
    let mut rng = Rng::new(11);
    let (n_in, n_out, r, t) = (24, 16, 4, 6);
    let mut bf = bufs(&mut rng, n_in, n_out, r);
    let x = random(&mut rng, t * n_in);
    // alpha != r, random non-zero A and B.
    let cfg = LoraConfig::new(r, 7.0);
    let bias = bf.bias.clone();
    let layer = Lora::new(&cfg, n_in, n_out, &mut bf.a[..], &mut bf.b[..]).unwrap();
    let unmerged = forward(&layer, &Dense::new(&bf.w, n_out, n_in).unwrap().with_bias(&bias).unwrap(), &x, t);
    let guard = layer.merge_into(&Reference, MergeTarget::new(&mut bf.w), &mut []).unwrap();
    // The merged layer's one forward is the base's: a single matmul, no
    // scratch for low-rank temporaries.
    let mut merged = vec![0.0; t * n_out];
    guard
        .base()
        .with_bias(&bias)
        .unwrap()
        .forward(&Reference, MatRef::new(&x, t, n_in).unwrap(), MatMut::new(&mut merged, t, n_out).unwrap())
        .unwrap();
    let mut plain = vec![0.0; t * n_out];
    guard.forward(MatRef::new(&x, t, n_in).unwrap(), MatMut::new(&mut plain, t, n_out).unwrap()).unwrap();
    for (row_b, row_p) in merged.chunks(n_out).zip(plain.chunks(n_out)) {
        for ((yb, yp), b) in row_b.iter().zip(row_p).zip(&bias) {
            assert_eq!(*yb, *yp + b, "Merged::forward is x W'^T without a bias");
        }
    }
    // f64, inner lengths <= 24: 1e-13 relative leaves a wide margin over
    // the ~(in + r) eps accumulated error.
    assert!(max_rel_err(&merged, &unmerged) < 1e-13);
}

#[test]
fn merge_guard_restores_on_drop_and_keep_stays_merged() {
    let mut rng = Rng::new(2);
    let mut bf = bufs(&mut rng, 6, 5, 2);
    let orig = bf.w.clone();
    let cfg = LoraConfig::new(2, 4.0);
    let layer = Lora::new(&cfg, 6, 5, &bf.a[..], &bf.b[..]).unwrap();
    // W' = W + s B A, s = 2, by hand loops.
    let want: Vec<f64> = (0..30)
        .map(|idx| {
            let (i, j) = (idx / 6, idx % 6);
            orig[idx] + 2.0 * (0..2).map(|k| bf.b[i * 2 + k] * bf.a[k * 6 + j]).sum::<f64>()
        })
        .collect();
    let mut backup = vec![0.0; 30];
    {
        let guard =
            layer.merge_into(&Reference, MergeTarget::new(&mut bf.w).with_backup(&mut backup), &mut []).unwrap();
        assert!(max_rel_err(guard.weight(), &want) < 1e-15);
    } // dropped: restored from the backup
    assert_eq!(bf.w, orig);
    let kept = layer.merge_into(&Reference, MergeTarget::new(&mut bf.w), &mut []).unwrap().keep();
    assert!(max_rel_err(kept, &want) < 1e-15);
    assert!(max_rel_err(&bf.w, &want) < 1e-15, "keep leaves W merged");
}

#[test]
fn merge_errors_write_nothing() {
    let mut rng = Rng::new(12);
    let mut bf = bufs(&mut rng, 6, 5, 2);
    let orig = bf.w.clone();
    let layer = Lora::new(&LoraConfig::new(2, 4.0), 6, 5, &bf.a[..], &bf.b[..]).unwrap();
    let err = layer.merge_into(&Reference, MergeTarget::new(&mut bf.w[..29]), &mut []).unwrap_err();
    assert_eq!(err, Error::ShapeMismatch { operand: Operand::Weight, expected: 30, found: 29 });
    let mut short = [9.0; 29];
    let err = layer.merge_into(&Reference, MergeTarget::new(&mut bf.w).with_backup(&mut short), &mut []).unwrap_err();
    assert_eq!(err, Error::ShapeMismatch { operand: Operand::Backup, expected: 30, found: 29 });
    assert_eq!(bf.w, orig);
    assert!(short.iter().all(|&v| v == 9.0));
}

/// One `static` base, two different adapters, two threads at once: each
/// thread's output equals the same adapter's single-threaded output bit for
/// bit (the base is only read, so sharing it changes nothing).
#[test]
fn two_threads_share_one_static_base() {
    const N_IN: usize = 24;
    const N_OUT: usize = 16;
    const T: usize = 5;
    static W: [f32; N_OUT * N_IN] = {
        let mut w = [0.0f32; N_OUT * N_IN];
        let mut i = 0;
        while i < w.len() {
            w[i] = ((i * 37 % 101) as f32 - 50.0) / 64.0;
            i += 1;
        }
        w
    };
    let base = Dense::new(&W, N_OUT, N_IN).unwrap();
    let mut rng = Rng::new(31);
    let mut tensors = |r: usize| -> (Vec<f32>, Vec<f32>) {
        let a = (0..r * N_IN).map(|_| rng.uniform_range(-1.0, 1.0) as f32).collect();
        let b = (0..N_OUT * r).map(|_| rng.uniform_range(-1.0, 1.0) as f32).collect();
        (a, b)
    };
    let ((a1, b1), (a2, b2)) = (tensors(4), tensors(2));
    let l1 = Lora::new(&LoraConfig::new(4, 8.0), N_IN, N_OUT, a1, b1).unwrap();
    let l2 = Lora::new(&LoraConfig::new(2, 3.0).with_rslora(true), N_IN, N_OUT, a2, b2).unwrap();
    let x: Vec<f32> = (0..T * N_IN).map(|_| rng.uniform_range(-1.0, 1.0) as f32).collect();
    let run = |l: &Lora<f32, Vec<f32>>, repeats: usize| {
        let mut y = vec![0.0f32; T * N_OUT];
        let mut scratch = vec![0.0f32; l.forward_scratch_len(T)];
        for _ in 0..repeats {
            let (xv, yv) = (MatRef::new(&x, T, N_IN).unwrap(), MatMut::new(&mut y, T, N_OUT).unwrap());
            l.forward(&Reference, &base, xv, yv, &mut scratch).unwrap();
        }
        y
    };
    let (alone1, alone2) = (run(&l1, 1), run(&l2, 1));
    assert_ne!(alone1, alone2);
    let (threaded1, threaded2) = std::thread::scope(|s| {
        let h1 = s.spawn(|| run(&l1, 200));
        let h2 = s.spawn(|| run(&l2, 200));
        (h1.join().unwrap(), h2.join().unwrap())
    });
    assert_eq!(threaded1, alone1);
    assert_eq!(threaded2, alone2);
}

#[test]
fn two_adapters_share_one_read_only_base() {
    static W: [f32; 12] = [0.5, -1.0, 0.25, 2.0, 1.5, 0.0, -0.75, 1.0, 0.125, -2.0, 3.0, 0.5];
    let base = Dense::new(&W, 3, 4).unwrap();
    let a1 = [1.0f32, 0.0, -1.0, 2.0];
    let b1 = [1.0f32, 0.5, -0.25];
    let a2 = [0.0f32, 1.0, 1.0, 0.0];
    let b2 = [-1.0f32, 2.0, 0.0];
    let l1 = Lora::new(&LoraConfig::new(1, 2.0), 4, 3, &a1[..], &b1[..]).unwrap();
    let l2 = Lora::new(&LoraConfig::new(1, 1.0), 4, 3, &a2[..], &b2[..]).unwrap();
    let x = [1.0f32, 2.0, -1.0, 0.5];
    let run = |l: &Lora<f32, &[f32]>| {
        let mut y = [0.0f32; 3];
        let mut s = [0.0f32; 1];
        l.forward(&Reference, &base, MatRef::new(&x, 1, 4).unwrap(), MatMut::new(&mut y, 1, 3).unwrap(), &mut s)
            .unwrap();
        y
    };
    // Hand calculation: x W^T = [0.5 - 2 - 0.25 + 1, 1.5 + 0.75 + 0.5,
    // 0.125 - 4 - 3 + 0.25] = [-0.75, 2.75, -6.625];
    // l1: s = 2, x A1^T = 1 + 1 + 1 = 3, adds 6 B1 = [6, 3, -1.5];
    // l2: s = 1, x A2^T = 2 - 1 = 1, adds B2 = [-1, 2, 0].
    assert_eq!(run(&l1), [5.25, 5.75, -8.125]);
    assert_eq!(run(&l2), [-1.75, 4.75, -6.625]);
}

#[test]
fn unmerge_with_backup_is_bit_exact() {
    let mut rng = Rng::new(4);
    let mut w: Vec<f32> = (0..48).map(|_| rng.uniform_range(-1.0, 1.0) as f32).collect();
    let orig = w.clone();
    let mut a: Vec<f32> = (0..12).map(|_| rng.uniform_range(-1.0, 1.0) as f32).collect();
    let mut b: Vec<f32> = (0..16).map(|_| rng.uniform_range(-1.0, 1.0) as f32).collect();
    let mut backup = vec![0.0f32; 48];
    let cfg = LoraConfig::new(2, 3.0);
    let layer = Lora::new(&cfg, 6, 8, &mut a[..], &mut b[..]).unwrap();
    let guard = layer.merge_into(&Reference, MergeTarget::new(&mut w).with_backup(&mut backup), &mut []).unwrap();
    assert_ne!(guard.weight(), &orig[..]);
    guard.unmerge().unwrap();
    assert!(w.iter().zip(&orig).all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn unmerge_without_backup_drift_within_bound_over_1000_cycles() {
    let mut rng = Rng::new(8);
    let (n_in, n_out, r) = (32, 24, 4);
    let mut w: Vec<f32> = (0..n_in * n_out).map(|_| rng.uniform_range(-1.0, 1.0) as f32).collect();
    let orig = w.clone();
    let mut a: Vec<f32> = (0..r * n_in).map(|_| rng.uniform_range(-1.0, 1.0) as f32).collect();
    let mut b: Vec<f32> = (0..n_out * r).map(|_| rng.uniform_range(-1.0, 1.0) as f32).collect();
    // |p| = |s (B A)_ij| in f64, for the bound.
    let s = 2.5f64;
    let p: Vec<f64> = (0..n_out * n_in)
        .map(|idx| {
            let (i, j) = (idx / n_in, idx % n_in);
            (s * (0..r).map(|k| b[i * r + k] as f64 * a[k * n_in + j] as f64).sum::<f64>()).abs()
        })
        .collect();
    let cfg = LoraConfig::new(r, s * r as f64);
    let layer = Lora::new(&cfg, n_in, n_out, &mut a[..], &mut b[..]).unwrap();
    let cycles = 1000;
    for _ in 0..cycles {
        layer.merge_into(&Reference, MergeTarget::new(&mut w), &mut []).unwrap().unmerge().unwrap();
    }
    let u = f32::EPSILON as f64 / 2.0;
    let mut worst = 0.0f64;
    for ((got, want), p) in w.iter().zip(&orig).zip(&p) {
        let drift = (*got as f64 - *want as f64).abs();
        // Documented bound (merge.rs): n u (2|W| + |p|) (1 + u), with |W|
        // bounded by its value plus the drift so far.
        let bound = cycles as f64 * u * (2.0 * (want.abs() as f64 + drift) + p) * (1.0 + u);
        assert!(drift <= bound, "drift {drift} > bound {bound}");
        worst = worst.max(drift);
    }
    assert!(worst < 1e-3);
}

/// Loss `L = sum(y * g)`, in f64.
fn loss(layer: &Lora<f64, &mut [f64]>, base: &Dense<'_, f64>, x: &[f64], t: usize, g: &[f64]) -> f64 {
    forward(layer, base, x, t).iter().zip(g).map(|(a, b)| a * b).sum()
}

#[test]
fn gradients_match_central_finite_differences() {
    let mut rng = Rng::new(21);
    let (n_in, n_out, r, t) = (7, 6, 3, 4);
    for rslora in [false, true] {
        let mut bf = bufs(&mut rng, n_in, n_out, r);
        let mut x = random(&mut rng, t * n_in);
        let g = random(&mut rng, t * n_out);
        let bias = bf.bias.clone();
        let cfg = LoraConfig::new(r, 5.0).with_rslora(rslora);
        let base = Dense::new(&bf.w, n_out, n_in).unwrap().with_bias(&bias).unwrap();
        let mut layer = Lora::new(&cfg, n_in, n_out, &mut bf.a[..], &mut bf.b[..]).unwrap();

        let (mut ga, mut gb, mut gx) = (vec![0.0; r * n_in], vec![0.0; n_out * r], vec![0.0; t * n_in]);
        backward((&layer, &base), (&x, &g, t), (&mut ga, &mut gb), Some(&mut gx));

        let h = 1e-6;
        let fd = |l: &Lora<f64, &mut [f64]>, x: &[f64]| loss(l, &base, x, t, &g);
        // dL/dA and dL/dB: perturb one element at a time.
        for (which, analytic) in [(0, &ga), (1, &gb)] {
            for idx in 0..analytic.len() {
                let (a, b) = layer.adapter_mut();
                let p = if which == 0 { &mut a[idx] } else { &mut b[idx] };
                let orig = *p;
                *p = orig + h;
                let up = fd(&layer, &x);
                let (a, b) = layer.adapter_mut();
                let p = if which == 0 { &mut a[idx] } else { &mut b[idx] };
                *p = orig - h;
                let down = fd(&layer, &x);
                let (a, b) = layer.adapter_mut();
                let p = if which == 0 { &mut a[idx] } else { &mut b[idx] };
                *p = orig;
                let numeric = (up - down) / (2.0 * h);
                let rel = (numeric - analytic[idx]).abs() / analytic[idx].abs().max(1.0);
                assert!(rel < 1e-6, "param {which} idx {idx}: fd {numeric} vs {}", analytic[idx]);
            }
        }
        for idx in 0..x.len() {
            let orig = x[idx];
            x[idx] = orig + h;
            let up = fd(&layer, &x);
            x[idx] = orig - h;
            let down = fd(&layer, &x);
            x[idx] = orig;
            let numeric = (up - down) / (2.0 * h);
            let rel = (numeric - gx[idx]).abs() / gx[idx].abs().max(1.0);
            assert!(rel < 1e-6, "dx idx {idx}: fd {numeric} vs {}", gx[idx]);
        }

        // dx through the merged weight alone, G W' = G (W + s B A), is the
        // same dx: the low-rank term belongs to the unmerged pass only.
        let guard = layer.merge_into(&Reference, MergeTarget::new(&mut bf.w), &mut []).unwrap();
        let mut gx2 = vec![0.0; t * n_in];
        guard
            .base()
            .apply_transpose(
                &Reference,
                MatRef::new(&g, t, n_out).unwrap(),
                MatMut::new(&mut gx2, t, n_in).unwrap(),
                Accum::Replace,
            )
            .unwrap();
        assert!(max_rel_err(&gx2, &gx) < 1e-13);
    }
}

#[test]
fn gradients_accumulate_across_micro_batches() {
    let mut rng = Rng::new(9);
    let (n_in, n_out, r, t) = (5, 4, 2, 3);
    let mut bf = bufs(&mut rng, n_in, n_out, r);
    let x = random(&mut rng, t * n_in);
    let g = random(&mut rng, t * n_out);
    let cfg = LoraConfig::new(r, 2.0);
    let base = Dense::new(&bf.w, n_out, n_in).unwrap();
    let layer = Lora::new(&cfg, n_in, n_out, &mut bf.a[..], &mut bf.b[..]).unwrap();
    let (mut ga, mut gb) = (vec![0.0; r * n_in], vec![0.0; n_out * r]);
    let run = |ga: &mut Vec<f64>, gb: &mut Vec<f64>| backward((&layer, &base), (&x, &g, t), (ga, gb), None);
    run(&mut ga, &mut gb);
    let (once_a, once_b) = (ga.clone(), gb.clone());
    run(&mut ga, &mut gb);
    // x + x is exact in binary floating point.
    assert!(ga.iter().zip(&once_a).all(|(two, one)| *two == 2.0 * one));
    assert!(gb.iter().zip(&once_b).all(|(two, one)| *two == 2.0 * one));
}

#[test]
fn mistakes_1_and_12_base_is_bit_identical_after_training() {
    let mut rng = Rng::new(13);
    let (n_in, n_out, r, t) = (12, 10, 3, 8);
    let mut bf = bufs(&mut rng, n_in, n_out, r);
    let w_bits: Vec<u64> = bf.w.iter().map(|v| v.to_bits()).collect();
    let b_bits: Vec<u64> = bf.bias.iter().map(|v| v.to_bits()).collect();
    let x = random(&mut rng, t * n_in);
    let target = random(&mut rng, t * n_out);
    let bias = bf.bias.clone();
    let cfg = LoraConfig::new(r, 6.0);
    let base = Dense::new(&bf.w, n_out, n_in).unwrap().with_bias(&bias).unwrap();
    let mut layer = Lora::new(&cfg, n_in, n_out, &mut bf.a[..], &mut bf.b[..]).unwrap();
    layer.init_adapter(&mut rng);
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..50 {
        let y = forward(&layer, &base, &x, t);
        // L = 0.5 |y - target|^2 / t, dL/dy = (y - target) / t.
        let gy: Vec<f64> = y.iter().zip(&target).map(|(a, b)| (a - b) / t as f64).collect();
        last = y.iter().zip(&target).map(|(a, b)| 0.5 * (a - b) * (a - b)).sum::<f64>() / t as f64;
        first.get_or_insert(last);
        let (mut ga, mut gb) = (vec![0.0; r * n_in], vec![0.0; n_out * r]);
        backward((&layer, &base), (&x, &gy, t), (&mut ga, &mut gb), None);
        let (a, b) = layer.adapter_mut();
        for (p, g) in a.iter_mut().zip(&ga).chain(b.iter_mut().zip(&gb)) {
            *p -= 0.05 * g;
        }
    }
    assert!(last < first.unwrap(), "training must reduce the loss");
    assert!(layer.lora_b().iter().any(|&v| v != 0.0), "B must have trained");
    assert_eq!(bf.w.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), w_bits);
    assert_eq!(bias.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b_bits);
}

#[test]
fn constructor_errors() {
    let mut rng = Rng::new(0);
    let mut bf = bufs(&mut rng, 4, 3, 2);
    let ok = LoraConfig::new(2, 2.0);
    let e = |cfg: &LoraConfig<'_>, bf: &Bufs| Lora::new(cfg, 4, 3, &bf.a[..], &bf.b[..]).map(|_| ()).unwrap_err();
    assert_eq!(e(&LoraConfig::new(0, 2.0), &bf), Error::InvalidRank { rank: 0, max: 0 });
    assert_eq!(e(&LoraConfig::new(2, f64::NAN), &bf), Error::InvalidAlpha);
    bf.a.push(0.0);
    assert_eq!(e(&ok, &bf), Error::ShapeMismatch { operand: Operand::LoraA, expected: 8, found: 9 });
    bf.a.pop();
    bf.b.pop();
    assert_eq!(e(&ok, &bf), Error::ShapeMismatch { operand: Operand::LoraB, expected: 6, found: 5 });
    bf.b.push(0.0);
    // A base of another shape than the adapter's is refused by every pass.
    let layer = Lora::new(&ok, 4, 3, &bf.a[..], &bf.b[..]).unwrap();
    let wide = Dense::new(&[0.0; 15], 3, 5).unwrap();
    let mut y = [1.5; 3];
    let err = layer
        .forward(
            &Reference,
            &wide,
            MatRef::new(&[0.0; 4], 1, 4).unwrap(),
            MatMut::new(&mut y, 1, 3).unwrap(),
            &mut [0.0; 2],
        )
        .unwrap_err();
    assert_eq!(err, Error::ShapeMismatch { operand: Operand::Weight, expected: 4, found: 5 });
    assert_eq!(y, [1.5; 3]);
}

#[test]
fn forward_errors_leave_output_unchanged() {
    let mut rng = Rng::new(6);
    let (n_in, n_out, r, t) = (4, 3, 2, 2);
    let mut bf = bufs(&mut rng, n_in, n_out, r);
    let base = Dense::new(&bf.w, n_out, n_in).unwrap();
    let layer = Lora::new(&LoraConfig::new(r, 2.0), n_in, n_out, &mut bf.a[..], &mut bf.b[..]).unwrap();
    let x = random(&mut rng, t * (n_in + 1));
    let sentinel = -7.25;
    let run = |x: MatRef<'_, f64>, rows: usize, cols: usize, scratch: usize| {
        let mut y = vec![sentinel; rows * cols];
        let mut s = vec![0.0; scratch];
        let err = layer.forward(&Reference, &base, x, MatMut::new(&mut y, rows, cols).unwrap(), &mut s).unwrap_err();
        assert!(y.iter().all(|&v| v == sentinel), "{err:?} wrote to y");
        err
    };
    let good_x = MatRef::new(&x[..t * n_in], t, n_in).unwrap();
    let wide_x = MatRef::new(&x, t, n_in + 1).unwrap();
    assert_eq!(
        run(wide_x, t, n_out, 100),
        Error::ShapeMismatch { operand: Operand::Input, expected: n_in, found: n_in + 1 }
    );
    assert_eq!(
        run(good_x, t + 1, n_out, 100),
        Error::ShapeMismatch { operand: Operand::Output, expected: t, found: t + 1 }
    );
    assert_eq!(
        run(good_x, t, n_out - 1, 100),
        Error::ShapeMismatch { operand: Operand::Output, expected: n_out, found: n_out - 1 }
    );
    assert_eq!(run(good_x, t, n_out, t * r - 1), Error::ScratchTooSmall { needed: t * r, len: t * r - 1 });
}

#[test]
fn backward_errors_leave_outputs_unchanged() {
    let mut rng = Rng::new(10);
    let (n_in, n_out, r, t) = (4, 3, 2, 2);
    let mut bf = bufs(&mut rng, n_in, n_out, r);
    let base = Dense::new(&bf.w, n_out, n_in).unwrap();
    let layer = Lora::new(&LoraConfig::new(r, 2.0), n_in, n_out, &mut bf.a[..], &mut bf.b[..]).unwrap();
    let x = random(&mut rng, t * n_in);
    let g = random(&mut rng, (t + 1) * (n_out + 1));
    let s = 3.5;
    // (grad_y rows, grad_y cols, grad_x rows, grad_x cols, gA len, gB len, scratch)
    type Case = ((usize, usize, usize, usize, usize, usize, usize), Error);
    let cases: [Case; 7] = [
        (
            (t + 1, n_out, t, n_in, 8, 6, 8),
            Error::ShapeMismatch { operand: Operand::GradOutput, expected: t, found: t + 1 },
        ),
        (
            (t, n_out + 1, t, n_in, 8, 6, 8),
            Error::ShapeMismatch { operand: Operand::GradOutput, expected: n_out, found: n_out + 1 },
        ),
        (
            (t, n_out, t + 1, n_in, 8, 6, 8),
            Error::ShapeMismatch { operand: Operand::GradInput, expected: t, found: t + 1 },
        ),
        (
            (t, n_out, t, n_in - 1, 8, 6, 8),
            Error::ShapeMismatch { operand: Operand::GradInput, expected: n_in, found: n_in - 1 },
        ),
        ((t, n_out, t, n_in, 7, 6, 8), Error::ShapeMismatch { operand: Operand::GradA, expected: 8, found: 7 }),
        ((t, n_out, t, n_in, 8, 5, 8), Error::ShapeMismatch { operand: Operand::GradB, expected: 6, found: 5 }),
        ((t, n_out, t, n_in, 8, 6, 7), Error::ScratchTooSmall { needed: 8, len: 7 }),
    ];
    for ((gyr, gyc, gxr, gxc, la, lb, ls), want) in cases {
        let (mut gx, mut ga, mut gb) = (vec![s; gxr * gxc], vec![s; la], vec![s; lb]);
        let mut scratch = vec![0.0; ls];
        let err = layer
            .backward(
                &Reference,
                &base,
                MatRef::new(&x, t, n_in).unwrap(),
                MatRef::new(&g[..gyr * gyc], gyr, gyc).unwrap(),
                Some(MatMut::new(&mut gx, gxr, gxc).unwrap()),
                LoraGrads::new(&mut ga, &mut gb),
                &mut scratch,
            )
            .unwrap_err();
        assert_eq!(err, want);
        assert!(gx.iter().chain(&ga).chain(&gb).all(|&v| v == s), "{err:?} wrote an output");
    }
}

#[cfg(feature = "half")]
#[test]
fn half_precision_forward_tracks_f32() {
    use half::bf16;
    let mut rng = Rng::new(17);
    let (n_in, n_out, r, t) = (16, 8, 2, 3);
    let conv = |v: &[f64]| v.iter().map(|&x| bf16::from_f64(x)).collect::<Vec<_>>();
    let bf = bufs(&mut rng, n_in, n_out, r);
    let x = random(&mut rng, t * n_in);
    let (w, mut a, mut b, xh) = (conv(&bf.w), conv(&bf.a), conv(&bf.b), conv(&x));
    // Oracle on the bf16-rounded inputs, in f64.
    let rounded = Bufs {
        w: w.iter().map(|v| v.to_f64()).collect(),
        bias: vec![0.0; n_out],
        a: a.iter().map(|v| v.to_f64()).collect(),
        b: b.iter().map(|v| v.to_f64()).collect(),
    };
    let xr: Vec<f64> = xh.iter().map(|v| v.to_f64()).collect();
    let want = oracle(&xr, t, n_in, n_out, r, &rounded, 1.0);
    let base = Dense::new(&w, n_out, n_in).unwrap();
    let layer = Lora::new(&LoraConfig::new(r, 2.0), n_in, n_out, &mut a[..], &mut b[..]).unwrap();
    let mut y = vec![bf16::ZERO; t * n_out];
    let mut scratch = vec![bf16::ZERO; layer.forward_scratch_len(t)];
    layer
        .forward(
            &Reference,
            &base,
            MatRef::new(&xh, t, n_in).unwrap(),
            MatMut::new(&mut y, t, n_out).unwrap(),
            &mut scratch,
        )
        .unwrap();
    let got: Vec<f64> = y.iter().map(|v| v.to_f64()).collect();
    // bf16 has u = 2^-8; the stored t = x A^T and y are each rounded once,
    // so 4 u of the output scale is a safe bound.
    assert!(max_rel_err(&got, &want) < 4.0 / 256.0, "{}", max_rel_err(&got, &want));
}

/// Adapters hold only their own tensors, so they are `Send + Sync` exactly
/// when their storage is (checked at compile time: a field that is not,
/// such as a `Cell`, would make this test fail to build).
#[test]
fn adapters_are_send_and_sync_with_their_storage() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Lora<f32, &'static [f32]>>();
    send_sync::<Lora<f32, &'static mut [f32]>>();
    send_sync::<Lora<f64, Vec<f64>>>();
    send_sync::<Dense<'static, f32>>();
    send_sync::<crate::adapter::BottleneckAdapter<f32, &'static [f32]>>();
    send_sync::<crate::prompt::PromptTuning<f32, Vec<f32>>>();
    send_sync::<crate::prefix::PrefixTuning<f32, &'static [f32]>>();
}
