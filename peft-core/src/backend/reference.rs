//! The portable reference backend.
//!
//! A packed, register-blocked gemm in safe Rust that the compiler
//! vectorizes: `op(A)` and `op(B)` are copied (and widened to the
//! accumulation type) into small panels, and an `MR x NR` micro-kernel keeps
//! its accumulators in registers across the inner dimension. All four
//! `op` combinations go through the same kernel; only the packing differs.
//!
//! Working memory lives on the stack and is bounded:
//! `(MB * MR * NR + KC * (MR + NR)) * size_of::<E::Accum>()` bytes, which is
//! 8 KiB for f32 and 16 KiB for f64. No heap is used.
//!
//! Every output element is the sum, in accumulation precision and in
//! increasing `p` order, of `op(A)[i,p] * op(B)[p,j]` (separate multiply and
//! add, never fused), scaled by `alpha` and rounded once. The result is
//! therefore bit-identical on every target, which the firmware smoke test
//! relies on.

use super::{Accum, Backend, Op, check_gemm};
use crate::element::{Element, Real};
use crate::error::Result;
use crate::matrix::{MatMut, MatRef};

/// Rows of the micro-kernel.
const MR: usize = 4;
/// Columns of the micro-kernel.
const NR: usize = 8;
/// Depth of one packed panel.
const KC: usize = 128;
/// Micro-kernel row blocks per accumulator panel (`MB * MR` rows of `C`).
const MB: usize = 16;

/// The portable `no_std` backend, and the oracle for every other backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reference;

impl<E: Element> Backend<E> for Reference {
    type Error = crate::Error;

