//! The opt-in integer path for one-token products over Q8_0 and Q4_0
//! weights ([`Faer::int8_activations`](crate::Faer::int8_activations)),
//! as ggml runs its decode: the input is quantized to int8 per block of
//! [`QK`] values, and each block's dot product is a sum of integer
//! products, scaled once.
//!
//! ```text
//! d_b   = max_{k in b} |x_k| / 127          (f32; 0 for a block of zeros)
//! q_k   = round(127 x_k / max_{k in b} |x_k|)   in [-127, 127]
//! y_j   = sum_b  dw_{j,b} d_b  sum_{k in b} qw_{j,k} q_k
//! ```
//!
//! `qw` is the stored integer (Q8_0: the int8 value; Q4_0: the nibble
//! minus 8), `dw` the block's f16 scale. The integer sums are exact; each
//! block adds `dw d_b S_b` to an f32 accumulator (the Q4_0 offset, `8
//! d_b sum q_k`, is precomputed per input block and subtracted the same
//! way).
//!
//! **A different numerical contract.** The result is not the exact path's
//! `x deq(W)^T`: replacing `x_k` by `d_b q_k` moves each product by at
//! most `d_b (1/2 + 2^-10) |w_k|`, so
//!
//! ```text
//! |y_j - (x deq(W)^T)_j| <= sum_b d_b (1/2 + 2^-10) sum_{k in b} |deq(w)_{j,k}|
//!                           + (n + 4) u sum_k |deq(w)_{j,k}| (|x_k| + d_b)
//! ```
//!
//! with `u = 2^-24` and `n` the row's length (`peft-verify`'s
//! `storage_int8_activations_within_bound` checks this bound against the
//! f64 oracle). An input with a non-finite value, or of a length that is
//! not whole blocks, takes the exact path instead: its result is then the
//! reference's.
//!
//! AVX2 (`vpmaddubsw`, then `vpmaddwd` into eight i32 lanes) when the CPU
//! has it; a portable integer loop otherwise.

use peft_core::storage::{Format, Q4_0_BYTES, Q8_0_BYTES, QK, RowRef, StoredWeight};
use peft_core::{Accum, Error, Result};

/// One token's input, quantized per block of [`QK`] values (see the
/// module docs).
pub(super) struct Int8Input {
    /// `q_k`, whole blocks.
    q: Vec<i8>,
    /// `d_b` per block.
    d: Vec<f32>,
    /// `8 d_b sum_{k in b} q_k` per block: Q4_0's offset of 8.
    offset: Vec<f32>,
}

impl Int8Input {
    /// `x` quantized, or `None` when it holds a non-finite value or is
    /// not whole blocks (the caller then takes the exact path).
    pub(super) fn new(x: &[f32]) -> Option<Self> {
        if x.is_empty() || x.len() % QK != 0 || x.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let blocks = x.len() / QK;
        let (mut q, mut d, mut offset) = (vec![0i8; x.len()], Vec::with_capacity(blocks), Vec::with_capacity(blocks));
        for (xb, qb) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let mut sum = 0i32;
            if amax > 0.0 {
                for (o, v) in qb.iter_mut().zip(xb) {
                    // `v / amax` is in [-1, 1]: no overflow, whatever
                    // `amax`'s magnitude (a subnormal included).
                    let r = (v / amax * 127.0).round().clamp(-127.0, 127.0) as i8;
                    *o = r;
                    sum += i32::from(r);
                }
            }
            let db = amax / 127.0;
            d.push(db);
            offset.push(8.0 * db * sum as f32);
        }
        Some(Self { q, d, offset })
    }
}

/// `y (=|+=) x deq(W)^T` for one token through the integer path, or
/// `Ok(false)` (nothing written) when it does not apply: `W` is not Q8_0
/// or Q4_0, or `x` is not quantizable ([`Int8Input::new`]).
pub(super) fn gemv1(w: &StoredWeight<'_>, x: &[f32], y: &mut [f32], accum: Accum) -> Result<bool> {
    if !matches!(w.format(), Format::Q8_0 | Format::Q4_0) {
        return Ok(false);
    }
    let Some(xq) = Int8Input::new(x) else { return Ok(false) };
    let table = super::f16_table();
    let n = w.out_features().min(y.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        // SAFETY: AVX2, FMA and F16C were detected just above.
        unsafe { rows_avx2(w, &xq, table, &mut y[..n], accum)? };
        return Ok(true);
    }
    for (j, v) in y[..n].iter_mut().enumerate() {
        let d = dot(w.row(j).ok_or(Error::Overflow)?, &xq, table);
        *v = match accum {
            Accum::Replace => d,
            Accum::Add => *v + d,
        };
    }
    Ok(true)
}

/// [`gemv1`]'s loop over the rows of `W`, compiled with AVX2 so that
/// [`dot_avx2`] is inlined into it.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2(w: &StoredWeight<'_>, xq: &Int8Input, table: &[f32], y: &mut [f32], accum: Accum) -> Result<()> {
    for (j, v) in y.iter_mut().enumerate() {
        let row = w.row(j).ok_or(Error::Overflow)?;
        // SAFETY: this function's own precondition.
        let d = unsafe { dot_avx2(row, xq, table) };
        *v = match accum {
            Accum::Replace => d,
            Accum::Add => *v + d,
        };
    }
    Ok(())
}

