//! [`Faer`](crate::Faer)'s kernels for GGUF's other block formats (Q4_1 to
//! Q6_K, [`RowRef::Blocks`]): each block decoded to f32 on the stack,
//! then dotted with every token. Q4_1, Q4_K and Q6_K (the formats
//! llama.cpp's users hold most) decode with AVX2 when the CPU has it,
//! into exactly the values of `peft-core`'s decoder, which are ggml's:
//! the same f32 multiply, then add or subtract, never fused (the test
//! below checks every bit). The dot products use FMA, like the other
//! stored formats' kernels.

use peft_core::storage::ggml::{decode_block, scale_min_k4};
use peft_core::storage::{Format, QK_K, RowRef};

/// Whether the CPU has AVX2, FMA and F16C (detected once per call site).
#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// One block of `format` decoded into `out` (its values): AVX2 for Q4_1,
/// Q4_K and Q6_K when `simd`, `peft-core`'s decoder otherwise.
fn decode(simd: bool, format: Format, block: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd && matches!(format, Format::Q4_1 | Format::Q4_K | Format::Q6_K) {
        // SAFETY: `simd` is true only when `avx2()` said so.
        unsafe { decode_avx2(format, block, out) };
        return;
    }
    let _ = simd;
    decode_block(format, block, out);
}

/// `out.len()` values of a row of blocks from value `start` on (both
/// whole blocks), decoded block by block.
pub(super) fn decode_range(row: RowRef<'_>, start: usize, out: &mut [f32]) {
    let RowRef::Blocks(format, bytes) = row else {
        row.decode_range(start, out);
        return;
    };
    #[cfg(target_arch = "x86_64")]
    let simd = avx2();
    #[cfg(not(target_arch = "x86_64"))]
    let simd = false;
    let (elems, size) = format.block();
    if !start.is_multiple_of(elems) || !out.len().is_multiple_of(elems) {
        return;
    }
    let blocks = bytes.chunks_exact(size).skip(start / elems);
    for (o, b) in out.chunks_exact_mut(elems).zip(blocks) {
        decode(simd, format, b, o);
    }
}

/// `dots[i] = row . xs[i]` for a row of `format` blocks (at most four
/// tokens): each block decoded once into a stack array, then multiplied
/// into eight-lane accumulators per token.
pub(super) fn dot_rows(format: Format, bytes: &[u8], xs: &[&[f32]], dots: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2, FMA and F16C (just detected).
        unsafe { dot_rows_avx2(format, bytes, xs, dots) };
        return;
    }
    dot_rows_with::<false>(format, bytes, xs, dots);
}

/// [`dot_rows_with`] compiled for AVX2 and FMA.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_avx2(format: Format, bytes: &[u8], xs: &[&[f32]], dots: &mut [f32]) {
    if let ([x], [d]) = (xs, &mut *dots) {
        // SAFETY: this function's precondition.
        *d = unsafe { dot1_avx2(format, bytes, x) };
        return;
    }
    dot_rows_with::<true>(format, bytes, xs, dots);
}

#[inline(always)]
fn dot_rows_with<const SIMD: bool>(format: Format, bytes: &[u8], xs: &[&[f32]], dots: &mut [f32]) {
    let (elems, size) = format.block();
    let mut w = [0.0f32; QK_K];
    let mut acc = [[0.0f32; 8]; super::GEMV_TOKENS];
    let Some(w) = w.get_mut(..elems) else { return };
    for (bi, block) in bytes.chunks_exact(size).enumerate() {
        decode(SIMD, format, block, w);
        for (a, x) in acc.iter_mut().zip(xs) {
            let Some(x) = x.get(bi * elems..(bi + 1) * elems) else { continue };
            for (w8, x8) in w.chunks_exact(8).zip(x.chunks_exact(8)) {
                for ((l, wv), xv) in a.iter_mut().zip(w8).zip(x8) {
                    *l += wv * xv;
                }
            }
        }
    }
    for (d, a) in dots.iter_mut().zip(acc) {
        *d = a.iter().sum();
    }
}

