//! safetensors files: checked headers, chunked reads, streaming writes.
//!
//! The header is read with plain reads (at most [`MAX_HEADER_BYTES`], never
//! the data) and checked here, so that every error names the file and the
//! tensor: a JSON object whose keys are unique (a JSON map would silently
//! keep the last of two), each tensor's `dtype`, `shape` and
//! `data_offsets`, element counts that fit the byte ranges, ranges that
//! tile the data from 0 without gap or overlap, and a file exactly as long
//! as the header says. Tensor data is then read with positioned reads in
//! bounded chunks, so a merge never holds more than one chunk of a large
//! tensor in memory. Nothing here needs a platform-specific API.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use peft_core::storage::{Format, RowRef, StoredWeight};
use safetensors::Dtype;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use super::HfError;

/// The most tensors one file's header may list (2^18; the largest real
/// shards hold thousands): a header of a million tiny entries fits in
/// [`MAX_HEADER_BYTES`] but would take gigabytes once parsed, so the
/// reader stops at this count.
pub const MAX_TENSORS: usize = 1 << 18;

/// The largest header accepted (the `safetensors` crate's own limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The `__metadata__` key prefix that marks a quantized tensor (see the
/// [module docs](self)): `peft.storage.` + the tensor's name.
pub const STORAGE_KEY: &str = "peft.storage.";

/// One tensor of a file: where its bytes are.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions (for a quantized tensor, the matrix's: `[rows, cols]`).
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Bytes of data.
    pub len: u64,
    /// For a quantized matrix, its format (int8 or a block format; `dtype` is
    /// then `U8`); `None` for a plain tensor.
    pub quant: Option<Format>,
}

impl Entry {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// How the values are stored: the quantized format, or F32, F16 or
    /// BF16 as [`Format::F32`], [`Format::F16`], [`Format::Bf16`]; `None`
    /// for any other element type (integers, f64, ...).
    pub fn format(&self) -> Option<Format> {
        self.quant.or_else(|| float_format(self.dtype))
    }
}

/// The [`Format`] of a float element type (F32, F16, BF16).
pub fn float_format(d: Dtype) -> Option<Format> {
    match d {
        Dtype::F32 => Some(Format::F32),
        Dtype::F16 => Some(Format::F16),
        Dtype::BF16 => Some(Format::Bf16),
        _ => None,
    }
}

/// The element type of a float [`Format`]; `U8` for the quantized ones.
pub fn format_dtype(f: Format) -> Dtype {
    match f {
        Format::F32 => Dtype::F32,
        Format::F16 => Dtype::F16,
        Format::Bf16 => Dtype::BF16,
        _ => Dtype::U8,
    }
}

/// Bytes a file stores per row of `cols` values in format `f` (int8: the
/// scale's 4 bytes and `cols` i8; see the [module docs](self)). `None` on
/// overflow, or for Q8_0 and Q4_0 with `cols` not a multiple of 32.
pub fn row_bytes(f: Format, cols: usize) -> Option<usize> {
    match f {
        Format::Int8 => cols.checked_add(4),
        _ => f.row_bytes(cols),
    }
}

/// Whether a matrix of `shape` can be stored in format `f`: any tensor
/// for the float formats; for the quantized ones a matrix `[rows, cols]`
/// (block formats: `cols` whole blocks).
pub fn fits(f: Format, shape: &[usize]) -> bool {
    match (f, shape) {
        (Format::F32 | Format::F16 | Format::Bf16, _) => true,
        (_, &[_, cols]) => row_bytes(f, cols).is_some(),
        _ => false,
    }
}

/// The stored bytes of a tensor of `shape` in format `f`.
fn stored_bytes(f: Format, shape: &[usize]) -> u64 {
    match (f, shape) {
        (f, &[rows, cols]) if f.is_quantized() => rows as u64 * row_bytes(f, cols).unwrap_or(0) as u64,
        _ => shape.iter().product::<usize>() as u64 * format_dtype(f).size() as u64,
    }
}

/// The logical description of a quantized tensor, as the metadata holds it.
#[derive(Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct QuantInfo {
    format: String,
    shape: Vec<usize>,
}

