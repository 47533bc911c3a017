//! [`Faer`]'s kernels for frozen bases stored as f16, bf16,
//! int8, Q8_0 or Q4_0 ([`peft_core::storage`]), in f32 activations. `W` is
//! never copied to f32 whole:
//!
//! * **Few tokens** (at most [`GEMV_TOKENS`], decode time): one pass over
//!   the rows of `W`, each row decoded a block at a time and dotted with
//!   every token's input while it is in L1. The dot products use eight
//!   independent f32 accumulators, compiled twice: for AVX2 + FMA (chosen
//!   at run time when the CPU has both) and for the baseline target.
//! * **More tokens**: `W` is decoded a tile at a time (a block of rows
//!   by a block of columns, about [`PANEL_BYTES`] of f32) and faer
//!   multiplies each tile by the matching block of the input's columns.
//!   The column blocks are the outer loop and hold at most
//!   [`INPUT_BLOCK_BYTES`] of the input, so that block stays in L2 while
//!   every row of `W` passes by; each element of `W` is decoded once, and
//!   the decode cost is shared by all tokens.
//! * **The input gradient** `grad_x (=|+=) grad_y deq(W)`: the same
//!   tiles, each adding its product to a block of `grad_x`'s columns.
//!
//! f32 bases go straight to faer (no copy at all). Every path computes the
//! products the portable kernels in `peft-core` do, in another order: the
//! results agree within the rounding bound `peft-verify` checks.
//!
//! With several threads ([`Faer::with_threads`]), a product of at least
//! [`PAR_MIN_STORED_MACS`] is split by rows of `W` (columns of the output)
//! over the crate's pool of helper threads (`pool.rs`), f32 included; each part runs one of the
//! paths above on its rows, so a row's result does not depend on the
//! thread count.
//!
//! **Opt-in integer decode** (`int8` module,
//! [`Faer::int8_activations`]): one-token products over Q8_0 and Q4_0
//! quantize the input to int8 per block and use integer dot products, as
//! ggml does; a different numerical contract with a stated error bound.

use peft_core::Operand;
use peft_core::storage::{Format, Q4_0_BYTES, Q8_0_BYTES, QK, RowRef, StoredWeight};
use peft_core::{Accum, Backend, Error, MatMut, MatRef, Op, Result};

use crate::Faer;

mod ggml;
mod int8;

/// Up to this many tokens, a stored base is multiplied row by row
/// (decoded once per row, dotted with every token).
pub const GEMV_TOKENS: usize = 4;

/// The decoded tile's size for the many-token path (f32 bytes): small
/// enough to stay in L2 beside the activations.
pub const PANEL_BYTES: usize = 256 << 10;

/// The many-token path's block of input columns (f32 bytes, all tokens).
pub const INPUT_BLOCK_BYTES: usize = 256 << 10;

/// A stored product of at least this many multiply-adds (`t * in * out`)
/// is split by rows of `W` over the backend's threads; smaller ones run on
/// the calling thread. At SmolLM2's shapes every one-token product is
/// above it (`k_proj`, 192 x 576, is 0.11 M): with the pool's (`pool.rs`)
/// helpers awake, a split costs a few microseconds (rayon's `join`, 15 to
/// 70, needed 0.5 M, and left the attention's products serial).
pub const PAR_MIN_STORED_MACS: usize = 1 << 16;

/// Rows of `W` per thread are a multiple of this.
const PAR_ROWS: usize = 16;

/// One thread's share of a split product: rows `start..end` of `W`, its
/// output, and its result.
struct Part<'o> {
    start: usize,
    end: usize,
    out: &'o mut [f32],
    result: Result<()>,
}

/// Runs `f` on every part over up to `threads` threads ([`crate::pool`]:
/// helpers that stay awake between a decode step's products), each part
/// whole on one thread.
fn run_parts(parts: &mut [Part<'_>], threads: usize, f: &(dyn Fn(&mut Part<'_>) + Sync)) {
    if parts.len() <= 1 || threads <= 1 {
        parts.iter_mut().for_each(f);
        return;
    }
    // Each part behind its own (uncontended) lock: the pool hands out
    // indices, and every index is taken by exactly one thread.
    let cells: Vec<std::sync::Mutex<&mut Part<'_>>> = parts.iter_mut().map(std::sync::Mutex::new).collect();
    crate::pool::run(threads, cells.len(), &|i| {
        if let Some(cell) = cells.get(i) {
            let mut part = cell.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut part);
        }
    });
}

/// [`run_parts`], then the first part's error, if any.
fn run_all(parts: &mut [Part<'_>], threads: usize, f: &(dyn Fn(&mut Part<'_>) + Sync)) -> Result<()> {
    run_parts(parts, threads, f);
    parts.iter_mut().try_for_each(|p| core::mem::replace(&mut p.result, Ok(())))
}

/// The row ranges of `n_out` rows over `threads` parts (each a multiple
/// of [`PAR_ROWS`] but the last), or `None` when the product should run on
/// one thread.
fn split_rows(faer: &Faer, t: usize, n_in: usize, n_out: usize) -> Option<Vec<(usize, usize)>> {
    let threads = faer.threads();
    let macs = t.saturating_mul(n_in).saturating_mul(n_out);
    if threads <= 1 || macs < PAR_MIN_STORED_MACS || n_out < 2 * PAR_ROWS {
        return None;
    }
    let per = n_out.div_ceil(threads).div_ceil(PAR_ROWS) * PAR_ROWS;
    Some((0..n_out).step_by(per).map(|a| (a, (a + per).min(n_out))).collect())
}

