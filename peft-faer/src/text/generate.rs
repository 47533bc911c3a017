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
        self.turn_with(model, backend, adapter, Some(tok), ids, options, on_text)
    }

    /// [`Session::turn`]; without a tokenizer nothing but the length ends
    /// it and no text is made.
    #[allow(clippy::too_many_arguments)]
    fn turn_with<B: Backend<f32> + ?Sized>(
        &mut self,
        model: &Llama,
        backend: &B,
        adapter: Option<&LlamaAdapter<'_>>,
        tok: Option<&Tokenizer>,
        ids: &[u32],
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Generated, TextError> {
        options.sampling.check().map_err(|(name, why)| TextError::Option(name.into(), why))?;
        let start = Instant::now();
        // Keep what the cache read and `ids` repeats; prompt tuning's
        // virtual rows stay in front of it.
        let same = self.history.iter().zip(ids).take_while(|(a, b)| a == b).count();
        let keep = same.min(self.cached).min(ids.len().saturating_sub(1));
        let virtual_rows = self.cache.len() - self.cached;
        self.cache.truncate(virtual_rows + keep);
        self.history.truncate(keep);
        self.cached = keep;
        let feed = ids.get(keep..).unwrap_or_default();
        let mut row = model.forward_last(backend, feed, adapter, &mut self.cache)?;
        self.history.extend_from_slice(feed);
        self.cached = self.history.len();
        let decode_start = Instant::now();
        let mut stream = Stream::new(options, feed.len(), start.elapsed().as_secs_f64());
        while let Some(next) = stream.step(&mut row, &mut self.history, tok, options, on_text)? {
            row = model.forward_last(backend, &[next], adapter, &mut self.cache)?;
            self.cached += 1;
        }
        Ok(stream.finish(decode_start, on_text))
    }
}

/// One sequence's decoding state: its sampler, what it generated, how much
/// text it has shown.
struct Stream {
    sampler: Sampler,
    out: Generated,
    emitted: usize,
}

impl Stream {
    fn new(options: &GenerateOptions, prompt_tokens: usize, prefill_seconds: f64) -> Self {
        let out = Generated {
            prompt_tokens,
            ids: Vec::new(),
            text: String::new(),
            finish: Finish::Length,
            prefill_seconds,
            decode_seconds: 0.0,
        };
        Self { sampler: Sampler::new(options.sampling), out, emitted: 0 }
    }

    /// Takes the next token from `row` (the logits after `history`), shows
    /// the new text, and returns the token when generation goes on (the
    /// model must read it next), `None` when it has ended.
    fn step(
        &mut self,
        row: &mut [f32],
        history: &mut Vec<u32>,
        tok: Option<&Tokenizer>,
        options: &GenerateOptions,
        on_text: &mut dyn FnMut(&str),
    ) -> Result<Option<u32>, TextError> {
        let out = &mut self.out;
        if out.ids.len() >= options.max_new_tokens {
            return Ok(None);
        }
        check_finite_logits(row, history.len().saturating_sub(1))?;
        let Some(next) = self.sampler.next(row, history) else { return Ok(None) };
        out.ids.push(next);
        history.push(next);
        let Some(tok) = tok else { return Ok((out.ids.len() < options.max_new_tokens).then_some(next)) };
        if !options.ignore_eos && tok.stop_ids.contains(&next) {
            out.finish = Finish::Eos(next);
            return Ok(None);
        }
        let text = tok.decode(&out.ids, true)?;
        if let Some((at, s)) = find_stop(&text, &options.stop) {
            on_text(text.get(self.emitted..at).unwrap_or_default());
            self.emitted = at;
            out.text = text.get(..at).unwrap_or_default().to_owned();
            out.finish = Finish::Stop(s.to_owned());
            return Ok(None);
        }
        let safe = safe_end(&text, &options.stop);
        if safe > self.emitted {
            on_text(text.get(self.emitted..safe).unwrap_or_default());
            self.emitted = safe;
        }
        out.text = text;
        Ok((out.ids.len() < options.max_new_tokens).then_some(next))
    }

    /// The result, the text still held back shown when the length ended it.
    fn finish(mut self, decode_start: Instant, on_text: &mut dyn FnMut(&str)) -> Generated {
        if matches!(self.out.finish, Finish::Length) {
            on_text(self.out.text.get(self.emitted..).unwrap_or_default());
        }
        self.out.decode_seconds = decode_start.elapsed().as_secs_f64();
        self.out
    }
}

