//! FourierFT in PEFT's files: the module as read, its reader, and the
//! frequencies PEFT regenerates at load.
//!
//! PEFT saves one tensor per module, `fourierft_spectrum` `[n]`. The
//! frequencies are not saved: PEFT draws them again from the config's
//! `random_loc_seed` for the layer's shape `[out, in]`
//! (`FourierFTLayer.update_layer`):
//!
//! ```text
//! perm = torch.randperm(out * in, generator=torch.Generator().manual_seed(random_loc_seed))[:n]
//! rows = perm // in,  cols = perm % in
//! ```
//!
//! [`torch_randperm_prefix`] reproduces torch's CPU `randperm` bit for bit:
//! the Fisher-Yates loop `for i in 0..N-1: z = random() % (N - i); swap(r[i],
//! r[i + z])` over torch's MT19937 (`init_genrand` of the seed's low 32
//! bits), of which only the first `n` steps decide the first `n` values,
//! kept in a sparse map (no table of `N` entries). Above `N = 2^32 / 20`
//! torch draws 64-bit numbers instead; such layers (over 214 million
//! weights) are refused rather than guessed.
//!
//! The frequencies depend on the base's shape, which the file does not
//! hold: [`FourierFtModule::layer`] draws them for the first shape it is
//! given and keeps them; a module serves one weight.

use std::collections::HashMap;
use std::sync::OnceLock;

use peft_core::fourierft::FourierFt;
use safetensors::Dtype;

use super::keys::{Groups, Reader, group, saved};
use super::st::StFile;
use super::{FourierFtConfig, HfAdapter, HfError};

/// One FourierFT-adapted module: `fourierft_spectrum`.
#[derive(Clone, Debug)]
pub struct FourierFtModule {
    /// Module name without `base_model.model.`.
    pub name: String,
    /// `fourierft_spectrum`, widened to f32.
    pub spectrum: Vec<f32>,
    /// PEFT's `scaling`.
    pub scaling: f64,
    /// PEFT's `random_loc_seed`.
    pub seed: u64,
    /// Its element type.
    pub dtype: Dtype,
    /// `(out, in, rows, cols)`, drawn for the first shape asked.
    frequencies: OnceLock<(usize, usize, Vec<u32>, Vec<u32>)>,
}

impl PartialEq for FourierFtModule {
    fn eq(&self, other: &Self) -> bool {
        (&self.name, &self.spectrum, self.scaling, self.seed, self.dtype)
            == (&other.name, &other.spectrum, other.scaling, other.seed, other.dtype)
    }
}

/// The largest `N` for which torch's `randperm` draws 32-bit numbers.
const RANDPERM_32: u64 = u32::MAX as u64 / 20;

/// torch's CPU MT19937 (`at::mt19937`).
struct Mt19937 {
    state: [u32; 624],
    next: usize,
}

