//! `peft merge` over a GGUF Llama: PEFT LoRA adapters merged into the
//! model's matrices, written as a GGUF file llama.cpp runs.
//!
//! Each adapted matrix is decoded to f32 (exactly, in Hugging Face's row
//! order), merged as [`merge_many`](crate::hf::merge::merge_many) merges
//! (`W' = W + sum_i m_i s_i B_i A_i`, in the order given, through
//! `peft-core`'s LoRA merge), put back in GGUF's row order and encoded in
//! its own type (or `dtype`) with ggml's reference rounding. Every other
//! tensor, the metadata (tokenizer included) and the tensor order are
//! copied unchanged. LoRA only: DoRA, `lora_bias`, LoRA on embeddings,
//! `modules_to_save` and the other methods are refused by name.

use std::path::Path;

use peft_core::Backend;
use peft_core::method::{MergeTarget, WeightUpdate};
use peft_core::storage::Format;

use super::write::{TensorOut, to_bytes};
use super::{Gguf, gguf_name, is_permuted, permute_rows, type_of};
use crate::hf::{HfAdapter, HfError, LoraModule};
use crate::llama::gguf::GgufWeights;
use crate::llama::{LlamaConfig, Source};

/// What [`merge_gguf`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufMergeReport {
    /// The matrices merged, each with its output type.
    pub merged: Vec<(String, Format)>,
    /// The tensors copied unchanged.
    pub copied: usize,
    /// Bytes written.
    pub bytes: usize,
}

/// The LoRA modules of `adapters` on the GGUF tensor `name`, with their
/// multipliers.
fn modules_on<'a>(adapters: &[(&'a HfAdapter, f64)], name: &str) -> Vec<(&'a LoraModule, f64)> {
    let mut out = Vec::new();
    for &(a, m) in adapters {
        for module in &a.modules {
            if gguf_name(&format!("{}.weight", module.name)).as_deref() == Some(name) {
                out.push((module, m));
            }
        }
    }
    out
}

/// Refuses what this merge does not do (see the [module docs](self)).
fn check_adapters(adapters: &[(&HfAdapter, f64)]) -> Result<(), HfError> {
    for &(a, m) in adapters {
        super::lora::plain_lora(a, |what| HfError::Unsupported(format!("{what} when merging into a GGUF base")))?;
        if !m.is_finite() {
            return Err(HfError::Config { field: "adapter".into(), reason: format!("multiplier {m} is not finite") });
        }
    }
    Ok(())
}

/// Merges `adapters` into the GGUF Llama `base` (see the [module
/// docs](self)) and returns the bytes of the merged GGUF file with a
/// report. `dtype` sets the type of the merged matrices (default: each
/// keeps its own).
///
/// # Errors
/// [`Gguf::open`]'s and [`LlamaConfig::from_gguf`]'s; [`HfError::Unsupported`]
/// for what the module docs refuse, and for a merged matrix whose type has
/// no quantizer here; [`HfError::Base`] for an adapted module the model
/// lacks or of another shape; [`HfError::NonFinite`]-like core errors for
/// merged values that are not finite.
pub fn merge_gguf<B: Backend<f32> + ?Sized>(
    base: &Path,
    adapters: &[(&HfAdapter, f64)],
    dtype: Option<Format>,
    backend: &B,
) -> Result<(Vec<u8>, GgufMergeReport), HfError> {
    check_adapters(adapters)?;
    let g = Gguf::open(base)?;
    let config = LlamaConfig::from_gguf(&g)?;
    let weights = GgufWeights::new(&g, &config);
    for &(a, _) in adapters {
        for module in &a.modules {
            let name = gguf_name(&format!("{}.weight", module.name)).unwrap_or_default();
            let t = g.tensor(&name).ok_or_else(|| HfError::Base(format!("{name} ({}) is missing", module.name)))?;
            if t.matrix() != Some((module.n_out, module.n_in)) {
                return Err(HfError::Base(format!(
                    "{}: the adapter's shape is not the model's ({:?})",
                    module.name, t.ne
                )));
            }
        }
    }
    let mut report = GgufMergeReport { merged: Vec::new(), copied: 0, bytes: 0 };
    let mut data: Vec<(Vec<u8>, Format)> = Vec::with_capacity(g.tensors.len());
    for t in &g.tensors {
        let modules = modules_on(adapters, &t.name);
        if modules.is_empty() {
            data.push((g.read(t)?, t.format));
            report.copied += 1;
            continue;
        }
        let out_format = dtype.unwrap_or(t.format);
        if out_format == Format::Int8 {
            return Err(HfError::Unsupported(format!("{}: int8 in a GGUF file", t.name)));
        }
        let (rows, cols) = t.matrix().ok_or_else(|| HfError::Base(format!("{} is not a matrix", t.name)))?;
        let hf = format!("{}.weight", modules[0].0.name);
        let m = weights.matrix(&hf, rows, cols)?;
        let mut w = vec![0.0f32; rows * cols];
        peft_core::storage::dequantize(&m.view()?, &mut w)?;
        for (module, mult) in &modules {
            let lora = module.lora()?.with_scale(module.scale * mult)?;
            let mut scratch = vec![0.0f32; lora.update_scratch_len(rows)];
            lora.merge_into(backend, MergeTarget::new(&mut w), &mut scratch).map_err(HfError::backend)?.keep();
        }
        if let Some(i) = w.iter().position(|v| !v.is_finite()) {
            return Err(HfError::NonFinite {
                tensor: t.name.clone(),
                index: i,
                value: w[i],
                cause: "the merged value is not finite",
            });
        }
        if is_permuted(&hf) {
            // The rows were un-permuted when read: whole heads.
            w = permute_rows(&w, cols, config.head_dim, false)
                .ok_or_else(|| HfError::Base(format!("{}: rows are not whole heads", t.name)))?;
        }
        let mut bytes = Vec::new();
        crate::hf::st::encode_rows(out_format, &w, cols, &mut bytes).map_err(|e| match e {
            HfError::Core(error) => HfError::InModule { module: t.name.clone(), error },
            e => e,
        })?;
        report.merged.push((t.name.clone(), out_format));
        data.push((bytes, out_format));
    }
    let mut tensors = Vec::with_capacity(data.len());
    for (t, (bytes, f)) in g.tensors.iter().zip(&data) {
        let ggml_type = type_of(*f).ok_or_else(|| HfError::Unsupported(format!("{}: {} in GGUF", t.name, f.name())))?;
        tensors.push(TensorOut { name: t.name.clone(), ne: t.ne.clone(), ggml_type, bytes });
    }
    let out = to_bytes(&g.metadata, &tensors);
    report.bytes = out.len();
    Ok((out, report))
}
