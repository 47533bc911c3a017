//! The adapter-only file format, read from and written to byte slices.
//!
//! **Why it exists beside PEFT's folders.** A PEFT folder is a JSON config
//! and a safetensors file: parsing either needs a heap and a JSON parser.
//! A `.peft` file is one byte slice that `no_std` code parses in place,
//! with every length and a CRC checked, so firmware can carry an adapter in
//! flash and run it: the firmware smoke test embeds the LoRA Hugging Face
//! PEFT wrote for `lora_qv` (converted by `peft convert`) and runs it on a
//! Cortex-M4F, bit-identical to the host. `peft convert` turns every PEFT
//! method this project reads into a `.peft` file and back, bit for bit.
//!
//! A file holds one method's trainable tensors and the configuration that
//! gives them meaning, never the frozen base (mistake 10 in `peft_verify::mistakes`: saving
//! the whole model). It is written into a caller's buffer and parsed in
//! place: the reader borrows names and data from the buffer it is given and
//! allocates nothing.
//!
//! ```text
//! offset  size  field                    (integers little-endian)
//!  0      8     magic "PEFTADPT"
//!  8      4     version (1)
//! 12      1     method (1 LoRA or DoRA, 2 adapter, 3 prompt, 4 prefix,
//!                  5 IA3, 6 LoHa, 7 LoKr, 8 VeRA,
//!                  9 AdaLoRA, 10 MiSS, 11 HRA, 12 RoAd, 13 C3A,
//!                  14 SHiRA, 15 OFT, 16 BOFT,
//!                  17 FourierFT, 18 RandLoRA, 19 VB-LoRA, 20 LN tuning,
//!                  21 trainable tokens)
//! 13      3     reserved, zero
//! 16      4     n_config   (<= MAX_CONFIG)
//! 20      4     n_tensors  (<= MAX_TENSORS)
//! 24      8     header_len: bytes of the config entries and tensor directory
//! 32      8     data_len: bytes of tensor data
//! 40            config entries, n_config times:
//!                 key_len u8 (>= 1), key (UTF-8), tag u8, value:
//!                 tag 0: u64 | 1: f64 bits | 2: bool (one byte, 0 or 1)
//!                 | 3: u16 length + UTF-8
//!               tensor directory, n_tensors times:
//!                 name_len u16 (1..=MAX_NAME), name (UTF-8, unique),
//!                 dtype u8 (1 f32, 2 f64, 3 f16, 4 bf16), ndim u8 (<= 4),
//!                 dims u64 x ndim
//! 40+header_len  tensor data, in directory order, packed, element bits LE
//! end-4   4     CRC-32 (IEEE 802.3, as zip and PNG) of every byte before it
//! ```
//!
//! The total length must be exactly `40 + header_len + data_len + 4`, the
//! header entries must fill `header_len` exactly and the tensors
//! `data_len` exactly; anything else is a [`FormatError`]. The checksum is
//! checked before any entry is parsed, and every length is checked with
//! overflow-checked arithmetic against the buffer before it is used, so a
//! truncated, oversized, corrupted or hostile buffer is an error, never a
//! panic or a large allocation.
//!
//! Configuration keys are the method's own: `peft-faer` writes PEFT's names
//! (`r`, `lora_alpha`, `use_rslora`, `num_virtual_tokens`, ...).

use core::fmt;

use crate::element::Element;
use crate::error::{Error, Operand, Result, check_len};
use crate::optim::Method;

/// The first eight bytes of every adapter file.
pub const MAGIC: [u8; 8] = *b"PEFTADPT";
/// The format version this crate reads and writes.
pub const VERSION: u32 = 1;
/// At most this many tensors per file (bounds the duplicate-name check).
pub const MAX_TENSORS: usize = 8192;
/// At most this many configuration entries per file.
pub const MAX_CONFIG: usize = 256;
/// At most this many bytes per tensor name.
pub const MAX_NAME: usize = 1024;
/// At most this many dimensions per tensor.
pub const MAX_DIMS: usize = 4;

const FIXED: usize = 40;
const TRAILER: usize = 4;

