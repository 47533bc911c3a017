//! BOFT against the `boft` (one factor, blocks of 8), `boft_butterfly`
//! (three butterfly factors, blocks of 4) and `boft_butterfly_cpu` (two
//! factors asked for, one kept by PEFT on a CPU; 4 blocks) fixtures PEFT
//! 0.21.2 wrote (see `tests/fixtures/peft/README.md`): `peft merge` against
//! PEFT's `merge_and_unload`, `peft_core::boft` against PEFT's unmerged
//! module outputs, the butterfly permutations against PEFT's `boft_P`, the
//! folder written back and converted both ways bit for bit, `inspect`, and
//! the refusals.
#![cfg(feature = "cli")]

mod common;

use std::process::Command;

use peft_faer::hf::{HfAdapter, PeftConfig};

use common::{
    assert_converts_bit_for_bit, assert_merge_matches, assert_module_forward, case_dir, edited, load, scratch,
};

/// The case's merge, module outputs, permutations, write-back and
/// conversion; `factors` kept per module.
fn check_case(case: &str, factors: usize) {
    let dir = case_dir(case);
    let (_, refs, base) = assert_merge_matches(&dir);
    let ad = HfAdapter::read_dir(&dir).unwrap();
    assert!(matches!(ad.config, PeftConfig::Boft(_)), "{case}: not BOFT");
    assert_eq!(ad.boft.len(), 6);
    for m in &ad.boft {
        let shape = &base[&format!("{}.weight", m.name)].1;
        let mut layer = m.layer(shape[1], shape[0]).unwrap();
        assert_eq!(layer.factors(), factors, "{case}: {}", m.name);
        // PEFT's permutations, as its boft_P held them ([F, in], P_f[j, perm_f[j]] = 1).
        let perm = &refs[&format!("boft_perm.{}", m.name)];
        assert_eq!(perm.1, [factors, shape[1]]);
        for (k, &p) in perm.2.iter().enumerate() {
            assert_eq!(layer.perm(k / shape[1], k % shape[1]), p as usize, "{case}: {} perm {k}", m.name);
        }
        assert_module_forward(&base, &refs, &m.name, &mut layer);
    }
    let back = scratch(&format!("{case}-back"));
    ad.write_dir(&back.join("back"), false).unwrap();
    assert_eq!(load(&back.join("back/adapter_model.safetensors")), load(&dir.join("adapter_model.safetensors")));
    assert_converts_bit_for_bit(&dir);
}

#[test]
fn boft_merge_and_forward_match_peft() {
    check_case("boft", 1);
    check_case("boft_butterfly", 3);
    check_case("boft_butterfly_cpu", 1);
    // Parameters by hand, per layer q_proj (64 -> 64), v_proj (64 -> 48), o_proj (48 -> 64), boft_R F N b^2 plus
    // boft_s out: boft 512 + 64, 512 + 48, 384 + 64 = 1584; the butterfly 768 + 64, 768 + 48, 576 + 64 = 2288;
    // the CPU case 1024 + 64, 1024 + 48, 576 + 64 = 2800; two layers each.
    for (case, total, headline) in [
        ("boft", 3168, "method boft: boft_block_size=8 boft_block_num=0 boft_n_butterfly_factor=1"),
        ("boft_butterfly", 4576, "boft_n_butterfly_factor=3"),
        ("boft_butterfly_cpu", 5600, "boft_block_size=0 boft_block_num=4 boft_n_butterfly_factor=2"),
    ] {
        let res = Command::new(env!("CARGO_BIN_EXE_peft")).arg("inspect").arg(case_dir(case)).output().unwrap();
        let text = String::from_utf8_lossy(&res.stdout);
        assert!(res.status.success() && text.contains(headline), "{case}: {text}");
        assert!(text.contains(&format!("total: 6 modules, {total} trainable parameters")), "{case}: {text}");
    }
}

#[test]
fn boft_refusals_name_the_field() {
    let dir = edited("boft", "boft-both", |c| c["boft_block_num"] = 8.into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("boft_block_size") && err.contains("boft_block_num"), "{err}");
    let dir = edited("boft", "boft-fan", |c| c["fan_in_fan_out"] = true.into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("fan_in_fan_out"), "{err}");
    // A config whose block size is not the tensors': the reader names the tensor and the block it expected.
    let dir = edited("boft", "boft-block", |c| c["boft_block_size"] = 4.into());
    let err = HfAdapter::read_dir(&dir).unwrap_err().to_string();
    assert!(err.contains("boft_R") && err.contains("boft_block_size = 4"), "{err}");
}
