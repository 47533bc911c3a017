//! The GGUF reader (its layout and checks are in the [parent module](super)).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use peft_core::storage::Format;

use crate::hf::HfError;

/// Longest string (key, tensor name or value) read, in bytes.
pub const MAX_STRING: u64 = 1 << 20;
/// Most elements in one metadata array.
pub const MAX_ARRAY: u64 = 1 << 24;
/// Most tensors in one file.
pub const MAX_TENSORS: u64 = 1 << 20;
/// Most metadata keys.
pub const MAX_KEYS: u64 = 1 << 16;
/// Most dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;
/// Deepest nesting of arrays in arrays.
pub const MAX_DEPTH: u32 = 2;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7.
    Bool(bool),
    /// Type 8.
    Str(String),
    /// Type 9: its elements, all of one type.
    Array(Array),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

impl Value {
    /// The value as a non-negative integer, whatever its integer type.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as f64 (floats and integers).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The string, for a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The elements, for an array.
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The value type's name, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::Str(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }
}

/// A metadata array, held in its element type (a file's byte never costs
/// more than 3 bytes of memory: a string takes at least 8 bytes in the
/// file and 24 in a `String`, a nested array at least 12 and 32).
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    /// u8 elements.
    U8(Vec<u8>),
    /// i8 elements.
    I8(Vec<i8>),
    /// u16 elements.
    U16(Vec<u16>),
    /// i16 elements.
    I16(Vec<i16>),
    /// u32 elements.
    U32(Vec<u32>),
    /// i32 elements (`tokenizer.ggml.token_type`).
    I32(Vec<i32>),
    /// f32 elements (`tokenizer.ggml.scores`).
    F32(Vec<f32>),
    /// bool elements.
    Bool(Vec<bool>),
    /// Strings (`tokenizer.ggml.tokens`, `tokenizer.ggml.merges`).
    Str(Vec<String>),
    /// u64 elements.
    U64(Vec<u64>),
    /// i64 elements.
    I64(Vec<i64>),
    /// f64 elements.
    F64(Vec<f64>),
    /// Arrays of arrays.
    Nested(Vec<Value>),
}

impl Array {
    /// The number of elements.
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::Str(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
            Array::Nested(v) => v.len(),
        }
    }

    /// Whether the array is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as a [`Value`] (`None` past the end).
    pub fn get(&self, i: usize) -> Option<Value> {
        Some(match self {
            Array::U8(v) => Value::U8(*v.get(i)?),
            Array::I8(v) => Value::I8(*v.get(i)?),
            Array::U16(v) => Value::U16(*v.get(i)?),
            Array::I16(v) => Value::I16(*v.get(i)?),
            Array::U32(v) => Value::U32(*v.get(i)?),
            Array::I32(v) => Value::I32(*v.get(i)?),
            Array::F32(v) => Value::F32(*v.get(i)?),
            Array::Bool(v) => Value::Bool(*v.get(i)?),
            Array::Str(v) => Value::Str(v.get(i)?.clone()),
            Array::U64(v) => Value::U64(*v.get(i)?),
            Array::I64(v) => Value::I64(*v.get(i)?),
            Array::F64(v) => Value::F64(*v.get(i)?),
            Array::Nested(v) => v.get(i)?.clone(),
        })
    }
}

/// ggml's name of tensor type `id` (`ggml_type`), known or removed, for
/// messages; `None` for ids ggml never had.
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2 (removed)",
        "Q4_3 (removed)",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4 (removed)",
        "Q4_0_4_8 (removed)",
        "Q4_0_8_8 (removed)",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4 (removed)",
        "IQ4_NL_4_8 (removed)",
        "IQ4_NL_8_8 (removed)",
        "MXFP4",
    ];
    NAMES.get(usize::try_from(id).ok()?).copied()
}

/// The storage [`Format`] of ggml type `id`, for the types this crate
/// multiplies in place.
pub fn format_of(id: u32) -> Option<Format> {
    Some(match id {
        0 => Format::F32,
        1 => Format::F16,
        2 => Format::Q4_0,
        3 => Format::Q4_1,
        6 => Format::Q5_0,
        7 => Format::Q5_1,
        8 => Format::Q8_0,
        10 => Format::Q2_K,
        11 => Format::Q3_K,
        12 => Format::Q4_K,
        13 => Format::Q5_K,
        14 => Format::Q6_K,
        30 => Format::Bf16,
        _ => return None,
    })
}

