//! The whole invariant suite against the reference backend and the faer
//! backend, in f32, f64, f16 and bf16 (256 cases per property by default;
//! `PROPTEST_CASES` overrides). Failing seeds are saved under
//! `peft-verify/proptest-regressions/` and replayed first on later runs.

use half::{bf16, f16};
use peft_core::Reference;
use peft_faer::{Faer, FaerHalf};
use peft_verify::{Config, verify, verify_int8_activations};

fn config() -> Config {
    Config {
        regressions: Some(concat!(env!("CARGO_MANIFEST_DIR"), "/proptest-regressions").into()),
        ..Config::default()
    }
}

#[test]
fn reference_f32() {
    verify::<f32, _>(&Reference, &config()).assert_ok();
}

#[test]
fn reference_f64() {
    verify::<f64, _>(&Reference, &config()).assert_ok();
}

#[test]
fn reference_f16() {
    verify::<f16, _>(&Reference, &config()).assert_ok();
}

#[test]
fn reference_bf16() {
    verify::<bf16, _>(&Reference, &config()).assert_ok();
}

#[test]
fn faer_f32() {
    verify::<f32, _>(&Faer::new(), &config()).assert_ok();
}

#[test]
fn faer_f64() {
    verify::<f64, _>(&Faer::new(), &config()).assert_ok();
}

#[test]
fn faer_f16() {
    verify::<f16, _>(&FaerHalf::new(Faer::new(), vec![0.0f32; 4096]), &config()).assert_ok();
}

#[test]
fn faer_bf16() {
    verify::<bf16, _>(&FaerHalf::new(Faer::new(), vec![0.0f32; 4096]), &config()).assert_ok();
}

/// The integer decode path (`Faer::int8_activations`) on one and two
/// threads, and the exact paths (which meet its looser bound too), within
/// the int8 path's stated bound of the oracle.
#[test]
fn int8_activations_within_bound() {
    let cfg = config();
    verify_int8_activations(&Faer::new().int8_activations(true), &cfg).assert_ok();
    verify_int8_activations(&Faer::with_threads(2).int8_activations(true), &cfg).assert_ok();
    verify_int8_activations(&Faer::new(), &cfg).assert_ok();
    verify_int8_activations(&Reference, &cfg).assert_ok();
}

