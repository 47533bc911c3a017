//! Training data as TRL's `SFTTrainer` takes it, tokenized with the
//! model's tokenizer into [`Example`]s: ids and a loss mask.
//!
//! One record per line of a `.jsonl` file, in one of three forms (TRL's
//! defaults, `completion_only_loss` and conversational masks included):
//! * `{"text": ...}`: language modelling, loss on every token. The EOS
//!   token's text is appended unless the text already ends with it, and
//!   the text is encoded with the model's special tokens (TRL's
//!   `add_eos`, then `tokenizer(text)`).
//! * `{"prompt": ..., "completion": ...}`: loss on the completion only.
//!   EOS is appended to the completion as above; the mask is 0 over the
//!   leading ids of `tokenizer(prompt + completion)` that it shares with
//!   `tokenizer(prompt)`, 1 after (TRL's `completion_mask` with its
//!   `common_prefix_length`).
//! * `{"messages": [{"role": ..., "content": ...}, ...]}`: a conversation
//!   rendered with the model's chat template, encoded without special
//!   tokens added (as `apply_chat_template(tokenize=True)`); loss on the
//!   assistant turns only. Turn `i`'s tokens are those of
//!   `render(messages[..=i])` after those of `render(messages[..i],
//!   add_generation_prompt=True)`: TRL's masking of a conversational
//!   prompt and completion, applied to every assistant turn. This is what
//!   TRL's `assistant_only_loss` gives with a template whose `{% generation
//!   %}` block holds the message, its end-of-turn token and what the
//!   template writes after it (for ChatML, `content<|im_end|>\n`). A
//!   record whose prefixes do not tokenize as prefixes of the whole is
//!   refused.
//!
//! A `.txt` file is language-modelling text: paragraphs (separated by
//! blank lines) are records of the first form.
//!
//! Every record is checked before training starts: bad JSON, a missing
//! or non-string field, an unknown form or a record with nothing to learn
//! is refused naming the file, the line and the reason.

use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use super::chat::{ChatTemplate, Message};
use super::{TextError, Tokenizer};

/// The largest data file read (bytes).
pub const MAX_DATA_BYTES: u64 = 1 << 32;

/// One tokenized record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// The token ids.
    pub ids: Vec<u32>,
    /// 1 where the token is a target of the loss (the token is predicted
    /// from the ones before it), 0 where it is context only.
    pub mask: Vec<u8>,
    /// The line it came from (1-based).
    pub line: usize,
}

impl Example {
    /// The number of tokens the loss counts: masked positions after the
    /// first (the first token is never predicted).
    pub fn targets(&self) -> usize {
        self.mask.iter().skip(1).filter(|&&m| m == 1).count()
    }
}

/// The form of a record (what the loss covers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// `{"text"}`.
    Text(String),
    /// `{"prompt", "completion"}`.
    PromptCompletion(String, String),
    /// `{"messages"}`.
    Messages(Vec<Message>),
}

/// Reads the records of `path` (`.jsonl`, or `.txt` paragraphs) with their
/// line numbers.
///
/// # Errors
/// [`TextError::Data`] naming the file and line; [`TextError::Hf`] for
/// I/O.
pub fn read_records(path: &Path) -> Result<Vec<(usize, Record)>, TextError> {
    let text = super::tokenizer::read_text(path, MAX_DATA_BYTES)?;
    parse_records(&text, path)
}

/// The records of `text`, the contents of `path` (`.txt`: paragraphs;
/// otherwise JSONL), with their line numbers.
///
/// # Errors
/// [`TextError::Data`] naming `path` and the line.
pub fn parse_records(text: &str, path: &Path) -> Result<Vec<(usize, Record)>, TextError> {
    let is_txt = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("txt"));
    let bad = |line: usize, reason: String| TextError::Data { file: path.to_path_buf(), line, reason };
    let mut out = Vec::new();
    if is_txt {
        let mut start: Option<(usize, String)> = None;
        for (i, l) in text.lines().enumerate() {
            if l.trim().is_empty() {
                out.extend(start.take().map(|(n, s)| (n, Record::Text(s))));
            } else if let Some((_, s)) = &mut start {
                s.push('\n');
                s.push_str(l);
            } else {
                start = Some((i + 1, l.to_owned()));
            }
        }
        out.extend(start.map(|(n, s)| (n, Record::Text(s))));
    } else {
        for (i, l) in text.lines().enumerate() {
            if l.trim().is_empty() {
                continue;
            }
            let v: Json = serde_json::from_str(l).map_err(|e| bad(i + 1, format!("not JSON: {e}")))?;
            out.push((i + 1, record(&v).map_err(|r| bad(i + 1, r))?));
        }
    }
    if out.is_empty() {
        return Err(bad(0, "no records".into()));
    }
    Ok(out)
}

