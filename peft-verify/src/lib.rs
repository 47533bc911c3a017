//! # peft-verify
//!
//! The twelve common PEFT mistakes ([`mistakes`]) as properties that any
//! [`Backend`] can run against itself, on random shapes
//! and values (proptest), against an f64 oracle ([`oracle`]) that shares no
//! code with `peft-core`.
//!
//! ```no_run
//! use peft_core::Reference;
//! // Every property, 256 cases each (PROPTEST_CASES overrides), in f32:
//! peft_verify::verify::<f32, _>(&Reference, &peft_verify::Config::default()).assert_ok();
//! ```
//!
//! A backend of your own (a DSP library, a GPU) implements
//! `Backend<E>` for the element types it supports and calls [`verify`] for
//! each. The properties, each its own name in the [`Report`]:
//!
//! | property | what it checks | [mistake](mistakes) |
//! |---|---|---|
//! | `gemm_matches_oracle` | the backend's gemm (shapes with 1 row or column, transposes, Replace and Add) against the oracle | - |
//! | `gemm_block_edges` | the same at blocking edges: `k` across 128 and 256, `m`, `n` across 64 and 128 (an off-by-one in a blocked kernel) | - |
//! | `gemm_past_128` | one `129 x 130 x 257` product per run: past 128 in every dimension | - |
//! | `backends_agree` | the backend and `Reference` give the same LoRA output within the bound | - |
//! | `lora_identity_at_init` | `B = 0` at init: the output equals the base output exactly | 2 |
//! | `lora_matches_oracle` | `x W^T + b + s (x A^T) B^T`, `s = alpha / r` or `alpha / sqrt(r)`, applied once | 3 |
//! | `lora_merged_equals_unmerged` | after merge the single matmul gives the unmerged output | 6 |
//! | `lora_unmerge_restores` | bit-exact with a backup, within the documented drift bound without | 6 |
//! | `lora_merge_guard_restores_on_drop` | a dropped merge guard restores W bit for bit, `keep` leaves it merged (merging twice does not compile) | 6 |
//! | `lora_gradients_match_fd` | dA, dB, dx against central differences of the oracle | 12 |
//! | `lora_backward_is_adapter_sized` | backward needs `O(tokens r)` scratch: no `[out, in]` gradient exists | 12 |
//! | `lora_targets_follow_peft` | the target-module rule against PEFT's (`==` or `.`-suffix) | 4 |
//! | `lora_param_report_flags_high_rank` | the parameter report flags ranks at >= 25% of the layer | 5 |
//! | `dora_identity_at_init` | DoRA at init (`B = 0`, `m = ‖W‖_row`): exactly the base output | 2 |
//! | `dora_matches_oracle` | `b + (m / n) (x W^T + s (x A^T) B^T)`, `n = ‖W + s B A‖_row`, the bias not scaled | 3 |
//! | `dora_merged_equals_unmerged` | the merged `(m / n) (W + s B A)` gives the unmerged output | 6 |
//! | `dora_unmerge_restores` | bit-exact with a backup, within four roundings without | 6 |
//! | `dora_gradients_match_fd` | dA, dB, dm, dx against central differences, the norm held constant (PEFT detaches it) | 12 |
//! | `ia3_identity_at_init` | (IA)^3 at init (`l = 1`), both kinds: exactly the base output | 2 |
//! | `ia3_matches_oracle` | `(x W^T + b) * l`, or `(x * l) W^T + b` for a feedforward layer | 3 |
//! | `ia3_merged_equals_unmerged` | the merged weight (and output kind's bias) gives the unmerged output | 6 |
//! | `ia3_unmerge_restores` | bit-exact with a backup, within two roundings without | 6 |
//! | `ia3_gradients_match_fd` | dl and dx against central differences | 12 |
//! | `lora_embedding_matches_oracle` | LoRA on an embedding table: `E[id] + s B A[:, id]` | 3 |
//! | `lora_embedding_identity_at_init` | PEFT's embedding init (`A = 0`): exactly the table's rows | 2 |
//! | `lora_embedding_merged_equals_unmerged` | `E + s (B A)^T` gives the looked-up rows | 6 |
//! | `lora_embedding_unmerge_restores` | the embedding table's typed merge: as `loha_unmerge_restores` | 6 |
//! | `lora_embedding_gradients_match_fd` | dA (scattered to the looked-up columns) and dB against central differences | 12 |
//! | `loha_identity_at_init` | LoHa at init (`W2b = 0`): exactly the base output | 2 |
//! | `loha_matches_oracle` | `x (W + s (W1a W1b) * (W2a W2b))^T` | 3 |
//! | `loha_merged_equals_unmerged` | `W + dW` gives the unmerged output | 6 |
//! | `loha_unmerge_restores` | LoHa's typed merge: bit-exact with a backup, within two roundings without, `keep` stays merged | 6 |
//! | `loha_gradients_match_fd` | the four factors' gradients and dx against central differences | 12 |
//! | `adalora_identity_at_init` | AdaLoRA at PEFT's init (`E = 0`): exactly the base output | 2 |
//! | `adalora_matches_oracle` | `x (W + s B diag(E) A)^T`, `s = alpha / (r + 1e-5)` | 3 |
//! | `adalora_merged_equals_unmerged` | `W + dW` gives the unmerged output | 6 |
//! | `adalora_unmerge_restores` | AdaLoRA's typed merge: as `loha_unmerge_restores` | 6 |
//! | `adalora_gradients_match_fd` | dA, dE, dB and dx against central differences | 12 |
//! | `miss_identity_at_init` | MiSS at PEFT's init (`D = 0`), each variant: exactly the base output | 2 |
//! | `miss_matches_oracle` | `x (W + dW)^T`, `dW` written from PEFT's balance, mini and bat formulas | 3 |
//! | `miss_merged_equals_unmerged` | the merged weight (bat: from `W`'s blocks) gives the unmerged output | 6 |
//! | `miss_unmerge_restores` | balance and mini as `loha_unmerge_restores`; bat restored from a backup, refused without one | 6 |
//! | `miss_gradients_match_fd` | dD and dx against central differences, each variant | 12 |
//! | `hra_identity_at_init` | HRA at PEFT's init (even `r`, equal column pairs): the base output, up to each reflection's rounding | 5 |
//! | `hra_matches_oracle` | `x (W H)^T`, `H` the reflections' product or `I - 2 W W^T` after Gram-Schmidt | 5 |
//! | `hra_merged_equals_unmerged` | `W H` gives the unmerged output | 5 |
//! | `hra_unmerge_restores` | bit-exact from a backup; `H^T` undoes `H` without one | 5 |
//! | `c3a_identity_at_init` | C3A at PEFT's zero init (`init_weights = true`): exactly the base output | 2 |
//! | `c3a_matches_oracle` | `x (W + dW)^T`, `dW` written element-wise from PEFT's FFT formula | 3 |
//! | `c3a_merged_equals_unmerged` | `W + dW` gives the unmerged output | 6 |
//! | `c3a_unmerge_restores` | as `loha_unmerge_restores` | 6 |
//! | `c3a_gradients_match_fd` | the kernel's gradient and dx against central differences | 12 |
//! | `shira_identity_at_init` | SHiRA at init (`w = 0` over a fresh mask): exactly the base output; the mask's positions distinct and row-major | 2 |
//! | `shira_matches_oracle` | `x (W + dW)^T`, `dW` scattered from the positions | 3 |
//! | `shira_merged_equals_unmerged` | `W + dW` gives the unmerged output | 6 |
//! | `shira_unmerge_restores` | as `loha_unmerge_restores` | 6 |
//! | `shira_gradients_match_fd` | dw and dx against central differences | 12 |
//! | `ln_tuning_identity_at_init` | LN tuning at PEFT's init (a copy of the base norm's parameters): exactly the base norm's output | 0 |
//! | `ln_tuning_matches_oracle` | torch's LayerNorm (with and without a bias) and Llama's RMSNorm over the adapter's parameters | 1 |
//! | `ln_tuning_merged_equals_unmerged` | the norm with the replaced parameters gives the unmerged output bit for bit | 0 |
//! | `ln_tuning_unmerge_restores` | the merge writes the adapter's values; the unmerge puts the originals back bit for bit, without a backup | 0 |
//! | `ln_tuning_gradients_match_fd` | dw', db' and dx against central differences, each norm | 12 |
//! | `trainable_tokens_identity_at_init` | trainable tokens at PEFT's init (copies of the table's rows): exactly the table's lookup | 0 |
//! | `trainable_tokens_matches_oracle` | the lookup in `E'` (the rows replaced), exactly; a tied output layer's `x E'^T` | 1 |
//! | `trainable_tokens_merged_equals_unmerged` | the merged table's rows are the unmerged lookup, bit for bit | 0 |
//! | `trainable_tokens_unmerge_restores` | the merge writes `E'`; the unmerge restores the table bit for bit without a backup, whole and in blocks of 3 rows | 0 |
//! | `trainable_tokens_gradients_match_fd` | the rows' gradient through the lookup and the tied output layer, and the layer's input gradient, against central differences | 12 |
//! | `road_identity_at_init` | RoAd at PEFT's init (`theta = 0`, `alpha = 1`), each variant: exactly the base output | 2 |
//! | `road_matches_oracle` | `R (x W^T + b)`, `R` built with PEFT's reshapes for road_1, road_2, road_4 | 8 |
//! | `road_merged_equals_unmerged` | `R W` and `R b` give the unmerged output | 8 |
//! | `road_unmerge_restores` | bit-exact from a backup; each pair's inverse without one | 8 |
//! | `road_gradients_match_fd` | dtheta, dalpha and dx against central differences | 8 |
//! | `hra_gradients_match_fd` | dU (through the normalization, or through Gram-Schmidt) and dx against central differences | 12 |
//! | `oft_identity_at_init` | OFT at PEFT's init (`oft_R = 0`): exactly the base output | 2 |
//! | `oft_matches_oracle` | `x R_bd W^T`, `R_bd` from the series (1 to 6 terms), the exact Cayley transform, one shared block, or COFT's projection | 5 |
//! | `oft_merged_equals_unmerged` | `W R_bd^T` gives the unmerged output | 5 |
//! | `oft_unmerge_restores` | bit-exact from a backup; each block's inverse undoes it without one | 5 |
//! | `oft_gradients_match_fd` | d`oft_R` (through the series or the exact transform; at the projected vector with COFT) and dx against central differences | 12 |
//! | `boft_identity_at_init` | BOFT at PEFT's init (`boft_R = 0`, `boft_s = 1`): exactly the base output | 2 |
//! | `boft_matches_oracle` | `(x M W^T) s + b`, `M` the butterfly product of exact-Cayley blocks, one to four factors | 5 |
//! | `boft_merged_equals_unmerged` | `(W M^T) s` gives the unmerged output | 5 |
//! | `boft_unmerge_restores` | bit-exact from a backup; `1 / s` and `M` undo it without one | 5 |
//! | `boft_gradients_match_fd` | d`boft_R` (through the Cayley transform and the permutations), d`boft_s` and dx against central differences | 12 |
//! | `fourierft_identity_at_init` | FourierFT with a zero spectrum (PEFT's `init_weights = True`): exactly the base output | 2 |
//! | `fourierft_matches_oracle` | `x (W + dW)^T`, `dW` PEFT's `ifft2(S).real * scaling` as a sum of cosines | 5 |
//! | `fourierft_merged_equals_unmerged` | `W + dW` gives the unmerged output | 5 |
//! | `fourierft_unmerge_restores` | the typed merge, as `loha_unmerge_restores` | 5 |
//! | `fourierft_gradients_match_fd` | d`fourierft_spectrum` and dx against central differences | 12 |
//! | `randlora_identity_at_init` | RandLoRA at PEFT's init (`lambda = 0`): exactly the base output | 2 |
//! | `randlora_matches_oracle_and_merges` | `x (W + dW)^T`, `dW` from PEFT's `get_scaled_bases` (its index pairing, both orientations), and the merged weight gives it | 5 |
//! | `randlora_unmerge_restores` | the typed merge, as `loha_unmerge_restores` | 5 |
//! | `randlora_gradients_match_fd` | d`lambda`, d`gamma` and dx against central differences | 12 |
//! | `vblora_matches_oracle_and_merges` | `x (W + B A)^T`, `A`, `B` PEFT's top-k softmax mixes of the bank, and the merged weight gives it | 3 |
//! | `vblora_unmerge_restores` | the typed merge, as `loha_unmerge_restores` | 3 |
//! | `vblora_gradients_match_fd` | d`logits_A`, d`logits_B`, the bank's and dx against central differences (away from ties at the k-th place) | 12 |
//! | `lokr_matches_oracle_and_merges` | LoKr, each factor full or low rank: `x (W + s kron(W1, W2))^T`, and the merged weight gives it | 3, 6 |
//! | `lokr_unmerge_restores` | LoKr's typed merge, each factor form: as `loha_unmerge_restores` | 6 |
//! | `lokr_identity_at_init` | LoKr at PEFT's init (`W1 = 0`, each factor form): exactly the base output | 2 |
//! | `lokr_gradients_match_fd` | every factor form's gradients and dx against central differences | 12 |
//! | `vera_identity_at_init` | VeRA at init (`lambda_b = 0`): exactly the base output | 2 |
//! | `vera_matches_oracle` | `x (W + diag(lambda_b) B diag(lambda_d) A)^T` with `A`, `B` sliced from wider shared projections | 3 |
//! | `vera_merged_equals_unmerged` | `W + dW` gives the unmerged output | 6 |
//! | `vera_unmerge_restores` | the typed merge (`DenseDelta::merge_into`): bit-exact with a backup, within two roundings without, `keep` stays merged | 6 |
//! | `vera_gradients_match_fd` | `lambda_d`, `lambda_b` and dx against central differences (no gradient for the projections) | 12 |
//! | `storage_quantization_within_bound` | int8, Q8_0, Q4_0 (GGUF's rounding), f16, bf16: `|w - deq(quant(w))|` within the format's bound (`storage::error_bound`) | - |
//! | `storage_forward_matches_dequantized` | every storage: `x deq(W)^T` and `g deq(W)` through the backend against the oracle over the dequantized `W` | - |
//! | `storage_block_formats_match_dequantized` | GGUF's read-only block formats (Q4_1 to Q6_K, random blocks, 1 to 5 rows of 256 to 512 values, 1 to 6 tokens): element access equals the block decoder bit for bit, `x deq(W)^T` and `g deq(W)` through the backend against the oracle | - |
//! | `storage_int8_activations_within_bound` | ([`verify_int8_activations`] only) one token's `x deq(W)^T` over Q8_0 and Q4_0 within the int8 path's stated bound of the oracle (`props::storage::run_int8_activations`) | - |
//! | `storage_lora_gradients_match_fd` | LoRA over every storage: dA, dB, dx against central differences; the stored bytes unchanged | 1, 12 |
//! | `set_active_sum_matches_oracle` | an adapter set with several active adapters and multipliers: `x W^T + b + sum_i m_i s_i (x A_i^T) B_i^T` | - |
//! | `set_mixed_rows_match_own_forward` | a mixed-adapter batch: every row equals its own adapter's (or the base's) oracle output | - |
//! | `set_mixed_gradients_match_fd` | the mixed batch's `dA_i`, `dB_i` (summed over each adapter's rows) and `dx` against central differences | - |
//! | `combine_density_respected` | magnitude pruning keeps at most `int(density n)` entries per factor (TIES of two: at most twice that) | - |
//! | `combine_density_one_is_linear` | `magnitude_prune` and `dare_linear` at density 1 equal `linear`; `ties` and `dare_ties` do for one source | - |
//! | `combine_cat_is_exact` | `cat`'s `B A` equals `sum_i w_i s_i B_i A_i` | - |
//! | `adapter_identity_at_init` | a fresh adapter returns its input exactly | 8 |
//! | `adapter_matches_oracle` | `x + s (act(x Wd^T + bd) Wu^T + bu)`: the residual is always there | 8 |
//! | `adapter_gradients_match_fd` | all four parameters and dx | - |
//! | `prompt_prepends_and_shifts` | virtual tokens first, mask ones in front, positions shifted by n_virtual | 7 |
//! | `prompt_gradient_is_batch_sum` | the prompt's gradient sums the virtual rows over the batch | 7 |
//! | `attention_matches_oracle` | MHA/GQA, causal and padding masks, with a prefix | 11 |
//! | `prefix_seen_by_every_query` | prefix columns visible to every query; causality among real tokens unchanged | 11 |
//! | `empty_prefix_is_identity` | a zero-length prefix equals no prefix exactly | 11 |
//! | `attention_gradients_match_fd` | dQ, dK, dV and the prefix gradient | - |
//! | `frozen_base_untouched` | after training steps of every method, every base tensor is bit-identical | 1 |
//! | `optimizer_matches_oracle` | SGD (momentum on and off) and AdamW, decay and clipping on and off, 1 to 4 steps over each method's tensors: parameters, state and step counter against the published update rules in f64 (bias correction, decoupled decay) | 9 |
//! | `optimizer_refuses_nonfinite` | a NaN or infinite gradient, loss or global norm: the step returns `NonFinite` and parameters, state and counter stay bit-identical | - |
//! | `adapter_file_round_trip` | adapter-only files round-trip bit-exact and hold no base tensor | 10 |
//! | `bad_input_is_typed` | invalid shapes, ranks, heads, scratch: a typed error, outputs untouched, no panic | - |
//!
//! Mistake 9 (one learning rate for every method) is a unit test of
//! `peft_core::optim::Method::default_lr`.
//!
//! ## Tolerances
//!
//! Each element type states two unit roundoffs ([`Precision`]): `u` of its
//! storage and `u_acc` of its arithmetic, and their absolute counterparts
//! `eta`, `eta_acc` for results in the subnormal range. A value computed by
//! a reduction of length `k` may differ from the oracle by
//! `c (k u_acc + 2 u) |.| + c (k eta_acc + 2 eta)`, where `|.|` is the same
//! computation on absolute values (the standard bound, as faer's tests use
//! `eps * n`); `c` is 4. Gradients are compared normwise against central
//! differences (`h = 1e-6` on the f64 oracle); a ReLU pre-activation that
//! the backend's rounding could carry across the kink is skipped, judged on
//! the stored values. These bounds hold at any case count: the suite passes
//! with `PROPTEST_CASES=4096` for every backend and type, and `.ci/run`
//! runs it at that count for the reference backend.
//!
//! ## Profiles
//!
//! [`Config::default`] draws small shapes (fast enough for every `cargo
//! test`) plus a few products at the blocking edges of real kernels;
//! [`Config::thorough`] draws those at every case and method shapes up to
//! 140 wide, with fewer cases. See [`Shapes`].
//!
//! ## Mutation check
//!
//! `peft-verify/mutants.sh` applies deliberate bugs to `peft-core` one at
//! a time (a gemm off by one at the 128-deep block edge, AdamW without bias
//! correction, without or with coupled weight decay, a non-finite gradient
//! or loss applied, SGD without momentum, a random LoRA `B` at init, the
//! scale on the base output, a merge without the scale, `dB` without the
//! scale, an adapter without its residual, a prefix hidden from early
//! queries) and runs the suite against each. Last run (2026-11-29): 13 of
//! 13 killed, each by a property that names it:
//!
//! | mutant | killed by |
//! |---|---|
//! | gemm off by one at the 128-deep block edge | `gemm_block_edges`, `gemm_past_128`, `backends_agree`, `lora_matches_oracle` (thorough) |
//! | AdamW without bias correction | `optimizer_matches_oracle` |
//! | AdamW without weight decay | `optimizer_matches_oracle` |
//! | AdamW with coupled (L2) weight decay | `optimizer_matches_oracle` |
//! | a non-finite gradient applied | `optimizer_refuses_nonfinite` |
//! | a non-finite loss applied | `optimizer_refuses_nonfinite` |
//! | SGD without momentum | `optimizer_matches_oracle` |
//! | LoRA `B` random at init | `lora_identity_at_init` |
//! | the LoRA scale on the base output too | `lora_identity_at_init`, `lora_matches_oracle`, `lora_merged_equals_unmerged` |
//! | a merge without the scale | `lora_merged_equals_unmerged` |
//! | `dB` without the scale | `lora_gradients_match_fd` |
//! | an adapter without its residual | `adapter_identity_at_init`, `adapter_matches_oracle` |
//! | the prefix hidden from early queries | `prefix_seen_by_every_query`, `attention_matches_oracle`, `attention_gradients_match_fd` |

