//! Training steps never touch the frozen base (mistake 1), and adapter
//! files hold the adapter alone (mistake 10).
use peft_core::adapter::{AdapterConfig, AdapterGrads, AdapterParams, BottleneckAdapter};
use peft_core::attention::forward as attn_forward;
use peft_core::attention::{AttentionGrads, backward as attn_backward};
use peft_core::attention::{AttentionShape, Mask, backward_scratch_len, forward_scratch_len};
use peft_core::format::{AdapterFile, Tensor, encode, encoded_len};
use peft_core::lora::{Lora, LoraGrads};
use peft_core::method::{LinearAdapter, MergeTarget, WeightUpdate};
use peft_core::optim::Method;
use peft_core::optim::{AdamW, Slot};
use peft_core::prefix::{PrefixConfig, PrefixTuning};
use peft_core::prompt::PromptTuning;
use peft_core::{Backend, Dense, Error, MatMut, MatRef, Rng};
use proptest::prelude::*;

use super::lora::{Tensors, case};
use crate::{Config, Precision, Report, narrow, run};

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

fn bits<E: Precision>(v: &[E]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits64()).collect()
}

/// One AdamW step over `(param, grad)` pairs with state in `E::Accum`.
fn step<E: Precision>(opt: &mut AdamW, pairs: Vec<(&mut [E], &[E])>, state: &mut [Vec<E::Accum>]) -> Result<(), Error> {
    let mut slots: Vec<Slot<'_, E>> = pairs
        .into_iter()
        .zip(state.iter_mut())
        .map(|((p, g), s)| Slot { param: p, grad: g, state: s, decay: true })
        .collect();
    opt.step(&mut slots, None).map(|_| ())
}