/// One row's dot product with the quantized input, in portable integer
/// code (the same sums as [`dot_avx2`], added in another order).
fn dot(row: RowRef<'_>, xq: &Int8Input, table: &[f32]) -> f32 {
    let scale = |blk: &[u8]| table[usize::from(u16::from_le_bytes([blk[0], blk[1]]))];
    let mut total = 0.0f32;
    match row {
        RowRef::Q8_0(bytes) => {
            for ((blk, xb), db) in bytes.chunks_exact(Q8_0_BYTES).zip(xq.q.chunks_exact(QK)).zip(&xq.d) {
                let s: i32 = blk[2..].iter().zip(xb).map(|(w, x)| i32::from(*w as i8) * i32::from(*x)).sum();
                total += scale(blk) * db * s as f32;
            }
        }
        RowRef::Q4_0(bytes) => {
            for (((blk, xb), db), off) in
                bytes.chunks_exact(Q4_0_BYTES).zip(xq.q.chunks_exact(QK)).zip(&xq.d).zip(&xq.offset)
            {
                let (lo, hi) = xb.split_at(QK / 2);
                let s: i32 = blk[2..]
                    .iter()
                    .zip(lo.iter().zip(hi))
                    .map(|(b, (xl, xh))| i32::from(b & 0x0F) * i32::from(*xl) + i32::from(b >> 4) * i32::from(*xh))
                    .sum();
                let dw = scale(blk);
                total += dw * db * s as f32 - dw * off;
            }
        }
        _ => {}
    }
    total
}

/// [`dot`] in AVX2: per block, `vpmaddubsw` multiplies unsigned bytes by
/// signed ones into pairs of i16 sums and `vpmaddwd` adds the pairs into
/// eight i32 lanes (exact: at most 2 x 128 x 127 per i16). Q8_0's signed
/// weights go through the sign trick (`|w|` times `x` with `w`'s sign);
/// Q4_0's nibbles (0 to 15) are unsigned already, their offset of 8
/// subtracted per block through [`Int8Input`]'s `offset`. Two vector
/// accumulators.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C. Loads stay inside the row's
/// bytes and the input (the block count is the smaller of the two) and the
/// table (indexed by a `u16`; it has 65536 entries).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn dot_avx2(row: RowRef<'_>, xq: &Int8Input, table: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nb = xq.d.len();
    // SAFETY (all intrinsics and loads): the CPU features are this
    // function's precondition; block `bi < nb` lies inside the row's bytes
    // (checked against `nb` below) and its 32 inputs inside `xq.q`.
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let (xp, t) = (xq.q.as_ptr(), table.as_ptr());
        let scale = |blk: *const u8| *t.add(usize::from(u16::from_le(blk.cast::<u16>().read_unaligned())));
        let mut acc = [_mm256_setzero_ps(); 2];
        let mut off = 0.0f32;
        match row {
            RowRef::Q8_0(bytes) => {
                let nb = nb.min(bytes.len() / Q8_0_BYTES);
                for bi in 0..nb {
                    let blk = bytes.as_ptr().add(bi * Q8_0_BYTES);
                    let w = _mm256_loadu_si256(blk.add(2).cast::<__m256i>());
                    let x = _mm256_loadu_si256(xp.add(bi * QK).cast::<__m256i>());
                    let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
                    let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
                    let d = _mm256_set1_ps(scale(blk) * *xq.d.get_unchecked(bi));
                    acc[bi & 1] = _mm256_fmadd_ps(d, s, acc[bi & 1]);
                }
            }
            RowRef::Q4_0(bytes) => {
                let nb = nb.min(bytes.len() / Q4_0_BYTES);
                let mask = _mm_set1_epi8(0x0F);
                for bi in 0..nb {
                    let blk = bytes.as_ptr().add(bi * Q4_0_BYTES);
                    let raw = _mm_loadu_si128(blk.add(2).cast::<__m128i>());
                    // Byte k holds value k (low nibble) and k + 16 (high).
                    let lo = _mm_and_si128(raw, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), mask);
                    let w = _mm256_set_m128i(hi, lo);
                    let x = _mm256_loadu_si256(xp.add(bi * QK).cast::<__m256i>());
                    let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones));
                    let dw = scale(blk);
                    let d = _mm256_set1_ps(dw * *xq.d.get_unchecked(bi));
                    acc[bi & 1] = _mm256_fmadd_ps(d, s, acc[bi & 1]);
                    off = dw.mul_add(*xq.offset.get_unchecked(bi), off);
                }
            }
            _ => {}
        }
        let sum = _mm256_add_ps(acc[0], acc[1]);
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        lanes.iter().sum::<f32>() - off
    }
}

#[cfg(test)]
mod tests {
    use peft_core::storage::{Format, OwnedWeight, QK, dequantize};
    use peft_core::{Accum, MatMut, MatRef, Rng};

