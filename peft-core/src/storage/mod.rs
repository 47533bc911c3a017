//! Frozen weights stored as f32, f16, bf16, int8 rows or one of GGUF's
//! block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K,
//! Q6_K), read by every method through [`FrozenLinear`] without an f32
//! copy of `W`.
//!
//! | format | stored per row of `in` values | value |
//! |---|---|---|
//! | [`Format::F32`] | `in` f32 | `w` |
//! | [`Format::F16`] | `in` IEEE half (bits) | `w` |
//! | [`Format::Bf16`] | `in` bfloat16 (bits) | `w` |
//! | [`Format::Int8`] | `in` i8, one f32 scale per row | `q * scale` |
//! | [`Format::Q8_0`] | `in / 32` blocks of 34 bytes: f16 `d` (little-endian), 32 i8 | `q * d` |
//! | [`Format::Q4_0`] | `in / 32` blocks of 18 bytes: f16 `d`, 16 bytes of nibbles | `(nibble - 8) * d` |
//! | Q4_1, Q5_0, Q5_1 | `in / 32` blocks of 20, 22, 24 bytes | see [`ggml`] |
//! | Q2_K, Q3_K, Q4_K, Q5_K, Q6_K | `in / 256` blocks of 84, 110, 144, 176, 210 bytes | see [`ggml`] |
//!
//! Q8_0 and Q4_0 are GGUF's `block_q8_0` and `block_q4_0`, rows of blocks
//! in row-major order: in a Q4_0 block, byte `j` holds element `j` in its low
//! nibble and element `j + 16` in its high nibble. Every dequantized value
//! is exact in f32 (a half times an 8-bit integer), so "the f32 forward over
//! the dequantized `W`" is one well-defined oracle for every format. The
//! other block formats are decoded exactly as ggml decodes them (the same
//! f32 operations in the same order, [`ggml`]); their rows are
//! [`RowRef::Blocks`]. This crate reads them (from GGUF files) and
//! multiplies them in place; [`quantize()`] writes the first six formats.
//!
//! [`StoredLinear`] is the base: its products go through
//! [`Backend::stored_apply`] and [`Backend::stored_apply_transpose`], whose
//! provided versions are this module's portable kernels ([`apply`],
//! [`apply_transpose`]: a dot product per output, dequantizing on the fly,
//! no scratch, no heap); a backend with faster kernels overrides them. The
//! stored bytes are only ever read.
//!
//! [`quantize()`] has the quantizers from f32, with GGUF's reference
//! rounding (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`).
//!
//! ## IEEE binary16 and bfloat16 conversions on bits, without the `half`
//!
//! crate (`peft-core` needs them without its `half` feature: firmware
//! bases in f16 or bf16). Widening is exact; narrowing rounds to nearest,
//! ties to even, as F16C's `vcvtps2ph` and `half` do; NaN stays NaN.
//!
//! ## Quantizers from f32 into each [`Format`], with GGUF's reference
//!
//! rounding, and the error each guarantees.
//!
//! ```text
//! int8   per row:    s = amax / 127           q = round(x / s)           (x ~ q s)
//! Q8_0   per block:  d = amax / 127           q = round(x / d)           (x ~ q f16(d))
//! Q4_0   per block:  d = max / -8 (max: the   q = min(15, trunc(x / d + 8.5))   (x ~ (q - 8) f16(d))
//!                    value of largest |x|)
//! f16, bf16:         round to nearest, ties to even
//! ```
//!
//! `round` is half away from zero (C's `roundf`), and the Q formats keep
//! `f16(d)` while quantizing with the f32 `1 / d`, exactly as ggml's
//! `quantize_row_q8_0_ref` and `quantize_row_q4_0_ref`. A block or row
//! whose scale would not be finite in its storage (|x| above `65504 * 127`
//! for Q8_0) and non-finite inputs are refused.

pub mod ggml;
mod half;
mod quantize;

use crate::backend::{Accum, Backend, Outcome};
use crate::base::{FrozenLinear, Product};
use crate::element::Element;
use crate::error::{Error, Operand, Result, check_io, check_len, check_shape};
use crate::matrix::{MatMut, MatRef, checked_len};

pub use ggml::{QK_K, first_bad_block_scale};
pub use half::{bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16};
#[cfg(any(test, feature = "alloc"))]
pub use quantize::{Owned, OwnedWeight};
pub use quantize::{Quantized, error_bound, quantize};