fn state<E: Precision>(lens: &[usize]) -> Vec<Vec<E::Accum>> {
    lens.iter().map(|&n| vec![<E::Accum as peft_core::Element>::from_f64(0.0); 2 * n]).collect()
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report) {
    let name = E::NAME;
    run(report, config, "frozen_base_untouched", name, case(), |c| {
        let steps = 3;
        let mut t = Tensors::<E>::of(&c);
        let (w0, b0) = (bits(&t.w), t.bias.as_deref().map(bits));
        let (a0, bb0) = (bits(&t.a), bits(&t.b));
        let (x, g) = (t.x.clone(), t.g.clone());
        let mut opt = AdamW::new(1e-2);
        // LoRA: forward, backward, AdamW on A and B, and a merge/unmerge
        // cycle with a backup.
        {
            let cfg = c.config();
            let mut st = state::<E>(&[t.a.len(), t.b.len()]);
            let mut layer = Lora::new(&cfg, c.n_in, c.n_out, &mut t.a[..], &mut t.b[..]).map_err(fail)?;
            let mut scratch = vec![E::ZERO; layer.backward_scratch_len(c.t)];
            let mut y = vec![E::ZERO; c.t * c.n_out];
            for _ in 0..steps {
                let base = Dense::new(&t.w, c.n_out, c.n_in).map_err(fail)?;
                let base = match &t.bias {
                    Some(bias) => base.with_bias(bias).map_err(fail)?,
                    None => base,
                };
                let xv = MatRef::new(&x, c.t, c.n_in).map_err(fail)?;
                layer
                    .forward(backend, &base, xv, MatMut::new(&mut y, c.t, c.n_out).map_err(fail)?, &mut scratch)
                    .map_err(fail)?;
                let (mut ga, mut gb) = (vec![E::ZERO; c.r * c.n_in], vec![E::ZERO; c.n_out * c.r]);
                let gv = MatRef::new(&g, c.t, c.n_out).map_err(fail)?;
                layer
                    .backward(backend, &base, xv, gv, None, LoraGrads::new(&mut ga, &mut gb), &mut scratch)
                    .map_err(fail)?;
                let (a, b) = layer.adapter_mut();
                step::<E>(&mut opt, vec![(a, &ga), (b, &gb)], &mut st).map_err(fail)?;
            }
            let mut backup = vec![E::ZERO; c.n_out * c.n_in];
            layer
                .merge_into(backend, MergeTarget::new(&mut t.w).with_backup(&mut backup), &mut [])
                .map_err(fail)?
                .unmerge()
                .map_err(fail)?;
        }
        prop_assert!(bits(&t.w) == w0, "LoRA training changed W");
        prop_assert!(t.bias.as_deref().map(bits) == b0, "LoRA training changed the bias");
        // A case in which the adapter cannot move (a zero gradient) says
        // nothing about the base: it is skipped, not failed, so that
        // shrinking cannot trade the real failure ("training changed W")
        // for this one.
        prop_assume!(bits(&t.a) != a0 || bits(&t.b) != bb0, "the adapter did not train");

        // Adapter after a frozen linear layer: h = Ad(x W^T).
        let frozen_w = t.w.clone();
        let mut z = vec![E::ZERO; c.t * c.n_out];
        let one = <E::Accum as peft_core::Element>::from_f64(1.0);
        backend
            .gemm(
                MatMut::new(&mut z, c.t, c.n_out).map_err(fail)?,
                peft_core::Accum::Replace,
                MatRef::new(&x, c.t, c.n_in).map_err(fail)?,
                peft_core::Op::N,
                MatRef::new(&frozen_w, c.n_out, c.n_in).map_err(fail)?,
                peft_core::Op::T,
                one,
            )
            .map_err(fail)?;
        let m = c.r;
        let (mut wd, mut bd, mut wu, mut bu) =
            (vec![E::ZERO; m * c.n_out], vec![E::ZERO; m], vec![E::ZERO; c.n_out * m], vec![E::ZERO; c.n_out]);
        {
            let mut st = state::<E>(&[wd.len(), bd.len(), wu.len(), bu.len()]);
            let cfg = AdapterConfig::width(m);
            let mut ad = BottleneckAdapter::new(
                &cfg,
                c.n_out,
                AdapterParams { w_down: &mut wd, b_down: &mut bd, w_up: &mut wu, b_up: &mut bu },
            )
            .map_err(fail)?;
            ad.init(&mut Rng::new(c.seed));
            let mut scratch = vec![E::ZERO; ad.backward_scratch_len(c.t)];
            for _ in 0..steps {
                let mut grads =
                    (vec![E::ZERO; m * c.n_out], vec![E::ZERO; m], vec![E::ZERO; c.n_out * m], vec![E::ZERO; c.n_out]);
                let zv = MatRef::new(&z, c.t, c.n_out).map_err(fail)?;
                let gv = MatRef::new(&g, c.t, c.n_out).map_err(fail)?;
                let ag =
                    AdapterGrads { w_down: &mut grads.0, b_down: &mut grads.1, w_up: &mut grads.2, b_up: &mut grads.3 };
                ad.backward(backend, zv, gv, None, ag, &mut scratch).map_err(fail)?;
                let p = ad.params_mut();
                step::<E>(
                    &mut opt,
                    vec![(p.w_down, &grads.0), (p.b_down, &grads.1), (p.w_up, &grads.2), (p.b_up, &grads.3)],
                    &mut st,
                )
                .map_err(fail)?;
            }
        }
        prop_assert!(bits(&frozen_w) == w0, "adapter training changed the frozen layer");
        prop_assume!(wu.iter().chain(&bu).any(|v| v.to_f64() != 0.0), "the adapter did not train");

        // Prompt tuning over a frozen embedding table.
        let table: Vec<E> = t.x.clone();
        let table0 = bits(&table);
        let mut prompt: Vec<E> = narrow(&vec![0.25; 2 * c.n_in]);
        {
            let mut st = state::<E>(&[prompt.len()]);
            for _ in 0..steps {
                let pt = PromptTuning::new(&mut prompt, 2, c.n_in).map_err(fail)?;
                let mut ext = vec![E::ZERO; (c.t + 2) * c.n_in];
                pt.prepend(&table, 1, c.t, &mut ext).map_err(fail)?;
                let gext: Vec<E> = ext.iter().map(|v| E::from_f64(2.0 * v.to_f64())).collect();
                let mut gp = vec![E::ZERO; 2 * c.n_in];
                pt.backward(&gext, 1, c.t, &mut gp, None).map_err(fail)?;
                step::<E>(&mut opt, vec![(&mut prompt, &gp)], &mut st).map_err(fail)?;
            }
        }
        prop_assert!(bits(&table) == table0, "prompt tuning changed the embedding table");

        // Prefix tuning: q, k, v from the frozen projection, trainable prefix.
        let shape = AttentionShape::new(1, 1, c.n_out).map_err(fail)?;
        let pc = PrefixConfig::new(2, 1, &shape).map_err(fail)?;
        let mut kv: Vec<E> = narrow(&vec![0.5; pc.len()]);
        let kv0 = bits(&kv);
        {
            let mut st = state::<E>(&[kv.len()]);
            for _ in 0..steps {
                let mut gkv = vec![E::ZERO; pc.len()];
                {
                    let pt = PrefixTuning::new(pc, &mut kv).map_err(fail)?;
                    let prefix = pt.layer(0).map_err(fail)?;
                    let zv = MatRef::new(&z, c.t, c.n_out).map_err(fail)?;
                    let mut o = vec![E::ZERO; c.t * c.n_out];
                    let mut scratch =
                        vec![E::ZERO; backward_scratch_len(c.t, c.t, 2).max(forward_scratch_len(c.t, c.t, 2))];
                    attn_forward(
                        backend,
                        &shape,
                        zv,
                        zv,
                        zv,
                        Some(&prefix),
                        &Mask::causal(),
                        MatMut::new(&mut o, c.t, c.n_out).map_err(fail)?,
                        &mut scratch,
                    )
                    .map_err(fail)?;
                    let (mut gq, mut gk, mut gv) =
                        (vec![E::ZERO; c.t * c.n_out], vec![E::ZERO; c.t * c.n_out], vec![E::ZERO; c.t * c.n_out]);
                    let grads = AttentionGrads {
                        q: MatMut::new(&mut gq, c.t, c.n_out).map_err(fail)?,
                        k: MatMut::new(&mut gk, c.t, c.n_out).map_err(fail)?,
                        v: MatMut::new(&mut gv, c.t, c.n_out).map_err(fail)?,
                        prefix: Some(pc.layer_grads(&mut gkv, 0).map_err(fail)?),
                    };
                    let gov = MatRef::new(&g, c.t, c.n_out).map_err(fail)?;
                    attn_backward(
                        backend,
                        &shape,
                        zv,
                        zv,
                        zv,
                        Some(&prefix),
                        &Mask::causal(),
                        gov,
                        grads,
                        &mut scratch,
                    )
                    .map_err(fail)?;
                }
                step::<E>(&mut opt, vec![(&mut kv, &gkv)], &mut st).map_err(fail)?;
            }
        }
        prop_assert!(bits(&frozen_w) == w0, "prefix tuning changed the frozen projection");
        prop_assume!(bits(&kv) != kv0, "the prefix did not train");
        Ok(())
    });

    run(report, config, "adapter_file_round_trip", name, case(), |c| {
        let t = Tensors::<E>::of(&c);
        let tensors = [
            Tensor { name: "lora_A.weight", shape: &[c.r, c.n_in], data: &t.a[..] },
            Tensor { name: "lora_B.weight", shape: &[c.n_out, c.r], data: &t.b[..] },
        ];
        let cfg =
            [("r", peft_core::format::Value::U64(c.r as u64)), ("lora_alpha", peft_core::format::Value::F64(c.alpha))];
        let mut buf = vec![0u8; encoded_len(&cfg, &tensors).map_err(fail)?];
        encode(Method::Lora, &cfg, &tensors, &mut buf).map_err(fail)?;
        let f = AdapterFile::parse(&buf).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(f.num_tensors(), 2, "the file holds more than the adapter");
        prop_assert!(f.tensors().all(|v| v.name().starts_with("lora_")));
        for (tv, want) in f.tensors().zip([&t.a, &t.b]) {
            let mut back = vec![E::ZERO; tv.numel()];
            tv.read_into(&mut back).map_err(fail)?;
            prop_assert!(bits(&back) == bits(want), "{} not bit-exact", tv.name());
        }
        prop_assert_eq!(f.get_f64("lora_alpha").ok(), Some(c.alpha));
        Ok(())
    });
}
