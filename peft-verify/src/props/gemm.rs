//! The backend's gemm against the oracle.

use peft_core::{Accum, Backend, MatMut, MatRef, Op};
use proptest::prelude::*;

use super::vals;
use crate::{Config, Precision, Report, Shapes, close, narrow, run, run_n, wide};

#[derive(Debug, Clone)]
struct Gemm {
    m: usize,
    n: usize,
    k: usize,
    ta: bool,
    tb: bool,
    add: bool,
    alpha: f64,
    a: Vec<f64>,
    b: Vec<f64>,
    c: Vec<f64>,
}

fn gemm_case() -> impl Strategy<Value = Gemm> {
    with_values((1usize..=9, 1usize..=9, 0usize..=12))
}

/// Shapes at the block edges of real kernels: `k` across 128 and 256,
/// `m` and `n` across 64 and 128.
fn edge_case() -> impl Strategy<Value = Gemm> {
    let mn = prop::sample::select(vec![1usize, 63, 64, 65, 127, 128, 129]);
    let k = prop::sample::select(vec![127usize, 128, 129, 255, 256, 257]);
    with_values((mn.clone(), mn, k))
}

/// One product past 128 in every dimension (and past the reference
/// kernel's 128-deep panel twice).
fn past_128() -> impl Strategy<Value = Gemm> {
    with_values((Just(129usize), Just(130usize), Just(257usize)))
}

fn with_values(dims: impl Strategy<Value = (usize, usize, usize)>) -> impl Strategy<Value = Gemm> {
    (dims, any::<bool>(), any::<bool>(), any::<bool>(), -2.0f64..2.0).prop_flat_map(
        |((m, n, k), ta, tb, add, alpha)| {
            (vals(m * k), vals(k * n), vals(m * n)).prop_map(move |(a, b, c)| Gemm {
                m,
                n,
                k,
                ta,
                tb,
                add,
                alpha,
                a,
                b,
                c,
            })
        },
    )
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report) {
    run(report, config, "gemm_matches_oracle", E::NAME, gemm_case(), |g| check(backend, &g));
    let edges = match config.shapes {
        Shapes::Small => (config.cases / 32).max(2),
        Shapes::Large => config.cases,
    };
    run_n(report, config, edges, "gemm_block_edges", E::NAME, edge_case(), |g| check(backend, &g));
    run_n(report, config, 1, "gemm_past_128", E::NAME, past_128(), |g| check(backend, &g));
}

/// `C (=|+=) alpha op(A) op(B)` through the backend against the oracle.
fn check<E: Precision, B: Backend<E>>(backend: &B, g: &Gemm) -> crate::CaseResult {
    {
        let (a, b): (Vec<E>, Vec<E>) = (narrow(&g.a), narrow(&g.b));
        let mut c: Vec<E> = narrow(&g.c);
        let c0 = wide(&c);
        let (ar, ac) = if g.ta { (g.k, g.m) } else { (g.m, g.k) };
        let (br, bc) = if g.tb { (g.n, g.k) } else { (g.k, g.n) };
        let op = |t: bool| if t { Op::T } else { Op::N };
        let accum = if g.add { Accum::Add } else { Accum::Replace };
        let alpha = <E::Accum as peft_core::Element>::from_f64(g.alpha);
        backend
            .gemm(
                MatMut::new(&mut c, g.m, g.n).map_err(|e| TestCaseError::fail(e.to_string()))?,
                accum,
                MatRef::new(&a, ar, ac).map_err(|e| TestCaseError::fail(e.to_string()))?,
                op(g.ta),
                MatRef::new(&b, br, bc).map_err(|e| TestCaseError::fail(e.to_string()))?,
                op(g.tb),
                alpha,
            )
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let (aw, bw) = (wide(&a), wide(&b));
        let at = |i: usize, p: usize| if g.ta { aw[p * g.m + i] } else { aw[i * g.k + p] };
        let bt = |p: usize, j: usize| if g.tb { bw[j * g.k + p] } else { bw[p * g.n + j] };
        let alpha = peft_core::Element::to_f64(alpha);
        let mut want = vec![0.0; g.m * g.n];
        let mut mag = vec![0.0; g.m * g.n];
        for i in 0..g.m {
            for j in 0..g.n {
                let s: f64 = (0..g.k).map(|p| at(i, p) * bt(p, j)).sum();
                let sa: f64 = (0..g.k).map(|p| (at(i, p) * bt(p, j)).abs()).sum();
                let old = if g.add { c0[i * g.n + j] } else { 0.0 };
                want[i * g.n + j] = old + alpha * s;
                mag[i * g.n + j] = old.abs() + alpha.abs() * sa;
            }
        }
        close::<E>("C", &wide(&c), &want, &mag, g.k + 1)
    }
}
