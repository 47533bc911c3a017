//! Attention tests: an f64 oracle, finite differences, the mistake-11
//! example, edge cases and errors.

extern crate std;
use std::vec;
use std::vec::Vec;

use super::backward::backward;
use super::forward::forward;
use super::*;
use crate::backend::Reference;
use crate::rng::Rng;

/// One attention problem with owned buffers.
#[derive(Clone)]
struct Problem {
    shape: AttentionShape,
    tq: usize,
    tk: usize,
    p: usize,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    pk: Vec<f64>,
    pv: Vec<f64>,
    causal: bool,
    pad: Option<Vec<u8>>,
    additive: Option<Vec<f64>>,
}

impl Problem {
    fn random(rng: &mut Rng, heads: usize, kv: usize, dh: usize, tq: usize, tk: usize, p: usize) -> Self {
        let shape = AttentionShape::new(heads, kv, dh).unwrap();
        let mut r = |n: usize| (0..n).map(|_| rng.uniform_range(-1.5, 1.5)).collect::<Vec<f64>>();
        Self {
            q: r(tq * heads * dh),
            k: r(tk * kv * dh),
            v: r(tk * kv * dh),
            pk: r(p * kv * dh),
            pv: r(p * kv * dh),
            shape,
            tq,
            tk,
            p,
            causal: false,
            pad: None,
            additive: None,
        }
    }

    #[allow(clippy::type_complexity)]
    fn views(&self) -> (MatRef<'_, f64>, MatRef<'_, f64>, MatRef<'_, f64>, Option<Prefix<'_, f64>>, Mask<'_, f64>) {
        let (qw, kw) = (self.shape.q_width(), self.shape.kv_width());
        let prefix = (self.p > 0).then(|| Prefix {
            keys: MatRef::new(&self.pk, self.p, kw).unwrap(),
            values: MatRef::new(&self.pv, self.p, kw).unwrap(),
        });
        let mask = Mask {
            causal: self.causal,
            key_padding: self.pad.as_deref(),
            additive: self.additive.as_deref().map(|a| MatRef::new(a, self.tq, self.p + self.tk).unwrap()),
        };
        (
            MatRef::new(&self.q, self.tq, qw).unwrap(),
            MatRef::new(&self.k, self.tk, kw).unwrap(),
            MatRef::new(&self.v, self.tk, kw).unwrap(),
            prefix,
            mask,
        )
    }

    fn run(&self) -> Vec<f64> {
        let (q, k, v, prefix, mask) = self.views();
        let mut out = vec![f64::NAN; self.tq * self.shape.q_width()];
        let mut s = vec![0.0; forward_scratch_len(self.tq, self.tk, self.p)];
        let o = MatMut::new(&mut out, self.tq, self.shape.q_width()).unwrap();
        forward(&Reference, &self.shape, q, k, v, prefix.as_ref(), &mask, o, &mut s).unwrap();
        out
    }

    /// Plain f64 attention over explicitly concatenated keys and an
    /// explicitly built mask matrix.
    fn oracle(&self) -> Vec<f64> {
        let (h, kvh, dh) = (self.shape.heads(), self.shape.kv_heads(), self.shape.head_dim());
        let n = self.p + self.tk;
        let mut out = vec![0.0; self.tq * h * dh];
        for head in 0..h {
            let g = head / (h / kvh);
            let key = |j: usize, c: usize| {
                if j < self.p {
                    self.pk[j * kvh * dh + g * dh + c]
                } else {
                    self.k[(j - self.p) * kvh * dh + g * dh + c]
                }
            };
            let val = |j: usize, c: usize| {
                if j < self.p {
                    self.pv[j * kvh * dh + g * dh + c]
                } else {
                    self.v[(j - self.p) * kvh * dh + g * dh + c]
                }
            };
            for i in 0..self.tq {
                let mut scores = vec![f64::NEG_INFINITY; n];
                for (j, sc) in scores.iter_mut().enumerate() {
                    let real_ok = j < self.p || {
                        let r = j - self.p;
                        (!self.causal || r + self.tq <= i + self.tk) && self.pad.as_ref().is_none_or(|m| m[r] != 0)
                    };
                    if real_ok {
                        let dot: f64 = (0..dh).map(|c| self.q[i * h * dh + head * dh + c] * key(j, c)).sum();
                        *sc = dot / (dh as f64).sqrt() + self.additive.as_ref().map_or(0.0, |a| a[i * n + j]);
                    }
                }
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                if max == f64::NEG_INFINITY {
                    continue;
                }
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..dh {
                    out[i * h * dh + head * dh + c] = (0..n).map(|j| e[j] / z * val(j, c)).sum();
                }
            }
        }
        out
    }

