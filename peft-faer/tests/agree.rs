//! The faer backends against the reference backend on random problems:
//! random shapes (including 1-row, 1-column, empty and non-multiple-of-SIMD
//! sizes), strided views, both transposition flags, Replace and Add.
//!
//! Tolerance, per element of `C`: both backends compute the exact value up
//! to the rounding of a length-`k` dot product in the accumulation type,
//! `|err| <= k u_acc (|alpha| sum_p |a_ip| |b_pj| + |c_ij|)` each (Higham,
//! eq. 3.5), so they differ by at most twice that, plus, for f16/bf16, one
//! rounding of the result to the element type (`u_e |c|` each side, where
//! the two f32 values straddle a rounding boundary).

use half::{bf16, f16};
use peft_core::{Accum, Backend, Element, Error, MatMut, MatRef, Op, Reference, Rng};
use peft_faer::{Faer, FaerHalf, HalfError};

/// A strided `rows x cols` matrix with stride padding filled with NaN (so a
/// backend that reads padding is caught).
struct Strided<E> {
    data: Vec<E>,
    rows: usize,
    cols: usize,
    stride: usize,
}

impl<E: Element> Strided<E> {
    fn random(rng: &mut Rng, rows: usize, cols: usize, pad: usize) -> Self {
        let stride = cols + pad;
        let mut data = vec![E::from_f64(f64::NAN); rows * stride];
        for r in 0..rows {
            for c in 0..cols {
                data[r * stride + c] = E::from_f64(rng.uniform_range(-1.0, 1.0));
            }
        }
        Self { data, rows, cols, stride }
    }
    fn view(&self) -> MatRef<'_, E> {
        MatRef::with_stride(&self.data, self.rows, self.cols, self.stride).unwrap()
    }
    fn view_mut(&mut self) -> MatMut<'_, E> {
        MatMut::with_stride(&mut self.data, self.rows, self.cols, self.stride).unwrap()
    }
    fn at(&self, r: usize, c: usize) -> f64 {
        self.data[r * self.stride + c].to_f64()
    }
}

/// Dimensions that hit the edge cases: 0, 1, below and above SIMD widths.
fn dim(rng: &mut Rng) -> usize {
    const DIMS: [usize; 12] = [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 33, 70];
    DIMS[(rng.next_u64() % DIMS.len() as u64) as usize]
}

