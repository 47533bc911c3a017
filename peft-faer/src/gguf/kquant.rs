//! Quantizers into GGUF's K-quants with ggml's reference rounding
//! (`quantize_row_q{2,3,4,5,6}_K_ref` in `ggml/src/ggml-quants.c`, what
//! `llama-quantize` runs without an importance matrix): the same scale
//! searches (`make_qkx2_quants`, `make_qx_quants`, `make_q3_quants`), the
//! same f32 operations in the same order, `nearest_int`'s
//! round-half-to-even through the `1.5 * 2^23` trick. The tests check
//! every tensor of the tiny Llama against `llama-quantize --pure`'s bytes.
//!
//! These live on the std side (the searches keep per-block scratch on
//! the stack and index freely); `peft-core`'s `quantize()` writes the
//! 32-value formats.

use peft_core::storage::{Format, QK_K, f16_to_f32, f32_to_f16};

/// ggml's `GROUP_MAX_EPS`: a group whose largest magnitude is below it is
/// all zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `nearest_int`: round half to even for `|v| <= 2^22`.
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0f32).to_bits();
    (bits & 0x007f_ffff) as i32 - 0x0040_0000
}

fn f16_round(v: f32) -> (u16, f32) {
    let h = f32_to_f16(v);
    (h, f16_to_f32(h))
}

