//! Optimizer steps against an f64 oracle written from the published
//! update rules, and the refusal of non-finite steps.
//!
//! The oracle restarts every step from the parameters and state the
//! optimizer left (so rounding cannot accumulate into a spurious failure)
//! and checks parameters, both moments (or the momentum buffer) and the
//! step counter after each of several steps:
//!
//! ```text
//! AdamW (Loshchilov and Hutter 2019; PyTorch's torch.optim.AdamW), step t:
//!   c = min(1, max_norm / ||g||)          (global norm over all tensors; 1 without clipping)
//!   p = p (1 - lr wd)                     (decoupled decay, where decay applies)
//!   m = b1 m + (1 - b1) c g
//!   v = b2 v + (1 - b2) (c g)^2
//!   p = p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
//! SGD with momentum (PyTorch's torch.optim.SGD, dampening 0):
//!   g' = c g + wd p;  v = mu v + g';  p = p - lr v   (mu = 0: no state)
//! ```

use peft_core::Element;
use peft_core::optim::{AdamW, Sgd, Slot};
use peft_core::{Error, Operand};
use proptest::prelude::*;

use crate::{Config, Precision, Report, narrow, run, wide};

/// The tensor layout of one method's training step: lengths and whether
/// weight decay applies to each (biases and prompts are not decayed).
fn layouts() -> impl Strategy<Value = (&'static str, Vec<(usize, bool)>)> {
    (1usize..=6, 1usize..=6, 1usize..=3).prop_flat_map(|(i, o, r)| {
        prop_oneof![
            Just(("lora", vec![(r * i, true), (o * r, true)])),
            Just(("adapter", vec![(r * i, true), (r, false), (i * r, true), (i, false)])),
            Just(("prompt", vec![(r * i, false)])),
            Just(("prefix", vec![(2 * r * o, false)])),
        ]
    })
}

/// One vector per tensor, widened to f64.
type Tensors = Vec<Vec<f64>>;

/// Which optimizer, and its hyper-parameters.
#[derive(Clone, Debug)]
enum Opt {
    AdamW { lr: f64, b1: f64, b2: f64, eps: f64, wd: f64, clip: Option<f64> },
    Sgd { lr: f64, mu: f64, wd: f64, clip: Option<f64> },
}

fn opt() -> impl Strategy<Value = Opt> {
    let clip = proptest::option::of(0.05f64..2.0);
    let wd = prop_oneof![Just(0.0), 0.05f64..0.5];
    prop_oneof![
        (1e-3f64..0.1, 0.5f64..0.95, 0.9f64..0.9999, prop_oneof![Just(1e-8), 1e-6f64..1e-3], wd.clone(), clip.clone())
            .prop_map(|(lr, b1, b2, eps, wd, clip)| Opt::AdamW { lr, b1, b2, eps, wd, clip }),
        (1e-3f64..0.5, prop_oneof![Just(0.0), 0.5f64..0.95], wd, clip).prop_map(|(lr, mu, wd, clip)| Opt::Sgd {
            lr,
            mu,
            wd,
            clip
        }),
    ]
}

#[derive(Clone, Debug)]
struct Case {
    method: &'static str,
    layout: Vec<(usize, bool)>,
    opt: Opt,
    /// Initial parameters, one vector per tensor.
    params: Vec<Vec<f64>>,
    /// Gradients, per step and tensor.
    grads: Vec<Vec<Vec<f64>>>,
}

fn case() -> impl Strategy<Value = Case> {
    (layouts(), opt(), 1usize..=4).prop_flat_map(|((method, layout), opt, steps)| {
        let vecs = |layout: &[(usize, bool)]| layout.iter().map(|&(n, _)| super::vals(n)).collect::<Vec<_>>();
        let params = vecs(&layout);
        let grads = proptest::collection::vec(vecs(&layout), steps);
        (Just(method), Just(layout), Just(opt), params, grads).prop_map(|(method, layout, opt, params, grads)| Case {
            method,
            layout,
            opt,
            params,
            grads,
        })
    })
}

/// The optimizer in its state: the library's objects.
enum Live {
    AdamW(AdamW),
    Sgd(Sgd),
}

impl Live {
    fn new(o: &Opt) -> Self {
        match *o {
            Opt::AdamW { lr, b1, b2, eps, wd, clip } => {
                let mut o = AdamW::new(lr).with_weight_decay(wd).with_max_grad_norm(clip);
                (o.beta1, o.beta2, o.eps) = (b1, b2, eps);
                Live::AdamW(o)
            }
            Opt::Sgd { lr, mu, wd, clip } => {
                Live::Sgd(Sgd { momentum: mu, weight_decay: wd, max_grad_norm: clip, ..Sgd::new(lr) })
            }
        }
    }

    fn state_len(&self, n: usize) -> usize {
        match self {
            Live::AdamW(o) => o.state_len(n),
            Live::Sgd(o) => o.state_len(n),
        }
    }

