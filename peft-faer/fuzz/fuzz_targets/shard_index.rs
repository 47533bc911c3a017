//! `model.safetensors.index.json` parsing on arbitrary text: it must
//! return, never panic, and what it accepts names each tensor's shard by a
//! valid position in a sorted list of plain, distinct file names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peft_faer::hf::base::Index;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(index) = Index::parse(text) {
        assert!(index.shards.windows(2).all(|w| w[0] < w[1]), "shards not sorted and distinct");
        for file in &index.shards {
            assert!(!file.is_empty() && !file.contains('/') && !file.starts_with('.'), "{file}");
        }
        for (tensor, &i) in &index.weight_map {
            assert!(i < index.shards.len(), "{tensor}: shard {i}");
        }
    }
});
