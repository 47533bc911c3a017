//! Trainable tokens in PEFT's files: the module as read, and its readers.
//!
//! PEFT saves `trainable_tokens_delta [k, dim]` per targeted embedding:
//! `<module>.trainable_tokens_delta` for a `TRAINABLE_TOKENS` adapter, and
//! `<module>.token_adapter.trainable_tokens_delta` beside a LoRA's
//! tensors when its config sets `trainable_token_indices`. Despite the
//! name the tensor holds the new rows themselves; row `i` belongs to token
//! `token_indices[i]`, in the order the config lists them. The indices are
//! the config's, never saved as a tensor.

use peft_core::trainable_tokens::TrainableTokens;
use safetensors::Dtype;

use super::keys::{Reader, normalize_key};
use super::st::{Entry, StFile};
use super::{HfAdapter, HfError, TokenIndices};

/// The tensor key's suffix of a `TRAINABLE_TOKENS` adapter's rows.
pub(crate) const DELTA: &str = ".trainable_tokens_delta";

/// The suffix of the rows LoRA's `trainable_token_indices` saves.
pub(crate) const WRAPPED_DELTA: &str = ".token_adapter.trainable_tokens_delta";

/// One embedding with trainable tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainableTokensModule {
    /// Module name without `base_model.model.` (its table is
    /// `<name>.weight`).
    pub name: String,
    /// The tokens, in the rows' order.
    pub indices: Vec<u32>,
    /// `trainable_tokens_delta [k, dim]`: the new rows, widened to f32.
    pub rows: Vec<f32>,
    /// The embedding width `dim`.
    pub dim: usize,
    /// The rows' element type.
    pub dtype: Dtype,
    /// Saved by LoRA's `trainable_token_indices`
    /// (`<name>.token_adapter.trainable_tokens_delta`).
    pub wrapped: bool,
}

impl TrainableTokensModule {
    /// `peft-core`'s trainable tokens of this module over a table of
    /// `vocab` rows.
    ///
    /// # Errors
    /// `peft-core`'s validation (an index outside the vocabulary, a token
    /// listed twice).
    pub fn layer(&self, vocab: usize) -> Result<TrainableTokens<f32, &[f32], &[u32]>, HfError> {
        Ok(TrainableTokens::new(vocab, self.dim, &self.indices[..], &self.rows[..])?)
    }

    /// The key PEFT saves the rows under (with `base_model.model.`).
    pub fn key(&self) -> String {
        let suffix = if self.wrapped { WRAPPED_DELTA } else { DELTA };
        format!("base_model.model.{}{suffix}", self.name)
    }
}

impl HfAdapter {
    /// The entry `e` of `module` read as its trainable tokens with
    /// `indices`: the rows must be `[indices.len(), dim]`, and the module
    /// not read already.
    ///
    /// # Errors
    /// [`HfError::TensorShape`] naming the tensor;
    /// [`HfError::DuplicateTensor`]; `read`'s errors.
    fn add_tokens(
        &mut self,
        file: &StFile,
        e: &Entry,
        (module, wrapped): (&str, bool),
        indices: &[u32],
        read: Reader<'_>,
    ) -> Result<(), HfError> {
        if self.trainable_tokens.iter().any(|m| m.name == module) {
            return Err(HfError::DuplicateTensor { module: module.into(), tensor: "trainable_tokens_delta".into() });
        }
        let &[k, dim] = e.shape.as_slice() else { return Err(HfError::shape(&e.name, &e.shape, "a matrix [k, dim]")) };
        if k != indices.len() || dim == 0 {
            let want = format!("[{}, dim] (one row per token of the config's indices)", indices.len());
            return Err(HfError::shape(&e.name, &e.shape, want));
        }
        let (name, rows, dtype) = (module.to_string(), read(file, e)?, e.dtype);
        self.trainable_tokens.push(TrainableTokensModule {
            name,
            indices: indices.to_vec(),
            rows,
            dim,
            dtype,
            wrapped,
        });
        Ok(())
    }

    /// Trainable tokens (`peft_type: "TRAINABLE_TOKENS"`): one
    /// `trainable_tokens_delta [k, dim]` per targeted embedding.
    pub(super) fn read_trainable_tokens(
        &mut self,
        c: &super::TrainableTokensConfig,
        file: &StFile,
        read: Reader<'_>,
    ) -> Result<(), HfError> {
        for e in &file.entries {
            let key = normalize_key(&e.name);
            let Some(module) = key.strip_suffix(DELTA) else {
                return Err(HfError::UnexpectedKey { key: e.name.clone(), method: "trainable tokens" });
            };
            if !c.target_modules.matches(module) {
                return Err(HfError::Untargeted { module: module.into(), method: "trainable tokens" });
            }
            self.add_tokens(file, e, (module, false), &c.token_indices, read)?;
        }
        if self.trainable_tokens.is_empty() {
            return Err(HfError::NoTensors { keys: "trainable_tokens_delta" });
        }
        Ok(())
    }

    /// LoRA's `trainable_token_indices`: the entries of `file` it saved
    /// (`<module>.token_adapter.trainable_tokens_delta`), read into
    /// [`HfAdapter::trainable_tokens`]; the others are returned for the
    /// LoRA reader.
    ///
    /// # Errors
    /// [`HfError::FieldTensor`] for such a tensor without the field, or a
    /// module the field does not name, and for the field without any such
    /// tensor; [`add_tokens`](Self::add_tokens)' errors.
    pub(super) fn read_lora_tokens<'f>(
        &mut self,
        indices: Option<&TokenIndices>,
        file: &'f StFile,
        read: Reader<'_>,
    ) -> Result<Vec<&'f Entry>, HfError> {
        let mut rest = Vec::new();
        for e in &file.entries {
            let key = normalize_key(&e.name);
            let Some(module) = key.strip_suffix(WRAPPED_DELTA) else {
                rest.push(e);
                continue;
            };
            let field =
                HfError::FieldTensor { field: "trainable_token_indices", tensor: e.name.clone(), present: true };
            let ix = indices.and_then(|t| t.of(module)).ok_or(field)?;
            self.add_tokens(file, e, (module, true), ix, read)?;
        }
        if let (Some(t), true) = (indices, self.trainable_tokens.is_empty()) {
            let module = match t {
                TokenIndices::Map(m) => m.first().map_or("", |(k, _)| k.as_str()),
                TokenIndices::List(_) => "<embedding>",
            };
            let tensor = format!("{module}{WRAPPED_DELTA}");
            return Err(HfError::FieldTensor { field: "trainable_token_indices", tensor, present: false });
        }
        Ok(rest)
    }
}