/// Applies the [`STORAGE_KEY`] entries of `metadata` to `entries`
/// (removing them from `metadata`): each must name a `U8` tensor whose
/// stored shape is `[rows, row_bytes(format, cols)]` for its logical
/// `[rows, cols]`.
fn apply_storage(
    entries: &mut [Entry],
    metadata: &mut BTreeMap<String, String>,
    bad: impl Fn(String) -> HfError,
) -> Result<(), HfError> {
    let keys: Vec<String> = metadata.keys().filter(|k| k.starts_with(STORAGE_KEY)).cloned().collect();
    if keys.is_empty() {
        return Ok(());
    }
    let by_name: HashMap<&str, usize> = entries.iter().enumerate().map(|(i, e)| (e.name.as_str(), i)).collect();
    let mut found = Vec::with_capacity(keys.len());
    for key in keys {
        let value = metadata.remove(&key).unwrap_or_default();
        let name = &key[STORAGE_KEY.len()..];
        let info: QuantInfo = serde_json::from_str(&value)
            .map_err(|e| bad(format!("tensor {name:?}: metadata `{key}`: {e} (want {{\"format\", \"shape\"}})")))?;
        let format = match Format::ALL.into_iter().find(|f| f.is_quantized() && f.name() == info.format) {
            Some(f) => f,
            None => {
                let other = &info.format;
                return Err(bad(format!(
                    "tensor {name:?}: unknown storage format {other:?} (int8, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k)"
                )));
            }
        };
        let &i = by_name.get(name).ok_or_else(|| bad(format!("metadata `{key}` names no tensor of the file")))?;
        let e = &entries[i];
        let want = match info.shape.as_slice() {
            &[rows, cols] => row_bytes(format, cols).map(|rb| vec![rows, rb]),
            _ => None,
        };
        if e.dtype != Dtype::U8 || want.as_deref() != Some(e.shape.as_slice()) {
            return Err(bad(format!(
                "tensor {name:?}: stored as {:?} {:?}, but {} {:?} is U8 [rows, row bytes] (block formats: cols \
                 whole blocks of 32, or 256 for the K-quants)",
                e.dtype, e.shape, info.format, info.shape
            )));
        }
        found.push((i, format, info.shape));
    }
    for (i, format, shape) in found {
        entries[i].quant = Some(format);
        entries[i].shape = shape;
    }
    Ok(())
}

/// An open, checked safetensors file.
#[derive(Debug)]
pub struct StFile {
    /// Where it is.
    pub path: PathBuf,
    file: File,
    /// The tensors in data order (the order they are stored in).
    pub entries: Vec<Entry>,
    /// Tensor name to its position in `entries`.
    by_name: HashMap<String, usize>,
    /// The `__metadata__` map.
    pub metadata: BTreeMap<String, String>,
}

/// One tensor's header entry, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInfo {
    dtype: Dtype,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// The header's tensors (in file order) and metadata, duplicates refused.
struct RawHeader {
    tensors: Vec<(String, RawInfo)>,
    metadata: BTreeMap<String, String>,
}

struct HeaderVisitor;

impl<'de> Visitor<'de> for HeaderVisitor {
    type Value = RawHeader;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object of tensors")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = RawHeader { tensors: Vec::new(), metadata: BTreeMap::new() };
        let mut has_metadata = false;
        while let Some(k) = map.next_key::<String>()? {
            if k == "__metadata__" {
                if std::mem::replace(&mut has_metadata, true) {
                    return Err(de::Error::custom("`__metadata__` appears twice"));
                }
                out.metadata = map
                    .next_value::<BTreeMap<String, String>>()
                    .map_err(|e| de::Error::custom(format!("`__metadata__`: {e}")))?;
                continue;
            }
            if out.tensors.len() >= MAX_TENSORS {
                return Err(de::Error::custom(format!(
                    "more than {MAX_TENSORS} tensors (a file with more is refused before they are all held)"
                )));
            }
            let info = map.next_value::<RawInfo>().map_err(|e| de::Error::custom(format!("tensor {k:?}: {e}")))?;
            out.tensors.push((k, info));
        }
        Ok(out)
    }
}