/// What is wrong with an adapter file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    /// The buffer ends before the header says the file does.
    Truncated {
        /// Bytes the file needs.
        needed: u64,
        /// Bytes given.
        len: usize,
    },
    /// The buffer is longer than the file the header describes.
    TrailingBytes {
        /// Bytes the file has.
        expected: u64,
        /// Bytes given.
        len: usize,
    },
    /// Not an adapter file.
    BadMagic,
    /// A version this reader does not know.
    UnsupportedVersion {
        /// The version found.
        version: u32,
    },
    /// An unknown method code.
    UnknownMethod {
        /// The code found.
        code: u8,
    },
    /// Reserved bytes are not zero.
    Reserved,
    /// The checksum does not match the contents.
    Checksum {
        /// Stored CRC-32.
        stored: u32,
        /// CRC-32 of the contents.
        computed: u32,
    },
    /// A name or string is not UTF-8, empty, or longer than allowed.
    BadName,
    /// Two tensors share a name.
    DuplicateName,
    /// Two configuration entries share a key (a reader could not know
    /// which one is meant).
    DuplicateKey,
    /// An unknown configuration value tag.
    UnknownTag {
        /// The tag found.
        tag: u8,
    },
    /// An unknown element type code.
    UnknownDtype {
        /// The code found.
        code: u8,
    },
    /// A tensor with more than [`MAX_DIMS`] dimensions.
    TooManyDims {
        /// The count found.
        ndim: u8,
    },
    /// More tensors or configuration entries than the limits allow.
    TooMany {
        /// `"tensors"` or `"config entries"`.
        what: &'static str,
        /// The count found.
        count: u64,
    },
    /// A boolean that is neither 0 nor 1.
    BadValue,
    /// The entries do not fill the declared header exactly.
    HeaderLength,
    /// The tensors do not fill the declared data section exactly.
    DataLength {
        /// `data_len` from the header.
        declared: u64,
        /// The sum of the tensors' sizes.
        tensors: u64,
    },
    /// A size computation overflowed.
    Overflow,
    /// A configuration key the reader needs is absent.
    MissingKey {
        /// The key.
        key: &'static str,
    },
    /// A configuration value has another type than the reader needs.
    WrongType {
        /// The key.
        key: &'static str,
    },
    /// A tensor the reader needs is absent.
    MissingTensor,
    /// The output buffer of a writer is too small.
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        len: usize,
    },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            FormatError::Truncated { needed, len } => write!(f, "truncated: {len} bytes of {needed}"),
            FormatError::TrailingBytes { expected, len } => {
                write!(f, "{len} bytes where the header describes {expected}")
            }
            FormatError::BadMagic => f.write_str("not a peft adapter file (bad magic)"),
            FormatError::UnsupportedVersion { version } => write!(f, "unsupported version {version}"),
            FormatError::UnknownMethod { code } => write!(f, "unknown method code {code}"),
            FormatError::Reserved => f.write_str("reserved header bytes are not zero"),
            FormatError::Checksum { stored, computed } => {
                write!(f, "checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")
            }
            FormatError::BadName => f.write_str("a name is empty, too long or not UTF-8"),
            FormatError::DuplicateName => f.write_str("two tensors share a name"),
            FormatError::DuplicateKey => f.write_str("two configuration entries share a key"),
            FormatError::UnknownTag { tag } => write!(f, "unknown config value tag {tag}"),
            FormatError::UnknownDtype { code } => write!(f, "unknown element type code {code}"),
            FormatError::TooManyDims { ndim } => write!(f, "{ndim} dimensions (at most {MAX_DIMS})"),
            FormatError::TooMany { what, count } => write!(f, "{count} {what} exceed the limit"),
            FormatError::BadValue => f.write_str("a boolean is neither 0 nor 1"),
            FormatError::HeaderLength => f.write_str("entries do not fill the declared header exactly"),
            FormatError::DataLength { declared, tensors } => {
                write!(f, "tensors need {tensors} data bytes, header declares {declared}")
            }
            FormatError::Overflow => f.write_str("a size overflows"),
            FormatError::MissingKey { key } => write!(f, "missing config key {key:?}"),
            FormatError::WrongType { key } => write!(f, "config key {key:?} has the wrong type"),
            FormatError::MissingTensor => f.write_str("a required tensor is missing"),
            FormatError::BufferTooSmall { needed, len } => write!(f, "output of {len} bytes, {needed} needed"),
        }
    }
}