/// One row dotted with one token: each block decoded with AVX2 into a
/// stack array (in L1), then four independent FMA chains.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot1_avx2(format: Format, bytes: &[u8], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (elems, size) = format.block();
    let mut w = [0.0f32; QK_K];
    let nb = (bytes.len() / size.max(1)).min(x.len() / elems.max(1));
    let w = &mut w[..elems];
    let mut acc = [_mm256_setzero_ps(); 4];
    for (bi, block) in bytes.chunks_exact(size).take(nb).enumerate() {
        // The CPU has the features (this function's precondition).
        decode(true, format, block, w);
        let xb = &x[bi * elems..(bi + 1) * elems];
        // SAFETY: `w` and `xb` hold `elems` values, a multiple of 32.
        unsafe {
            for k in (0..elems).step_by(32) {
                for (j, a) in acc.iter_mut().enumerate() {
                    let o = k + 8 * j;
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(w.as_ptr().add(o)), _mm256_loadu_ps(xb.as_ptr().add(o)), *a);
                }
            }
        }
    }
    // SAFETY: register and stack-array intrinsics; AVX2 is present.
    unsafe {
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        lanes.iter().sum()
    }
}

/// `y (=|+=) deq(W) x` for one token over Q4_1, Q4_K or Q6_K rows, fused: the
/// nibbles are widened in registers and multiplied into `x` without
/// storing the decoded values, each 32-value group's scale applied once,
/// its offset once through `sum(x)` of the group (computed once per
/// product): `sum_i (d q_i + m) x_i = d sum_i q_i x_i + m sum_i x_i`
/// (Q4_K: `d sc` and `- dmin m`; Q6_K: `d sc` per 16 values, no offset).
/// The same sum in another order than
/// [`decode_block`]'s values dotted with `x`: within the rounding bound
/// `peft-verify` checks, not bit for bit. Returns `false` (nothing
/// written) for other formats or a CPU without AVX2, FMA and F16C.
pub(super) fn gemv1(
    w: &peft_core::storage::StoredWeight<'_>,
    x: &[f32],
    y: &mut [f32],
    accum: peft_core::Accum,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if matches!(w.format(), Format::Q4_1 | Format::Q4_K | Format::Q6_K) && avx2() && x.len() == w.in_features() {
        let sums: Vec<f32> = x.chunks_exact(32).map(|c| c.iter().sum()).collect();
        for (j, v) in y.iter_mut().enumerate().take(w.out_features()) {
            let Some(RowRef::Blocks(format, bytes)) = w.row(j) else { return false };
            // SAFETY: AVX2, FMA and F16C detected above; `x` holds the
            // row's values and `sums` one per 32 of them.
            let d = unsafe {
                match format {
                    Format::Q4_1 => gemv1_q4_1(bytes, x, &sums),
                    Format::Q4_K => gemv1_q4_k(bytes, x, &sums),
                    _ => gemv1_q6_k(bytes, x),
                }
            };
            *v = match accum {
                peft_core::Accum::Replace => d,
                peft_core::Accum::Add => *v + d,
            };
        }
        return true;
    }
    let _ = (w, x, y, accum);
    false
}

/// Sixteen bytes of nibbles (`q`) dotted with 32 values of `x` (`xp`: the
/// low nibbles with `xp[0..16]`, the high with `xp[16..32]`), into two
/// 8-lane partial sums.
///
/// # Safety
/// AVX2 and FMA; `xp` points at 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn nibbles_dot(q: std::arch::x86_64::__m128i, xp: *const f32) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let mask = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(q, mask);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
    let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    // SAFETY: `xp` holds 32 values (the caller's precondition).
    unsafe {
        let a = _mm256_mul_ps(f(lo), _mm256_loadu_ps(xp));
        let b = _mm256_mul_ps(f(_mm_srli_si128::<8>(lo)), _mm256_loadu_ps(xp.add(8)));
        let a = _mm256_fmadd_ps(f(hi), _mm256_loadu_ps(xp.add(16)), a);
        let b = _mm256_fmadd_ps(f(_mm_srli_si128::<8>(hi)), _mm256_loadu_ps(xp.add(24)), b);
        _mm256_add_ps(a, b)
    }
}