/// A checked safetensors header.
#[derive(Clone, Debug)]
pub struct Header {
    /// The tensors, in data order.
    pub entries: Vec<Entry>,
    /// Its `__metadata__` (without this crate's storage keys).
    pub metadata: BTreeMap<String, String>,
}

/// Checks the header of the safetensors file `path`: `json` is its text,
/// `file_len` the whole file's length (8-byte length prefix, header,
/// data). Reads nothing: the file system is not touched.
///
/// # Errors
/// [`HfError::DuplicateKey`]; [`HfError::Safetensors`] naming the tensor at
/// fault: invalid JSON, an unknown field or dtype, a shape whose byte size
/// overflows or differs from its range, ranges that leave a gap, overlap,
/// or do not end where the file does, a [`STORAGE_KEY`] entry that is not
/// valid JSON, names an unknown format or tensor, or does not match the
/// tensor's type and shape. The storage keys are consumed: the metadata
/// returned holds the others.
pub fn parse_header(path: &Path, json: &[u8], file_len: u64) -> Result<Header, HfError> {
    let bad = |msg: String| HfError::Safetensors(path.to_path_buf(), msg);
    let raw = serde_json::Deserializer::from_slice(json)
        .deserialize_map(HeaderVisitor)
        .map_err(|e| bad(format!("header: {e}")))?;
    let mut seen = std::collections::HashSet::with_capacity(raw.tensors.len());
    if let Some((k, _)) = raw.tensors.iter().find(|(k, _)| !seen.insert(k.as_str())) {
        return Err(HfError::DuplicateKey(path.to_path_buf(), k.clone()));
    }
    let data_start = 8 + json.len() as u64;
    let mut entries = Vec::with_capacity(raw.tensors.len());
    for (name, info) in raw.tensors {
        let (begin, end) = info.data_offsets;
        let numel = info.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d as u64));
        let bytes = numel.and_then(|n| n.checked_mul(info.dtype.size() as u64));
        if end < begin || bytes != Some(end - begin) {
            return Err(bad(format!(
                "tensor {name:?}: {:?} {:?} does not fill data_offsets [{begin}, {end}]",
                info.dtype, info.shape
            )));
        }
        usize::try_from(numel.unwrap_or(u64::MAX))
            .map_err(|_| bad(format!("tensor {name:?}: too many elements for this machine")))?;
        let offset = data_start.checked_add(begin).ok_or_else(|| bad(format!("tensor {name:?}: offset overflows")))?;
        entries.push(Entry { name, dtype: info.dtype, shape: info.shape, offset, len: end - begin, quant: None });
    }
    entries.sort_by_key(|e| e.offset);
    let mut at = data_start;
    for e in &entries {
        if e.offset != at {
            let what = if e.offset > at { "a gap before" } else { "an overlap at" };
            return Err(bad(format!("{what} tensor {:?} (data_offsets begin at {})", e.name, e.offset - data_start)));
        }
        at += e.len;
    }
    if at != file_len {
        return Err(bad(format!(
            "the header describes {} bytes of data, the file holds {}",
            at - data_start,
            file_len.saturating_sub(data_start)
        )));
    }
    let mut metadata = raw.metadata;
    apply_storage(&mut entries, &mut metadata, bad)?;
    Ok(Header { entries, metadata })
}

/// The size of one element, for the float types a merge computes in.
pub fn float_size(d: Dtype) -> Option<usize> {
    match d {
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
        _ => None,
    }
}

