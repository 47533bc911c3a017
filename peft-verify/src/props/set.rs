//! Adapter sets and mixed-adapter batches; weighted combinations.
//!
//! * `set_active_sum_matches_oracle`: several active adapters with
//!   multipliers give `x W^T + b + sum_i m_i s_i (x A_i^T) B_i^T`.
//! * `set_mixed_rows_match_own_forward`: in a mixed batch every row equals
//!   the oracle of its own adapter (or of the base) on that row.
//! * `set_mixed_gradients_match_fd`: the mixed backward's `dA_i`, `dB_i` and
//!   `dx` against central differences of the oracle over the whole batch.
//! * `combine_density_respected`, `combine_density_one_is_linear`,
//!   `combine_cat_is_exact`: the combinations' own contracts (element-type
//!   independent, run once).
use peft_core::combine::{Combination, MajoritySign, Weighted, combine, combine_scratch_len};
use peft_core::lora::{Lora, LoraConfig, LoraGrads};
use peft_core::set::{Route, VecSet};
use peft_core::{Backend, Dense, MatMut, MatRef, Reference, Rng};
use proptest::prelude::*;

use super::vals;
use crate::oracle::{self, M};
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

/// One adapter of a set case: rank, alpha, multiplier, `A`, `B`.
#[derive(Debug, Clone)]
pub struct Member {
    pub r: usize,
    pub alpha: f64,
    pub multiplier: f64,
    pub a: Vec<f64>,
    pub b: Vec<f64>,
}

/// A base, up to three adapters, a batch routed among them.
#[derive(Debug, Clone)]
pub struct SetCase {
    pub n_in: usize,
    pub n_out: usize,
    pub w: Vec<f64>,
    pub bias: Vec<f64>,
    pub members: Vec<Member>,
    /// `(rows, adapter index or None)`, rows summing to `t`.
    pub routes: Vec<(usize, Option<usize>)>,
    pub active: Vec<bool>,
    pub t: usize,
    pub x: Vec<f64>,
    pub g: Vec<f64>,
}

fn member(n_in: usize, n_out: usize) -> impl Strategy<Value = Member> {
    (1..=n_in.min(n_out)).prop_flat_map(move |r| {
        (0.5f64..8.0, -2.0f64..2.0, vals(r * n_in), vals(n_out * r)).prop_map(move |(alpha, multiplier, a, b)| Member {
            r,
            alpha,
            multiplier,
            a,
            b,
        })
    })
}

/// Shapes up to `max_d` features, 1 to 3 adapters, 1 to 4 routes of 0 to
/// `max_rows` rows.
pub fn set_case((max_rows, max_d): (usize, usize)) -> impl Strategy<Value = SetCase> {
    (1usize..=max_d, 1usize..=max_d, 1usize..=3)
        .prop_flat_map(move |(n_in, n_out, k)| {
            (
                Just((n_in, n_out)),
                prop::collection::vec(member(n_in, n_out), k),
                prop::collection::vec((0usize..=max_rows, proptest::option::of(0..k)), 1..=4),
                prop::collection::vec(any::<bool>(), k),
                vals(n_out * n_in),
                vals(n_out),
            )
        })
        .prop_flat_map(|((n_in, n_out), members, routes, active, w, bias)| {
            let t: usize = routes.iter().map(|r| r.0).sum();
            (vals(t * n_in), vals(t * n_out)).prop_map(move |(x, g)| SetCase {
                n_in,
                n_out,
                w: w.clone(),
                bias: bias.clone(),
                members: members.clone(),
                routes: routes.clone(),
                active: active.clone(),
                t,
                x,
                g,
            })
        })
}

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// The case's tensors rounded to `E`.
struct Rounded<E> {
    w: Vec<E>,
    bias: Vec<E>,
    a: Vec<Vec<E>>,
    b: Vec<Vec<E>>,
    x: Vec<E>,
    g: Vec<E>,
}

impl<E: Precision> Rounded<E> {
    fn of(c: &SetCase) -> Self {
        Self {
            w: narrow(&c.w),
            bias: narrow(&c.bias),
            a: c.members.iter().map(|m| narrow(&m.a)).collect(),
            b: c.members.iter().map(|m| narrow(&m.b)).collect(),
            x: narrow(&c.x),
            g: narrow(&c.g),
        }
    }

    fn set(&self, c: &SetCase) -> Result<VecSet<String, E, &[E]>, TestCaseError> {
        let mut set = VecSet::new(c.n_in, c.n_out);
        for (i, m) in c.members.iter().enumerate() {
            let lora = Lora::new(&LoraConfig::new(m.r, m.alpha), c.n_in, c.n_out, &self.a[i][..], &self.b[i][..])
                .map_err(fail)?;
            set.insert(format!("m{i}"), lora).map_err(|r| fail(r.error))?;
            set.set_multiplier(&format!("m{i}"), m.multiplier).map_err(fail)?;
            if c.active[i] {
                set.activate(&format!("m{i}")).map_err(fail)?;
            }
        }
        Ok(set)
    }

