//! AdaLoRA against the `adalora` and `adalora_allocated` fixtures PEFT
//! 0.21.2 wrote (see `tests/fixtures/peft/README.md`): `peft merge`
//! against PEFT's `merge_and_unload`, `peft_core::adalora` against PEFT's
//! unmerged module outputs, the folder written back and converted both
//! ways bit for bit, `inspect`, and the refusals. `adalora_allocated` holds
//! what PEFT's own budget allocation kept: 2 or 4 triplets per module, with
//! `ranknum` still `init_r = 6` (the trap: dividing by the kept rank gives
//! other weights).
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use peft_faer::hf::{HfAdapter, PeftConfig};

use common::{assert_converts_bit_for_bit, assert_merge_matches, assert_module_forward, case_dir, edited, scratch};

fn check_case(case: &str, ranks: &[(&str, usize)]) {
    let dir = case_dir(case);
    let (_, refs, base) = assert_merge_matches(&dir);
    let ad = HfAdapter::read_dir(&dir).unwrap();
    let PeftConfig::AdaLora(c) = &ad.config else { panic!("{case}: not AdaLoRA") };
    assert_eq!((c.init_r, c.lora_alpha), (6, 12.0));
    assert_eq!(ad.adalora.len(), 6);
    for m in &ad.adalora {
        // s = 12 / (6 + 1e-5 in f32), whatever the kept rank.
        assert_eq!(m.scale, 12.0 / f64::from(6.0f32 + 1e-5f32), "{}", m.name);
        let want = ranks.iter().find(|(n, _)| *n == m.name).map_or(6, |r| r.1);
        assert_eq!(m.r, want, "{case}: {} kept rank", m.name);
        assert_module_forward(&base, &refs, &m.name, &mut m.layer().unwrap());
    }
    let back = scratch(&format!("{case}-back"));
    ad.write_dir(&back.join("back"), false).unwrap();
    let load = common::load;
    assert_eq!(load(&back.join("back/adapter_model.safetensors")), load(&dir.join("adapter_model.safetensors")));
    assert_converts_bit_for_bit(&dir);
}

#[test]
fn adalora_merge_and_forward_match_peft() {
    check_case("adalora", &[]);
    let res = Command::new(env!("CARGO_BIN_EXE_peft")).arg("inspect").arg(case_dir("adalora")).output().unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success() && text.contains("method adalora: init_r=6 lora_alpha=12"), "{text}");
    // By hand: q_proj 6 (64 + 64 + 1) = 774 twice; v_proj and o_proj 6 (64 + 48 + 1) = 678, four.
    assert!(text.contains("total: 6 modules, 4260 trainable parameters"), "{text}");
}

#[test]
fn adalora_allocated_keeps_ranknum_at_init_r() {
    // The kept ranks, from the saved rank_pattern (CASES.md lists them).
    let ranks = [
        ("layers.0.o_proj", 2),
        ("layers.0.q_proj", 4),
        ("layers.0.v_proj", 2),
        ("layers.1.o_proj", 4),
        ("layers.1.q_proj", 4),
        ("layers.1.v_proj", 2),
    ];
    check_case("adalora_allocated", &ranks);
}

#[test]
fn adalora_refusals_name_the_field() {
    type Edit<'a> = &'a dyn Fn(&mut serde_json::Value);
    let cases: [(&str, &str, Edit<'_>, &str); 5] = [
        // Without its rank_pattern the allocated file's shapes are not init_r's.
        ("adalora_allocated", "ada-no-pattern", &|c| c["rank_pattern"] = serde_json::Value::Null, "rank"),
        ("adalora", "ada-init-r", &|c| c["init_r"] = 4.into(), "rank"),
        (
            "adalora_allocated",
            "ada-short-mask",
            &|c| c["rank_pattern"]["layers.0.o_proj.lora_E"] = serde_json::json!([true]),
            "rank_pattern",
        ),
        ("adalora", "ada-fan", &|c| c["fan_in_fan_out"] = true.into(), "fan_in_fan_out"),
        (
            "adalora",
            "ada-stray",
            &|c| {
                c["rank_pattern"] = serde_json::json!({"layers.9.q_proj.lora_E": [true, true, true, true, true, true]})
            },
            "layers.9.q_proj",
        ),
    ];
    for (case, name, edit, needle) in cases {
        let err = HfAdapter::read_dir(&edited(case, name, edit)).unwrap_err().to_string();
        assert!(err.contains(needle), "{name}: {err}");
    }
}