pub mod mistakes;
pub mod oracle;
mod props;

use std::panic::{AssertUnwindSafe, catch_unwind};

use peft_core::{Backend, Element};
use proptest::test_runner::{Config as PtConfig, FileFailurePersistence, TestError, TestRunner};

/// Unit roundoffs of an element type, relative and absolute.
///
/// A rounding to a floating-point type changes a value `x` by at most
/// `u |x|` while the result is normal, and by at most `eta` (half the
/// spacing of its subnormals) when it is subnormal or underflows to zero,
/// so every bound here is `c u |x| + c eta` (Higham, *Accuracy and
/// Stability*, section 2.1). Only f16 has subnormals large enough to
/// matter (`eta = 2^-25`, about 3e-8): without the absolute term a product
/// whose result is subnormal in f16 misses a purely relative bound.
pub trait Precision: Element {
    /// Unit roundoff of the stored type (half an ulp of 1).
    const U: f64;
    /// Unit roundoff of the accumulation type.
    const U_ACC: f64;
    /// Half the smallest subnormal of the stored type: the absolute error
    /// of a rounding in the subnormal range.
    const ETA: f64;
    /// The same for the accumulation type.
    const ETA_ACC: f64;
}

impl Precision for f32 {
    const U: f64 = 5.960_464_477_539_063e-8; // 2^-24
    const U_ACC: f64 = Self::U;
    const ETA: f64 = 7.006_492_321_624_085e-46; // 2^-150
    const ETA_ACC: f64 = Self::ETA;
}

