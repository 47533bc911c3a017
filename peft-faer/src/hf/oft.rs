//! OFT in PEFT's files: the module as read, and its reader.
//!
//! PEFT saves one tensor per module, `oft_R.weight` (`oft_embedding_R.weight`
//! on an embedding, whose rows it rotates as `E R_bd`) `[r_s, b(b-1)/2]` (`r_s
//! = in / b` blocks, or 1 with `block_share`). The block size is read from
//! the shape; the input width is the base weight's (the file does not
//! hold it when the block is shared), so a module's layer is built over
//! the base's shape ([`OftModule::layer`]), where the block size is checked
//! against the one PEFT's `update_layer` gives that width (including its
//! silent `adjust_oft_parameters` when `r` or `oft_block_size` does not
//! divide it).

use peft_core::oft::{Cayley, Oft, OftSpec};
use safetensors::Dtype;

use super::keys::{Groups, Reader, group, saved};
use super::st::StFile;
use super::{HfAdapter, HfError, OftConfig};

/// One OFT-adapted module: `oft_R.weight`.
#[derive(Clone, Debug, PartialEq)]
pub struct OftModule {
    /// Module name without `base_model.model.`.
    pub name: String,
    /// `oft_R.weight`, widened to f32.
    pub v: Vec<f32>,
    /// Stored blocks `r_s` (its rows).
    pub rows: usize,
    /// The settings (block size from the shape).
    pub spec: OftSpec,
    /// The config's `r` and `oft_block_size` (exactly one non-zero).
    pub requested: (usize, usize),
    /// On an embedding (`oft_embedding_R`): `E' = E R_bd`, the layer's
    /// `in` the embedding width.
    pub embedding: bool,
    /// Its element type.
    pub dtype: Dtype,
}

/// PEFT's `adjust_oft_parameters`: the divisor of `n` nearest to `p`
/// (the lower one on a tie), or `n` when `p >= n`.
pub fn adjust_oft_parameters(n: usize, p: usize) -> usize {
    if p >= n {
        return n;
    }
    let mut higher = p;
    while higher <= n && !n.is_multiple_of(higher) {
        higher += 1;
    }
    let mut lower = p;
    while lower > 1 && !n.is_multiple_of(lower) {
        lower -= 1;
    }
    if p - lower <= higher - p { lower } else { higher }
}

impl OftModule {
    /// The block size PEFT gives a layer of `n_in` inputs from the config's
    /// `r` or `oft_block_size` (`update_layer`).
    pub fn block_for(&self, n_in: usize) -> usize {
        match self.requested {
            (0, b) if b > 0 && (!n_in.is_multiple_of(b) || b > n_in) => adjust_oft_parameters(n_in, b),
            (0, b) => b,
            (r, _) if !n_in.is_multiple_of(r) || r > n_in => n_in / adjust_oft_parameters(n_in, r).max(1),
            (r, _) => n_in / r,
        }
    }

    /// The tensor's key after the module name.
    pub fn key(&self) -> &'static str {
        if self.embedding { "oft_embedding_R.weight" } else { "oft_R.weight" }
    }

    /// `peft-core`'s OFT of this module over a base weight `[n_out, n_in]`
    /// (an embedding's `[vocab, dim]`).
    ///
    /// # Errors
    /// [`HfError::TensorShape`] when the stored block size is not the one
    /// PEFT gives `n_in`, or the stored blocks are not `n_in / b`;
    /// `peft-core`'s validation.
    pub fn layer(&self, n_in: usize, n_out: usize) -> Result<Oft<f32, &[f32]>, HfError> {
        let b = self.spec.block;
        let tensor = format!("{}.{}", self.name, self.key());
        let shape = [self.rows, b * (b - 1) / 2];
        let want = self.block_for(n_in);
        if b != want {
            return Err(HfError::shape(tensor, &shape, format!("blocks of {want} for {n_in} inputs")));
        }
        if !self.spec.shared && self.rows * b != n_in {
            return Err(HfError::shape(tensor, &shape, format!("{} blocks of {b} for {n_in} inputs", n_in / b)));
        }
        Ok(Oft::new(self.spec, n_in, n_out, &self.v[..])?)
    }
}

/// The block size `b` with `b(b-1)/2 = n`, if there is one.
fn block_of(n: usize) -> Option<usize> {
    let b = ((n as u64).saturating_mul(8).saturating_add(1).isqrt() as usize).div_ceil(2);
    (b >= 1 && b.checked_mul(b - 1) == n.checked_mul(2)).then_some(b)
}

impl HfAdapter {
    /// OFT: per module `oft_R.weight [r_s, b(b-1)/2]`, one row with
    /// `block_share`.
    pub(super) fn read_oft(&mut self, c: &OftConfig, file: &StFile, read: Reader<'_>) -> Result<(), HfError> {
        let replaces = |key: &str| saved(&c.modules_to_save, key);
        let suffixes = [(".oft_R.weight", 0), (".oft_embedding_R.weight", 1)];
        let groups: Groups<'_, 2> =
            group(file, file.entries.iter(), &suffixes, "OFT", &replaces, &mut self.replacements, read)?;
        let cayley =
            if c.use_cayley_neumann { Cayley::Neumann { terms: c.num_cayley_neumann_terms } } else { Cayley::Exact };
        for (name, slots) in groups {
            let (e, embedding) = match slots {
                [Some(e), None] => (e, false),
                [None, Some(e)] => (e, true),
                [Some(_), Some(e)] => return Err(HfError::conflict(&e.name, "beside oft_R.weight on one module")),
                [None, None] => {
                    return Err(HfError::MissingTensor { module: name, tensor: "oft_R.weight".into() });
                }
            };
            let (rows, block) = match e.shape.as_slice() {
                &[rows, n] if rows > 0 && (!c.block_share || rows == 1) => match block_of(n) {
                    Some(b) => (rows, b),
                    None => return Err(HfError::shape(&e.name, &e.shape, "[r, b (b - 1) / 2] for a block size b")),
                },
                s => {
                    let rows = if c.block_share { "1" } else { "r" };
                    return Err(HfError::shape(&e.name, s, format!("[{rows}, b (b - 1) / 2]")));
                }
            };
            if !c.target_modules.matches(&name) {
                return Err(HfError::Untargeted { module: name, method: "OFT" });
            }
            let v = read(file, e)?;
            let spec = OftSpec { block, shared: c.block_share, cayley, coft_eps: c.coft.then_some(c.eps) };
            let requested = (c.r, c.oft_block_size);
            self.oft.push(OftModule { v, rows, spec, requested, embedding, dtype: e.dtype, name });
        }
        if self.oft.is_empty() {
            return Err(HfError::NoTensors { keys: "oft_R.weight" });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjust_as_peft() {
        // By hand from PEFT's loop: 64 over 10 -> lower 8, higher 16: 8 (nearer);
        // 48 over 10 -> 8 and 12: 8 and 12 are 2 away; the lower wins a tie.
        assert_eq!(adjust_oft_parameters(64, 10), 8);
        assert_eq!(adjust_oft_parameters(48, 10), 8);
        assert_eq!(adjust_oft_parameters(48, 11), 12);
        assert_eq!(adjust_oft_parameters(48, 64), 48);
        assert_eq!(block_of(120), Some(16));
        assert_eq!(block_of(66), Some(12));
        assert_eq!(block_of(7), None);
    }
}
