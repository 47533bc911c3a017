//! `adapter_config.json` parsing on arbitrary text, then every question a
//! merge asks of the config (targets, layers, ranks, alphas, scales,
//! feedforward kinds) for a few module names, for every method: it must
//! return, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use peft_faer::hf::PeftConfig;

const MODULES: [&str; 4] = ["layers.0.q_proj", "model.layers.11.self_attn.v_proj", "h.3.attn.c_attn", "lm_head"];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match PeftConfig::parse(text) {
        Ok(PeftConfig::Lora(c)) => {
            for m in MODULES {
                let _ = (c.adapts(m), c.rank_for(m), c.alpha_for(m));
                if let Ok(s) = c.scale_for(m) {
                    assert!(s.is_finite(), "{m}: scale {s}");
                }
            }
            let _ = c.target_modules.to_json();
        }
        Ok(PeftConfig::Loha(c) | PeftConfig::Lokr(peft_faer::hf::LokrConfig { common: c, .. })) => {
            for m in MODULES {
                let _ = (c.target_modules.matches(m), c.rank_for(m), c.alpha_for(m));
            }
        }
        Ok(PeftConfig::Ia3(c)) => {
            for m in MODULES {
                let _ = (c.target_modules.matches(m), c.is_feedforward(m));
            }
        }
        Ok(PeftConfig::Vera(c)) => {
            for m in MODULES {
                let _ = c.target_modules.matches(m);
            }
        }
        _ => {}
    }
});