/// Sum of the eight lanes of `v`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let mut lanes = [0.0f32; 8];
    // SAFETY: a store to a stack array of 8.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    lanes.iter().sum()
}

/// One Q4_1 row dotted with `x` (see [`gemv1`]).
///
/// # Safety
/// AVX2, FMA and F16C; `x` holds the row's values, `sums` one per 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv1_q4_1(bytes: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nb = (bytes.len() / 20).min(x.len() / 32).min(sums.len());
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut offset = 0.0f32;
    // SAFETY: block `bi` is bytes `20 bi..20 bi + 20` and values `32 bi..32 bi + 32` (`nb` bounds both).
    unsafe {
        let p = bytes.as_ptr();
        for (bi, sum) in sums.iter().enumerate().take(nb) {
            let blk = p.add(20 * bi);
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(blk.cast::<i32>().read_unaligned()));
            let t = nibbles_dot(_mm_loadu_si128(blk.add(4).cast::<__m128i>()), x.as_ptr().add(32 * bi));
            let d = _mm256_broadcastss_ps(dm);
            if bi % 2 == 0 {
                acc0 = _mm256_fmadd_ps(d, t, acc0)
            } else {
                acc1 = _mm256_fmadd_ps(d, t, acc1)
            }
            offset += _mm_cvtss_f32(_mm_movehdup_ps(dm)) * sum;
        }
        hsum(_mm256_add_ps(acc0, acc1)) + offset
    }
}

/// One Q4_K row dotted with `x` (see [`gemv1`]).
///
/// # Safety
/// AVX2, FMA and F16C; `x` holds the row's values, `sums` one per 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv1_q4_k(bytes: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nb = (bytes.len() / 144).min(x.len() / 256).min(sums.len() / 8);
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut offset = 0.0f32;
    for (bi, blk) in bytes.chunks_exact(144).take(nb).enumerate() {
        let (d, min) = (half(blk, 0), half(blk, 2));
        let s = &blk[4..16];
        // SAFETY: `blk` has 144 bytes; values `256 bi..256 bi + 256` of `x` exist (`nb`).
        unsafe {
            let xb = x.as_ptr().add(256 * bi);
            for c in 0..4 {
                // Chunk c: 32 bytes, low nibbles = sub-block 2c, high = 2c + 1.
                let (k0, k1) = (2 * c, 2 * c + 1);
                let ((sc0, m0), (sc1, m1)) = (scale_min_k4(s, k0), scale_min_k4(s, k1));
                let q = _mm256_loadu_si256(blk.as_ptr().add(16 + 32 * c).cast::<__m256i>());
                let mask = _mm256_set1_epi8(0x0F);
                let lo = _mm256_and_si256(q, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), mask);
                let dot32 = |v: __m256i, xp: *const f32| {
                    let f = |w: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(w));
                    let (l, h) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
                    let a = _mm256_mul_ps(f(l), _mm256_loadu_ps(xp));
                    let b = _mm256_mul_ps(f(_mm_srli_si128::<8>(l)), _mm256_loadu_ps(xp.add(8)));
                    let a = _mm256_fmadd_ps(f(h), _mm256_loadu_ps(xp.add(16)), a);
                    let b = _mm256_fmadd_ps(f(_mm_srli_si128::<8>(h)), _mm256_loadu_ps(xp.add(24)), b);
                    _mm256_add_ps(a, b)
                };
                let t0 = dot32(lo, xb.add(64 * c));
                let t1 = dot32(hi, xb.add(64 * c + 32));
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d * f32::from(sc0)), t0, acc0);
                acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d * f32::from(sc1)), t1, acc1);
                offset += min * f32::from(m0) * sums[8 * bi + k0] + min * f32::from(m1) * sums[8 * bi + k1];
            }
        }
    }
    // SAFETY: AVX2 is present (this function's precondition).
    unsafe { hsum(_mm256_add_ps(acc0, acc1)) - offset }
}

