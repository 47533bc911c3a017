//! `peft combine`: PEFT's `add_weighted_adapter` over adapter folders.

use std::path::{Path, PathBuf};

use peft_faer::files::check_output;
use peft_faer::hf::{CONFIG_FILE, HfAdapter, HfError, WEIGHTS_FILE};

use crate::cli::{CombinationArg, MajoritySignArg};

pub(crate) struct CombineArgs<'a> {
    pub(crate) adapters: &'a [(PathBuf, f64)],
    pub(crate) combination: CombinationArg,
    pub(crate) svd_rank: Option<u64>,
    pub(crate) density: Option<f64>,
    pub(crate) majority_sign: MajoritySignArg,
    pub(crate) seed: u64,
    pub(crate) out: &'a Path,
    pub(crate) force: bool,
}

pub(crate) fn combine_cmd(a: &CombineArgs<'_>) -> Result<bool, Box<dyn std::error::Error>> {
    use peft_core::combine::{Combination, MajoritySign};
    let sign = match a.majority_sign {
        MajoritySignArg::Total => MajoritySign::Total,
        MajoritySignArg::Frequency => MajoritySign::Frequency,
    };
    let density = || a.density.ok_or("--density is required by ties, dare_linear, dare_ties and magnitude_prune");
    let combination = match a.combination {
        CombinationArg::Linear => Combination::Linear,
        CombinationArg::Cat => Combination::Cat,
        CombinationArg::Svd => Combination::Svd { rank: a.svd_rank.map(|r| r as usize) },
        CombinationArg::Ties => Combination::Ties { density: density()?, sign },
        CombinationArg::DareLinear => Combination::DareLinear { density: density()? },
        CombinationArg::DareTies => Combination::DareTies { density: density()?, sign },
        CombinationArg::MagnitudePrune => Combination::MagnitudePrune { density: density()? },
    };
    if a.svd_rank.is_some() && a.combination != CombinationArg::Svd {
        return Err("--svd-rank applies to --combination svd only".into());
    }
    if a.density.is_some()
        && matches!(a.combination, CombinationArg::Linear | CombinationArg::Cat | CombinationArg::Svd)
    {
        return Err("--density applies to ties, dare_linear, dare_ties and magnitude_prune only".into());
    }
    let mut inputs: Vec<PathBuf> = Vec::new();
    for (dir, _) in a.adapters {
        inputs.extend([dir.clone(), dir.join(CONFIG_FILE), dir.join(WEIGHTS_FILE)]);
    }
    let input_refs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    check_output(a.out, &input_refs, a.force)?;
    let read: Vec<(HfAdapter, f64)> =
        a.adapters.iter().map(|(dir, w)| Ok((HfAdapter::read_dir(dir)?, *w))).collect::<Result<_, HfError>>()?;
    let sources: Vec<(&HfAdapter, f64)> = read.iter().map(|(ad, w)| (ad, *w)).collect();
    let combined = peft_faer::hf::combine::combine(&sources, combination, a.seed)?;
    combined.write_dir(a.out, a.force)?;
    let rank = combined.modules.first().map_or(0, |m| m.r);
    eprintln!(
        "combined {} adapters ({}): {} modules of rank {rank} -> {}",
        sources.len(),
        if sources.len() == 1 { "linear: a single source" } else { combination.name() },
        combined.modules.len(),
        a.out.display()
    );
    Ok(true)
}
