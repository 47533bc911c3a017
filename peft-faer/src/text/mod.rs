//! Text in, text out: the model's tokenizer ([`Tokenizer`], from
//! `tokenizer.json` or a GGUF file's `tokenizer.ggml.*` metadata), its chat
//! template ([`ChatTemplate`], rendered as transformers'
//! `apply_chat_template`), sampling in transformers' order ([`Sampler`]),
//! text generation over the Llama host ([`generate()`]), and fine-tuning on
//! JSONL data as TRL's `SFTTrainer` takes it ([`data`], [`sft`]).
//!
//! Everything here is pure Rust: `tokenizers` is built with `fancy-regex`
//! (no Oniguruma), templates run in `minijinja`.

pub mod chat;
pub mod data;
pub mod generate;
pub mod sample;
pub mod sft;
pub mod tokenizer;

use std::fmt;
use std::path::PathBuf;

pub use chat::{ChatTemplate, Message};
pub use generate::{GenerateOptions, Generated, generate, generate_batch, generate_ids};
pub use sample::{Sampler, SamplingOptions};
pub use tokenizer::Tokenizer;

use crate::hf::HfError;

/// What can go wrong on the text side: each names the file and what in it
/// (a field, a line, a key).
#[derive(Debug)]
pub enum TextError {
    /// A tokenizer could not be built or run (`tokenizer.json`, a GGUF's
    /// `tokenizer.ggml.*` keys, or a text it could not encode).
    Tokenizer {
        /// The file the tokenizer came from.
        source: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A chat template could not be read, compiled or rendered.
    Template {
        /// The file the template came from.
        source: PathBuf,
        /// What is wrong (minijinja's message, with the template line).
        reason: String,
    },
    /// A record of a data file is malformed.
    Data {
        /// The data file.
        file: PathBuf,
        /// The line (1-based; 0 for the file as a whole).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// An option's value is out of range (the option's name, why).
    Option(String, String),
    /// The model, adapter or file layer's error.
    Hf(HfError),
}

impl fmt::Display for TextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TextError::Tokenizer { source, reason } => write!(f, "{}: tokenizer: {reason}", source.display()),
            TextError::Template { source, reason } => write!(f, "{}: chat template: {reason}", source.display()),
            TextError::Data { file, line: 0, reason } => write!(f, "{}: {reason}", file.display()),
            TextError::Data { file, line, reason } => write!(f, "{}:{line}: {reason}", file.display()),
            TextError::Option(name, why) => write!(f, "{name}: {why}"),
            TextError::Hf(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for TextError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TextError::Hf(e) => Some(e),
            _ => None,
        }
    }
}

impl From<HfError> for TextError {
    fn from(e: HfError) -> Self {
        TextError::Hf(e)
    }
}