/// One Q6_K row dotted with `x` (see [`gemv1`]): per 16 values,
/// `(d sc) sum_i q_i x_i` with `q_i` in `-32..32`.
///
/// # Safety
/// AVX2, FMA and F16C; `x` holds the row's values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv1_q6_k(bytes: &[u8], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let nb = (bytes.len() / 210).min(x.len() / 256);
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let f = |w: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w));
    for (bi, blk) in bytes.chunks_exact(210).take(nb).enumerate() {
        let d = half(blk, 208);
        // SAFETY: `blk` has 210 bytes; values `256 bi..256 bi + 256` of `x` exist (`nb`).
        unsafe {
            let p = blk.as_ptr();
            for n in 0..2 {
                for (r, v) in q6_k_runs(p, n).into_iter().enumerate() {
                    let xp = x.as_ptr().add(256 * bi + 128 * n + 32 * r);
                    let (l, h) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
                    let t0 = _mm256_fmadd_ps(
                        f(l),
                        _mm256_loadu_ps(xp),
                        _mm256_mul_ps(f(_mm_srli_si128::<8>(l)), _mm256_loadu_ps(xp.add(8))),
                    );
                    let t1 = _mm256_fmadd_ps(
                        f(h),
                        _mm256_loadu_ps(xp.add(16)),
                        _mm256_mul_ps(f(_mm_srli_si128::<8>(h)), _mm256_loadu_ps(xp.add(24))),
                    );
                    let sc = |k: usize| d * f32::from(blk[192 + 8 * n + k] as i8);
                    acc0 = _mm256_fmadd_ps(_mm256_set1_ps(sc(2 * r)), t0, acc0);
                    acc1 = _mm256_fmadd_ps(_mm256_set1_ps(sc(2 * r + 1)), t1, acc1);
                }
            }
        }
    }
    // SAFETY: AVX2 is present (this function's precondition).
    unsafe { hsum(_mm256_add_ps(acc0, acc1)) }
}

/// Half `n` (values `128 n..128 n + 128`) of the Q6_K block at `p`: four
/// runs of 32 signed 6-bit values (`q - 32`, as i8), run `r` holding
/// values `128 n + 32 r..`: the low nibbles of `ql` (runs 0 and 1 from
/// bytes `64 n..` and `64 n + 32..`, runs 2 and 3 their high nibbles)
/// joined with two bits of `qh` (bits `2 r`).
///
/// # Safety
/// AVX2; `p` points at a whole 210-byte block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn q6_k_runs(p: *const u8, n: usize) -> [std::arch::x86_64::__m256i; 4] {
    use std::arch::x86_64::*;
    let (low, three, bias) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30), _mm256_set1_epi8(32));
    // SAFETY: bytes `64 n..64 n + 64` and `128 + 32 n..+32` lie in the block (n < 2).
    let (ql0, ql1, qh) = unsafe {
        (
            _mm256_loadu_si256(p.add(64 * n).cast::<__m256i>()),
            _mm256_loadu_si256(p.add(64 * n + 32).cast::<__m256i>()),
            _mm256_loadu_si256(p.add(128 + 32 * n).cast::<__m256i>()),
        )
    };
    // The two high bits of each run, moved to bits 4-5.
    let h = [
        _mm256_and_si256(_mm256_slli_epi16::<4>(qh), three),
        _mm256_and_si256(_mm256_slli_epi16::<2>(qh), three),
        _mm256_and_si256(qh, three),
        _mm256_and_si256(_mm256_srli_epi16::<2>(qh), three),
    ];
    let l = [ql0, ql1, _mm256_srli_epi16::<4>(ql0), _mm256_srli_epi16::<4>(ql1)];
    core::array::from_fn(|r| _mm256_sub_epi8(_mm256_or_si256(_mm256_and_si256(l[r], low), h[r]), bias))
}