/// `make_qx_quants` with `rmse_type = 1` and no importance weights (the
/// weights are `x^2`): levels `L` in `0..2 nmax`, returns the scale.
fn make_qx_quants(x: &[f32], nmax: i32, l_out: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        let ax = v.abs();
        if ax > amax {
            amax = ax;
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.iter_mut().for_each(|l| *l = 0);
        return 0.0;
    }
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for (i, &v) in x.iter().enumerate() {
        let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        l_out[i] = (l + nmax) as i8;
        let w = v * v;
        sumlx += w * v * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
            let w = v * v;
            sumlx += w * v * l as f32;
            suml2 += w * l as f32 * l as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (i, &v) in x.iter().enumerate() {
                let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
                l_out[i] = (nmax + l) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `make_qkx2_quants`: levels `L` in `0..=nmax` and a minimum for `x`
/// under `weights`, searching `nstep + 1` scales from `rmin`; returns
/// `(scale, -min)`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    l_out: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out.iter_mut().for_each(|l| *l = 0);
        return (0.0, -min);
    }
    let err = |d: f32| if use_mad { d.abs() } else { d * d };
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * err(diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    let mut laux = [0u8; 32];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let (w, l) = (weights[i], l as f32);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * err(diff);
            }
            if cur_error < best_error {
                l_out[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Q4_K's and Q5_K's packing of eight 6-bit scales and minimums.
fn pack_scales_k4(ls: &[u8; 8], lm: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
    s
}

/// One super-block of Q4_K (`five = false`) or Q5_K into `out` (144 or 176
/// bytes): `quantize_row_q4_K_ref` / `quantize_row_q5_K_ref`.
fn q45_k_block(x: &[f32], five: bool, out: &mut [u8]) {
    let nmax = if five { 31 } else { 15 };
    let (rmin, rdelta, nstep) = if five { (-0.5, 0.1, 15) } else { (-1.0, 0.1, 20) };
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0.0f32; 8], [0.0f32; 8]);
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let mut weights = [0.0f32; 32];
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(xs, &weights, nmax, &mut l[32 * j..32 * j + 32], rmin, rdelta, nstep, false);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let (mut ls, mut lm) = ([0u8; 8], [0u8; 8]);
    for j in 0..8 {
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    let packed = pack_scales_k4(&ls, &lm);
    let (dh, d) = f16_round(max_scale / 63.0);
    let (mh, dmin) = f16_round(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = (ls[j], lm[j]);
        let dj = d * f32::from(sc);
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * f32::from(m);
        for ii in 0..32 {
            let q = nearest_int((x[32 * j + ii] + dm) / dj).clamp(0, nmax);
            l[32 * j + ii] = q as u8;
        }
    }
    out[0..2].copy_from_slice(&dh.to_le_bytes());
    out[2..4].copy_from_slice(&mh.to_le_bytes());
    out[4..16].copy_from_slice(&packed);
    let qs_at = if five { 48 } else { 16 };
    if five {
        out[16..48].iter_mut().for_each(|b| *b = 0);
    }
    for (c, n) in (0..QK_K).step_by(64).enumerate() {
        for j in 0..32 {
            let (mut l1, mut l2) = (l[n + j], l[n + j + 32]);
            if five {
                if l1 > 15 {
                    l1 -= 16;
                    out[16 + j] |= 1 << (2 * c);
                }
                if l2 > 15 {
                    l2 -= 16;
                    out[16 + j] |= 2 << (2 * c);
                }
            }
            out[qs_at + 32 * c + j] = l1 | (l2 << 4);
        }
    }
}

/// One super-block of Q6_K into `out` (210 bytes): `quantize_row_q6_K_ref`.
fn q6_k_block(x: &[f32], out: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0.0f32, 0.0f32);
    for ib in 0..16 {
        let s = make_qx_quants(&x[16 * ib..16 * ib + 16], 32, &mut l[16 * ib..16 * ib + 16]);
        scales[ib] = s;
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    out.iter_mut().for_each(|b| *b = 0);
    if max_abs_scale < GROUP_MAX_EPS {
        return;
    }
    let iscale = -128.0 / max_scale;
    let (dh, d16) = f16_round(1.0 / iscale);
    out[208..210].copy_from_slice(&dh.to_le_bytes());
    let mut sc = [0i8; 16];
    for ib in 0..16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
        out[192 + ib] = sc[ib] as u8;
    }
    for j in 0..16 {
        let d = d16 * f32::from(sc[j]);
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            let q = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
            l[16 * j + ii] = (q + 32) as i8;
        }
    }
    for (h, j) in (0..QK_K).step_by(128).enumerate() {
        for i in 0..32 {
            let q = |k: usize| l[j + i + 32 * k] as u8;
            out[64 * h + i] = (q(0) & 0xF) | ((q(2) & 0xF) << 4);
            out[64 * h + i + 32] = (q(1) & 0xF) | ((q(3) & 0xF) << 4);
            out[128 + 32 * h + i] = (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
        }
    }
}

/// `make_q3_quants` with `do_rmse` (weights `x^2`): levels `L` in
/// `0..2 nmax`, returns the scale.
fn make_q3_quants(x: &[f32], nmax: i32, l_out: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l_out.iter_mut().for_each(|l| *l = 0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    let mut l = [0i32; 16];
    for (i, &v) in x.iter().enumerate() {
        l[i] = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        let w = v * v;
        sumlx += w * v * l[i] as f32;
        suml2 += w * l[i] as f32 * l[i] as f32;
    }
    for _ in 0..5 {
        let mut changed = 0;
        for (i, &v) in x.iter().enumerate() {
            let w = v * v;
            let mut slx = sumlx - w * v * l[i] as f32;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * l[i] as f32 * l[i] as f32;
                let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != l[i] {
                    slx += w * v * new_l as f32;
                    sl2 += w * new_l as f32 * new_l as f32;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l[i] = new_l;
                        sumlx = slx;
                        suml2 = sl2;
                        changed += 1;
                    }
                }
            }
        }
        if changed == 0 {
            break;
        }
    }
    for (o, v) in l_out.iter_mut().zip(l) {
        *o = (v + nmax) as i8;
    }
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

/// Q2_K's and Q3_K's packing of 2-bit levels: byte `32 h + i` of `qs`
/// holds levels `128 h + i + 32 k` at bits `2 k`.
fn pack_2bit(l: &[u8; QK_K], qs: &mut [u8]) {
    for (h, j) in (0..QK_K).step_by(128).enumerate() {
        for i in 0..32 {
            qs[32 * h + i] = l[j + i] | (l[j + i + 32] << 2) | (l[j + i + 64] << 4) | (l[j + i + 96] << 6);
        }
    }
}

/// One super-block of Q2_K into `out` (84 bytes): `quantize_row_q2_K_ref`.
fn q2_k_block(x: &[f32], out: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let (mut scales, mut mins) = ([0.0f32; 16], [0.0f32; 16]);
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        let mut weights = [0.0f32; 16];
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = v.abs();
        }
        let (s, m) = make_qkx2_quants(xs, &weights, 3, &mut l[16 * j..16 * j + 16], -0.5, 0.1, 15, true);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let mut sc = [0u8; 16];
    let mut d = 0.0f32;
    let mut dh = 0u16;
    if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        for j in 0..16 {
            sc[j] = nearest_int(iscale * scales[j]) as u8;
        }
        (dh, d) = f16_round(max_scale / 15.0);
    }
    let (mut mh, mut dmin) = (0u16, 0.0f32);
    if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        for j in 0..16 {
            sc[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
        }
        (mh, dmin) = f16_round(max_min / 15.0);
    }
    for j in 0..16 {
        let dj = d * f32::from(sc[j] & 0xF);
        if dj == 0.0 {
            continue;
        }
        let dm = dmin * f32::from(sc[j] >> 4);
        for ii in 0..16 {
            l[16 * j + ii] = nearest_int((x[16 * j + ii] + dm) / dj).clamp(0, 3) as u8;
        }
    }
    out[..16].copy_from_slice(&sc);
    pack_2bit(&l, &mut out[16..80]);
    out[80..82].copy_from_slice(&dh.to_le_bytes());
    out[82..84].copy_from_slice(&mh.to_le_bytes());
}