impl core::error::Error for FormatError {}

type Fmt<T> = core::result::Result<T, FormatError>;

/// Element types a file can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary64.
    F64,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    Bf16,
}

impl Dtype {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F64 => 8,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }

    /// The name, as [`Element::NAME`].
    pub const fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F64 => "f64",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// The type of element `E`.
    pub fn of<E: Element>() -> Self {
        match E::NAME {
            "f64" => Dtype::F64,
            "f16" => Dtype::F16,
            "bf16" => Dtype::Bf16,
            _ => Dtype::F32,
        }
    }

    const fn code(self) -> u8 {
        match self {
            Dtype::F32 => 1,
            Dtype::F64 => 2,
            Dtype::F16 => 3,
            Dtype::Bf16 => 4,
        }
    }

    const fn from_code(code: u8) -> Fmt<Self> {
        match code {
            1 => Ok(Dtype::F32),
            2 => Ok(Dtype::F64),
            3 => Ok(Dtype::F16),
            4 => Ok(Dtype::Bf16),
            _ => Err(FormatError::UnknownDtype { code }),
        }
    }

    /// Stored bits to f64 (exact for every type).
    fn decode(self, bits: u64) -> f64 {
        match self {
            Dtype::F64 => f64::from_bits(bits),
            Dtype::F32 => f64::from(f32::from_bits((bits & 0xffff_ffff) as u32)),
            Dtype::Bf16 => f64::from(f32::from_bits(((bits & 0xffff) as u32) << 16)),
            Dtype::F16 => f16_to_f64((bits & 0xffff) as u16),
        }
    }
}

/// IEEE binary16 bits to f64 (exact), without the `half` crate.
fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let man = f64::from(h & 0x3ff);
    let mag = match exp {
        0 => man * libm::ldexp(1.0, -24),
        31 if man == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1024.0 + man) * libm::ldexp(1.0, e - 25),
    };
    sign * mag
}

fn method_code(m: Method) -> u8 {
    match m {
        Method::Lora => 1,
        Method::Adapter => 2,
        Method::Prompt => 3,
        Method::Prefix => 4,
        Method::Ia3 => 5,
        Method::Loha => 6,
        Method::Lokr => 7,
        Method::Vera => 8,
        Method::AdaLora => 9,
        Method::Miss => 10,
        Method::Hra => 11,
        Method::Road => 12,
        Method::C3a => 13,
        Method::Shira => 14,
        Method::Oft => 15,
        Method::Boft => 16,
        Method::FourierFt => 17,
        Method::RandLora => 18,
        Method::VbLora => 19,
        Method::LnTuning => 20,
        Method::TrainableTokens => 21,
    }
}

const fn method_from_code(code: u8) -> Fmt<Method> {
    match code {
        1 => Ok(Method::Lora),
        2 => Ok(Method::Adapter),
        3 => Ok(Method::Prompt),
        4 => Ok(Method::Prefix),
        5 => Ok(Method::Ia3),
        6 => Ok(Method::Loha),
        7 => Ok(Method::Lokr),
        8 => Ok(Method::Vera),
        9 => Ok(Method::AdaLora),
        10 => Ok(Method::Miss),
        11 => Ok(Method::Hra),
        12 => Ok(Method::Road),
        13 => Ok(Method::C3a),
        14 => Ok(Method::Shira),
        15 => Ok(Method::Oft),
        16 => Ok(Method::Boft),
        17 => Ok(Method::FourierFt),
        18 => Ok(Method::RandLora),
        19 => Ok(Method::VbLora),
        20 => Ok(Method::LnTuning),
        21 => Ok(Method::TrainableTokens),
        _ => Err(FormatError::UnknownMethod { code }),
    }
}

/// A configuration value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value<'a> {
    /// An unsigned integer.
    U64(u64),
    /// A float (stored bit-exact).
    F64(f64),
    /// A flag.
    Bool(bool),
    /// A string (at most 65535 bytes).
    Str(&'a str),
}

