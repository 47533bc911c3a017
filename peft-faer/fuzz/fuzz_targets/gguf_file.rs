//! A GGUF file (`peft_faer::gguf`) on arbitrary bytes: the header,
//! metadata and tensor table must be refused with an error or accepted
//! with every tensor inside the file, on the alignment, not overlapping
//! another, its length its shape's whole blocks; and every accepted
//! block-format matrix decodes to finite values unless a block's f16
//! field is refused (`first_bad_block_scale`), as the model loader does.
//! The Llama config read from the metadata is refused or within
//! `LlamaConfig`'s limits; the tokenizer built from the metadata is
//! refused or encodes and decodes a short text.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use peft_core::storage::{StoredWeight, dequantize, first_bad_block_scale};
use peft_faer::gguf::Gguf;
use peft_faer::llama::{LlamaConfig, MAX_DIM, MAX_LAYERS};

fuzz_target!(|data: &[u8]| {
    let Ok(g) = Gguf::from_reader(data, data.len() as u64, Path::new("fuzz.gguf")) else { return };
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for t in &g.tensors {
        assert!(t.start >= g.data_start && t.start + t.len <= data.len() as u64, "{}: outside the file", t.name);
        assert_eq!((t.start - g.data_start) % g.alignment, 0, "{}: misaligned", t.name);
        let (elems, size) = t.format.block();
        let blocks: u64 = t.ne.iter().skip(1).product::<u64>() * (t.ne[0] / elems as u64);
        assert_eq!(blocks * size as u64, t.len, "{}: length", t.name);
        extents.push((t.start, t.len));
        let bytes = &data[t.start as usize..(t.start + t.len) as usize];
        let Some((rows, cols)) = t.matrix() else { continue };
        if elems == 1 || rows.saturating_mul(cols) > 1 << 20 {
            continue;
        }
        let w = StoredWeight::blocks(t.format, bytes, rows, cols).expect("an accepted tensor is a stored weight");
        let mut out = vec![0.0f32; rows * cols];
        dequantize(&w, &mut out).expect("whole rows");
        if first_bad_block_scale(t.format, bytes).is_none() {
            assert!(out.iter().all(|v| v.is_finite()), "{}: finite scales, non-finite value", t.name);
        }
    }
    extents.sort_unstable();
    for p in extents.windows(2) {
        assert!(p[0].0 + p[0].1 <= p[1].0, "overlapping tensors");
    }
    if let Ok(c) = LlamaConfig::from_gguf(&g) {
        assert!(c.hidden_size <= MAX_DIM && c.num_layers <= MAX_LAYERS && c.head_dim % 2 == 0);
    }
    if let Ok(tok) = peft_faer::text::Tokenizer::from_gguf(&g) {
        if let Ok(ids) = tok.encode("Hello world 12 <|im_end|>", true) {
            assert!(ids.iter().all(|&i| (i as usize) < tok.vocab_size()));
            tok.decode(&ids, false).expect("ids it encoded decode");
        }
    }
});
