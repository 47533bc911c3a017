//! Prompt tuning: where the virtual tokens go, the mask, the positions,
//! the gradient.

use peft_core::prompt::PromptTuning;
use proptest::prelude::*;

use super::vals;
use crate::{Config, Precision, Report, narrow, run, wide};

#[derive(Debug, Clone)]
struct Case {
    b: usize,
    seq: usize,
    d: usize,
    nv: usize,
    prompt: Vec<f64>,
    embeds: Vec<f64>,
    pads: Vec<usize>,
    g: Vec<f64>,
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..=3, 1usize..=5, 1usize..=6, 1usize..=4).prop_flat_map(|(b, seq, d, nv)| {
        (vals(nv * d), vals(b * seq * d), prop::collection::vec(0..seq, b), vals(b * (seq + nv) * d))
            .prop_map(move |(prompt, embeds, pads, g)| Case { b, seq, d, nv, prompt, embeds, pads, g })
    })
}

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

pub fn run_all<E: Precision>(config: &Config, report: &mut Report) {
    run(report, config, "prompt_prepends_and_shifts", E::NAME, case(), |c| {
        let mut prompt: Vec<E> = narrow(&c.prompt);
        let embeds: Vec<E> = narrow(&c.embeds);
        let pt = PromptTuning::new(&mut prompt, c.nv, c.d).map_err(fail)?;
        let ext = c.seq + c.nv;
        let mut out = vec![E::ZERO; c.b * ext * c.d];
        pt.prepend(&embeds, c.b, c.seq, &mut out).map_err(fail)?;
        // Left padding: sequence i has pads[i] padded positions first.
        let mask: Vec<u8> = (0..c.b * c.seq).map(|k| u8::from(k % c.seq >= c.pads[k / c.seq])).collect();
        let (mut ext_mask, mut pos) = (vec![9u8; c.b * ext], vec![usize::MAX; c.b * ext]);
        pt.extend_mask(&mask, c.b, c.seq, &mut ext_mask, &mut pos).map_err(fail)?;
        for bi in 0..c.b {
            for r in 0..ext {
                let row = &out[(bi * ext + r) * c.d..(bi * ext + r + 1) * c.d];
                let want = if r < c.nv {
                    &c.prompt[r * c.d..(r + 1) * c.d]
                } else {
                    &c.embeds[(bi * c.seq + r - c.nv) * c.d..(bi * c.seq + r - c.nv + 1) * c.d]
                };
                prop_assert!(
                    wide(row).iter().zip(want).all(|(a, b)| *a == E::from_f64(*b).to_f64()),
                    "row {} of batch {}",
                    r,
                    bi
                );
                let m = ext_mask[bi * ext + r];
                let want_m = if r < c.nv { 1 } else { mask[bi * c.seq + r - c.nv] };
                prop_assert_eq!(m, want_m, "mask at {} of batch {}", r, bi);
                let p = pos[bi * ext + r];
                // Hugging Face: cumsum(mask) - 1, pads at 1. Without padding
                // real token j sits at n_virtual + j.
                let want_p = if r < c.nv {
                    r
                } else if want_m == 0 {
                    1
                } else {
                    c.nv + (r - c.nv - c.pads[bi])
                };
                prop_assert_eq!(p, want_p, "position at {} of batch {}", r, bi);
            }
        }
        Ok(())
    });

    run(report, config, "prompt_gradient_is_batch_sum", E::NAME, case(), |c| {
        let mut prompt: Vec<E> = narrow(&c.prompt);
        let g: Vec<E> = narrow(&c.g);
        let pt = PromptTuning::new(&mut prompt, c.nv, c.d).map_err(fail)?;
        let ext = c.seq + c.nv;
        let mut gp = vec![E::ZERO; c.nv * c.d];
        let mut ge = vec![E::ZERO; c.b * c.seq * c.d];
        pt.backward(&g, c.b, c.seq, &mut gp, Some(&mut ge)).map_err(fail)?;
        let gw = wide(&g);
        for k in 0..c.nv * c.d {
            let want: f64 = (0..c.b).map(|bi| gw[bi * ext * c.d + k]).sum();
            let tol = crate::bound::<E>(c.b, (0..c.b).map(|bi| gw[bi * ext * c.d + k].abs()).sum());
            prop_assert!((gp[k].to_f64() - want).abs() <= tol, "dprompt[{}]", k);
        }
        for bi in 0..c.b {
            for k in 0..c.seq * c.d {
                prop_assert_eq!(ge[bi * c.seq * c.d + k].to_bits64(), g[(bi * ext + c.nv) * c.d + k].to_bits64());
            }
        }
        Ok(())
    });
}
