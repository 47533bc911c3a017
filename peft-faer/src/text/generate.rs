//! Text generation over the Llama host: a [`Session`] holds the key/value
//! cache and the tokens seen, so a chat keeps its cache across turns; each
//! turn prefills the new tokens, then decodes one token at a time with the
//! [`Sampler`], streaming whole characters, until the model's end token, a
//! stop string or the length limit.

use std::time::Instant;

use peft_core::Backend;

use super::{Sampler, SamplingOptions, TextError, Tokenizer};
use crate::llama::{KvCache, Llama, LlamaAdapter, check_finite_logits};

/// How to generate.
#[derive(Clone, Debug, Default)]
pub struct GenerateOptions {
    /// The most tokens to generate.
    pub max_new_tokens: usize,
    /// Sampling settings (greedy by default).
    pub sampling: SamplingOptions,
    /// Texts that end generation; the text returned stops before the
    /// first one found (it is not included).
    pub stop: Vec<String>,
    /// Go on past the model's end tokens ([`Tokenizer::stop_ids`]).
    pub ignore_eos: bool,
}

/// Why generation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finish {
    /// The model produced an end token (not part of the text).
    Eos(u32),
    /// A stop string was produced.
    Stop(String),
    /// `max_new_tokens` were generated.
    Length,
}

/// One turn's result.
#[derive(Clone, Debug)]
pub struct Generated {
    /// Tokens prefilled (the prompt, or the turn's new tokens).
    pub prompt_tokens: usize,
    /// The generated ids (an end token included, when one ended it).
    pub ids: Vec<u32>,
    /// Their text, special tokens left out, cut before a stop string.
    pub text: String,
    /// Why it ended.
    pub finish: Finish,
    /// Seconds of the prefill (to the first token's logits).
    pub prefill_seconds: f64,
    /// Seconds of the decode steps after it.
    pub decode_seconds: f64,
}

impl Generated {
    /// Prefill throughput (tokens/s).
    pub fn prefill_rate(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_seconds.max(1e-9)
    }

    /// Decode throughput: tokens after the first per second of decoding
    /// (0 when only one token was made).
    pub fn decode_rate(&self) -> f64 {
        let steps = self.ids.len().saturating_sub(1);
        if steps == 0 { 0.0 } else { steps as f64 / self.decode_seconds.max(1e-9) }
    }
}

/// A conversation with the model: its cache and every token so far.
#[derive(Debug, Default)]
pub struct Session {
    cache: KvCache,
    /// The tokens of the conversation so far: what the cache has read,
    /// then the last generated token when the cache has not read it yet.
    pub history: Vec<u32>,
    /// How many of `history` the cache has read.
    cached: usize,
}

impl Session {
    /// An empty session.
    pub fn new() -> Self {
        Self::default()
    }

