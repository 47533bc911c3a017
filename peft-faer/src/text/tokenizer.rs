//! The model's tokenizer: Hugging Face `tokenizers` over `tokenizer.json`,
//! or the same byte-level BPE built from a GGUF file's `tokenizer.ggml.*`
//! metadata, so a lone `.gguf` is enough.
//!
//! # Two sources, two references
//! * From `tokenizer.json` the ids are transformers' (`encode(text,
//!   add_special_tokens=False)`), special tokens written in the text
//!   included, and the post-processor adds what `add_special_tokens=True`
//!   adds.
//! * From GGUF metadata the ids are llama.cpp's (`llama_tokenize` with
//!   `parse_special`): `tokenizer.ggml.model = gpt2` (byte-level BPE:
//!   `tokens` in GPT-2's byte-to-unicode form, `merges` as `"left right"` in
//!   rank order), with the pre-tokenizer `tokenizer.ggml.pre` names:
//!   `gpt-2` (and `default`) is GPT-2's regex; `smollm` isolates every digit
//!   first, then applies GPT-2's regex, as llama.cpp does (transformers'
//!   own GGUF conversion does not, so the two differ on whitespace before
//!   a digit); and `tokenizer.ggml.model = llama` (SentencePiece: pieces
//!   with `scores`, byte fallback through the `<0xXX>` tokens, a `▁`
//!   space prefix unless `add_space_prefix` is false), whose ids equal
//!   sentencepiece's own. CONTROL tokens (`token_type` 3) and the unknown
//!   token are special, USER_DEFINED (4) are added tokens; BOS/EOS are
//!   added when `add_bos_token` / `add_eos_token` say so (llama.cpp's
//!   defaults when absent: BOS for SentencePiece only). Other models
//!   (`bert`, `t5`, `rwkv`, ...) and pre-tokenizers are refused naming the
//!   key and its value.

use std::path::{Path, PathBuf};

use serde_json::{Value as Json, json};

use super::TextError;
use crate::gguf::{Gguf, Value};

