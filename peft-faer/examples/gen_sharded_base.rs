//! Writes a synthetic sharded f16 checkpoint and a matching PEFT LoRA
//! adapter, for measuring `peft merge` on a large base (nothing here is
//! committed data; `benches/merge_1gib.sh` runs it).
//!
//! `cargo run --release -p peft-faer --example gen_sharded_base -- DIR [GIB]`
//! writes `DIR/base/` (`model.safetensors.index.json` and 4 shards holding
//! `GIB` GiB of `[4096, 4096]` f16 projections, 8 per GiB) and `DIR/adapter/`
//! (LoRA r=16 on every `q_proj` and `v_proj`, f32).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use peft_core::Rng;
use peft_faer::hf::st::{OutEntry, header};
use safetensors::Dtype;

const D: usize = 4096;
const R: usize = 16;
const PROJ: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: gen_sharded_base DIR [GIB]")?);
    let gib: usize = args.next().map_or(Ok(1), |s| s.parse())?;
    // Four [4096, 4096] f16 tensors (32 MiB each) per layer: 8 layers per GiB.
    let layers = 8 * gib;
    let (base, adapter) = (dir.join("base"), dir.join("adapter"));
    std::fs::create_dir_all(&base)?;
    std::fs::create_dir_all(&adapter)?;
    let names: Vec<String> =
        (0..layers).flat_map(|l| PROJ.map(|p| format!("model.layers.{l}.self_attn.{p}.weight"))).collect();
    let shards = 4;
    let per = names.len().div_ceil(shards);
    let mut weight_map = serde_json::Map::new();
    let mut rng = Rng::new(1);
    // One random tensor's worth of f16 bytes, reused with a per-tensor
    // offset so tensors differ without generating 1 GiB of randomness.
    let mut pattern = vec![0u8; D * D * 2 + 64];
    for c in pattern.chunks_exact_mut(2) {
        c.copy_from_slice(&half::f16::from_f64(rng.normal_f64() * 0.02).to_le_bytes());
    }
    for (s, chunk) in names.chunks(per).enumerate() {
        let file = format!("model-{:05}-of-{shards:05}.safetensors", s + 1);
        let entries: Vec<OutEntry> = chunk.iter().map(|n| OutEntry::plain(n.clone(), Dtype::F16, vec![D, D])).collect();
        let mut w = std::io::BufWriter::new(std::fs::File::create(base.join(&file))?);
        w.write_all(&header(&entries, &BTreeMap::from([("format".to_string(), "pt".to_string())]))?)?;
        for (i, n) in chunk.iter().enumerate() {
            let off = 2 * (i % 32);
            w.write_all(&pattern[off..off + D * D * 2])?;
            weight_map.insert(n.clone(), file.clone().into());
        }
        w.flush()?;
    }
    let index = serde_json::json!({ "metadata": { "total_size": names.len() * D * D * 2 }, "weight_map": weight_map });
    std::fs::write(base.join("model.safetensors.index.json"), serde_json::to_vec_pretty(&index)?)?;

    let mut tensors: Vec<(OutEntry, Vec<f32>)> = Vec::new();
    for l in 0..layers {
        for p in ["q_proj", "v_proj"] {
            let key = format!("base_model.model.model.layers.{l}.self_attn.{p}");
            let mut a = vec![0.0f32; R * D];
            let mut b = vec![0.0f32; D * R];
            rng.fill_normal(&mut a, 0.01);
            rng.fill_normal(&mut b, 0.01);
            tensors.push((OutEntry::plain(format!("{key}.lora_A.weight"), Dtype::F32, vec![R, D]), a));
            tensors.push((OutEntry::plain(format!("{key}.lora_B.weight"), Dtype::F32, vec![D, R]), b));
        }
    }
    let entries: Vec<OutEntry> = tensors.iter().map(|(e, _)| e.clone()).collect();
    let mut bytes = header(&entries, &BTreeMap::from([("format".to_string(), "pt".to_string())]))?;
    for (_, v) in &tensors {
        bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    }
    std::fs::write(adapter.join("adapter_model.safetensors"), bytes)?;
    let cfg = serde_json::json!({ "peft_type": "LORA", "r": R, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
        "use_rslora": false, "bias": "none", "fan_in_fan_out": false, "use_dora": false });
    std::fs::write(adapter.join("adapter_config.json"), serde_json::to_vec_pretty(&cfg)?)?;
    println!(
        "{}: {} tensors of [{D}, {D}] f16 in {shards} shards; adapter on {} modules",
        dir.display(),
        names.len(),
        2 * layers
    );
    Ok(())
}
