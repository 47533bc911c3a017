//! Chat templates, rendered as transformers' `apply_chat_template(...,
//! tokenize=False)` renders them: Jinja with `trim_blocks` and
//! `lstrip_blocks`, one trailing newline dropped, Python's string methods
//! (`.strip()`, `.startswith()`, ...) through minijinja's `pycompat`, and
//! the globals transformers gives: `messages`, `add_generation_prompt`,
//! the special tokens' texts (`bos_token`, `eos_token`, `pad_token`,
//! `unk_token`), `raise_exception(msg)` and `strftime_now(fmt)`.
//!
//! transformers' `{% generation %}` block (which marks assistant text for
//! `return_assistant_tokens_mask`) is rendered as its content: the mask
//! is built here by rendering each prefix of the conversation instead
//! (see [`ChatTemplate::assistant_spans`]).

use std::path::{Path, PathBuf};

use minijinja::{Environment, Error, ErrorKind, context};
use serde::{Deserialize, Serialize};

use super::{TextError, Tokenizer};

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant` (or whatever the template accepts).
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// The message as the template sees it: a map with `role` and
    /// `content`.
    fn to_value(&self) -> minijinja::Value {
        let map: std::collections::BTreeMap<&str, &str> =
            [("role", self.role.as_str()), ("content", self.content.as_str())].into_iter().collect();
        minijinja::Value::from(
            map.into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect::<std::collections::BTreeMap<String, String>>(),
        )
    }

    /// A message of `role` saying `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_owned(), content: content.to_owned() }
    }
}

/// A compiled chat template with the special tokens' texts.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: PathBuf,
    tokens: [(&'static str, Option<String>); 4],
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("source", &self.source).finish_non_exhaustive()
    }
}

/// The largest template compiled (bytes).
pub const MAX_TEMPLATE_BYTES: usize = 1 << 20;

impl ChatTemplate {
    /// The tokenizer's own template ([`Tokenizer::chat_template`]).
    ///
    /// # Errors
    /// [`TextError::Template`] when the model has none or it does not
    /// compile.
    pub fn of(tok: &Tokenizer) -> Result<Self, TextError> {
        let Some(text) = &tok.chat_template else {
            return Err(TextError::Template {
                source: tok.source().to_path_buf(),
                reason: "the model has no chat template (give one with --chat-template FILE)".into(),
            });
        };
        Self::new(text, &tok.chat_template_source, tok)
    }

    /// The template in `path` (a `.jinja` file), with `tok`'s special tokens.
    ///
    /// # Errors
    /// [`TextError::Template`]; [`TextError::Hf`] for I/O.
    pub fn from_file(path: &Path, tok: &Tokenizer) -> Result<Self, TextError> {
        let text = super::tokenizer::read_text(path, MAX_TEMPLATE_BYTES as u64)?;
        Self::new(&text, path, tok)
    }

    /// Compiles `text` (from `source`, for messages).
    ///
    /// # Errors
    /// [`TextError::Template`] with minijinja's message and line.
    pub fn new(text: &str, source: &Path, tok: &Tokenizer) -> Result<Self, TextError> {
        let bad = |reason: String| TextError::Template { source: source.to_path_buf(), reason };
        if text.len() > MAX_TEMPLATE_BYTES {
            return Err(bad(format!("{} bytes, more than {MAX_TEMPLATE_BYTES}", text.len())));
        }
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| bad(describe(&e)))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |_fmt: String| -> Result<String, Error> {
            Err(Error::new(
                ErrorKind::InvalidOperation,
                "strftime_now: templates that print the date are refused (their output would not be reproducible)",
            ))
        });
        let text = strip_generation_tags(text);
        env.add_template_owned("chat", text).map_err(|e| bad(describe(&e)))?;
        let name = |id: Option<u32>| id.and_then(|i| tok.token(i));
        let tokens = [
            ("bos_token", name(tok.bos)),
            ("eos_token", name(tok.eos)),
            ("pad_token", name(tok.pad)),
            ("unk_token", tok.token_id("<unk>").and_then(|i| tok.token(i))),
        ];
        Ok(Self { env, source: source.to_path_buf(), tokens })
    }

    /// The text of `messages`, ending with the assistant's header when
    /// `add_generation_prompt`.
    ///
    /// # Errors
    /// [`TextError::Template`] (the template's own `raise_exception`
    /// included).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, TextError> {
        let bad = |e: Error| TextError::Template { source: self.source.clone(), reason: describe(&e) };
        let tpl = self.env.get_template("chat").map_err(bad)?;
        let [(_, bos), (_, eos), (_, pad), (_, unk)] = &self.tokens;
        tpl.render(context! {
            messages => messages.iter().map(Message::to_value).collect::<Vec<_>>(),
            add_generation_prompt => add_generation_prompt,
            bos_token => bos,
            eos_token => eos,
            pad_token => pad,
            unk_token => unk,
        })
        .map_err(bad)
    }

    /// The byte spans of `render(messages, false)` that are assistant
    /// text: for each assistant message `i`, from the end of
    /// `render(messages[..i], true)` (the assistant's header) to the end of
    /// `render(messages[..=i], false)`. This is how TRL masks a
    /// conversational prompt and completion; the template must render
    /// each prefix as a prefix of the whole, or the record is refused.
    ///
    /// # Errors
    /// [`TextError::Template`]; a template whose prefixes are not
    /// prefixes (the message names the turn).
    pub fn assistant_spans(&self, messages: &[Message]) -> Result<(String, Vec<(usize, usize)>), TextError> {
        let whole = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let head = self.render(messages.get(..i).unwrap_or_default(), true)?;
            let upto = self.render(messages.get(..=i).unwrap_or_default(), false)?;
            if !whole.starts_with(&upto) || !upto.starts_with(&head) {
                return Err(TextError::Template {
                    source: self.source.clone(),
                    reason: format!(
                        "message {i}: the template does not render the conversation up to it as a prefix of the whole, so its tokens cannot be masked"
                    ),
                });
            }
            spans.push((head.len(), upto.len()));
        }
        Ok((whole, spans))
    }
}

/// minijinja's message with its line, one line.
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    if let Some(line) = e.line() {
        s = format!("line {line}: {s}");
    }
    s
}

/// The template without transformers' `{% generation %}` /
/// `{% endgeneration %}` tags (their content stays), with any of Jinja's
/// whitespace-control forms (`{%-`, `-%}`).
fn strip_generation_tags(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{%") {
        let (before, tag) = rest.split_at(start);
        let Some(end) = tag.find("%}") else { break };
        let inner = tag.get(2..end).unwrap_or_default().trim_matches(|c: char| c == '-' || c.is_whitespace());
        out.push_str(before);
        if inner != "generation" && inner != "endgeneration" {
            out.push_str(tag.get(..end + 2).unwrap_or_default());
        }
        rest = tag.get(end + 2..).unwrap_or_default();
    }
    out.push_str(rest);
    out
}
