//! llama.cpp's GGUF files: the container ([`Gguf`], read as untrusted
//! input), the names of ggml's tensor types, and (with the `llama`
//! feature) the Llama models they hold, through
//! [`Llama::load_gguf`](crate::llama::Llama::load_gguf).
//!
//! GGUF is a storage and a container, not a second model: its block types
//! are `peft-core` storage formats ([`peft_core::storage::Format`],
//! decoded exactly as ggml decodes them), and its tensors map to the
//! Hugging Face names the Llama host already uses.
//!
//! # The container (versions 2 and 3)
//!
//! ```text
//! magic "GGUF" | u32 version | u64 tensor count | u64 key/value count
//! key/value:   string key | u32 value type | value
//! tensor info: string name | u32 n_dims | u64 ne[n_dims] | u32 ggml type | u64 offset
//! padding to `general.alignment` (default 32) | tensor data
//! ```
//!
//! Strings are a u64 length and UTF-8 bytes; value types 0 u8, 1 i8,
//! 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array (u32
//! element type, u64 count, elements), 10 u64, 11 i64, 12 f64; all
//! integers little-endian. A tensor's `ne[0]` is its row length (the
//! contiguous dimension): a 2-D `ne = [in, out]` is PyTorch's `[out, in]`,
//! row-major.
//!
//! Every count and length is checked against the bytes left in the file
//! before anything is allocated from it (an element takes at least one
//! byte, a string at least eight), and arrays are held in their element
//! type ([`Array`]), so a hostile header cannot make this reader hold more
//! than three bytes of memory per byte of the file; lengths are also capped
//! ([`MAX_STRING`], [`MAX_ARRAY`], [`MAX_TENSORS`], [`MAX_KEYS`],
//! [`MAX_DIMS`], [`MAX_DEPTH`]). Tensor data must lie inside the file,
//! start on the alignment, and not overlap another tensor's.

pub mod kquant;
pub mod lora;
#[cfg(feature = "llama")]
pub mod merge;
mod names;
mod read;
pub mod write;

pub use names::{gguf_name, hf_name, hf_row, is_permuted, permute_rows};

pub use read::{
    Array, Gguf, MAX_ARRAY, MAX_DEPTH, MAX_DIMS, MAX_KEYS, MAX_STRING, MAX_TENSORS, TensorInfo, Value, format_of,
    ggml_type_name, type_of,
};