/// A tensor to write: `data` holds `shape`'s product of elements, row-major.
#[derive(Clone, Copy, Debug)]
pub struct Tensor<'a, E> {
    /// Unique name, 1 to [`MAX_NAME`] bytes.
    pub name: &'a str,
    /// Dimensions, at most [`MAX_DIMS`].
    pub shape: &'a [usize],
    /// Elements.
    pub data: &'a [E],
}

/// A tensor to write from its stored bytes: `data` holds `shape`'s product
/// of elements of `dtype`, row-major, each little-endian. Files whose
/// tensors have different element types are written from these
/// ([`encode_raw`]).
#[derive(Clone, Copy, Debug)]
pub struct RawTensor<'a> {
    /// Unique name, 1 to [`MAX_NAME`] bytes.
    pub name: &'a str,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, at most [`MAX_DIMS`].
    pub shape: &'a [usize],
    /// `numel * dtype.size()` bytes.
    pub data: &'a [u8],
}

/// What [`encode`] needs of a tensor, whatever holds its data.
trait Encodable {
    fn name(&self) -> &str;
    fn shape(&self) -> &[usize];
    fn dtype(&self) -> Dtype;
    /// The data's length in elements.
    fn len(&self) -> usize;
    fn write_data(&self, w: &mut Writer<'_>);
}

impl<E: Element> Encodable for Tensor<'_, E> {
    fn name(&self) -> &str {
        self.name
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn dtype(&self) -> Dtype {
        Dtype::of::<E>()
    }
    fn len(&self) -> usize {
        self.data.len()
    }
    fn write_data(&self, w: &mut Writer<'_>) {
        for v in self.data {
            let le = v.to_bits64().to_le_bytes();
            w.put(le.get(..E::BYTES).unwrap_or(&le));
        }
    }
}

impl Encodable for RawTensor<'_> {
    fn name(&self) -> &str {
        self.name
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn len(&self) -> usize {
        // A partial trailing element makes the length check fail.
        if self.data.len().is_multiple_of(self.dtype.size()) { self.data.len() / self.dtype.size() } else { usize::MAX }
    }
    fn write_data(&self, w: &mut Writer<'_>) {
        w.put(self.data);
    }
}

/// A tensor in a parsed file, borrowing from the file's buffer.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    name: &'a str,
    dtype: Dtype,
    shape: [usize; MAX_DIMS],
    ndim: usize,
    data: &'a [u8],
}

impl<'a> TensorView<'a> {
    /// The name.
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// The stored element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// The dimensions.
    pub fn shape(&self) -> &[usize] {
        self.shape.get(..self.ndim).unwrap_or(&[])
    }

    /// The stored bytes: `numel * dtype().size()`, each element
    /// little-endian (what a [`RawTensor`] takes).
    pub fn bytes(&self) -> &'a [u8] {
        self.data
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len() / self.dtype.size()
    }

    /// Copies the elements into `out` (exactly [`numel`](Self::numel)
    /// long). Bit-exact when `E` is the stored type; otherwise each value is
    /// widened exactly to f64 and rounded once to `E`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] (`Parameter`) if `out` has another length;
    /// nothing is written then.
    pub fn read_into<E: Element>(&self, out: &mut [E]) -> Result<()> {
        check_len(Operand::Parameter, self.numel(), out.len())?;
        let size = self.dtype.size();
        let same = Dtype::of::<E>() == self.dtype;
        for (o, chunk) in out.iter_mut().zip(self.data.chunks_exact(size)) {
            let mut le = [0u8; 8];
            if let Some(dst) = le.get_mut(..size) {
                dst.copy_from_slice(chunk);
            }
            let bits = u64::from_le_bytes(le);
            *o = if same { E::from_bits64(bits) } else { E::from_f64(self.dtype.decode(bits)) };
        }
        Ok(())
    }
}

/// A parsed, checked adapter file borrowing from its buffer.
#[derive(Clone, Copy, Debug)]
pub struct AdapterFile<'a> {
    method: Method,
    n_config: usize,
    n_tensors: usize,
    config: &'a [u8],
    directory: &'a [u8],
    data: &'a [u8],
}