impl Precision for f64 {
    const U: f64 = 1.110_223_024_625_156_5e-16; // 2^-53
    const U_ACC: f64 = Self::U;
    const ETA: f64 = 0.0; // 2^-1075 rounds to 0 in f64 itself
    const ETA_ACC: f64 = Self::ETA;
}

impl Precision for half::f16 {
    const U: f64 = 4.882_812_5e-4; // 2^-11
    const U_ACC: f64 = <f32 as Precision>::U;
    const ETA: f64 = 2.980_232_238_769_531_3e-8; // 2^-25
    const ETA_ACC: f64 = <f32 as Precision>::ETA;
}

impl Precision for half::bf16 {
    const U: f64 = 3.906_25e-3; // 2^-8
    const U_ACC: f64 = <f32 as Precision>::U;
    const ETA: f64 = 4.591_774_807_899_561e-41; // 2^-134
    const ETA_ACC: f64 = <f32 as Precision>::ETA;
}

/// How many cases each property runs, and on which shapes.
#[derive(Clone, Debug)]
pub struct Config {
    /// Cases per property (default: `PROPTEST_CASES`, else 256).
    pub cases: u32,
    /// Where failing seeds are recorded (`None`: nowhere). Defaults to
    /// `proptest-regressions/<property>-<type>.txt` under the current
    /// directory, replayed first on the next run.
    pub regressions: Option<std::path::PathBuf>,
    /// The shapes drawn.
    pub shapes: Shapes,
}

