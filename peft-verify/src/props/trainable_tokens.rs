//! Trainable tokens: identity at PEFT's init, the lookup and the tied
//! output layer against the oracle, the merged table against the unmerged
//! lookup, the replacement's bit-exact unmerge, gradients against finite
//! differences.
use peft_core::method::{MergeTarget, WeightUpdate};
use peft_core::trainable_tokens::TrainableTokens;
use peft_core::{Backend, MatMut, MatRef, Reference};
use proptest::prelude::*;

use super::{bits, vals};
use crate::oracle;
use crate::{Config, Precision, Report, close, close_norm, narrow, run, wide};

fn fail(e: impl core::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("unexpected error: {e}"))
}

/// A table `[vocab, dim]`, `k` distinct trained tokens (unsorted) and their
/// rows, looked-up ids (trained ones among them), and a pass's gradients.
#[derive(Clone, Debug)]
pub struct TokensCase {
    vocab: usize,
    dim: usize,
    table: Vec<f64>,
    indices: Vec<u32>,
    rows: Vec<f64>,
    ids: Vec<usize>,
    /// `dL/dy [ids, dim]`.
    g: Vec<f64>,
    /// The tied output layer's input `[t, dim]` and `dL/dlogits [t, vocab]`.
    x: Vec<f64>,
    gl: Vec<f64>,
    t: usize,
}

fn case_in(max_d: usize) -> impl Strategy<Value = TokensCase> {
    (2usize..=max_d, 1usize..=max_d, 1usize..=6)
        .prop_flat_map(|(vocab, dim, t)| {
            let k = 1..=vocab;
            (Just((vocab, dim, t)), k)
        })
        .prop_flat_map(|((vocab, dim, t), k)| {
            // k distinct tokens in a random order: a shuffled prefix of the vocabulary.
            let order = Just((0..vocab as u32).collect::<Vec<u32>>()).prop_shuffle();
            let ids = prop::collection::vec(0..vocab, 1..=8);
            (Just((vocab, dim, t, k)), order, ids, vals(vocab * dim), vals(k * dim), vals(t * dim), vals(t * vocab))
        })
        .prop_flat_map(|((vocab, dim, t, k), order, ids, table, rows, x, gl)| {
            let n = ids.len();
            vals(n * dim).prop_map(move |g| TokensCase {
                vocab,
                dim,
                table: table.clone(),
                indices: order[..k].to_vec(),
                rows: rows.clone(),
                ids: ids.clone(),
                g,
                x: x.clone(),
                gl: gl.clone(),
                t,
            })
        })
}

/// The oracle: `E'` of the case, `[vocab, dim]`, rows in f64.
fn replaced(c: &TokensCase, table: &[f64], rows: &[f64]) -> Vec<f64> {
    let mut e = table.to_vec();
    for (i, &id) in c.indices.iter().enumerate() {
        let id = id as usize;
        e[id * c.dim..(id + 1) * c.dim].copy_from_slice(&rows[i * c.dim..(i + 1) * c.dim]);
    }
    e
}

type Layer<E> = TrainableTokens<E, Vec<E>, Vec<u32>>;

fn adapter<E: Precision>(c: &TokensCase) -> Result<Layer<E>, TestCaseError> {
    TrainableTokens::new(c.vocab, c.dim, c.indices.clone(), narrow(&c.rows)).map_err(fail)
}

fn lookup<E: Precision>(l: &Layer<E>, c: &TokensCase, table: &[E]) -> Result<Vec<E>, TestCaseError> {
    let mut y = vec![E::ZERO; c.ids.len() * c.dim];
    l.forward(table, &c.ids, MatMut::new(&mut y, c.ids.len(), c.dim).map_err(fail)?).map_err(fail)?;
    Ok(y)
}

