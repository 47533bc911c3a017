//! Tensor names: llama.cpp's (`blk.N.attn_q.weight`) and Hugging Face's
//! (`model.layers.N.self_attn.q_proj.weight`), and the converter's row
//! permutation of the query and key projections (see
//! [`crate::llama::gguf`] for the table and the why).

/// Whole-tensor names: `(GGUF, Hugging Face)`.
const FIXED: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// Per-layer modules: `(GGUF, Hugging Face)`, under `blk.N.` and
/// `model.layers.N.`.
const LAYER: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// `name` translated through the tables: from GGUF to Hugging Face when
/// `to_hf`, the other way otherwise.
fn translate(name: &str, to_hf: bool) -> Option<String> {
    let pick = |(g, h): (&'static str, &'static str)| if to_hf { (g, h) } else { (h, g) };
    if let Some((_, to)) = FIXED.into_iter().map(pick).find(|(from, _)| *from == name) {
        return Some(to.to_string());
    }
    let (prefix, out_prefix) = if to_hf { ("blk.", "model.layers.") } else { ("model.layers.", "blk.") };
    let (layer, rest) = name.strip_prefix(prefix)?.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let (_, to) = LAYER.into_iter().map(pick).find(|(from, _)| *from == module)?;
    Some(format!("{out_prefix}{layer}.{to}.{kind}"))
}

/// The GGUF name of a Hugging Face Llama tensor name.
pub fn gguf_name(hf: &str) -> Option<String> {
    translate(hf, false)
}

/// The Hugging Face row that GGUF row `g` of a permuted projection holds
/// (`head_dim` even; see [`crate::llama::gguf`]).
pub fn hf_row(g: usize, head_dim: usize) -> usize {
    let (h, r) = (g / head_dim, g % head_dim);
    h * head_dim + (r % 2) * (head_dim / 2) + r / 2
}

/// The Hugging Face name of a GGUF Llama tensor name (the inverse of
/// [`gguf_name`]).
pub fn hf_name(gguf: &str) -> Option<String> {
    translate(gguf, true)
}

/// Rows of `unit` values between the two orders of a permuted projection
/// (see [`hf_row`]): to Hugging Face's when `to_hf` (GGUF row `g` moves to
/// row `hf_row(g)`), to GGUF's otherwise. `None` unless `src` is whole
/// rows of whole heads (`head_dim` even and non-zero).
pub fn permute_rows<T: Copy + Default>(src: &[T], unit: usize, head_dim: usize, to_hf: bool) -> Option<Vec<T>> {
    if unit == 0 || head_dim == 0 || !head_dim.is_multiple_of(2) || !src.len().is_multiple_of(unit * head_dim) {
        return None;
    }
    let mut out = vec![T::default(); src.len()];
    for (g, row) in src.chunks_exact(unit).enumerate() {
        let h = hf_row(g, head_dim);
        let (from, to) = if to_hf { (row, h) } else { (&src[h * unit..(h + 1) * unit], g) };
        out[to * unit..(to + 1) * unit].copy_from_slice(from);
    }
    Some(out)
}

/// Whether the Hugging Face tensor `hf` is stored row-permuted in GGUF
/// (the query and key projections' weights and biases).
pub fn is_permuted(hf: &str) -> bool {
    ["self_attn.q_proj.", "self_attn.k_proj."].iter().any(|p| hf.contains(p))
}
