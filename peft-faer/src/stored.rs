//! [`Faer`](crate::Faer)'s kernels for frozen bases stored as f16, bf16,
//! int8, Q8_0 or Q4_0 ([`peft_core::storage`]), in f32 activations. `W` is
//! never copied to f32 whole:
//!
//! * **Few tokens** (at most [`GEMV_TOKENS`], decode time): one pass over
//!   the rows of `W`, each row decoded a block at a time and dotted with
//!   every token's input while it is in L1. The dot products use eight
//!   independent f32 accumulators, compiled twice: for AVX2 + FMA (chosen
//!   at run time when the CPU has both) and for the baseline target.
//! * **More tokens**: `W` is decoded a panel of rows at a time into a
//!   buffer of about [`PANEL_BYTES`], and faer multiplies each panel: the
//!   decode cost is shared by all tokens.
//! * **The input gradient** `grad_x (=|+=) grad_y deq(W)`: the same
//!   panels, each panel's contribution added by faer.
//!
//! f32 bases go straight to faer (no copy at all). Every path computes the
//! products the portable kernels in `peft-core` do, in another order: the
//! results agree within the rounding bound `peft-verify` checks.

use peft_core::storage::{Format, QK, Q4_0_BYTES, Q8_0_BYTES, RowRef, StoredWeight};
use peft_core::error::Operand;
use peft_core::{Accum, Backend, Error, MatMut, MatRef, Op, Result};

use crate::Faer;

/// Up to this many tokens, a stored base is multiplied row by row
/// (decoded once per row, dotted with every token).
pub const GEMV_TOKENS: usize = 4;

/// The decoded panel's size for the many-token path (f32 bytes): small
/// enough to stay in L2 beside the activations.
pub const PANEL_BYTES: usize = 256 << 10;

/// `y (=|+=) x deq(W)^T` (see the module docs).
pub(crate) fn apply(
    faer: &Faer,
    w: &StoredWeight<'_>,
    x: MatRef<'_, f32>,
    mut y: MatMut<'_, f32>,
    accum: Accum,
) -> Result<()> {
    let (t, n_in, n_out) = (x.rows(), w.in_features(), w.out_features());
    check(Operand::Input, x.cols(), n_in)?;
    check(Operand::Output, y.rows(), t)?;
    check(Operand::Output, y.cols(), n_out)?;
    if let Some(full) = w.as_f32() {
        return faer.gemm(y, accum, x, Op::N, MatRef::new(full, n_out, n_in)?, Op::T, 1.0);
    }
    if t <= GEMV_TOKENS {
        let mut dots = [0.0f32; GEMV_TOKENS];
        for j in 0..n_out {
            let row = w.row(j).ok_or(Error::Overflow)?;
            let xs: [&[f32]; GEMV_TOKENS] = core::array::from_fn(|i| if i < t { x.row(i) } else { &[] });
            dot_rows(row, &xs[..t], &mut dots[..t]);
            for (i, d) in dots[..t].iter().enumerate() {
                if let Some(v) = y.row_mut(i).get_mut(j) {
                    *v = match accum {
                        Accum::Replace => *d,
                        Accum::Add => *v + *d,
                    };
                }
            }
        }
        return Ok(());
    }
    let rows = panel_rows(n_in, n_out);
    let mut panel = vec![0.0f32; rows * n_in];
    let mut j0 = 0;
    while j0 < n_out {
        let p = rows.min(n_out - j0);
        decode_rows(w, j0, &mut panel[..p * n_in])?;
        let dst = columns(&mut y, j0, p)?;
        faer.gemm(dst, accum, x, Op::N, MatRef::new(&panel[..p * n_in], p, n_in)?, Op::T, 1.0)?;
        j0 += p;
    }
    Ok(())
}

