//! The truncated SVD of a sum of low-rank products, without forming it.
//!
//! `M = sum_i c_i B_i A_i = Bc Ac` with `Bc = [B_1 .. B_k]` `[out, R]` and
//! `Ac = [c_1 A_1; ..; c_k A_k]` `[R, in]`, `R = sum_i r_i`. With thin
//! Householder QRs `Bc = Qb Rb` and `Ac^T = Qa Ra`,
//!
//! ```text
//! M = Qb (Rb Ra^T) Qa^T = Qb C Qa^T,       C  [p, q], p = min(out, R), q = min(in, R)
//! C V = [m_1 .. m_q]   (one-sided Jacobi: the m_i orthogonal, V orthogonal)
//! M = sum_i (Qb m_i) (Qa v_i)^T,           sigma_i = |m_i|
//! ```
//!
//! so the rank-`k` truncation is `B = [Qb m_i]` `[out, k]` and `A = [(Qa
//! v_i)^T]` `[k, in]` over the `k` largest `sigma_i`: `B = U_k S_k`, `A =
//! V_k^T`, PEFT's factors up to the signs of singular vectors. The work is
//! `O((out + in) R^2 + R^3)`, never `O(out * in)`. All in f64.
//!
//! One-sided Jacobi (Hestenes) rotates pairs of columns of `C` until every
//! pair is orthogonal to `eps` relative to the product of their norms; it
//! is accurate to the last bits for small matrices like this core, and needs
//! no heap.

/// Scratch (f64 elements) [`truncated`] needs for `out x in` sums of total
/// rank `r_total` (saturating).
pub(super) fn scratch_len(n_out: usize, n_in: usize, r_total: usize) -> usize {
    let (p, q) = (n_out.min(r_total), n_in.min(r_total));
    let qr = |m: usize, k: usize| {
        m.saturating_mul(r_total).saturating_add(m.saturating_mul(k).saturating_mul(2)).saturating_add(k)
    };
    qr(n_out, p)
        .saturating_add(qr(n_in, q))
        .saturating_add(p.saturating_mul(q))
        .saturating_add(q.saturating_mul(q))
        .saturating_add(q)
}

/// `v[i]`, or 0 out of range (never, for the sizes checked by the caller:
/// `peft-core` does not index where it could panic).
#[inline]
fn at(v: &[f64], i: usize) -> f64 {
    v.get(i).copied().unwrap_or(0.0)
}

/// `v[i] = x` (nothing out of range).
#[inline]
fn put(v: &mut [f64], i: usize, x: f64) {
    if let Some(e) = v.get_mut(i) {
        *e = x;
    }
}

/// `v[i] -= x` (nothing out of range).
#[inline]
fn sub(v: &mut [f64], i: usize, x: f64) {
    if let Some(e) = v.get_mut(i) {
        *e -= x;
    }
}

/// Splits `n` elements off the front of `buf`.
fn take<'a>(buf: &mut &'a mut [f64], n: usize) -> &'a mut [f64] {
    let all = core::mem::take(buf);
    let (head, tail) = all.split_at_mut(n.min(all.len()));
    *buf = tail;
    head
}

/// Thin Householder QR of the row-major `m x n` matrix `a` (overwritten:
/// its first `p = min(m, n)` rows become `R [p, n]`), with `Q [m, p]`
/// written to `q`. `v` (`m x p`) and `vv` (`p`) hold the reflectors.
fn qr(a: &mut [f64], m: usize, n: usize, q: &mut [f64], v: &mut [f64], vv: &mut [f64]) {
    let p = m.min(n);
    v.fill(0.0);
    for j in 0..p {
        let norm = libm::sqrt((j..m).map(|i| at(a, i * n + j) * at(a, i * n + j)).sum::<f64>());
        let x0 = at(a, j * n + j);
        let alpha = if x0 > 0.0 { -norm } else { norm };
        for i in j..m {
            put(v, i * p + j, at(a, i * n + j));
        }
        sub(v, j * p + j, alpha);
        let nv: f64 = (j..m).map(|i| at(v, i * p + j) * at(v, i * p + j)).sum();
        put(vv, j, nv);
        if nv == 0.0 {
            continue;
        }
        for c in j..n {
            let dot: f64 = (j..m).map(|i| at(v, i * p + j) * at(a, i * n + c)).sum();
            let f = 2.0 * dot / nv;
            for i in j..m {
                sub(a, i * n + c, f * at(v, i * p + j));
            }
        }
    }
    // Q = H_0 H_1 .. H_{p-1} I[:, :p], applied from the last reflector.
    q.fill(0.0);
    for i in 0..p {
        put(q, i * p + i, 1.0);
    }
    for j in (0..p).rev() {
        if at(vv, j) == 0.0 {
            continue;
        }
        for c in 0..p {
            let dot: f64 = (j..m).map(|i| at(v, i * p + j) * at(q, i * p + c)).sum();
            let f = 2.0 * dot / at(vv, j);
            for i in j..m {
                sub(q, i * p + c, f * at(v, i * p + j));
            }
        }
    }
}