/// Values per Q8_0 / Q4_0 block.
pub const QK: usize = 32;
/// Bytes of a Q8_0 block: an f16 scale and 32 i8.
pub const Q8_0_BYTES: usize = 34;
/// Bytes of a Q4_0 block: an f16 scale and 16 bytes of nibbles.
pub const Q4_0_BYTES: usize = 18;

/// How a frozen weight's values are stored (see the [module docs](self)).
/// The block formats keep GGUF's names (`Q4_K`, not `Q4K`).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// f32.
    F32,
    /// IEEE binary16, as bits.
    F16,
    /// bfloat16, as bits.
    Bf16,
    /// Symmetric int8 with one f32 scale per output row.
    Int8,
    /// GGUF Q8_0 blocks.
    Q8_0,
    /// GGUF Q4_0 blocks.
    Q4_0,
    /// GGUF Q4_1 blocks (read only).
    Q4_1,
    /// GGUF Q5_0 blocks (read only).
    Q5_0,
    /// GGUF Q5_1 blocks (read only).
    Q5_1,
    /// GGUF Q2_K super-blocks (read only).
    Q2_K,
    /// GGUF Q3_K super-blocks (read only).
    Q3_K,
    /// GGUF Q4_K super-blocks (read only).
    Q4_K,
    /// GGUF Q5_K super-blocks (read only).
    Q5_K,
    /// GGUF Q6_K super-blocks (read only).
    Q6_K,
}

impl Format {
    /// Every format, in the table's order.
    pub const ALL: [Format; 14] = [
        Format::F32,
        Format::F16,
        Format::Bf16,
        Format::Int8,
        Format::Q8_0,
        Format::Q4_0,
        Format::Q4_1,
        Format::Q5_0,
        Format::Q5_1,
        Format::Q2_K,
        Format::Q3_K,
        Format::Q4_K,
        Format::Q5_K,
        Format::Q6_K,
    ];

    /// The formats [`quantize()`] writes; the K-quants are read from files.
    pub const QUANTIZERS: [Format; 9] = [
        Format::F32,
        Format::F16,
        Format::Bf16,
        Format::Int8,
        Format::Q8_0,
        Format::Q4_0,
        Format::Q4_1,
        Format::Q5_0,
        Format::Q5_1,
    ];

    /// The lower-case name (`"f32"`, `"int8"`, `"q8_0"`, `"q4_k"`, ...:
    /// GGUF's type name in lower case).
    pub const fn name(self) -> &'static str {
        match self {
            Format::F32 => "f32",
            Format::F16 => "f16",
            Format::Bf16 => "bf16",
            Format::Int8 => "int8",
            Format::Q8_0 => "q8_0",
            Format::Q4_0 => "q4_0",
            Format::Q4_1 => "q4_1",
            Format::Q5_0 => "q5_0",
            Format::Q5_1 => "q5_1",
            Format::Q2_K => "q2_k",
            Format::Q3_K => "q3_k",
            Format::Q4_K => "q4_k",
            Format::Q5_K => "q5_k",
            Format::Q6_K => "q6_k",
        }
    }

    /// Whether values are quantized (int8 and the block formats) rather
    /// than floats.
    pub const fn is_quantized(self) -> bool {
        !matches!(self, Format::F32 | Format::F16 | Format::Bf16)
    }

    /// Whether [`quantize()`] writes this format (the K-quants' reference
    /// quantizers search scales with per-block scratch and live on the
    /// std side: `peft_faer::gguf::kquant`).
    pub const fn has_quantizer(self) -> bool {
        !matches!(self, Format::Q2_K | Format::Q3_K | Format::Q4_K | Format::Q5_K | Format::Q6_K)
    }

    /// `(values, bytes)` of one block: `(1, 4)` for f32, `(1, 2)` for the
    /// halves, `(1, 1)` for int8 (its scales are separate), `(32, ...)`
    /// for Q8_0 to Q5_1 and `(256, ...)` for the K-quants.
    pub const fn block(self) -> (usize, usize) {
        match self {
            Format::F32 => (1, 4),
            Format::F16 | Format::Bf16 => (1, 2),
            Format::Int8 => (1, 1),
            Format::Q8_0 => (QK, Q8_0_BYTES),
            Format::Q4_0 => (QK, Q4_0_BYTES),
            Format::Q4_1 => (QK, 20),
            Format::Q5_0 => (QK, 22),
            Format::Q5_1 => (QK, 24),
            Format::Q2_K => (QK_K, 84),
            Format::Q3_K => (QK_K, 110),
            Format::Q4_K => (QK_K, 144),
            Format::Q5_K => (QK_K, 176),
            Format::Q6_K => (QK_K, 210),
        }
    }

    /// Bytes one row of `cols` values takes (int8: the values only, the
    /// scale is separate); `None` on overflow or, for the block formats,
    /// `cols` not a multiple of the block ([`Format::block`]).
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        let (elems, bytes) = self.block();
        if !cols.is_multiple_of(elems) {
            return None;
        }
        (cols / elems).checked_mul(bytes)
    }
}

