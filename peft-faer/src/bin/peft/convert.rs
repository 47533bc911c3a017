//! `peft convert`: a `.peft` file to a PEFT folder and back, bit for bit;
//! a PEFT LoRA folder to a llama.cpp LoRA `.gguf` and back.

use std::path::Path;

use peft_faer::files::{check_output, read_bounded, write_file};
use peft_faer::gguf::lora::{self, LoraDtype};
use peft_faer::hf::convert::{own_to_peft_dir, peft_dir_to_own};
use peft_faer::hf::{CONFIG_FILE, HfAdapter, MAX_ADAPTER_BYTES, WEIGHTS_FILE};
use peft_faer::llama::gguf::{config_of, is_gguf};

use crate::cli::OutType;

/// The head size of the model at `base` (`--base`, required for `.gguf`
/// adapters).
fn head_dim(base: Option<&Path>) -> Result<usize, Box<dyn std::error::Error>> {
    let base = base.ok_or("a .gguf adapter needs --base MODEL (its head size orders the query and key rows)")?;
    Ok(config_of(base)?.head_dim)
}

pub(crate) fn convert_cmd(
    src: &Path,
    dst: &Path,
    base: Option<&Path>,
    outtype: OutType,
    force: bool,
) -> Result<bool, Box<dyn std::error::Error>> {
    let meta = std::fs::metadata(src).map_err(|e| format!("{}: {e}", src.display()))?;
    if meta.is_dir() && is_gguf(dst) {
        let inputs = [src.join(CONFIG_FILE), src.join(WEIGHTS_FILE)];
        check_output(dst, &[src, &inputs[0], &inputs[1]], force)?;
        let hd = head_dim(base)?;
        let adapter = HfAdapter::read_dir(src)?;
        let dtype = match outtype {
            OutType::F32 => LoraDtype::F32,
            OutType::F16 => LoraDtype::F16,
        };
        // `general.name` as the converter derives it from the folder:
        // `tiny-llama-lora` is "Tiny Llama Lora".
        let folder = src.file_name().map_or_else(|| "adapter".into(), |n| n.to_string_lossy().into_owned());
        let name = folder
            .split(['-', '_'])
            .filter(|w| !w.is_empty())
            .map(|w| {
                let mut c = w.chars();
                c.next().map_or_else(String::new, |f| f.to_uppercase().chain(c).collect())
            })
            .collect::<Vec<_>>()
            .join(" ");
        let bytes = lora::to_gguf(&adapter, hd, dtype, &name).map_err(|e| e.in_file(src))?;
        write_file(dst, &bytes, force)?;
        eprintln!("{} -> {} ({} bytes, llama.cpp LoRA)", src.display(), dst.display(), bytes.len());
    } else if is_gguf(src) {
        check_output(dst, &[src], force)?;
        let adapter = lora::read(src, head_dim(base)?)?;
        adapter.write_dir(dst, force)?;
        eprintln!("{} -> {} (Hugging Face PEFT directory)", src.display(), dst.display());
    } else if meta.is_dir() {
        let inputs = [src.join(CONFIG_FILE), src.join(WEIGHTS_FILE)];
        check_output(dst, &[src, &inputs[0], &inputs[1]], force)?;
        let bytes = peft_dir_to_own(src)?;
        write_file(dst, &bytes, force)?;
        eprintln!("{} -> {} ({} bytes, peft format)", src.display(), dst.display(), bytes.len());
    } else {
        check_output(dst, &[src], force)?;
        let bytes = read_bounded(src, MAX_ADAPTER_BYTES)?;
        own_to_peft_dir(&bytes, dst, force).map_err(|e| e.in_file(src))?;
        eprintln!("{} -> {} (Hugging Face PEFT directory)", src.display(), dst.display());
    }
    Ok(true)
}
