//! `peft combine`: PEFT's `add_weighted_adapter` over adapter folders.
//!
//! The math is `peft-core`'s [`peft_core::combine`]; this module does what
//! PEFT does around it:
//!
//! * one source is combined as `linear`, whatever was asked (PEFT's rule);
//! * the rank comes from the sources' configured `r` ([`Combination::rank`]);
//! * the result's config is the first source's with `r = lora_alpha =` the
//!   new rank (so its scale is 1, or `sqrt(r)` with `use_rslora`, as PEFT
//!   gives it), `target_modules` the union of the sources' (lists: the
//!   first's entries, then the others' new ones; regular expressions:
//!   `(re_1)|(re_2)|..`), and empty `rank_pattern` / `alpha_pattern`;
//! * each module combines the sources that adapt it, in the order given
//!   (for `cat` a module adapted by only some sources is zero-padded to the
//!   full rank, as in PEFT);
//! * DARE's random masks come from `peft-core`'s [`Rng`] seeded with
//!   `seed`, modules in the order of the first source's file (then the
//!   others' new ones).
//!
//! Refused, naming the adapter: prompt learning, DoRA, `lora_bias`, adapters
//! that also save whole tensors (`modules_to_save`, trained biases),
//! `rank_pattern` (PEFT sizes the result from `r` alone, which such
//! adapters break), differing `fan_in_fan_out`, a mix of list and regex
//! `target_modules`, and modules of different shapes under one name.

use std::collections::BTreeMap;

use peft_core::Rng;
use peft_core::combine::{Combination, Weighted, combine as core_combine, combine_scratch_len};
use peft_core::lora::Lora;
use serde_json::Value;

use super::config::Targets;
use super::{HfAdapter, HfError, LoraModule, PeftConfig};

/// Combines `sources` (adapter, weight) as PEFT's `add_weighted_adapter`
/// with `combination`, into an adapter built in memory (write it with
/// [`HfAdapter::write_dir`]).
///
/// # Errors
/// [`HfError::Unsupported`] for what the [module docs](self) list as
/// refused; [`HfError::Core`] for `peft-core`'s refusals (a density out of
/// range, unequal ranks for `linear` and the pruning kinds, an SVD rank
/// above `min(in, out)`, a non-finite weight).
pub fn combine(sources: &[(&HfAdapter, f64)], combination: Combination, seed: u64) -> Result<HfAdapter, HfError> {
    let first = sources.first().ok_or_else(|| HfError::Unsupported("combining no adapters".into()))?.0;
    let combination = if sources.len() == 1 { Combination::Linear } else { combination };
    let mut configs = Vec::new();
    for (i, (ad, _)) in sources.iter().enumerate() {
        let name = || ad.source.as_ref().map_or_else(|| format!("adapter #{}", i + 1), |p| p.display().to_string());
        let PeftConfig::Lora(lc) = &ad.config else {
            return Err(HfError::Unsupported(format!("{}: only LoRA adapters can be combined", name())));
        };
        if lc.use_dora {
            return Err(HfError::Unsupported(format!("{}: combining DoRA adapters (PEFT does not either)", name())));
        }
        if lc.lora_bias || !ad.replacements.is_empty() {
            return Err(HfError::Unsupported(format!(
                "{}: combining adapters that also train biases or whole tensors (lora_bias, bias, modules_to_save)",
                name()
            )));
        }
        if !lc.rank_pattern.is_empty() {
            return Err(HfError::Unsupported(format!(
                "{}: `rank_pattern` (PEFT sizes a combination from `r` alone)",
                name()
            )));
        }
        configs.push(lc);
    }
    let lc0 = configs[0];
    if configs.iter().any(|c| c.fan_in_fan_out != lc0.fan_in_fan_out) {
        return Err(HfError::Unsupported("combining adapters with different `fan_in_fan_out`".into()));
    }
    let rank = combination.rank(configs.iter().map(|c| c.r))?;
    let targets = union_targets(configs.iter().map(|c| &c.target_modules))?;

    let mut raw = lc0.raw.clone();
    raw.insert("r".into(), rank.into());
    raw.insert("lora_alpha".into(), rank.into());
    raw.insert("target_modules".into(), targets);
    raw.insert("rank_pattern".into(), Value::Object(Default::default()));
    raw.insert("alpha_pattern".into(), Value::Object(Default::default()));
    let config = PeftConfig::parse(&Value::Object(raw).to_string())?;
    let PeftConfig::Lora(new_lc) = &config else {
        return Err(HfError::Unsupported("the combined config is not LoRA".into()));
    };

    // Modules in the first source's order, then the others' new ones.
    let mut order: Vec<&str> = Vec::new();
    let mut by_name: BTreeMap<&str, Vec<(&LoraModule, f64, usize)>> = BTreeMap::new();
    for (i, (ad, weight)) in sources.iter().enumerate() {
        for m in &ad.modules {
            let list = by_name.entry(&m.name).or_insert_with(|| {
                order.push(&m.name);
                Vec::new()
            });
            list.push((m, *weight, i));
        }
    }
    let mut rng = Rng::new(seed);
    let mut modules = Vec::with_capacity(order.len());
    for name in order {
        let parts = &by_name[name];
        let m0 = parts[0].0;
        let mut loras = Vec::with_capacity(parts.len());
        for &(m, _, i) in parts {
            if (m.n_in, m.n_out) != (m0.n_in, m0.n_out) {
                let expected = format!("[{}, {}] as in the first adapter", m0.n_out, m0.r);
                return Err(HfError::shape(format!("{name}.lora_B.weight"), &[m.n_out, m.r], expected));
            }
            let cfg = configs[i].core_config_for(name);
            loras.push(Lora::new(&cfg, m.n_in, m.n_out, &m.a[..], &m.b[..])?);
        }
        let weighted: Vec<Weighted<'_, f32, &[f32]>> =
            loras.iter().zip(parts).map(|(lora, &(_, weight, _))| Weighted { lora, weight }).collect();
        let (na, nb) = factor_lens(&combination, rank, m0, name)?;
        let (mut a, mut b) = (vec![0.0f32; na], vec![0.0f32; nb]);
        let mut scratch = vec![0.0f64; combine_scratch_len(&combination, &weighted, rank)];
        core_combine(&combination, &weighted, rank, &mut a, &mut b, &mut scratch, &mut rng)
            .map_err(|error| HfError::InModule { module: name.to_string(), error })?;
        check_factors(name, &a, &b)?;
        modules.push(LoraModule {
            name: name.to_string(),
            a,
            b,
            lora_bias: None,
            magnitude: None,
            embedding: m0.embedding,
            r: rank,
            n_in: m0.n_in,
            n_out: m0.n_out,
            alpha: new_lc.alpha_for(name),
            scale: new_lc.scale_for(name)?,
            dtypes: [m0.dtypes[0], m0.dtypes[1], m0.dtypes[1], m0.dtypes[1]],
        });
    }
    let mut out = HfAdapter::empty(config, first.dtype, BTreeMap::new());
    out.modules = modules;
    Ok(out)
}