/// `y (=|+=) x deq(W)^T` (see the module docs). With several threads, the
/// rows of `W` (columns of `y`) are split between them.
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
    // f32 too: split by rows of `W`, each part one single-threaded faer
    // gemm (faer's own two-thread gemm gave 1.2x at SmolLM2's prefill
    // shapes, this split 1.4x; its one-row kernel stays on one thread).
    // The integer path's quantized input, once for all the parts.
    let xq = int8::prepare(faer, w, x);
    let Some(ranges) = split_rows(faer, t, n_in, n_out) else {
        return apply_seq(faer, w, x, y, accum, xq.as_ref());
    };
    let seq = faer.single_threaded();
    // Each part's columns of `y`, gathered (one token: the row itself, split).
    let mut bufs: Vec<Vec<f32>> = if t == 1 {
        Vec::new()
    } else {
        ranges
            .iter()
            .map(|&(a, b)| {
                let mut v = vec![0.0f32; t * (b - a)];
                if accum == Accum::Add {
                    for (i, dst) in v.chunks_exact_mut(b - a).enumerate() {
                        dst.copy_from_slice(&y.row_mut(i)[a..b]);
                    }
                }
                v
            })
            .collect()
    };
    let mut parts: Vec<Part<'_>> = if t == 1 {
        let mut rest = y.row_mut(0);
        let mut v = Vec::with_capacity(ranges.len());
        for &(a, b) in &ranges {
            let (head, tail) = core::mem::take(&mut rest).split_at_mut(b - a);
            v.push(Part { start: a, end: b, out: head, result: Ok(()) });
            rest = tail;
        }
        v
    } else {
        ranges
            .iter()
            .zip(bufs.iter_mut())
            .map(|(&(a, b), o)| Part { start: a, end: b, out: o, result: Ok(()) })
            .collect()
    };
    run_all(&mut parts, faer.threads(), &|part: &mut Part<'_>| {
        let (a, b) = (part.start, part.end);
        part.result = match (w.rows(a, b), MatMut::new(&mut *part.out, t, b - a)) {
            (Some(wp), Ok(out)) => apply_seq(&seq, &wp, x, out, accum, xq.as_ref()),
            (_, Err(e)) => Err(e),
            (None, _) => Err(Error::Overflow),
        };
    })?;
    drop(parts);
    for (&(a, b), buf) in ranges.iter().zip(&bufs) {
        for (i, src) in buf.chunks_exact(b - a).enumerate() {
            y.row_mut(i)[a..b].copy_from_slice(src);
        }
    }
    Ok(())
}

/// [`apply`] on the calling thread; `xq` the input quantized for the
/// integer path when it applies ([`int8::prepare`]).
fn apply_seq(
    faer: &Faer,
    w: &StoredWeight<'_>,
    x: MatRef<'_, f32>,
    mut y: MatMut<'_, f32>,
    accum: Accum,
    xq: Option<&int8::Int8Input>,
) -> Result<()> {
    let (t, n_in, n_out) = (x.rows(), w.in_features(), w.out_features());
    check(Operand::Input, x.cols(), n_in)?;
    check(Operand::Output, y.rows(), t)?;
    check(Operand::Output, y.cols(), n_out)?;
    if let Some(full) = w.as_f32() {
        return faer.gemm(y, accum, x, Op::N, MatRef::new(full, n_out, n_in)?, Op::T, 1.0);
    }
    if let Some(xq) = xq {
        return int8::gemv1(w, xq, y.row_mut(0), accum);
    }
    #[cfg(target_arch = "x86_64")]
    if t == 1
        && w.format() == Format::Q4_0
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        let xp = q4_permute(x.row(0));
        let yrow = y.row_mut(0);
        for (j, v) in yrow.iter_mut().enumerate().take(n_out) {
            let Some(RowRef::Q4_0(bytes)) = w.row(j) else { return Err(Error::Overflow) };
            // SAFETY: AVX2, FMA and F16C are detected just above; `xp`
            // holds the row's `in` values (`check` above).
            let d = unsafe { gemv1_q4_0_avx2(bytes, &xp) };
            *v = match accum {
                Accum::Replace => d,
                Accum::Add => *v + d,
            };
        }
        return Ok(());
    }
    if t == 1 && ggml::gemv1(w, x.row(0), y.row_mut(0), accum) {
        return Ok(());
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
    let (cols, rows) = tile(t, n_in, n_out, w.format());
    tiled(faer, w, x, y, accum, cols, rows, false)
}

/// `grad_x (=|+=) grad_y deq(W)` (see the module docs). With several
/// threads, each takes a block of `W`'s rows and computes its partial
/// `grad_y[:, J] deq(W[J, :])`; the partials are then added in order.
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
    // f32 too, as in `apply` (a SmolLM2-shaped LoRA training step at two
    // threads: 628 ms through faer's own parallel gemm, 474 ms split).
    let Some(ranges) = split_rows(faer, t, n_in, n_out) else {
        return apply_transpose_seq(faer, w, grad_y, grad_x, accum);
    };
    let seq = faer.single_threaded();
    let mut bufs: Vec<Vec<f32>> = ranges.iter().map(|_| vec![0.0f32; t * n_in]).collect();
    let mut parts: Vec<Part<'_>> = ranges
        .iter()
        .zip(bufs.iter_mut())
        .map(|(&(a, b), o)| Part { start: a, end: b, out: o, result: Ok(()) })
        .collect();
    run_all(&mut parts, faer.threads(), &|part: &mut Part<'_>| {
        let (a, b) = (part.start, part.end);
        let g = grad_y.cols_range(a, b - a);
        part.result = match (w.rows(a, b), g, MatMut::new(&mut *part.out, t, n_in)) {
            (Some(wp), Some(g), Ok(out)) => apply_transpose_seq(&seq, &wp, g, out, Accum::Replace),
            (_, _, Err(e)) => Err(e),
            _ => Err(Error::Overflow),
        };
    })?;
    drop(parts);
    for i in 0..t {
        let row = grad_x.row_mut(i);
        for (k, buf) in bufs.iter().enumerate() {
            let src = &buf[i * n_in..(i + 1) * n_in];
            if k == 0 && accum == Accum::Replace {
                row.copy_from_slice(src);
            } else {
                row.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            }
        }
    }
    Ok(())
}