/// One super-block of Q3_K into `out` (110 bytes): `quantize_row_q3_K_ref`.
fn q3_k_block(x: &[f32], out: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0.0f32; 16];
    let (mut max_scale, mut amax) = (0.0f32, 0.0f32);
    for j in 0..16 {
        scales[j] = make_q3_quants(&x[16 * j..16 * j + 16], 4, &mut l[16 * j..16 * j + 16]);
        if scales[j].abs() > amax {
            amax = scales[j].abs();
            max_scale = scales[j];
        }
    }
    let mut packed = [0u8; 12];
    let mut dh = f32_to_f16(0.0);
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for j in 0..16 {
            let v = (nearest_int(iscale * scales[j]) as i8).clamp(-32, 31) + 32;
            let v = v as u8;
            if j < 8 {
                packed[j] = v & 0xF;
            } else {
                packed[j - 8] |= (v & 0xF) << 4;
            }
            packed[j % 4 + 8] |= (v >> 4) << (2 * (j / 4));
        }
        dh = f32_to_f16(1.0 / iscale);
    }
    let d_all = f16_to_f32(dh);
    for j in 0..16 {
        let low = if j < 8 { packed[j] & 0xF } else { packed[j - 8] >> 4 };
        let sc = (low | (((packed[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i8 - 32;
        let d = d_all * f32::from(sc);
        if d == 0.0 {
            continue;
        }
        for ii in 0..16 {
            l[16 * j + ii] = (nearest_int(x[16 * j + ii] / d).clamp(-4, 3) + 4) as i8;
        }
    }
    let mut hmask = [0u8; 32];
    let mut l2 = [0u8; QK_K];
    for (j, (&v, o)) in l.iter().zip(l2.iter_mut()).enumerate() {
        let mut v = v as u8;
        if v > 3 {
            hmask[j % 32] |= 1 << (j / 32);
            v -= 4;
        }
        *o = v;
    }
    out[..32].copy_from_slice(&hmask);
    pack_2bit(&l2, &mut out[32..96]);
    out[96..108].copy_from_slice(&packed);
    out[108..110].copy_from_slice(&dh.to_le_bytes());
}

/// Whether [`quantize_rows`] writes `format`.
pub fn has_quantizer(format: Format) -> bool {
    matches!(format, Format::Q2_K | Format::Q3_K | Format::Q4_K | Format::Q5_K | Format::Q6_K)
}

/// `vals` (whole rows of `cols` values, `cols` a multiple of 256, finite)
/// quantized into `format`'s super-blocks, appended to `out`. `None` for
/// a format without a quantizer here or rows that are not whole
/// super-blocks; nothing is appended then.
pub fn quantize_rows(format: Format, vals: &[f32], cols: usize, out: &mut Vec<u8>) -> Option<()> {
    if !has_quantizer(format) || !cols.is_multiple_of(QK_K) || !vals.len().is_multiple_of(QK_K) {
        return None;
    }
    let (_, size) = format.block();
    let start = out.len();
    out.resize(start + vals.len() / QK_K * size, 0);
    for (x, block) in vals.chunks_exact(QK_K).zip(out[start..].chunks_exact_mut(size)) {
        match format {
            Format::Q2_K => q2_k_block(x, block),
            Format::Q3_K => q3_k_block(x, block),
            Format::Q6_K => q6_k_block(x, block),
            f => q45_k_block(x, f == Format::Q5_K, block),
        }
    }
    Some(())
}
