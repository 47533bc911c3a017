//! The backend's gemm against the oracle.

use peft_core::{Accum, Backend, MatMut, MatRef, Op};
use proptest::prelude::*;

use super::vals;
use crate::{Config, Precision, Report, close, narrow, run, wide};

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
    (1usize..=9, 1usize..=9, 0usize..=12, any::<bool>(), any::<bool>(), any::<bool>(), -2.0f64..2.0).prop_flat_map(
        |(m, n, k, ta, tb, add, alpha)| {
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
    run(report, config, "gemm_matches_oracle", E::NAME, gemm_case(), |g| {
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
    });
}