/// [`apply_transpose`] on the calling thread.
fn apply_transpose_seq(
    faer: &Faer,
    w: &StoredWeight<'_>,
    grad_y: MatRef<'_, f32>,
    grad_x: MatMut<'_, f32>,
    accum: Accum,
) -> Result<()> {
    let (t, n_in, n_out) = (grad_y.rows(), w.in_features(), w.out_features());
    if let Some(full) = w.as_f32() {
        return faer.gemm(grad_x, accum, grad_y, Op::N, MatRef::new(full, n_out, n_in)?, Op::N, 1.0);
    }
    let (cols, rows) = tile(t, n_in, n_out, w.format());
    tiled(faer, w, grad_y, grad_x, accum, cols, rows, true)
}

/// The many-token products over tiles of `cols` columns by `rows` rows of
/// `W`, the column blocks outermost:
///
/// * `transpose = false`: `y[:, J] (=|+=) x[:, K] deq(W[J, K])^T`
///   (`a` = `x`, `c` = `y`);
/// * `transpose = true`: `grad_x[:, K] (=|+=) grad_y[:, J] deq(W[J, K])`
///   (`a` = `grad_y`, `c` = `grad_x`).
///
/// The first product into each block of `c` takes `accum`, the others add.
/// `cols` is a multiple of [`QK`] unless it is all of `in` (a tile starts
/// on a block).
#[allow(clippy::too_many_arguments)]
fn tiled(
    faer: &Faer,
    w: &StoredWeight<'_>,
    a: MatRef<'_, f32>,
    mut c: MatMut<'_, f32>,
    accum: Accum,
    cols: usize,
    rows: usize,
    transpose: bool,
) -> Result<()> {
    let (n_in, n_out) = (w.in_features(), w.out_features());
    let mut panel = vec![0.0f32; rows * cols];
    let mut k0 = 0;
    // `n_in == 0`: one empty pass still applies `accum` (a Replace zeroes).
    while k0 < n_in || (k0 == 0 && n_in == 0) {
        let k = cols.min(n_in - k0);
        let mut j0 = 0;
        while j0 < n_out || (j0 == 0 && n_out == 0 && transpose) {
            let p = rows.min(n_out - j0);
            decode_tile(w, j0, k0, k, &mut panel[..p * k])?;
            let tile = MatRef::new(&panel[..p * k], p, k)?;
            let overflow = || Error::Overflow;
            if transpose {
                let acc = if j0 == 0 { accum } else { Accum::Add };
                let g = a.cols_range(j0, p).ok_or_else(overflow)?;
                faer.gemm(columns(&mut c, k0, k)?, acc, g, Op::N, tile, Op::N, 1.0)?;
            } else {
                let acc = if k0 == 0 { accum } else { Accum::Add };
                let xk = a.cols_range(k0, k).ok_or_else(overflow)?;
                faer.gemm(columns(&mut c, j0, p)?, acc, xk, Op::N, tile, Op::T, 1.0)?;
            }
            j0 += p.max(1);
        }
        k0 += k.max(1);
    }
    Ok(())
}

/// The tile shape `(cols, rows)` for `t` tokens: as many input columns as
/// fit [`INPUT_BLOCK_BYTES`] for all tokens (a multiple of [`QK`] and of
/// the format's block, at least two blocks, at most `in`), and as many
/// rows as then fit [`PANEL_BYTES`].
fn tile(t: usize, n_in: usize, n_out: usize, format: Format) -> (usize, usize) {
    let unit = format.block().0.max(QK);
    let cols = (INPUT_BLOCK_BYTES / 4 / t.max(1) / unit * unit).max(2 * unit);
    let cols = if cols >= n_in { n_in } else { cols };
    (cols, (PANEL_BYTES / 4 / cols.max(1)).clamp(1, n_out.max(1)))
}

/// `Ok` if a dimension is the one required.
fn check(operand: Operand, found: usize, expected: usize) -> Result<()> {
    if found == expected { Ok(()) } else { Err(Error::ShapeMismatch { operand, expected, found }) }
}

/// Columns `j0..j0 + p` of `y` as a strided view.
fn columns<'a>(y: &'a mut MatMut<'_, f32>, j0: usize, p: usize) -> Result<MatMut<'a, f32>> {
    let (t, stride) = (y.rows(), y.row_stride());
    let data = y.rb_mut().into_slice();
    MatMut::with_stride(data.get_mut(j0..).unwrap_or(&mut []), t, p, stride)
}

