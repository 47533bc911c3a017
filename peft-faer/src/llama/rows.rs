//! The host's row-wise work (norms, RoPE, the SwiGLU product and their
//! backward passes) split into blocks of rows, each block a part of
//! [`Backend::for_each_part`], so a backend with threads runs them at
//! once. Each row is computed exactly as on one thread: the split changes
//! who computes a row, never how.

use std::sync::{Mutex, PoisonError};

use peft_core::Backend;

/// Rows per part.
const ROWS: usize = 16;

/// Below this many output elements (all outputs together), the work runs
/// on the calling thread: a decode step's rows are one row each, a few
/// microseconds of work, less than handing them out costs.
const MIN_ELEMS: usize = 1 << 15;

/// Calls `f(first_row, blocks)` for blocks of [`ROWS`] rows, `blocks[i]`
/// that block's rows of `outs[i].0` (`outs[i].1` values wide): over all
/// the rows at once on the calling thread when the outputs are small,
/// otherwise as parts of [`Backend::for_each_part`]. Every output must
/// hold the same number of rows; `f` must write only its blocks.
pub(super) fn by_rows<B: Backend<f32> + ?Sized, const K: usize>(
    backend: &B,
    outs: [(&mut [f32], usize); K],
    f: &(dyn Fn(usize, [&mut [f32]; K]) + Sync),
) {
    let total: usize = outs.iter().map(|(o, _)| o.len()).sum();
    let rows = outs.first().map_or(0, |(o, w)| o.len() / (*w).max(1));
    if total < MIN_ELEMS || rows <= ROWS {
        f(0, outs.map(|(o, _)| o));
        return;
    }
    let mut chunks = outs.map(|(o, w)| o.chunks_mut(ROWS * w.max(1)));
    let cells: Vec<Mutex<Option<[&mut [f32]; K]>>> = (0..rows.div_ceil(ROWS))
        .map(|_| Mutex::new(Some(chunks.each_mut().map(|c| c.next().unwrap_or_default()))))
        .collect();
    backend.for_each_part(cells.len(), &|i, _| {
        let block = cells.get(i).and_then(|c| c.lock().unwrap_or_else(PoisonError::into_inner).take());
        if let Some(block) = block {
            f(i * ROWS, block);
        }
    });
}

/// `v` from row `row` on (`width` values a row): an input's rows of a
/// block (empty past the end; the row functions zip rows, so they stop at
/// the shorter of input and block).
pub(super) fn from(v: &[f32], row: usize, width: usize) -> &[f32] {
    v.get(row.saturating_mul(width)..).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Faer;

    /// Every row of every output is handed out exactly once, with its own
    /// first-row index, at one and two threads and on both sides of the
    /// size threshold.
    #[test]
    fn every_row_once_with_its_index() {
        for (rows, threads) in [(3, 2), (40, 1), (3000, 1), (3000, 2), (3001, 2)] {
            let (mut a, mut b) = (vec![0.0f32; rows * 7], vec![0.0f32; rows * 3]);
            by_rows(&Faer::with_threads(threads), [(&mut a, 7), (&mut b, 3)], &|r0, [x, y]| {
                assert_eq!(x.len() / 7, y.len() / 3);
                for (i, row) in x.chunks_exact_mut(7).enumerate() {
                    row.iter_mut().for_each(|v| *v += (r0 + i) as f32);
                }
                for (i, row) in y.chunks_exact_mut(3).enumerate() {
                    row.iter_mut().for_each(|v| *v += (r0 + i) as f32);
                }
            });
            for (w, v) in [(7, &a), (3, &b)] {
                assert!(v.chunks_exact(w).enumerate().all(|(i, row)| row.iter().all(|&x| x == i as f32)));
            }
        }
    }
}
