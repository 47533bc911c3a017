//! LoRA on an embedding table: identity at init, the lookup against the
//! oracle, merged equals unmerged, gradients against finite differences.

use peft_core::delta::DeltaRows;
use peft_core::lora::{LoraConfig, LoraEmbedding, LoraEmbeddingGrads};
use peft_core::{Accum, Backend, MatMut, MatRef, Reference, Rng};
use proptest::prelude::*;

use super::vals;
use crate::oracle;
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

/// A table `[vocab, dim]`, an adapter of rank `r`, ids and an upstream
/// gradient.
#[derive(Debug, Clone)]
pub struct EmbCase {
    vocab: usize,
    dim: usize,
    r: usize,
    alpha: f64,
    table: Vec<f64>,
    a: Vec<f64>,
    b: Vec<f64>,
    ids: Vec<usize>,
    g: Vec<f64>,
    seed: u64,
}

fn emb_case() -> impl Strategy<Value = EmbCase> {
    (2usize..=12, 1usize..=8, 1usize..=6)
        .prop_flat_map(|(vocab, dim, n)| (Just((vocab, dim, n)), 1..=vocab.min(dim)))
        .prop_flat_map(|((vocab, dim, n), r)| {
            (
                (vals(vocab * dim), vals(r * vocab), vals(dim * r), vals(n * dim)),
                (prop::collection::vec(0..vocab, n), 0.5f64..8.0, any::<u64>()),
            )
                .prop_map(move |((table, a, b, g), (ids, alpha, seed))| EmbCase {
                    vocab,
                    dim,
                    r,
                    alpha,
                    table,
                    a,
                    b,
                    ids,
                    g,
                    seed,
                })
        })
}

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// `y_t = E[id_t] + s B A[:, id_t]` in f64, and its magnitude.
fn oracle_y(c: &EmbCase, table: &[f64], a: &[f64], b: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let s = c.alpha / c.r as f64;
    let (mut y, mut mag) = (Vec::new(), Vec::new());
    for &id in &c.ids {
        for j in 0..c.dim {
            let low: f64 = (0..c.r).map(|k| b[j * c.r + k] * a[k * c.vocab + id]).sum();
            let low_abs: f64 = (0..c.r).map(|k| (b[j * c.r + k] * a[k * c.vocab + id]).abs()).sum();
            y.push(table[id * c.dim + j] + s * low);
            mag.push(table[id * c.dim + j].abs() + s * low_abs);
        }
    }
    (y, mag)
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;
    let forward = |c: &EmbCase, lora: &LoraEmbedding<E, &[E]>, table: &[E]| -> Result<Vec<E>, TestCaseError> {
        let n = c.ids.len();
        let mut y = vec![E::ZERO; n * c.dim];
        let mut sc = vec![E::ZERO; lora.scratch_len(n)];
        lora.forward(backend, table, &c.ids, MatMut::new(&mut y, n, c.dim).map_err(fail)?, &mut sc).map_err(fail)?;
        Ok(y)
    };

    run(report, config, "lora_embedding_matches_oracle", name, emb_case(), |c| {
        let (table, a, b): (Vec<E>, Vec<E>, Vec<E>) = (narrow(&c.table), narrow(&c.a), narrow(&c.b));
        let lora = LoraEmbedding::new(&LoraConfig::new(c.r, c.alpha), c.vocab, c.dim, &a[..], &b[..]).map_err(fail)?;
        let y = forward(&c, &lora, &table)?;
        let (want, mag) = oracle_y(&c, &wide(&table), &wide(&a), &wide(&b));
        close::<E>("y", &wide(&y), &want, &mag, c.r + 3)
    });

    run(report, config, "lora_embedding_identity_at_init", name, emb_case(), |c| {
        let table: Vec<E> = narrow(&c.table);
        let (mut a, mut b): (Vec<E>, Vec<E>) = (narrow(&c.a), narrow(&c.b));
        let mut lora =
            LoraEmbedding::new(&LoraConfig::new(c.r, c.alpha), c.vocab, c.dim, &mut a[..], &mut b[..]).map_err(fail)?;
        lora.init_adapter(&mut Rng::new(c.seed));
        let view = LoraEmbedding::new(&LoraConfig::new(c.r, c.alpha), c.vocab, c.dim, lora.lora_a(), lora.lora_b())
            .map_err(fail)?;
        let y = forward(&c, &view, &table)?;
        for (t, &id) in c.ids.iter().enumerate() {
            for j in 0..c.dim {
                let (got, want) = (y[t * c.dim + j].to_f64(), table[id * c.dim + j].to_f64());
                prop_assert!(got == want, "y[{}, {}] = {}, table {}", t, j, got, want);
            }
        }
        Ok(())
    });

    run(report, config, "lora_embedding_merged_equals_unmerged", name, emb_case(), |c| {
        let (mut table, a, b): (Vec<E>, Vec<E>, Vec<E>) = (narrow(&c.table), narrow(&c.a), narrow(&c.b));
        let lora = LoraEmbedding::new(&LoraConfig::new(c.r, c.alpha), c.vocab, c.dim, &a[..], &b[..]).map_err(fail)?;
        let y = forward(&c, &lora, &table)?;
        let (_, mag) = oracle_y(&c, &wide(&table), &wide(&a), &wide(&b));
        let dst = MatMut::new(&mut table, c.vocab, c.dim).map_err(fail)?;
        lora.delta_rows(backend, 0, dst, Accum::Add, 1.0, &mut []).map_err(fail)?;
        let merged: Vec<f64> = c.ids.iter().flat_map(|&id| wide(&table[id * c.dim..(id + 1) * c.dim])).collect();
        let mag: Vec<f64> = mag.iter().map(|m| 3.0 * m).collect();
        close::<E>("merged rows", &merged, &wide(&y), &mag, c.r + 3)
    });

    run(report, config, "lora_embedding_unmerge_restores", name, emb_case(), |c| {
        let (table, a, b): (Vec<E>, Vec<E>, Vec<E>) = (narrow(&c.table), narrow(&c.a), narrow(&c.b));
        let lora = LoraEmbedding::new(&LoraConfig::new(c.r, c.alpha), c.vocab, c.dim, &a[..], &b[..]).map_err(fail)?;
        // |s (B A)^T| per table element, from the rounded factors.
        let s = c.alpha / c.r as f64;
        let (aw, bw) = (wide(&a), wide(&b));
        let dmag: Vec<f64> = (0..c.vocab * c.dim)
            .map(|i| {
                let (id, j) = (i / c.dim, i % c.dim);
                (0..c.r).map(|k| (s * bw[j * c.r + k] * aw[k * c.vocab + id]).abs()).sum()
            })
            .collect();
        super::check_delta_guard(backend, &lora, &table, &dmag)
    });

    run(report, config, "lora_embedding_gradients_match_fd", name, emb_case(), |c| {
        let (table, a, b): (Vec<E>, Vec<E>, Vec<E>) = (narrow(&c.table), narrow(&c.a), narrow(&c.b));
        let g: Vec<E> = narrow(&c.g);
        let lora = LoraEmbedding::new(&LoraConfig::new(c.r, c.alpha), c.vocab, c.dim, &a[..], &b[..]).map_err(fail)?;
        let (mut ga, mut gb) = (vec![E::ZERO; a.len()], vec![E::ZERO; b.len()]);
        let mut sc = vec![E::ZERO; 2 * lora.scratch_len(c.ids.len())];
        let gv = MatRef::new(&g, c.ids.len(), c.dim).map_err(fail)?;
        lora.backward(backend, &c.ids, gv, LoraEmbeddingGrads { a: &mut ga, b: &mut gb }, &mut sc).map_err(fail)?;
        let (tw, aw, bw, gw) = (wide(&table), wide(&a), wide(&b), wide(&g));
        let loss = |a: &[f64], b: &[f64]| {
            let (y, _) = oracle_y(&c, &tw, a, b);
            y.iter().zip(&gw).map(|(y, g)| y * g).sum::<f64>()
        };
        let fa = oracle::grad_fd(&aw, 1e-6, |p| loss(p, &bw));
        let fb = oracle::grad_fd(&bw, 1e-6, |p| loss(&aw, p));
        let scale = (c.alpha / c.r as f64 + 1.0) * (c.ids.len() * c.dim * c.r) as f64;
        let k = c.ids.len() + c.dim + c.r;
        close_norm::<E>("dA", &wide(&ga), &fa, scale, k)?;
        close_norm::<E>("dB", &wide(&gb), &fb, scale, k)
    });
}