/// Widens little-endian `bytes` of type `d` into `out` (same count).
pub fn to_f32(d: Dtype, bytes: &[u8], out: &mut [f32]) -> Result<(), HfError> {
    let size = float_size(d).ok_or_else(|| unsupported(d))?;
    // Fast path: aligned little-endian halves, converted with `half`'s
    // slice conversions (F16C / SIMD where the CPU has them).
    if cfg!(target_endian = "little") && out.len() * 2 == bytes.len() {
        let done = match d {
            Dtype::F16 => bytemuck::try_cast_slice::<u8, f16>(bytes).map(|h| h.convert_to_f32_slice(out)).is_ok(),
            Dtype::BF16 => bytemuck::try_cast_slice::<u8, bf16>(bytes).map(|h| h.convert_to_f32_slice(out)).is_ok(),
            _ => false,
        };
        if done {
            return Ok(());
        }
    }
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(size)) {
        *o = match d {
            Dtype::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            Dtype::F16 => f16::from_le_bytes([c[0], c[1]]).to_f32(),
            _ => bf16::from_le_bytes([c[0], c[1]]).to_f32(),
        };
    }
    Ok(())
}

fn unsupported(d: Dtype) -> HfError {
    HfError::Unsupported(format!("element type {d:?} (need F32, F16 or BF16)"))
}

/// The range of an integer element type that index tensors use (U8, I16,
/// I32, I64), or `None`.
fn index_range(d: Dtype) -> Option<(f32, f32)> {
    match d {
        Dtype::U8 => Some((0.0, 255.0)),
        Dtype::I16 => Some((-32768.0, 32767.0)),
        Dtype::I32 | Dtype::I64 => Some((f32::MIN, f32::MAX)),
        _ => None,
    }
}

/// Rounds `vals` once (to nearest, ties to even) to type `d`, appending the
/// little-endian bytes to `out`. The integer types index tensors use (U8,
/// I16, I32, I64) take integers in their range (index tensors held as f32,
/// exact below 2^24) and refuse any other value.
pub fn from_f32(d: Dtype, vals: &[f32], out: &mut Vec<u8>) -> Result<(), HfError> {
    if let Some((min, max)) = index_range(d) {
        for &v in vals {
            if v.fract() != 0.0 || v < min || v > max || v.abs() >= (1 << 24) as f32 {
                return Err(HfError::Unsupported(format!("{v} as a {d:?} index (integers below 2^24)")));
            }
            match d {
                Dtype::U8 => out.push(v as u8),
                Dtype::I16 => out.extend_from_slice(&(v as i16).to_le_bytes()),
                Dtype::I32 => out.extend_from_slice(&(v as i32).to_le_bytes()),
                _ => out.extend_from_slice(&(v as i64).to_le_bytes()),
            }
        }
        return Ok(());
    }
    float_size(d).ok_or_else(|| unsupported(d))?;
    if cfg!(target_endian = "little") && matches!(d, Dtype::F16 | Dtype::BF16) {
        let start = out.len();
        out.resize(start + 2 * vals.len(), 0);
        if let Ok(h) = bytemuck::try_cast_slice_mut::<u8, u16>(&mut out[start..]) {
            if d == Dtype::F16 {
                bytemuck::cast_slice_mut::<u16, f16>(h).convert_from_f32_slice(vals);
            } else {
                bytemuck::cast_slice_mut::<u16, bf16>(h).convert_from_f32_slice(vals);
            }
            return Ok(());
        }
        out.truncate(start);
    }
    for &v in vals {
        match d {
            Dtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
            Dtype::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
            _ => out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
        }
    }
    Ok(())
}

