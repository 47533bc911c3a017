//! Tensor names: llama.cpp's (`blk.N.attn_q.weight`) and Hugging Face's
//! (`model.layers.N.self_attn.q_proj.weight`), and the converter's row
//! permutation of the query and key projections (see
//! [`crate::llama::gguf`] for the table and the why).

/// The GGUF name of a Hugging Face Llama tensor name.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{kind}"))
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
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let long = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{long}.{kind}"))
}

/// Whether the Hugging Face tensor `hf` is stored row-permuted in GGUF
/// (the query and key projections' weights and biases).
pub fn is_permuted(hf: &str) -> bool {
    ["self_attn.q_proj.", "self_attn.k_proj."].iter().any(|p| hf.contains(p))
}