/// The shapes a run draws.
///
/// Real backends block their products (at 32, 64, 128 or 256 rows, columns
/// or depth), and an off-by-one at a block edge is invisible to small
/// shapes. Both profiles therefore run `gemm_block_edges`, whose `k`
/// crosses 127/128/129 and 255/256/257 and whose `m`, `n` cross 63/64/65
/// and 127/128/129 (with one product past 128 in every dimension in each
/// run); they differ in how much of the rest is large.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shapes {
    /// Small random shapes (dimensions up to about 10) for every method,
    /// and `cases / 32` (at least 2) block-edge products: fast enough for
    /// every `cargo test`.
    Small,
    /// The block-edge products at every case, and method shapes up to 140
    /// wide and 70 tokens long (past the reference kernel's 64-row and
    /// 128-deep blocks): for a backend's release qualification, with fewer
    /// cases.
    Large,
}

impl Default for Config {
    fn default() -> Self {
        let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256);
        Self { cases, regressions: Some("proptest-regressions".into()), shapes: Shapes::Small }
    }
}

impl Config {
    /// The thorough profile: [`Shapes::Large`] at 32 cases per property
    /// (`PROPTEST_CASES` overrides).
    pub fn thorough() -> Self {
        let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32);
        Self { cases, shapes: Shapes::Large, ..Self::default() }
    }

    /// Largest `(tokens, width)` of the method properties' random shapes.
    pub(crate) fn method_dims(&self) -> (usize, usize) {
        match self.shapes {
            Shapes::Small => (6, 10),
            Shapes::Large => (70, 140),
        }
    }
}