/// Decodes whole rows of `cols` values stored as `f` (`bytes`: the rows as
/// a file stores them, see [`row_bytes`]) into `out` (`rows * cols`).
///
/// # Errors
/// [`HfError::Core`] if the lengths disagree; for an int8 row whose scale
/// is not finite or would overflow its largest value
/// ([`peft_core::storage::check_int8_rows`], the row's index in `bytes`);
/// [`HfError::NonFinite`] (no tensor name: the caller's to add) for a
/// block whose scale is not finite ([`first_bad_block_scale`]).
pub fn decode_rows(f: Format, bytes: &[u8], cols: usize, out: &mut [f32]) -> Result<(), HfError> {
    let rb = row_bytes(f, cols).ok_or(HfError::Core(peft_core::Error::Overflow))?;
    let rows = bytes.len() / rb.max(1);
    if rows * rb != bytes.len() || rows * cols != out.len() {
        return Err(HfError::Core(peft_core::Error::ShapeMismatch {
            operand: peft_core::Operand::Dst,
            expected: rows * cols,
            found: out.len(),
        }));
    }
    match f {
        Format::F32 | Format::F16 | Format::Bf16 => to_f32(format_dtype(f), bytes, out),
        Format::Int8 => {
            for (j, (row, dst)) in bytes.chunks_exact(rb).zip(out.chunks_exact_mut(cols.max(1))).enumerate() {
                let (scale, q) = row.split_at(4);
                let scale = [f32::from_le_bytes([scale[0], scale[1], scale[2], scale[3]])];
                let q: &[i8] = bytemuck::cast_slice(q);
                // A scale or a -128 that would decode to an infinity is refused, naming the row.
                peft_core::storage::check_int8_rows(q, &scale, cols).map_err(|e| HfError::Core(at_row(e, j)))?;
                RowRef::Int8(q, scale[0]).dequantize(dst);
            }
            Ok(())
        }
        _ => {
            if let Some((index, value)) = first_bad_block_scale(f, bytes) {
                return Err(HfError::NonFinite { tensor: String::new(), index, value, cause: BAD_BLOCK_SCALE });
            }
            peft_core::storage::dequantize(&StoredWeight::blocks(f, bytes, rows, cols)?, out).map_err(HfError::Core)
        }
    }
}

/// Why a block is refused ([`first_bad_block_scale`]).
pub const BAD_BLOCK_SCALE: &str = "the scale of the block it starts is not finite";

pub use peft_core::storage::first_bad_block_scale;

/// `e` with its row index moved by `first` (an int8 scale's error from a
/// block of rows that starts at row `first`).
fn at_row(e: peft_core::Error, first: usize) -> peft_core::Error {
    use peft_core::Error::{NonFinite, OutOfRange};
    match e {
        NonFinite { operand, index } => NonFinite { operand, index: index + first },
        OutOfRange { operand, index } => OutOfRange { operand, index: index + first },
        e => e,
    }
}

/// Encodes `vals` (whole rows of `cols` values) in format `f`, appending
/// the bytes a file stores (see [`row_bytes`]) to `out`: floats rounded
/// once to nearest, quantized formats with GGUF's reference rounding
/// ([`peft_core::storage::quantize()`]).
///
/// # Errors
/// [`HfError::Core`]: lengths that are not whole rows, `cols` not a
/// multiple of 32 for Q8_0 and Q4_0, a non-finite value for a quantized
/// format ([`peft_core::Error::NonFinite`] with its index in `vals`).
pub fn encode_rows(f: Format, vals: &[f32], cols: usize, out: &mut Vec<u8>) -> Result<(), HfError> {
    use peft_core::storage::{Quantized, quantize};
    let rows = vals.len() / cols.max(1);
    let rb = row_bytes(f, cols).ok_or(HfError::Core(peft_core::Error::Overflow))?;
    let start = out.len();
    match f {
        Format::F32 | Format::F16 | Format::Bf16 => return from_f32(format_dtype(f), vals, out),
        Format::Int8 => {
            let mut q = vec![0i8; vals.len()];
            let mut scales = vec![0f32; rows];
            quantize(vals, rows, cols, Quantized::Int8(&mut q, &mut scales))?;
            out.reserve(rows * rb);
            for (s, row) in scales.iter().zip(q.chunks_exact(cols.max(1))) {
                out.extend_from_slice(&s.to_le_bytes());
                out.extend_from_slice(bytemuck::cast_slice(row));
            }
        }
        f if crate::gguf::kquant::has_quantizer(f) => {
            if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
                return Err(HfError::Core(peft_core::Error::NonFinite {
                    operand: peft_core::Operand::Weight,
                    index: i,
                }));
            }
            crate::gguf::kquant::quantize_rows(f, vals, cols, out).ok_or(HfError::Core(
                peft_core::Error::InvalidParameter {
                    name: "in_features",
                    rule: "must be whole 256-value super-blocks",
                },
            ))?;
        }
        _ => {
            out.resize(start + rows * rb, 0);
            let dst = &mut out[start..];
            let q = match f {
                Format::Q8_0 => Quantized::Q8_0(dst),
                Format::Q4_0 => Quantized::Q4_0(dst),
                // The K-quants are refused here, by `quantize`.
                f => Quantized::Blocks(f, dst),
            };
            quantize(vals, rows, cols, q).inspect_err(|_| out.truncate(start))?;
        }
    }
    Ok(())
}