    fn gemm(
        &self,
        mut dst: MatMut<'_, E>,
        accum: Accum,
        lhs: MatRef<'_, E>,
        lhs_op: Op,
        rhs: MatRef<'_, E>,
        rhs_op: Op,
        alpha: E::Accum,
    ) -> Result<()> {
        let (m, n, k) = check_gemm(&dst, &lhs, lhs_op, &rhs, rhs_op)?;
        gemm_packed(&mut dst, accum, &lhs, lhs_op, &rhs, rhs_op, alpha, m, n, k);
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn gemm_packed<E: Element>(
    dst: &mut MatMut<'_, E>,
    accum: Accum,
    lhs: &MatRef<'_, E>,
    lhs_op: Op,
    rhs: &MatRef<'_, E>,
    rhs_op: Op,
    alpha: E::Accum,
    m: usize,
    n: usize,
    k: usize,
) {
    let zero = E::Accum::ZERO;
    let mut bpack = [zero; KC * NR];
    let mut apack = [zero; KC * MR];
    let mut cpanel = [[[zero; NR]; MR]; MB];

    for j0 in (0..n).step_by(NR) {
        let nr = NR.min(n - j0);
        for i_super in (0..m).step_by(MB * MR) {
            let rows_super = (MB * MR).min(m - i_super);
            let blocks = rows_super.div_ceil(MR);
            for acc in cpanel.iter_mut() {
                *acc = [[zero; NR]; MR];
            }
            for p0 in (0..k).step_by(KC) {
                let kc = KC.min(k - p0);
                pack_b(&mut bpack, rhs, rhs_op, p0, kc, j0, nr);
                let b = bpack.get(..kc * NR).unwrap_or(&[]);
                for (ib, acc) in cpanel.iter_mut().enumerate().take(blocks) {
                    let i0 = i_super + ib * MR;
                    let mr = MR.min(m - i0);
                    pack_a(&mut apack, lhs, lhs_op, i0, mr, p0, kc);
                    kernel(acc, apack.get(..kc * MR).unwrap_or(&[]), b);
                }
            }
            for (ib, acc) in cpanel.iter().enumerate().take(blocks) {
                let i0 = i_super + ib * MR;
                for (ii, acc_row) in acc.iter().enumerate().take(MR.min(m - i0)) {
                    let row = dst.row_mut(i0 + ii);
                    let out = row.get_mut(j0..j0 + nr).unwrap_or(&mut []);
                    store(out, acc_row, alpha, accum, k);
                }
            }
        }
    }
}

/// The micro-kernel: `acc += apack^T bpack` over the packed depth.
#[inline(always)]
fn kernel<T: Real>(acc: &mut [[T; NR]; MR], apack: &[T], bpack: &[T]) {
    for (a, b) in apack.chunks_exact(MR).zip(bpack.chunks_exact(NR)) {
        for (acc_row, &ai) in acc.iter_mut().zip(a) {
            for (c, &bj) in acc_row.iter_mut().zip(b) {
                *c += ai * bj;
            }
        }
    }
}

/// Writes `alpha * acc` into `out` (Replace) or adds it (Add), rounding once.
#[inline(always)]
fn store<E: Element>(out: &mut [E], acc: &[E::Accum; NR], alpha: E::Accum, accum: Accum, k: usize) {
    match accum {
        Accum::Replace => {
            for (o, &a) in out.iter_mut().zip(acc) {
                *o = E::from_accum(alpha * a);
            }
        }
        // An empty product adds nothing; skipping keeps -0.0 bit-exact.
        Accum::Add if k == 0 => {}
        Accum::Add => {
            for (o, &a) in out.iter_mut().zip(acc) {
                *o = E::from_accum(o.to_accum() + alpha * a);
            }
        }
    }
}

/// `bpack[p * NR + j] = op(B)[p0 + p, j0 + j]`, zero for `j >= nr`.
fn pack_b<E: Element>(
    bpack: &mut [E::Accum; KC * NR],
    rhs: &MatRef<'_, E>,
    op: Op,
    p0: usize,
    kc: usize,
    j0: usize,
    nr: usize,
) {
    let zero = E::Accum::ZERO;
    match op {
        Op::N => {
            for (p, chunk) in bpack.chunks_exact_mut(NR).take(kc).enumerate() {
                let src = rhs.row(p0 + p).get(j0..j0 + nr).unwrap_or(&[]);
                chunk.fill(zero);
                for (d, &s) in chunk.iter_mut().zip(src) {
                    *d = s.to_accum();
                }
            }
        }
        Op::T => {
            if nr < NR {
                bpack.fill(zero);
            }
            for j in 0..nr {
                let src = rhs.row(j0 + j).get(p0..p0 + kc).unwrap_or(&[]);
                for (chunk, &s) in bpack.chunks_exact_mut(NR).zip(src) {
                    if let Some(d) = chunk.get_mut(j) {
                        *d = s.to_accum();
                    }
                }
            }
        }
    }
}

/// `apack[p * MR + i] = op(A)[i0 + i, p0 + p]`, zero for `i >= mr`.
fn pack_a<E: Element>(
    apack: &mut [E::Accum; KC * MR],
    lhs: &MatRef<'_, E>,
    op: Op,
    i0: usize,
    mr: usize,
    p0: usize,
    kc: usize,
) {
    let zero = E::Accum::ZERO;
    match op {
        Op::N => {
            if mr < MR {
                apack.fill(zero);
            }
            for i in 0..mr {
                let src = lhs.row(i0 + i).get(p0..p0 + kc).unwrap_or(&[]);
                for (chunk, &s) in apack.chunks_exact_mut(MR).zip(src) {
                    if let Some(d) = chunk.get_mut(i) {
                        *d = s.to_accum();
                    }
                }
            }
        }
        Op::T => {
            for (p, chunk) in apack.chunks_exact_mut(MR).take(kc).enumerate() {
                let src = lhs.row(p0 + p).get(i0..i0 + mr).unwrap_or(&[]);
                chunk.fill(zero);
                for (d, &s) in chunk.iter_mut().zip(src) {
                    *d = s.to_accum();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{Error, Operand};
    use crate::rng::Rng;

    /// Textbook f64 triple loop: the independent oracle for the packed kernel.
    fn naive(m: usize, n: usize, k: usize, a: &[f64], ta: Op, b: &[f64], tb: Op) -> [f64; 4096] {
        let mut c = [0.0; 4096];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    let av = if ta == Op::N { a[i * k + p] } else { a[p * m + i] };
                    let bv = if tb == Op::N { b[p * n + j] } else { b[j * k + p] };
                    s += av * bv;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    #[test]
    fn matches_naive_on_all_ops_and_edges() {
        let mut rng = Rng::new(7);
        // Shapes straddle MR, NR, KC and MB*MR boundaries.
        for &(m, n, k) in &[(1, 1, 1), (3, 7, 5), (4, 8, 128), (5, 9, 129), (65, 17, 3), (2, 33, 260), (70, 3, 0)] {
            let mut a = [0.0f64; 20000];
            let mut b = [0.0f64; 20000];
            for v in a.iter_mut().chain(b.iter_mut()) {
                *v = rng.uniform_f64() * 2.0 - 1.0;
            }
            for (ta, tb) in [(Op::N, Op::N), (Op::N, Op::T), (Op::T, Op::N), (Op::T, Op::T)] {
                let expect = naive(m, n, k, &a, ta, &b, tb);
                let (ar, ac) = if ta == Op::N { (m, k) } else { (k, m) };
                let (br, bc) = if tb == Op::N { (k, n) } else { (n, k) };
                let av = MatRef::new(&a[..ar * ac], ar, ac).unwrap();
                let bv = MatRef::new(&b[..br * bc], br, bc).unwrap();
                let mut c = [f64::NAN; 4096];
                Reference
                    .gemm(MatMut::new(&mut c[..m * n], m, n).unwrap(), Accum::Replace, av, ta, bv, tb, 2.0)
                    .unwrap();
                for idx in 0..m * n {
                    let tol = 1e-13 * (k as f64 + 1.0);
                    assert!((c[idx] - 2.0 * expect[idx]).abs() <= tol, "{m}x{n}x{k} {ta:?}{tb:?} at {idx}");
                }
                // Add on top of the previous result doubles the product.
                Reference.gemm(MatMut::new(&mut c[..m * n], m, n).unwrap(), Accum::Add, av, ta, bv, tb, 2.0).unwrap();
                for idx in 0..m * n {
                    let tol = 1e-13 * (k as f64 + 1.0);
                    assert!((c[idx] - 4.0 * expect[idx]).abs() <= tol);
                }
            }
        }
    }

    /// `dst = a^ta b^tb` through [`Reference`], each stored operand given as
    /// `(data, rows, cols)`.
    fn product<E: Element<Accum = E>>(
        dst: MatMut<'_, E>,
        (a, ar, ac): (&[E], usize, usize),
        ta: Op,
        (b, br, bc): (&[E], usize, usize),
        tb: Op,
    ) -> Result<()> {
        let (a, b) = (MatRef::new(a, ar, ac)?, MatRef::new(b, br, bc)?);
        Reference.gemm(dst, Accum::Replace, a, ta, b, tb, E::from_f64(1.0))
    }

    #[test]
    fn strided_destination_leaves_padding_alone() {
        let a = [1.0f32, 2.0, 3.0, 4.0]; // 2x2
        let b = [1.0f32, 0.0, 0.0, 1.0]; // identity
        let mut c = [9.0f32; 5]; // 2x2 with stride 3: padding at index 2
        let dst = MatMut::with_stride(&mut c, 2, 2, 3).unwrap();
        product(dst, (&a, 2, 2), Op::N, (&b, 2, 2), Op::N).unwrap();
        assert_eq!(c, [1.0, 2.0, 9.0, 3.0, 4.0]);
    }

    #[test]
    fn shape_errors_write_nothing() {
        let a = [1.0f32; 6];
        let mut c = [7.0f32; 4];
        let err = product(MatMut::new(&mut c, 2, 2).unwrap(), (&a, 2, 3), Op::N, (&a, 2, 3), Op::N).unwrap_err();
        assert_eq!(err, Error::ShapeMismatch { operand: Operand::Rhs, expected: 3, found: 2 });
        let err = product(MatMut::new(&mut c, 2, 2).unwrap(), (&a, 2, 3), Op::N, (&a, 3, 2), Op::T).unwrap_err();
        assert_eq!(err, Error::ShapeMismatch { operand: Operand::Rhs, expected: 3, found: 2 });
        assert_eq!(c, [7.0; 4]);
    }

    #[test]
    fn replace_never_reads_destination() {
        let a = [1.0f64, 2.0];
        let mut c = [f64::NAN; 1];
        product(MatMut::new(&mut c, 1, 1).unwrap(), (&a, 1, 2), Op::N, (&a, 1, 2), Op::T).unwrap();
        assert_eq!(c, [5.0]);
    }
}
