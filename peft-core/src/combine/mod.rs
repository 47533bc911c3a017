//! Weighted combinations of LoRA adapters, as PEFT's
//! `LoraModel.add_weighted_adapter` (PEFT 0.21) computes them.
//!
//! The sources of one module are LoRA adapters `(A_i [r_i, in], B_i [out,
//! r_i], s_i)` with weights `w_i`; `k_i = w_i s_i`. The result is one
//! adapter `(A [r, in], B [out, r])` whose scale PEFT sets to 1 (its config
//! is the first source's with `r = lora_alpha = r`; with `use_rslora` it is
//! `sqrt(r)`, as in PEFT).
//!
//! ```text
//! cat:    A = [k_1 A_1; ..; k_n A_n; 0]   B = [B_1 .. B_n 0]        r >= sum r_i
//!         (B A = sum_i k_i B_i A_i exactly; zero rows pad to the config's rank)
//! svd:    B A = the rank-r truncation of M = sum_i k_i B_i A_i,
//!         B = U_r S_r, A = V_r^T                                     r <= min(out, in)
//! linear, ties, dare_linear, dare_ties, magnitude_prune (equal ranks r_i = r):
//!         A = f({A_i}, {sign(k_i) sqrt|k_i|}),  B = f({B_i}, {sqrt|k_i|})
//!   linear:          f = sum_i v_i T_i   (so B A holds cross terms: PEFT's definition)
//!   magnitude_prune: f = sum_i v_i prune_mag(T_i)
//!   ties:            f = disjoint_merge(v_i prune_mag(T_i), elect(prune_mag(T_i)))
//!   dare_linear:     f = sum_i v_i prune_rand(T_i) / density
//!   dare_ties:       f = disjoint_merge(v_i prune_rand(T_i) / density, elect(..))
//! ```
//!
//! (pruning, election and the disjoint merge in `combine/prune.rs`; the SVD, which
//! never forms the `out x in` matrix `M`, in `combine/svd.rs`). A density of 1 prunes
//! nothing, so `magnitude_prune` and `dare_linear` then equal `linear`;
//! `ties` and `dare_ties` still elect signs and average, and equal `linear`
//! only for a single source. PEFT uses `linear` whatever is asked when it
//! combines a single adapter; that switch is the caller's (the `peft
//! combine` command makes it).
//!
//! Everything is computed in f64 and rounded once to the element type.
//! DARE draws its masks from the caller's [`Rng`]: the `A` tensors of every
//! source in order, then the `B` tensors, one draw per entry.

mod prune;
mod svd;

use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len, check_scratch};
use crate::lora::Lora;
use crate::matrix::checked_len;
use crate::rng::Rng;

/// How TIES and DARE-TIES elect each entry's sign.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MajoritySign {
    /// The sign of the sum of the (pruned) values (PEFT's default).
    Total,
    /// The sign of the sum of their signs.
    Frequency,
}

/// A combination type of PEFT's `add_weighted_adapter`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Combination {
    /// Weighted sums of the `A`s and of the `B`s (equal ranks).
    Linear,
    /// The factors stacked: exact, rank `sum r_i`.
    Cat,
    /// The truncated SVD of the weighted sum of the products; `rank`
    /// `None` is PEFT's default, the largest source rank.
    Svd {
        /// The rank kept.
        rank: Option<usize>,
    },
    /// TIES: magnitude pruning, sign election, disjoint merge.
    Ties {
        /// Fraction of entries kept, in `[0, 1]`.
        density: f64,
        /// How the sign is elected.
        sign: MajoritySign,
    },
    /// DARE: random pruning with rescaling, then a weighted sum.
    DareLinear {
        /// Probability of keeping an entry, in `(0, 1]`.
        density: f64,
    },
    /// DARE pruning, then TIES's sign election and disjoint merge.
    DareTies {
        /// Probability of keeping an entry, in `(0, 1]`.
        density: f64,
        /// How the sign is elected.
        sign: MajoritySign,
    },
    /// Magnitude pruning, then a weighted sum.
    MagnitudePrune {
        /// Fraction of entries kept, in `[0, 1]`.
        density: f64,
    },
}