impl StFile {
    /// Opens and checks `path` (see [`parse_header`]).
    ///
    /// # Errors
    /// [`HfError::Io`], also for a path that is not a regular file;
    /// [`HfError::Safetensors`] for a truncated file, a header over
    /// [`MAX_HEADER_BYTES`] or one [`parse_header`] refuses;
    /// [`HfError::DuplicateKey`].
    pub fn open(path: &Path) -> Result<Self, HfError> {
        let io = |e| HfError::Io(path.to_path_buf(), e);
        let bad = |msg: String| HfError::Safetensors(path.to_path_buf(), msg);
        crate::files::regular_file(path)?;
        let mut file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < 8 {
            return Err(bad(format!("{len} bytes: shorter than the 8-byte header length")));
        }
        let mut n8 = [0u8; 8];
        file.read_exact(&mut n8).map_err(io)?;
        let n = u64::from_le_bytes(n8);
        if n > MAX_HEADER_BYTES || n + 8 > len {
            return Err(bad(format!("header of {n} bytes in a file of {len}")));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(io)?;
        let Header { entries, metadata } = parse_header(path, &header, len)?;
        let by_name = entries.iter().enumerate().map(|(i, e)| (e.name.clone(), i)).collect();
        Ok(Self { path: path.to_path_buf(), file, entries, by_name, metadata })
    }

    /// The tensor called `name`.
    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.by_name.get(name).and_then(|&i| self.entries.get(i))
    }

    /// Reads `buf.len()` bytes of `e`'s data starting `at` bytes into it.
    ///
    /// # Errors
    /// [`HfError::Io`] (also for a range past the tensor).
    pub fn read_at(&self, e: &Entry, at: u64, buf: &mut [u8]) -> Result<(), HfError> {
        if at + buf.len() as u64 > e.len {
            let msg = format!("read past the end of tensor {}", e.name);
            return Err(HfError::Io(self.path.clone(), std::io::Error::other(msg)));
        }
        let io = |err| HfError::Io(self.path.clone(), err);
        // `&File` reads and seeks: positioned reads without a platform API
        // (reads are sequential per file here).
        let mut f = &self.file;
        f.seek(SeekFrom::Start(e.offset + at)).map_err(io)?;
        f.read_exact(buf).map_err(io)
    }

    /// Reads a float tensor widened to f32 in chunks of at most `per`
    /// elements, calling `f(start, values)` for each (`start`: the index of
    /// the chunk's first element), and stops at the first `Some` it returns.
    ///
    /// # Errors
    /// [`HfError::Io`], [`HfError::Unsupported`] for a non-float type, and
    /// `f`'s errors.
    pub fn scan_f32<T, E: From<HfError>>(
        &self,
        e: &Entry,
        per: usize,
        mut f: impl FnMut(usize, &[f32]) -> Result<Option<T>, E>,
    ) -> Result<Option<T>, E> {
        let format = e.format().ok_or_else(|| unsupported(e.dtype))?;
        // Quantized rows are read whole: `per` rounds to a number of rows.
        let (unit, unit_bytes) = match (e.quant, e.shape.as_slice()) {
            (Some(q), &[_, cols]) => (cols.max(1), row_bytes(q, cols).unwrap_or(0)),
            _ => (1, e.dtype.size()),
        };
        let units = (per / unit).max(1);
        let mut bytes = vec![0u8; units * unit_bytes];
        let mut vals = vec![0.0f32; units * unit];
        let (mut done, total) = (0usize, e.numel() / unit.max(1));
        while done < total {
            let n = units.min(total - done);
            self.read_at(e, (done * unit_bytes) as u64, &mut bytes[..n * unit_bytes])?;
            decode_rows(format, &bytes[..n * unit_bytes], unit, &mut vals[..n * unit])
                .map_err(|err| self.in_tensor(e, err, done))?;
            if let Some(t) = f(done * unit, &vals[..n * unit])? {
                return Ok(Some(t));
            }
            done += n;
        }
        Ok(None)
    }