/// The ggml type id of `format` (`None` for int8, which GGUF lacks).
pub fn type_of(format: Format) -> Option<u32> {
    (0..=30).find(|&id| format_of(id) == Some(format))
}

/// One tensor's entry.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// The GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// `ne`: the row length first.
    pub ne: Vec<u64>,
    /// Its storage format.
    pub format: Format,
    /// Byte offset of its data from the start of the file.
    pub start: u64,
    /// Bytes of data.
    pub len: u64,
}

impl TensorInfo {
    /// `(rows, cols)` of a matrix (`ne = [cols, rows]`), `(1, n)` of a
    /// vector; `None` for more dimensions (or sizes past `usize`).
    pub fn matrix(&self) -> Option<(usize, usize)> {
        match *self.ne.as_slice() {
            [n] => Some((1, usize::try_from(n).ok()?)),
            [cols, rows] => Some((usize::try_from(rows).ok()?, usize::try_from(cols).ok()?)),
            _ => None,
        }
    }
}

/// An open GGUF file: its metadata and tensor table (the data stays on
/// disk until [`Gguf::read`]).
#[derive(Debug)]
pub struct Gguf {
    path: PathBuf,
    /// The format version (2 or 3).
    pub version: u32,
    /// `general.alignment` (32 when absent).
    pub alignment: u64,
    /// Where the tensor data starts.
    pub data_start: u64,
    /// The key/value pairs, in file order.
    pub metadata: Vec<(String, Value)>,
    /// The tensors, in file order.
    pub tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

/// A reader that knows how many bytes are left.
struct Cursor<R> {
    inner: R,
    left: u64,
}

/// `n` elements read by `one` into a vector (`n` already checked against
/// the bytes left).
fn collect<T>(n: usize, mut one: impl FnMut() -> Result<T, String>) -> Result<Vec<T>, String> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(one()?);
    }
    Ok(v)
}

impl<R: Read> Cursor<R> {
    /// `n` elements of type `ty`.
    fn array(&mut self, ty: u32, n: usize, what: &str, depth: u32) -> Result<Array, String> {
        Ok(match ty {
            0 => Array::U8(collect(n, || Ok(self.bytes::<1>(what)?[0]))?),
            1 => Array::I8(collect(n, || Ok(i8::from_le_bytes(self.bytes::<1>(what)?)))?),
            2 => Array::U16(collect(n, || Ok(u16::from_le_bytes(self.bytes::<2>(what)?)))?),
            3 => Array::I16(collect(n, || Ok(i16::from_le_bytes(self.bytes::<2>(what)?)))?),
            4 => Array::U32(collect(n, || self.u32(what))?),
            5 => Array::I32(collect(n, || Ok(i32::from_le_bytes(self.bytes::<4>(what)?)))?),
            6 => Array::F32(collect(n, || Ok(f32::from_le_bytes(self.bytes::<4>(what)?)))?),
            7 => Array::Bool(collect(n, || match self.value(7, what, depth + 1)? {
                Value::Bool(b) => Ok(b),
                _ => Err(format!("{what}: not a bool")),
            })?),
            8 => Array::Str(collect(n, || self.string(what))?),
            10 => Array::U64(collect(n, || self.u64(what))?),
            11 => Array::I64(collect(n, || Ok(i64::from_le_bytes(self.bytes::<8>(what)?)))?),
            12 => Array::F64(collect(n, || Ok(f64::from_le_bytes(self.bytes::<8>(what)?)))?),
            _ => Array::Nested(collect(n, || self.value(ty, what, depth + 1))?),
        })
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        if self.left < N as u64 {
            return Err(format!("the file ends inside {what}"));
        }
        let mut b = [0u8; N];
        self.inner.read_exact(&mut b).map_err(|e| format!("reading {what}: {e}"))?;
        self.left -= N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    /// A count of elements each at least `min` bytes, checked against the
    /// cap and the bytes left.
    fn count(&mut self, what: &str, cap: u64, min: u64) -> Result<usize, String> {
        let n = self.u64(what)?;
        if n > cap {
            return Err(format!("{what} is {n}, above this reader's limit of {cap}"));
        }
        if n.saturating_mul(min) > self.left {
            return Err(format!("{what} is {n}, more than the {} bytes left in the file can hold", self.left));
        }
        usize::try_from(n).map_err(|_| format!("{what} is {n}: too large"))
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.count(&format!("the length of {what}"), MAX_STRING, 1)?;
        let mut b = vec![0u8; n];
        self.inner.read_exact(&mut b).map_err(|e| format!("reading {what}: {e}"))?;
        self.left -= n as u64;
        String::from_utf8(b).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn value(&mut self, ty: u32, what: &str, depth: u32) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.bytes::<1>(what)?[0]),
            1 => Value::I8(i8::from_le_bytes(self.bytes::<1>(what)?)),
            2 => Value::U16(u16::from_le_bytes(self.bytes::<2>(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes::<2>(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.bytes::<4>(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes::<4>(what)?)),
            7 => match self.bytes::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{what}: {b} is not a bool (0 or 1)")),
            },
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(format!("{what}: arrays nested deeper than {MAX_DEPTH}"));
                }
                let inner = self.u32(what)?;
                let min = match inner {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(format!("{what}: unknown array element type {t}")),
                };
                let n = self.count(&format!("the length of {what}"), MAX_ARRAY, min)?;
                Value::Array(self.array(inner, n, what, depth)?)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.bytes::<8>(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes::<8>(what)?)),
            t => return Err(format!("{what}: unknown value type {t}")),
        })
    }
}