    /// Loss sum(O * g).
    fn loss(&self, g: &[f64]) -> f64 {
        self.run().iter().zip(g).map(|(a, b)| a * b).sum()
    }
}

fn close(got: &[f64], want: &[f64], tol: f64) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * w.abs().max(1.0), "at {i}: {g} vs {w}");
    }
}

fn configs(rng: &mut Rng) -> Vec<Problem> {
    let mut v = Vec::new();
    // (heads, kv_heads, d_head, tq, tk, p)
    for &(h, kv, dh, tq, tk, p) in &[(2, 2, 3, 4, 4, 0), (4, 2, 2, 3, 5, 2), (3, 1, 4, 5, 5, 3), (2, 1, 2, 1, 3, 1)] {
        for variant in 0..3 {
            let mut pr = Problem::random(rng, h, kv, dh, tq, tk, p);
            if variant >= 1 {
                pr.causal = true;
                let mut pad = vec![1u8; tk];
                pad[0] = 0; // a left-padded key
                pr.pad = Some(pad);
            }
            if variant == 2 {
                pr.additive = Some((0..tq * (p + tk)).map(|_| rng.uniform_range(-1.0, 0.5)).collect());
            }
            v.push(pr);
        }
    }
    v
}

#[test]
fn forward_matches_f64_oracle() {
    let mut rng = Rng::new(12);
    for pr in configs(&mut rng) {
        close(&pr.run(), &pr.oracle(), 1e-13);
    }
}

#[test]
fn gradients_match_central_finite_differences() {
    let mut rng = Rng::new(33);
    for pr in configs(&mut rng) {
        check_gradients(&pr, &mut rng, 1);
    }
}

/// Problems spanning several blocks of [`QUERY_BLOCK`] query rows: a key
/// cache longer than the queries (`tk > tq`), a prefix, and each mask kind.
fn multi_block_configs(rng: &mut Rng) -> Vec<Problem> {
    let (tq, tk, p) = (2 * QUERY_BLOCK + 5, 2 * QUERY_BLOCK + 12, 2);
    (0..4)
        .map(|variant| {
            let mut pr = Problem::random(rng, 2, 1, 2, tq, tk, p);
            pr.causal = variant != 0;
            if variant >= 2 {
                let mut pad = vec![1u8; tk];
                pad[3] = 0;
                pad[QUERY_BLOCK + 1] = 0;
                pr.pad = Some(pad);
            }
            if variant == 3 {
                pr.additive = Some((0..tq * (p + tk)).map(|_| rng.uniform_range(-1.0, 0.5)).collect());
            }
            pr
        })
        .collect()
}

#[test]
fn blocks_of_queries_match_the_oracle_and_finite_differences() {
    let mut rng = Rng::new(44);
    for pr in multi_block_configs(&mut rng) {
        assert!(forward_scratch_len(pr.tq, pr.tk, pr.p) == QUERY_BLOCK * (pr.p + pr.tk), "scratch is one block's");
        close(&pr.run(), &pr.oracle(), 1e-13);
        // Every 11th element of each gradient: rows in each block, keys
        // before and after the first block's causal horizon.
        check_gradients(&pr, &mut rng, 11);
    }
}

