//! Attention with a prefix: the oracle, the mask extension, the empty
//! prefix, gradients.

use peft_core::attention::forward;
use peft_core::attention::{AttentionGrads, PrefixGrads, backward};
use peft_core::attention::{AttentionShape, Mask, Prefix, backward_scratch_len, forward_scratch_len};
use peft_core::{Backend, MatMut, MatRef};
use proptest::prelude::*;

use super::vals;
use crate::oracle::{self, M};
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

#[derive(Debug, Clone)]
pub struct AttentionCase {
    pub heads: usize,
    pub kv: usize,
    pub dh: usize,
    pub tq: usize,
    pub tk: usize,
    pub p: usize,
    pub causal: bool,
    pub pad: Option<Vec<u8>>,
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub pk: Vec<f64>,
    pub pv: Vec<f64>,
    pub g: Vec<f64>,
}

pub fn case() -> impl Strategy<Value = AttentionCase> {
    case_with(0..=3)
}

/// Cases whose prefix length is drawn from `p`.
pub fn case_with(p: std::ops::RangeInclusive<usize>) -> impl Strategy<Value = AttentionCase> {
    (
        prop::sample::select(vec![(1usize, 1usize), (2, 1), (2, 2), (4, 2), (4, 1)]),
        1usize..=4,
        1usize..=5,
        1usize..=5,
        p,
        any::<bool>(),
    )
        .prop_flat_map(|((heads, kv), dh, tq, tk, p, causal)| {
            let (qw, kw) = (heads * dh, kv * dh);
            (
                proptest::option::of(prop::collection::vec(0u8..=1, tk)),
                (vals(tq * qw), vals(tk * kw), vals(tk * kw), vals(p * kw), vals(p * kw), vals(tq * qw)),
            )
                .prop_map(move |(pad, (q, k, v, pk, pv, g))| AttentionCase {
                    heads,
                    kv,
                    dh,
                    tq,
                    tk,
                    p,
                    causal,
                    pad,
                    q,
                    k,
                    v,
                    pk,
                    pv,
                    g,
                })
        })
}

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

impl AttentionCase {
    fn shape(&self) -> AttentionShape {
        AttentionShape::new(self.heads, self.kv, self.dh).unwrap_or_else(|e| panic!("strategy made bad heads: {e}"))
    }

    /// The oracle on `E`-rounded inputs.
    fn oracle(&self, q: &[f64], k: &[f64], v: &[f64], pk: &[f64], pv: &[f64]) -> M {
        let (qw, kw) = (self.heads * self.dh, self.kv * self.dh);
        oracle::attention(
            &M::new(self.tq, qw, q.to_vec()),
            &M::new(self.tk, kw, k.to_vec()),
            &M::new(self.tk, kw, v.to_vec()),
            &M::new(self.p, kw, pk.to_vec()),
            &M::new(self.p, kw, pv.to_vec()),
            self.heads,
            self.kv,
            self.causal,
            self.pad.as_deref(),
        )
    }
}