    /// Rows `first..first + n` of the matrix `e` (`[rows, cols]`, any
    /// float or quantized format) widened to f32 into `out` (`n * cols`);
    /// `scratch` holds the stored bytes.
    ///
    /// # Errors
    /// [`HfError::Io`] (also for rows past the end), [`HfError::Unsupported`]
    /// for a tensor that is not a float matrix.
    pub fn read_rows(&self, e: &Entry, first: usize, out: &mut [f32], scratch: &mut Vec<u8>) -> Result<(), HfError> {
        let (Some(format), &[_, cols]) = (e.format(), e.shape.as_slice()) else {
            return Err(HfError::Unsupported(format!("{}: {:?} {:?} is not a float matrix", e.name, e.dtype, e.shape)));
        };
        let rb = row_bytes(format, cols).ok_or(HfError::Core(peft_core::Error::Overflow))?;
        let n = out.len() / cols.max(1);
        scratch.resize(n * rb, 0);
        self.read_at(e, (first * rb) as u64, scratch)?;
        decode_rows(format, scratch, cols, out).map_err(|err| self.in_tensor(e, err, first))
    }

    /// The first NaN or infinity of a float tensor (its index and value),
    /// read in chunks of 2^18 elements (1 MiB of f32).
    ///
    /// # Errors
    /// [`HfError::Io`], [`HfError::Unsupported`] for a non-float type.
    pub fn first_nonfinite(&self, e: &Entry) -> Result<Option<(usize, f32)>, HfError> {
        self.scan_f32(e, 1 << 18, |start, v| Ok(v.iter().position(|x| !x.is_finite()).map(|i| (start + i, v[i]))))
    }

    /// A whole integer tensor (index tensors of adapters: VB-LoRA's top-k
    /// indices, U8, I16, I32 or I64), widened to i64.
    ///
    /// # Errors
    /// [`HfError::TensorShape`] for another element type or a length that
    /// does not match; [`HfError::Io`].
    pub fn read_index(&self, e: &Entry) -> Result<Vec<i64>, HfError> {
        let size = match e.dtype {
            Dtype::U8 => 1,
            Dtype::I16 => 2,
            Dtype::I32 => 4,
            Dtype::I64 => 8,
            _ => return Err(HfError::shape(&e.name, &e.shape, "an integer tensor (U8, I16, I32 or I64)")),
        };
        if e.quant.is_some() || e.len != size * e.numel() as u64 {
            return Err(HfError::shape(&e.name, &e.shape, format!("{:?} values", e.dtype)));
        }
        let mut bytes = vec![0u8; e.len as usize];
        self.read_at(e, 0, &mut bytes)?;
        Ok(bytes
            .chunks_exact(size as usize)
            .map(|c| match c {
                [a] => i64::from(*a),
                [a, b] => i64::from(i16::from_le_bytes([*a, *b])),
                [a, b, c2, d] => i64::from(i32::from_le_bytes([*a, *b, *c2, *d])),
                _ => i64::from_le_bytes(c.try_into().unwrap_or([0; 8])),
            })
            .collect())
    }

    /// A whole `I32` tensor (index tensors of adapters: SHiRA's
    /// `shira_indices`).
    ///
    /// # Errors
    /// [`HfError::Unsupported`] for another element type; [`HfError::Io`].
    pub fn read_i32(&self, e: &Entry) -> Result<Vec<i32>, HfError> {
        if e.dtype != Dtype::I32 {
            return Err(HfError::shape(&e.name, &e.shape, "an I32 tensor"));
        }
        // I32 values widened by read_index narrow back exactly.
        Ok(self.read_index(e)?.into_iter().map(|v| v as i32).collect())
    }