/// The outcome of every property.
#[derive(Debug, Default)]
pub struct Report {
    /// `(property, element type, Ok or the failure with its minimal case)`.
    pub results: Vec<(&'static str, &'static str, Result<(), String>)>,
}

impl Report {
    /// The failed properties.
    pub fn failures(&self) -> Vec<String> {
        self.results.iter().filter_map(|(p, e, r)| r.as_ref().err().map(|m| format!("{p} ({e}): {m}"))).collect()
    }

    /// Panics listing every failed property.
    ///
    /// # Panics
    /// If any property failed.
    pub fn assert_ok(&self) {
        let f = self.failures();
        assert!(f.is_empty(), "{} of {} properties failed:\n{}", f.len(), self.results.len(), f.join("\n"));
    }
}

/// A property body's verdict for one case.
pub type CaseResult = Result<(), proptest::test_runner::TestCaseError>;

/// Runs one named property with its own runner; a panic inside the
/// backend or the library is a failure, not an abort.
pub(crate) fn run<S: proptest::strategy::Strategy>(
    report: &mut Report,
    config: &Config,
    name: &'static str,
    elem: &'static str,
    strategy: S,
    test: impl Fn(S::Value) -> CaseResult,
) {
    run_n(report, config, config.cases, name, elem, strategy, test);
}