    fn routes(c: &SetCase) -> Vec<Route> {
        c.routes.iter().map(|&(rows, adapter)| Route { rows, adapter }).collect()
    }
}

/// The oracle of rows `x` (`[t, in]`, as rounded) through the base and the
/// adapters `which` (each at scale `m s`), with its magnitude.
fn oracle_rows<E: Precision>(
    c: &SetCase,
    r: &Rounded<E>,
    x: &[f64],
    t: usize,
    which: &[usize],
) -> (Vec<f64>, Vec<f64>) {
    let xm = M::new(t, c.n_in, x.to_vec());
    let w = M::new(c.n_out, c.n_in, wide(&r.w));
    let bias = wide(&r.bias);
    let abs_bias: Vec<f64> = bias.iter().map(|v| v.abs()).collect();
    let mut y = oracle::lora(&xm, &w, Some(&bias), &M::zeros(1, c.n_in), &M::zeros(c.n_out, 1), 0.0);
    let mut mag = oracle::lora(&xm.abs(), &w.abs(), Some(&abs_bias), &M::zeros(1, c.n_in), &M::zeros(c.n_out, 1), 0.0);
    for &i in which {
        let m = &c.members[i];
        let s = m.multiplier * m.alpha / m.r as f64;
        let (a, b) = (M::new(m.r, c.n_in, wide(&r.a[i])), M::new(c.n_out, m.r, wide(&r.b[i])));
        y = y.add(&xm.mul_t(&a).mul_t(&b).scale(s));
        mag = mag.add(&xm.abs().mul_t(&a.abs()).mul_t(&b.abs()).scale(s.abs()));
    }
    (y.d, mag.d)
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;
    let dims = config.method_dims();
    let depth = |c: &SetCase| c.n_in + c.members.iter().map(|m| m.r).sum::<usize>() + 4;

    run(report, config, "set_active_sum_matches_oracle", name, set_case(dims), |c| {
        let r = Rounded::<E>::of(&c);
        let set = r.set(&c)?;
        let base = Dense::new(&r.w, c.n_out, c.n_in).and_then(|b| b.with_bias(&r.bias)).map_err(fail)?;
        let mut y = vec![E::ZERO; c.t * c.n_out];
        let mut scratch = vec![E::ZERO; set.forward_scratch_len(c.t)];
        let x = MatRef::new(&r.x, c.t, c.n_in).map_err(fail)?;
        set.forward(backend, &base, x, MatMut::new(&mut y, c.t, c.n_out).map_err(fail)?, &mut scratch).map_err(fail)?;
        let active: Vec<usize> = (0..c.members.len()).filter(|&i| c.active[i]).collect();
        let (want, mag) = oracle_rows(&c, &r, &wide(&r.x), c.t, &active);
        close::<E>("y", &wide(&y), &want, &mag, depth(&c))
    });

    run(report, config, "set_mixed_rows_match_own_forward", name, set_case(dims), |c| {
        let r = Rounded::<E>::of(&c);
        let set = r.set(&c)?;
        let base = Dense::new(&r.w, c.n_out, c.n_in).and_then(|b| b.with_bias(&r.bias)).map_err(fail)?;
        let routes = Rounded::<E>::routes(&c);
        let mut y = vec![E::ZERO; c.t * c.n_out];
        let mut scratch = vec![E::ZERO; set.mixed_forward_scratch_len(&routes)];
        let x = MatRef::new(&r.x, c.t, c.n_in).map_err(fail)?;
        let yv = MatMut::new(&mut y, c.t, c.n_out).map_err(fail)?;
        set.forward_mixed(backend, &base, x, yv, &routes, &mut scratch).map_err(fail)?;
        let (xw, yw) = (wide(&r.x), wide(&y));
        let mut start = 0;
        for &(rows, adapter) in &c.routes {
            let xs = &xw[start * c.n_in..(start + rows) * c.n_in];
            let (want, mag) = oracle_rows(&c, &r, xs, rows, adapter.as_slice());
            let what = format!("rows {start}..{} (adapter {adapter:?})", start + rows);
            close::<E>(&what, &yw[start * c.n_out..(start + rows) * c.n_out], &want, &mag, depth(&c))?;
            start += rows;
        }
        Ok(())
    });

    let small = (3, 6);
    run(report, config, "set_mixed_gradients_match_fd", name, set_case(small), |c| {
        let r = Rounded::<E>::of(&c);
        let set = r.set(&c)?;
        let base = Dense::new(&r.w, c.n_out, c.n_in).map_err(fail)?;
        let routes = Rounded::<E>::routes(&c);
        let k = c.members.len();
        let mut ga: Vec<Vec<E>> = c.members.iter().map(|m| vec![E::ZERO; m.r * c.n_in]).collect();
        let mut gb: Vec<Vec<E>> = c.members.iter().map(|m| vec![E::ZERO; c.n_out * m.r]).collect();
        let mut gx = vec![E::ZERO; c.t * c.n_in];
        {
            let mut grads: Vec<Option<LoraGrads<'_, E>>> =
                ga.iter_mut().zip(gb.iter_mut()).map(|(a, b)| Some(LoraGrads::new(a, b))).collect();
            let mut scratch = vec![E::ZERO; set.mixed_backward_scratch_len(&routes)];
            let x = MatRef::new(&r.x, c.t, c.n_in).map_err(fail)?;
            let g = MatRef::new(&r.g, c.t, c.n_out).map_err(fail)?;
            let gxv = MatMut::new(&mut gx, c.t, c.n_in).map_err(fail)?;
            set.backward_mixed(backend, &base, x, g, Some(gxv), &mut grads, &routes, &mut scratch).map_err(fail)?;
        }
        // The loss sum(G .* Y) over the batch, Y routed as the set routes it.
        let (w, gw) = (M::new(c.n_out, c.n_in, wide(&r.w)), wide(&r.g));
        let loss = |x: &[f64], a: &[Vec<f64>], b: &[Vec<f64>]| {
            let mut total = 0.0;
            let mut start = 0;
            for &(rows, adapter) in &c.routes {
                let xs = M::new(rows, c.n_in, x[start * c.n_in..(start + rows) * c.n_in].to_vec());
                let mut y = xs.mul_t(&w);
                if let Some(i) = adapter {
                    let m = &c.members[i];
                    let s = m.multiplier * m.alpha / m.r as f64;
                    let (am, bm) = (M::new(m.r, c.n_in, a[i].clone()), M::new(c.n_out, m.r, b[i].clone()));
                    y = y.add(&xs.mul_t(&am).mul_t(&bm).scale(s));
                }
                let gs = M::new(rows, c.n_out, gw[start * c.n_out..(start + rows) * c.n_out].to_vec());
                total += oracle::dot(&gs, &y);
                start += rows;
            }
            total
        };
        let (a0, b0): (Vec<Vec<f64>>, Vec<Vec<f64>>) =
            (r.a.iter().map(|v| wide(v)).collect(), r.b.iter().map(|v| wide(v)).collect());
        let xw = wide(&r.x);
        let smax = c.members.iter().map(|m| (m.multiplier * m.alpha / m.r as f64).abs()).fold(0.0, f64::max);
        let scale = (smax + 1.0) * (c.t.max(1) * c.n_out * 4) as f64;
        let kdepth = c.t + c.n_out + 4;
        for i in 0..k {
            let fa = oracle::grad_fd(&a0[i], 1e-6, |p| {
                let mut a = a0.clone();
                a[i] = p.to_vec();
                loss(&xw, &a, &b0)
            });
            let fb = oracle::grad_fd(&b0[i], 1e-6, |p| {
                let mut b = b0.clone();
                b[i] = p.to_vec();
                loss(&xw, &a0, &b)
            });
            close_norm::<E>(&format!("dA_{i}"), &wide(&ga[i]), &fa, scale, kdepth)?;
            close_norm::<E>(&format!("dB_{i}"), &wide(&gb[i]), &fb, scale, kdepth)?;
        }
        let fx = oracle::grad_fd(&xw, 1e-6, |p| loss(p, &a0, &b0));
        close_norm::<E>("dx", &wide(&gx), &fx, scale, kdepth)
    });

    if E::NAME == "f32" {
        combine_props(config, report);
    }
}