/// The record one JSON object holds.
fn record(v: &Json) -> Result<Record, String> {
    let Json::Object(o) = v else { return Err("a record must be a JSON object".into()) };
    let string = |key: &str| match o.get(key) {
        Some(Json::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("\"{key}\" must be a string")),
        None => Err(format!("\"{key}\" is missing")),
    };
    if o.contains_key("messages") {
        let Some(Json::Array(list)) = o.get("messages") else { return Err("\"messages\" must be a list".into()) };
        let mut messages = Vec::with_capacity(list.len());
        for (i, m) in list.iter().enumerate() {
            let field = |k: &str| m.get(k).and_then(Json::as_str).map(str::to_owned);
            match (field("role"), field("content")) {
                (Some(role), Some(content)) => messages.push(Message { role, content }),
                _ => return Err(format!("messages[{i}] needs string \"role\" and \"content\"")),
            }
        }
        if !messages.iter().any(|m| m.role == "assistant") {
            return Err("\"messages\" has no assistant turn: nothing to learn".into());
        }
        return Ok(Record::Messages(messages));
    }
    if o.contains_key("prompt") || o.contains_key("completion") {
        return Ok(Record::PromptCompletion(string("prompt")?, string("completion")?));
    }
    if o.contains_key("text") {
        return Ok(Record::Text(string("text")?));
    }
    let keys: Vec<&str> = o.keys().map(String::as_str).collect();
    Err(format!("no \"text\", \"prompt\"/\"completion\" or \"messages\" field (found {keys:?})"))
}

/// Tokenizes records as TRL does (see the module docs).
#[derive(Debug)]
pub struct Encoder<'a> {
    tok: &'a Tokenizer,
    template: Option<&'a ChatTemplate>,
    eos_text: Option<String>,
}

impl<'a> Encoder<'a> {
    /// An encoder with the model's tokenizer and, for conversations, its
    /// chat template.
    pub fn new(tok: &'a Tokenizer, template: Option<&'a ChatTemplate>) -> Self {
        Self { tok, template, eos_text: tok.eos.and_then(|e| tok.token(e)) }
    }

    fn with_eos(&self, s: &str) -> String {
        match &self.eos_text {
            Some(e) if !s.ends_with(e.as_str()) => format!("{s}{e}"),
            _ => s.to_owned(),
        }
    }

    /// The example of one record (`line` for messages).
    ///
    /// # Errors
    /// [`TextError::Data`] (a conversation without a template, prefixes
    /// that do not tokenize as prefixes, nothing to learn); the
    /// tokenizer's and the template's errors.
    pub fn encode(&self, file: &Path, line: usize, r: &Record) -> Result<Example, TextError> {
        let bad = |reason: String| TextError::Data { file: file.to_path_buf(), line, reason };
        let (ids, mask) = match r {
            Record::Text(t) => {
                let ids = self.tok.encode(&self.with_eos(t), true)?;
                let mask = vec![1; ids.len()];
                (ids, mask)
            }
            Record::PromptCompletion(p, c) => {
                let prompt = self.tok.encode(p, true)?;
                let ids = self.tok.encode(&format!("{p}{}", self.with_eos(c)), true)?;
                // Where the two encodings part (TRL's common_prefix_length):
                // a token merging across the boundary belongs to the completion.
                let start = prompt.iter().zip(&ids).take_while(|(a, b)| a == b).count();
                let mask = (0..ids.len()).map(|i| u8::from(i >= start)).collect();
                (ids, mask)
            }
            Record::Messages(m) => {
                let tpl = self.template.ok_or_else(|| {
                    bad("a \"messages\" record needs a chat template (the model has none; give --chat-template)".into())
                })?;
                let (whole, spans) = tpl.assistant_spans(m)?;
                let ids = self.tok.encode(&whole, false)?;
                let mut mask = vec![0u8; ids.len()];
                for (head, upto) in spans {
                    let a = self.tok.encode(whole.get(..head).unwrap_or_default(), false)?;
                    let b = self.tok.encode(whole.get(..upto).unwrap_or_default(), false)?;
                    if !b.starts_with(&a) || !ids.starts_with(&b) {
                        return Err(bad(format!(
                            "the conversation's tokens up to byte {upto} are not a prefix of the whole conversation's, so the assistant's tokens cannot be masked"
                        )));
                    }
                    mask.iter_mut().take(b.len()).skip(a.len()).for_each(|m| *m = 1);
                }
                (ids, mask)
            }
        };
        let ex = Example { ids, mask, line };
        Ok(ex)
    }
}

