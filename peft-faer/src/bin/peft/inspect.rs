//! `peft inspect`: an adapter folder's methods and modules, or a base
//! checkpoint's tensors.

use std::path::Path;

use peft_faer::hf::base::Base;
use peft_faer::hf::{CONFIG_FILE, HfAdapter, PeftConfig};
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
    let ad = HfAdapter::summarize(dir)?;
    let nonfinite: Vec<String> =
        ad.nonfinite.iter().map(|(t, i, v)| format!("{t}: element {i} is {v} (not finite)")).collect();
    match &ad.config {
        PeftConfig::Prompt(p) => {
            let shape = ad.prompt_shape.as_ref().ok_or("no prompt tensor")?;
            let kind = if p.prefix { "prefix" } else { "prompt" };
            let params: usize = shape.iter().product();
            if as_json {
                let doc = json!({ "method": kind, "num_virtual_tokens": p.num_virtual_tokens, "token_dim": p.token_dim,
                    "num_layers": p.num_layers, "shape": shape, "total_params": params, "warnings": nonfinite });
                outln!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                outln!(
                    "method {kind}: {} virtual tokens, token_dim {}, prompt_embeddings {shape:?}, {params} parameters",
                    p.num_virtual_tokens,
                    p.token_dim
                );
                for w in &nonfinite {
                    outln!("warning: {w}");
                }
            }
        }
        PeftConfig::Loha(c) => {
            let params = |r: usize, i: usize, o: usize| 2 * r * (i + o);
            let total: usize = ad.loha.iter().map(|&(_, i, o, r, _)| params(r, i, o)).sum();
            if as_json {
                let modules: Vec<_> = ad
                    .loha
                    .iter()
                    .map(|(name, i, o, r, alpha)| json!({ "module": name, "base_tensor": format!("{name}.weight"),
                        "in": i, "out": o, "r": r, "alpha": alpha, "scale": alpha / *r as f64, "params": params(*r, *i, *o) }))
                    .collect();
                let doc = json!({ "method": "loha", "r": c.r, "alpha": c.alpha, "dtype": format!("{:?}", ad.dtype),
                    "modules": modules, "total_params": total, "warnings": nonfinite });
                outln!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                outln!("method loha: r={} alpha={} (dW = s (W1a W1b) * (W2a W2b), s = alpha / r)", c.r, c.alpha);
                outln!(
                    "{:<40} {:<48} {:>6} {:>6} {:>4} {:>7} {:>9}",
                    "module",
                    "base tensor",
                    "in",
                    "out",
                    "r",
                    "alpha",
                    "params"
                );
                for (name, i, o, r, alpha) in &ad.loha {
                    outln!(
                        "{:<40} {:<48} {:>6} {:>6} {:>4} {:>7} {:>9}",
                        name,
                        format!("{name}.weight"),
                        i,
                        o,
                        r,
                        alpha,
                        params(*r, *i, *o)
                    );
                }
                outln!("total: {} modules, {total} trainable parameters", ad.loha.len());
                for w in &nonfinite {
                    outln!("warning: {w}");
                }
            }
        }
        PeftConfig::Lokr(c) => {
            let total: usize = ad.lokr.iter().map(|m| m.6).sum();
            if as_json {
                let modules: Vec<_> = ad
                    .lokr
                    .iter()
                    .map(|(name, i, o, r, alpha, d, p)| json!({ "module": name, "base_tensor": format!("{name}.weight"),
                        "in": i, "out": o, "r": r, "alpha": alpha, "w1": [d[0], d[1]], "w2": [d[2], d[3]], "params": p }))
                    .collect();
                let doc = json!({ "method": "lokr", "r": c.common.r, "alpha": c.common.alpha,
                    "decompose_both": c.decompose_both, "decompose_factor": c.decompose_factor,
                    "modules": modules, "total_params": total, "warnings": nonfinite });
                outln!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                outln!(
                    "method lokr: r={} alpha={} decompose_factor={} (dW = s kron(W1, W2), s = alpha / r)",
                    c.common.r,
                    c.common.alpha,
                    c.decompose_factor
                );
                outln!(
                    "{:<40} {:>6} {:>6} {:>4} {:>7} {:>10} {:>10} {:>9}",
                    "module",
                    "in",
                    "out",
                    "r",
                    "alpha",
                    "W1",
                    "W2",
                    "params"
                );
                for (name, i, o, r, alpha, d, p) in &ad.lokr {
                    let (w1, w2) = (format!("{}x{}", d[0], d[1]), format!("{}x{}", d[2], d[3]));
                    outln!("{:<40} {:>6} {:>6} {:>4} {:>7} {:>10} {:>10} {:>9}", name, i, o, r, alpha, w1, w2, p);
                }
                outln!("total: {} modules, {total} trainable parameters", ad.lokr.len());
                for w in &nonfinite {
                    outln!("warning: {w}");
                }
            }
        }
        PeftConfig::Vera(c) => {
            let (r, max_in, max_out) = ad.vera_projections.ok_or("no VeRA projections")?;
            let total: usize = ad.vera.iter().map(|(_, r, o)| r + o).sum();
            if as_json {
                let modules: Vec<_> = ad
                    .vera
                    .iter()
                    .map(|(name, r, o)| {
                        json!({ "module": name, "base_tensor": format!("{name}.weight"),
                        "out": o, "r": r, "params": r + o })
                    })
                    .collect();
                let doc = json!({ "method": "vera", "r": c.r, "d_initial": c.d_initial,
                    "projections": { "vera_A": [r, max_in], "vera_B": [max_out, r], "frozen_params": r * (max_in + max_out) },
                    "dtype": format!("{:?}", ad.dtype), "modules": modules, "total_params": total, "warnings": nonfinite });
                outln!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                outln!("method vera: r={} (dW = diag(lambda_b) B diag(lambda_d) A, no alpha / r)", c.r);
                outln!(
                    "shared frozen projections: vera_A [{r}, {max_in}], vera_B [{max_out}, {r}] ({} parameters)",
                    r * (max_in + max_out)
                );
                outln!("{:<40} {:<48} {:>6} {:>4} {:>9}", "module", "base tensor", "out", "r", "params");
                for (name, r, o) in &ad.vera {
                    outln!("{:<40} {:<48} {:>6} {:>4} {:>9}", name, format!("{name}.weight"), o, r, r + o);
                }
                outln!("total: {} modules, {total} trainable parameters", ad.vera.len());
                for w in &nonfinite {
                    outln!("warning: {w}");
                }
            }
        }
        PeftConfig::Ia3(_) => {
            let total: usize = ad.ia3.iter().map(|m| m.2).sum();
            if as_json {
                let modules: Vec<_> = ad
                    .ia3
                    .iter()
                    .map(|(name, ff, n)| {
                        json!({ "module": name, "base_tensor": format!("{name}.weight"),
                        "scales": if *ff { "input" } else { "output" }, "params": n })
                    })
                    .collect();
                let doc = json!({ "method": "ia3", "dtype": format!("{:?}", ad.dtype), "modules": modules,
                    "total_params": total, "warnings": nonfinite });
                outln!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                outln!("method ia3: a learned vector scales each module's output (or a feedforward module's input)");
                outln!("{:<40} {:<48} {:>8} {:>9}", "module", "base tensor", "scales", "params");
                for (name, ff, n) in &ad.ia3 {
                    let scales = if *ff { "input" } else { "output" };
                    outln!("{:<40} {:<48} {:>8} {:>9}", name, format!("{name}.weight"), scales, n);
                }
                outln!("total: {} modules, {total} trainable parameters", ad.ia3.len());
                for w in &nonfinite {
                    outln!("warning: {w}");
                }
            }
        }
        PeftConfig::Lora(c) => {
            let mut warnings = nonfinite;
            let mut rows = Vec::new();
            for m in &ad.modules {
                let params = m.params();
                if !(m.scale as f32).is_finite() {
                    warnings.push(format!(
                        "{}: the scale {} overflows f32; a merge would write infinities",
                        m.name, m.scale
                    ));
                }
                let min = m.n_in.min(m.n_out);
                if 2 * m.r >= min {
                    warnings.push(format!(
                        "{}: rank {} is close to min(in, out) = {min}; LoRA saves little there",
                        m.name, m.r
                    ));
                }
                rows.push(json!({ "module": m.name, "base_tensor": format!("{}.weight", m.name), "in": m.n_in,
                    "out": m.n_out, "r": m.r, "alpha": m.alpha, "scale": m.scale, "params": params }));
            }
            let total: usize = ad.modules.iter().map(|m| m.params()).sum();
            if as_json {
                let doc = json!({ "method": "lora", "use_dora": c.use_dora, "r": c.r, "lora_alpha": c.lora_alpha, "use_rslora": c.use_rslora,
                    "dtype": format!("{:?}", ad.dtype), "modules": rows, "total_params": total,
                    "replaced_tensors": ad.replacements.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), "warnings": warnings });
                outln!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                outln!(
                    "method lora{}: r={} lora_alpha={} use_rslora={} dtype {:?}",
                    if c.use_dora { " (DoRA: a magnitude per output row)" } else { "" },
                    c.r,
                    c.lora_alpha,
                    c.use_rslora,
                    ad.dtype
                );
                outln!(
                    "{:<40} {:<48} {:>6} {:>6} {:>4} {:>7} {:>8} {:>9}",
                    "module",
                    "base tensor",
                    "in",
                    "out",
                    "r",
                    "alpha",
                    "scale",
                    "params"
                );
                for m in &ad.modules {
                    outln!(
                        "{:<40} {:<48} {:>6} {:>6} {:>4} {:>7} {:>8} {:>9}",
                        m.name,
                        format!("{}.weight", m.name),
                        m.n_in,
                        m.n_out,
                        m.r,
                        m.alpha,
                        m.scale,
                        m.params()
                    );
                }
                outln!("total: {} modules, {total} trainable parameters", ad.modules.len());
                for r in &ad.replacements {
                    outln!("replaces {} {:?} whole", r.0, r.1);
                }
                for w in &warnings {
                    outln!("warning: {w}");
                }
            }
        }
    }
    Ok(true)
}