/// Two same-rank sources for the combination properties.
#[derive(Debug, Clone)]
pub struct Pair {
    n_in: usize,
    n_out: usize,
    r: usize,
    a: [Vec<f64>; 2],
    b: [Vec<f64>; 2],
    weights: [f64; 2],
    density: f64,
    seed: u64,
}

fn pair() -> impl Strategy<Value = Pair> {
    (1usize..=12, 1usize..=12).prop_flat_map(|(n_in, n_out)| (Just((n_in, n_out)), 1..=n_in.min(n_out))).prop_flat_map(
        |((n_in, n_out), r)| {
            (
                (vals(r * n_in), vals(r * n_in), vals(n_out * r), vals(n_out * r)),
                (-2.0f64..2.0, -2.0f64..2.0, 0.0f64..=1.0, any::<u64>()),
            )
                .prop_map(move |((a0, a1, b0, b1), (w0, w1, density, seed))| Pair {
                    n_in,
                    n_out,
                    r,
                    a: [a0, a1],
                    b: [b0, b1],
                    weights: [w0, w1],
                    density,
                    seed,
                })
        },
    )
}

/// Runs `combine` over the pair (`n` sources of it) and returns `(A, B)`.
fn combined(p: &Pair, n: usize, c: &Combination, rank: usize) -> Result<(Vec<f64>, Vec<f64>), TestCaseError> {
    let loras: Vec<Lora<f64, &[f64]>> = (0..n)
        .map(|i| Lora::new(&LoraConfig::new(p.r, 2.0 * p.r as f64), p.n_in, p.n_out, &p.a[i][..], &p.b[i][..]))
        .collect::<Result<_, _>>()
        .map_err(fail)?;
    let src: Vec<Weighted<'_, f64, &[f64]>> =
        loras.iter().zip(p.weights).map(|(lora, weight)| Weighted { lora, weight }).collect();
    let (mut a, mut b) = (vec![0.0; rank * p.n_in], vec![0.0; p.n_out * rank]);
    let mut scratch = vec![0.0; combine_scratch_len(c, &src, rank)];
    combine(c, &src, rank, &mut a, &mut b, &mut scratch, &mut Rng::new(p.seed)).map_err(fail)?;
    Ok((a, b))
}