/// Several prompts decoded together over one base: one pass reads every
/// prompt ([`Llama::forward_batch_last`]), then each step runs the
/// unfinished sequences' new tokens as one batch (every projection once
/// for all of them), each sequence with its own cache, sampler (seeded
/// alike, so each gets the tokens [`generate`] would give it alone, to
/// rounding) and stopping. `on_text(i, text)` receives prompt `i`'s text.
/// The times of each result are the batch's.
///
/// # Errors
/// As [`Session::turn`]; prompt tuning runs its prompts one at a time
/// (its virtual rows belong to each sequence's first pass).
#[allow(clippy::too_many_arguments)]
pub fn generate_batch<B: Backend<f32> + ?Sized>(
    model: &Llama,
    backend: &B,
    adapter: Option<&LlamaAdapter<'_>>,
    tok: &Tokenizer,
    prompts: &[Vec<u32>],
    options: &GenerateOptions,
    on_text: &mut dyn FnMut(usize, &str),
) -> Result<Vec<Generated>, TextError> {
    options.sampling.check().map_err(|(name, why)| TextError::Option(name.into(), why))?;
    if matches!(adapter, Some(LlamaAdapter::Prompt { .. })) || prompts.len() < 2 {
        let each = prompts.iter().enumerate();
        return each.map(|(i, p)| generate(model, backend, adapter, tok, p, options, &mut |s| on_text(i, s))).collect();
    }
    let start = Instant::now();
    let mut caches = vec![KvCache::new(); prompts.len()];
    let seqs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut rows = model.forward_batch_last(backend, &seqs, adapter, &mut caches)?;
    let (prefill, decode_start) = (start.elapsed().as_secs_f64(), Instant::now());
    let mut streams: Vec<Stream> = prompts.iter().map(|p| Stream::new(options, p.len(), prefill)).collect();
    let mut histories: Vec<Vec<u32>> = prompts.to_vec();
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    let vocab = model.config.vocab_size;
    while !active.is_empty() {
        let (mut next_active, mut feed) = (Vec::new(), Vec::new());
        for (slot, &i) in active.iter().enumerate() {
            let row = rows.get_mut(slot * vocab..(slot + 1) * vocab).unwrap_or_default();
            if let Some(next) = streams[i].step(row, &mut histories[i], Some(tok), options, &mut |s| on_text(i, s))? {
                next_active.push(i);
                feed.push([next]);
            }
        }
        active = next_active;
        if active.is_empty() {
            break;
        }
        // The active sequences' caches, moved out for the pass and back.
        let mut batch: Vec<KvCache> = active.iter().map(|&i| std::mem::take(&mut caches[i])).collect();
        let seqs: Vec<&[u32]> = feed.iter().map(|f| &f[..]).collect();
        let pass = model.forward_batch_last(backend, &seqs, adapter, &mut batch);
        for (&i, c) in active.iter().zip(batch) {
            caches[i] = c;
        }
        rows = pass?;
    }
    let mut out = Vec::with_capacity(streams.len());
    for (i, s) in streams.into_iter().enumerate() {
        out.push(s.finish(decode_start, &mut |t| on_text(i, t)));
    }
    Ok(out)
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

/// Token ids in, token ids out, without a tokenizer: the sampling of
/// [`generate`], ended by the length alone (the model's end tokens are
/// not known).
///
/// # Errors
/// As [`Session::turn`]; [`TextError::Option`] (`--stop`) for stop
/// strings, which need text.
pub fn generate_ids<B: Backend<f32> + ?Sized>(
    model: &Llama,
    backend: &B,
    adapter: Option<&LlamaAdapter<'_>>,
    ids: &[u32],
    options: &GenerateOptions,
) -> Result<Vec<u32>, TextError> {
    if !options.stop.is_empty() {
        let why = "needs text: give --prompt or --chat (with --ids there is no tokenizer)";
        return Err(TextError::Option("--stop".into(), why.into()));
    }
    Ok(Session::new().turn_with(model, backend, adapter, None, ids, options, &mut |_| {})?.ids)
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
            if let Some(prefix) = s.get(..i)
                && text.get(..end).is_some_and(|t| t.ends_with(prefix))
            {
                hold = hold.max(prefix.len());
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
