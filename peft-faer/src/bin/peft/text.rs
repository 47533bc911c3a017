//! `peft generate` and `peft chat`: prompts in, streamed text out.

use std::io::{BufRead, Write};
use std::path::Path;

use peft_faer::Faer;
use peft_faer::llama::LlamaAdapter;
use peft_faer::text::generate::{Finish, Session};
use peft_faer::text::{ChatTemplate, GenerateOptions, Generated, Message, SamplingOptions, Tokenizer};
use serde_json::json;

use crate::cli::{ChatArgs, GenerateArgs, RunArgs, SamplingArgs, TextArgs};
use crate::run::llama_and_adapter;

/// The tokenizer `--tokenizer` names, or the model's.
pub(crate) fn tokenizer(model: &Path, text: &TextArgs) -> Result<Tokenizer, Box<dyn std::error::Error>> {
    Ok(Tokenizer::open(text.tokenizer.as_deref().unwrap_or(model))?)
}

/// The chat template `--chat-template` names, or the tokenizer's.
pub(crate) fn template(tok: &Tokenizer, text: &TextArgs) -> Result<ChatTemplate, Box<dyn std::error::Error>> {
    Ok(match &text.chat_template {
        Some(path) => ChatTemplate::from_file(path, tok)?,
        None => ChatTemplate::of(tok)?,
    })
}

/// A prompt's text (`None` for `--ids`) and its token ids.
pub(crate) type Prompt = (Option<String>, Vec<u32>);

/// The prompts of `run` and the tokenizer when one was needed.
pub(crate) fn prompts(run: &RunArgs) -> Result<(Vec<Prompt>, Option<Tokenizer>), Box<dyn std::error::Error>> {
    if let Some(ids) = &run.ids {
        return Ok((vec![(None, ids.0.clone())], None));
    }
    let tok = tokenizer(&run.model, &run.text)?;
    let mut out = Vec::new();
    for p in &run.prompt {
        out.push((Some(p.clone()), tok.encode(p, true)?));
    }
    if !run.chat.is_empty() {
        let tpl = template(&tok, &run.text)?;
        for c in &run.chat {
            let mut messages: Vec<Message> = run.text.system.iter().map(|s| Message::new("system", s)).collect();
            messages.push(Message::new("user", c));
            let text = tpl.render(&messages, true)?;
            out.push((Some(text.clone()), tok.encode(&text, false)?));
        }
    }
    Ok((out, Some(tok)))
}

fn options(s: &SamplingArgs) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: s.max_new_tokens,
        sampling: SamplingOptions {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            seed: s.seed,
        },
        stop: s.stop.clone(),
        ignore_eos: s.ignore_eos,
    }
}

fn finish_name(f: &Finish) -> String {
    match f {
        Finish::Eos(id) => format!("eos (token {id})"),
        Finish::Stop(s) => format!("stop string {s:?}"),
        Finish::Length => "length".into(),
    }
}

fn report(g: &Generated) {
    eprintln!(
        "[prefill {} tokens, {:.1} tokens/s; decode {} tokens, {:.1} tokens/s; finish: {}]",
        g.prompt_tokens,
        g.prefill_rate(),
        g.ids.len(),
        g.decode_rate(),
        finish_name(&g.finish)
    );
}