/// Columns `k0..k0 + k` of rows `j0..` of `deq(W)` into `dst` (`k`
/// values per row, as many rows as `dst` holds). `k0` is a multiple of
/// [`QK`] and of the format's block; whole blocks go through the AVX2
/// decoder when the CPU has it, GGUF's other block formats through
/// [`peft_core::storage::ggml::decode_block`].
fn decode_tile(w: &StoredWeight<'_>, j0: usize, k0: usize, k: usize, dst: &mut [f32]) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c");
    for (i, out) in dst.chunks_exact_mut(k.max(1)).enumerate() {
        let row = w.row(j0 + i).ok_or(Error::Overflow)?;
        if let RowRef::Blocks(..) = row {
            ggml::decode_range(row, k0, out);
            continue;
        }
        #[cfg(target_arch = "x86_64")]
        if avx2 && k0.is_multiple_of(QK) {
            // SAFETY: `decode_row_avx2` needs AVX2 and F16C, detected at
            // run time above.
            unsafe { decode_row_avx2(row, k0 / QK, out) };
            continue;
        }
        row.decode_range(k0, out);
    }
    Ok(())
}

/// `out.len()` values of a row from block `first` on, decoded with
/// [`decode_block_avx2`] block by block (the element formats' tail, if
/// any, by the portable decoder).
///
/// # Safety
/// The CPU must have AVX2 and F16C. The row must hold the values asked
/// for (`decode_block_avx2`'s slicing panics otherwise: callers pass a
/// range inside the row).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_row_avx2(row: RowRef<'_>, first: usize, out: &mut [f32]) {
    let blocks = out.len() / QK;
    for (bi, chunk) in out.chunks_exact_mut(QK).enumerate().take(blocks) {
        if let Ok(block) = <&mut [f32; QK]>::try_from(chunk) {
            // SAFETY: this function's own precondition.
            unsafe { decode_block_avx2(row, first + bi, block) };
        }
    }
    let tail = blocks * QK;
    if tail < out.len() {
        row.decode_range(first * QK + tail, &mut out[tail..]);
    }
}

/// `dots[i] = row . xs[i]` for each token (at most [`GEMV_TOKENS`]), the
/// row decoded once.
fn dot_rows(row: RowRef<'_>, xs: &[&[f32]], dots: &mut [f32]) {
    if let RowRef::Blocks(format, bytes) = row {
        return ggml::dot_rows(format, bytes, xs, dots);
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        // SAFETY: `dot_rows_avx2` needs AVX2, FMA and F16C, all detected at
        // run time just above.
        return unsafe { dot_rows_avx2(row, xs, dots) };
    }
    dot_rows_generic::<false>(row, xs, dots);
}

/// [`dot_rows_generic`] compiled with AVX2, FMA and F16C; one token (the
/// decode step) through [`gemv1_avx2`].
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_avx2(row: RowRef<'_>, xs: &[&[f32]], dots: &mut [f32]) {
    if let ([x], [d]) = (xs, &mut *dots) {
        // SAFETY: the caller's CPU has the features (this function's own
        // precondition).
        *d = unsafe { gemv1_avx2(row, x) };
        return;
    }
    dot_rows_generic::<true>(row, xs, dots);
}

/// One row dotted with one token, in AVX2 intrinsics: each block decoded
/// into four 8-lane registers and multiplied into four independent
/// accumulators (no round trip through memory).
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C. `x` must hold the row's length
/// (`apply` checked it); every load below stays inside `x` and the row's
/// bytes (bounds derived from their lengths).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv1_avx2(row: RowRef<'_>, x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    // acc += d (sum_k q_k x_k) over one block: the integer values are
    // multiplied first (exact products of small integers and x), then
    // scaled once.
    let block_fma = |acc: &mut __m256, q: [__m256; 4], x: *const f32, d: __m256| {
        // SAFETY: `x` points at a whole block of 32 values of the input
        // (the callers' bounds); AVX2 and FMA are present.
        unsafe {
            let mut t = _mm256_mul_ps(q[0], _mm256_loadu_ps(x));
            for (k, qk) in q.iter().enumerate().skip(1) {
                t = _mm256_fmadd_ps(*qk, _mm256_loadu_ps(x.add(8 * k)), t);
            }
            *acc = _mm256_fmadd_ps(d, t, *acc);
        }
    };
    // SAFETY (all loads): block `bi` is read only while `(bi + 1) QK <=
    // x.len()` and the row's slice holds that block (the `min` below).
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        let xp = x.as_ptr();
        let mut fma4 = |bi: usize, v: [__m256; 4]| {
            for (k, (a, v)) in acc.iter_mut().zip(v).enumerate() {
                *a = _mm256_fmadd_ps(v, _mm256_loadu_ps(xp.add(bi * QK + 8 * k)), *a);
            }
        };
        let tail_from = match row {
            RowRef::F32(v) => {
                let nb = v.len().min(x.len()) / QK;
                let p = v.as_ptr();
                for bi in 0..nb {
                    fma4(bi, core::array::from_fn(|k| _mm256_loadu_ps(p.add(bi * QK + 8 * k))));
                }
                nb * QK
            }
            RowRef::F16(v) | RowRef::Bf16(v) => {
                let nb = v.len().min(x.len()) / QK;
                let p = v.as_ptr();
                let bf16 = matches!(row, RowRef::Bf16(_));
                for bi in 0..nb {
                    fma4(
                        bi,
                        core::array::from_fn(|k| {
                            let bits = _mm_loadu_si128(p.add(bi * QK + 8 * k).cast::<__m128i>());
                            if bf16 {
                                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(bits)))
                            } else {
                                _mm256_cvtph_ps(bits)
                            }
                        }),
                    );
                }
                nb * QK
            }
            RowRef::Int8(q, s) => {
                let nb = q.len().min(x.len()) / QK;
                let (p, sv) = (q.as_ptr(), _mm256_set1_ps(s));
                for bi in 0..nb {
                    fma4(
                        bi,
                        core::array::from_fn(|k| {
                            let v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(bi * QK + 8 * k).cast::<__m128i>()));
                            _mm256_mul_ps(_mm256_cvtepi32_ps(v), sv)
                        }),
                    );
                }
                nb * QK
            }
            RowRef::Q8_0(b) => {
                let nb = (b.len() / Q8_0_BYTES).min(x.len() / QK);
                for (bi, blk) in b.chunks_exact(Q8_0_BYTES).take(nb).enumerate() {
                    let p = blk.as_ptr().add(2);
                    let q: [__m256; 4] = core::array::from_fn(|k| {
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8 * k).cast::<__m128i>())))
                    });
                    block_fma(&mut acc[bi % 2], q, xp.add(bi * QK), scale8(blk));
                }
                x.len()
            }
            RowRef::Q4_0(b) => {
                let nb = (b.len() / Q4_0_BYTES).min(x.len() / QK);
                let (mask, eight) = (_mm_set1_epi8(0x0F), _mm256_set1_epi32(8));
                for (bi, blk) in b.chunks_exact(Q4_0_BYTES).take(nb).enumerate() {
                    let bytes = _mm_loadu_si128(blk.as_ptr().add(2).cast::<__m128i>());
                    // Low nibbles are values 0..16, high nibbles 16..32.
                    let lo = _mm_and_si128(bytes, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), mask);
                    let parts = [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)];
                    let q = parts.map(|part| _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(part), eight)));
                    block_fma(&mut acc[bi % 2], q, xp.add(bi * QK), scale8(blk));
                }
                x.len()
            }
            // Routed to `dot_rows_blocks` before this kernel; the portable
            // tail below would still compute it.
            RowRef::Blocks(..) => 0,
        };
        finish_dot(acc, row, x, tail_from)
    }
}