/// How examples become training sequences.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shaping {
    /// The longest sequence (tokens); longer examples are cut from the
    /// right (TRL's `max_length` truncation).
    pub max_len: usize,
    /// Concatenate the examples and cut the stream into sequences of
    /// `max_len` (TRL's `packing_strategy="wrapped"`: attention crosses
    /// example boundaries, no padding is ever needed).
    pub packing: bool,
}

/// The training sequences of `examples`. Examples with nothing to learn
/// after truncation are dropped (counted in the second value).
pub fn shape(examples: Vec<Example>, s: Shaping) -> (Vec<Example>, usize) {
    let max = s.max_len.max(2);
    if s.packing {
        let (mut ids, mut mask) = (Vec::new(), Vec::new());
        let first_line = examples.first().map_or(0, |e| e.line);
        for e in examples {
            ids.extend(e.ids);
            mask.extend(e.mask);
        }
        let out: Vec<Example> = ids
            .chunks(max)
            .zip(mask.chunks(max))
            .map(|(i, m)| Example { ids: i.to_vec(), mask: m.to_vec(), line: first_line })
            .filter(|e| e.targets() > 0)
            .collect();
        return (out, 0);
    }
    let before = examples.len();
    let out: Vec<Example> = examples
        .into_iter()
        .map(|mut e| {
            e.ids.truncate(max);
            e.mask.truncate(max);
            e
        })
        .filter(|e| e.targets() > 0)
        .collect();
    let dropped = before - out.len();
    (out, dropped)
}

/// A data set: its file and tokenized examples.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// The file.
    pub file: PathBuf,
    /// The examples, in file order.
    pub examples: Vec<Example>,
}

impl Dataset {
    /// Reads and tokenizes every record of `file`.
    ///
    /// # Errors
    /// As [`read_records`] and [`Encoder::encode`].
    pub fn load(file: &Path, enc: &Encoder<'_>) -> Result<Self, TextError> {
        let records = read_records(file)?;
        let examples = records.iter().map(|(line, r)| enc.encode(file, *line, r)).collect::<Result<_, _>>()?;
        Ok(Self { file: file.to_path_buf(), examples })
    }

    /// Splits off the last `fraction` of the examples (at least one, and
    /// at least one left) as a held-out set, after a shuffle by `seed`.
    ///
    /// # Errors
    /// [`TextError::Option`] when there are fewer than two examples.
    pub fn split(mut self, fraction: f64, seed: u64) -> Result<(Self, Self), TextError> {
        let n = self.examples.len();
        if n < 2 {
            return Err(TextError::Option(
                "--eval-split".into(),
                format!("{} has {n} example(s), fewer than 2", self.file.display()),
            ));
        }
        shuffle(&mut self.examples, seed);
        let k = ((n as f64 * fraction).round() as usize).clamp(1, n - 1);
        let held = self.examples.split_off(n - k);
        Ok((self.clone(), Self { file: self.file, examples: held }))
    }
}

/// Fisher-Yates with [`super::sample::SplitMix64`].
pub fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut rng = super::sample::SplitMix64::new(seed);
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}
