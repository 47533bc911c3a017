//! The safetensors header check on arbitrary bytes: the first 8 bytes give
//! the file length it is checked against, the rest is the header text. It
//! must return, never panic, and what it accepts must describe data that
//! tiles the file exactly.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use peft_faer::hf::st::{parse_header, row_bytes};

fuzz_target!(|data: &[u8]| {
    let Some((len, json)) = data.split_first_chunk::<8>() else { return };
    let file_len = u64::from_le_bytes(*len);
    if let Ok(header) = parse_header(Path::new("fuzz.safetensors"), json, file_len) {
        let mut at = 8 + json.len() as u64;
        for e in &header.entries {
            assert_eq!(e.offset, at, "{}: not contiguous", e.name);
            // A quantized matrix's shape is its logical `[rows, cols]`, stored as whole rows of bytes.
            let stored = match (e.quant, e.shape.as_slice()) {
                (Some(f), &[rows, cols]) => rows as u64 * row_bytes(f, cols).expect("row size") as u64,
                (Some(_), shape) => panic!("{}: quantized but not a matrix: {shape:?}", e.name),
                (None, shape) => shape.iter().map(|&d| d as u64).product::<u64>() * e.dtype.size() as u64,
            };
            assert_eq!(stored, e.len, "{}: size", e.name);
            at += e.len;
        }
        assert_eq!(at, file_len);
    }
});