/// A tokenizer with the facts generation and chat need: BOS/EOS and the
/// chat template, wherever the model keeps them.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: PathBuf,
    /// The beginning-of-sequence token (`bos_token`), when the model has one.
    pub bos: Option<u32>,
    /// The end-of-sequence token (`eos_token`), when the model has one.
    pub eos: Option<u32>,
    /// Ids that end generation: `eos`, and a GGUF's `eot_token_id` and
    /// `eom_token_id`.
    pub stop_ids: Vec<u32>,
    /// The padding token (`pad_token`), when the model names one.
    pub pad: Option<u32>,
    /// The chat template (Jinja source), when the model has one:
    /// `chat_template.jinja`, `tokenizer_config.json`'s `chat_template`, or
    /// the GGUF's `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    /// Where the template came from (for messages).
    pub chat_template_source: PathBuf,
    /// GGUF only: the ids put around an encoding with special tokens
    /// (`add_bos_token`, `add_eos_token`); `tokenizer.json` does this in
    /// its post-processor.
    wrap: (Option<u32>, Option<u32>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

/// The largest `tokenizer.json` read (bytes): a real one is a few MB.
pub const MAX_TOKENIZER_BYTES: u64 = 64 << 20;

fn err(source: &Path, reason: impl Into<String>) -> TextError {
    TextError::Tokenizer { source: source.to_path_buf(), reason: reason.into() }
}

/// A regular file's text, read through [`crate::files::read_bounded`]
/// (refused past `limit` bytes), which must be UTF-8.
pub(crate) fn read_text(path: &Path, limit: u64) -> Result<String, TextError> {
    let bytes = crate::files::read_bounded(path, limit).map_err(crate::hf::HfError::from)?;
    String::from_utf8(bytes).map_err(|e| TextError::Data {
        file: path.to_path_buf(),
        line: 0,
        reason: format!("not UTF-8 ({e})"),
    })
}

/// A special token's text in `tokenizer_config.json`: a string or an
/// `AddedToken` object (`{"content": ...}`).
fn token_text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl Tokenizer {
    /// The tokenizer of a model: a `.gguf` file's metadata, or a folder's
    /// `tokenizer.json` (with `tokenizer_config.json` and
    /// `chat_template.jinja` beside it when present).
    ///
    /// # Errors
    /// [`TextError::Tokenizer`] naming the file and the key or field.
    pub fn open(model: &Path) -> Result<Self, TextError> {
        if crate::llama::gguf::is_gguf(model) {
            return Self::from_gguf(&Gguf::open(model)?);
        }
        let dir = if model.is_dir() { model } else { model.parent().unwrap_or(Path::new(".")) };
        Self::from_dir(dir)
    }

    /// The tokenizer of a Hugging Face folder: `tokenizer.json`, and when
    /// present `tokenizer_config.json` (`bos_token`, `eos_token`,
    /// `pad_token`, `chat_template`) and `chat_template.jinja` (which wins,
    /// as in transformers).
    ///
    /// # Errors
    /// [`TextError::Tokenizer`] naming the file and field;
    /// [`TextError::Hf`] for I/O.
    pub fn from_dir(dir: &Path) -> Result<Self, TextError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(err(&path, "no tokenizer.json in the model folder (or pass a .gguf, whose metadata has one)"));
        }
        let text = read_text(&path, MAX_TOKENIZER_BYTES)?;
        let inner: tokenizers::Tokenizer = text.parse().map_err(|e| err(&path, format!("{e}")))?;
        let mut t = Self::bare(inner, path);
        let config_path = dir.join("tokenizer_config.json");
        if config_path.is_file() {
            let config: Json = serde_json::from_str(&read_text(&config_path, MAX_TOKENIZER_BYTES)?)
                .map_err(|e| err(&config_path, format!("not JSON: {e}")))?;
            let id = |key: &str| -> Result<Option<u32>, TextError> {
                match token_text(config.get(key)) {
                    None => Ok(None),
                    Some(s) => t
                        .inner
                        .token_to_id(&s)
                        .map(Some)
                        .ok_or_else(|| err(&config_path, format!("{key} {s:?} is not in the vocabulary"))),
                }
            };
            let (bos, eos, pad) = (id("bos_token")?, id("eos_token")?, id("pad_token")?);
            (t.bos, t.eos, t.pad) = (bos, eos, pad);
            match config.get("chat_template") {
                Some(Json::String(s)) => t.set_template(s.clone(), &config_path),
                // A list of named templates: transformers takes "default".
                Some(Json::Array(list)) => {
                    let default = list.iter().find(|e| e.get("name").and_then(Json::as_str) == Some("default"));
                    if let Some(s) = default.and_then(|e| e.get("template")).and_then(Json::as_str) {
                        t.set_template(s.to_owned(), &config_path);
                    }
                }
                _ => {}
            }
        }
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            t.set_template(read_text(&jinja, MAX_TOKENIZER_BYTES)?, &jinja);
        }
        t.stop_ids = t.eos.into_iter().collect();
        Ok(t)
    }

    fn bare(inner: tokenizers::Tokenizer, source: PathBuf) -> Self {
        Self {
            inner,
            chat_template_source: source.clone(),
            source,
            bos: None,
            eos: None,
            stop_ids: Vec::new(),
            pad: None,
            chat_template: None,
            wrap: (None, None),
        }
    }

    fn set_template(&mut self, text: String, source: &Path) {
        self.chat_template = Some(text);
        self.chat_template_source = source.to_path_buf();
    }

    /// The tokenizer a GGUF file's metadata describes (see the module
    /// docs for what is read and what is refused).
    ///
    /// # Errors
    /// [`TextError::Tokenizer`] naming the file and the key.
    pub fn from_gguf(g: &Gguf) -> Result<Self, TextError> {
        let path = g.path();
        let e = |reason: String| err(path, reason);
        let s = |key: &str| g.get(key).and_then(Value::as_str);
        let id = |key: &str| g.get(key).and_then(Value::as_u64).and_then(|v| u32::try_from(v).ok());
        let flag = |key: &str| matches!(g.get(key), Some(Value::Bool(true)));
        let model = s("tokenizer.ggml.model");
        if !matches!(model, Some("gpt2" | "llama")) {
            return Err(e(match model {
                Some(other) => format!(
                    "tokenizer.ggml.model = {other:?}: the tokenizers read from GGUF metadata are byte-level BPE (\"gpt2\") and SentencePiece (\"llama\"); pass the model's tokenizer.json folder instead"
                ),
                None => "no tokenizer.ggml.model: the file carries no tokenizer".into(),
            }));
        }
        let strings = |key: &str| match g.get(key).and_then(Value::as_array) {
            Some(crate::gguf::Array::Str(v)) => Ok(v),
            Some(_) => Err(e(format!("{key} is not an array of strings"))),
            None => Err(e(format!("{key} is missing"))),
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let types: Vec<i32> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(crate::gguf::Array::I32(v)) if v.len() == tokens.len() => v.clone(),
            Some(_) => return Err(e("tokenizer.ggml.token_type is not an i32 array as long as the tokens".into())),
            None => vec![1; tokens.len()],
        };
        let json = match model {
            Some("gpt2") => {
                let merges = strings("tokenizer.ggml.merges")?;
                let pre = pre_tokenizer(s("tokenizer.ggml.pre").unwrap_or("default")).map_err(e)?;
                bpe_json(tokens, merges, &types, pre).map_err(e)?
            }
            Some("llama") => {
                let scores = match g.get("tokenizer.ggml.scores").and_then(Value::as_array) {
                    Some(crate::gguf::Array::F32(v)) if v.len() == tokens.len() => v,
                    _ => return Err(e("tokenizer.ggml.scores is not an f32 array as long as the tokens".into())),
                };
                // llama.cpp's default for a SentencePiece vocabulary: a space prefix.
                let prefix = !matches!(g.get("tokenizer.ggml.add_space_prefix"), Some(Value::Bool(false)));
                spm_json(tokens, scores, &types, prefix).map_err(e)?
            }
            _ => return Err(e("tokenizer.ggml.model: checked above".into())),
        };
        let inner: tokenizers::Tokenizer = json.to_string().parse().map_err(|x| e(format!("{x}")))?;
        let mut t = Self::bare(inner, path.to_path_buf());
        let vocab = tokens.len();
        let check = |key: &str| -> Result<Option<u32>, TextError> {
            match id(key) {
                Some(v) if v as usize >= vocab => Err(e(format!("{key} = {v} is outside the {vocab} tokens"))),
                v => Ok(v),
            }
        };
        t.bos = check("tokenizer.ggml.bos_token_id")?;
        t.eos = check("tokenizer.ggml.eos_token_id")?;
        t.pad = check("tokenizer.ggml.padding_token_id")?;
        let mut stops: Vec<u32> = t.eos.into_iter().collect();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(v) = check(key)?
                && !stops.contains(&v)
            {
                stops.push(v);
            }
        }
        t.stop_ids = stops;
        // llama.cpp's default for a BPE vocabulary is to add no BOS.
        t.wrap = (
            t.bos.filter(|_| flag("tokenizer.ggml.add_bos_token")),
            t.eos.filter(|_| flag("tokenizer.ggml.add_eos_token")),
        );
        if let Some(tpl) = s("tokenizer.chat_template") {
            t.set_template(tpl.to_owned(), path);
        }
        Ok(t)
    }

    /// Where the tokenizer came from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The number of ids (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The ids of `text`. Special tokens written in the text are matched
    /// as tokens; `add_special` adds what the model adds (BOS, ...).
    ///
    /// # Errors
    /// [`TextError::Tokenizer`] when `tokenizers` fails.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TextError> {
        let enc = self.inner.encode(text, add_special).map_err(|e| err(&self.source, format!("{e}")))?;
        let mut ids = Vec::with_capacity(enc.len() + 2);
        if add_special {
            ids.extend(self.wrap.0);
        }
        ids.extend_from_slice(enc.get_ids());
        if add_special {
            ids.extend(self.wrap.1);
        }
        Ok(ids)
    }

    /// The text of `ids` (`skip_special`: leave out special tokens).
    ///
    /// # Errors
    /// [`TextError::Tokenizer`] when an id is outside the vocabulary.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TextError> {
        let vocab = self.vocab_size();
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(err(&self.source, format!("token id {bad} is outside the {vocab} ids")));
        }
        self.inner.decode(ids, skip_special).map_err(|e| err(&self.source, format!("{e}")))
    }

    /// The id of a token's text (`"<|im_end|>"`), if it is one token.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The text of the token `id` as the vocabulary spells it.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// A decoder fed one id at a time that yields only whole characters:
    /// the concatenation of its pieces is [`Tokenizer::decode`] of the ids.
    pub fn stream(&self, skip_special: bool) -> TextStream<'_> {
        TextStream { tok: self, ids: Vec::new(), emitted: 0, skip_special }
    }

    /// Whether `id` is a special token (left out of decoded text with
    /// `skip_special`).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.get_added_tokens_decoder().get(&id).is_some_and(|t| t.special)
    }
}