/// A block's f16 scale (its first two bytes), broadcast to 8 lanes (F16C).
///
/// # Safety
/// The CPU must have AVX2 and F16C; `blk` holds at least two bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn scale8(blk: &[u8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let bits = i32::from(u16::from_le_bytes([blk[0], blk[1]]));
    // SAFETY: register-only intrinsics; F16C and AVX2 are present.
    // (Safe to call here from Rust 1.87; the block keeps the MSRV.)
    #[allow(unused_unsafe)]
    unsafe {
        _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
    }
}

/// [`gemv1_avx2`]'s end: the four accumulators summed across lanes, then
/// the row's elements from `tail_from` on (rows of the element formats
/// need not be whole blocks) in scalar code.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn finish_dot(acc: [std::arch::x86_64::__m256; 4], row: RowRef<'_>, x: &[f32], tail_from: usize) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY: register and stack-array intrinsics; AVX2 is present.
    #[allow(unused_unsafe)]
    unsafe {
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        let mut total: f32 = lanes.iter().sum();
        for (k, xk) in x.iter().enumerate().skip(tail_from) {
            total += row.get(k).unwrap_or(0.0) * xk;
        }
        total
    }
}

/// Lane `l` of register `m` of a Q4_0 block in [`gemv1_q4_0_avx2`] holds
/// element `Q4_LANE[8 m + l]` of the block: dword `m` (bytes `4m..4m+4`)
/// broadcast and shifted right by `Q4_SHIFTS[l]`, so the four low nibbles
/// (elements `4m..4m+4`) then the four high ones (`4m+16..4m+20`).
const Q4_LANE: [usize; QK] = {
    let mut lane = [0; QK];
    let mut i = 0;
    while i < QK {
        let (m, l) = (i / 8, i % 8);
        lane[i] = if l < 4 { 4 * m + l } else { 16 + 4 * m + (l - 4) };
        i += 1;
    }
    lane
};

/// The right shifts that bring each lane's nibble down (see [`Q4_LANE`]).
#[cfg(target_arch = "x86_64")]
const Q4_SHIFTS: [i32; 8] = [0, 8, 16, 24, 4, 12, 20, 28];

/// `x` reordered block by block into the lane order of [`Q4_LANE`] (done
/// once per product, then read by every row).
fn q4_permute(x: &[f32]) -> Vec<f32> {
    let mut xp = vec![0.0f32; x.len() / QK * QK];
    for (dst, src) in xp.chunks_exact_mut(QK).zip(x.chunks_exact(QK)) {
        for (d, &k) in dst.iter_mut().zip(&Q4_LANE) {
            *d = src[k];
        }
    }
    xp
}

/// Every f16 bit pattern's f32 value (256 KiB, built on first use): a
/// block's scale becomes one load, with no conversion or shuffle-port work
/// per block.
fn f16_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| (0..=u16::MAX).map(peft_core::storage::f16_to_f32).collect())
}