/// PEFT's union of `target_modules`: lists as a set union (first's order,
/// then new entries), regular expressions as `(re_1)|(re_2)|..`.
fn union_targets<'a>(targets: impl Iterator<Item = &'a Targets>) -> Result<Value, HfError> {
    let targets: Vec<&Targets> = targets.collect();
    if targets.iter().all(|t| matches!(t, Targets::List(_))) {
        let mut out: Vec<String> = Vec::new();
        for t in &targets {
            if let Targets::List(l) = t {
                for m in l {
                    if !out.contains(m) {
                        out.push(m.clone());
                    }
                }
            }
        }
        Ok(Value::from(out))
    } else if targets.iter().all(|t| matches!(t, Targets::Regex(..))) {
        let parts: Vec<String> = targets
            .iter()
            .filter_map(|t| if let Targets::Regex(s, _) = t { Some(format!("({s})")) } else { None })
            .collect();
        Ok(Value::from(parts.join("|")))
    } else {
        Err(HfError::Unsupported("combining adapters whose `target_modules` mix lists and regular expressions".into()))
    }
}

/// The lengths of the combined `A [rank, in]` and `B [out, rank]` of
/// module `name`, checked before anything is allocated from them: the SVD
/// of an `out x in` update has `min(in, out)` triplets, so a larger rank is
/// refused naming `svd_rank`.
fn factor_lens(combination: &Combination, rank: usize, m: &LoraModule, name: &str) -> Result<(usize, usize), HfError> {
    if matches!(combination, Combination::Svd { .. }) && rank > m.n_in.min(m.n_out) {
        return Err(HfError::Config {
            field: "svd_rank".into(),
            reason: format!("{rank} exceeds min(in, out) = {} of {name}", m.n_in.min(m.n_out)),
        });
    }
    let too_large = || HfError::Core(peft_core::Error::Overflow);
    Ok((rank.checked_mul(m.n_in).ok_or_else(too_large)?, m.n_out.checked_mul(rank).ok_or_else(too_large)?))
}

/// `Ok` when the combined factors of module `name` are finite: weights
/// large enough to overflow f32 in them (1e39 with `cat`, 1e300 with
/// `linear`) are refused, not written as infinities.
///
/// # Errors
/// [`HfError::NonFinite`] naming the factor and its first bad element.
fn check_factors(name: &str, a: &[f32], b: &[f32]) -> Result<(), HfError> {
    for (t, v) in [("lora_A.weight", a), ("lora_B.weight", b)] {
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            let cause = "the weighted combination overflows f32: a weight is too large";
            let value = v.get(i).copied().unwrap_or(f32::INFINITY);
            return Err(HfError::NonFinite { tensor: format!("{name}.{t}"), index: i, value, cause });
        }
    }
    Ok(())
}