/// [`run`] with its own case count.
pub(crate) fn run_n<S: proptest::strategy::Strategy>(
    report: &mut Report,
    config: &Config,
    cases: u32,
    name: &'static str,
    elem: &'static str,
    strategy: S,
    test: impl Fn(S::Value) -> CaseResult,
) {
    let persistence = config.regressions.as_ref().map(|dir| {
        let path = static_path(&dir.join(format!("{name}-{elem}.txt")));
        Box::new(FileFailurePersistence::Direct(path)) as Box<dyn proptest::test_runner::FailurePersistence>
    });
    // A property may skip (`prop_assume!`) up to as many cases as it runs,
    // so the budget of skips grows with `PROPTEST_CASES`.
    let pt = PtConfig {
        cases,
        failure_persistence: persistence,
        max_global_rejects: cases.max(1024),
        ..PtConfig::default()
    };
    let mut runner =
        TestRunner::new_with_rng(pt.clone(), proptest::test_runner::TestRng::deterministic_rng(pt.rng_algorithm));
    let outcome = runner.run(&strategy, |v| match catch_unwind(AssertUnwindSafe(|| test(v))) {
        Ok(r) => r,
        Err(p) => {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(proptest::test_runner::TestCaseError::fail(format!("panicked: {}", msg.unwrap_or_default())))
        }
    });
    let result = match outcome {
        Ok(()) => Ok(()),
        Err(TestError::Fail(why, case)) => Err(format!("{why}; minimal case: {case:?}")),
        Err(TestError::Abort(why)) => Err(format!("aborted: {why}")),
    };
    report.results.push((name, elem, result));
}

