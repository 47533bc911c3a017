//! A model's `config.json` (`LlamaConfig::parse`) on arbitrary text: it
//! must return, never panic, and what it accepts must keep every size the
//! model allocates from within the stated limits (`MAX_DIM`, `MAX_LAYERS`,
//! `MAX_ELEMENTS`), with the products a model forms from them not
//! overflowing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peft_faer::llama::{LlamaConfig, MAX_DIM, MAX_ELEMENTS, MAX_LAYERS};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(c) = LlamaConfig::parse(text) else { return };
    let dims = [c.vocab_size, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim];
    assert!(dims.iter().all(|&d| d >= 1 && d <= MAX_DIM), "{dims:?}");
    assert!(c.num_layers >= 1 && c.num_layers <= MAX_LAYERS, "{}", c.num_layers);
    let (q, kv) = (c.q_width(), c.kv_width());
    for (rows, cols) in
        [(c.vocab_size, c.hidden_size), (q, c.hidden_size), (kv, c.hidden_size), (c.intermediate_size, c.hidden_size)]
    {
        let n = rows.checked_mul(cols).expect("a matrix's size overflows");
        assert!(n <= MAX_ELEMENTS, "[{rows}, {cols}]");
    }
    assert!(c.rms_norm_eps.is_finite() && c.rms_norm_eps > 0.0 && c.rope_theta.is_finite() && c.rope_theta > 0.0);
});
