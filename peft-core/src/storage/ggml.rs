//! GGUF's block formats beyond Q8_0 and Q4_0: Q4_1, Q5_0, Q5_1 (blocks of
//! 32) and the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (super-blocks of
//! [`QK_K`] = 256), decoded exactly as ggml's `dequantize_row_*`
//! (`ggml/src/ggml-quants.c`): the same f32 operations in the same order,
//! no fused multiply-add, so every value is bit for bit ggml's.
//!
//! Layouts (`ggml-common.h`; `|` separates fields in storage order, f16
//! fields are IEEE half little-endian, `j < 16`, `i < 32`):
//!
//! | format | bytes | layout | value |
//! |---|---|---|---|
//! | Q4_1 | 20 | `d m \| qs[16]` | `x[j] = (qs[j] & 15) d + m`, `x[j+16] = (qs[j] >> 4) d + m` |
//! | Q5_0 | 22 | `d \| qh:u32 \| qs[16]` | `x[j] = ((qs[j] & 15 \| bit j of qh << 4) - 16) d`, `x[j+16]`: high nibble, bit `j+16` |
//! | Q5_1 | 24 | `d m \| qh:u32 \| qs[16]` | as Q5_0 without `- 16`, then `+ m` |
//! | Q2_K | 84 | `scales[16] \| qs[64] \| d dmin` | `x = d (sc & 15) q - dmin (sc >> 4)`, `q` 2 bits |
//! | Q3_K | 110 | `hmask[32] \| qs[64] \| scales[12] \| d` | `x = d (sc - 32) (q - 4 (1 - h))`, `sc` 6 bits, `q` 2 bits, `h` the hmask bit |
//! | Q4_K | 144 | `d dmin \| scales[12] \| qs[128]` | `x = d sc q - dmin m`, `(sc, m)` 6 bits each per 32 values |
//! | Q5_K | 176 | `d dmin \| scales[12] \| qh[32] \| qs[128]` | as Q4_K with `q + 16 h` |
//! | Q6_K | 210 | `ql[128] \| qh[64] \| scales:i8[16] \| d` | `x = d sc (q - 32)`, `q` 6 bits |
//!
//! Where each value's bits sit inside a super-block is spelled out in
//! [`element`], one format per arm; [`decode_block`] computes the same
//! values a block at a time.

use super::Format;
use super::half::f16_to_f32;

/// Values per K-quant super-block (Q2_K to Q6_K).
pub const QK_K: usize = 256;

/// An f16 field at byte `at` of `b` (0 past the end, which the callers'
/// fixed block lengths rule out).
fn half_at(b: &[u8], at: usize) -> f32 {
    match b.get(at..at + 2) {
        Some(&[lo, hi]) => f16_to_f32(u16::from_le_bytes([lo, hi])),
        _ => 0.0,
    }
}

/// Byte `at` of `b` (0 past the end).
fn byte(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

/// Byte offsets of a block's f16 fields (`d`, and `m` / `dmin` where the
/// format has one). Empty for the formats without blocks.
pub const fn half_fields(format: Format) -> &'static [usize] {
    match format {
        Format::Q8_0 | Format::Q4_0 | Format::Q5_0 => &[0],
        Format::Q4_1 | Format::Q5_1 | Format::Q4_K | Format::Q5_K => &[0, 2],
        Format::Q2_K => &[80, 82],
        Format::Q3_K => &[108],
        Format::Q6_K => &[208],
        Format::F32 | Format::F16 | Format::Bf16 | Format::Int8 => &[],
    }
}

/// The first block of `bytes` (whole blocks of `format`) with an f16 field
/// (`d`, `m`, `dmin`) that is NaN or infinite: the index of its first value
/// and the field's value. Such a block decodes to NaN or infinities, so
/// the readers of files refuse it once, when a matrix is loaded. `None`
/// when every field is finite, and for the formats without blocks.
pub fn first_bad_block_scale(format: Format, bytes: &[u8]) -> Option<(usize, f32)> {
    let (elems, size) = format.block();
    let fields = half_fields(format);
    if fields.is_empty() {
        return None;
    }
    bytes.chunks_exact(size).enumerate().find_map(|(i, b)| {
        let bad = fields.iter().map(|&at| half_at(b, at)).find(|v| !v.is_finite())?;
        Some((i * elems, bad))
    })
}