/// The analytic gradients of `sum(O * g)` against central differences, at
/// every `stride`-th element of each of dQ, dK, dV, dPK, dPV.
fn check_gradients(pr: &Problem, rng: &mut Rng, stride: usize) {
    let (qw, kw) = (pr.shape.q_width(), pr.shape.kv_width());
    let g: Vec<f64> = (0..pr.tq * qw).map(|_| rng.uniform_range(-1.0, 1.0)).collect();
    let (mut dq, mut dk, mut dv) = (vec![0.0; pr.q.len()], vec![0.0; pr.k.len()], vec![0.0; pr.v.len()]);
    let mut dpkv = vec![0.0; 2 * pr.pk.len()];
    {
        let (q, k, v, prefix, mask) = pr.views();
        let grads = AttentionGrads {
            q: MatMut::new(&mut dq, pr.tq, qw).unwrap(),
            k: MatMut::new(&mut dk, pr.tk, kw).unwrap(),
            v: MatMut::new(&mut dv, pr.tk, kw).unwrap(),
            prefix: prefix.as_ref().map(|_| PrefixGrads { kv: MatMut::new(&mut dpkv, pr.p, 2 * kw).unwrap() }),
        };
        let mut s = vec![0.0; backward_scratch_len(pr.tq, pr.tk, pr.p)];
        let go = MatRef::new(&g, pr.tq, qw).unwrap();
        backward(&Reference, &pr.shape, q, k, v, prefix.as_ref(), &mask, go, grads, &mut s).unwrap();
    }
    let (dpk, dpv): (Vec<f64>, Vec<f64>) = {
        let rows: Vec<&[f64]> = dpkv.chunks(2 * kw).collect();
        (rows.iter().flat_map(|r| r[..kw].to_vec()).collect(), rows.iter().flat_map(|r| r[kw..].to_vec()).collect())
    };
    let h = 1e-6;
    for (which, analytic) in [(0, &dq), (1, &dk), (2, &dv), (3, &dpk), (4, &dpv)] {
        for (idx, &want) in analytic.iter().enumerate().step_by(stride) {
            let perturbed = |delta: f64| {
                let mut p2 = pr.clone();
                let t = match which {
                    0 => &mut p2.q,
                    1 => &mut p2.k,
                    2 => &mut p2.v,
                    3 => &mut p2.pk,
                    _ => &mut p2.pv,
                };
                t[idx] += delta;
                p2.loss(&g)
            };
            let fd = (perturbed(h) - perturbed(-h)) / (2.0 * h);
            assert!(
                (fd - want).abs() <= 1e-6 * want.abs().max(1.0),
                "tensor {which} idx {idx}: fd {fd} vs {want} (causal {}, p {})",
                pr.causal,
                pr.p
            );
        }
    }
}

#[test]
fn mistake11_prefix_is_visible_to_every_query_hand_example() {
    // One head, d_head = 1, two real tokens, causal, one prefix token.
    // All scores are 0 (keys 0), so each query averages the values it sees:
    // query 0 sees {prefix, t0}: (2 + 10) / 2 = 6;
    // query 1 sees {prefix, t0, t1}: (2 + 10 + 20) / 3 = 32/3.
    // Had the causal mask not been extended, the [2 x 2] mask would cover
    // the prefix and t0 columns and query 0 would see t1: (2 + 20) / 2 = 11.
    let shape = AttentionShape::new(1, 1, 1).unwrap();
    let (q, k, v) = ([1.0f64, 1.0], [0.0, 0.0], [10.0, 20.0]);
    let (pk, pv) = ([0.0], [2.0]);
    let prefix = Prefix { keys: MatRef::new(&pk, 1, 1).unwrap(), values: MatRef::new(&pv, 1, 1).unwrap() };
    let mut out = [0.0; 2];
    let mut s = [0.0; 6];
    forward(
        &Reference,
        &shape,
        MatRef::new(&q, 2, 1).unwrap(),
        MatRef::new(&k, 2, 1).unwrap(),
        MatRef::new(&v, 2, 1).unwrap(),
        Some(&prefix),
        &Mask::causal(),
        MatMut::new(&mut out, 2, 1).unwrap(),
        &mut s,
    )
    .unwrap();
    assert!((out[0] - 6.0).abs() < 1e-14 && (out[1] - 32.0 / 3.0).abs() < 1e-14, "{out:?}");

    // The seed's fix for callers with their own attention.
    let ninf = f64::NEG_INFINITY;
    let causal = [0.0, ninf, 0.0, 0.0];
    let mut ext = [7.0; 6];
    extend_additive_mask(MatRef::new(&causal, 2, 2).unwrap(), 1, MatMut::new(&mut ext, 2, 3).unwrap()).unwrap();
    assert_eq!(ext, [0.0, 0.0, ninf, 0.0, 0.0, 0.0]);
    // An un-extended [tq, tk] mask is refused, not misapplied.
    let err = forward(
        &Reference,
        &shape,
        MatRef::new(&q, 2, 1).unwrap(),
        MatRef::new(&k, 2, 1).unwrap(),
        MatRef::new(&v, 2, 1).unwrap(),
        Some(&prefix),
        &Mask { causal: false, key_padding: None, additive: Some(MatRef::new(&causal, 2, 2).unwrap()) },
        MatMut::new(&mut out, 2, 1).unwrap(),
        &mut s,
    )
    .unwrap_err();
    assert_eq!(err, Error::ShapeMismatch { operand: Operand::Mask, expected: 3, found: 2 });
}

