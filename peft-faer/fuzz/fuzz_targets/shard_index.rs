//! `model.safetensors.index.json` parsing on arbitrary text: it must
//! return, never panic, and what it accepts lists each tensor once, in a
//! plain file name.
#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use peft_faer::hf::base::Index;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(index) = Index::parse(text) {
        let mut seen = HashSet::new();
        for (tensor, file) in &index.weight_map {
            assert!(seen.insert(tensor), "{tensor} twice");
            assert!(!file.is_empty() && !file.contains('/') && !file.starts_with('.'), "{file}");
        }
    }
});