/// One-sided Jacobi on the row-major `p x q` matrix `c`: rotates its
/// columns (and those of `v`, `q x q`, set to the identity first) until
/// they are orthogonal. At most 64 sweeps (convergence is quadratic; a
/// handful suffice in practice).
fn jacobi(c: &mut [f64], p: usize, q: usize, v: &mut [f64]) {
    v.fill(0.0);
    for i in 0..q {
        put(v, i * q + i, 1.0);
    }
    for _sweep in 0..64 {
        let mut rotated = false;
        for i in 0..q {
            for j in i + 1..q {
                let (mut alpha, mut beta, mut gamma) = (0.0, 0.0, 0.0);
                for k in 0..p {
                    let (ci, cj) = (at(c, k * q + i), at(c, k * q + j));
                    alpha += ci * ci;
                    beta += cj * cj;
                    gamma += ci * cj;
                }
                if gamma == 0.0 || libm::fabs(gamma) <= f64::EPSILON * libm::sqrt(alpha * beta) {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = libm::copysign(1.0, zeta) / (libm::fabs(zeta) + libm::sqrt(1.0 + zeta * zeta));
                let cs = 1.0 / libm::sqrt(1.0 + t * t);
                let sn = cs * t;
                for (mat, rows) in [(&mut *c, p), (&mut *v, q)] {
                    for k in 0..rows {
                        let (xi, xj) = (at(mat, k * q + i), at(mat, k * q + j));
                        put(mat, k * q + i, cs * xi - sn * xj);
                        put(mat, k * q + j, sn * xi + cs * xj);
                    }
                }
            }
        }
        if !rotated {
            break;
        }
    }
}

/// The rank-`rank` truncated SVD of `bc ac` (`bc [out, R]`, `ac^T` given
/// as `act [in, R]`, both overwritten), as `b_out [out, rank]` (`U_k S_k`)
/// and `a_out [rank, in]` (`V_k^T`), through `emit(row, col, value)`
/// callbacks so the caller rounds to its element type. Columns past the
/// sum's rank are zero.
#[allow(clippy::too_many_arguments)]
pub(super) fn truncated(
    bc: &mut [f64],
    act: &mut [f64],
    n_out: usize,
    n_in: usize,
    r_total: usize,
    rank: usize,
    scratch: &mut [f64],
    mut emit_b: impl FnMut(usize, usize, f64),
    mut emit_a: impl FnMut(usize, usize, f64),
) {
    let (p, q) = (n_out.min(r_total), n_in.min(r_total));
    let mut rest = scratch;
    let qb = take(&mut rest, n_out * p);
    let vb = take(&mut rest, n_out * p);
    let vvb = take(&mut rest, p);
    let qa = take(&mut rest, n_in * q);
    let va = take(&mut rest, n_in * q);
    let vva = take(&mut rest, q);
    let core = take(&mut rest, p * q);
    let vc = take(&mut rest, q * q);
    let sigma = take(&mut rest, q);
    qr(bc, n_out, r_total, qb, vb, vvb);
    qr(act, n_in, r_total, qa, va, vva);
    // C = Rb Ra^T: Rb is rows 0..p of bc, Ra rows 0..q of act.
    for i in 0..p {
        for j in 0..q {
            put(core, i * q + j, (0..r_total).map(|l| at(bc, i * r_total + l) * at(act, j * r_total + l)).sum());
        }
    }
    jacobi(core, p, q, vc);
    for (i, s) in sigma.iter_mut().enumerate() {
        *s = libm::sqrt((0..p).map(|k| at(core, k * q + i) * at(core, k * q + i)).sum::<f64>());
    }
    for l in 0..rank {
        // The largest sigma not taken yet (taken ones are set to -1).
        let pick = (0..q)
            .filter(|&i| at(sigma, i) >= 0.0)
            .max_by(|&x, &y| at(sigma, x).total_cmp(&at(sigma, y)).then(y.cmp(&x)));
        match pick {
            Some(i) => {
                put(sigma, i, -1.0);
                for row in 0..n_out {
                    emit_b(row, l, (0..p).map(|k| at(qb, row * p + k) * at(core, k * q + i)).sum());
                }
                for col in 0..n_in {
                    emit_a(l, col, (0..q).map(|k| at(qa, col * q + k) * at(vc, k * q + i)).sum());
                }
            }
            None => {
                (0..n_out).for_each(|row| emit_b(row, l, 0.0));
                (0..n_in).for_each(|col| emit_a(l, col, 0.0));
            }
        }
    }
}
