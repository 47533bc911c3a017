//! Tensor keys: PEFT's spellings normalized, and the one key-grouping
//! reader every method's reader is written over.

use std::collections::BTreeMap;

use super::st::{self, Entry, StFile};
use super::{HfError, HfTensor};

/// How the reader gets a tensor's values (or stands in for them).
pub(crate) type Reader<'a> = &'a mut dyn FnMut(&StFile, &st::Entry) -> Result<Vec<f32>, HfError>;

/// A tensor key without `base_model.model.`, without an adapter name
/// after `lora_A`/`lora_B`/`modules_to_save`, and without the
/// `base_layer` of a wrapped module (`layers.0.v_proj.base_layer.bias` is
/// the base's `layers.0.v_proj.bias`).
pub fn normalize_key(key: &str) -> String {
    let key = key.strip_prefix("base_model.model.").unwrap_or(key);
    let parts: Vec<&str> = key.split('.').collect();
    let mut out: Vec<&str> = Vec::with_capacity(parts.len());
    let mut i = 0;
    while i < parts.len() {
        let p = parts[i];
        if p == "base_layer" {
            // `<module>.base_layer.<param>`: the wrapped layer's own tensor
            // (a bias trained with `bias = "all" | "lora_only"`).
            i += 1;
            continue;
        }
        if p == "modules_to_save" {
            // `<module>.modules_to_save[.<adapter>].<param>` -> `<module>.<param>`.
            if i + 2 < parts.len() {
                i += 1;
            }
            i += 1;
            continue;
        }
        out.push(p);
        let is_lora =
            matches!(p, "lora_A" | "lora_B" | "lora_embedding_A" | "lora_embedding_B" | "lora_magnitude_vector");
        if is_lora && i + 2 < parts.len() && !matches!(parts[i + 1], "weight" | "bias") {
            i += 1; // the adapter name
        }
        i += 1;
    }
    out.join(".")
}

/// Whether `key` (normalized) is a parameter of a module that
/// `modules_to_save` names. PEFT's rule (`_set_trainable`) is a plain
/// string suffix, not a module boundary: `"norm"` names
/// `model.layers.0.input_layernorm` as well as `model.norm`.
pub(crate) fn saved(modules_to_save: &[String], key: &str) -> bool {
    let owner = key.rsplit_once('.').map_or("", |(m, _)| m);
    modules_to_save.iter().any(|m| owner.ends_with(m.as_str()))
}

/// One method's tensors grouped by module: each module (in the order of
/// its first key) with the entry of each of its `N` slots.
pub(crate) type Groups<'f, const N: usize> = Vec<(String, [Option<&'f Entry>; N])>;

/// Groups `entries` by module. A key `<module><suffix>`, for one of
/// `suffixes` (`(suffix, slot)`), fills that module's slot; a slot filled
/// twice is [`HfError::DuplicateTensor`]. Any other key is a whole tensor
/// the adapter replaces when `replaces(key)` says so (`modules_to_save`, a
/// trained bias), read into `replacements`; otherwise it is
/// [`HfError::UnexpectedKey`] naming `method`.
pub(crate) fn group<'f, const N: usize>(
    file: &StFile,
    entries: impl Iterator<Item = &'f Entry>,
    suffixes: &[(&str, usize)],
    method: &'static str,
    replaces: &dyn Fn(&str) -> bool,
    replacements: &mut Vec<HfTensor>,
    read: Reader<'_>,
) -> Result<Groups<'f, N>, HfError> {
    let mut slots: BTreeMap<String, usize> = BTreeMap::new();
    let mut groups: Groups<'f, N> = Vec::new();
    for e in entries {
        let key = normalize_key(&e.name);
        let slot = suffixes.iter().find_map(|&(suffix, i)| key.strip_suffix(suffix).map(|m| (m.to_string(), i)));
        let Some((module, i)) = slot else {
            if !replaces(&key) {
                return Err(HfError::UnexpectedKey { key: e.name.clone(), method });
            }
            let data = read(file, e)?;
            replacements.push(HfTensor { name: key, dtype: e.dtype, shape: e.shape.clone(), data });
            continue;
        };
        let at = *slots.entry(module.clone()).or_insert_with(|| {
            groups.push((module.clone(), [None; N]));
            groups.len() - 1
        });
        let cell = groups.get_mut(at).and_then(|(_, s)| s.get_mut(i));
        if cell.is_some_and(|c| c.replace(e).is_some()) {
            let tensor = suffixes.iter().find(|s| s.1 == i).map_or("", |s| s.0).trim_start_matches('.');
            return Err(HfError::DuplicateTensor { module, tensor: tensor.to_string() });
        }
    }
    Ok(groups)
}

/// `(".<key>", slot)` for each of a method's tensor names, in slot order:
/// the suffixes [`group`] matches.
pub(crate) fn suffixes(keys: &[&str]) -> Vec<(String, usize)> {
    keys.iter().enumerate().map(|(i, k)| (format!(".{k}"), i)).collect()
}
