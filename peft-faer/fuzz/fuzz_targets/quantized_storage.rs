//! Quantized tensors in a safetensors file (`peft.storage.<name>` metadata,
//! see `peft_faer::hf::st`), on arbitrary bytes taken as a whole file: the
//! 8-byte header length, the header, the data. What `parse_header` accepts
//! must be decodable: each quantized tensor's bytes are exactly its rows,
//! and `decode_rows` either decodes them, every value finite, or refuses
//! an int8 row whose scale is not finite or would overflow
//! (`check_int8_rows`) or a block whose scale is not finite, as
//! the model loader does.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use peft_core::storage::{Format, Q4_0_BYTES, Q8_0_BYTES, f16_to_f32, first_bad_block_scale};
use peft_core::{Error, Operand};
use peft_faer::hf::HfError;
use peft_faer::hf::st::{decode_rows, parse_header, row_bytes};

/// Whether every block's f16 fields (scales, minimums) are finite: an
/// independent check for Q8_0 and Q4_0, `peft-core`'s for the others.
fn block_scales_finite(f: Format, bytes: &[u8]) -> bool {
    let half = |b: &[u8]| f16_to_f32(u16::from_le_bytes([b[0], b[1]])).is_finite();
    match f {
        Format::Q8_0 => bytes.chunks_exact(Q8_0_BYTES).all(half),
        Format::Q4_0 => bytes.chunks_exact(Q4_0_BYTES).all(half),
        _ => first_bad_block_scale(f, bytes).is_none(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((len, rest)) = data.split_first_chunk::<8>() else { return };
    let Ok(n) = usize::try_from(u64::from_le_bytes(*len)) else { return };
    if n > rest.len() {
        return;
    }
    let json = &rest[..n];
    let Ok(header) = parse_header(Path::new("fuzz.safetensors"), json, data.len() as u64) else { return };
    for e in header.entries {
        let Some(f) = e.quant else { continue };
        let &[rows, cols] = e.shape.as_slice() else { panic!("{}: quantized but not a matrix: {:?}", e.name, e.shape) };
        let row = row_bytes(f, cols).expect("an accepted quantized shape has a row size");
        assert_eq!(rows as u64 * row as u64, e.len, "{}: stored bytes", e.name);
        let bytes = &data[e.offset as usize..(e.offset + e.len) as usize];
        // The bytes bound the values: rows * cols <= rows * row <= the input's length.
        let mut out = vec![0.0f32; rows * cols];
        match decode_rows(f, bytes, cols, &mut out) {
            Ok(()) => assert!(out.iter().all(|v| v.is_finite()), "{}: decoded, with a non-finite value", e.name),
            Err(HfError::Core(Error::NonFinite { operand: Operand::Parameter, .. } | Error::OutOfRange { .. }))
                if f == Format::Int8 => {}
            Err(HfError::NonFinite { .. }) if !block_scales_finite(f, bytes) => {}
            Err(err) => panic!("{}: accepted, then {err}", e.name),
        }
    }
});
