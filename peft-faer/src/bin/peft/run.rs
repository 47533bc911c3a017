//! `peft forward` and `peft generate` on a Llama checkpoint.

use std::path::{Path, PathBuf};

use peft_faer::Faer;
use peft_faer::files::{check_output, write_file};
use peft_faer::hf::base::Base;
use peft_faer::hf::{HfAdapter, HfError};
use peft_faer::llama::gguf::is_gguf;
use peft_faer::llama::{KvCache, Llama, LlamaAdapter};

use crate::cli::RunArgs;
use serde_json::json;

/// The model (a Hugging Face folder or a `.gguf` file) and, if given, the
/// adapter read from its directory, with the tensors the adapter replaces
/// whole put in place.
pub(crate) fn llama_and_adapter(model: &Path, adapter: Option<&Path>) -> Result<(Llama, Option<HfAdapter>), HfError> {
    let mut m = Llama::open(model)?;
    let ad = match adapter {
        Some(p) if is_gguf(p) => Some(peft_faer::gguf::lora::read(p, m.config.head_dim)?),
        Some(p) => Some(HfAdapter::read_dir(p)?),
        None => None,
    };
    // The tensors the adapter replaces whole (modules_to_save, trained
    // biases) run as PEFT runs them.
    if let Some(ad) = &ad {
        m.apply_replacements(ad)?;
    }
    Ok((m, ad))
}

pub(crate) fn forward_cmd(
    run: &RunArgs,
    out: Option<&Path>,
    top: usize,
    as_json: bool,
    force: bool,
    threads: u32,
) -> Result<bool, Box<dyn std::error::Error>> {
    let (model, adapter) = (run.model.as_path(), run.adapter.as_deref());
    let (mut prompts, tok) = crate::text::prompts(run)?;
    if prompts.len() != 1 {
        return Err("forward takes one prompt (--ids, --prompt or --chat)".into());
    }
    let ids = &prompts.remove(0).1;
    let (m, ad) = llama_and_adapter(model, adapter)?;
    if let Some(out) = out {
        let mut inputs: Vec<PathBuf> = if is_gguf(model) {
            vec![model.to_path_buf()]
        } else {
            let mut files = Base::open(model)?.input_files();
            files.push(model.join("config.json"));
            files
        };
        inputs.extend(ad.iter().flat_map(HfAdapter::source_files));
        let refs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
        check_output(out, &refs, force)?;
    }
    let hosted = ad.as_ref().map(|a| LlamaAdapter::new(&m, a)).transpose()?;
    // Every row's logits only when they are written: the top tokens need the last row alone.
    let (backend, mut cache) = (Faer::with_threads(threads as usize), KvCache::new());
    let logits = match out {
        Some(_) => m.forward(&backend, ids, hosted.as_ref(), &mut cache)?,
        None => m.forward_last(&backend, ids, hosted.as_ref(), &mut cache)?,
    };
    let vocab = m.config.vocab_size;
    let rows = cache.len();
    let last = &logits[logits.len() - vocab..];
    // A NaN would sort first and an infinity would make every probability
    // NaN: refused, naming the position and token.
    peft_faer::llama::check_finite_logits(last, rows - 1)?;
    // Softmax of the last row, in f64.
    let max = last.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let z: f64 = last.iter().map(|&v| (f64::from(v) - f64::from(max)).exp()).sum();
    let mut order: Vec<usize> = (0..vocab).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]).then(a.cmp(&b)));
    let best: Vec<(usize, f32, f64)> =
        order.iter().take(top).map(|&t| (t, last[t], (f64::from(last[t]) - f64::from(max)).exp() / z)).collect();
    if let Some(out) = out {
        let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
        let entries = [peft_faer::hf::st::OutEntry::plain("logits", safetensors::Dtype::F32, vec![1, rows, vocab])];
        let mut file = peft_faer::hf::st::header(&entries, &Default::default())?;
        file.extend_from_slice(&bytes);
        write_file(out, &file, force)?;
    }
    if as_json {
        let text = |t: usize| tok.as_ref().and_then(|k| k.decode(&[t as u32], false).ok());
        let top: Vec<_> = best
            .iter()
            .map(|(t, l, p)| json!({ "token": t, "text": text(*t), "logit": l, "probability": p }))
            .collect();
        let doc = json!({ "rows": rows, "vocab": vocab, "next": top, "out": out });
        outln!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        outln!("next token after {} ids ({rows} rows of logits):", ids.len());
        outln!("{:>8} {:>12} {:>12}  text", "token", "logit", "probability");
        for (t, l, p) in &best {
            let text = tok.as_ref().and_then(|k| k.decode(&[*t as u32], false).ok()).unwrap_or_default();
            outln!("{t:>8} {l:>12.5} {p:>12.5}  {text:?}");
        }
        if let Some(out) = out {
            outln!("logits [1, {rows}, {vocab}] written to {}", out.display());
        }
    }
    Ok(true)
}