/// The stored values, borrowed.
#[derive(Clone, Copy, Debug)]
enum Data<'a> {
    F32(&'a [f32]),
    Half(&'a [u16]),
    Int8 { q: &'a [i8], scales: &'a [f32] },
    Blocks(&'a [u8]),
}

/// A frozen `W [out, in]` in one of the [`Format`]s, borrowed read-only
/// (flash, a memory map, a file's bytes).
#[derive(Clone, Copy, Debug)]
pub struct StoredWeight<'a> {
    format: Format,
    data: Data<'a>,
    out_features: usize,
    in_features: usize,
}

/// The error for block formats whose rows are not whole blocks.
const NOT_BLOCKS: Error = Error::InvalidParameter {
    name: "in_features",
    rule: "must be a multiple of the format's block (32 values; 256 for the K-quants)",
};

impl<'a> StoredWeight<'a> {
    fn new(format: Format, data: Data<'a>, out_features: usize, in_features: usize, len: usize) -> Result<Self> {
        let (elems, size) = format.block();
        let row = format.row_bytes(in_features).ok_or(if !in_features.is_multiple_of(elems) {
            NOT_BLOCKS
        } else {
            Error::Overflow
        })?;
        let per = if elems == 1 { size } else { 1 };
        check_len(Operand::Weight, out_features.checked_mul(row).ok_or(Error::Overflow)? / per, len)?;
        Ok(Self { format, data, out_features, in_features })
    }

    /// An f32 weight `[out, in]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Weight`), [`Error::Overflow`].
    pub fn f32(w: &'a [f32], out_features: usize, in_features: usize) -> Result<Self> {
        Self::new(Format::F32, Data::F32(w), out_features, in_features, w.len())
    }

    /// An f16 weight `[out, in]`, as IEEE half bits.
    ///
    /// # Errors
    /// As [`f32`](Self::f32).
    pub fn f16(bits: &'a [u16], out_features: usize, in_features: usize) -> Result<Self> {
        Self::new(Format::F16, Data::Half(bits), out_features, in_features, bits.len())
    }

    /// A bf16 weight `[out, in]`, as bits.
    ///
    /// # Errors
    /// As [`f32`](Self::f32).
    pub fn bf16(bits: &'a [u16], out_features: usize, in_features: usize) -> Result<Self> {
        Self::new(Format::Bf16, Data::Half(bits), out_features, in_features, bits.len())
    }

    /// An int8 weight `[out, in]` with one scale per row (`scales [out]`,
    /// finite): `w = q * scale`.
    ///
    /// # Errors
    /// As [`f32`](Self::f32); [`Error::ShapeMismatch`] (`Parameter`) for the
    /// scales; [`Error::NonFinite`] (`Parameter`) for a scale that is not
    /// finite.
    pub fn int8(q: &'a [i8], scales: &'a [f32], out_features: usize, in_features: usize) -> Result<Self> {
        check_len(Operand::Parameter, out_features, scales.len())?;
        if let Some(i) = scales.iter().position(|s| !s.is_finite()) {
            return Err(Error::NonFinite { operand: Operand::Parameter, index: i });
        }
        Self::new(Format::Int8, Data::Int8 { q, scales }, out_features, in_features, q.len())
    }

    /// Q8_0 blocks for `[out, in]` (`in` a multiple of 32; `out * in / 32 *
    /// 34` bytes).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`in_features`) for `in` not a multiple
    /// of 32; as [`f32`](Self::f32).
    pub fn q8_0(bytes: &'a [u8], out_features: usize, in_features: usize) -> Result<Self> {
        Self::new(Format::Q8_0, Data::Blocks(bytes), out_features, in_features, bytes.len())
    }

    /// Q4_0 blocks for `[out, in]` (`in` a multiple of 32; `out * in / 32 *
    /// 18` bytes).
    ///
    /// # Errors
    /// As [`q8_0`](Self::q8_0).
    pub fn q4_0(bytes: &'a [u8], out_features: usize, in_features: usize) -> Result<Self> {
        Self::new(Format::Q4_0, Data::Blocks(bytes), out_features, in_features, bytes.len())
    }

    /// Blocks of any of GGUF's block formats (Q8_0 to Q6_K) for
    /// `[out, in]`: `in` a multiple of the block's values, `out * in /
    /// values * bytes` bytes ([`Format::block`]).
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] (`format`) for f32, f16, bf16 and int8;
    /// as [`q8_0`](Self::q8_0).
    pub fn blocks(format: Format, bytes: &'a [u8], out_features: usize, in_features: usize) -> Result<Self> {
        if format.block().0 == 1 {
            return Err(Error::InvalidParameter { name: "format", rule: "must be a block format" });
        }
        Self::new(format, Data::Blocks(bytes), out_features, in_features, bytes.len())
    }

    /// The format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// Output features (rows).
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input features (columns).
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Bytes of stored data (int8: values and scales).
    pub fn stored_bytes(&self) -> usize {
        match self.data {
            Data::F32(w) => w.len() * 4,
            Data::Half(w) => w.len() * 2,
            Data::Int8 { q, scales } => q.len() + scales.len() * 4,
            Data::Blocks(b) => b.len(),
        }
    }

    /// The whole weight when it is stored as f32 (a backend multiplies it
    /// directly).
    pub fn as_f32(&self) -> Option<&'a [f32]> {
        match self.data {
            Data::F32(w) => Some(w),
            _ => None,
        }
    }

    /// Rows `start..end` of the weight as a weight of their own (`W[start..end,
    /// :]`, same format, borrowed): what a backend hands to each thread when
    /// it splits a product by output rows. `None` when the range is empty
    /// or past the end.
    pub fn rows(&self, start: usize, end: usize) -> Option<StoredWeight<'a>> {
        if start >= end || end > self.out_features {
            return None;
        }
        let n = self.in_features;
        let data = match self.data {
            Data::F32(w) => Data::F32(w.get(start.checked_mul(n)?..end.checked_mul(n)?)?),
            Data::Half(w) => Data::Half(w.get(start.checked_mul(n)?..end.checked_mul(n)?)?),
            Data::Int8 { q, scales } => {
                Data::Int8 { q: q.get(start.checked_mul(n)?..end.checked_mul(n)?)?, scales: scales.get(start..end)? }
            }
            Data::Blocks(b) => {
                let row = self.format.row_bytes(n)?;
                Data::Blocks(b.get(start.checked_mul(row)?..end.checked_mul(row)?)?)
            }
        };
        Some(StoredWeight { format: self.format, data, out_features: end - start, in_features: n })
    }

    /// The raw stored data of row `j`, as [`RowRef`]; `None` past the end.
    pub fn row(&self, j: usize) -> Option<RowRef<'a>> {
        let n = self.in_features;
        let range = |width: usize| j.checked_mul(width).and_then(|s| Some(s..s.checked_add(width)?));
        Some(match (self.format, self.data) {
            (Format::F32, Data::F32(w)) => RowRef::F32(w.get(range(n)?)?),
            (Format::F16, Data::Half(w)) => RowRef::F16(w.get(range(n)?)?),
            (Format::Bf16, Data::Half(w)) => RowRef::Bf16(w.get(range(n)?)?),
            (Format::Int8, Data::Int8 { q, scales }) => RowRef::Int8(q.get(range(n)?)?, *scales.get(j)?),
            (Format::Q8_0, Data::Blocks(b)) => RowRef::Q8_0(b.get(range(n / QK * Q8_0_BYTES)?)?),
            (Format::Q4_0, Data::Blocks(b)) => RowRef::Q4_0(b.get(range(n / QK * Q4_0_BYTES)?)?),
            (f, Data::Blocks(b)) => RowRef::Blocks(f, b.get(range(f.row_bytes(n)?)?)?),
            _ => return None,
        })
    }

    /// Row `j` dequantized into `dst [in]` (f32, exact).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Dst`) for `dst` of another length or `j`
    /// past the last row, before anything is written.
    pub fn dequantize_row(&self, j: usize, dst: &mut [f32]) -> Result<()> {
        check_len(Operand::Dst, self.in_features, dst.len())?;
        let row =
            self.row(j).ok_or(Error::ShapeMismatch { operand: Operand::Dst, expected: self.out_features, found: j })?;
        row.dequantize(dst);
        Ok(())
    }

    /// Element `(j, k)` dequantized (`None` out of range).
    pub fn get(&self, j: usize, k: usize) -> Option<f32> {
        if k >= self.in_features {
            return None;
        }
        self.row(j)?.get(k)
    }
}