impl Combination {
    /// PEFT's name (`"linear"`, `"cat"`, `"svd"`, `"ties"`, `"dare_linear"`,
    /// `"dare_ties"`, `"magnitude_prune"`).
    pub fn name(&self) -> &'static str {
        match self {
            Combination::Linear => "linear",
            Combination::Cat => "cat",
            Combination::Svd { .. } => "svd",
            Combination::Ties { .. } => "ties",
            Combination::DareLinear { .. } => "dare_linear",
            Combination::DareTies { .. } => "dare_ties",
            Combination::MagnitudePrune { .. } => "magnitude_prune",
        }
    }

    /// The combined adapter's rank, as PEFT computes it from the sources'
    /// configured ranks: their common rank (`linear` and the pruning
    /// kinds), their sum (`cat`), or the SVD rank (default: the largest).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for no ranks, or unequal ranks where
    /// they must be equal.
    pub fn rank(&self, ranks: impl IntoIterator<Item = usize> + Clone) -> Result<usize> {
        let mut it = ranks.clone().into_iter();
        let first = it.next().ok_or(Error::InvalidParameter { name: "sources", rule: "must not be empty" })?;
        match self {
            Combination::Cat => ranks.into_iter().try_fold(0usize, |s, r| s.checked_add(r)).ok_or(Error::Overflow),
            Combination::Svd { rank: Some(r) } => Ok(*r),
            Combination::Svd { rank: None } => Ok(ranks.into_iter().max().unwrap_or(first)),
            _ if it.all(|r| r == first) => Ok(first),
            _ => Err(Error::InvalidParameter {
                name: "source ranks",
                rule: "must be equal for linear, ties, dare_linear, dare_ties and magnitude_prune",
            }),
        }
    }

    fn check(&self) -> Result<()> {
        let unit = |d: f64, open: bool| d.is_finite() && d <= 1.0 && if open { d > 0.0 } else { d >= 0.0 };
        match *self {
            Combination::Ties { density, .. } | Combination::MagnitudePrune { density } if !unit(density, false) => {
                Err(Error::InvalidParameter { name: "density", rule: "must be in [0, 1]" })
            }
            Combination::DareLinear { density } | Combination::DareTies { density, .. } if !unit(density, true) => {
                Err(Error::InvalidParameter { name: "density", rule: "must be in (0, 1] for DARE (it divides by it)" })
            }
            Combination::Svd { rank: Some(0) } => {
                Err(Error::InvalidParameter { name: "svd rank", rule: "must be positive" })
            }
            _ => Ok(()),
        }
    }
}

/// One source of a combination: an adapter and its weight `w`.
#[derive(Clone, Copy, Debug)]
pub struct Weighted<'a, E, S> {
    /// The adapter (its scale `s` is folded in: `k = w s`).
    pub lora: &'a Lora<E, S>,
    /// The weight `w`.
    pub weight: f64,
}