/// One Q4_0 row (`bytes`, whole blocks) dotted with one permuted input
/// `xp` ([`q4_permute`]): per block, each dword of nibbles is broadcast
/// from memory, shifted per lane, masked and offset by 8 in integers
/// (exact), converted, and multiplied by `xp` into a block sum `t`; then
/// `acc += d t`, `d` read from [`f16_table`]. Four accumulators.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C. Loads stay inside `bytes`, `xp`
/// (the block count is the smaller of the two) and the table (indexed by
/// a `u16`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv1_q4_0_avx2(bytes: &[u8], xp: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nb = (bytes.len() / Q4_0_BYTES).min(xp.len() / QK);
    let table = f16_table();
    // SAFETY (all intrinsics and loads): the CPU features are this
    // function's precondition; block `bi < nb` lies inside `bytes` and its
    // 32 inputs inside `xp`; the table has 65536 entries.
    unsafe {
        let shifts = _mm256_loadu_si256(Q4_SHIFTS.as_ptr().cast::<__m256i>());
        let (mask, eight) = (_mm256_set1_epi32(0x0F), _mm256_set1_epi32(8));
        let (b, t) = (bytes.as_ptr(), table.as_ptr());
        // d (sum_k (q_k - 8) x_k) for block `bi`.
        let block = |bi: usize| {
            let blk = b.add(bi * Q4_0_BYTES);
            let q = blk.add(2);
            let x = xp.as_ptr().add(bi * QK);
            let v = |m: usize| {
                let dw = _mm256_set1_epi32(q.add(4 * m).cast::<i32>().read_unaligned());
                let nib = _mm256_and_si256(_mm256_srlv_epi32(dw, shifts), mask);
                _mm256_cvtepi32_ps(_mm256_sub_epi32(nib, eight))
            };
            let mut s = _mm256_mul_ps(v(0), _mm256_loadu_ps(x));
            s = _mm256_fmadd_ps(v(1), _mm256_loadu_ps(x.add(8)), s);
            s = _mm256_fmadd_ps(v(2), _mm256_loadu_ps(x.add(16)), s);
            s = _mm256_fmadd_ps(v(3), _mm256_loadu_ps(x.add(24)), s);
            let h = usize::from(u16::from_le(blk.cast::<u16>().read_unaligned()));
            (_mm256_broadcast_ss(&*t.add(h)), s)
        };
        // Two blocks per step, each into its own accumulators (registers).
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut bi = 0;
        while bi + 2 <= nb {
            let (d0, s0) = block(bi);
            let (d1, s1) = block(bi + 1);
            acc[0] = _mm256_fmadd_ps(d0, s0, acc[0]);
            acc[1] = _mm256_fmadd_ps(d1, s1, acc[1]);
            bi += 2;
            if bi + 2 <= nb {
                let (d2, s2) = block(bi);
                let (d3, s3) = block(bi + 1);
                acc[2] = _mm256_fmadd_ps(d2, s2, acc[2]);
                acc[3] = _mm256_fmadd_ps(d3, s3, acc[3]);
                bi += 2;
            }
        }
        if bi < nb {
            let (d, s) = block(bi);
            acc[0] = _mm256_fmadd_ps(d, s, acc[0]);
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        lanes.iter().sum()
    }
}

/// Dispatches on the token count, so that each kernel has fixed-size loops
/// the compiler vectorizes.
#[inline(always)]
fn dot_rows_generic<const AVX2: bool>(row: RowRef<'_>, xs: &[&[f32]], dots: &mut [f32]) {
    macro_rules! tokens {
        ($($t:literal)*) => {
            match xs.len() {
                $($t => {
                    let x: [&[f32]; $t] = core::array::from_fn(|i| xs.get(i).copied().unwrap_or(&[]));
                    let d = gemv::<AVX2, $t>(row, &x);
                    dots.iter_mut().zip(d).for_each(|(o, v)| *o = v);
                })*
                _ => {}
            }
        };
    }
    tokens!(1 2 3 4);
}

/// `T` dot products of one row: each [`QK`]-value block decoded into a
/// stack array, then multiplied into [`QK`] accumulators per token (four
/// independent 8-lane chains: an FMA's latency is hidden).
#[inline(always)]
fn gemv<const AVX2: bool, const T: usize>(row: RowRef<'_>, xs: &[&[f32]; T]) -> [f32; T] {
    let mut acc = [[0.0f32; QK]; T];
    let mut w = [0.0f32; QK];
    let n = match row {
        RowRef::F32(v) => v.len(),
        RowRef::F16(v) | RowRef::Bf16(v) => v.len(),
        RowRef::Int8(q, _) => q.len(),
        RowRef::Q8_0(b) => b.len() / Q8_0_BYTES * QK,
        RowRef::Q4_0(b) => b.len() / Q4_0_BYTES * QK,
        // Routed to `dot_rows_blocks` before this kernel.
        RowRef::Blocks(..) => 0,
    };
    let blocks = n / QK;
    for bi in 0..blocks {
        decode_block::<AVX2>(row, bi, &mut w);
        for (a, x) in acc.iter_mut().zip(xs) {
            let Some(x) = x.get(bi * QK..(bi + 1) * QK) else { continue };
            for ((a, w), x) in a.iter_mut().zip(&w).zip(x) {
                *a = if AVX2 { w.mul_add(*x, *a) } else { w * x + *a };
            }
        }
    }
    // The tail (f16, bf16, int8, f32 rows not a multiple of QK).
    let tail = blocks * QK;
    if tail < n {
        let len = n - tail;
        row.decode_range(tail, &mut w[..len]);
        for (a, x) in acc.iter_mut().zip(xs) {
            for (k, (w, x)) in w[..len].iter().zip(x.get(tail..).unwrap_or(&[])).enumerate() {
                a[k] += w * x;
            }
        }
    }
    acc.map(|a| a.iter().sum())
}

/// Block `bi` (values `bi QK..`) of the row, decoded into `w`.
#[inline(always)]
fn decode_block<const AVX2: bool>(row: RowRef<'_>, bi: usize, w: &mut [f32; QK]) {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: AVX2 = true only inside `dot_rows_avx2`, which runs when
        // the CPU has AVX2, FMA and F16C.
        unsafe { decode_block_avx2(row, bi, w) };
        return;
    }
    row.decode_range(bi * QK, w);
}

