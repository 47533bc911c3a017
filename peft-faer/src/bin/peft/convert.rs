//! `peft convert`: a `.peft` file to a PEFT folder and back, bit for bit.

use std::path::Path;

use peft_faer::files::{check_output, read_bounded, write_file};
use peft_faer::hf::convert::{own_to_peft_dir, peft_dir_to_own};
use peft_faer::hf::{CONFIG_FILE, MAX_ADAPTER_BYTES, WEIGHTS_FILE};

pub(crate) fn convert_cmd(src: &Path, dst: &Path, force: bool) -> Result<bool, Box<dyn std::error::Error>> {
    let meta = std::fs::metadata(src).map_err(|e| format!("{}: {e}", src.display()))?;
    if meta.is_dir() {
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