    use super::{Int8Input, dot, gemv1};
    use crate::Faer;

    /// The module's bound for row `j` (`deq` the dequantized matrix), in
    /// f64 from the input's own block maxima.
    fn bound(format: Format, deq: &[f32], scales: &[f32], x: &[f32], inn: usize, j: usize) -> f64 {
        let u = f64::from(f32::EPSILON) / 2.0;
        let mut b = 0.0;
        for (k, xk) in x.iter().enumerate() {
            let blk = &x[k / QK * QK..][..QK];
            let d = f64::from(blk.iter().fold(0f32, |m, v| m.max(v.abs()))) / 127.0;
            let w = f64::from(deq[j * inn + k].abs());
            let m = if format == Format::Q4_0 { w + 16.0 * f64::from(scales[j * inn / QK + k / QK]) } else { w };
            b += d * (0.5 + 2f64.powi(-10)) * w + (inn as f64 + 4.0) * u * m * (f64::from(xk.abs()) + d);
        }
        b
    }

    /// Both formats, one and two threads, AVX2 (when present) and the
    /// portable loop: within the stated bound of the f64 product over the
    /// dequantized weights, not equal to the exact path (the path ran),
    /// and the two threads' result equal to one thread's bit for bit (each
    /// row is one thread's). The expected values are the f64 sums here.
    #[test]
    fn within_the_stated_bound_of_the_exact_product() {
        let mut rng = Rng::new(11);
        let (out, inn) = (70, 4 * QK);
        let mut w = vec![0.0f32; out * inn];
        rng.fill_uniform(&mut w, -2.0, 2.0);
        let mut x = vec![0.0f32; inn];
        rng.fill_uniform(&mut x, -3.0, 3.0);
        x[..QK].iter_mut().for_each(|v| *v *= 1e-3);
        x[QK..2 * QK].fill(0.0);
        for format in [Format::Q8_0, Format::Q4_0] {
            let owned = OwnedWeight::quantize(format, &w, out, inn).unwrap();
            let sw = owned.weight().unwrap();
            let mut deq = vec![0.0f32; out * inn];
            dequantize(&sw, &mut deq).unwrap();
            let scales: Vec<f32> = (0..out)
                .flat_map(|j| {
                    let deq = &deq;
                    (0..inn / QK).map(move |b| {
                        let blk = &deq[j * inn + b * QK..][..QK];
                        // |dw| = max |w| / 8 (Q4_0's -8 is in every block
                        // the quantizer writes).
                        blk.iter().fold(0f32, |m, v| m.max(v.abs())) / 8.0
                    })
                })
                .collect();
            let xv = MatRef::new(&x, 1, inn).unwrap();
            let mut exact = vec![0.0f32; out];
            super::super::apply(&Faer::new(), &sw, xv, MatMut::new(&mut exact, 1, out).unwrap(), Accum::Replace)
                .unwrap();
            let mut ys = Vec::new();
            for threads in [1, 2] {
                let be = Faer::with_threads(threads).int8_activations(true);
                let mut y = vec![0.0f32; out];
                super::super::apply(&be, &sw, xv, MatMut::new(&mut y, 1, out).unwrap(), Accum::Replace).unwrap();
                ys.push(y);
            }
            let xq = Int8Input::new(&x).unwrap();
            let table = super::super::f16_table();
            let portable: Vec<f32> = (0..out).map(|j| dot(sw.row(j).unwrap(), &xq, table)).collect();
            assert!(ys[0].iter().zip(&ys[1]).all(|(a, b)| a.to_bits() == b.to_bits()), "{format:?}: threads differ");
            assert!(ys[0] != exact, "{format:?}: the integer path did not run");
            for (name, y) in [("avx2", &ys[0]), ("portable", &portable)] {
                for j in 0..out {
                    let want: f64 = (0..inn).map(|k| f64::from(deq[j * inn + k]) * f64::from(x[k])).sum();
                    let b = bound(format, &deq, &scales, &x, inn, j);
                    let err = (f64::from(y[j]) - want).abs();
                    assert!(err <= b, "{format:?} {name} row {j}: {} vs {want} (bound {b})", y[j]);
                }
            }
        }
    }

    /// An input with a NaN, or not whole blocks, is not taken (nothing
    /// written); Q4_1 is not taken either.
    #[test]
    fn declines_what_it_cannot_compute() {
        let w = vec![0.5f32; 2 * QK];
        let owned = OwnedWeight::quantize(Format::Q8_0, &w, 2, QK).unwrap();
        let mut x = vec![1.0f32; QK];
        x[3] = f32::NAN;
        let mut y = [7.0f32; 2];
        assert!(!gemv1(&owned.weight().unwrap(), &x, &mut y, Accum::Replace).unwrap());
        assert_eq!(y, [7.0; 2]);
        assert!(Int8Input::new(&[1.0; QK + 1]).is_none());
        assert!(Int8Input::new(&[f32::INFINITY; QK]).is_none());
        let zero = Int8Input::new(&[0.0; QK]).unwrap();
        assert!(zero.q.iter().all(|q| *q == 0) && zero.d == [0.0]);
    }
}
