//! `adapter_config.json` parsing on arbitrary text, then every question a
//! merge asks of the config (targets, layers, ranks, alphas, scales) for a
//! few module names: it must return, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peft_faer::hf::PeftConfig;

const MODULES: [&str; 4] = ["layers.0.q_proj", "model.layers.11.self_attn.v_proj", "h.3.attn.c_attn", "lm_head"];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(PeftConfig::Lora(c)) = PeftConfig::parse(text) {
        for m in MODULES {
            let _ = (c.adapts(m), c.rank_for(m), c.alpha_for(m));
            if let Ok(s) = c.scale_for(m) {
                assert!(s.is_finite(), "{m}: scale {s}");
            }
        }
        let _ = c.target_modules.to_json();
    }
});