/// Scratch (f64 elements) [`combine`] needs (saturating).
pub fn combine_scratch_len<E: Element, S: AsRef<[E]>>(
    combination: &Combination,
    sources: &[Weighted<'_, E, S>],
    rank: usize,
) -> usize {
    let Some(first) = sources.first() else { return 0 };
    let (n_in, n_out) = (first.lora.in_features(), first.lora.out_features());
    match combination {
        Combination::Cat => 0,
        Combination::Svd { .. } => {
            let r_total = sources.iter().fold(0usize, |s, w| s.saturating_add(w.lora.rank()));
            let stacked = n_out.saturating_add(n_in).saturating_mul(r_total);
            stacked.saturating_add(svd::scratch_len(n_out, n_in, r_total))
        }
        _ => {
            // Per factor: the pruned sources, an accumulator, a selection
            // buffer, and the weights.
            let n = n_in.max(n_out).saturating_mul(rank);
            n.saturating_mul(sources.len().saturating_add(2)).saturating_add(sources.len())
        }
    }
}

/// Combines `sources` (one module's adapters, all `in -> out`) as
/// `combination` says (see the [module docs](self)) into `a_out [rank,
/// in]` and `b_out [out, rank]`.
///
/// `rank` is the combined adapter's rank, from [`Combination::rank`] over
/// every source adapter (for `cat` a module that only some sources adapt
/// is zero-padded to it, as in PEFT). `rng` is used by DARE only.
///
/// # Errors
/// Before anything is written: [`Error::InvalidParameter`] for no sources,
/// a density out of range, a non-finite weight, unequal ranks for the
/// kinds that need them, or a rank that the kind cannot produce (below the
/// sum for `cat`, above `min(in, out)` for `svd`);
/// [`Error::ShapeMismatch`] (`Weight` for sources of different shapes,
/// `LoraA`/`LoraB` for the outputs); [`Error::ScratchTooSmall`].
pub fn combine<E: Element, S: AsRef<[E]>>(
    combination: &Combination,
    sources: &[Weighted<'_, E, S>],
    rank: usize,
    a_out: &mut [E],
    b_out: &mut [E],
    scratch: &mut [f64],
    rng: &mut Rng,
) -> Result<()> {
    combination.check()?;
    let first = sources.first().ok_or(Error::InvalidParameter { name: "sources", rule: "must not be empty" })?;
    let (n_in, n_out) = (first.lora.in_features(), first.lora.out_features());
    for w in sources {
        check_len(Operand::Weight, n_in, w.lora.in_features())?;
        check_len(Operand::Weight, n_out, w.lora.out_features())?;
        if !(w.weight * w.lora.scale()).is_finite() {
            return Err(Error::InvalidParameter { name: "weight", rule: "times the source's scale must be finite" });
        }
    }
    check_len(Operand::LoraA, checked_len(rank, n_in)?, a_out.len())?;
    check_len(Operand::LoraB, checked_len(n_out, rank)?, b_out.len())?;
    check_scratch(combine_scratch_len(combination, sources, rank), scratch.len())?;
    let r_total = sources.iter().try_fold(0usize, |s, w| s.checked_add(w.lora.rank())).ok_or(Error::Overflow)?;
    match *combination {
        Combination::Cat => {
            if rank < r_total {
                return Err(Error::InvalidParameter {
                    name: "rank",
                    rule: "must be at least the sum of the sources' ranks for cat",
                });
            }
            cat(sources, rank, a_out, b_out);
        }
        Combination::Svd { .. } => {
            if rank > n_in.min(n_out) {
                return Err(Error::InvalidRank { rank, max: n_in.min(n_out) });
            }
            // The scratch length was checked above.
            let (bc, rest) = scratch.split_at_mut((n_out * r_total).min(scratch.len()));
            let (act, rest) = rest.split_at_mut((n_in * r_total).min(rest.len()));
            // The SVD runs on k_i / 2^e, 2^e the power of two nearest
            // max|k|, and B = U S is scaled back at the end: exact scalings,
            // so ordinary weights give the same bits, while a weight near
            // f64's range (1e200) no longer squares to infinity inside the
            // decomposition (which gave zeros).
            let kmax = sources.iter().map(|w| (w.weight * w.lora.scale()).abs()).fold(0.0f64, f64::max);
            let norm = if kmax > 0.0 { libm::ldexp(1.0, libm::ilogb(kmax)) } else { 1.0 };
            let mut col = 0;
            for w in sources {
                let (r, k) = (w.lora.rank(), w.weight * w.lora.scale() / norm);
                let (a, b) = (w.lora.lora_a(), w.lora.lora_b());
                // Column block `col..col + r` of Bc [out, R] and of Ac^T [in, R].
                for (dst, src) in bc.chunks_exact_mut(r_total).zip(b.chunks_exact(r)) {
                    dst.iter_mut().skip(col).zip(src).for_each(|(d, v)| *d = v.to_f64());
                }
                for (l, a_row) in a.chunks_exact(n_in).enumerate() {
                    for (dst, v) in act.chunks_exact_mut(r_total).zip(a_row) {
                        if let Some(d) = dst.get_mut(col + l) {
                            *d = k * v.to_f64();
                        }
                    }
                }
                col += r;
            }
            svd::truncated(
                bc,
                act,
                n_out,
                n_in,
                r_total,
                rank,
                rest,
                |i, l, v| put(b_out, i * rank + l, v * norm),
                |l, j, v| put(a_out, l * n_in + j, v),
            );
        }
        _ => {
            if sources.iter().any(|w| w.lora.rank() != rank) {
                return Err(Error::InvalidParameter {
                    name: "source ranks",
                    rule: "must equal the combined rank for linear, ties, dare_linear, dare_ties and magnitude_prune",
                });
            }
            // A with sign(k) sqrt|k|, then B with sqrt|k| (PEFT's order, which
            // DARE's draws follow).
            task_arithmetic(combination, sources, Factor::A, a_out, scratch, rng);
            task_arithmetic(combination, sources, Factor::B, b_out, scratch, rng);
        }
    }
    Ok(())
}

/// `v[i] = x` rounded to `E` (nothing out of range).
fn put<E: Element>(v: &mut [E], i: usize, x: f64) {
    if let Some(e) = v.get_mut(i) {
        *e = E::from_f64(x);
    }
}

/// `cat`: `A = [k_i A_i; 0]`, `B = [B_i 0]`.
fn cat<E: Element, S: AsRef<[E]>>(sources: &[Weighted<'_, E, S>], rank: usize, a_out: &mut [E], b_out: &mut [E]) {
    a_out.fill(E::ZERO);
    b_out.fill(E::ZERO);
    let n_in = sources.first().map_or(0, |w| w.lora.in_features());
    let mut row = 0;
    for w in sources {
        let (r, k) = (w.lora.rank(), w.weight * w.lora.scale());
        for (dst, src) in a_out.iter_mut().skip(row * n_in).zip(w.lora.lora_a()) {
            *dst = E::from_f64(k * src.to_f64());
        }
        for (dst_row, src_row) in b_out.chunks_exact_mut(rank).zip(w.lora.lora_b().chunks_exact(r)) {
            dst_row.iter_mut().skip(row).zip(src_row).for_each(|(d, v)| *d = *v);
        }
        row += r;
    }
}

/// Which factor of the sources [`task_arithmetic`] combines.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Factor {
    /// `A`, weighted by `sign(k) sqrt|k|`.
    A,
    /// `B`, weighted by `sqrt|k|`.
    B,
}

/// One factor of the linear family (see the [module docs](self)).
fn task_arithmetic<E: Element, S: AsRef<[E]>>(
    combination: &Combination,
    sources: &[Weighted<'_, E, S>],
    factor: Factor,
    out: &mut [E],
    scratch: &mut [f64],
    rng: &mut Rng,
) {
    let (count, n) = (sources.len(), out.len());
    // The scratch length was checked by `combine`.
    let (pruned, rest) = scratch.split_at_mut((n * count).min(scratch.len()));
    let (acc, rest) = rest.split_at_mut(n.min(rest.len()));
    let (sel, rest) = rest.split_at_mut(n.min(rest.len()));
    let weights = rest.get_mut(..count).unwrap_or_default();
    for ((w, p), v) in sources.iter().zip(pruned.chunks_exact_mut(n)).zip(weights.iter_mut()) {
        let k = w.weight * w.lora.scale();
        let (tensor, weight) = match factor {
            Factor::A => (w.lora.lora_a(), libm::copysign(libm::sqrt(libm::fabs(k)), k)),
            Factor::B => (w.lora.lora_b(), libm::sqrt(libm::fabs(k))),
        };
        *v = weight;
        for (d, x) in sel.iter_mut().zip(tensor) {
            *d = x.to_f64();
        }
        match *combination {
            Combination::Ties { density, .. } | Combination::MagnitudePrune { density } => {
                prune::magnitude(sel, density, p, acc);
            }
            Combination::DareLinear { density } | Combination::DareTies { density, .. } if density < 1.0 => {
                prune::random(sel, density, p, rng);
            }
            _ => p.copy_from_slice(sel),
        }
    }
    match *combination {
        Combination::Ties { sign, .. } | Combination::DareTies { sign, .. } => {
            prune::elect_and_merge(pruned, n, weights, sign == MajoritySign::Frequency, acc);
        }
        _ => {
            acc.fill(0.0);
            for (p, w) in pruned.chunks_exact(n).zip(weights.iter()) {
                for (a, v) in acc.iter_mut().zip(p) {
                    *a += w * v;
                }
            }
        }
    }
    for (o, v) in out.iter_mut().zip(acc.iter()) {
        *o = E::from_f64(*v);
    }
}

#[cfg(test)]
mod tests;
