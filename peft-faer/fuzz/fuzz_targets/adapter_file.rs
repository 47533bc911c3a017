//! The adapter-file reader on arbitrary bytes: it must return, never panic,
//! and a buffer it accepts must be safe to walk. Half the inputs are
//! re-sealed with a correct checksum so the fuzzer reaches the parser behind
//! the CRC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peft_core::format::{AdapterFile, crc32};

fn walk(bytes: &[u8]) {
    if let Ok(f) = AdapterFile::parse(bytes) {
        for _ in f.config() {}
        for t in f.tensors() {
            let mut out = vec![0.0f32; t.numel()];
            t.read_into(&mut out).expect("numel-sized output is accepted");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    walk(data);
    if data.len() >= 4 {
        let mut sealed = data.to_vec();
        let n = sealed.len();
        let crc = crc32(&sealed[..n - 4]);
        sealed[n - 4..].copy_from_slice(&crc.to_le_bytes());
        walk(&sealed);
    }
});