    /// A whole float tensor, widened to f32 (for small tensors: adapters).
    ///
    /// # Errors
    /// [`HfError::Io`], [`HfError::Unsupported`] for a non-float type.
    pub fn read_f32(&self, e: &Entry) -> Result<Vec<f32>, HfError> {
        let format = e.format().ok_or_else(|| unsupported(e.dtype))?;
        let mut bytes = vec![0u8; e.len as usize];
        self.read_at(e, 0, &mut bytes)?;
        let mut out = vec![0.0f32; e.numel()];
        let cols = match (e.quant, e.shape.as_slice()) {
            (Some(_), &[_, cols]) => cols,
            _ => e.numel().max(1),
        };
        decode_rows(format, &bytes, cols, &mut out).map_err(|err| self.in_tensor(e, err, 0))?;
        Ok(out)
    }

    /// `err`, from decoding rows of `e` from row `first` on, naming this
    /// file, the tensor and the row.
    fn in_tensor(&self, e: &Entry, err: HfError, first: usize) -> HfError {
        let err = match err {
            HfError::Core(c) => HfError::InModule { module: e.name.clone(), error: at_row(c, first) },
            HfError::NonFinite { index, value, cause, .. } => {
                let cols = e.shape.get(1).copied().unwrap_or(0);
                HfError::NonFinite { tensor: e.name.clone(), index: index + first * cols, value, cause }
            }
            other => other,
        };
        HfError::At(self.path.clone(), Box::new(err))
    }
}

/// A tensor to write.
#[derive(Clone, Debug)]
pub struct OutEntry {
    /// Name.
    pub name: String,
    /// Element type (ignored when `quant` is set: `U8`).
    pub dtype: Dtype,
    /// Dimensions (for a quantized matrix, the matrix's).
    pub shape: Vec<usize>,
    /// A quantized matrix's format (see the [module docs](self)).
    pub quant: Option<Format>,
}

impl OutEntry {
    /// A plain tensor.
    pub fn plain(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>) -> Self {
        Self { name: name.into(), dtype, shape, quant: None }
    }

    /// A float or quantized tensor stored in format `f`.
    pub fn stored(name: impl Into<String>, f: Format, shape: Vec<usize>) -> Self {
        let quant = matches!(f, Format::Int8 | Format::Q8_0 | Format::Q4_0).then_some(f);
        Self { name: name.into(), dtype: format_dtype(f), shape, quant }
    }

    /// Bytes of data.
    pub fn bytes(&self) -> u64 {
        match self.quant {
            Some(q) => stored_bytes(q, &self.shape),
            None => self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64,
        }
    }

    /// The shape written in the header (a quantized matrix: `[rows, row_bytes]`).
    fn stored_shape(&self) -> Vec<usize> {
        match (self.quant, self.shape.as_slice()) {
            (Some(q), &[rows, cols]) => vec![rows, row_bytes(q, cols).unwrap_or(0)],
            _ => self.shape.clone(),
        }
    }
}

/// The 8-byte length and the JSON header (padded with spaces to a multiple
/// of 8, as the `safetensors` crate writes it) for tensors stored in the
/// given order.
///
/// # Errors
/// [`HfError::Json`] if serialization fails.
pub fn header(entries: &[OutEntry], metadata: &BTreeMap<String, String>) -> Result<Vec<u8>, HfError> {
    let mut map = serde_json::Map::new();
    let mut metadata = metadata.clone();
    for e in entries {
        if let Some(q) = e.quant {
            let info = QuantInfo { format: q.name().into(), shape: e.shape.clone() };
            metadata.insert(format!("{STORAGE_KEY}{}", e.name), serde_json::to_string(&info).map_err(HfError::json)?);
        }
    }
    if !metadata.is_empty() {
        map.insert("__metadata__".into(), serde_json::to_value(&metadata).map_err(HfError::json)?);
    }
    let mut offset = 0u64;
    for e in entries {
        let end = offset + e.bytes();
        let dtype = if e.quant.is_some() { Dtype::U8 } else { e.dtype };
        map.insert(
            e.name.clone(),
            serde_json::json!({ "dtype": dtype, "shape": e.stored_shape(), "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&map).map_err(HfError::json)?;
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    Ok(out)
}