/// Incremental decoding: see [`Tokenizer::stream`].
#[derive(Debug)]
pub struct TextStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    emitted: usize,
    skip_special: bool,
}

impl TextStream<'_> {
    /// Feeds `id`; returns the new text, held back while it ends inside a
    /// UTF-8 sequence (`decode` then ends with U+FFFD).
    ///
    /// The whole text is decoded again at each step: generation is bounded
    /// by the context length, and this keeps decoders that look at
    /// neighbours (SentencePiece's leading space) exact.
    ///
    /// # Errors
    /// [`Tokenizer::decode`]'s.
    pub fn push(&mut self, id: u32) -> Result<String, TextError> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids, self.skip_special)?;
        if text.ends_with('\u{FFFD}') || !text.is_char_boundary(self.emitted.min(text.len())) {
            return Ok(String::new());
        }
        let new = text.get(self.emitted..).unwrap_or_default().to_owned();
        self.emitted = text.len();
        Ok(new)
    }

    /// What is still held back (an unfinished UTF-8 sequence shown as
    /// U+FFFD, or a text that really ends with U+FFFD), at the end of the
    /// stream.
    ///
    /// # Errors
    /// [`Tokenizer::decode`]'s.
    pub fn finish(&mut self) -> Result<String, TextError> {
        let text = self.tok.decode(&self.ids, self.skip_special)?;
        let rest = text.get(self.emitted..).unwrap_or_default().to_owned();
        self.emitted = text.len();
        Ok(rest)
    }

    /// The whole text so far (what is still held back included).
    ///
    /// # Errors
    /// [`Tokenizer::decode`]'s.
    pub fn text(&self) -> Result<String, TextError> {
        self.tok.decode(&self.ids, self.skip_special)
    }
}