/// A bounds-checked little-endian reader.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Fmt<&'a [u8]> {
        if n > self.buf.len() {
            return Err(FormatError::HeaderLength);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Fmt<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Fmt<u8> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Fmt<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Fmt<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Fmt<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn str(&mut self, n: usize) -> Fmt<&'a str> {
        core::str::from_utf8(self.take(n)?).map_err(|_| FormatError::BadName)
    }
}

fn to_usize(v: u64) -> Fmt<usize> {
    usize::try_from(v).map_err(|_| FormatError::Overflow)
}

/// One config entry.
fn read_entry<'a>(c: &mut Cursor<'a>) -> Fmt<(&'a str, Value<'a>)> {
    let key_len = usize::from(c.u8()?);
    if key_len == 0 {
        return Err(FormatError::BadName);
    }
    let key = c.str(key_len)?;
    let value = match c.u8()? {
        0 => Value::U64(c.u64()?),
        1 => Value::F64(f64::from_bits(c.u64()?)),
        2 => match c.u8()? {
            0 => Value::Bool(false),
            1 => Value::Bool(true),
            _ => return Err(FormatError::BadValue),
        },
        3 => {
            let n = usize::from(c.u16()?);
            Value::Str(c.str(n)?)
        }
        tag => return Err(FormatError::UnknownTag { tag }),
    };
    Ok((key, value))
}

/// One directory entry: name, dtype, shape, ndim, byte size.
fn read_tensor<'a>(c: &mut Cursor<'a>) -> Fmt<(&'a str, Dtype, [usize; MAX_DIMS], usize, usize)> {
    let name_len = usize::from(c.u16()?);
    if name_len == 0 || name_len > MAX_NAME {
        return Err(FormatError::BadName);
    }
    let name = c.str(name_len)?;
    let dtype = Dtype::from_code(c.u8()?)?;
    let ndim_raw = c.u8()?;
    let ndim = usize::from(ndim_raw);
    if ndim > MAX_DIMS {
        return Err(FormatError::TooManyDims { ndim: ndim_raw });
    }
    let mut shape = [1usize; MAX_DIMS];
    let mut bytes = dtype.size();
    for d in shape.iter_mut().take(ndim) {
        *d = to_usize(c.u64()?)?;
        bytes = bytes.checked_mul(*d).ok_or(FormatError::Overflow)?;
    }
    Ok((name, dtype, shape, ndim, bytes))
}