#[test]
fn zero_prefix_values_hidden_by_mask_give_plain_attention_bit_for_bit() {
    let mut rng = Rng::new(5);
    let mut plain = Problem::random(&mut rng, 4, 2, 3, 5, 5, 0);
    plain.causal = true;
    let mut with = plain.clone();
    with.p = 3;
    with.pk = (0..3 * 6).map(|_| rng.normal_f64()).collect();
    with.pv = vec![0.0; 3 * 6];
    let mut add = vec![0.0; 5 * 8];
    for row in add.chunks_mut(8) {
        row[..3].fill(f64::NEG_INFINITY);
    }
    with.additive = Some(add);
    let (a, b) = (plain.run(), with.run());
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
}

#[test]
fn empty_prefix_equals_no_prefix_and_full_mask_gives_zeros() {
    let mut rng = Rng::new(6);
    let pr = Problem::random(&mut rng, 2, 2, 2, 3, 3, 0);
    let (q, k, v, _, mask) = pr.views();
    let empty = Prefix { keys: MatRef::new(&[], 0, 4).unwrap(), values: MatRef::new(&[], 0, 4).unwrap() };
    let mut out = vec![0.0; 12];
    let mut s = vec![0.0; 9];
    forward(&Reference, &pr.shape, q, k, v, Some(&empty), &mask, MatMut::new(&mut out, 3, 4).unwrap(), &mut s).unwrap();
    assert_eq!(out, pr.run());

    // Every key padded: the output and every gradient are exactly zero.
    let mut masked = pr.clone();
    masked.pad = Some(vec![0; 3]);
    let o = masked.run();
    assert!(o.iter().all(|&x| x == 0.0));
    let (q, k, v, _, mask) = masked.views();
    let (mut dq, mut dk, mut dv) = (vec![9.0; 12], vec![9.0; 12], vec![9.0; 12]);
    let g = vec![1.0; 12];
    let grads = AttentionGrads {
        q: MatMut::new(&mut dq, 3, 4).unwrap(),
        k: MatMut::new(&mut dk, 3, 4).unwrap(),
        v: MatMut::new(&mut dv, 3, 4).unwrap(),
        prefix: None,
    };
    let mut s = vec![0.0; 18];
    backward(&Reference, &masked.shape, q, k, v, None, &mask, MatRef::new(&g, 3, 4).unwrap(), grads, &mut s).unwrap();
    assert!(dq.iter().chain(&dk).chain(&dv).all(|&x| x == 0.0));
}

#[test]
fn softmax_is_stable_for_large_scores() {
    // Scores of 1e4: a naive exp overflows to inf and gives NaN.
    let shape = AttentionShape::new(1, 1, 1).unwrap();
    let (q, k, v) = ([1e4f32], [1.0f32, 1.0], [1.0f32, 3.0]);
    let mut out = [0.0f32];
    let mut s = [0.0f32; 2];
    forward(
        &Reference,
        &shape,
        MatRef::new(&q, 1, 1).unwrap(),
        MatRef::new(&k, 2, 1).unwrap(),
        MatRef::new(&v, 2, 1).unwrap(),
        None,
        &Mask::none(),
        MatMut::new(&mut out, 1, 1).unwrap(),
        &mut s,
    )
    .unwrap();
    assert_eq!(out, [2.0]);
}