/// [`decode_block`] with AVX2 and F16C intrinsics, 8 values per step.
///
/// # Safety
/// The CPU must have AVX2 and F16C. Every load reads inside the block's
/// slice (bounds checked by the slicing below) and every store writes
/// inside `w` (32 values).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn decode_block_avx2(row: RowRef<'_>, bi: usize, w: &mut [f32; QK]) {
    use std::arch::x86_64::*;
    let c = bi * QK;
    let out = w.as_mut_ptr();
    // SAFETY (all blocks below): the slices are bounds-checked, 8-value
    // loads and stores stay within them (QK = 32 values per block).
    unsafe {
        match row {
            RowRef::F32(v) => w.copy_from_slice(&v[c..c + QK]),
            // Not reached (the callers route these formats elsewhere);
            // value by value, exact.
            RowRef::Blocks(..) => w.iter_mut().enumerate().for_each(|(i, o)| *o = row.get(c + i).unwrap_or(0.0)),
            RowRef::F16(v) => {
                let h = v[c..c + QK].as_ptr();
                for k in 0..QK / 8 {
                    let bits = _mm_loadu_si128(h.add(8 * k).cast::<__m128i>());
                    _mm256_storeu_ps(out.add(8 * k), _mm256_cvtph_ps(bits));
                }
            }
            RowRef::Bf16(v) => {
                let h = v[c..c + QK].as_ptr();
                for k in 0..QK / 8 {
                    let bits = _mm256_cvtepu16_epi32(_mm_loadu_si128(h.add(8 * k).cast::<__m128i>()));
                    _mm256_storeu_ps(out.add(8 * k), _mm256_castsi256_ps(_mm256_slli_epi32::<16>(bits)));
                }
            }
            RowRef::Int8(q, s) => {
                let p = q[c..c + QK].as_ptr();
                let scale = _mm256_set1_ps(s);
                for k in 0..QK / 8 {
                    let v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8 * k).cast::<__m128i>()));
                    _mm256_storeu_ps(out.add(8 * k), _mm256_mul_ps(_mm256_cvtepi32_ps(v), scale));
                }
            }
            RowRef::Q8_0(b) => {
                let blk = &b[bi * Q8_0_BYTES..(bi + 1) * Q8_0_BYTES];
                let d = _mm256_set1_ps(peft_core::storage::f16_to_f32(u16::from_le_bytes([blk[0], blk[1]])));
                let p = blk[2..].as_ptr();
                for k in 0..QK / 8 {
                    let v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8 * k).cast::<__m128i>()));
                    _mm256_storeu_ps(out.add(8 * k), _mm256_mul_ps(_mm256_cvtepi32_ps(v), d));
                }
            }
            RowRef::Q4_0(b) => {
                let blk = &b[bi * Q4_0_BYTES..(bi + 1) * Q4_0_BYTES];
                let d = _mm256_set1_ps(peft_core::storage::f16_to_f32(u16::from_le_bytes([blk[0], blk[1]])));
                let bytes = _mm_loadu_si128(blk[2..].as_ptr().cast::<__m128i>());
                let mask = _mm_set1_epi8(0x0F);
                let eight = _mm256_set1_epi32(8);
                // Low nibbles are values 0..16, high nibbles 16..32.
                let lo = _mm_and_si128(bytes, mask);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), mask);
                for (half, nib) in [(0usize, lo), (16, hi)] {
                    for (k, part) in [(0usize, nib), (8, _mm_srli_si128::<8>(nib))] {
                        let v = _mm256_sub_epi32(_mm256_cvtepu8_epi32(part), eight);
                        _mm256_storeu_ps(out.add(half + k), _mm256_mul_ps(_mm256_cvtepi32_ps(v), d));
                    }
                }
            }
        }
    }
}

/// The format's kernel name, for benches and errors.
pub fn kernel(format: Format, tokens: usize) -> &'static str {
    match (format, tokens <= GEMV_TOKENS) {
        (Format::F32, _) => "faer gemm",
        (_, true) => "row dot (AVX2+FMA when present)",
        (_, false) => "decoded tiles + faer gemm",
    }
}

#[cfg(test)]
mod tests {
    use peft_core::storage::Format;
    use peft_core::storage::OwnedWeight;
    use peft_core::{Accum, Backend, MatMut, MatRef, Product, Reference, Rng};

    use crate::Faer;