/// `grad_x (=|+=) grad_y deq(W)` (see the module docs).
pub(crate) fn apply_transpose(
    faer: &Faer,
    w: &StoredWeight<'_>,
    grad_y: MatRef<'_, f32>,
    mut grad_x: MatMut<'_, f32>,
    accum: Accum,
) -> Result<()> {
    let (t, n_in, n_out) = (grad_y.rows(), w.in_features(), w.out_features());
    check(Operand::GradOutput, grad_y.cols(), n_out)?;
    check(Operand::GradInput, grad_x.rows(), t)?;
    check(Operand::GradInput, grad_x.cols(), n_in)?;
    if let Some(full) = w.as_f32() {
        return faer.gemm(grad_x, accum, grad_y, Op::N, MatRef::new(full, n_out, n_in)?, Op::N, 1.0);
    }
    let rows = panel_rows(n_in, n_out);
    let mut panel = vec![0.0f32; rows * n_in];
    let mut j0 = 0;
    let mut first = true;
    while j0 < n_out || first {
        let p = rows.min(n_out - j0);
        decode_rows(w, j0, &mut panel[..p * n_in])?;
        let g = grad_y.cols_range(j0, p).ok_or(Error::Overflow)?;
        let acc = if first { accum } else { Accum::Add };
        faer.gemm(grad_x.rb_mut(), acc, g, Op::N, MatRef::new(&panel[..p * n_in], p, n_in)?, Op::N, 1.0)?;
        first = false;
        j0 += p;
    }
    Ok(())
}

/// `Ok` if a dimension is the one required.
fn check(operand: Operand, found: usize, expected: usize) -> Result<()> {
    if found == expected { Ok(()) } else { Err(Error::ShapeMismatch { operand, expected, found }) }
}

/// Rows per decoded panel: [`PANEL_BYTES`] of f32, at least 1, at most
/// all.
fn panel_rows(n_in: usize, n_out: usize) -> usize {
    (PANEL_BYTES / 4 / n_in.max(1)).clamp(1, n_out.max(1))
}

/// Columns `j0..j0 + p` of `y` as a strided view.
fn columns<'a>(y: &'a mut MatMut<'_, f32>, j0: usize, p: usize) -> Result<MatMut<'a, f32>> {
    let (t, stride) = (y.rows(), y.row_stride());
    let data = y.rb_mut().into_slice();
    MatMut::with_stride(data.get_mut(j0..).unwrap_or(&mut []), t, p, stride)
}

/// Rows `j0..` of `deq(W)` into `dst` (whole rows).
fn decode_rows(w: &StoredWeight<'_>, j0: usize, dst: &mut [f32]) -> Result<()> {
    let n_in = w.in_features();
    for (i, out) in dst.chunks_exact_mut(n_in.max(1)).enumerate() {
        w.row(j0 + i).ok_or(Error::Overflow)?.dequantize(out);
    }
    Ok(())
}

/// `dots[i] = row . xs[i]` for each token, the row decoded once.
fn dot_rows(row: RowRef<'_>, xs: &[&[f32]], dots: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: `dot_rows_avx2` only needs AVX2 and FMA, both detected
        // at run time just above.
        return unsafe { dot_rows_avx2(row, xs, dots) };
    }
    dot_rows_generic::<false>(row, xs, dots);
}

/// [`dot_rows_generic`] compiled with AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_rows_avx2(row: RowRef<'_>, xs: &[&[f32]], dots: &mut [f32]) {
    dot_rows_generic::<true>(row, xs, dots);
}

/// Values decoded per step (one Q block).
const CHUNK: usize = QK;