impl<'a> AdapterFile<'a> {
    /// Parses and checks a whole file (see the module docs for every check).
    ///
    /// # Errors
    /// A [`FormatError`] saying what is wrong first.
    pub fn parse(bytes: &'a [u8]) -> core::result::Result<Self, FormatError> {
        let fixed =
            bytes.get(..FIXED).ok_or(FormatError::Truncated { needed: (FIXED + TRAILER) as u64, len: bytes.len() })?;
        let mut c = Cursor { buf: fixed };
        if c.array::<8>()? != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = c.u32()?;
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion { version });
        }
        let method = method_from_code(c.u8()?)?;
        if c.array::<3>()? != [0; 3] {
            return Err(FormatError::Reserved);
        }
        let (n_config, n_tensors) = (u64::from(c.u32()?), u64::from(c.u32()?));
        let (header_len, data_len) = (c.u64()?, c.u64()?);
        if n_config > MAX_CONFIG as u64 {
            return Err(FormatError::TooMany { what: "config entries", count: n_config });
        }
        if n_tensors > MAX_TENSORS as u64 {
            return Err(FormatError::TooMany { what: "tensors", count: n_tensors });
        }
        let total = header_len
            .checked_add(data_len)
            .and_then(|n| n.checked_add((FIXED + TRAILER) as u64))
            .ok_or(FormatError::Overflow)?;
        if (bytes.len() as u64) < total {
            return Err(FormatError::Truncated { needed: total, len: bytes.len() });
        }
        if bytes.len() as u64 > total {
            return Err(FormatError::TrailingBytes { expected: total, len: bytes.len() });
        }
        // total == bytes.len(), so both lengths fit in usize from here on.
        let (body, trailer) = bytes.split_at(bytes.len() - TRAILER);
        let mut stored = [0u8; 4];
        stored.copy_from_slice(trailer);
        let (stored, computed) = (u32::from_le_bytes(stored), crc32(body));
        if stored != computed {
            return Err(FormatError::Checksum { stored, computed });
        }
        let (header_len, data_len) = (to_usize(header_len)?, to_usize(data_len)?);
        let rest = body.get(FIXED..).ok_or(FormatError::HeaderLength)?;
        let (header, data) = rest.split_at(header_len.min(rest.len()));
        if data.len() != data_len {
            return Err(FormatError::HeaderLength);
        }
        let (n_config, n_tensors) = (to_usize(n_config)?, to_usize(n_tensors)?);
        let mut c = Cursor { buf: header };
        for _ in 0..n_config {
            read_entry(&mut c)?;
        }
        let config = header.get(..header.len() - c.buf.len()).ok_or(FormatError::HeaderLength)?;
        let directory = c.buf;
        let mut sum = 0usize;
        for _ in 0..n_tensors {
            let (_, _, _, _, bytes) = read_tensor(&mut c)?;
            sum = sum.checked_add(bytes).ok_or(FormatError::Overflow)?;
        }
        if !c.buf.is_empty() {
            return Err(FormatError::HeaderLength);
        }
        if sum != data_len {
            return Err(FormatError::DataLength { declared: data_len as u64, tensors: sum as u64 });
        }
        let file = Self { method, n_config, n_tensors, config, directory, data };
        // Unique keys: quadratic, bounded by MAX_CONFIG.
        for (i, (a, _)) in file.config().enumerate() {
            if file.config().skip(i + 1).any(|(b, _)| b == a) {
                return Err(FormatError::DuplicateKey);
            }
        }
        // Unique names: quadratic, bounded by MAX_TENSORS.
        for (i, a) in file.tensors().enumerate() {
            if file.tensors().skip(i + 1).any(|b| b.name == a.name) {
                return Err(FormatError::DuplicateName);
            }
        }
        Ok(file)
    }

    /// The method the adapter belongs to.
    pub fn method(&self) -> Method {
        self.method
    }

    /// The configuration entries, in file order.
    pub fn config(&self) -> impl Iterator<Item = (&'a str, Value<'a>)> + 'a {
        let mut c = Cursor { buf: self.config };
        // Entries were checked by `parse`; `ok()` only ends the iteration.
        (0..self.n_config).map_while(move |_| read_entry(&mut c).ok())
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<Value<'a>> {
        self.config().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// An integer value.
    ///
    /// # Errors
    /// [`FormatError::MissingKey`], [`FormatError::WrongType`].
    pub fn get_u64(&self, key: &'static str) -> core::result::Result<u64, FormatError> {
        match self.get(key) {
            Some(Value::U64(v)) => Ok(v),
            Some(_) => Err(FormatError::WrongType { key }),
            None => Err(FormatError::MissingKey { key }),
        }
    }

    /// A float value (integers are accepted and converted).
    ///
    /// # Errors
    /// [`FormatError::MissingKey`], [`FormatError::WrongType`].
    pub fn get_f64(&self, key: &'static str) -> core::result::Result<f64, FormatError> {
        match self.get(key) {
            Some(Value::F64(v)) => Ok(v),
            Some(Value::U64(v)) => Ok(v as f64),
            Some(_) => Err(FormatError::WrongType { key }),
            None => Err(FormatError::MissingKey { key }),
        }
    }

    /// A boolean value.
    ///
    /// # Errors
    /// [`FormatError::MissingKey`], [`FormatError::WrongType`].
    pub fn get_bool(&self, key: &'static str) -> core::result::Result<bool, FormatError> {
        match self.get(key) {
            Some(Value::Bool(v)) => Ok(v),
            Some(_) => Err(FormatError::WrongType { key }),
            None => Err(FormatError::MissingKey { key }),
        }
    }

    /// A string value.
    ///
    /// # Errors
    /// [`FormatError::MissingKey`], [`FormatError::WrongType`].
    pub fn get_str(&self, key: &'static str) -> core::result::Result<&'a str, FormatError> {
        match self.get(key) {
            Some(Value::Str(v)) => Ok(v),
            Some(_) => Err(FormatError::WrongType { key }),
            None => Err(FormatError::MissingKey { key }),
        }
    }

    /// Number of tensors.
    pub fn num_tensors(&self) -> usize {
        self.n_tensors
    }

    /// The tensors, in file order.
    pub fn tensors(&self) -> impl Iterator<Item = TensorView<'a>> + 'a {
        let mut c = Cursor { buf: self.directory };
        let mut data = self.data;
        (0..self.n_tensors).map_while(move |_| {
            let (name, dtype, shape, ndim, bytes) = read_tensor(&mut c).ok()?;
            let (d, rest) = data.split_at_checked(bytes)?;
            data = rest;
            Some(TensorView { name, dtype, shape, ndim, data: d })
        })
    }

    /// The tensor called `name`.
    ///
    /// # Errors
    /// [`FormatError::MissingTensor`].
    pub fn tensor(&self, name: &str) -> core::result::Result<TensorView<'a>, FormatError> {
        self.tensors().find(|t| t.name == name).ok_or(FormatError::MissingTensor)
    }
}

