//! Trains a LoRA adapter on a small built-in problem and prints the loss.
//!
//! A frozen 64x64 layer `W` must learn to behave like a "teacher"
//! `W + D`, where `D` is a hidden rank-2 change. A rank-4 adapter (more than
//! enough) is trained by plain SGD on the mean squared error; the held-out
//! loss should fall by orders of magnitude while `W` stays bit-identical.
//!
//! Run: `cargo run --release -p peft-core --example train_lora`
use peft_core::lora::{Lora, LoraConfig, LoraGrads};
use peft_core::method::{LinearAdapter, MergeTarget, WeightUpdate};
use peft_core::{Accum, Backend, Op, Reference};
use peft_core::{Dense, MatMut, MatRef, Rng};

const D: usize = 64;
const RANK: usize = 4;
const HIDDEN_RANK: usize = 2;
const TOKENS: usize = 32;

/// `y = x M^T`.
fn apply(m: &[f32], x: &[f32], tokens: usize) -> peft_core::Result<Vec<f32>> {
    let mut y = vec![0.0; tokens * D];
    Reference.gemm(
        MatMut::new(&mut y, tokens, D)?,
        Accum::Replace,
        MatRef::new(x, tokens, D)?,
        Op::N,
        MatRef::new(m, D, D)?,
        Op::T,
        1.0,
    )?;
    Ok(y)
}

fn main() -> peft_core::Result<()> {
    let mut rng = Rng::new(2024);
    let mut w = vec![0.0f32; D * D];
    rng.fill_normal(&mut w, 1.0 / (D as f64).sqrt());
    let w_before = w.clone();

    // Teacher: W + U V with U [D, 2], V [2, D].
    let (mut u, mut v) = (vec![0.0f32; D * HIDDEN_RANK], vec![0.0f32; HIDDEN_RANK * D]);
    rng.fill_normal(&mut u, 0.5);
    rng.fill_normal(&mut v, 0.5);
    let mut teacher = w.clone();
    Reference.gemm(
        MatMut::new(&mut teacher, D, D)?,
        Accum::Add,
        MatRef::new(&u, D, HIDDEN_RANK)?,
        Op::N,
        MatRef::new(&v, HIDDEN_RANK, D)?,
        Op::N,
        1.0,
    )?;

    let mut held_out = vec![0.0f32; TOKENS * D];
    rng.fill_normal(&mut held_out, 1.0);
    let held_out_target = apply(&teacher, &held_out, TOKENS)?;

    let cfg = LoraConfig::new(RANK, 8.0);
    let (mut a, mut b) = (vec![0.0f32; RANK * D], vec![0.0f32; D * RANK]);
    let mut layer = Lora::new(&cfg, D, D, &mut a[..], &mut b[..])?;
    layer.init_adapter(&mut rng);
    let report = layer.param_report(false)?;
    println!(
        "LoRA r={RANK} on a {D}x{D} layer: {} trainable of {} base parameters ({:.1}%), scale {}",
        report.trainable,
        report.base,
        100.0 * report.ratio(),
        layer.scale()
    );

    let mut scratch = vec![0.0f32; layer.backward_scratch_len(TOKENS)];
    let mut y = vec![0.0f32; TOKENS * D];
    // The frozen base: read only, shared by the loss and the training loop.
    let base = Dense::new(&w, D, D)?;
    let mse =
        |y: &[f32]| y.iter().zip(&held_out_target).map(|(p, t)| (p - t) * (p - t)).sum::<f32>() / (TOKENS * D) as f32;
    let loss = |layer: &Lora<f32, &mut [f32]>, y: &mut [f32], scratch: &mut [f32]| -> peft_core::Result<f32> {
        let x = MatRef::new(&held_out, TOKENS, D)?;
        layer.forward(&Reference, &base, x, MatMut::new(y, TOKENS, D)?, scratch)?;
        Ok(y.iter().zip(&held_out_target).map(|(p, t)| (p - t) * (p - t)).sum::<f32>() / (TOKENS * D) as f32)
    };
    let lr = 0.002f32;
    let (mut ga, mut gb) = (vec![0.0f32; RANK * D], vec![0.0f32; D * RANK]);
    let mut x = vec![0.0f32; TOKENS * D];
    for step in 0..=300 {
        if step % 25 == 0 {
            println!("step {step:4}  held-out mse {:.3e}", loss(&layer, &mut y, &mut scratch)?);
        }
        rng.fill_normal(&mut x, 1.0);
        let target = apply(&teacher, &x, TOKENS)?;
        let xv = MatRef::new(&x, TOKENS, D)?;
        layer.forward(&Reference, &base, xv, MatMut::new(&mut y, TOKENS, D)?, &mut scratch)?;
        // L = sum((y - t)^2) / tokens  =>  dL/dy = 2 (y - t) / tokens
        let gy: Vec<f32> = y.iter().zip(&target).map(|(p, t)| 2.0 * (p - t) / TOKENS as f32).collect();
        ga.fill(0.0);
        gb.fill(0.0);
        layer.backward(
            &Reference,
            &base,
            xv,
            MatRef::new(&gy, TOKENS, D)?,
            None,
            LoraGrads::new(&mut ga, &mut gb),
            &mut scratch,
        )?;
        let (a, b) = layer.adapter_mut();
        for (p, g) in a.iter_mut().zip(&ga).chain(b.iter_mut().zip(&gb)) {
            *p -= lr * g;
        }
    }
    let mut backup = vec![0.0f32; D * D];
    let merged = layer.merge_into(&Reference, MergeTarget::new(&mut w).with_backup(&mut backup), &mut [])?;
    merged.forward(MatRef::new(&held_out, TOKENS, D)?, MatMut::new(&mut y, TOKENS, D)?)?;
    println!("merged:    held-out mse {:.3e}, one matmul per forward", mse(&y));
    merged.unmerge()?;
    let identical = w.iter().zip(&w_before).all(|(p, q)| p.to_bits() == q.to_bits());
    println!("frozen base bit-identical after training and merge/unmerge cycle: {identical}");
    Ok(())
}
