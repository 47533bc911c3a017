//! The twelve common PEFT mistakes this workspace is built to make
//! impossible or loud, in our own words, each with what guards it.
//!
//! The list comes from a design note on common mistakes in LoRA, adapters,
//! prompt tuning and prefix tuning (it is not part of the repository; at
//! least one of its formulas was wrong, see mistake 12). Code comments cite
//! these as "mistake N"; the properties named here are in
//! [`verify`](crate::verify)'s table.
//!
//! | # | mistake | what goes wrong | what guards it |
//! |---|---|---|---|
//! | 1 | Training the base weights | the "adapter" is full fine-tuning: memory, optimizer state and the frozen model all change | The base is a read-only [`FrozenLinear`](peft_core::FrozenLinear) argument, optimizers see adapter tensors only; property `frozen_base_untouched` |
//! | 2 | Initializing both LoRA factors at random | `B A != 0` at step 0, so the adapted model starts away from the base | `B = 0`, `A` Kaiming-uniform (or Gaussian); property `lora_identity_at_init` |
//! | 3 | Forgetting (or misplacing) the scale `s = alpha / r` | the update's size depends on `r`; scaling the base output too changes the frozen model | `s` on the low-rank path only, rsLoRA's `alpha / sqrt(r)`; property `lora_matches_oracle` |
//! | 4 | Adapting the wrong layers | LoRA only on the output projection learns little | default targets `q_proj`, `v_proj`, PEFT's name-matching rule; property `lora_targets_follow_peft` |
//! | 5 | A rank too high | `r = 256` on a 512x512 layer trains as much as the layer | a rank at >= 25% of the layer is reported (one above `min(in, out)` is accepted, as PEFT accepts it, and reported too); property `lora_param_report_flags_high_rank` |
//! | 6 | Not merging for inference (or merging twice) | three matmuls per layer instead of one; a second merge adds `s B A` again | [`WeightUpdate::merge_into`](peft_core::method::WeightUpdate::merge_into) returns a guard that owns `W` (double merge does not compile); properties `lora_merged_equals_unmerged`, `lora_unmerge_restores`, `lora_merge_guard_restores_on_drop` |
//! | 7 | Putting the soft prompt in the wrong place | virtual tokens after the input, or mask and positions not extended | virtual tokens first, mask and positions extended as PEFT does; properties `prompt_prepends_and_shifts`, `prompt_gradient_is_batch_sum` |
//! | 8 | A bottleneck adapter without its residual | the adapter replaces the sublayer's output instead of refining it | the residual is part of the layer; properties `adapter_identity_at_init`, `adapter_matches_oracle` |
//! | 9 | One learning rate for every method | prompt tuning barely moves at LoRA's rate | per-method defaults (`peft_core::optim::Method::default_lr`), a unit test there |
//! | 10 | Saving the whole model with the adapter | gigabytes per adapter, and the frozen weights duplicated | adapter-only files; property `adapter_file_round_trip` |
//! | 11 | Not extending the attention mask for a prefix | some queries cannot see the prefix, or padding hides it | prefix columns always attendable; properties `attention_matches_oracle`, `prefix_seen_by_every_query`, `empty_prefix_is_identity` |
//! | 12 | Computing gradients for frozen weights | an `[out, in]` gradient per layer, the memory LoRA exists to save; the note's own `grad_B` had the transposed shape `[r, out]` | backward has no `dW` output and `O(tokens r)` scratch; properties `lora_gradients_match_fd`, `lora_backward_is_adapter_sized` |