/// What follows the product `q d` in a format's formula.
#[derive(Clone, Copy)]
enum Then {
    /// Nothing (Q6_K): adding 0 would turn a `-0.0` into `+0.0`.
    Keep,
    /// `+ m` (Q4_1).
    Add,
    /// `- m` (Q4_K).
    Sub,
}

/// Eight u8 or i8 values (the low 8 bytes of `v`) as f32, times `d`, then
/// [`Then`] with `m`, stored at `out`.
///
/// # Safety
/// AVX2; `out` has 8 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn store8(v: std::arch::x86_64::__m128i, signed: bool, d: f32, m: f32, then: Then, out: *mut f32) {
    use std::arch::x86_64::*;
    let i = if signed { _mm256_cvtepi8_epi32(v) } else { _mm256_cvtepu8_epi32(v) };
    let p = _mm256_mul_ps(_mm256_cvtepi32_ps(i), _mm256_set1_ps(d));
    let y = match then {
        Then::Keep => p,
        Then::Add => _mm256_add_ps(p, _mm256_set1_ps(m)),
        Then::Sub => _mm256_sub_ps(p, _mm256_set1_ps(m)),
    };
    // SAFETY: the caller's `out` holds 8 values.
    unsafe { _mm256_storeu_ps(out, y) };
}

/// 32 bytes (`v`) as four runs of 8 (see [`store8`]) at `out`, with one
/// `(d, m)` per 16 values (`dm[0]` for the first 16, `dm[1]` for the
/// rest).
///
/// # Safety
/// AVX2; `out` has 32 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn store32(v: std::arch::x86_64::__m256i, signed: bool, dm: [(f32, f32); 2], then: Then, out: *mut f32) {
    use std::arch::x86_64::*;
    let (lo, hi) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    // SAFETY: `out` holds 32 values (the caller's precondition).
    unsafe {
        store8(lo, signed, dm[0].0, dm[0].1, then, out);
        store8(_mm_srli_si128::<8>(lo), signed, dm[0].0, dm[0].1, then, out.add(8));
        store8(hi, signed, dm[1].0, dm[1].1, then, out.add(16));
        store8(_mm_srli_si128::<8>(hi), signed, dm[1].0, dm[1].1, then, out.add(24));
    }
}