/// The `pre_tokenizer` of `tokenizer.json` for llama.cpp's
/// `tokenizer.ggml.pre` name.
fn pre_tokenizer(name: &str) -> Result<Json, String> {
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    match name {
        "default" | "gpt-2" => Ok(byte_level),
        "smollm" => Ok(json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level,
        ]})),
        other => Err(format!(
            "tokenizer.ggml.pre = {other:?}: the pre-tokenizers read from GGUF metadata are \"gpt-2\", \"default\" and \"smollm\"; pass the model's tokenizer.json folder instead"
        )),
    }
}

/// `tokenizer.json` for a SentencePiece vocabulary from GGUF metadata (the
/// layout transformers' `LlamaConverter` gives): spaces become `▁` (with
/// one in front when `prefix`), a BPE whose merges are every split of a
/// piece into two pieces, ranked by the merged piece's score (highest
/// first), which is SentencePiece's rule of merging the best-scoring
/// adjacent pair; characters outside the vocabulary fall back to their
/// `<0xXX>` byte tokens.
fn spm_json(tokens: &[String], scores: &[f32], types: &[i32], prefix: bool) -> Result<Json, String> {
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut ids = std::collections::HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if ids.insert(t.as_str(), i).is_some() {
            return Err(format!("tokenizer.ggml.tokens[{i}] = {t:?} appears twice"));
        }
        vocab.insert(t.clone(), json!(i));
    }
    // (score of the merged piece, its id, left id, right id).
    let mut merges: Vec<(f32, usize, usize, usize, &str, &str)> = Vec::new();
    for (i, (t, (&score, &kind))) in tokens.iter().zip(scores.iter().zip(types)).enumerate() {
        if !matches!(kind, 1 | 4) {
            continue;
        }
        for (cut, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(cut);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                merges.push((score, i, li, ri, l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2, a.3).cmp(&(b.1, b.2, b.3))));
    let pairs: Vec<Json> = merges.iter().map(|m| json!([m.4, m.5])).collect();
    let unk = types.iter().position(|&t| t == 2).and_then(|i| tokens.get(i));
    let added: Vec<Json> = types
        .iter()
        .zip(tokens)
        .enumerate()
        .filter(|(_, (t, _))| matches!(t, 2..=4))
        .map(|(i, (t, s))| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": *t != 4})
        })
        .collect();
    let mut normalizers = Vec::new();
    if prefix {
        normalizers.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
    }
    normalizers.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if prefix {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": pairs},
    }))
}

/// `tokenizer.json` for a byte-level BPE vocabulary from GGUF metadata.
fn bpe_json(tokens: &[String], merges: &[String], types: &[i32], pre: Json) -> Result<Json, String> {
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if vocab.insert(t.clone(), json!(i)).is_some() {
            return Err(format!("tokenizer.ggml.tokens[{i}] = {t:?} appears twice"));
        }
    }
    let mut pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let (l, r) =
            m.split_once(' ').ok_or_else(|| format!("tokenizer.ggml.merges[{i}] = {m:?} is not \"left right\""))?;
        pairs.push(json!([l, r]));
    }
    // CONTROL (3) tokens are special; USER_DEFINED (4) are added tokens
    // matched in text but decoded as text.
    let added: Vec<Json> = types
        .iter()
        .zip(tokens)
        .enumerate()
        .filter(|(_, (t, _))| matches!(t, 3 | 4))
        .map(|(i, (t, s))| {
            json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": *t == 3})
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": pairs},
    }))
}