/// Runs the backend's forward (with the prefix if `p > 0` or `force_prefix`).
fn fwd<E: Precision, B: Backend<E>>(
    backend: &B,
    c: &AttentionCase,
    t: &[Vec<E>; 5],
    force_prefix: bool,
) -> Result<Vec<E>, B::Error> {
    let (qw, kw) = (c.heads * c.dh, c.kv * c.dh);
    let shape = c.shape();
    let mask = Mask { causal: c.causal, key_padding: c.pad.as_deref(), additive: None };
    let prefix = Prefix { keys: MatRef::new(&t[3], c.p, kw)?, values: MatRef::new(&t[4], c.p, kw)? };
    let mut out = vec![E::ZERO; c.tq * qw];
    let mut scratch = vec![E::ZERO; forward_scratch_len(c.tq, c.tk, c.p)];
    let (q, k, v) = (MatRef::new(&t[0], c.tq, qw)?, MatRef::new(&t[1], c.tk, kw)?, MatRef::new(&t[2], c.tk, kw)?);
    let pre = (c.p > 0 || force_prefix).then_some(&prefix);
    forward(backend, &shape, q, k, v, pre, &mask, MatMut::new(&mut out, c.tq, qw)?, &mut scratch)?;
    Ok(out)
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report) {
    let name = E::NAME;
    let tensors =
        |c: &AttentionCase| -> [Vec<E>; 5] { [narrow(&c.q), narrow(&c.k), narrow(&c.v), narrow(&c.pk), narrow(&c.pv)] };

    run(report, config, "attention_matches_oracle", name, case(), |c| {
        let t = tensors(&c);
        let out = fwd(backend, &c, &t, false).map_err(fail)?;
        let want = c.oracle(&wide(&t[0]), &wide(&t[1]), &wide(&t[2]), &wide(&t[3]), &wide(&t[4]));
        // Outputs are convex combinations of values in [-1, 1]; scores are
        // sums of d_head products; the softmax adds a few roundings.
        let mag = vec![1.0 + c.dh as f64; want.d.len()];
        close::<E>("O", &wide(&out), &want.d, &mag, c.dh + c.p + c.tk + 8)
    });

    // Drawn with a prefix: a case without one says nothing here.
    run(report, config, "prefix_seen_by_every_query", name, case_with(1..=3), |c| {
        let t = tensors(&c);
        let base = fwd(backend, &c, &t, false).map_err(fail)?;
        // A large prefix value in one channel reaches every query of every
        // head of its group: causality and padding never hide the prefix.
        let mut t2 = t.clone();
        for row in t2[4].chunks_exact_mut(c.kv * c.dh) {
            row[0] = E::from_f64(64.0);
        }
        let moved = fwd(backend, &c, &t2, false).map_err(fail)?;
        let qw = c.heads * c.dh;
        for i in 0..c.tq {
            for h in 0..c.heads {
                if h / (c.heads / c.kv) == 0 {
                    let (a, b) = (base[i * qw + h * c.dh].to_f64(), moved[i * qw + h * c.dh].to_f64());
                    prop_assert!(b - a > 1e-3, "query {} head {} does not see the prefix ({} -> {})", i, h, a, b);
                }
            }
        }
        // Causality among real tokens: with a causal mask, changing the
        // last real key/value changes no query that must not see it.
        if c.causal && c.tk >= 2 {
            let mut t3 = t.clone();
            let kw = c.kv * c.dh;
            for j in 0..kw {
                t3[1][(c.tk - 1) * kw + j] = E::from_f64(0.5);
                t3[2][(c.tk - 1) * kw + j] = E::from_f64(-0.75);
            }
            let changed = fwd(backend, &c, &t3, false).map_err(fail)?;
            for i in 0..c.tq {
                // Key tk-1 is hidden from query i when tk-1 > i + tk - tq,
                // that is when i + 1 < tq (bottom-right alignment).
                if i + 1 < c.tq {
                    let row = i * qw..(i + 1) * qw;
                    prop_assert!(
                        base[row.clone()].iter().zip(&changed[row]).all(|(a, b)| a.to_bits64() == b.to_bits64()),
                        "query {} sees a future key",
                        i
                    );
                }
            }
        }
        Ok(())
    });

    run(report, config, "empty_prefix_is_identity", name, case(), |c| {
        let mut c0 = c.clone();
        c0.p = 0;
        c0.pk.clear();
        c0.pv.clear();
        let t = tensors(&c0);
        let without = fwd(backend, &c0, &t, false).map_err(fail)?;
        let with_empty = fwd(backend, &c0, &t, true).map_err(fail)?;
        prop_assert!(
            without.iter().zip(&with_empty).all(|(a, b)| a.to_bits64() == b.to_bits64()),
            "an empty prefix changed the output"
        );
        Ok(())
    });

    run(report, config, "attention_gradients_match_fd", name, case(), |c| {
        let t = tensors(&c);
        let g: Vec<E> = narrow(&c.g);
        let (qw, kw) = (c.heads * c.dh, c.kv * c.dh);
        let shape = c.shape();
        let mask = Mask { causal: c.causal, key_padding: c.pad.as_deref(), additive: None };
        let (mut gq, mut gk, mut gv) = (vec![E::ZERO; c.tq * qw], vec![E::ZERO; c.tk * kw], vec![E::ZERO; c.tk * kw]);
        let mut gp = vec![E::ZERO; c.p * 2 * kw];
        let mut scratch = vec![E::ZERO; backward_scratch_len(c.tq, c.tk, c.p)];
        let prefix = Prefix {
            keys: MatRef::new(&t[3], c.p, kw).map_err(fail)?,
            values: MatRef::new(&t[4], c.p, kw).map_err(fail)?,
        };
        let grads = AttentionGrads {
            q: MatMut::new(&mut gq, c.tq, qw).map_err(fail)?,
            k: MatMut::new(&mut gk, c.tk, kw).map_err(fail)?,
            v: MatMut::new(&mut gv, c.tk, kw).map_err(fail)?,
            prefix: Some(PrefixGrads { kv: MatMut::new(&mut gp, c.p, 2 * kw).map_err(fail)? }),
        };
        backward(
            backend,
            &shape,
            MatRef::new(&t[0], c.tq, qw).map_err(fail)?,
            MatRef::new(&t[1], c.tk, kw).map_err(fail)?,
            MatRef::new(&t[2], c.tk, kw).map_err(fail)?,
            Some(&prefix),
            &mask,
            MatRef::new(&g, c.tq, qw).map_err(fail)?,
            grads,
            &mut scratch,
        )
        .map_err(fail)?;
        let w: Vec<Vec<f64>> = t.iter().map(|x| wide(x)).collect();
        let gm = M::new(c.tq, qw, wide(&g));
        let loss = |i: usize, p: &[f64]| {
            let mut a = w.clone();
            a[i] = p.to_vec();
            oracle::dot(&gm, &c.oracle(&a[0], &a[1], &a[2], &a[3], &a[4]))
        };
        let h = 1e-6;
        let scale = (c.tq * c.dh * (c.tk + c.p)) as f64;
        let k = c.dh + c.tk + c.p + c.tq + 8;
        close_norm::<E>("dQ", &wide(&gq), &oracle::grad_fd(&w[0], h, |p| loss(0, p)), scale, k)?;
        close_norm::<E>("dK", &wide(&gk), &oracle::grad_fd(&w[1], h, |p| loss(1, p)), scale, k)?;
        close_norm::<E>("dV", &wide(&gv), &oracle::grad_fd(&w[2], h, |p| loss(2, p)), scale, k)?;
        let (fpk, fpv) = (oracle::grad_fd(&w[3], h, |p| loss(3, p)), oracle::grad_fd(&w[4], h, |p| loss(4, p)));
        let gpw = wide(&gp);
        let (mut dpk, mut dpv) = (Vec::new(), Vec::new());
        for row in gpw.chunks_exact(2 * kw) {
            dpk.extend_from_slice(&row[..kw]);
            dpv.extend_from_slice(&row[kw..]);
        }
        close_norm::<E>("dPK", &dpk, &fpk, scale, k)?;
        close_norm::<E>("dPV", &dpv, &fpv, scale, k)
    });
}