/// Q4_K's and Q5_K's 6-bit scale and minimum of sub-block `k < 8` from
/// the block's 12 scale bytes `s` (ggml's `get_scale_min_k4`; 0 past the
/// end of `s`).
pub fn scale_min_k4(s: &[u8], k: usize) -> (u8, u8) {
    if k < 4 {
        (byte(s, k) & 63, byte(s, k + 4) & 63)
    } else {
        ((byte(s, k + 4) & 15) | ((byte(s, k - 4) >> 6) << 4), (byte(s, k + 4) >> 4) | ((byte(s, k) >> 6) << 4))
    }
}

/// Q3_K's 6-bit scale of sub-block `k < 16`, as ggml unpacks it, before
/// the `- 32`.
fn scale_q3_k(s: &[u8], k: usize) -> i32 {
    let low = if k < 8 { byte(s, k) & 15 } else { byte(s, k - 8) >> 4 };
    let high = (byte(s, 8 + k % 4) >> (2 * (k / 4))) & 3;
    i32::from(low | (high << 4))
}

/// Value `i` of one block of `format` (`block` its bytes): the formula of
/// the [module docs](self), written element by element. `0.0` for the
/// formats without blocks and out-of-range `i`.
pub fn element(format: Format, b: &[u8], i: usize) -> f32 {
    let (elems, _) = format.block();
    if i >= elems {
        return 0.0;
    }
    let d = |at: usize| half_at(b, at);
    let qh32 = |at: usize| u32::from_le_bytes([byte(b, at), byte(b, at + 1), byte(b, at + 2), byte(b, at + 3)]);
    match format {
        Format::Q8_0 => f32::from(byte(b, 2 + i) as i8) * d(0),
        Format::Q4_0 => {
            let q = byte(b, 2 + i % 16);
            f32::from((if i < 16 { q & 15 } else { q >> 4 }) as i8 - 8) * d(0)
        }
        Format::Q4_1 => {
            let q = byte(b, 4 + i % 16);
            f32::from(if i < 16 { q & 15 } else { q >> 4 }) * d(0) + d(2)
        }
        Format::Q5_0 | Format::Q5_1 => {
            let base = if format == Format::Q5_0 { 2 } else { 4 };
            let q = byte(b, base + 4 + i % 16);
            let nibble = if i < 16 { q & 15 } else { q >> 4 };
            let v = i32::from(nibble) | ((((qh32(base) >> i) & 1) as i32) << 4);
            if format == Format::Q5_0 { (v - 16) as f32 * d(0) } else { v as f32 * d(0) + d(2) }
        }
        Format::Q2_K => {
            // Halves of 128 values, each four runs of 32 (two sub-blocks of 16).
            let (n, g, l) = (i / 128, i % 128 / 32, i % 32);
            let sc = byte(b, 8 * n + 2 * g + l / 16);
            let q = (byte(b, 16 + 32 * n + l) >> (2 * g)) & 3;
            d(80) * f32::from(sc & 15) * f32::from(q) - d(82) * f32::from(sc >> 4)
        }
        Format::Q3_K => {
            let (n, g, l) = (i / 128, i % 128 / 32, i % 32);
            let dl = d(108) * (scale_q3_k(b.get(96..108).unwrap_or(&[]), 8 * n + 2 * g + l / 16) - 32) as f32;
            let q = i32::from((byte(b, 32 + 32 * n + l) >> (2 * g)) & 3);
            let h = (byte(b, l) >> (4 * n + g)) & 1;
            dl * (q - if h == 1 { 0 } else { 4 }) as f32
        }
        Format::Q4_K | Format::Q5_K => {
            // Chunks of 64 values: the low nibbles of 32 bytes, then the high.
            let (c, half, l) = (i / 64, i % 64 / 32, i % 32);
            let scales = b.get(4..16).unwrap_or(&[]);
            let (sc, m) = scale_min_k4(scales, 2 * c + half);
            let qs = if format == Format::Q4_K { 16 } else { 48 };
            let byte_q = byte(b, qs + 32 * c + l);
            let mut q = if half == 0 { byte_q & 15 } else { byte_q >> 4 };
            if format == Format::Q5_K && (byte(b, 16 + l) >> (2 * c + half)) & 1 == 1 {
                q += 16;
            }
            d(0) * f32::from(sc) * f32::from(q) - d(2) * f32::from(m)
        }
        Format::Q6_K => {
            // Halves of 128; four runs of 32 share each ql / qh byte.
            let (n, r, l) = (i / 128, i % 128 / 32, i % 32);
            let lo = byte(b, 64 * n + l + if r % 2 == 1 { 32 } else { 0 });
            let lo = if r < 2 { lo & 15 } else { lo >> 4 };
            let hi = (byte(b, 128 + 32 * n + l) >> (2 * r)) & 3;
            let q = i32::from(lo | (hi << 4)) - 32;
            let sc = byte(b, 192 + 8 * n + l / 16 + 2 * r) as i8;
            d(208) * f32::from(sc) * q as f32
        }
        Format::F32 | Format::F16 | Format::Bf16 | Format::Int8 => 0.0,
    }
}