impl Gguf {
    /// Opens `path` and reads its header, metadata and tensor table,
    /// checking every tensor's extent (see the [module docs](crate::gguf)).
    ///
    /// # Errors
    /// [`HfError::Io`]; [`HfError::Gguf`] naming the key or tensor: a bad
    /// magic, a version other than 2 or 3, any count or length past the
    /// file or the caps, an unknown value type, a key given twice, an
    /// alignment that is not a power of two, a tensor of a type this crate
    /// does not read (named, e.g. `IQ2_XXS`), a row length that is not
    /// whole blocks, data outside the file, misaligned or overlapping.
    pub fn open(path: &Path) -> Result<Self, HfError> {
        let io = |e| HfError::Io(path.to_path_buf(), e);
        crate::files::regular_file(path)?;
        let file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        Self::from_reader(BufReader::with_capacity(1 << 16, file), file_len, path)
    }

    /// Reads the header, metadata and tensor table of a GGUF file of
    /// `len` bytes from `reader` (at its start), with [`Gguf::open`]'s
    /// checks; `path` names the file in errors and is where [`Gguf::read`]
    /// finds the tensor data.
    ///
    /// # Errors
    /// As [`Gguf::open`], but for the I/O of opening the file.
    pub fn from_reader(reader: impl Read, len: u64, path: &Path) -> Result<Self, HfError> {
        let mut cur = Cursor { inner: reader, left: len };
        Self::parse(&mut cur, len, path).map_err(|m| HfError::Gguf(path.to_path_buf(), m))
    }

