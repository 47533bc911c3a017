//! Frozen matrices held in their stored format (f32, f16, bf16, int8,
//! or one of GGUF's block formats): read once from a checkpoint, multiplied in place through
//! [`Backend::stored_apply`](peft_core::Backend::stored_apply), never
//! widened to f32 whole.

use peft_core::storage::Owned;
use peft_core::storage::{Format, StoredWeight};

use crate::hf::HfError;
use crate::hf::base::Base;
use crate::hf::st::{BAD_BLOCK_SCALE, first_bad_block_scale, row_bytes};

/// Where a model's frozen tensors come from, asked for by their Hugging
/// Face names (`model.layers.0.self_attn.q_proj.weight`): a safetensors
/// checkpoint ([`Base`]) or a GGUF file
/// ([`GgufWeights`](super::gguf::GgufWeights)).
pub trait Source {
    /// The matrix `name`, which must be `[rows, cols]`.
    ///
    /// # Errors
    /// [`HfError::Base`] for a missing tensor or another shape;
    /// [`HfError::Unsupported`] for an element type the host does not
    /// read; I/O errors.
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, HfError>;

    /// The vector `name` (`[len]`) as f32.
    ///
    /// # Errors
    /// As [`Source::matrix`].
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, HfError>;

    /// Whether the checkpoint has a tensor `name`.
    fn contains(&self, name: &str) -> bool;
}

impl Source for Base {
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix, HfError> {
        Matrix::read(self, name, rows, cols)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>, HfError> {
        let (shard, e) = self.find(name).ok_or_else(|| HfError::Base(format!("{name} is missing")))?;
        if e.shape != [len] {
            return Err(HfError::Base(format!("{name} has shape {:?}, the config needs [{len}]", e.shape)));
        }
        self.shards[shard].read_f32(e)
    }

    fn contains(&self, name: &str) -> bool {
        self.find(name).is_some()
    }
}

/// A frozen matrix and its shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    /// The tensor's name in the checkpoint.
    pub name: String,
    /// Rows (`out`).
    pub rows: usize,
    /// Columns (`in`).
    pub cols: usize,
    /// The values.
    pub data: Owned,
}

impl Matrix {
    /// Reads the matrix `name` of `base`, which must be `[rows, cols]` in a
    /// float or quantized format.
    ///
    /// # Errors
    /// [`HfError::Base`] for a missing tensor or another shape;
    /// [`HfError::Unsupported`] for another element type; I/O errors.
    pub fn read(base: &Base, name: &str, rows: usize, cols: usize) -> Result<Self, HfError> {
        let (shard, e) = base.find(name).ok_or_else(|| HfError::Base(format!("{name} is missing")))?;
        if e.shape != [rows, cols] {
            return Err(HfError::Base(format!("{name} has shape {:?}, the config needs [{rows}, {cols}]", e.shape)));
        }
        let format = e.format().ok_or_else(|| HfError::Unsupported(format!("{name}: element type {:?}", e.dtype)))?;
        let st = &base.shards[shard];
        let mut bytes = vec![0u8; usize::try_from(e.len).map_err(|_| HfError::Base(format!("{name}: too large")))?];
        st.read_at(e, 0, &mut bytes)?;
        let data = match format {
            Format::Int8 => {
                let rb = row_bytes(Format::Int8, cols).unwrap_or(cols + 4);
                let (mut q, mut s) = (Vec::with_capacity(rows * cols), Vec::with_capacity(rows));
                for row in bytes.chunks_exact(rb) {
                    s.push(f32::from_le_bytes([row[0], row[1], row[2], row[3]]));
                    q.extend(row[4..].iter().map(|&b| b as i8));
                }
                peft_core::storage::check_int8_rows(&q, &s, cols)
                    .map_err(|error| HfError::InModule { module: name.to_string(), error })?;
                Owned::Int8(q, s)
            }
            f => return Self::from_bytes(name, rows, cols, f, bytes),
        };
        let m = Self { name: name.to_string(), rows, cols, data };
        m.view()?;
        Ok(m)
    }

    /// The matrix `name` `[rows, cols]` from its stored bytes in `format`
    /// (little-endian floats, or whole blocks), its block scales checked.
    ///
    /// # Errors
    /// [`HfError::Unsupported`] for int8 (whose rows carry their scales:
    /// [`Matrix::read`]); [`HfError::NonFinite`] for a block whose scale is
    /// not finite; [`HfError::Core`] for bytes that do not fill the shape.
    pub fn from_bytes(name: &str, rows: usize, cols: usize, format: Format, bytes: Vec<u8>) -> Result<Self, HfError> {
        let halves = |b: &[u8]| b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
        let data = match format {
            Format::F32 => {
                Owned::F32(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
            }
            Format::F16 => Owned::F16(halves(&bytes)),
            Format::Bf16 => Owned::Bf16(halves(&bytes)),
            Format::Q8_0 => Owned::Q8_0(bytes),
            Format::Q4_0 => Owned::Q4_0(bytes),
            Format::Int8 => return Err(HfError::Unsupported(format!("{name}: int8 from bare bytes"))),
            f => Owned::Blocks(f, bytes),
        };
        check_block_scales(name, &data)?;
        let m = Self { name: name.to_string(), rows, cols, data };
        m.view()?;
        Ok(m)
    }

    /// The stored weight, borrowed.
    ///
    /// # Errors
    /// [`HfError::Core`] if the values do not fill the shape (not after
    /// [`Matrix::read`], which checks).
    pub fn view(&self) -> Result<StoredWeight<'_>, HfError> {
        self.data.view(self.rows, self.cols).map_err(HfError::Core)
    }

    /// How the values are stored.
    pub fn format(&self) -> Format {
        self.data.format()
    }
}

/// `Ok` unless a block's f16 scale (or minimum) is NaN or infinite (read
/// once, when the matrix is loaded: every product would otherwise turn that
/// block's row into NaN). int8's scales are checked as the rows are read.
///
/// # Errors
/// [`HfError::NonFinite`] naming the tensor, the block's first element and
/// the scale.
fn check_block_scales(name: &str, data: &Owned) -> Result<(), HfError> {
    let (format, bytes) = match data {
        Owned::Q8_0(b) => (Format::Q8_0, b),
        Owned::Q4_0(b) => (Format::Q4_0, b),
        Owned::Blocks(f, b) => (*f, b),
        _ => return Ok(()),
    };
    match first_bad_block_scale(format, bytes) {
        Some((index, value)) => {
            Err(HfError::NonFinite { tensor: name.to_string(), index, value, cause: BAD_BLOCK_SCALE })
        }
        None => Ok(()),
    }
}