/// One block of `format` (`block`: its bytes) decoded into `out` (its
/// values), exactly as ggml's `dequantize_row_*`; equal to [`element`] at
/// every index. Blocks and outputs of other lengths leave `out` as it was.
pub fn decode_block(format: Format, block: &[u8], out: &mut [f32]) {
    let (elems, size) = format.block();
    if block.len() != size || out.len() != elems {
        return;
    }
    match format {
        Format::Q4_1 => q4_1(block, out),
        Format::Q5_0 | Format::Q5_1 => q5(format == Format::Q5_1, block, out),
        Format::Q2_K => q2_k(block, out),
        Format::Q3_K => q3_k(block, out),
        Format::Q4_K | Format::Q5_K => q45_k(format == Format::Q5_K, block, out),
        Format::Q6_K => q6_k(block, out),
        _ => out.iter_mut().enumerate().for_each(|(i, o)| *o = element(format, block, i)),
    }
}

fn q4_1(b: &[u8], out: &mut [f32]) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let (lo, hi) = out.split_at_mut(16);
    for ((l, h), q) in lo.iter_mut().zip(hi).zip(b.iter().skip(4)) {
        *l = f32::from(q & 15) * d + m;
        *h = f32::from(q >> 4) * d + m;
    }
}

fn q5(with_min: bool, b: &[u8], out: &mut [f32]) {
    let base = if with_min { 4 } else { 2 };
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let qh = u32::from_le_bytes([byte(b, base), byte(b, base + 1), byte(b, base + 2), byte(b, base + 3)]);
    let (lo, hi) = out.split_at_mut(16);
    for (j, ((l, h), q)) in lo.iter_mut().zip(hi).zip(b.iter().skip(base + 4)).enumerate() {
        let x0 = i32::from(q & 15) | ((((qh >> j) << 4) & 0x10) as i32);
        let x1 = i32::from(q >> 4) | (((qh >> (j + 12)) & 0x10) as i32);
        if with_min {
            *l = x0 as f32 * d + m;
            *h = x1 as f32 * d + m;
        } else {
            *l = (x0 - 16) as f32 * d;
            *h = (x1 - 16) as f32 * d;
        }
    }
}

fn q2_k(b: &[u8], out: &mut [f32]) {
    let (d, min) = (half_at(b, 80), half_at(b, 82));
    let scales = b.get(..16).unwrap_or(&[]);
    let qs = b.get(16..80).unwrap_or(&[]);
    let mut sc = scales.iter();
    for (half, q) in out.chunks_exact_mut(128).zip(qs.chunks_exact(32)) {
        for (g, run) in half.chunks_exact_mut(32).enumerate() {
            for (sixteen, qq) in run.chunks_exact_mut(16).zip(q.chunks_exact(16)) {
                let s = sc.next().copied().unwrap_or(0);
                let (dl, ml) = (d * f32::from(s & 15), min * f32::from(s >> 4));
                for (o, v) in sixteen.iter_mut().zip(qq) {
                    *o = dl * f32::from((v >> (2 * g)) & 3) - ml;
                }
            }
        }
    }
}