/// Runs `cases` random gemms on `fast` and `Reference` and checks the
/// bound above with unit roundoffs `u_acc` and `u_e`.
fn agree<E: Element, B: Backend<E>>(fast: &B, u_acc: f64, u_e: f64, cases: usize, seed: u64)
where
    Reference: Backend<E>,
{
    let mut rng = Rng::new(seed);
    for case in 0..cases {
        let (m, n, k) = (dim(&mut rng), dim(&mut rng), dim(&mut rng));
        let lhs_op = if rng.next_u64().is_multiple_of(2) { Op::N } else { Op::T };
        let rhs_op = if rng.next_u64().is_multiple_of(2) { Op::N } else { Op::T };
        let accum = if rng.next_u64().is_multiple_of(2) { Accum::Replace } else { Accum::Add };
        let pad = (rng.next_u64() % 3) as usize;
        let (lr, lc) = if lhs_op == Op::N { (m, k) } else { (k, m) };
        let (rr, rc) = if rhs_op == Op::N { (k, n) } else { (n, k) };
        let lhs = Strided::<E>::random(&mut rng, lr, lc, pad);
        let rhs = Strided::<E>::random(&mut rng, rr, rc, pad);
        let mut c_fast = Strided::<E>::random(&mut rng, m, n, pad);
        if accum == Accum::Replace {
            // Replace never reads C: NaN there must not leak.
            c_fast.data.iter_mut().for_each(|v| *v = E::from_f64(f64::NAN));
        }
        let mut c_ref = Strided { data: c_fast.data.clone(), rows: m, cols: n, stride: c_fast.stride };
        let c0 = Strided { data: c_fast.data.clone(), rows: m, cols: n, stride: c_fast.stride };
        let alpha = rng.uniform_range(-2.0, 2.0);
        let alpha_e = <E::Accum as Element>::from_f64(alpha);
        fast.gemm(c_fast.view_mut(), accum, lhs.view(), lhs_op, rhs.view(), rhs_op, alpha_e).unwrap();
        Reference.gemm(c_ref.view_mut(), accum, lhs.view(), lhs_op, rhs.view(), rhs_op, alpha_e).unwrap();
        let a = |i: usize, p: usize| if lhs_op == Op::N { lhs.at(i, p) } else { lhs.at(p, i) };
        let b = |p: usize, j: usize| if rhs_op == Op::N { rhs.at(p, j) } else { rhs.at(j, p) };
        for i in 0..m {
            for j in 0..n {
                let absprod: f64 = (0..k).map(|p| (a(i, p) * b(p, j)).abs()).sum();
                let old = if accum == Accum::Add { c0.at(i, j).abs() } else { 0.0 };
                let (f, r) = (c_fast.at(i, j), c_ref.at(i, j));
                let tol = 2.0 * (k as f64 + 1.0) * u_acc * (alpha.abs() * absprod + old) + u_e * r.abs().max(f.abs());
                assert!(
                    (f - r).abs() <= tol,
                    "case {case} {}: m={m} n={n} k={k} {lhs_op:?}{rhs_op:?} {accum:?} ({i},{j}): {f} vs {r}, tol {tol}",
                    E::NAME
                );
            }
        }
        // Stride padding is never written.
        for r in 0..m {
            for c in n..c_fast.stride {
                assert!(c_fast.data[r * c_fast.stride + c].to_f64().is_nan(), "padding written");
            }
        }
    }
}

const U32: f64 = f32::EPSILON as f64 / 2.0;
const U64: f64 = f64::EPSILON / 2.0;

#[test]
fn f32_agrees_with_reference() {
    agree::<f32, _>(&Faer::new(), U32, 0.0, 400, 1);
    agree::<f32, _>(&Faer::with_threads(2), U32, 0.0, 100, 2);
}

#[test]
fn f64_agrees_with_reference() {
    agree::<f64, _>(&Faer::new(), U64, 0.0, 400, 3);
}

#[test]
fn f16_agrees_with_reference() {
    let backend = FaerHalf::new(Faer::new(), vec![0.0f32; 1 << 16]);
    agree::<f16, _>(&backend, U32, 2.0 * 2f64.powi(-11), 400, 4);
}

#[test]
fn bf16_agrees_with_reference() {
    let backend = FaerHalf::new(Faer::new(), vec![0.0f32; 1 << 16]);
    agree::<bf16, _>(&backend, U32, 2.0 * 2f64.powi(-8), 400, 5);
}

/// A staging buffer too small for the whole problem is tiled over the
/// output, and each tile still sums over all of `k` before its one rounding,
/// so the same bound holds; a buffer below `2 k + 1` is a typed error.
#[test]
fn half_tiles_when_staging_is_short() {
    for (cap, seed) in [(2 * 70 + 1, 6), (500, 7), (3000, 8)] {
        let tiny = FaerHalf::new(Faer::new(), vec![0.0f32; cap]);
        agree::<f16, _>(&tiny, U32, 2.0 * 2f64.powi(-11), 60, seed);
    }
    // Below 2k + 1: a typed error, and C untouched.
    let tiny = FaerHalf::new(Faer::new(), vec![0.0f32; 8]);
    let a = vec![f16::ONE; 2 * 5];
    let mut c = vec![f16::from_f32(3.0); 4];
    let err = tiny
        .gemm(
            MatMut::new(&mut c, 2, 2).unwrap(),
            Accum::Add,
            MatRef::new(&a, 2, 5).unwrap(),
            Op::N,
            MatRef::new(&a, 2, 5).unwrap(),
            Op::T,
            1.0,
        )
        .unwrap_err();
    assert_eq!(err, HalfError::StagingTooSmall { needed: 11, len: 8 });
    assert_eq!(peft_core::BackendError::kind(&err), peft_core::ErrorKind::Scratch);
    assert!(c.iter().all(|v| v.to_f32() == 3.0));
}