    /// Two threads split the rows of `W` (the forward's output columns,
    /// the input gradient's partial sums) and give what one thread gives:
    /// every storage format, one token (the row split in place; f32's too),
    /// three (few-token path; f32's is faer's gemm) and 40 (tiles),
    /// `Replace` and `Add`, 600 rows (not a multiple of the split's 16).
    /// Within 1e-6 of `sum |w x|`.
    #[test]
    fn two_threads_give_what_one_gives() {
        use super::{apply, apply_transpose, split_rows};
        let mut rng = Rng::new(21);
        let (out, inn) = (600, 1024);
        let mut w = vec![0.0f32; out * inn];
        rng.fill_uniform(&mut w, -1.0, 1.0);
        let (one, two) = (Faer::new(), Faer::with_threads(2));
        for format in Format::ALL.into_iter().filter(|f| f.has_quantizer()) {
            let owned = OwnedWeight::quantize(format, &w, out, inn).unwrap();
            let sw = owned.weight().unwrap();
            for t in [1usize, 3, 40] {
                assert!(split_rows(&two, t, inn, out).is_some(), "{format:?} t={t} is split");
                let mut x = vec![0.0f32; t * inn];
                rng.fill_uniform(&mut x, -1.0, 1.0);
                let mut g = vec![0.0f32; t * out];
                rng.fill_uniform(&mut g, -1.0, 1.0);
                let (xv, gv) = (MatRef::new(&x, t, inn).unwrap(), MatRef::new(&g, t, out).unwrap());
                for accum in [Accum::Replace, Accum::Add] {
                    let (mut y1, mut y2) = (vec![0.25f32; t * out], vec![0.25f32; t * out]);
                    apply(&one, &sw, xv, MatMut::new(&mut y1, t, out).unwrap(), accum).unwrap();
                    apply(&two, &sw, xv, MatMut::new(&mut y2, t, out).unwrap(), accum).unwrap();
                    let mag = inn as f32;
                    for (i, (a, b)) in y1.iter().zip(&y2).enumerate() {
                        assert!((a - b).abs() <= 1e-6 * mag, "{format:?} t={t} {accum:?} y[{i}]: {a} vs {b}");
                    }
                    let (mut d1, mut d2) = (vec![0.25f32; t * inn], vec![0.25f32; t * inn]);
                    apply_transpose(&one, &sw, gv, MatMut::new(&mut d1, t, inn).unwrap(), accum).unwrap();
                    apply_transpose(&two, &sw, gv, MatMut::new(&mut d2, t, inn).unwrap(), accum).unwrap();
                    let mag = out as f32;
                    for (i, (a, b)) in d1.iter().zip(&d2).enumerate() {
                        assert!((a - b).abs() <= 1e-6 * mag, "{format:?} t={t} {accum:?} grad_x[{i}]: {a} vs {b}");
                    }
                }
            }
        }
    }

    /// `src` times the stored weight into `dst` (as many rows as `src`).
    fn product<'a>(src: MatRef<'a, f32>, dst: &'a mut [f32], accum: Accum) -> Product<'a, f32> {
        let cols = dst.len() / src.rows().max(1);
        Product { src, dst: MatMut::new(dst, src.rows(), cols).unwrap(), accum }
    }

    /// Faer's kernels against the portable ones: every format, 1 (the
    /// intrinsics path), 3 (the generic few-token path) and 7 tokens
    /// (panels), rows of whole blocks plus, for the element formats, rows
    /// with a tail (`in` = 45).
    #[test]
    fn faer_paths_agree_with_the_portable_kernels() {
        let mut rng = Rng::new(3);
        for (inn, formats) in
            [(64, &Format::QUANTIZERS[..]), (45, &[Format::F32, Format::F16, Format::Bf16, Format::Int8][..])]
        {
            let out = 5;
            let mut w = vec![0.0f32; out * inn];
            rng.fill_uniform(&mut w, -1.0, 1.0);
            for &format in formats {
                let owned = OwnedWeight::quantize(format, &w, out, inn).unwrap();
                let sw = owned.weight().unwrap();
                for t in [1, 3, 7] {
                    let mut x = vec![0.0f32; t * inn];
                    rng.fill_uniform(&mut x, -1.0, 1.0);
                    let (mut y, mut yr) = (vec![0.25f32; t * out], vec![0.25f32; t * out]);
                    let xv = MatRef::new(&x, t, inn).unwrap();
                    Faer::new().stored_apply(&sw, product(xv, &mut y, Accum::Add)).unwrap();
                    Reference.stored_apply(&sw, product(xv, &mut yr, Accum::Add)).unwrap();
                    for (a, b) in y.iter().zip(&yr) {
                        assert!((a - b).abs() <= 1e-5 * inn as f32, "{format:?} t={t}: {a} vs {b}");
                    }
                    let mut g = vec![0.0f32; t * out];
                    rng.fill_uniform(&mut g, -1.0, 1.0);
                    let (mut gx, mut gxr) = (vec![0.0f32; t * inn], vec![0.0f32; t * inn]);
                    let gv = MatRef::new(&g, t, out).unwrap();
                    Faer::new().stored_apply_transpose(&sw, product(gv, &mut gx, Accum::Replace)).unwrap();
                    Reference.stored_apply_transpose(&sw, product(gv, &mut gxr, Accum::Replace)).unwrap();
                    for (a, b) in gx.iter().zip(&gxr) {
                        assert!((a - b).abs() <= 1e-5 * out as f32, "{format:?} t={t} grad_x: {a} vs {b}");
                    }
                    // Tiles of one block of columns by two rows: several
                    // column blocks (the last a tail at in = 45) and row
                    // blocks, `accum` on the first product only.
                    let f = Faer::new();
                    for accum in [Accum::Replace, Accum::Add] {
                        let mut yt = vec![0.25f32; t * out];
                        super::tiled(&f, &sw, xv, MatMut::new(&mut yt, t, out).unwrap(), accum, 32, 2, false).unwrap();
                        let mut gt = vec![0.5f32; t * inn];
                        super::tiled(&f, &sw, gv, MatMut::new(&mut gt, t, inn).unwrap(), accum, 32, 2, true).unwrap();
                        let (y0, g0) = if accum == Accum::Add { (0.25, 0.5) } else { (0.0, 0.0) };
                        for (a, b) in yt.iter().zip(&yr) {
                            assert!(
                                (a - (b - 0.25 + y0)).abs() <= 1e-5 * inn as f32,
                                "{format:?} t={t} tiles: {a} vs {b}"
                            );
                        }
                        for (a, b) in gt.iter().zip(&gxr) {
                            assert!(
                                (a - (b + g0)).abs() <= 1e-5 * out as f32,
                                "{format:?} t={t} tiles grad_x: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }
}