    fn parse<R: Read>(cur: &mut Cursor<R>, file_len: u64, path: &Path) -> Result<Self, String> {
        if &cur.bytes::<4>("the magic")? != b"GGUF" {
            return Err("not a GGUF file (the magic is not \"GGUF\")".into());
        }
        let version = cur.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(format!("GGUF version {version}: this reader reads versions 2 and 3"));
        }
        // A tensor entry takes at least 8 + 4 + 4 + 8 bytes, a key 8 + 4 + 1.
        let n_tensors = cur.count("the tensor count", MAX_TENSORS, 24)?;
        let n_keys = cur.count("the key count", MAX_KEYS, 13)?;
        let mut metadata: Vec<(String, Value)> = Vec::with_capacity(n_keys);
        let mut keys = HashMap::with_capacity(n_keys);
        for i in 0..n_keys {
            let key = cur.string(&format!("key {i}"))?;
            let ty = cur.u32(&format!("the type of `{key}`"))?;
            let value = cur.value(ty, &format!("`{key}`"), 0)?;
            if keys.insert(key.clone(), i).is_some() {
                return Err(format!("the key `{key}` is given twice"));
            }
            metadata.push((key, value));
        }
        let alignment = match keys.get("general.alignment").map(|&i| &metadata[i].1) {
            None => 32,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 20 => a,
                _ => return Err(format!("`general.alignment` is {v:?}: must be a power of two up to 2^20")),
            },
        };
        let mut tensors = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            tensors.push(Self::tensor_entry(cur, i)?);
        }
        let header_end = file_len - cur.left;
        let data_start = header_end.div_ceil(alignment) * alignment;
        let mut by_name = HashMap::with_capacity(n_tensors);
        for (i, t) in tensors.iter_mut().enumerate() {
            if by_name.insert(t.name.clone(), i).is_some() {
                return Err(format!("the tensor `{}` is given twice", t.name));
            }
            let rel = t.start;
            if rel % alignment != 0 {
                return Err(format!(
                    "tensor `{}`: offset {rel} is not a multiple of the alignment {alignment}",
                    t.name
                ));
            }
            let start = data_start.checked_add(rel);
            match start.and_then(|s| s.checked_add(t.len)) {
                Some(end) if end <= file_len => t.start = data_start + rel,
                _ => {
                    return Err(format!(
                        "tensor `{}`: its {} bytes at offset {rel} lie past the end of the file ({} bytes of data)",
                        t.name,
                        t.len,
                        file_len.saturating_sub(data_start)
                    ));
                }
            }
        }
        let mut extents: Vec<(u64, u64, &str)> = tensors.iter().map(|t| (t.start, t.len, t.name.as_str())).collect();
        extents.sort_unstable();
        for pair in extents.windows(2) {
            let ((a, alen, an), (b, _, bn)) = (pair[0], pair[1]);
            if a + alen > b {
                return Err(format!("tensors `{an}` and `{bn}` overlap"));
            }
        }
        Ok(Self { path: path.to_path_buf(), version, alignment, data_start, metadata, tensors, by_name })
    }

    fn tensor_entry<R: Read>(cur: &mut Cursor<R>, i: usize) -> Result<TensorInfo, String> {
        let name = cur.string(&format!("the name of tensor {i}"))?;
        let n_dims = cur.u32(&format!("tensor `{name}`'s dimension count"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!("tensor `{name}`: {n_dims} dimensions (1 to {MAX_DIMS})"));
        }
        let mut ne = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            ne.push(cur.u64(&format!("tensor `{name}`'s shape"))?);
        }
        let ty = cur.u32(&format!("tensor `{name}`'s type"))?;
        let start = cur.u64(&format!("tensor `{name}`'s offset"))?;
        let format = format_of(ty).ok_or_else(|| match ggml_type_name(ty) {
            Some(n) => format!("tensor `{name}` has type {n} ({ty}), which this reader does not read"),
            None => format!("tensor `{name}` has unknown type {ty}"),
        })?;
        let (elems, size) = format.block();
        let row = ne[0];
        if row % elems as u64 != 0 {
            return Err(format!(
                "tensor `{name}`: rows of {row} values are not whole {} blocks of {elems}",
                format.name().to_uppercase()
            ));
        }
        let mut len = (row / elems as u64).checked_mul(size as u64);
        for &d in &ne[1..] {
            len = len.and_then(|l| l.checked_mul(d));
        }
        let len = len.ok_or_else(|| format!("tensor `{name}`: shape {ne:?} overflows"))?;
        Ok(TensorInfo { name, ne, format, start, len })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// The stored bytes of `t` (one of this file's tensors).
    ///
    /// # Errors
    /// [`HfError::Io`]; [`HfError::Gguf`] if `t` is too large to hold in
    /// memory here.
    pub fn read(&self, t: &TensorInfo) -> Result<Vec<u8>, HfError> {
        let io = |e| HfError::Io(self.path.clone(), e);
        let len = usize::try_from(t.len)
            .map_err(|_| HfError::Gguf(self.path.clone(), format!("tensor `{}` is too large", t.name)))?;
        let mut bytes = Vec::new();
        bytes.try_reserve_exact(len).map_err(|_| {
            HfError::Gguf(self.path.clone(), format!("tensor `{}`: {len} bytes cannot be allocated", t.name))
        })?;
        let mut f = File::open(&self.path).map_err(io)?;
        f.seek(SeekFrom::Start(t.start)).map_err(io)?;
        f.take(t.len).read_to_end(&mut bytes).map_err(io)?;
        if bytes.len() != len {
            return Err(HfError::Gguf(
                self.path.clone(),
                format!("tensor `{}`: the file is shorter than it was", t.name),
            ));
        }
        Ok(bytes)
    }
}