fn entry_len(key: &str, v: &Value<'_>) -> Fmt<usize> {
    if key.is_empty() || key.len() > usize::from(u8::MAX) {
        return Err(FormatError::BadName);
    }
    let value = match v {
        Value::U64(_) | Value::F64(_) => 8,
        Value::Bool(_) => 1,
        Value::Str(s) if s.len() <= usize::from(u16::MAX) => 2 + s.len(),
        Value::Str(_) => return Err(FormatError::BadName),
    };
    Ok(1 + key.len() + 1 + value)
}

/// Header and data lengths of a file, after checking every entry.
fn lengths<T: Encodable>(config: &[(&str, Value<'_>)], tensors: &[T]) -> Result<(usize, usize)> {
    if config.len() > MAX_CONFIG {
        return Err(FormatError::TooMany { what: "config entries", count: config.len() as u64 }.into());
    }
    if tensors.len() > MAX_TENSORS {
        return Err(FormatError::TooMany { what: "tensors", count: tensors.len() as u64 }.into());
    }
    let mut header = 0usize;
    for (i, (k, v)) in config.iter().enumerate() {
        if config.iter().skip(i + 1).any(|(j, _)| j == k) {
            return Err(FormatError::DuplicateKey.into());
        }
        header = header.checked_add(entry_len(k, v)?).ok_or(Error::Overflow)?;
    }
    let mut data = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        if t.name().is_empty() || t.name().len() > MAX_NAME {
            return Err(FormatError::BadName.into());
        }
        if tensors.iter().skip(i + 1).any(|u| u.name() == t.name()) {
            return Err(FormatError::DuplicateName.into());
        }
        if t.shape().len() > MAX_DIMS {
            return Err(FormatError::TooManyDims { ndim: t.shape().len().min(255) as u8 }.into());
        }
        let numel = t.shape().iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or(Error::Overflow)?;
        check_len(Operand::Parameter, numel, t.len())?;
        let entry = 2 + t.name().len() + 2 + 8 * t.shape().len();
        header = header.checked_add(entry).ok_or(Error::Overflow)?;
        data = numel.checked_mul(t.dtype().size()).and_then(|b| data.checked_add(b)).ok_or(Error::Overflow)?;
    }
    Ok((header, data))
}

/// Bytes [`encode`] writes for these entries.
///
/// # Errors
/// As [`encode`], but never [`FormatError::BufferTooSmall`].
pub fn encoded_len<E: Element>(config: &[(&str, Value<'_>)], tensors: &[Tensor<'_, E>]) -> Result<usize> {
    total_len(config, tensors)
}

/// Bytes [`encode_raw`] writes for these entries.
///
/// # Errors
/// As [`encode_raw`], but never [`FormatError::BufferTooSmall`].
pub fn encoded_len_raw(config: &[(&str, Value<'_>)], tensors: &[RawTensor<'_>]) -> Result<usize> {
    total_len(config, tensors)
}

fn total_len<T: Encodable>(config: &[(&str, Value<'_>)], tensors: &[T]) -> Result<usize> {
    let (h, d) = lengths(config, tensors)?;
    h.checked_add(d).and_then(|n| n.checked_add(FIXED + TRAILER)).ok_or(Error::Overflow)
}

/// A bounds-checked little-endian writer.
struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let end = self.pos.saturating_add(bytes.len());
        if let Some(dst) = self.buf.get_mut(self.pos..end) {
            dst.copy_from_slice(bytes);
        }
        self.pos = end;
    }
}

/// Writes a file into the front of `out` and returns its length.
///
/// # Errors
/// [`Error::Format`] with [`FormatError::BufferTooSmall`] (see
/// [`encoded_len`]), [`FormatError::BadName`], [`FormatError::DuplicateName`],
/// [`FormatError::DuplicateKey`],
/// [`FormatError::TooManyDims`], [`FormatError::TooMany`];
/// [`Error::ShapeMismatch`] (`Parameter`) if a tensor's data does not match
/// its shape; [`Error::Overflow`]. Nothing is written on error.
pub fn encode<E: Element>(
    method: Method,
    config: &[(&str, Value<'_>)],
    tensors: &[Tensor<'_, E>],
    out: &mut [u8],
) -> Result<usize> {
    encode_any(method, config, tensors, out)
}

/// [`encode`] for tensors given as stored bytes, each with its own element
/// type: a file read with [`AdapterFile::parse`] is written back bit for
/// bit, whatever mix of types it holds.
///
/// # Errors
/// As [`encode`]; [`Error::ShapeMismatch`] also if a tensor's byte length
/// is not its element count times its type's size.
pub fn encode_raw(
    method: Method,
    config: &[(&str, Value<'_>)],
    tensors: &[RawTensor<'_>],
    out: &mut [u8],
) -> Result<usize> {
    encode_any(method, config, tensors, out)
}

fn encode_any<T: Encodable>(
    method: Method,
    config: &[(&str, Value<'_>)],
    tensors: &[T],
    out: &mut [u8],
) -> Result<usize> {
    let (header_len, data_len) = lengths(config, tensors)?;
    let total = header_len.checked_add(data_len).and_then(|n| n.checked_add(FIXED + TRAILER)).ok_or(Error::Overflow)?;
    if out.len() < total {
        return Err(FormatError::BufferTooSmall { needed: total, len: out.len() }.into());
    }
    let mut w = Writer { buf: out, pos: 0 };
    w.put(&MAGIC);
    w.put(&VERSION.to_le_bytes());
    w.put(&[method_code(method), 0, 0, 0]);
    // Counts are bounded by MAX_CONFIG and MAX_TENSORS (checked above).
    w.put(&(config.len() as u32).to_le_bytes());
    w.put(&(tensors.len() as u32).to_le_bytes());
    w.put(&(header_len as u64).to_le_bytes());
    w.put(&(data_len as u64).to_le_bytes());
    for (k, v) in config {
        // Key length <= 255 (checked in `lengths`).
        w.put(&[k.len() as u8]);
        w.put(k.as_bytes());
        match v {
            Value::U64(x) => {
                w.put(&[0]);
                w.put(&x.to_le_bytes());
            }
            Value::F64(x) => {
                w.put(&[1]);
                w.put(&x.to_bits().to_le_bytes());
            }
            Value::Bool(b) => w.put(&[2, u8::from(*b)]),
            Value::Str(s) => {
                w.put(&[3]);
                w.put(&(s.len() as u16).to_le_bytes());
                w.put(s.as_bytes());
            }
        }
    }
    for t in tensors {
        w.put(&(t.name().len() as u16).to_le_bytes());
        w.put(t.name().as_bytes());
        w.put(&[t.dtype().code(), t.shape().len() as u8]);
        for &d in t.shape() {
            w.put(&(d as u64).to_le_bytes());
        }
    }
    for t in tensors {
        t.write_data(&mut w);
    }
    let crc = crc32(w.buf.get(..w.pos).unwrap_or(&[]));
    w.put(&crc.to_le_bytes());
    Ok(w.pos)
}

/// CRC-32 (IEEE 802.3, reflected, polynomial `0xEDB88320`), as zip, PNG
/// and gzip compute it.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        let i = usize::from((crc as u8) ^ b);
        crc = (crc >> 8) ^ CRC_TABLE.get(i).copied().unwrap_or(0);
    }
    !crc
}

// Evaluated at compile time: an out-of-range index would fail the build,
// it cannot panic at run time.
#[allow(clippy::indexing_slicing)]
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests;
