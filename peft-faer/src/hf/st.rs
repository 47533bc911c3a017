//! safetensors files: checked headers, chunked reads, streaming writes.
//!
//! Headers are validated by the `safetensors` crate (contiguous offsets,
//! sizes that match dtype and shape, a file exactly as long as the header
//! says) over a memory map of the file, which reads only the header pages;
//! duplicate tensor names, which a JSON map would silently merge, are
//! rejected first by a scan of the header's keys. Tensor data is then read
//! with positioned reads in bounded chunks, so a merge never holds more than
//! one chunk of a large tensor in memory.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};

use super::HfError;

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
    /// The `__metadata__` map.
    pub metadata: BTreeMap<String, String>,
}

/// The keys of the header's top-level JSON object, in file order.
struct Keys;

impl<'de> Visitor<'de> for Keys {
    type Value = Vec<String>;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut keys = Vec::new();
        while let Some(k) = map.next_key::<String>()? {
            map.next_value::<IgnoredAny>()?;
            keys.push(k);
        }
        Ok(keys)
    }
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
    /// Opens and checks `path`.
    ///
    /// # Errors
    /// [`HfError::Io`]; [`HfError::Safetensors`] for a truncated file, a
    /// header that claims more data than the file holds, bad offsets or
    /// JSON; [`HfError::DuplicateKey`].
    pub fn open(path: &Path) -> Result<Self, HfError> {
        let io = |e| HfError::Io(path.to_path_buf(), e);
        let bad = |msg: String| HfError::Safetensors(path.to_path_buf(), msg);
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len < 8 {
            return Err(bad(format!("{len} bytes: shorter than the 8-byte header length")));
        }
        // SAFETY: the map is read-only and private to this function; if
        // another process truncates the file meanwhile, reads of the header
        // could fault, the usual caveat of mapping files. Only the header
        // pages are touched.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let mut n8 = [0u8; 8];
        n8.copy_from_slice(&map[..8]);
        let n = u64::from_le_bytes(n8);
        if n > 100_000_000 || n + 8 > len {
            return Err(bad(format!("header of {n} bytes in a file of {len}")));
        }
        let header = &map[8..8 + n as usize];
        let keys = serde_json::Deserializer::from_slice(header)
            .deserialize_map(Keys)
            .map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(HfError::DuplicateKey(path.to_path_buf(), w[0].clone()));
        }
        let (n, meta) = SafeTensors::read_metadata(&map).map_err(|e| bad(format!("{e:?}")))?;
        let data_start = 8 + n as u64;
        let mut entries: Vec<Entry> = meta
            .tensors()
            .into_iter()
            .map(|(name, info)| Entry {
                name,
                dtype: info.dtype,
                shape: info.shape.clone(),
                offset: data_start + info.data_offsets.0 as u64,
                len: (info.data_offsets.1 - info.data_offsets.0) as u64,
            })
            .collect();
        entries.sort_by_key(|e| e.offset);
        let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
        Ok(Self { path: path.to_path_buf(), file, entries, metadata })
    }

    /// The tensor called `name`.
    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
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
        self.file.read_exact_at(buf, e.offset + at).map_err(|err| HfError::Io(self.path.clone(), err))
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
