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
//! Kernels, chosen at run time: AVX-512 VNNI (`vpdpbusd`, two blocks per
//! instruction; the reason the MSRV is Rust 1.89, whose stable
//! intrinsics it uses), AVX2 (`vpmaddubsw`, then `vpmaddwd` into eight
//! i32 lanes), and a portable integer loop. They add the same exact
//! block sums in different orders.

use peft_core::storage::{Format, Q4_0_BYTES, Q8_0_BYTES, QK, RowRef, StoredWeight};
use peft_core::{Accum, Error, Result};

/// One token's input, quantized per block of [`QK`] values (see the
/// module docs).
pub(super) struct Int8Input {
    /// `q_k`, whole blocks.
    q: Vec<i8>,
    /// `d_b` per block.
    d: Vec<f32>,
    /// Q4_0 only: `8 d_b sum_{k in b} q_k` per block, its offset of 8
    /// (the portable and AVX2 kernels).
    offset: Vec<f32>,
    /// What [`dot_avx512`] reads: for Q4_0, `q` with each pair of blocks
    /// `b, b + 1` laid out as the nibbles come out of two blocks (values
    /// 0..16 of `b`, of `b + 1`, then values 16..32 of `b`, of `b + 1`; an
    /// odd last block as it is); for Q8_0, `q` itself (left empty: the
    /// kernel reads `q`).
    pairs: Vec<i8>,
    /// Per four values of the AVX-512 layout: minus the format's offset (8
    /// for Q4_0, 128 for Q8_0, whose values enter `vpdpbusd` plus 128)
    /// times their sum, the start of each `vpdpbusd` lane.
    bias: Vec<i32>,
}

impl Int8Input {
    /// `x` quantized for a `format` matrix, or `None` when `format` is
    /// neither Q8_0 nor Q4_0, `x` holds a non-finite value or is not whole
    /// blocks (the caller then takes the exact path).
    fn new(x: &[f32], format: Format) -> Option<Self> {
        let q4 = match format {
            Format::Q4_0 => true,
            Format::Q8_0 => false,
            _ => return None,
        };
        if x.is_empty() || !x.len().is_multiple_of(QK) || x.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let blocks = x.len() / QK;
        let (mut q, mut d, mut offset) = (vec![0i8; x.len()], Vec::with_capacity(blocks), Vec::new());
        for (xb, qb) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let mut sum = 0i32;
            if amax > 0.0 {
                for (o, v) in qb.iter_mut().zip(xb) {
                    // `v / amax` is in [-1, 1]: no overflow, whatever
                    // `amax`'s magnitude (a subnormal included).
                    let r = round_half_away(v / amax * 127.0).clamp(-127, 127) as i8;
                    *o = r;
                    sum += i32::from(r);
                }
            }
            let db = amax / 127.0;
            d.push(db);
            if q4 {
                offset.push(8.0 * db * sum as f32);
            }
        }
        let mut pairs = Vec::new();
        if q4 {
            pairs.reserve(q.len());
            let mut two = q.chunks_exact(2 * QK);
            for p in &mut two {
                let h = QK / 2;
                for part in [&p[..h], &p[QK..QK + h], &p[h..QK], &p[QK + h..]] {
                    pairs.extend_from_slice(part);
                }
            }
            pairs.extend_from_slice(two.remainder());
        }
        let (layout, off) = if q4 { (&pairs, -8) } else { (&q, -128) };
        let bias = layout.chunks_exact(4).map(|v| off * v.iter().map(|q| i32::from(*q)).sum::<i32>()).collect();
        Some(Self { q, d, offset, pairs, bias })
    }
}

/// One token's input quantized for `w` when `faer` opts in to the integer
/// path and it applies (one row of input, a Q8_0 or Q4_0 `w`, see
/// [`Int8Input::new`]): done once per product, before the product is
/// split over threads.
pub(super) fn prepare(faer: &crate::Faer, w: &StoredWeight<'_>, x: peft_core::MatRef<'_, f32>) -> Option<Int8Input> {
    if x.rows() != 1 || !faer.uses_int8_activations() {
        return None;
    }
    Int8Input::new(x.row(0), w.format())
}

/// `y (=|+=) x deq(W)^T` for one token through the integer path, `xq`
/// the token from [`prepare`] for this `W` (or its rows).
pub(super) fn gemv1(w: &StoredWeight<'_>, xq: &Int8Input, y: &mut [f32], accum: Accum) -> Result<()> {
    let table = super::f16_table();
    let n = w.out_features().min(y.len());
    let y = &mut y[..n];
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the AVX-512 features `dot_avx512` needs were detected.
        return unsafe { rows_avx512(w, xq, table, y, accum) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        // SAFETY: AVX2, FMA and F16C were detected just above.
        return unsafe { rows_avx2(w, xq, table, y, accum) };
    }
    each_row(w, y, accum, |row| dot(row, xq, table, 0))
}