fn q3_k(b: &[u8], out: &mut [f32]) {
    let d_all = half_at(b, 108);
    let hmask = b.get(..32).unwrap_or(&[]);
    let qs = b.get(32..96).unwrap_or(&[]);
    let scales = b.get(96..108).unwrap_or(&[]);
    let mut is = 0;
    for (n, (half, q)) in out.chunks_exact_mut(128).zip(qs.chunks_exact(32)).enumerate() {
        for (g, run) in half.chunks_exact_mut(32).enumerate() {
            let m = 1u8 << (4 * n + g);
            for ((sixteen, qq), hm) in run.chunks_exact_mut(16).zip(q.chunks_exact(16)).zip(hmask.chunks_exact(16)) {
                let dl = d_all * (scale_q3_k(scales, is) - 32) as f32;
                is += 1;
                for ((o, v), h) in sixteen.iter_mut().zip(qq).zip(hm) {
                    let q = i32::from((v >> (2 * g)) & 3) - if h & m != 0 { 0 } else { 4 };
                    *o = dl * q as f32;
                }
            }
        }
    }
}

fn q45_k(five: bool, b: &[u8], out: &mut [f32]) {
    let (d, min) = (half_at(b, 0), half_at(b, 2));
    let scales = b.get(4..16).unwrap_or(&[]);
    let qh = if five { b.get(16..48).unwrap_or(&[]) } else { &[0; 32] };
    let qs = b.get(if five { 48.. } else { 16.. }).unwrap_or(&[]);
    for (c, (chunk, q)) in out.chunks_exact_mut(64).zip(qs.chunks_exact(32)).enumerate() {
        let (sc1, m1) = scale_min_k4(scales, 2 * c);
        let (sc2, m2) = scale_min_k4(scales, 2 * c + 1);
        let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
        let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
        let (lo, hi) = chunk.split_at_mut(32);
        for (((l, h), v), high) in lo.iter_mut().zip(hi).zip(q).zip(qh) {
            let add = |u: u8| if high & u != 0 { 16 } else { 0 };
            *l = d1 * f32::from((v & 15) + add(u1)) - m1;
            *h = d2 * f32::from((v >> 4) + add(u2)) - m2;
        }
    }
}

fn q6_k(b: &[u8], out: &mut [f32]) {
    let d = half_at(b, 208);
    let ql = b.get(..128).unwrap_or(&[]);
    let qh = b.get(128..192).unwrap_or(&[]);
    let sc = b.get(192..208).unwrap_or(&[]);
    for (((y, l), h), s) in
        out.chunks_exact_mut(128).zip(ql.chunks_exact(64)).zip(qh.chunks_exact(32)).zip(sc.chunks_exact(8))
    {
        let (l0, l1) = l.split_at(32);
        let (y01, y23) = y.split_at_mut(64);
        let (y0, y1) = y01.split_at_mut(32);
        let (y2, y3) = y23.split_at_mut(32);
        let scale = |k: usize| f32::from(byte(s, k) as i8);
        for (i, (((((o0, o1), o2), o3), (a, c)), hh)) in
            y0.iter_mut().zip(y1).zip(y2).zip(y3).zip(l0.iter().zip(l1)).zip(h).enumerate()
        {
            let is = i / 16;
            let q1 = i32::from((a & 15) | ((hh & 3) << 4)) - 32;
            let q2 = i32::from((c & 15) | (((hh >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((a >> 4) | (((hh >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((c >> 4) | (((hh >> 6) & 3) << 4)) - 32;
            *o0 = d * scale(is) * q1 as f32;
            *o1 = d * scale(is + 2) * q2 as f32;
            *o2 = d * scale(is + 4) * q3 as f32;
            *o3 = d * scale(is + 6) * q4 as f32;
        }
    }
}