/// The dot products: the row decoded `CHUNK` values at a time into a stack
/// buffer, then multiplied into eight accumulators per token.
#[inline(always)]
fn dot_rows_generic<const FMA: bool>(row: RowRef<'_>, xs: &[&[f32]], dots: &mut [f32]) {
    let mut acc = [[0.0f32; 8]; GEMV_TOKENS];
    let mut buf = [0.0f32; CHUNK];
    let n = match row {
        RowRef::F32(v) => v.len(),
        RowRef::F16(v) | RowRef::Bf16(v) => v.len(),
        RowRef::Int8(q, _) => q.len(),
        RowRef::Q8_0(b) => b.len() / Q8_0_BYTES * QK,
        RowRef::Q4_0(b) => b.len() / Q4_0_BYTES * QK,
    };
    let mut c = 0;
    while c < n {
        let len = CHUNK.min(n - c);
        decode_chunk(row, c, &mut buf[..len]);
        for (a, x) in acc.iter_mut().zip(xs) {
            let xc = x.get(c..c + len).unwrap_or(&[]);
            fma_into::<FMA>(a, &buf[..len], xc);
        }
        c += len;
    }
    for (d, a) in dots.iter_mut().zip(&acc) {
        *d = a.iter().sum();
    }
}

/// `a[k % 8] += w[k] x[k]`.
#[inline(always)]
fn fma_into<const FMA: bool>(a: &mut [f32; 8], w: &[f32], x: &[f32]) {
    let (wc, wr) = w.as_chunks::<8>();
    let (xc, xr) = x.as_chunks::<8>();
    for (wv, xv) in wc.iter().zip(xc) {
        for k in 0..8 {
            a[k] = if FMA { wv[k].mul_add(xv[k], a[k]) } else { wv[k] * xv[k] + a[k] };
        }
    }
    for (k, (wv, xv)) in wr.iter().zip(xr).enumerate() {
        a[k] += wv * xv;
    }
}

/// Values `c..c + dst.len()` of the row, decoded (a chunk never crosses a
/// Q block: `c` is a multiple of [`QK`]).
#[inline(always)]
fn decode_chunk(row: RowRef<'_>, c: usize, dst: &mut [f32]) {
    let n = dst.len();
    match row {
        RowRef::F32(v) => dst.copy_from_slice(&v[c..c + n]),
        RowRef::F16(v) => {
            use half::slice::HalfFloatSliceExt;
            let h: &[half::f16] = bytemuck_u16(&v[c..c + n]);
            h.convert_to_f32_slice(dst);
        }
        RowRef::Bf16(v) => dst.iter_mut().zip(&v[c..c + n]).for_each(|(d, b)| *d = f32::from_bits(u32::from(*b) << 16)),
        RowRef::Int8(q, s) => dst.iter_mut().zip(&q[c..c + n]).for_each(|(d, q)| *d = f32::from(*q) * s),
        RowRef::Q8_0(b) => {
            let blk = &b[c / QK * Q8_0_BYTES..][..Q8_0_BYTES];
            let d = peft_core::storage::half::f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
            dst.iter_mut().zip(&blk[2..]).for_each(|(o, q)| *o = f32::from(*q as i8) * d);
        }
        RowRef::Q4_0(b) => {
            let blk = &b[c / QK * Q4_0_BYTES..][..Q4_0_BYTES];
            let d = peft_core::storage::half::f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
            let (lo, hi) = dst.split_at_mut(QK / 2);
            for ((l, h), q) in lo.iter_mut().zip(hi).zip(&blk[2..]) {
                *l = f32::from((q & 0x0F) as i8 - 8) * d;
                *h = f32::from((q >> 4) as i8 - 8) * d;
            }
        }
    }
}

/// f16 bits as `half::f16` (same layout).
fn bytemuck_u16(v: &[u16]) -> &[half::f16] {
    // `half::f16` is `repr(transparent)` over `u16`: reinterpreting is
    // what `half`'s own `from_bits` slice API does.
    half::slice::HalfBitsSliceExt::reinterpret_cast(v)
}

/// The format's kernel name, for benches and errors.
pub fn kernel(format: Format, tokens: usize) -> &'static str {
    match (format, tokens <= GEMV_TOKENS) {
        (Format::F32, _) => "faer gemm",
        (_, true) => "row dot (AVX2+FMA when present)",
        (_, false) => "decoded panels + faer gemm",
    }
}
