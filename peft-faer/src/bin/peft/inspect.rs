//! `peft inspect`: an adapter folder's methods and modules, or a base
//! checkpoint's tensors.

use std::path::Path;

use peft_faer::gguf::{Gguf, Value};
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

/// A metadata value in a line: arrays as their length and first items.
fn gguf_value(v: &Value) -> serde_json::Value {
    match v {
        Value::Str(s) => json!(s),
        Value::Bool(b) => json!(b),
        Value::Array(items) => {
            let head: Vec<_> = (0..items.len().min(3)).filter_map(|i| items.get(i)).map(|v| gguf_value(&v)).collect();
            json!({ "array": items.len(), "first": head })
        }
        v => v.as_u64().map_or_else(|| json!(v.as_f64()), |n| json!(n)),
    }
}

/// A GGUF file: its metadata, each tensor's type, `ne` and bytes, the
/// totals per type.
pub(crate) fn inspect_gguf(path: &Path, as_json: bool) -> Result<bool, Box<dyn std::error::Error>> {
    let g = Gguf::open(path)?;
    let mut totals: std::collections::BTreeMap<&str, (usize, u64)> = Default::default();
    for t in &g.tensors {
        let e = totals.entry(t.format.name()).or_default();
        *e = (e.0 + 1, e.1 + t.len);
    }
    let bytes: u64 = g.tensors.iter().map(|t| t.len).sum();
    if as_json {
        let meta: serde_json::Map<String, serde_json::Value> =
            g.metadata.iter().map(|(k, v)| (k.clone(), gguf_value(v))).collect();
        let tensors: Vec<_> = g
            .tensors
            .iter()
            .map(|t| json!({ "tensor": t.name, "storage": t.format.name(), "ne": t.ne, "bytes": t.len }))
            .collect();
        let totals: serde_json::Map<String, serde_json::Value> =
            totals.iter().map(|(k, (n, b))| (k.to_string(), json!({ "tensors": n, "bytes": b }))).collect();
        let doc = json!({ "gguf": path, "version": g.version, "metadata": meta, "tensors": tensors, "totals": totals, "bytes": bytes });
        outln!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(true);
    }
    outln!("gguf {} (version {}): {} tensors, {bytes} bytes of data", path.display(), g.version, g.tensors.len());
    for (k, v) in &g.metadata {
        outln!("  {k} = {}", gguf_value(v));
    }
    outln!("{:<40} {:>7} {:>16} {:>12}", "tensor", "storage", "ne", "bytes");
    for t in &g.tensors {
        outln!("{:<40} {:>7} {:>16} {:>12}", t.name, t.format.name(), format!("{:?}", t.ne), t.len);
    }
    for (k, (n, b)) in &totals {
        outln!("{k}: {n} tensors, {b} bytes");
    }
    Ok(true)
}

pub(crate) fn inspect(dir: &Path, as_json: bool) -> Result<bool, Box<dyn std::error::Error>> {
    if peft_faer::llama::gguf::is_gguf(dir) {
        return inspect_gguf(dir, as_json);
    }
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