pub(crate) fn generate_cmd(args: &GenerateArgs) -> Result<bool, Box<dyn std::error::Error>> {
    let run = &args.run;
    let (prompts, tok) = prompts(run)?;
    let (m, ad) = llama_and_adapter(&run.model, run.adapter.as_deref())?;
    let hosted = ad.as_ref().map(|a| LlamaAdapter::new(&m, a)).transpose()?;
    let backend = Faer::with_threads(args.sampling.threads as usize).int8_activations(args.sampling.int8_activations);
    let opts = options(&args.sampling);
    let Some(tok) = tok else {
        // Token ids in, token ids out (no tokenizer needed).
        let ids = &prompts.first().ok_or("no prompt")?.1;
        let new = peft_faer::text::generate_ids(&m, &backend, hosted.as_ref(), ids, &opts)?;
        if args.json {
            outln!("{}", serde_json::to_string_pretty(&json!({ "prompt": ids, "new_tokens": new }))?);
        } else {
            let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
            outln!("prompt:     {}", list(ids));
            outln!("new tokens: {}", list(&new));
        }
        return Ok(true);
    };
    let mut docs = Vec::new();
    if prompts.len() > 1 {
        // Decoded together over one base; printed when all are done.
        let ids: Vec<Vec<u32>> = prompts.iter().map(|(_, ids)| ids.clone()).collect();
        let all = peft_faer::text::generate_batch(&m, &backend, hosted.as_ref(), &tok, &ids, &opts, &mut |_, _| {})?;
        let made: usize = all.iter().map(|g| g.ids.len()).sum();
        for (i, ((text, ids), g)) in prompts.iter().zip(&all).enumerate() {
            if args.json {
                docs.push(json!({
                    "prompt": text, "prompt_ids": ids, "ids": g.ids, "text": g.text, "finish": finish_name(&g.finish),
                }));
            } else {
                outln!("--- prompt {} of {} ({})", i + 1, prompts.len(), finish_name(&g.finish));
                outln!("{}", g.text);
            }
        }
        let seconds = all.first().map_or(0.0, |g| g.decode_seconds).max(1e-9);
        eprintln!(
            "[{} prompts decoded together: {made} tokens in {seconds:.2} s, {:.1} tokens/s]",
            all.len(),
            made as f64 / seconds
        );
    }
    for (text, ids) in prompts.iter().filter(|_| prompts.len() == 1) {
        let mut out = std::io::stdout().lock();
        let mut write_err = None;
        let mut on_text = |s: &str| {
            if !args.json && write_err.is_none() {
                write_err = out.write_all(s.as_bytes()).and_then(|()| out.flush()).err();
            }
        };
        let g = peft_faer::text::generate(&m, &backend, hosted.as_ref(), &tok, ids, &opts, &mut on_text)?;
        if let Some(e) = write_err {
            return Err(e.into());
        }
        if args.json {
            docs.push(json!({
                "prompt": text, "prompt_ids": ids, "ids": g.ids, "text": g.text, "finish": finish_name(&g.finish),
                "prefill_tokens_per_second": g.prefill_rate(), "decode_tokens_per_second": g.decode_rate(),
            }));
        } else {
            outln!("");
            report(&g);
        }
    }
    if args.json {
        let doc = if docs.len() == 1 { docs.remove(0) } else { json!(docs) };
        outln!("{}", serde_json::to_string_pretty(&doc)?);
    }
    Ok(true)
}

pub(crate) fn chat_cmd(args: &ChatArgs) -> Result<bool, Box<dyn std::error::Error>> {
    let tok = tokenizer(&args.model, &args.text)?;
    let tpl = template(&tok, &args.text)?;
    let (m, ad) = llama_and_adapter(&args.model, args.adapter.as_deref())?;
    let hosted = ad.as_ref().map(|a| LlamaAdapter::new(&m, a)).transpose()?;
    let backend = Faer::with_threads(args.sampling.threads as usize).int8_activations(args.sampling.int8_activations);
    let opts = options(&args.sampling);
    let mut messages: Vec<Message> = args.text.system.iter().map(|s| Message::new("system", s)).collect();
    let mut session = Session::new();
    let stdin = std::io::stdin();
    let interactive = std::io::IsTerminal::is_terminal(&stdin);
    loop {
        if interactive {
            eprint!("> ");
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 || line.trim() == "/exit" {
            break;
        }
        messages.push(Message::new("user", line.trim_end_matches(['\n', '\r'])));
        let ids = tok.encode(&tpl.render(&messages, true)?, false)?;
        let mut out = std::io::stdout().lock();
        let mut write_err = None;
        let mut on_text = |s: &str| {
            if write_err.is_none() {
                write_err = out.write_all(s.as_bytes()).and_then(|()| out.flush()).err();
            }
        };
        let g = session.turn(&m, &backend, hosted.as_ref(), &tok, &ids, &opts, &mut on_text)?;
        if let Some(e) = write_err {
            return Err(e.into());
        }
        outln!("");
        report(&g);
        messages.push(Message::new("assistant", &g.text));
    }
    Ok(true)
}