pub fn run_all<E: Precision, B: Backend<E>>(backend: &B, config: &Config, report: &mut Report)
where
    Reference: Backend<E>,
{
    let name = E::NAME;
    let max_d = config.method_dims().1;

    run(report, config, "trainable_tokens_identity_at_init", name, case_in(max_d), |c| {
        let table = narrow::<E>(&c.table);
        let mut l = adapter::<E>(&c)?;
        l.init_from_table(&table).map_err(fail)?;
        let y = lookup(&l, &c, &table)?;
        let want: Vec<E> = c.ids.iter().flat_map(|&id| table[id * c.dim..(id + 1) * c.dim].to_vec()).collect();
        prop_assert!(bits(&y) == bits(&want), "the fresh adapter's lookup is not the table's");
        Ok(())
    });

    run(report, config, "trainable_tokens_matches_oracle", name, case_in(max_d), |c| {
        let (table, l) = (narrow::<E>(&c.table), adapter::<E>(&c)?);
        let e = replaced(&c, &wide(&table), &wide(l.rows()));
        let y = lookup(&l, &c, &table)?;
        let want: Vec<f64> = c.ids.iter().flat_map(|&id| e[id * c.dim..(id + 1) * c.dim].to_vec()).collect();
        prop_assert!(wide(&y) == want, "lookup differs from E'");
        // The tied output layer: x E'^T, the trained columns from the rows.
        let x = narrow::<E>(&c.x);
        let (xm, em) = (oracle::M::new(c.t, c.dim, wide(&x)), oracle::M::new(c.vocab, c.dim, e.clone()));
        let mut logits: Vec<E> = narrow(&xm.mul_t(&oracle::M::new(c.vocab, c.dim, wide(&table))).d);
        let xv = MatRef::new(&x, c.t, c.dim).map_err(fail)?;
        l.head_forward(xv, MatMut::new(&mut logits, c.t, c.vocab).map_err(fail)?).map_err(fail)?;
        let mag = xm.abs().mul_t(&em.abs());
        close::<E>("logits", &wide(&logits), &xm.mul_t(&em).d, &mag.d, c.dim + 2)
    });

    run(report, config, "trainable_tokens_merged_equals_unmerged", name, case_in(max_d), |c| {
        let (mut table, l) = (narrow::<E>(&c.table), adapter::<E>(&c)?);
        let y = lookup(&l, &c, &table)?;
        let mut sc = vec![E::ZERO; l.update_scratch_len(c.vocab)];
        let merged = l.merge_into(backend, MergeTarget::new(&mut table), &mut sc).map_err(fail)?.keep().to_vec();
        let ym: Vec<E> = c.ids.iter().flat_map(|&id| merged[id * c.dim..(id + 1) * c.dim].to_vec()).collect();
        prop_assert!(bits(&y) == bits(&ym), "the merged table's rows differ from the unmerged lookup");
        Ok(())
    });

    run(report, config, "trainable_tokens_unmerge_restores", name, case_in(max_d), |c| {
        let (t0, l) = (narrow::<E>(&c.table), adapter::<E>(&c)?);
        let want = narrow::<E>(&replaced(&c, &c.table, &wide(l.rows())));
        let mut table = t0.clone();
        // Without a backup, and in blocks of 3 rows: each block keeps its own originals.
        let mut sc = vec![E::ZERO; l.update_scratch_len(c.vocab)];
        let guard = l.merge_into(backend, MergeTarget::new(&mut table), &mut sc).map_err(fail)?;
        prop_assert!(bits(guard.weight()) == bits(&want), "the merge is not E'");
        guard.unmerge().map_err(fail)?;
        prop_assert!(bits(&table) == bits(&t0), "the unmerge did not restore the table bit for bit");
        for start in (0..c.vocab).step_by(3) {
            let n = 3.min(c.vocab - start);
            let mut block = table[start * c.dim..(start + n) * c.dim].to_vec();
            let mut sc = vec![E::ZERO; l.update_scratch_len(n)];
            let dir = peft_core::method::Direction::Merge;
            let view = MatMut::new(&mut block, n, c.dim).map_err(fail)?;
            l.update_rows(backend, start, view, None, dir, &mut sc).map_err(fail)?;
            prop_assert!(bits(&block) == bits(&want[start * c.dim..(start + n) * c.dim]), "block at {}", start);
            let view = MatMut::new(&mut block, n, c.dim).map_err(fail)?;
            l.update_rows(backend, start, view, None, peft_core::method::Direction::Unmerge, &mut sc).map_err(fail)?;
            prop_assert!(bits(&block) == bits(&t0[start * c.dim..(start + n) * c.dim]), "block at {}", start);
        }
        Ok(())
    });

    run(report, config, "trainable_tokens_gradients_match_fd", name, case_in(max_d), |c| {
        let (table, l) = (narrow::<E>(&c.table), adapter::<E>(&c)?);
        let (g, x, gl) = (narrow::<E>(&c.g), narrow::<E>(&c.x), narrow::<E>(&c.gl));
        let mut grows = vec![E::ZERO; l.rows().len()];
        let gv = MatRef::new(&g, c.ids.len(), c.dim).map_err(fail)?;
        l.backward(&c.ids, gv, &mut grows).map_err(fail)?;
        // Through the tied output layer too, with the input's gradient corrected to E'.
        let frozen: Vec<E> = c.indices.iter().flat_map(|&id| table[id as usize * c.dim..][..c.dim].to_vec()).collect();
        let (xv, glv) = (MatRef::new(&x, c.t, c.dim).map_err(fail)?, MatRef::new(&gl, c.t, c.vocab).map_err(fail)?);
        let tm = oracle::M::new(c.vocab, c.dim, wide(&table));
        let mut gx: Vec<E> = narrow(&oracle::M::new(c.t, c.vocab, wide(&gl)).mul(&tm).d);
        let fz = MatRef::new(&frozen, c.indices.len(), c.dim).map_err(fail)?;
        let input = Some((fz, MatMut::new(&mut gx, c.t, c.dim).map_err(fail)?));
        l.head_backward(xv, glv, &mut grows, input).map_err(fail)?;
        let (tw, gw, xw, glw) = (wide(&table), wide(&g), wide(&x), wide(&gl));
        // L = <G, E'[ids]> + <dlogits, x E'^T>.
        let loss = |rows: &[f64], x: &[f64]| {
            let e = replaced(&c, &tw, rows);
            let looked: f64 = c
                .ids
                .iter()
                .enumerate()
                .map(|(t, &id)| (0..c.dim).map(|j| gw[t * c.dim + j] * e[id * c.dim + j]).sum::<f64>())
                .sum();
            let logits = oracle::M::new(c.t, c.dim, x.to_vec()).mul_t(&oracle::M::new(c.vocab, c.dim, e));
            looked + oracle::dot(&oracle::M::new(c.t, c.vocab, glw.clone()), &logits)
        };
        let rows = wide(l.rows());
        let scale = 2.0 * ((c.ids.len() + c.t) * c.vocab * c.dim) as f64;
        let k = c.ids.len() + c.t + c.vocab + 4;
        close_norm::<E>("drows", &wide(&grows), &oracle::grad_fd(&rows, 1e-6, |p| loss(p, &xw)), scale, k)?;
        close_norm::<E>("dx", &wide(&gx), &oracle::grad_fd(&xw, 1e-6, |p| loss(&rows, p)), scale, k)
    });
}