    fn steps(&self) -> Option<u64> {
        match self {
            Live::AdamW(o) => Some(o.steps()),
            Live::Sgd(_) => None,
        }
    }

    fn step<E: Element>(&mut self, slots: &mut [Slot<'_, E>], loss: Option<f64>) -> Result<(), Error> {
        match self {
            Live::AdamW(o) => o.step(slots, loss).map(|_| ()),
            Live::Sgd(o) => o.step(slots, loss).map(|_| ()),
        }
    }
}

fn slots<'a, E: Element>(
    params: &'a mut [Vec<E>],
    grads: &'a [Vec<E>],
    state: &'a mut [Vec<E::Accum>],
    layout: &[(usize, bool)],
) -> Vec<Slot<'a, E>> {
    params
        .iter_mut()
        .zip(grads)
        .zip(state.iter_mut())
        .zip(layout)
        .map(|(((p, g), s), &(_, decay))| Slot { param: p, grad: g, state: s, decay })
        .collect()
}

/// One oracle step from `(p, state)` (state in the library's layout:
/// AdamW `[m | v]`, SGD `[v]` or empty), at step number `t`. Returns the new
/// parameters and state, and per parameter a magnitude for the bound (the
/// terms of the update, in absolute value) and an absolute error budget for
/// the bias corrections.
///
/// The corrections `1 - b^t` are computed in f64 by both sides, with
/// different `pow` routines; each carries a relative error of about
/// `u_64 / (1 - b^t)`, which is large for `b2` near 1 and small `t` (the
/// condition number of the subtraction), and the update inherits it.
fn oracle_step(
    o: &Opt,
    t: u64,
    p: &[Vec<f64>],
    g: &[Vec<f64>],
    state: &[Vec<f64>],
    layout: &[(usize, bool)],
) -> (Tensors, Tensors, Tensors, Tensors) {
    let norm = g.iter().flatten().map(|v| v * v).sum::<f64>().sqrt();
    let clip = |max: Option<f64>| match max {
        Some(m) if norm > m => m / norm,
        _ => 1.0,
    };
    let (mut np, mut ns, mut mag, mut bc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (((p, g), s), &(n, decay)) in p.iter().zip(g).zip(state).zip(layout) {
        let (mut p2, mut s2, mut m2, mut c2) = (p.clone(), s.clone(), vec![0.0; n], vec![0.0; n]);
        match *o {
            Opt::AdamW { lr, b1, b2, eps, wd, clip: max } => {
                let c = clip(max);
                let (bc1, bc2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
                let cond = (1.0 / bc1 + 0.5 / bc2) * f64::EPSILON;
                for i in 0..n {
                    let gi = c * g[i];
                    let pd = if decay { p[i] * (1.0 - lr * wd) } else { p[i] };
                    let m = b1 * s[i] + (1.0 - b1) * gi;
                    let v = b2 * s[n + i] + (1.0 - b2) * gi * gi;
                    let upd = lr * (m / bc1) / ((v / bc2).sqrt() + eps);
                    p2[i] = pd - upd;
                    s2[i] = m;
                    s2[n + i] = v;
                    m2[i] = p[i].abs() + upd.abs() + lr * wd * p[i].abs();
                    c2[i] = 8.0 * cond * upd.abs();
                }
            }
            Opt::Sgd { lr, mu, wd, clip: max } => {
                let c = clip(max);
                let w = if decay { wd } else { 0.0 };
                for i in 0..n {
                    let g2 = c * g[i] + w * p[i];
                    let v = if mu == 0.0 { g2 } else { mu * s[i] + g2 };
                    if mu != 0.0 {
                        s2[i] = v;
                    }
                    p2[i] = p[i] - lr * v;
                    let old = if mu == 0.0 { 0.0 } else { mu * s[i].abs() };
                    m2[i] = p[i].abs() + lr * (old + c * g[i].abs() + w * p[i].abs());
                }
            }
        }
        np.push(p2);
        ns.push(s2);
        mag.push(m2);
        bc.push(c2);
    }
    (np, ns, mag, bc)
}

fn bits<E: Element>(v: &[E]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits64()).collect()
}

pub fn run_all<E: Precision>(config: &Config, report: &mut Report) {
    let name = E::NAME;
    run(report, config, "optimizer_matches_oracle", name, case(), |c| {
        let mut live = Live::new(&c.opt);
        let mut params: Vec<Vec<E>> = c.params.iter().map(|p| narrow(p)).collect();
        let mut state: Vec<Vec<E::Accum>> =
            c.layout.iter().map(|&(n, _)| vec![<E::Accum as Element>::from_f64(0.0); live.state_len(n)]).collect();
        for (t, g) in c.grads.iter().enumerate() {
            let t = t as u64 + 1;
            let grads: Vec<Vec<E>> = g.iter().map(|v| narrow(v)).collect();
            let (p0, s0, g0): (Tensors, Tensors, Tensors) = (
                params.iter().map(|p| wide(p)).collect(),
                state.iter().map(|s| wide(s)).collect(),
                grads.iter().map(|g| wide(g)).collect(),
            );
            let (want_p, want_s, mag, bc) = oracle_step(&c.opt, t, &p0, &g0, &s0, &c.layout);
            live.step(&mut slots(&mut params, &grads, &mut state, &c.layout), None)
                .map_err(|e| TestCaseError::fail(format!("{}: step {t} refused: {e}", c.method)))?;
            if let Some(steps) = live.steps() {
                prop_assert_eq!(steps, t, "{}: the step counter", c.method);
            }
            for (k, (((got, want), mag), bc)) in params.iter().zip(&want_p).zip(&mag).zip(&bc).enumerate() {
                for (i, (((g, w), m), b)) in wide(got).iter().zip(want).zip(mag).zip(bc).enumerate() {
                    // The update's arithmetic (a few dozen operations in
                    // E::Accum), the bias corrections' conditioning, and one
                    // rounding to E.
                    let tol = 2.0 * E::U * w.abs() + 64.0 * E::U_ACC * m + b + 4.0 * E::ETA;
                    prop_assert!(
                        (g - w).abs() <= tol,
                        "{} {:?}, step {}: param {}[{}] = {}, oracle {}, bound {}",
                        c.method,
                        c.opt,
                        t,
                        k,
                        i,
                        g,
                        w,
                        tol
                    );
                }
            }
            for (k, (got, want)) in state.iter().zip(&want_s).enumerate() {
                for (i, (g, w)) in wide(got).iter().zip(want).enumerate() {
                    let tol = 16.0 * E::U_ACC * (w.abs() + 1.0) + 4.0 * E::ETA;
                    prop_assert!(
                        (g - w).abs() <= tol,
                        "{} {:?}, step {}: state {}[{}] = {}, oracle {}",
                        c.method,
                        c.opt,
                        t,
                        k,
                        i,
                        g,
                        w
                    );
                }
            }
        }
        Ok(())
    });

    // Where the bad value goes: a gradient element, the loss, or (f64) a
    // finite gradient whose global norm overflows.
    let poison = (0usize..64, prop_oneof![Just(f64::NAN), Just(f64::INFINITY), Just(f64::NEG_INFINITY)], 0u8..3);
    run(report, config, "optimizer_refuses_nonfinite", name, (case(), poison), |(c, (at, bad, place))| {
        let mut live = Live::new(&c.opt);
        let mut params: Vec<Vec<E>> = c.params.iter().map(|p| narrow(p)).collect();
        let mut state: Vec<Vec<E::Accum>> =
            c.layout.iter().map(|&(n, _)| vec![<E::Accum as Element>::from_f64(0.0); live.state_len(n)]).collect();
        // One good step first, so state and counter are not trivially zero.
        let good: Vec<Vec<E>> = c.grads[0].iter().map(|v| narrow(v)).collect();
        live.step(&mut slots(&mut params, &good, &mut state, &c.layout), None)
            .map_err(|e| TestCaseError::fail(format!("good step refused: {e}")))?;
        let mut grads = good.clone();
        let total: usize = c.layout.iter().map(|&(n, _)| n).sum();
        let mut loss = Some(0.5);
        let huge = place == 2 && E::NAME == "f64";
        match place {
            0 | 2 => {
                let (mut k, mut i) = (0, at % total);
                while i >= grads[k].len() {
                    i -= grads[k].len();
                    k += 1;
                }
                if huge {
                    // Finite values whose squares overflow the f64 sum.
                    for g in grads.iter_mut().flatten() {
                        *g = E::from_f64(1e300);
                    }
                } else {
                    grads[k][i] = E::from_f64(bad);
                }
            }
            _ => loss = Some(bad),
        }
        let (p0, s0, t0) = (
            params.iter().map(|p| bits(p)).collect::<Vec<_>>(),
            state.iter().map(|s| bits(s)).collect::<Vec<_>>(),
            live.steps(),
        );
        let res = live.step(&mut slots(&mut params, &grads, &mut state, &c.layout), loss);
        let want_operand = if place == 1 { Operand::Loss } else { Operand::Gradient };
        prop_assert!(
            matches!(res, Err(Error::NonFinite { operand, .. }) if operand == want_operand),
            "{}: a non-finite {:?} step was not refused: {:?}",
            c.method,
            want_operand,
            res
        );
        prop_assert!(
            params.iter().map(|p| bits(p)).collect::<Vec<_>>() == p0,
            "{}: refused step wrote a parameter",
            c.method
        );
        prop_assert!(
            state.iter().map(|s| bits(s)).collect::<Vec<_>>() == s0,
            "{}: refused step wrote the state",
            c.method
        );
        prop_assert_eq!(live.steps(), t0, "{}: refused step advanced the counter", c.method);
        Ok(())
    });
}