/// Shape errors are `peft-core`'s typed errors (faer would panic), and the
/// destination is untouched.
#[test]
fn shape_errors_are_typed() {
    let a = [1.0f32; 6];
    let mut c = [7.0f32; 4];
    let cases: [(usize, usize, Op, Error); 3] = [
        (2, 3, Op::N, peft_core::Error::ShapeMismatch { operand: peft_core::Operand::Rhs, expected: 3, found: 2 }),
        (3, 2, Op::T, peft_core::Error::ShapeMismatch { operand: peft_core::Operand::Rhs, expected: 3, found: 2 }),
        (1, 6, Op::N, peft_core::Error::ShapeMismatch { operand: peft_core::Operand::Rhs, expected: 6, found: 2 }),
    ];
    for (r, col, op, want) in cases {
        let lhs = MatRef::new(&a, r, col).unwrap();
        let rhs = MatRef::new(&a[..4], 2, 2).unwrap();
        let got = Faer::new().gemm(MatMut::new(&mut c, 2, 2).unwrap(), Accum::Add, lhs, op, rhs, Op::N, 1.0);
        assert_eq!(got, Err(want));
        assert_eq!(c, [7.0; 4]);
    }
    let lhs = MatRef::new(&a, 2, 3).unwrap();
    let rhs = MatRef::new(&a, 3, 2).unwrap();
    let got = Faer::new().gemm(MatMut::new(&mut c, 1, 4).unwrap(), Accum::Add, lhs, Op::N, rhs, Op::N, 1.0);
    assert_eq!(got, Err(Error::ShapeMismatch { operand: peft_core::Operand::Dst, expected: 2, found: 1 }));
    assert_eq!(c, [7.0; 4]);
}

/// A product above `PAR_MIN_MACS`, so two threads really split it, in
/// every transposition, against the reference backend.
#[test]
fn two_threads_split_large_products_correctly() {
    let (m, n, k) = (160, 200, 150);
    assert!(m * n * k >= peft_faer::PAR_MIN_MACS);
    let mut rng = Rng::new(11);
    for (lhs_op, rhs_op) in [(Op::N, Op::N), (Op::T, Op::N), (Op::N, Op::T), (Op::T, Op::T)] {
        let (lr, lc) = if lhs_op == Op::N { (m, k) } else { (k, m) };
        let (rr, rc) = if rhs_op == Op::N { (k, n) } else { (n, k) };
        let lhs = Strided::<f32>::random(&mut rng, lr, lc, 1);
        let rhs = Strided::<f32>::random(&mut rng, rr, rc, 0);
        let mut c2 = Strided::<f32>::random(&mut rng, m, n, 3);
        let mut c1 = Strided { data: c2.data.clone(), rows: m, cols: n, stride: c2.stride };
        Faer::with_threads(2).gemm(c2.view_mut(), Accum::Add, lhs.view(), lhs_op, rhs.view(), rhs_op, 0.5).unwrap();
        Reference.gemm(c1.view_mut(), Accum::Add, lhs.view(), lhs_op, rhs.view(), rhs_op, 0.5).unwrap();
        for i in 0..m {
            for j in 0..n {
                // |c| <= 1 + 0.5 k; the bound of the module docs.
                let tol = 2.0 * (k as f64 + 1.0) * U32 * (1.0 + 0.5 * k as f64);
                assert!((c1.at(i, j) - c2.at(i, j)).abs() <= tol, "{lhs_op:?}{rhs_op:?} ({i},{j})");
            }
        }
    }
}