    /// Generates after `ids`, the whole conversation so far. The tokens
    /// the session already read and `ids` shares are not run again (a chat
    /// re-rendered each turn costs only its new text); where `ids`
    /// departs from them, the cache is cut back first. The generated
    /// tokens join the history; `on_text` receives the text as it is
    /// produced.
    ///
    /// # Errors
    /// [`TextError::Hf`] for the model's errors (an id outside the
    /// vocabulary, non-finite logits), [`TextError::Tokenizer`] for
    /// decoding; [`TextError::Option`] for bad sampling options.
    #[allow(clippy::too_many_arguments)]
    pub fn turn<B: Backend<f32> + ?Sized>(
        &mut self,
        model: &Llama,
        backend: &B,
        adapter: Option<&LlamaAdapter<'_>>,
        tok: &Tokenizer,
        ids: &[u32],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generated, TextError> {
        options.sampling.check().map_err(|(name, why)| TextError::Option(name.into(), why))?;
        let mut sampler = Sampler::new(options.sampling);
        let start = Instant::now();
        // Keep what the cache read and `ids` repeats; prompt tuning's
        // virtual rows stay in front of it.
        let same = self.history.iter().zip(ids).take_while(|(a, b)| a == b).count();
        let keep = same.min(self.cached).min(ids.len().saturating_sub(1));
        let virtual_rows = self.cache.len() - self.cached;
        if keep < self.cached {
            if keep == 0 {
                self.cache = KvCache::new();
            } else {
                self.cache.truncate(virtual_rows + keep);
            }
        }
        self.history.truncate(keep);
        self.cached = keep;
        let feed = ids.get(keep..).unwrap_or_default();
        let mut row = model.forward_last(backend, feed, adapter, &mut self.cache)?;
        self.history.extend_from_slice(feed);
        self.cached = self.history.len();
        let prefill_seconds = start.elapsed().as_secs_f64();
        let decode_start = Instant::now();
        let mut out = Generated {
            prompt_tokens: feed.len(),
            ids: Vec::new(),
            text: String::new(),
            finish: Finish::Length,
            prefill_seconds,
            decode_seconds: 0.0,
        };
        let mut emitted = 0;
        while out.ids.len() < options.max_new_tokens {
            check_finite_logits(&row, self.cache.len().saturating_sub(1))?;
            let Some(next) = sampler.next(&mut row, &self.history) else { break };
            out.ids.push(next);
            self.history.push(next);
            if !options.ignore_eos && tok.stop_ids.contains(&next) {
                out.finish = Finish::Eos(next);
                break;
            }
            let text = tok.decode(&out.ids, true)?;
            if let Some((at, s)) = find_stop(&text, &options.stop) {
                on_text(text.get(emitted..at).unwrap_or_default());
                out.text = text.get(..at).unwrap_or_default().to_owned();
                out.finish = Finish::Stop(s.to_owned());
                break;
            }
            let safe = safe_end(&text, &options.stop);
            if safe > emitted {
                on_text(text.get(emitted..safe).unwrap_or_default());
                emitted = safe;
            }
            out.text = text;
            if out.ids.len() == options.max_new_tokens {
                break;
            }
            row = model.forward_last(backend, &[next], adapter, &mut self.cache)?;
            self.cached += 1;
        }
        if matches!(out.finish, Finish::Length) {
            on_text(out.text.get(emitted..).unwrap_or_default());
        }
        out.decode_seconds = decode_start.elapsed().as_secs_f64();
        Ok(out)
    }
}

/// One generation from `ids` in a new [`Session`].
///
/// # Errors
/// As [`Session::turn`].
#[allow(clippy::too_many_arguments)]
pub fn generate<B: Backend<f32> + ?Sized>(
    model: &Llama,
    backend: &B,
    adapter: Option<&LlamaAdapter<'_>>,
    tok: &Tokenizer,
    ids: &[u32],
    options: &GenerateOptions,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generated, TextError> {
    Session::new().turn(model, backend, adapter, tok, ids, options, on_text)
}

/// The first stop string in `text`: its byte position and the string.
fn find_stop<'a>(text: &str, stops: &'a [String]) -> Option<(usize, &'a str)> {
    stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str()).map(|at| (at, s.as_str()))).min()
}

/// How much of `text` can be shown: all of it but a trailing U+FFFD (an
/// unfinished UTF-8 sequence) and the longest suffix that could begin a
/// stop string.
fn safe_end(text: &str, stops: &[String]) -> usize {
    let end = text.strip_suffix('\u{FFFD}').map_or(text.len(), str::len);
    let mut hold = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if let Some(prefix) = s.get(..i) {
                if text.get(..end).is_some_and(|t| t.ends_with(prefix)) {
                    hold = hold.max(prefix.len());
                }
            }
        }
    }
    end - hold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_possible_stop_prefix_is_held_back() {
        let stops = vec!["\nUser:".to_owned()];
        assert_eq!(safe_end("Hello\nUs", &stops), 5);
        assert_eq!(safe_end("Hello", &stops), 5);
        assert_eq!(safe_end("Hello\u{FFFD}", &stops), 5);
        assert_eq!(find_stop("Hi\nUser: x", &stops), Some((2, "\nUser:")));
    }
}
