//! Quantizers from f32 into each [`Format`], with GGUF's reference (its docs are in the [parent module](super))

use super::half::{f32_to_bf16, f32_to_f16};
#[cfg(any(test, feature = "alloc"))]
use alloc::{vec, vec::Vec};

#[cfg(any(test, feature = "alloc"))]
use super::StoredWeight;
use super::{Format, Q4_0_BYTES, Q8_0_BYTES, QK};
use crate::error::{Error, Operand, Result, check_len};
use crate::matrix::checked_len;

/// Where [`quantize`] writes, one variant per [`Format`].
#[derive(Debug)]
pub enum Quantized<'a> {
    /// f32 values (a copy).
    F32(&'a mut [f32]),
    /// f16 bits.
    F16(&'a mut [u16]),
    /// bf16 bits.
    Bf16(&'a mut [u16]),
    /// int8 values `[out, in]` and scales `[out]`.
    Int8(&'a mut [i8], &'a mut [f32]),
    /// Q8_0 blocks.
    Q8_0(&'a mut [u8]),
    /// Q4_0 blocks.
    Q4_0(&'a mut [u8]),
    /// Blocks of Q4_1, Q5_0 or Q5_1 (the other block formats have no
    /// quantizer here: [`quantize`] refuses them).
    Blocks(Format, &'a mut [u8]),
}

/// The buffers of an [`OwnedWeight`], one variant per [`Format`], laid out
/// as [`quantize`] writes them.
#[cfg(any(test, feature = "alloc"))]
#[derive(Clone, Debug, PartialEq)]
pub enum Owned {
    /// f32 values `[out, in]`.
    F32(Vec<f32>),
    /// f16 bits `[out, in]`.
    F16(Vec<u16>),
    /// bf16 bits `[out, in]`.
    Bf16(Vec<u16>),
    /// int8 values `[out, in]` and scales `[out]`.
    Int8(Vec<i8>, Vec<f32>),
    /// Q8_0 blocks, `out * row_bytes(in)` bytes.
    Q8_0(Vec<u8>),
    /// Q4_0 blocks, `out * row_bytes(in)` bytes.
    Q4_0(Vec<u8>),
    /// Blocks of another of GGUF's formats (Q4_1 to Q6_K), `out *
    /// row_bytes(in)` bytes, as read from a file.
    Blocks(Format, Vec<u8>),
}

/// A weight `[out, in]` quantized into buffers it owns, for hosts with a
/// heap: [`quantize`] into [`Owned`], read through
/// [`weight`](Self::weight).
#[cfg(any(test, feature = "alloc"))]
#[derive(Clone, Debug, PartialEq)]
pub struct OwnedWeight {
    data: Owned,
    out_features: usize,
    in_features: usize,
}

#[cfg(any(test, feature = "alloc"))]
impl OwnedWeight {
    /// Quantizes `w [out, in]` into `format`.
    ///
    /// # Errors
    /// [`Error::Overflow`] for sizes past `usize`, [`Error::ShapeMismatch`]
    /// (`Weight`) for `w` of another length, [`Error::InvalidParameter`]
    /// (`in_features`) for a block format with `in` not a multiple of 32,
    /// all before anything is allocated; [`Error::InvalidParameter`]
    /// (`format`) for a format without a quantizer
    /// ([`Format::has_quantizer`]); [`quantize`]'s refusals.
    pub fn quantize(format: Format, w: &[f32], out_features: usize, in_features: usize) -> Result<Self> {
        let n = checked_len(out_features, in_features)?;
        check_len(Operand::Weight, n, w.len())?;
        let blocks = || match format.row_bytes(in_features) {
            Some(row) => checked_len(out_features, row),
            None if !in_features.is_multiple_of(QK) => {
                Err(Error::InvalidParameter { name: "in_features", rule: MULTIPLE })
            }
            None => Err(Error::Overflow),
        };
        let mut data = match format {
            Format::F32 => Owned::F32(vec![0.0; n]),
            Format::F16 => Owned::F16(vec![0; n]),
            Format::Bf16 => Owned::Bf16(vec![0; n]),
            Format::Int8 => Owned::Int8(vec![0; n], vec![0.0; out_features]),
            Format::Q8_0 => Owned::Q8_0(vec![0; blocks()?]),
            Format::Q4_0 => Owned::Q4_0(vec![0; blocks()?]),
            f if f.has_quantizer() => Owned::Blocks(f, vec![0; blocks()?]),
            _ => return Err(NO_QUANTIZER),
        };
        let dst = match &mut data {
            Owned::F32(f) => Quantized::F32(f),
            Owned::F16(h) => Quantized::F16(h),
            Owned::Bf16(h) => Quantized::Bf16(h),
            Owned::Int8(q, s) => Quantized::Int8(q, s),
            Owned::Q8_0(b) => Quantized::Q8_0(b),
            Owned::Q4_0(b) => Quantized::Q4_0(b),
            Owned::Blocks(f, b) => Quantized::Blocks(*f, b),
        };
        quantize(w, out_features, in_features, dst)?;
        Ok(Self { data, out_features, in_features })
    }

    /// The buffers.
    pub fn data(&self) -> &Owned {
        &self.data
    }

    /// The weight, borrowed for the kernels.
    ///
    /// # Errors
    /// None in practice: the buffers were sized by
    /// [`quantize`](Self::quantize); [`StoredWeight`]'s own checks.
    pub fn weight(&self) -> Result<StoredWeight<'_>> {
        self.data.view(self.out_features, self.in_features)
    }
}

#[cfg(any(test, feature = "alloc"))]
impl Owned {
    /// The format the buffers hold.
    pub fn format(&self) -> Format {
        match self {
            Owned::F32(_) => Format::F32,
            Owned::F16(_) => Format::F16,
            Owned::Bf16(_) => Format::Bf16,
            Owned::Int8(..) => Format::Int8,
            Owned::Q8_0(_) => Format::Q8_0,
            Owned::Q4_0(_) => Format::Q4_0,
            Owned::Blocks(f, _) => *f,
        }
    }

    /// The buffers read as a weight `[out, in]`.
    ///
    /// # Errors
    /// [`StoredWeight`]'s checks: [`Error::ShapeMismatch`] for buffers
    /// that do not hold `[out, in]`, [`Error::InvalidParameter`] for a
    /// block format with `in` not a multiple of 32.
    pub fn view(&self, out_features: usize, in_features: usize) -> Result<StoredWeight<'_>> {
        let (o, i) = (out_features, in_features);
        match self {
            Owned::F32(f) => StoredWeight::f32(f, o, i),
            Owned::F16(h) => StoredWeight::f16(h, o, i),
            Owned::Bf16(h) => StoredWeight::bf16(h, o, i),
            Owned::Int8(q, s) => StoredWeight::int8(q, s, o, i),
            Owned::Q8_0(b) => StoredWeight::q8_0(b, o, i),
            Owned::Q4_0(b) => StoredWeight::q4_0(b, o, i),
            Owned::Blocks(f, b) => StoredWeight::blocks(*f, b, o, i),
        }
    }

    /// Whether `self` and `other` hold the same format and the same bits (a
    /// NaN equals itself here, unlike `==`).
    pub fn same_bits(&self, other: &Self) -> bool {
        let f32_bits =
            |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        match (self, other) {
            (Owned::F32(a), Owned::F32(b)) => f32_bits(a, b),
            (Owned::Int8(a, sa), Owned::Int8(b, sb)) => a == b && f32_bits(sa, sb),
            _ => self == other,
        }
    }
}

/// The rule a block format's row length breaks.
const MULTIPLE: &str = "must be a multiple of 32 for Q8_0 and Q4_0";

/// `C`'s `roundf`: half away from zero.
fn round(x: f32) -> f32 {
    libm::roundf(x)
}

/// The largest |x| of `xs`, and the value that has it (first on ties).
fn amax(xs: &[f32]) -> (f32, f32) {
    xs.iter().fold((0.0f32, 0.0f32), |(a, m), &v| if a < v.abs() { (v.abs(), v) } else { (a, m) })
}

/// The refusal for formats [`quantize`] does not write.
const NO_QUANTIZER: Error =
    Error::InvalidParameter { name: "format", rule: "has no quantizer here (the K-quants are read from files only)" };

/// Quantizes `w [out, in]` into `dst`, whose variant picks the format.
///
/// # Errors
/// [`Error::ShapeMismatch`] (`Weight`, `Dst`, `Parameter` for the int8
/// scales); [`Error::InvalidParameter`] (`in_features`) for a block format
/// with `in` not a multiple of 32; [`Error::NonFinite`] (`Weight`) for a
/// non-finite input; [`Error::OutOfRange`] (`Weight`) for a finite value
/// beyond f16, or a block whose scale would overflow f16 (the index of the
/// first element of that block). All before anything is written.
pub fn quantize(w: &[f32], out_features: usize, in_features: usize, dst: Quantized<'_>) -> Result<()> {
    let n = checked_len(out_features, in_features)?;
    check_len(Operand::Weight, n, w.len())?;
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite { operand: Operand::Weight, index: i });
    }
    let format = match &dst {
        Quantized::F32(_) => Format::F32,
        Quantized::F16(_) => Format::F16,
        Quantized::Bf16(_) => Format::Bf16,
        Quantized::Int8(..) => Format::Int8,
        Quantized::Q8_0(_) => Format::Q8_0,
        Quantized::Q4_0(_) => Format::Q4_0,
        Quantized::Blocks(f, _) if f.has_quantizer() && f.block().0 == QK => *f,
        Quantized::Blocks(..) => return Err(NO_QUANTIZER),
    };
    let row = format.row_bytes(in_features).ok_or(Error::InvalidParameter { name: "in_features", rule: MULTIPLE })?;
    let overflow = |i: usize| Error::OutOfRange { operand: Operand::Weight, index: i };
    match dst {
        Quantized::F32(d) => {
            check_len(Operand::Dst, n, d.len())?;
            d.copy_from_slice(w);
        }
        Quantized::F16(d) => {
            check_len(Operand::Dst, n, d.len())?;
            if let Some(i) = w.iter().position(|v| v.abs() >= 65520.0) {
                return Err(overflow(i));
            }
            d.iter_mut().zip(w).for_each(|(d, v)| *d = f32_to_f16(*v));
        }
        Quantized::Bf16(d) => {
            check_len(Operand::Dst, n, d.len())?;
            d.iter_mut().zip(w).for_each(|(d, v)| *d = f32_to_bf16(*v));
        }
        Quantized::Int8(q, scales) => {
            check_len(Operand::Dst, n, q.len())?;
            check_len(Operand::Parameter, out_features, scales.len())?;
            for ((qr, s), wr) in
                q.chunks_exact_mut(in_features.max(1)).zip(scales.iter_mut()).zip(w.chunks_exact(in_features.max(1)))
            {
                let (a, _) = amax(wr);
                let mut scale = a / 127.0;
                if !(scale * 127.0).is_finite() {
                    // a near f32::MAX: a / 127 rounded up would decode
                    // 127 s to infinity; one step down decodes finite.
                    scale = f32::from_bits(scale.to_bits() - 1);
                }
                // In f64: 1 / s of a subnormal scale overflows f32.
                let inv = if scale != 0.0 { 1.0 / f64::from(scale) } else { 0.0 };
                *s = scale;
                qr.iter_mut()
                    .zip(wr)
                    .for_each(|(q, x)| *q = libm::round(f64::from(*x) * inv).clamp(-127.0, 127.0) as i8);
            }
        }
        Quantized::Q8_0(d) => {
            check_len(Operand::Dst, out_features.checked_mul(row).ok_or(Error::Overflow)?, d.len())?;
            if let Some(b) = w.chunks_exact(QK).position(|xs| amax(xs).0 / 127.0 >= 65520.0) {
                return Err(overflow(b * QK));
            }
            for (block, xs) in d.chunks_exact_mut(Q8_0_BYTES).zip(w.chunks_exact(QK)) {
                let scale = amax(xs).0 / 127.0;
                let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
                let (head, qs) = block.split_at_mut(2);
                head.copy_from_slice(&f32_to_f16(scale).to_le_bytes());
                qs.iter_mut().zip(xs).for_each(|(q, x)| *q = round(x * inv) as i8 as u8);
            }
        }
        Quantized::Q4_0(d) => {
            check_len(Operand::Dst, out_features.checked_mul(row).ok_or(Error::Overflow)?, d.len())?;
            if let Some(b) = w.chunks_exact(QK).position(|xs| amax(xs).0 / 8.0 >= 65520.0) {
                return Err(overflow(b * QK));
            }
            for (block, xs) in d.chunks_exact_mut(Q4_0_BYTES).zip(w.chunks_exact(QK)) {
                let (_, max) = amax(xs);
                let scale = max / -8.0;
                let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
                let (head, qs) = block.split_at_mut(2);
                head.copy_from_slice(&f32_to_f16(scale).to_le_bytes());
                let (lo, hi) = xs.split_at(QK / 2);
                for ((q, x0), x1) in qs.iter_mut().zip(lo).zip(hi) {
                    // trunc(x / d + 8.5) >= 0 here: |x / d| <= 8.
                    let q0 = ((x0 * inv + 8.5) as i8).min(15) as u8;
                    let q1 = ((x1 * inv + 8.5) as i8).min(15) as u8;
                    *q = q0 | (q1 << 4);
                }
            }
        }
        Quantized::Blocks(f, d) => {
            check_len(Operand::Dst, out_features.checked_mul(row).ok_or(Error::Overflow)?, d.len())?;
            quantize_blocks(f, w, d)?;
        }
    }
    Ok(())
}

/// The smallest and largest values of `xs` (ggml's loop: `FLT_MAX` and
/// `-FLT_MAX` to start, strict comparisons).
fn min_max(xs: &[f32]) -> (f32, f32) {
    xs.iter().fold((f32::MAX, -f32::MAX), |(lo, hi), &v| (if v < lo { v } else { lo }, if v > hi { v } else { hi }))
}

/// Q4_1, Q5_0 and Q5_1 with ggml's reference rounding
/// (`quantize_row_q4_1_ref`, `quantize_row_q5_0_ref`,
/// `quantize_row_q5_1_ref`), block by block into `dst` (whole blocks,
/// sized by the caller):
///
/// ```text
/// Q4_1: d = (max - min) / 15, m = min    q = min(15, trunc((x - min) / d + 0.5))
/// Q5_0: d = max / -16 (max: the value     q = min(31, trunc(x / d + 16.5))
///       of largest |x|)
/// Q5_1: d = (max - min) / 31, m = min    q = trunc((x - min) / d + 0.5)
/// ```
///
/// `d` and `m` are stored as f16 and the values quantized with the f32
/// `1 / d`, as ggml does.
///
/// # Errors
/// [`Error::OutOfRange`] (`Weight`, the block's first index) for a block
/// whose `d` or `m` would overflow f16, before anything is written.
fn quantize_blocks(format: Format, w: &[f32], dst: &mut [u8]) -> Result<()> {
    let (_, size) = format.block();
    let fits = |v: f32| v.abs() < 65520.0;
    for (b, xs) in w.chunks_exact(QK).enumerate() {
        let ok = match format {
            Format::Q5_0 => fits(amax(xs).0 / 16.0),
            f => {
                let (lo, hi) = min_max(xs);
                fits(lo) && fits((hi - lo) / if f == Format::Q4_1 { 15.0 } else { 31.0 })
            }
        };
        if !ok {
            return Err(Error::OutOfRange { operand: Operand::Weight, index: b * QK });
        }
    }
    for (block, xs) in dst.chunks_exact_mut(size).zip(w.chunks_exact(QK)) {
        let (lo, hi) = xs.split_at(QK / 2);
        match format {
            Format::Q4_1 | Format::Q5_1 => {
                let (min, max) = min_max(xs);
                let levels = if format == Format::Q4_1 { 15.0 } else { 31.0 };
                let d = (max - min) / levels;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let (head, rest) = block.split_at_mut(4);
                let ([d0, d1], [m0, m1]) = (f32_to_f16(d).to_le_bytes(), f32_to_f16(min).to_le_bytes());
                head.copy_from_slice(&[d0, d1, m0, m1]);
                let q = |x: f32| ((x - min) * id + 0.5) as u8;
                if format == Format::Q4_1 {
                    for ((out, x0), x1) in rest.iter_mut().zip(lo).zip(hi) {
                        *out = q(*x0).min(15) | (q(*x1).min(15) << 4);
                    }
                } else {
                    five_bits(rest, lo, hi, q);
                }
            }
            _ => {
                let (_, max) = amax(xs);
                let d = max / -16.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let (head, rest) = block.split_at_mut(2);
                head.copy_from_slice(&f32_to_f16(d).to_le_bytes());
                five_bits(rest, lo, hi, |x| ((x * id + 16.5) as i8).min(31) as u8);
            }
        }
    }
    Ok(())
}

/// Q5's `qh:u32 | qs[16]`: the low nibbles of `q(lo[j])` and `q(hi[j])` in
/// byte `j`, their fifth bits at bits `j` and `j + 16` of `qh`.
fn five_bits(out: &mut [u8], lo: &[f32], hi: &[f32], q: impl Fn(f32) -> u8) {
    let (qh_bytes, qs) = out.split_at_mut(4);
    let mut qh = 0u32;
    for (j, ((byte, x0), x1)) in qs.iter_mut().zip(lo).zip(hi).enumerate() {
        let (a, b) = (q(*x0), q(*x1));
        *byte = (a & 0x0F) | ((b & 0x0F) << 4);
        qh |= u32::from((a & 0x10) >> 4) << j;
        qh |= u32::from((b & 0x10) >> 4) << (j + QK / 2);
    }
    qh_bytes.copy_from_slice(&qh.to_le_bytes());
}

/// The largest `|x - deq(quant(x))|` [`quantize`] allows for an element of
/// a group (the row for int8, the 32-block for Q8_0 and Q4_0, the element
/// itself for f16 and bf16) whose largest magnitude is `group_amax`:
///
/// ```text
/// f32:  0          f16: 2^-11 a + 2^-25      bf16: 2^-8 a
/// int8: s/2 + 2^-22 a + 2^-143               (s = a / 127)
/// Q8_0: d/2 + 127 e(d) + 2^-22 a             (d = a / 127, e(d) = max(2^-11 d, 2^-25): f16(d)'s error)
/// Q4_0: d + 8 e(d) + 2^-22 a                 (d = a / 8: the element opposite the extreme may clamp by one step)
/// ```
///
/// int8's `2^-143` is the floor a stored f32 scale sets: below f32's normal
/// range the scale's own rounding (at most `2^-150`), the clamp it can
/// cause (`127` times that) and the decode's rounding (`2^-150`) are
/// absolute, not relative, errors; a row of subnormals meets the bound
/// through it (a row whose `a / 127` underflows to 0 decodes to zeros, at
/// most `127 2^-150` away). Infinite for the formats without a quantizer.
pub fn error_bound(format: Format, group_amax: f32) -> f64 {
    let a = f64::from(group_amax);
    let u = |bits: i32| libm::ldexp(1.0, -bits);
    let e = |d: f64| (d * u(11)).max(u(25));
    match format {
        Format::F32 => 0.0,
        Format::F16 => a * u(11) + u(25),
        Format::Bf16 => a * u(8),
        Format::Int8 => a / 127.0 / 2.0 + a * u(22) + u(143),
        Format::Q8_0 => a / 127.0 / 2.0 + 127.0 * e(a / 127.0) + a * u(22),
        Format::Q4_0 => a / 8.0 + 8.0 * e(a / 8.0) + a * u(22),
        Format::Q5_0 => a / 16.0 + 16.0 * e(a / 16.0) + a * u(22),
        Format::Q4_1 => a / 15.0 + 15.0 * e(2.0 * a / 15.0) + e(a) + a * u(20),
        Format::Q5_1 => a / 31.0 + 31.0 * e(2.0 * a / 31.0) + e(a) + a * u(20),
        _ => f64::INFINITY,
    }
}