/// Runs `storage_int8_activations_within_bound` against `backend`: the
/// contract of an integer decode path (`peft-faer`'s
/// `Faer::int8_activations`), whose results are not held to
/// [`verify`]'s rounding bounds. One property, f32 only.
pub fn verify_int8_activations<B: Backend<f32>>(backend: &B, config: &Config) -> Report {
    let mut report = Report::default();
    props::storage::run_int8_activations(backend, config, &mut report);
    report
}

/// Runs every property against `backend` in element type `E`.
pub fn verify<E: Precision, B: Backend<E>>(backend: &B, config: &Config) -> Report
where
    peft_core::Reference: Backend<E>,
{
    let mut report = Report::default();
    props::gemm::run_all::<E, B>(backend, config, &mut report);
    props::lora::run_all::<E, B>(backend, config, &mut report);
    props::dora::run_all::<E, B>(backend, config, &mut report);
    props::ia3::run_all::<E, B>(backend, config, &mut report);
    props::embedding::run_all::<E, B>(backend, config, &mut report);
    props::loha::run_all::<E, B>(backend, config, &mut report);
    props::adalora::run_all::<E, B>(backend, config, &mut report);
    props::miss::run_all::<E, B>(backend, config, &mut report);
    props::hra::run_all::<E, B>(backend, config, &mut report);
    props::oft::run_all::<E, B>(backend, config, &mut report);
    props::boft::run_all::<E, B>(backend, config, &mut report);
    props::fourierft::run_all::<E, B>(backend, config, &mut report);
    props::randlora::run_all::<E, B>(backend, config, &mut report);
    props::vblora::run_all::<E, B>(backend, config, &mut report);
    props::road::run_all::<E, B>(backend, config, &mut report);
    props::c3a::run_all::<E, B>(backend, config, &mut report);
    props::shira::run_all::<E, B>(backend, config, &mut report);
    props::ln_tuning::run_all::<E, B>(backend, config, &mut report);
    props::trainable_tokens::run_all::<E, B>(backend, config, &mut report);
    props::lokr::run_all::<E, B>(backend, config, &mut report);
    props::vera::run_all::<E, B>(backend, config, &mut report);
    props::adapter::run_all::<E, B>(backend, config, &mut report);
    props::prompt::run_all::<E>(config, &mut report);
    props::set::run_all::<E, B>(backend, config, &mut report);
    props::storage::run_all::<E, B>(backend, config, &mut report);
    props::attention::run_all::<E, B>(backend, config, &mut report);
    props::training::run_all::<E, B>(backend, config, &mut report);
    props::optim::run_all::<E>(config, &mut report);
    props::errors::run_all::<E, B>(backend, config, &mut report);
    report
}

