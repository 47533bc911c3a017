//! PEFT's `merge_utils`: pruning, sign election and disjoint merging of
//! task tensors, in f64.
//!
//! ```text
//! magnitude prune:  keep the k = floor(density * n) entries of largest |t|
//! random prune:     keep each entry with probability density, then / density
//! elect (total):    m_j = +1 if sum_i t_ij >= 0 else -1
//! elect (frequency):m_j = +1 if sum_i sign(t_ij) >= 0 else -1
//! disjoint merge:   sum_i [sign(t_ij) = m_j] v_i t_ij / max(1, #{i : sign(t_ij) = m_j})
//! ```
//!
//! Ties in magnitude (where `torch.topk` picks any of them) keep the lowest
//! indices. The random masks come from this crate's [`Rng`], one uniform
//! draw per entry in order (PyTorch's `bernoulli` stream cannot be
//! reproduced; the same seed gives the same masks here on every platform).

use crate::rng::Rng;

/// Writes `t` with all but its `floor(density * n)` largest magnitudes set
/// to zero into `dst`; `sel` is scratch of `t.len()` elements.
pub(super) fn magnitude(t: &[f64], density: f64, dst: &mut [f64], sel: &mut [f64]) {
    let n = t.len();
    // Python's `int(density * numel)`: the f64 product, truncated.
    let k = (density * n as f64) as usize;
    if density >= 1.0 || k >= n {
        dst.copy_from_slice(t);
        return;
    }
    dst.fill(0.0);
    if k == 0 {
        return;
    }
    for (s, v) in sel.iter_mut().zip(t) {
        *s = libm::fabs(*v);
    }
    let Some(sel) = sel.get_mut(..n) else { return };
    sel.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let threshold = sel.get(k - 1).copied().unwrap_or(0.0);
    let above = t.iter().filter(|v| libm::fabs(**v).total_cmp(&threshold).is_gt()).count();
    let mut ties_left = k - above;
    for (d, v) in dst.iter_mut().zip(t) {
        match libm::fabs(*v).total_cmp(&threshold) {
            core::cmp::Ordering::Greater => *d = *v,
            core::cmp::Ordering::Equal if ties_left > 0 => {
                *d = *v;
                ties_left -= 1;
            }
            _ => {}
        }
    }
}

/// Writes `t` with each entry kept with probability `density` (and then
/// divided by it) into `dst`. `density` is in `(0, 1)`.
pub(super) fn random(t: &[f64], density: f64, dst: &mut [f64], rng: &mut Rng) {
    for (d, v) in dst.iter_mut().zip(t) {
        *d = if rng.uniform_f64() < density { *v / density } else { 0.0 };
    }
}

/// `sign(x)` as PyTorch's: `-1`, `0` or `1`.
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// The disjoint merge of `k` pruned tensors stacked in `pruned` (`k * n`
/// values), weighted by `weights`, with the majority sign elected by
/// `frequency` (sum of signs) or not (sum of values), into `dst` (`n`).
pub(super) fn elect_and_merge(pruned: &[f64], n: usize, weights: &[f64], frequency: bool, dst: &mut [f64]) {
    for (j, d) in dst.iter_mut().enumerate() {
        let column = || pruned.chunks_exact(n).map(move |t| t.get(j).copied().unwrap_or(0.0));
        let total: f64 = if frequency { column().map(sign).sum() } else { column().sum() };
        let majority = if total >= 0.0 { 1.0 } else { -1.0 };
        let (mut sum, mut count) = (0.0, 0usize);
        for (v, w) in column().zip(weights) {
            if sign(v) == majority {
                sum += w * v;
                count += 1;
            }
        }
        *d = sum / count.max(1) as f64;
    }
}