/// The report names every property of the crate docs' table.
#[test]
fn every_property_runs() {
    let r = verify::<f32, _>(&Reference, &Config { cases: 1, regressions: None, ..Config::default() });
    let names: Vec<&str> = r.results.iter().map(|(n, _, _)| *n).collect();
    for want in [
        "gemm_matches_oracle",
        "gemm_block_edges",
        "gemm_past_128",
        "backends_agree",
        "lora_identity_at_init",
        "lora_matches_oracle",
        "lora_merged_equals_unmerged",
        "lora_unmerge_restores",
        "lora_merge_guard_restores_on_drop",
        "lora_gradients_match_fd",
        "lora_backward_is_adapter_sized",
        "lora_targets_follow_peft",
        "lora_param_report_flags_high_rank",
        "dora_identity_at_init",
        "dora_matches_oracle",
        "dora_merged_equals_unmerged",
        "dora_unmerge_restores",
        "dora_gradients_match_fd",
        "ia3_identity_at_init",
        "ia3_matches_oracle",
        "ia3_merged_equals_unmerged",
        "ia3_unmerge_restores",
        "ia3_gradients_match_fd",
        "lora_embedding_matches_oracle",
        "lora_embedding_identity_at_init",
        "lora_embedding_merged_equals_unmerged",
        "lora_embedding_unmerge_restores",
        "lora_embedding_gradients_match_fd",
        "loha_identity_at_init",
        "loha_matches_oracle",
        "loha_merged_equals_unmerged",
        "loha_unmerge_restores",
        "loha_gradients_match_fd",
        "adalora_identity_at_init",
        "adalora_matches_oracle",
        "adalora_merged_equals_unmerged",
        "adalora_unmerge_restores",
        "adalora_gradients_match_fd",
        "miss_identity_at_init",
        "miss_matches_oracle",
        "miss_merged_equals_unmerged",
        "miss_unmerge_restores",
        "miss_gradients_match_fd",
        "hra_identity_at_init",
        "hra_matches_oracle",
        "hra_merged_equals_unmerged",
        "hra_unmerge_restores",
        "hra_gradients_match_fd",
        "oft_identity_at_init",
        "oft_matches_oracle",
        "oft_merged_equals_unmerged",
        "oft_unmerge_restores",
        "oft_gradients_match_fd",
        "boft_identity_at_init",
        "boft_matches_oracle",
        "boft_merged_equals_unmerged",
        "boft_unmerge_restores",
        "boft_gradients_match_fd",
        "fourierft_identity_at_init",
        "fourierft_matches_oracle",
        "fourierft_merged_equals_unmerged",
        "fourierft_unmerge_restores",
        "fourierft_gradients_match_fd",
        "randlora_identity_at_init",
        "randlora_matches_oracle_and_merges",
        "randlora_unmerge_restores",
        "randlora_gradients_match_fd",
        "vblora_matches_oracle_and_merges",
        "vblora_unmerge_restores",
        "vblora_gradients_match_fd",
        "road_identity_at_init",
        "road_matches_oracle",
        "road_merged_equals_unmerged",
        "road_unmerge_restores",
        "road_gradients_match_fd",
        "c3a_identity_at_init",
        "c3a_matches_oracle",
        "c3a_merged_equals_unmerged",
        "c3a_unmerge_restores",
        "c3a_gradients_match_fd",
        "shira_identity_at_init",
        "shira_matches_oracle",
        "shira_merged_equals_unmerged",
        "shira_unmerge_restores",
        "shira_gradients_match_fd",
        "ln_tuning_identity_at_init",
        "ln_tuning_matches_oracle",
        "ln_tuning_merged_equals_unmerged",
        "ln_tuning_unmerge_restores",
        "ln_tuning_gradients_match_fd",
        "trainable_tokens_identity_at_init",
        "trainable_tokens_matches_oracle",
        "trainable_tokens_merged_equals_unmerged",
        "trainable_tokens_unmerge_restores",
        "trainable_tokens_gradients_match_fd",
        "lokr_matches_oracle_and_merges",
        "lokr_unmerge_restores",
        "lokr_identity_at_init",
        "lokr_gradients_match_fd",
        "vera_identity_at_init",
        "vera_matches_oracle",
        "vera_merged_equals_unmerged",
        "vera_unmerge_restores",
        "vera_gradients_match_fd",
        "storage_quantization_within_bound",
        "storage_forward_matches_dequantized",
        "storage_lora_gradients_match_fd",
        "set_active_sum_matches_oracle",
        "set_mixed_rows_match_own_forward",
        "set_mixed_gradients_match_fd",
        "combine_density_respected",
        "combine_density_one_is_linear",
        "combine_cat_is_exact",
        "adapter_identity_at_init",
        "adapter_matches_oracle",
        "adapter_gradients_match_fd",
        "prompt_prepends_and_shifts",
        "prompt_gradient_is_batch_sum",
        "attention_matches_oracle",
        "prefix_seen_by_every_query",
        "empty_prefix_is_identity",
        "attention_gradients_match_fd",
        "frozen_base_untouched",
        "optimizer_matches_oracle",
        "optimizer_refuses_nonfinite",
        "adapter_file_round_trip",
        "bad_input_is_typed",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
}

/// The thorough profile (block-edge products at every case, method shapes
/// up to 140 wide, 32 cases per property) for every backend and type.
#[test]
fn thorough_reference_f32() {
    verify::<f32, _>(&Reference, &Config { regressions: config().regressions, ..Config::thorough() }).assert_ok();
}

#[test]
fn thorough_faer_every_type() {
    let cfg = Config { regressions: config().regressions, ..Config::thorough() };
    verify::<f32, _>(&Faer::new(), &cfg).assert_ok();
    verify::<f64, _>(&Faer::new(), &cfg).assert_ok();
    verify::<f16, _>(&FaerHalf::new(Faer::new(), vec![0.0f32; 4096]), &cfg).assert_ok();
    verify::<bf16, _>(&FaerHalf::new(Faer::new(), vec![0.0f32; 4096]), &cfg).assert_ok();
}
