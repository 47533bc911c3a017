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
use safetensors::Dtype;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use super::HfError;

/// The largest header accepted (the `safetensors` crate's own limit).
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor of a file: where its bytes are.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Bytes of data.
    pub len: u64,
}

impl Entry {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
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
            let info = map.next_value::<RawInfo>().map_err(|e| de::Error::custom(format!("tensor {k:?}: {e}")))?;
            out.tensors.push((k, info));
        }
        Ok(out)
    }
}

/// The tensors of a header (in data order) and its `__metadata__`.
pub type Header = (Vec<Entry>, BTreeMap<String, String>);

/// Checks the header of the safetensors file `path`: `json` is its text,
/// `file_len` the whole file's length (8-byte length prefix, header,
/// data). Reads nothing: the file system is not touched.
///
/// # Errors
/// [`HfError::DuplicateKey`]; [`HfError::Safetensors`] naming the tensor at
/// fault: invalid JSON, an unknown field or dtype, a shape whose byte size
/// overflows or differs from its range, ranges that leave a gap, overlap,
/// or do not end where the file does.
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
        entries.push(Entry { name, dtype: info.dtype, shape: info.shape, offset, len: end - begin });
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
    Ok((entries, raw.metadata))
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

/// Rounds `vals` once (to nearest, ties to even) to type `d`, appending the
/// little-endian bytes to `out`.
pub fn from_f32(d: Dtype, vals: &[f32], out: &mut Vec<u8>) -> Result<(), HfError> {
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
        let (entries, metadata) = parse_header(path, &header, len)?;
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
        let size = float_size(e.dtype).ok_or_else(|| unsupported(e.dtype))?;
        let per = per.max(1);
        let mut bytes = vec![0u8; per * size];
        let mut vals = vec![0.0f32; per];
        let (mut done, total) = (0usize, e.numel());
        while done < total {
            let n = per.min(total - done);
            self.read_at(e, (done * size) as u64, &mut bytes[..n * size])?;
            to_f32(e.dtype, &bytes[..n * size], &mut vals[..n])?;
            if let Some(t) = f(done, &vals[..n])? {
                return Ok(Some(t));
            }
            done += n;
        }
        Ok(None)
    }

    /// The first NaN or infinity of a float tensor (its index and value),
    /// read in chunks of 2^18 elements (1 MiB of f32).
    ///
    /// # Errors
    /// [`HfError::Io`], [`HfError::Unsupported`] for a non-float type.
    pub fn first_nonfinite(&self, e: &Entry) -> Result<Option<(usize, f32)>, HfError> {
        self.scan_f32(e, 1 << 18, |start, v| Ok(v.iter().position(|x| !x.is_finite()).map(|i| (start + i, v[i]))))
    }

    /// A whole float tensor, widened to f32 (for small tensors: adapters).
    ///
    /// # Errors
    /// [`HfError::Io`], [`HfError::Unsupported`] for a non-float type.
    pub fn read_f32(&self, e: &Entry) -> Result<Vec<f32>, HfError> {
        let mut bytes = vec![0u8; e.len as usize];
        self.read_at(e, 0, &mut bytes)?;
        let mut out = vec![0.0f32; e.numel()];
        to_f32(e.dtype, &bytes, &mut out)?;
        Ok(out)
    }
}

/// A tensor to write.
#[derive(Clone, Debug)]
pub struct OutEntry {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions.
    pub shape: Vec<usize>,
}

impl OutEntry {
    /// Bytes of data.
    pub fn bytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
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
    if !metadata.is_empty() {
        map.insert("__metadata__".into(), serde_json::to_value(metadata).map_err(HfError::json)?);
    }
    let mut offset = 0u64;
    for e in entries {
        let end = offset + e.bytes();
        map.insert(
            e.name.clone(),
            serde_json::json!({ "dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, end] }),
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