/// An f16 field at byte `at` of `b`, as f32.
fn half(b: &[u8], at: usize) -> f32 {
    peft_core::storage::f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// Q4_1, Q4_K or Q6_K: one block decoded with AVX2, the values of
/// [`decode_block`] bit for bit. Other formats, blocks or outputs of
/// other lengths leave `out` as it was.
///
/// # Safety
/// The CPU must have AVX2 and F16C. Every load reads inside `block`
/// (its length is checked) and every store writes inside `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode_avx2(format: Format, block: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (elems, size) = format.block();
    if block.len() != size || out.len() != elems {
        return;
    }
    let o = out.as_mut_ptr();
    let p = block.as_ptr();
    // SAFETY (all loads and stores below): `block` has `size` bytes and
    // `out` `elems` values, checked above; the offsets stay inside them.
    unsafe {
        let low = _mm256_set1_epi8(0x0F);
        match format {
            Format::Q4_1 => {
                // d m | qs[16]: x[j] = (qs[j] & 15) d + m, x[j+16] = (qs[j] >> 4) d + m.
                let (d, m) = (half(block, 0), half(block, 2));
                let q = _mm_loadu_si128(p.add(4).cast::<__m128i>());
                let lo = _mm_and_si128(q, _mm_set1_epi8(0x0F));
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), _mm_set1_epi8(0x0F));
                store8(lo, false, d, m, Then::Add, o);
                store8(_mm_srli_si128::<8>(lo), false, d, m, Then::Add, o.add(8));
                store8(hi, false, d, m, Then::Add, o.add(16));
                store8(_mm_srli_si128::<8>(hi), false, d, m, Then::Add, o.add(24));
            }
            Format::Q4_K => {
                // d dmin | scales[12] | qs[128]: chunk c holds 64 values,
                // the low nibbles of 32 bytes then the high ones.
                let (d, min) = (half(block, 0), half(block, 2));
                let s = &block[4..16];
                for c in 0..4 {
                    let (sc1, m1) = scale_min_k4(s, 2 * c);
                    let (sc2, m2) = scale_min_k4(s, 2 * c + 1);
                    let a = (d * f32::from(sc1), min * f32::from(m1));
                    let b = (d * f32::from(sc2), min * f32::from(m2));
                    let q = _mm256_loadu_si256(p.add(16 + 32 * c).cast::<__m256i>());
                    let lo = _mm256_and_si256(q, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low);
                    store32(lo, false, [a, a], Then::Sub, o.add(64 * c));
                    store32(hi, false, [b, b], Then::Sub, o.add(64 * c + 32));
                }
            }
            Format::Q6_K => {
                // ql[128] | qh[64] | scales:i8[16] | d: halves of 128.
                let d = half(block, 208);
                for n in 0..2 {
                    for (r, v) in q6_k_runs(p, n).into_iter().enumerate() {
                        let sc = |k: usize| d * f32::from(block[192 + 8 * n + k] as i8);
                        // Values 0-15 of the run use scale r*2 + 0, 16-31 scale r*2 + 1 (`is = l / 16`).
                        let dm = [(sc(2 * r), 0.0), (sc(2 * r + 1), 0.0)];
                        store32(v, true, dm, Then::Keep, o.add(128 * n + 32 * r));
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 decoders give `peft-core`'s (ggml's) values bit for bit,
    /// on random blocks whose f16 fields are finite (and, here, also on
    /// blocks with any f16 fields: NaN payloads and infinities included).
    #[test]
    fn avx2_decoders_equal_the_portable_decoder_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        if avx2() {
            let mut rng = peft_core::Rng::new(5);
            for format in [Format::Q4_1, Format::Q4_K, Format::Q6_K] {
                let (elems, size) = format.block();
                for trial in 0..2000 {
                    let block: Vec<u8> = (0..size).map(|_| rng.next_u64() as u8).collect();
                    let mut block = block;
                    if trial % 2 == 0 {
                        for &at in peft_core::storage::ggml::half_fields(format) {
                            let h = half::f16::from_f32((rng.next_u64() % 2000) as f32 / 1000.0 - 1.0);
                            block[at..at + 2].copy_from_slice(&h.to_le_bytes());
                        }
                    }
                    let (mut a, mut b) = (vec![0.0f32; elems], vec![1.0f32; elems]);
                    decode_block(format, &block, &mut a);
                    // SAFETY: AVX2 and F16C detected above.
                    unsafe { decode_avx2(format, &block, &mut b) };
                    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                        let same = x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan());
                        assert!(same, "{format:?} trial {trial} value {i}: {x} vs {y}");
                    }
                }
            }
        }
    }

    /// Faer's paths over every GGUF block format against the portable
    /// kernel, within 1e-6 of `sum |w| |x|` (f32 rounding of 512-term
    /// sums; a 0.1% error in one term of the fused kernels' algebra
    /// breaks it): 1 token (the fused Q4_1 / Q4_K kernels, the decode-then-
    /// dot path for the others), 3 (the few-token path) and 7 (tiles), and
    /// tiles of one super-block of columns by two rows for the forward and
    /// the input gradient.
    #[test]
    fn faer_paths_agree_with_the_portable_kernel_on_every_block_format() {
        use peft_core::storage::{StoredLinear, StoredWeight};
        use peft_core::{Accum, FrozenLinear, MatMut, MatRef, Reference};
        let mut rng = peft_core::Rng::new(9);
        let (out, inn) = (6, 512);
        for format in Format::ALL.into_iter().filter(|f| f.block().0 > 1) {
            let (_, size) = format.block();
            let mut bytes: Vec<u8> = (0..out * format.row_bytes(inn).unwrap()).map(|_| rng.next_u64() as u8).collect();
            for block in bytes.chunks_exact_mut(size) {
                for &at in peft_core::storage::ggml::half_fields(format) {
                    let h = half::f16::from_f32((rng.next_u64() % 2000) as f32 / 10000.0 - 0.1);
                    block[at..at + 2].copy_from_slice(&h.to_le_bytes());
                }
            }
            let w = StoredWeight::blocks(format, &bytes, out, inn).unwrap();
            let mut deq = vec![0.0f32; out * inn];
            peft_core::storage::dequantize(&w, &mut deq).unwrap();
            let base = StoredLinear::<f32>::new(w);
            for t in [1, 3, 7] {
                let mut x = vec![0.0f32; t * inn];
                rng.fill_uniform(&mut x, -1.0, 1.0);
                let xv = MatRef::new(&x, t, inn).unwrap();
                let (mut y, mut yr) = (vec![0.0f32; t * out], vec![0.0f32; t * out]);
                base.forward(&crate::Faer::new(), xv, MatMut::new(&mut y, t, out).unwrap()).unwrap();
                base.forward(&Reference, xv, MatMut::new(&mut yr, t, out).unwrap()).unwrap();
                // Tiles of one super-block of columns by two rows (two
                // column blocks, three row blocks), forward and input
                // gradient, `accum` on the first product only.
                let f = crate::Faer::new();
                let mut yt = vec![0.0f32; t * out];
                let w = StoredWeight::blocks(format, &bytes, out, inn).unwrap();
                super::super::tiled(&f, &w, xv, MatMut::new(&mut yt, t, out).unwrap(), Accum::Replace, 256, 2, false)
                    .unwrap();
                let mut g = vec![0.0f32; t * out];
                rng.fill_uniform(&mut g, -1.0, 1.0);
                let gv = MatRef::new(&g, t, out).unwrap();
                let (mut gt, mut gr) = (vec![0.5f32; t * inn], vec![0.5f32; t * inn]);
                super::super::tiled(&f, &w, gv, MatMut::new(&mut gt, t, inn).unwrap(), Accum::Add, 256, 2, true)
                    .unwrap();
                base.apply_transpose(&Reference, gv, MatMut::new(&mut gr, t, inn).unwrap(), Accum::Add).unwrap();
                for (k, (a, b)) in gt.iter().zip(&gr).enumerate() {
                    let (ti, c) = (k / inn, k % inn);
                    let mag: f32 = (0..out).map(|j| (deq[j * inn + c] * g[ti * out + j]).abs()).sum::<f32>() + 0.5;
                    assert!((a - b).abs() <= 1e-6 * mag, "{format:?} t={t} tiled grad_x[{k}]: {a} vs {b}");
                }
                for (i, ((a, b), c)) in y.iter().zip(&yr).zip(&yt).enumerate() {
                    let (ti, j) = (i / out, i % out);
                    let mag: f32 = deq[j * inn..(j + 1) * inn]
                        .iter()
                        .zip(&x[ti * inn..(ti + 1) * inn])
                        .map(|(w, x)| (w * x).abs())
                        .sum();
                    assert!((a - b).abs() <= 1e-6 * mag, "{format:?} t={t} y[{i}]: {a} vs {b} (sum |w x| = {mag})");
                    assert!((c - b).abs() <= 1e-6 * mag, "{format:?} t={t} tiled y[{i}]: {c} vs {b}");
                }
            }
        }
    }
}
