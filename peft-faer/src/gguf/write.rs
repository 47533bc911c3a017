//! Writing GGUF v3 files: metadata, then tensors at multiples of 32 bytes.

use super::read::Value;

/// The alignment this writer uses (GGUF's default; `general.alignment`
/// is not written).
pub const ALIGNMENT: usize = 32;

/// A tensor to write: its name, `ne` (row length first), ggml type id and
/// stored bytes.
#[derive(Clone, Debug)]
pub struct TensorOut<'a> {
    /// The name.
    pub name: String,
    /// `ne`: the row length first.
    pub ne: Vec<u64>,
    /// The ggml type id ([`super::type_of`]).
    pub ggml_type: u32,
    /// The stored bytes.
    pub bytes: &'a [u8],
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::Str(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend(x.to_le_bytes()),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::Str(s) => string(out, s),
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
        Value::Array(a) => {
            let first = a.get(0).map_or(4, |v| value_type(&v));
            out.extend(first.to_le_bytes());
            out.extend((a.len() as u64).to_le_bytes());
            for i in 0..a.len() {
                if let Some(v) = a.get(i) {
                    value(out, &v);
                }
            }
        }
    }
}

/// The bytes of a GGUF v3 file holding `metadata` and `tensors`, in the
/// order given (what llama.cpp's `gguf-py` writer produces for the same
/// content: header, key/values, tensor infos, padding, data, each tensor
/// padded to [`ALIGNMENT`]).
pub fn to_bytes(metadata: &[(String, Value)], tensors: &[TensorOut<'_>]) -> Vec<u8> {
    let data_len: usize = tensors.iter().map(|t| t.bytes.len().div_ceil(ALIGNMENT) * ALIGNMENT).sum();
    let mut out = Vec::with_capacity(4096 + data_len);
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        string(&mut out, k);
        out.extend(value_type(v).to_le_bytes());
        value(&mut out, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        string(&mut out, &t.name);
        out.extend((t.ne.len() as u32).to_le_bytes());
        t.ne.iter().for_each(|n| out.extend(n.to_le_bytes()));
        out.extend(t.ggml_type.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (t.bytes.len().div_ceil(ALIGNMENT) * ALIGNMENT) as u64;
    }
    out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
    for t in tensors {
        out.extend(t.bytes);
        out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
    }
    out
}
