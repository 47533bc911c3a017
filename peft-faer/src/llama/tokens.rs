//! Trainable tokens hosted on the model, and what the output layer adds
//! over the frozen head.
//!
//! PEFT's trainable tokens replace rows of `model.embed_tokens`; on a model
//! whose `lm_head` is tied to the embeddings, PEFT wraps the head too, over
//! the same rows (`TrainableTokensModel.inject_adapter`'s `tied_adapter`),
//! so the trained tokens' logits come from the new rows. The lookup, the
//! head's columns and both backwards go through `peft-core`'s
//! [`TrainableTokens`]; the frozen table stays in its stored format.

use peft_core::trainable_tokens::TrainableTokens;
use peft_core::{MatMut, MatRef};

use super::{Llama, LlamaAdapter};
use crate::hf::{HfAdapter, HfError, LoraModule, TrainableTokensModule};

/// The embedding PEFT's trainable tokens target in a Llama model.
pub const EMBED: &str = "model.embed_tokens";

/// What the output layer adds over the frozen head: LoRA on `lm_head`,
/// and trainable tokens on a head tied to the embeddings.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Head<'a> {
    /// LoRA on `lm_head`.
    pub lora: Option<&'a LoraModule>,
    /// Trainable tokens, when the head is the embedding table.
    pub tokens: Option<&'a TrainableTokensModule>,
}

/// `adapter`'s trainable tokens placed on `model`: one module, on
/// [`EMBED`], of the model's width, every token inside its vocabulary.
///
/// # Errors
/// [`HfError::Unsupported`] for tokens on another module (or several);
/// [`HfError::Base`] for rows of another width; `peft-core`'s validation
/// (a token outside the vocabulary, one listed twice).
pub(super) fn place(model: &Llama, adapter: &HfAdapter) -> Result<(), HfError> {
    let c = &model.config;
    for m in &adapter.trainable_tokens {
        if m.name != EMBED || adapter.trainable_tokens.len() > 1 {
            return Err(HfError::Unsupported(format!("{}: trainable tokens on a module other than {EMBED}", m.name)));
        }
        if m.dim != c.hidden_size {
            let why = format!("rows of {} values, the model's embeddings {}", m.dim, c.hidden_size);
            return Err(HfError::Base(format!("{}: {why}", m.name)));
        }
        m.layer(c.vocab_size)?;
    }
    Ok(())
}

impl Llama {
    /// Applies the adapter's changes to the embeddings of `ids` in `h`
    /// (LoRA on `embed_tokens`, trainable tokens' rows) and returns what
    /// it adds to the output layer.
    ///
    /// # Errors
    /// `peft-core`'s errors.
    pub(super) fn adapt_embeddings<'a, B: peft_core::Backend<f32> + ?Sized>(
        &self,
        backend: &B,
        adapter: Option<&LlamaAdapter<'a>>,
        ids: &[u32],
        h: &mut [f32],
    ) -> Result<Head<'a>, HfError> {
        let (embed_lora, head_lora) = adapter.map_or((None, None), LlamaAdapter::whole_model_lora);
        if let Some(m) = embed_lora {
            super::embedding_lora(backend, m, ids, h)?;
        }
        let tokens = adapter.and_then(LlamaAdapter::token_rows);
        if let Some(m) = tokens {
            let idx: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
            // The rows of `ids` are the last ones (after prompt tuning's, which never come with tokens).
            let rows = h.len() - idx.len() * m.dim;
            m.layer(self.config.vocab_size)?.replace_rows(&idx, MatMut::new(&mut h[rows..], idx.len(), m.dim)?)?;
        }
        Ok(Head { lora: head_lora, tokens: tokens.filter(|_| self.lm_head.is_none()) })
    }

    /// The rows of `m`'s tokens in the frozen table, `[k, hidden]`.
    fn frozen_rows(&self, m: &TrainableTokensModule) -> Result<Vec<f32>, HfError> {
        let embed = self.embed.view()?;
        let mut out = vec![0.0f32; m.indices.len() * m.dim];
        for (&id, row) in m.indices.iter().zip(out.chunks_exact_mut(m.dim.max(1))) {
            embed.row(id as usize).ok_or(HfError::Core(peft_core::Error::Overflow))?.dequantize(row);
        }
        Ok(out)
    }

    /// The tied head's backward for trainable tokens: `dL/drows` from
    /// `normed [n, hidden]` and `dlogits [n, vocab]` into `grad`, and
    /// `dnormed` (computed over the frozen head) corrected to the rows.
    ///
    /// # Errors
    /// `peft-core`'s shape checks.
    pub(super) fn head_tokens_backward(
        &self,
        m: &TrainableTokensModule,
        normed: &[f32],
        dlogits: &[f32],
        dnormed: &mut [f32],
        grad: &mut [f32],
    ) -> Result<(), HfError> {
        let (d, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let n = normed.len() / d.max(1);
        let frozen = self.frozen_rows(m)?;
        let layer = m.layer(vocab)?;
        let input = Some((MatRef::new(&frozen, m.indices.len(), d)?, MatMut::new(dnormed, n, d)?));
        layer.head_backward(MatRef::new(normed, n, d)?, MatRef::new(dlogits, n, vocab)?, grad, input)?;
        Ok(())
    }
}

/// The embedding lookup's backward for trainable tokens: `grad[i] +=` the
/// rows of `dh [ids.len(), hidden]` whose token is `indices[i]`.
///
/// # Errors
/// `peft-core`'s shape checks.
pub(super) fn embed_backward(
    m: &TrainableTokensModule,
    vocab: usize,
    ids: &[u32],
    dh: &[f32],
    grad: &mut [f32],
) -> Result<(), HfError> {
    let idx: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
    let layer: TrainableTokens<f32, &[f32], &[u32]> = m.layer(vocab)?;
    layer.backward(&idx, MatRef::new(dh, idx.len(), m.dim)?, grad)?;
    Ok(())
}