impl Mt19937 {
    /// `init_genrand` of the seed's low 32 bits, as torch's `manual_seed`.
    fn new(seed: u64) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed as u32;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32.wrapping_mul(prev ^ (prev >> 30)).wrapping_add(i as u32);
        }
        Self { state, next: 624 }
    }

    /// The next 32-bit output.
    fn next_u32(&mut self) -> u32 {
        if self.next >= 624 {
            for i in 0..624 {
                let y = (self.state[i] & 0x8000_0000) | (self.state[(i + 1) % 624] & 0x7fff_ffff);
                let mut v = self.state[(i + 397) % 624] ^ (y >> 1);
                if y & 1 != 0 {
                    v ^= 0x9908_b0df;
                }
                self.state[i] = v;
            }
            self.next = 0;
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

/// The first `n` values of `torch.randperm(total,
/// generator=torch.Generator().manual_seed(seed))` on a CPU.
///
/// # Errors
/// [`HfError::Unsupported`] for `n > total` or `total` at or above
/// `2^32 / 20` (where torch switches to 64-bit draws).
pub fn torch_randperm_prefix(total: u64, n: usize, seed: u64) -> Result<Vec<u64>, HfError> {
    if n as u64 > total {
        return Err(HfError::Unsupported(format!("FourierFT: {n} frequencies in a layer of {total} weights")));
    }
    if total >= RANDPERM_32 {
        return Err(HfError::Unsupported(format!(
            "FourierFT on a layer of {total} weights: torch's randperm draws 64-bit numbers there, not reproduced here"
        )));
    }
    let mut rng = Mt19937::new(seed);
    let mut moved: HashMap<u64, u64> = HashMap::with_capacity(2 * n);
    let mut out = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let z = if i + 1 < total { u64::from(rng.next_u32()) % (total - i) } else { 0 };
        let j = i + z;
        let (vi, vj) = (*moved.get(&i).unwrap_or(&i), *moved.get(&j).unwrap_or(&j));
        moved.insert(j, vi);
        out.push(vj);
    }
    Ok(out)
}

impl FourierFtModule {
    /// A module over `spectrum` (its frequencies drawn when a layer is
    /// first asked for).
    pub fn new(name: String, spectrum: Vec<f32>, scaling: f64, seed: u64, dtype: Dtype) -> Self {
        Self { name, spectrum, scaling, seed, dtype, frequencies: OnceLock::new() }
    }

    /// The frequencies PEFT draws for a weight `[n_out, n_in]`: `(rows,
    /// cols)`.
    ///
    /// # Errors
    /// [`torch_randperm_prefix`]'s; [`HfError::Base`] when the module was
    /// first used over another shape.
    pub fn frequencies(&self, n_in: usize, n_out: usize) -> Result<(&[u32], &[u32]), HfError> {
        if self.frequencies.get().is_none() {
            let total = (n_out as u64).saturating_mul(n_in as u64);
            let perm = torch_randperm_prefix(total, self.spectrum.len(), self.seed)?;
            let rows = perm.iter().map(|p| (p / n_in as u64) as u32).collect();
            let cols = perm.iter().map(|p| (p % n_in as u64) as u32).collect();
            let _ = self.frequencies.set((n_out, n_in, rows, cols));
        }
        match self.frequencies.get() {
            Some((o, i, rows, cols)) if (*o, *i) == (n_out, n_in) => Ok((rows, cols)),
            Some((o, i, ..)) => Err(HfError::Base(format!(
                "{}: FourierFT frequencies were drawn for [{o}, {i}], not [{n_out}, {n_in}]",
                self.name
            ))),
            None => Err(HfError::Base(format!("{}: FourierFT frequencies not drawn", self.name))),
        }
    }

    /// `peft-core`'s FourierFT of this module over a base weight `[n_out,
    /// n_in]`.
    ///
    /// # Errors
    /// [`frequencies`](Self::frequencies)'; `peft-core`'s validation.
    pub fn layer(&self, n_in: usize, n_out: usize) -> Result<FourierFt<f32, &[f32], &[u32]>, HfError> {
        let (rows, cols) = self.frequencies(n_in, n_out)?;
        Ok(FourierFt::new(n_in, n_out, self.scaling, &self.spectrum[..], rows, cols)?)
    }
}

impl HfAdapter {
    /// FourierFT: per module `fourierft_spectrum [n]`, `n` from
    /// `n_frequency_pattern` or `n_frequency`.
    pub(super) fn read_fourierft(
        &mut self,
        c: &FourierFtConfig,
        file: &StFile,
        read: Reader<'_>,
    ) -> Result<(), HfError> {
        let replaces = |key: &str| saved(&c.modules_to_save, key);
        let suffixes = [(".fourierft_spectrum", 0)];
        let groups: Groups<'_, 1> =
            group(file, file.entries.iter(), &suffixes, "FourierFT", &replaces, &mut self.replacements, read)?;
        for (name, [slot]) in groups {
            let e = slot
                .ok_or_else(|| HfError::MissingTensor { module: name.clone(), tensor: "fourierft_spectrum".into() })?;
            let n = c.n_frequency_for(&name);
            if e.shape != [n] {
                return Err(HfError::shape(&e.name, &e.shape, format!("[{n}] (n_frequency for {name})")));
            }
            if !c.target_modules.matches(&name) {
                return Err(HfError::Untargeted { module: name, method: "FourierFT" });
            }
            let spectrum = read(file, e)?;
            self.fourierft.push(FourierFtModule::new(name, spectrum, c.scaling, c.random_loc_seed, e.dtype));
        }
        if self.fourierft.is_empty() {
            return Err(HfError::NoTensors { keys: "fourierft_spectrum" });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_is_the_reference_generator() {
        // The reference implementation's (mt19937ar.c) and C++'s std::mt19937:
        // seeded with 5489, the 10000th output is 4123659995.
        let mut g = Mt19937::new(5489);
        let v = (0..10_000).map(|_| g.next_u32()).last();
        assert_eq!(v, Some(4_123_659_995));
    }

    #[test]
    fn randperm_is_a_permutation_prefix() {
        let all = torch_randperm_prefix(50, 50, 3).unwrap();
        let mut sorted = all.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<u64>>());
        assert_eq!(torch_randperm_prefix(50, 10, 3).unwrap(), all[..10]);
        assert!(torch_randperm_prefix(10, 11, 3).is_err());
        assert!(torch_randperm_prefix(RANDPERM_32, 1, 3).is_err());
    }
}