#[test]
fn invalid_heads_and_shapes_are_errors() {
    assert_eq!(AttentionShape::new(3, 2, 4), Err(Error::InvalidHeads { heads: 3, kv_heads: 2, head_dim: 4 }));
    assert_eq!(AttentionShape::new(0, 0, 4), Err(Error::InvalidHeads { heads: 0, kv_heads: 0, head_dim: 4 }));
    assert_eq!(AttentionShape::new(2, 1, 0), Err(Error::InvalidHeads { heads: 2, kv_heads: 1, head_dim: 0 }));
    let mut rng = Rng::new(1);
    let pr = Problem::random(&mut rng, 2, 1, 2, 3, 4, 1);
    let (q, k, v, prefix, mask) = pr.views();
    let sentinel = 5.5;
    // Each call changes one operand; the output must stay untouched.
    let run = |q, k, v, mask: &Mask<'_, f64>, scratch: usize| {
        let mut out = vec![sentinel; 12];
        let mut s = vec![0.0; scratch];
        let err = forward(
            &Reference,
            &pr.shape,
            q,
            k,
            v,
            prefix.as_ref(),
            mask,
            MatMut::new(&mut out, 3, 4).unwrap(),
            &mut s,
        )
        .unwrap_err();
        assert!(out.iter().all(|&x| x == sentinel), "{err:?} wrote to the output");
        err
    };
    assert_eq!(run(q, k, v, &mask, 14), Error::ScratchTooSmall { needed: 15, len: 14 });
    let short_k = MatRef::new(&pr.k[..6], 3, 2).unwrap();
    assert_eq!(run(q, short_k, v, &mask, 15), Error::ShapeMismatch { operand: Operand::Value, expected: 3, found: 4 });
    let wrong_q = MatRef::new(&pr.q[..9], 3, 3).unwrap();
    assert_eq!(run(wrong_q, k, v, &mask, 15), Error::ShapeMismatch { operand: Operand::Query, expected: 4, found: 3 });
    let pad = [1u8; 3];
    let bad_mask = Mask { causal: false, key_padding: Some(&pad[..]), additive: None };
    assert_eq!(run(q, k, v, &bad_mask, 15), Error::ShapeMismatch { operand: Operand::Mask, expected: 4, found: 3 });

    // Backward: prefix gradients without a prefix; nothing written.
    let (mut dq, mut dk, mut dv, mut dpkv) =
        (vec![sentinel; 12], vec![sentinel; 8], vec![sentinel; 8], vec![sentinel; 4]);
    let grads = AttentionGrads {
        q: MatMut::new(&mut dq, 3, 4).unwrap(),
        k: MatMut::new(&mut dk, 4, 2).unwrap(),
        v: MatMut::new(&mut dv, 4, 2).unwrap(),
        prefix: Some(PrefixGrads { kv: MatMut::new(&mut dpkv, 1, 4).unwrap() }),
    };
    let g = vec![1.0; 12];
    let mut s = vec![0.0; 30];
    let err = backward(&Reference, &pr.shape, q, k, v, None, &mask, MatRef::new(&g, 3, 4).unwrap(), grads, &mut s)
        .unwrap_err();
    assert_eq!(err, Error::ShapeMismatch { operand: Operand::Prefix, expected: 0, found: 1 });
    assert!(dq.iter().chain(&dk).chain(&dv).chain(&dpkv).all(|&x| x == sentinel));
}

#[cfg(feature = "half")]
#[test]
fn f16_attention_tracks_the_f64_oracle() {
    use half::f16;
    let mut rng = Rng::new(41);
    let mut pr = Problem::random(&mut rng, 4, 2, 4, 5, 6, 2);
    pr.causal = true;
    // Round every input to f16 first, so the oracle sees the same operands.
    let round = |v: &mut Vec<f64>| v.iter_mut().for_each(|x| *x = f16::from_f64(*x).to_f64());
    for t in [&mut pr.q, &mut pr.k, &mut pr.v, &mut pr.pk, &mut pr.pv] {
        round(t);
    }
    let want = pr.oracle();
    let h = |v: &[f64]| v.iter().map(|&x| f16::from_f64(x)).collect::<Vec<_>>();
    let (q, k, v, pk, pv) = (h(&pr.q), h(&pr.k), h(&pr.v), h(&pr.pk), h(&pr.pv));
    let prefix = Prefix { keys: MatRef::new(&pk, 2, 8).unwrap(), values: MatRef::new(&pv, 2, 8).unwrap() };
    let mut out = vec![f16::ZERO; 5 * 16];
    let mut s = vec![f16::ZERO; forward_scratch_len(5, 6, 2)];
    forward(
        &Reference,
        &pr.shape,
        MatRef::new(&q, 5, 16).unwrap(),
        MatRef::new(&k, 6, 8).unwrap(),
        MatRef::new(&v, 6, 8).unwrap(),
        Some(&prefix),
        &Mask::causal(),
        MatMut::new(&mut out, 5, 16).unwrap(),
        &mut s,
    )
    .unwrap();
    // f16 has u = 2^-11; scores, probabilities and outputs are each stored
    // once in f16, and the values are O(1): 8 u absolute is a safe bound.
    for (g, w) in out.iter().zip(&want) {
        assert!((g.to_f64() - w).abs() < 8.0 / 2048.0, "{} vs {w}", g.to_f64());
    }
}