fn combine_props(config: &Config, report: &mut Report) {
    run(report, config, "combine_density_respected", "-", pair(), |p| {
        // One source: magnitude pruning keeps exactly int(d n) entries of
        // each factor (ties count toward k); two sources of TIES keep at
        // most the union of their kept entries.
        let mag = Combination::MagnitudePrune { density: p.density };
        let (a, b) = combined(&p, 1, &mag, p.r)?;
        for (what, v, n) in [("A", &a, p.r * p.n_in), ("B", &b, p.n_out * p.r)] {
            let keep = if p.density >= 1.0 { n } else { (p.density * n as f64) as usize };
            let nonzero = v.iter().filter(|x| **x != 0.0).count();
            prop_assert!(nonzero <= keep, "{}: {} non-zero, density allows {}", what, nonzero, keep);
        }
        let ties = Combination::Ties { density: p.density, sign: MajoritySign::Total };
        let (a, _) = combined(&p, 2, &ties, p.r)?;
        let n = p.r * p.n_in;
        let keep = if p.density >= 1.0 { n } else { (p.density * n as f64) as usize };
        let nonzero = a.iter().filter(|x| **x != 0.0).count();
        prop_assert!(nonzero <= 2 * keep, "ties A: {} non-zero, at most {}", nonzero, 2 * keep);
        Ok(())
    });

    run(report, config, "combine_density_one_is_linear", "-", pair(), |p| {
        let linear = combined(&p, 2, &Combination::Linear, p.r)?;
        for c in [Combination::MagnitudePrune { density: 1.0 }, Combination::DareLinear { density: 1.0 }] {
            prop_assert_eq!(&combined(&p, 2, &c, p.r)?, &linear, "{}", c.name());
        }
        // TIES elects signs and averages: it equals linear for one source.
        let one = combined(&p, 1, &Combination::Linear, p.r)?;
        for c in [
            Combination::Ties { density: 1.0, sign: MajoritySign::Total },
            Combination::DareTies { density: 1.0, sign: MajoritySign::Frequency },
        ] {
            prop_assert_eq!(&combined(&p, 1, &c, p.r)?, &one, "{} (one source)", c.name());
        }
        Ok(())
    });

    run(report, config, "combine_cat_is_exact", "-", pair(), |p| {
        // B A = sum_i w_i s_i B_i A_i (s = 2), against the oracle.
        let (a, b) = combined(&p, 2, &Combination::Cat, 2 * p.r)?;
        let got = M::new(p.n_out, 2 * p.r, b).mul(&M::new(2 * p.r, p.n_in, a));
        let mut want = M::zeros(p.n_out, p.n_in);
        let mut mag = M::zeros(p.n_out, p.n_in);
        for i in 0..2 {
            let (bi, ai) = (M::new(p.n_out, p.r, p.b[i].clone()), M::new(p.r, p.n_in, p.a[i].clone()));
            want = want.add(&bi.mul(&ai).scale(2.0 * p.weights[i]));
            mag = mag.add(&bi.abs().mul(&ai.abs()).scale((2.0 * p.weights[i]).abs()));
        }
        close::<f64>("B A", &got.d, &want.d, &mag.d, 2 * p.r + 2)
    });
}