/// `y[j] (=|+=) dot(row j of W)` for every `j < y.len()`. Inlined into
/// each caller, so that a kernel compiled with target features inlines
/// into a loop compiled with them.
#[inline(always)]
fn each_row(w: &StoredWeight<'_>, y: &mut [f32], accum: Accum, mut dot: impl FnMut(RowRef<'_>) -> f32) -> Result<()> {
    for (j, v) in y.iter_mut().enumerate() {
        let d = dot(w.row(j).ok_or(Error::Overflow)?);
        *v = match accum {
            Accum::Replace => d,
            Accum::Add => *v + d,
        };
    }
    Ok(())
}

/// [`gemv1`]'s loop over the rows of `W`, compiled with AVX2 so that
/// [`dot_avx2`] is inlined into it.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2(w: &StoredWeight<'_>, xq: &Int8Input, table: &[f32], y: &mut [f32], accum: Accum) -> Result<()> {
    // SAFETY: this function's own precondition.
    each_row(w, y, accum, |row| unsafe { dot_avx2(row, xq, table) })
}

/// Whether the CPU has what [`dot_avx512`] needs (AVX-512 F, BW, DQ and
/// VNNI, with AVX2, FMA and F16C).
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vnni")
        && std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// [`gemv1`]'s loop with [`dot_avx512`].
///
/// # Safety
/// The CPU must have the features [`avx512`] checks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c")]
unsafe fn rows_avx512(w: &StoredWeight<'_>, xq: &Int8Input, table: &[f32], y: &mut [f32], accum: Accum) -> Result<()> {
    // SAFETY: this function's own precondition.
    each_row(w, y, accum, |row| unsafe { dot_avx512(row, xq, table) })
}

/// [`dot`] over two blocks per step in AVX-512: `vpdpbusd` multiplies 64
/// unsigned bytes of `W` by 64 signed bytes of the input and adds each
/// four products into one of 16 i32 lanes (exact). Both formats enter
/// unsigned: Q4_0's nibbles as they are, Q8_0's values plus 128 (a
/// flipped sign bit); each lane starts from minus its offset (`8` or
/// `128` times the sum of its four inputs, [`Int8Input`]'s `bias`), so
/// the i32 sums are the signed ones, exact, and no scalar
/// chain remains. Two accumulators. Q4_0's two blocks come out as `[low nibbles
/// of b, of b + 1, high of b, of b + 1]`, which [`Int8Input`]'s
/// `pairs` matches. An odd last block is summed by [`dot`].
///
/// # Safety
/// The CPU must have the features [`avx512`] checks. Loads stay inside
/// the row's bytes and the input (the block count is the smaller of the
/// two) and the table (indexed by a `u16`; 65536 entries).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c")]
#[inline]
unsafe fn dot_avx512(row: RowRef<'_>, xq: &Int8Input, table: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY (all intrinsics and loads): the CPU features are this
    // function's precondition; blocks `bi, bi + 1 < nb` lie inside the
    // row's bytes (`nb` is bounded by them below) and their 64 inputs
    // inside `xq.q` (Q8_0) or `xq.pairs` (Q4_0), both `nb QK` long, their
    // biases inside `xq.bias` (`nb QK / 4` long) and their scales inside
    // `xq.d`.
    unsafe {
        let (d, bytes, block, x, bias, lanes) = match row {
            RowRef::Q8_0(b) => (xq.d.as_ptr(), b, Q8_0_BYTES, xq.q.as_ptr(), xq.bias.as_ptr(), Q8_LANES),
            RowRef::Q4_0(b) => (xq.d.as_ptr(), b, Q4_0_BYTES, xq.pairs.as_ptr(), xq.bias.as_ptr(), Q4_LANES),
            _ => return 0.0,
        };
        let q8 = block == Q8_0_BYTES;
        let nb = xq.d.len().min(bytes.len() / block);
        let (flip, mask) = (_mm512_set1_epi8(i8::MIN), _mm256_set1_epi8(0x0F));
        let lanes = _mm512_loadu_si512(lanes.as_ptr().cast::<__m512i>());
        // `scale_b d_b` of blocks `bi, bi + 1` spread over the lanes that
        // hold each (F16C converts both scales at once, no table).
        let scales = |b0: *const u8, b1: *const u8, bi: usize| {
            let h = u32::from(b0.cast::<u16>().read_unaligned()) | (u32::from(b1.cast::<u16>().read_unaligned()) << 16);
            let s = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes(h.to_le_bytes())));
            let dd = _mm_castsi128_ps(_mm_loadl_epi64(d.add(bi).cast::<__m128i>()));
            _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(_mm_mul_ps(s, dd)))
        };
        // Blocks `bi, bi + 1`: their scaled sums, 16 lanes.
        let pair = |bi: usize| {
            let (b0, b1) = (bytes.as_ptr().add(bi * block), bytes.as_ptr().add((bi + 1) * block));
            let w = if q8 {
                let lo = _mm512_castsi256_si512(_mm256_loadu_si256(b0.add(2).cast::<__m256i>()));
                _mm512_xor_si512(_mm512_inserti64x4::<1>(lo, _mm256_loadu_si256(b1.add(2).cast::<__m256i>())), flip)
            } else {
                let raw = _mm256_set_m128i(
                    _mm_loadu_si128(b1.add(2).cast::<__m128i>()),
                    _mm_loadu_si128(b0.add(2).cast::<__m128i>()),
                );
                let lo = _mm256_and_si256(raw, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), mask);
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
            };
            let xv = _mm512_loadu_si512(x.add(bi * QK).cast::<__m512i>());
            let start = _mm512_loadu_si512(bias.add(bi * QK / 4).cast::<__m512i>());
            (scales(b0, b1, bi), _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, w, xv)))
        };
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut bi = 0;
        while bi + 4 <= nb {
            let (s0, v0) = pair(bi);
            let (s1, v1) = pair(bi + 2);
            acc0 = _mm512_fmadd_ps(s0, v0, acc0);
            acc1 = _mm512_fmadd_ps(s1, v1, acc1);
            bi += 4;
        }
        if bi + 2 <= nb {
            let (s0, v0) = pair(bi);
            acc0 = _mm512_fmadd_ps(s0, v0, acc0);
            bi += 2;
        }
        let total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        // An odd last block: the portable sum of that block alone.
        if bi < nb { total + dot(row, xq, table, bi) } else { total }
    }
}