/// proptest's file persistence takes a `&'static str`: each distinct path
/// is interned once for the life of the process.
fn static_path(path: &std::path::Path) -> &'static str {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static PATHS: OnceLock<Mutex<HashMap<String, &'static str>>> = OnceLock::new();
    let key = path.to_string_lossy().into_owned();
    let mut map = PATHS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    map.entry(key.clone()).or_insert_with(|| Box::leak(key.into_boxed_str()))
}

/// Values of a slice widened to f64.
pub(crate) fn wide<E: Element>(v: &[E]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}

/// f64 values rounded to `E`.
pub(crate) fn narrow<E: Element>(v: &[f64]) -> Vec<E> {
    v.iter().map(|&x| E::from_f64(x)).collect()
}

/// `c (k u_acc + 2 u) mag + c (k eta_acc + 2 eta)`, the bound of the
/// module docs with its absolute (subnormal) term, plus a floor for values
/// whose magnitude underflows f64.
pub(crate) fn bound<E: Precision>(k: usize, mag: f64) -> f64 {
    let k = k as f64;
    4.0 * (k * E::U_ACC + 2.0 * E::U) * mag + 4.0 * (k * E::ETA_ACC + 2.0 * E::ETA) + 1e-30
}

/// Checks `got` against `want` elementwise with per-element magnitudes.
pub(crate) fn close<E: Precision>(what: &str, got: &[f64], want: &[f64], mag: &[f64], k: usize) -> CaseResult {
    proptest::prop_assert_eq!(got.len(), want.len(), "{}: length", what);
    for (i, ((g, w), m)) in got.iter().zip(want).zip(mag).enumerate() {
        let tol = bound::<E>(k, *m);
        proptest::prop_assert!((g - w).abs() <= tol, "{}[{}]: got {}, oracle {}, bound {}", what, i, g, w, tol);
    }
    Ok(())
}

/// Normwise: `max |got - want| <= c (k u_acc + 2 u) (max |want| + scale)`.
pub(crate) fn close_norm<E: Precision>(what: &str, got: &[f64], want: &[f64], scale: f64, k: usize) -> CaseResult {
    proptest::prop_assert_eq!(got.len(), want.len(), "{}: length", what);
    let norm = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let err = got.iter().zip(want).fold(0.0f64, |m, (g, w)| m.max((g - w).abs()));
    let tol = 4.0 * bound::<E>(k, norm + scale) + 1e-7 * (norm + scale);
    proptest::prop_assert!(err <= tol, "{}: max error {} > {} (norm {})", what, err, tol, norm);
    Ok(())
}

/// Whether `f` panics.
pub(crate) fn panics<R>(f: impl FnOnce() -> R) -> bool {
    catch_unwind(AssertUnwindSafe(f)).is_err()
}
