//! `peft inspect`: an adapter folder's methods and modules, or a base
//! checkpoint's tensors.

use std::path::Path;

use peft_faer::hf::base::Base;
use peft_faer::hf::inspect::InspectReport;
use peft_faer::hf::{CONFIG_FILE, HfAdapter};
use serde_json::json;

/// A base checkpoint: each tensor's storage, logical shape and stored
/// bytes, in storage order, then the totals per storage.
pub(crate) fn inspect_base(path: &Path, as_json: bool) -> Result<bool, Box<dyn std::error::Error>> {
    let b = Base::open(path)?;
    let storage =
        |e: &peft_faer::hf::st::Entry| e.format().map_or_else(|| format!("{:?}", e.dtype), |f| f.name().into());
    let mut totals: std::collections::BTreeMap<String, (usize, u64, u64)> = Default::default();
    for (_, e) in b.entries() {
        let t = totals.entry(storage(e)).or_default();
        *t = (t.0 + 1, t.1 + e.numel() as u64, t.2 + e.len);
    }
    if as_json {
        let tensors: Vec<_> = b
            .entries()
            .map(|(_, e)| json!({ "tensor": e.name, "storage": storage(e), "shape": e.shape, "bytes": e.len }))
            .collect();
        let totals: serde_json::Map<String, serde_json::Value> = totals
            .iter()
            .map(|(k, (n, p, by))| (k.clone(), json!({ "tensors": n, "values": p, "bytes": by })))
            .collect();
        let doc = json!({ "base": path, "tensors": tensors, "totals": totals, "bytes": b.total_bytes() });
        outln!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(true);
    }
    outln!("base {}: {} tensors, {} bytes", path.display(), b.entries().count(), b.total_bytes());
    outln!("{:<56} {:>7} {:>16} {:>12}", "tensor", "storage", "shape", "bytes");
    for (_, e) in b.entries() {
        outln!("{:<56} {:>7} {:>16} {:>12}", e.name, storage(e), format!("{:?}", e.shape), e.len);
    }
    for (k, (n, values, bytes)) in &totals {
        let per = if *values > 0 { *bytes as f64 / *values as f64 } else { 0.0 };
        outln!("{k}: {n} tensors, {values} values, {bytes} bytes ({per:.4} bytes per value)");
    }
    Ok(true)
}

pub(crate) fn inspect(dir: &Path, as_json: bool) -> Result<bool, Box<dyn std::error::Error>> {
    let is_base = dir.is_file()
        || (!dir.join(CONFIG_FILE).exists()
            && (dir.join(peft_faer::hf::base::INDEX_FILE).exists() || dir.join("model.safetensors").exists()));
    if is_base {
        return inspect_base(dir, as_json);
    }
    // Headers and a chunked scan for NaN/Inf: memory does not grow with the adapter.
    let report = InspectReport::new(&HfAdapter::summarize(dir)?)?;
    if as_json {
        outln!("{}", serde_json::to_string_pretty(&report.json())?);
    } else {
        outln!("{}", report.text());
    }
    Ok(true)
}