/// One stored row, borrowed (what fast kernels read).
#[derive(Clone, Copy, Debug)]
pub enum RowRef<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// f16 bits.
    F16(&'a [u16]),
    /// bf16 bits.
    Bf16(&'a [u16]),
    /// int8 values and the row's scale.
    Int8(&'a [i8], f32),
    /// Q8_0 blocks.
    Q8_0(&'a [u8]),
    /// Q4_0 blocks.
    Q4_0(&'a [u8]),
    /// Blocks of another of GGUF's formats (Q4_1 to Q6_K), decoded by
    /// [`ggml::decode_block`].
    Blocks(Format, &'a [u8]),
}

/// A block's f16 scale as f32.
fn block_scale(block: &[u8]) -> f32 {
    match block {
        [lo, hi, ..] => half::f16_to_f32(u16::from_le_bytes([*lo, *hi])),
        _ => 0.0,
    }
}

impl RowRef<'_> {
    /// Element `k` dequantized (`None` past the row).
    pub fn get(&self, k: usize) -> Option<f32> {
        Some(match *self {
            RowRef::F32(w) => *w.get(k)?,
            RowRef::F16(w) => half::f16_to_f32(*w.get(k)?),
            RowRef::Bf16(w) => half::bf16_to_f32(*w.get(k)?),
            RowRef::Int8(q, s) => f32::from(*q.get(k)?) * s,
            RowRef::Q8_0(b) => {
                let block = b.get(k / QK * Q8_0_BYTES..)?;
                f32::from(*block.get(2 + k % QK)? as i8) * block_scale(block)
            }
            RowRef::Q4_0(b) => {
                let block = b.get(k / QK * Q4_0_BYTES..)?;
                let i = k % QK;
                let byte = *block.get(2 + i % (QK / 2))?;
                let nibble = if i < QK / 2 { byte & 0x0F } else { byte >> 4 };
                f32::from(i16::from(nibble) as i8 - 8) * block_scale(block)
            }
            RowRef::Blocks(f, b) => {
                let (elems, size) = f.block();
                let block = b.get(k / elems * size..)?.get(..size)?;
                ggml::element(f, block, k % elems)
            }
        })
    }

    /// The whole row into `dst` (which has the row's length).
    pub fn dequantize(&self, dst: &mut [f32]) {
        match *self {
            RowRef::F32(w) => dst.iter_mut().zip(w).for_each(|(d, v)| *d = *v),
            RowRef::F16(w) => dst.iter_mut().zip(w).for_each(|(d, v)| *d = half::f16_to_f32(*v)),
            RowRef::Bf16(w) => dst.iter_mut().zip(w).for_each(|(d, v)| *d = half::bf16_to_f32(*v)),
            RowRef::Int8(q, s) => dst.iter_mut().zip(q).for_each(|(d, v)| *d = f32::from(*v) * s),
            RowRef::Q8_0(b) => {
                for (out, block) in dst.chunks_exact_mut(QK).zip(b.chunks_exact(Q8_0_BYTES)) {
                    let d = block_scale(block);
                    out.iter_mut().zip(block.iter().skip(2)).for_each(|(o, q)| *o = f32::from(*q as i8) * d);
                }
            }
            RowRef::Q4_0(b) => {
                for (out, block) in dst.chunks_exact_mut(QK).zip(b.chunks_exact(Q4_0_BYTES)) {
                    let d = block_scale(block);
                    let (lo, hi) = out.split_at_mut(QK / 2);
                    for ((l, h), byte) in lo.iter_mut().zip(hi).zip(block.iter().skip(2)) {
                        *l = f32::from((byte & 0x0F) as i8 - 8) * d;
                        *h = f32::from((byte >> 4) as i8 - 8) * d;
                    }
                }
            }
            RowRef::Blocks(f, b) => {
                let (elems, size) = f.block();
                for (out, block) in dst.chunks_exact_mut(elems).zip(b.chunks_exact(size)) {
                    ggml::decode_block(f, block, out);
                }
            }
        }
    }

    /// Values `start..start + dst.len()` decoded into `dst` (for the block
    /// formats, `start` and the length are whole blocks; other ranges
    /// leave `dst` as it was).
    pub fn decode_range(&self, start: usize, dst: &mut [f32]) {
        let n = dst.len();
        let sub = |len: usize| start.checked_add(n).filter(|end| *end <= len).map(|end| start..end);
        let blocks_of = |elems: usize, bytes: usize| {
            let ok = start.is_multiple_of(elems) && n.is_multiple_of(elems);
            ok.then(|| start / elems * bytes..(start + n) / elems * bytes)
        };
        let blocks = |bytes: usize| blocks_of(QK, bytes);
        let part = match *self {
            RowRef::F32(w) => sub(w.len()).and_then(|r| w.get(r)).map(RowRef::F32),
            RowRef::F16(w) => sub(w.len()).and_then(|r| w.get(r)).map(RowRef::F16),
            RowRef::Bf16(w) => sub(w.len()).and_then(|r| w.get(r)).map(RowRef::Bf16),
            RowRef::Int8(q, s) => sub(q.len()).and_then(|r| q.get(r)).map(|q| RowRef::Int8(q, s)),
            RowRef::Q8_0(b) => blocks(Q8_0_BYTES).and_then(|r| b.get(r)).map(RowRef::Q8_0),
            RowRef::Q4_0(b) => blocks(Q4_0_BYTES).and_then(|r| b.get(r)).map(RowRef::Q4_0),
            RowRef::Blocks(f, b) => {
                let (elems, size) = f.block();
                blocks_of(elems, size).and_then(|r| b.get(r)).map(|b| RowRef::Blocks(f, b))
            }
        };
        if let Some(p) = part {
            p.dequantize(dst);
        }
    }

    /// `sum_k x_k w_k` in `E`'s accumulation type, `w_k` the dequantized
    /// (f32) value, decoded on the fly: value `k` is summed into lane
    /// `k mod 8` (eight independent sums, which the compiler vectorizes),
    /// the lanes added at the end. Every format runs one fused loop over
    /// chunks of eight values (no scratch), so the order, and so the
    /// result, does not depend on the format's block size.
    pub fn dot<E: Element>(&self, x: &[E]) -> E::Accum {
        let mut lanes = [<E::Accum as Element>::ZERO; 8];
        match *self {
            RowRef::F32(v) => dot_elements(&mut lanes, v, x, |w| w),
            RowRef::F16(v) => dot_elements(&mut lanes, v, x, half::f16_to_f32),
            RowRef::Bf16(v) => dot_elements(&mut lanes, v, x, half::bf16_to_f32),
            RowRef::Int8(q, s) => dot_elements(&mut lanes, q, x, |q| f32::from(q) * s),
            RowRef::Q8_0(b) => lanes = dot_q8_0(b, x),
            RowRef::Q4_0(b) => lanes = dot_q4_0(b, x),
            RowRef::Blocks(f, b) => lanes = dot_blocks(f, b, x),
        }
        lanes.iter().fold(<E::Accum as Element>::ZERO, |s, l| s + *l)
    }
}

/// [`RowRef::dot`] over Q8_0 blocks (out of line, as each block format:
/// one loop per function keeps each one's code generation its own).
#[inline(never)]
fn dot_q8_0<E: Element>(b: &[u8], x: &[E]) -> [E::Accum; 8] {
    let mut lanes = [<E::Accum as Element>::ZERO; 8];
    for (block, xs) in b.chunks_exact(Q8_0_BYTES).zip(x.chunks_exact(QK)) {
        if let [lo, hi, qs @ ..] = block {
            let d = half::f16_to_f32(u16::from_le_bytes([*lo, *hi]));
            dot_elements(&mut lanes, qs, xs, |q| f32::from(q as i8) * d);
        }
    }
    lanes
}

/// [`RowRef::dot`] over Q4_0 blocks.
#[inline(never)]
fn dot_q4_0<E: Element>(b: &[u8], x: &[E]) -> [E::Accum; 8] {
    let mut lanes = [<E::Accum as Element>::ZERO; 8];
    for (block, xs) in b.chunks_exact(Q4_0_BYTES).zip(x.chunks_exact(QK)) {
        if let ([lo, hi, qs @ ..], (xlo, xhi)) = (block, xs.split_at(QK / 2)) {
            let d = half::f16_to_f32(u16::from_le_bytes([*lo, *hi]));
            dot_elements(&mut lanes, qs, xlo, |q| f32::from((q & 0x0F) as i8 - 8) * d);
            dot_elements(&mut lanes, qs, xhi, |q| f32::from((q >> 4) as i8 - 8) * d);
        }
    }
    lanes
}

/// [`RowRef::dot`] over GGUF's other block formats: each block decoded on
/// the stack (1 KiB), then dotted. Kept out of line so that the other
/// formats' loops do not carry its stack array.
#[inline(never)]
fn dot_blocks<E: Element>(f: Format, b: &[u8], x: &[E]) -> [E::Accum; 8] {
    let mut lanes = [<E::Accum as Element>::ZERO; 8];
    let (elems, size) = f.block();
    let mut w = [0.0f32; QK_K];
    for (block, xs) in b.chunks_exact(size).zip(x.chunks_exact(elems)) {
        if let Some(w) = w.get_mut(..elems) {
            ggml::decode_block(f, block, w);
            dot_elements(&mut lanes, w, xs, |v| v);
        }
    }
    lanes
}

/// `lanes[k mod 8] += decode(v_k) x_k` over `k < min(len v, len x)`,
/// starting at lane 0 (callers pass runs whose length is a multiple of 8
/// before the last): chunks of eight values, each a fixed-size loop.
#[inline(always)]
fn dot_elements<T: Copy, E: Element>(lanes: &mut [E::Accum; 8], v: &[T], x: &[E], decode: impl Fn(T) -> f32) {
    let a = |w: f32| <E::Accum as Element>::from_f64(f64::from(w));
    let mut acc = *lanes;
    let (mut vc, mut xc) = (v.chunks_exact(8), x.chunks_exact(8));
    for (vs, xs) in (&mut vc).zip(&mut xc) {
        if let (Ok(vs), Ok(xs)) = (<&[T; 8]>::try_from(vs), <&[E; 8]>::try_from(xs)) {
            // Decoded whole first: a fixed-size map the compiler vectorizes.
            let w = vs.map(|v| a(decode(v)));
            for ((l, w), xv) in acc.iter_mut().zip(w).zip(xs) {
                *l += w * xv.to_accum();
            }
        }
    }
    for ((l, w), xv) in acc.iter_mut().zip(vc.remainder()).zip(xc.remainder()) {
        *l += a(decode(*w)) * xv.to_accum();
    }
    *lanes = acc;
}

/// A frozen linear layer `y = x deq(W)^T + b` over a [`StoredWeight`], with
/// an optional bias in the element type.
#[derive(Clone, Copy, Debug)]
pub struct StoredLinear<'a, E> {
    weight: StoredWeight<'a>,
    bias: Option<&'a [E]>,
}

impl<'a, E: Element> StoredLinear<'a, E> {
    /// The layer over `weight`, without a bias.
    pub fn new(weight: StoredWeight<'a>) -> Self {
        Self { weight, bias: None }
    }

    /// The same layer with a bias `[out]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Bias`).
    pub fn with_bias(mut self, bias: &'a [E]) -> Result<Self> {
        check_len(Operand::Bias, self.weight.out_features, bias.len())?;
        self.bias = Some(bias);
        Ok(self)
    }

    /// The stored weight.
    pub fn weight(&self) -> &StoredWeight<'a> {
        &self.weight
    }
}

impl<E: Element> FrozenLinear<E> for StoredLinear<'_, E> {
    fn in_features(&self) -> usize {
        self.weight.in_features
    }

    fn out_features(&self) -> usize {
        self.weight.out_features
    }

    fn bias(&self) -> Option<&[E]> {
        self.bias
    }

    fn run_apply<B: Backend<E> + ?Sized>(&self, backend: &B, p: Product<'_, E>) -> Outcome<E, B> {
        backend.stored_apply(&self.weight, p)
    }

    fn run_apply_transpose<B: Backend<E> + ?Sized>(&self, backend: &B, p: Product<'_, E>) -> Outcome<E, B> {
        backend.stored_apply_transpose(&self.weight, p)
    }

    fn rows_scratch_len(&self, _n: usize) -> usize {
        0
    }

    fn rows<B: Backend<E> + ?Sized>(
        &self,
        _backend: &B,
        start: usize,
        mut dst: MatMut<'_, E>,
        _scratch: &mut [E],
    ) -> Outcome<E, B> {
        let w = &self.weight;
        check_shape(Operand::Dst, dst.rows(), dst.cols(), dst.rows(), w.in_features)?;
        if start.checked_add(dst.rows()).is_none_or(|end| end > w.out_features) {
            return Err(Error::ShapeMismatch { operand: Operand::Dst, expected: w.out_features, found: start }.into());
        }
        for (i, out) in dst.row_iter_mut().enumerate() {
            let row = w.row(start + i).ok_or(Error::Overflow)?;
            for (k, o) in out.iter_mut().enumerate() {
                *o = E::from_f64(f64::from(row.get(k).unwrap_or(0.0)));
            }
        }
        Ok(())
    }
}

/// The portable `y (=|+=) x deq(W)^T`: one dot product per output element,
/// dequantizing on the fly ([`RowRef::dot`]), rounded once. No scratch.
///
/// # Errors
/// [`Error::ShapeMismatch`] (`Input`, `Output`) before anything is written.
pub fn apply<E: Element>(w: &StoredWeight<'_>, x: MatRef<'_, E>, mut y: MatMut<'_, E>, accum: Accum) -> Result<()> {
    check_io(x.rows(), x.cols(), w.in_features, Operand::Output, y.rows(), y.cols(), w.out_features)?;
    for (t, yr) in y.row_iter_mut().enumerate() {
        let xr = x.row(t);
        for (j, v) in yr.iter_mut().enumerate() {
            let dot = w.row(j).map_or(<E::Accum as Element>::ZERO, |r| r.dot(xr));
            accum.store(v, dot);
        }
    }
    Ok(())
}

/// The portable `grad_x (=|+=) grad_y deq(W)`: each element
/// `sum_j g_tj W_jk` in the accumulation type, rounded once (column reads
/// through [`RowRef::get`]). No scratch.
///
/// # Errors
/// [`Error::ShapeMismatch`] (`GradOutput`, `GradInput`) before anything is
/// written.
pub fn apply_transpose<E: Element>(
    w: &StoredWeight<'_>,
    grad_y: MatRef<'_, E>,
    mut grad_x: MatMut<'_, E>,
    accum: Accum,
) -> Result<()> {
    let t = grad_y.rows();
    check_shape(Operand::GradOutput, t, grad_y.cols(), t, w.out_features)?;
    check_shape(Operand::GradInput, grad_x.rows(), grad_x.cols(), t, w.in_features)?;
    let a = |v: f32| <E::Accum as Element>::from_f64(f64::from(v));
    for (ti, gx) in grad_x.row_iter_mut().enumerate() {
        let gy = grad_y.row(ti);
        for (k, v) in gx.iter_mut().enumerate() {
            let mut acc = <E::Accum as Element>::ZERO;
            for (j, g) in gy.iter().enumerate() {
                acc += g.to_accum() * a(w.get(j, k).unwrap_or(0.0));
            }
            accum.store(v, acc);
        }
    }
    Ok(())
}

/// `W` dequantized whole into `dst [out, in]` (for tests and merges; the
/// passes never do this).
///
/// # Errors
/// [`Error::ShapeMismatch`] (`Dst`).
pub fn dequantize(w: &StoredWeight<'_>, dst: &mut [f32]) -> Result<()> {
    check_len(Operand::Dst, checked_len(w.out_features, w.in_features)?, dst.len())?;
    for (j, out) in dst.chunks_exact_mut(w.in_features.max(1)).enumerate().take(w.out_features) {
        w.dequantize_row(j, out)?;
    }
    Ok(())
}

/// `Ok` when every row of an int8 matrix decodes to finite values: row `j`
/// of `q [rows, cols]` (`rows = scales.len()`) has a finite scale and
/// `max_k |q[j, k]| * |scales[j]|` does not overflow f32. A file's bytes
/// can hold any scale and `-128`, which [`quantize()`] never writes (it
/// keeps `127 |s|` finite), so the readers of files check this once when
/// a matrix is loaded; [`StoredWeight::int8`], built on every product,
/// checks only that the scales are finite.
///
/// # Errors
/// [`Error::ShapeMismatch`] (`Parameter`) unless `q.len() == rows * cols`;
/// [`Error::NonFinite`] (`Parameter`, the row) for a NaN or infinite scale;
/// [`Error::OutOfRange`] (`Parameter`, the row) for a row whose largest
/// value overflows.
pub fn check_int8_rows(q: &[i8], scales: &[f32], cols: usize) -> Result<()> {
    check_len(Operand::Parameter, checked_len(scales.len(), cols)?, q.len())?;
    for (j, (&s, row)) in scales.iter().zip(q.chunks(cols.max(1))).enumerate() {
        if !s.is_finite() {
            return Err(Error::NonFinite { operand: Operand::Parameter, index: j });
        }
        let largest = row.iter().map(|&v| i16::from(v).unsigned_abs()).max().unwrap_or(0);
        if !(f32::from(largest) * s).is_finite() {
            return Err(Error::OutOfRange { operand: Operand::Parameter, index: j });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