/// [`dot_avx512`]'s lane-to-block maps (index 0: block `bi`, 1: `bi + 1`):
/// Q8_0's blocks are the low and high halves of the 64 bytes; Q4_0's
/// alternate by 16 bytes (`pairs`' order).
#[cfg(target_arch = "x86_64")]
const Q8_LANES: [i32; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1];
#[cfg(target_arch = "x86_64")]
const Q4_LANES: [i32; 16] = [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1];

/// One row's dot product with the quantized input from block `first` on,
/// in portable integer code (the same sums as [`dot_avx2`], added in
/// another order).
fn dot(row: RowRef<'_>, xq: &Int8Input, table: &[f32], first: usize) -> f32 {
    let scale = |blk: &[u8]| table[usize::from(u16::from_le_bytes([blk[0], blk[1]]))];
    let mut total = 0.0f32;
    match row {
        RowRef::Q8_0(bytes) => {
            for ((blk, xb), db) in bytes.chunks_exact(Q8_0_BYTES).zip(xq.q.chunks_exact(QK)).zip(&xq.d).skip(first) {
                let s: i32 = blk[2..].iter().zip(xb).map(|(w, x)| i32::from(*w as i8) * i32::from(*x)).sum();
                total += scale(blk) * db * s as f32;
            }
        }
        RowRef::Q4_0(bytes) => {
            for (((blk, xb), db), off) in
                bytes.chunks_exact(Q4_0_BYTES).zip(xq.q.chunks_exact(QK)).zip(&xq.d).zip(&xq.offset).skip(first)
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

/// `y` rounded to the nearest integer, halves away from zero: what
/// `f32::round` gives, without its libm call, so that the quantizing loop
/// compiles to vector code (`roundf` was about 5% of a Q8_0 decode step).
/// `y - trunc(y)` is exact for `|y| < 2^23` (here `|y| <= 127`).
#[inline(always)]
fn round_half_away(y: f32) -> i32 {
    let i = y as i32;
    let frac = y - i as f32;
    i + i32::from(frac >= 0.5) - i32::from(frac <= -0.5)
}

#[cfg(test)]
mod tests {
    use peft_core::storage::{Format, OwnedWeight, QK, dequantize};
    use peft_core::{Accum, MatMut, MatRef, Rng};

    use super::{Int8Input, dot, prepare, round_half_away};

    /// `f32::round`'s result on every halfway case of `[-127, 127]`, the
    /// values one ulp either side of them (`0.5 - 2^-25` rounds to 0,
    /// where `floor(y + 0.5)` gives 1), and a sweep of the range.
    #[test]
    fn rounds_as_f32_round_does() {
        let mut ys = vec![0.0f32, -0.0, 0.5f32.next_down(), -0.5f32.next_down(), 127.0, -127.0];
        for k in -127..127 {
            let half = k as f32 + 0.5;
            ys.extend([half, half.next_up(), half.next_down()]);
        }
        ys.extend((0..=254_000).map(|i| -127.0 + i as f32 * 0.001));
        for y in ys {
            assert_eq!(round_half_away(y), y.round() as i32, "{y}");
        }
    }
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

    /// Both formats, one and two threads, each kernel the CPU can run
    /// (AVX-512 VNNI, AVX2, the portable loop): within the stated bound of the f64 product over the
    /// dequantized weights, not equal to the exact path (the path ran),
    /// and the two threads' result equal to one thread's bit for bit (each
    /// row is one thread's). The expected values are the f64 sums here.
    #[test]
    fn within_the_stated_bound_of_the_exact_product() {
        let mut rng = Rng::new(11);
        // Five blocks: the AVX-512 kernel's pairs and its odd last block.
        let (out, inn) = (70, 5 * QK);
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
            let xq = Int8Input::new(&x, format).unwrap();
            let table = super::super::f16_table();
            let portable: Vec<f32> = (0..out).map(|j| dot(sw.row(j).unwrap(), &xq, table, 0)).collect();
            let mut kernels = vec![("portable", portable)];
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                // SAFETY: the features were detected just above.
                let avx2 = (0..out).map(|j| unsafe { super::dot_avx2(sw.row(j).unwrap(), &xq, table) }).collect();
                kernels.push(("avx2", avx2));
            }
            #[cfg(target_arch = "x86_64")]
            if super::avx512() {
                // SAFETY: `avx512` checked every feature the kernel needs.
                let wide = (0..out).map(|j| unsafe { super::dot_avx512(sw.row(j).unwrap(), &xq, table) }).collect();
                kernels.push(("avx512", wide));
            }
            assert!(ys[0].iter().zip(&ys[1]).all(|(a, b)| a.to_bits() == b.to_bits()), "{format:?}: threads differ");
            assert!(ys[0] != exact, "{format:?}: the integer path did not run");
            kernels.push(("dispatched", ys[0].clone()));
            for (name, y) in &kernels {
                for j in 0..out {
                    let want: f64 = (0..inn).map(|k| f64::from(deq[j * inn + k]) * f64::from(x[k])).sum();
                    let b = bound(format, &deq, &scales, &x, inn, j);
                    let err = (f64::from(y[j]) - want).abs();
                    assert!(err <= b, "{format:?} {name} row {j}: {} vs {want} (bound {b})", y[j]);
                }
            }
        }
    }

    /// An input with a NaN or an infinity, or not whole blocks, is not
    /// quantized, nor is any format but Q8_0 and Q4_0, nor anything with
    /// the path off: such a product takes the exact path (its result bit
    /// for bit).
    #[test]
    fn declines_what_it_cannot_compute() {
        let w = vec![0.5f32; 2 * QK];
        let owned = OwnedWeight::quantize(Format::Q8_0, &w, 2, QK).unwrap();
        let sw = owned.weight().unwrap();
        let mut x = vec![1.0f32; QK];
        x[3] = f32::NAN;
        let (on, off) = (Faer::new().int8_activations(true), Faer::new());
        let xv = MatRef::new(&x, 1, QK).unwrap();
        assert!(prepare(&on, &sw, xv).is_none());
        let (mut a, mut b) = ([7.0f32; 2], [7.0f32; 2]);
        super::super::apply(&on, &sw, xv, MatMut::new(&mut a, 1, 2).unwrap(), Accum::Replace).unwrap();
        super::super::apply(&off, &sw, xv, MatMut::new(&mut b, 1, 2).unwrap(), Accum::Replace).unwrap();
        assert_eq!(a.map(f32::to_bits), b.map(f32::to_bits));
        assert!(prepare(&off, &sw, MatRef::new(&[1.0; QK], 1, QK).unwrap()).is_none());
        assert!(Int8Input::new(&[1.0; QK + 1], Format::Q8_0).is_none());
        assert!(Int8Input::new(&[f32::INFINITY; QK], Format::Q8_0).is_none());
        assert!(Int8Input::new(&[1.0; QK], Format::Q4_1).is_none());
        let zero = Int8Input::new(&[0.0; QK], Format::Q4_0).unwrap();
        assert!(zero.q.iter().all(|q| *q == 0) && zero.d == [0.0]);
    }
}
