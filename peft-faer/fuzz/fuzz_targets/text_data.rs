//! Training data (`peft_faer::text::data`) on arbitrary bytes: a JSONL or
//! `.txt` file is refused with an error naming a line within the file, or
//! read into records that name a line of it; `messages` records always
//! hold an assistant turn.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use peft_faer::text::TextError;
use peft_faer::text::data::{Record, parse_records};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let lines = text.lines().count();
    for name in ["fuzz.jsonl", "fuzz.txt"] {
        match parse_records(text, Path::new(name)) {
            Ok(records) => {
                assert!(!records.is_empty());
                for (line, r) in records {
                    assert!(line >= 1 && line <= lines, "line {line} of {lines}");
                    if let Record::Messages(m) = r {
                        assert!(m.iter().any(|m| m.role == "assistant"));
                    }
                }
            }
            Err(TextError::Data { line, .. }) => assert!(line <= lines, "line {line} of {lines}"),
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }
});
