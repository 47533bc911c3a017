//! Choosing the next token from a row of logits, in transformers' order
//! (`GenerationMixin._get_logits_processor`): the repetition penalty
//! first, then temperature, top-k, top-p and min-p, then a draw from the
//! softmax of what is left.
//!
//! With `temperature = 0` (the default) decoding is greedy: the argmax
//! after the repetition penalty, lowest id on a tie (as `torch.argmax`).
//! The draw uses its own generator ([`SplitMix64`] seeded with `seed`):
//! the same seed gives the same tokens here, not torch's.

/// The sampling settings (transformers' `GenerationConfig` names).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingOptions {
    /// Divides the logits; 0 means greedy decoding.
    pub temperature: f64,
    /// Keep the `top_k` largest logits (ties at the threshold kept); 0
    /// keeps all.
    pub top_k: usize,
    /// Keep the smallest set of largest-probability tokens whose mass
    /// exceeds `top_p` (1 keeps all).
    pub top_p: f64,
    /// Drop tokens whose probability is below `min_p` times the largest
    /// (0 keeps all).
    pub min_p: f64,
    /// CTRL's penalty on every token already in the sequence: a positive
    /// logit is divided by it, a negative one multiplied (1: none).
    pub repetition_penalty: f64,
    /// The generator's seed.
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed: 0 }
    }
}

impl SamplingOptions {
    /// `Err` naming the first option out of range: temperature finite and
    /// `>= 0`, `top_p` in `(0, 1]`, `min_p` in `[0, 1]`,
    /// `repetition_penalty` finite and `> 0`.
    ///
    /// # Errors
    /// `(option, why)`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(("--temperature", format!("{t} is not finite and >= 0")));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(("--top-p", format!("{} is not in (0, 1]", self.top_p)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(("--min-p", format!("{} is not in [0, 1]", self.min_p)));
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return Err(("--repetition-penalty", format!("{r} is not finite and > 0")));
        }
        Ok(())
    }
}

/// Steele, Lea and Flood's SplitMix64: a small, fast generator with a
/// 64-bit state; good enough to draw tokens, not for cryptography.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// The generator started at `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform number in `[0, 1)` (53 bits).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The sampler: options and the generator's state.
#[derive(Clone, Debug)]
pub struct Sampler {
    /// The settings.
    pub options: SamplingOptions,
    rng: SplitMix64,
    scratch: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler with these options (not checked: see
    /// [`SamplingOptions::check`]).
    pub fn new(options: SamplingOptions) -> Self {
        Self { options, rng: SplitMix64::new(options.seed), scratch: Vec::new() }
    }

    /// The next token after `history` (the prompt and what has been
    /// generated) from `logits` (`[vocab]`, finite), which is overwritten
    /// with the processed scores (`-inf` where a token was removed).
    /// `None` for an empty row.
    pub fn next(&mut self, logits: &mut [f32], history: &[u32]) -> Option<u32> {
        let o = self.options;
        if o.repetition_penalty != 1.0 {
            repetition_penalty(logits, history, o.repetition_penalty as f32);
        }
        if o.temperature == 0.0 {
            return argmax(logits);
        }
        let t = o.temperature as f32;
        logits.iter_mut().for_each(|v| *v /= t);
        if o.top_k > 0 {
            top_k(logits, o.top_k, &mut self.scratch);
        }
        if o.top_p < 1.0 {
            top_p(logits, o.top_p, &mut self.scratch);
        }
        if o.min_p > 0.0 {
            min_p(logits, o.min_p);
        }
        draw(logits, self.rng.next_f64())
    }
}

/// The first index of the largest value.
fn argmax(v: &[f32]) -> Option<u32> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in v.iter().enumerate() {
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i as u32)
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: each distinct token
/// of `history` once.
pub fn repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    let mut seen = vec![false; logits.len()];
    for &t in history {
        let (Some(s), Some(v)) = (seen.get_mut(t as usize), logits.get(t as usize).copied()) else { continue };
        if !*s {
            *s = true;
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if v < 0.0 { v * penalty } else { v / penalty };
            }
        }
    }
}

/// `TopKLogitsWarper`: every score below the `k`-th largest becomes
/// `-inf` (scores equal to it stay).
pub fn top_k(logits: &mut [f32], k: usize, scratch: &mut Vec<(f32, u32)>) {
    if k >= logits.len() {
        return;
    }
    sorted_desc(logits, scratch);
    let Some(&(threshold, _)) = scratch.get(k.max(1) - 1) else { return };
    logits.iter_mut().filter(|v| **v < threshold).for_each(|v| *v = f32::NEG_INFINITY);
}

/// `TopPLogitsWarper`: sorted ascending, a token is removed when the
/// softmax mass up to and including it is `<= 1 - p`; the largest always
/// stays.
pub fn top_p(logits: &mut [f32], p: f64, scratch: &mut Vec<(f32, u32)>) {
    sorted_desc(logits, scratch);
    let probs = softmax64(scratch.iter().map(|&(v, _)| v));
    // Ascending cumulative mass = 1 - (mass of the strictly larger ones).
    let mut larger = 0.0f64;
    let total: f64 = probs.iter().sum();
    let mut cut = Vec::new();
    for (i, (&(_, id), &q)) in scratch.iter().zip(&probs).enumerate() {
        let ascending_cum = total - larger;
        larger += q;
        if i > 0 && ascending_cum <= 1.0 - p {
            cut.push(id);
        }
    }
    for id in cut {
        if let Some(v) = logits.get_mut(id as usize) {
            *v = f32::NEG_INFINITY;
        }
    }
}

/// `MinPLogitsWarper`: a token whose probability is below `p` times the
/// largest becomes `-inf`.
pub fn min_p(logits: &mut [f32], p: f64) {
    let probs = softmax64(logits.iter().copied());
    let top = probs.iter().fold(0.0f64, |a, &b| a.max(b));
    for (v, q) in logits.iter_mut().zip(probs) {
        if q < p * top {
            *v = f32::NEG_INFINITY;
        }
    }
}

/// `(score, id)` sorted by score, largest first, lower id first on ties.
fn sorted_desc(logits: &[f32], out: &mut Vec<(f32, u32)>) {
    out.clear();
    out.extend(logits.iter().enumerate().map(|(i, &v)| (v, i as u32)));
    out.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
}

/// The softmax of `v` in f64 (`-inf` gives 0).
fn softmax64(v: impl Iterator<Item = f32> + Clone) -> Vec<f64> {
    let max = v.clone().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return v.map(|_| 0.0).collect();
    }
    let e: Vec<f64> = v.map(|x| (f64::from(x) - f64::from(max)).exp()).collect();
    let z: f64 = e.iter().sum();
    e.into_iter().map(|x| x / z).collect()
}

/// The token at `u` (uniform in `[0, 1)`) of the softmax's cumulative
/// distribution.
fn draw(logits: &[f32], u: f64) -> Option<u32> {
    let probs = softmax64(logits.iter().copied());
    let mut acc = 0.0;
    let mut last = None;
    for (i, q) in probs.iter().enumerate() {
        if *q > 0.0 {
            acc += q;
            last = Some(i as u32);
            if u < acc {
                return last;
            }
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(v: &[f32]) -> Vec<usize> {
        v.iter().enumerate().filter(|(_, x)| x.is_finite()).map(|(i, _)| i).collect()
    }

    /// Probabilities 0.5, 0.3, 0.15, 0.05 (logits are their logs), top_p
    /// 0.8: ascending cumulative mass 0.05, 0.20, 0.50, 1.0; those <= 0.2
    /// go (by hand from `TopPLogitsWarper`'s definition).
    #[test]
    fn top_p_keeps_the_smallest_set_above_p() {
        let probs = [0.15f32, 0.5, 0.05, 0.3];
        let mut l: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        top_p(&mut l, 0.8, &mut Vec::new());
        assert_eq!(kept(&l), vec![1, 3]);
        let mut l: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        top_p(&mut l, 0.81, &mut Vec::new());
        assert_eq!(kept(&l), vec![0, 1, 3]);
        // The largest always stays.
        let mut l: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        top_p(&mut l, 0.01, &mut Vec::new());
        assert_eq!(kept(&l), vec![1]);
    }

    #[test]
    fn top_k_keeps_ties_at_the_threshold() {
        let mut l = vec![1.0f32, 3.0, 2.0, 2.0, 0.5];
        top_k(&mut l, 2, &mut Vec::new());
        assert_eq!(kept(&l), vec![1, 2, 3]);
        let mut l = vec![1.0f32, 3.0, 2.0];
        top_k(&mut l, 1, &mut Vec::new());
        assert_eq!(kept(&l), vec![1]);
    }

    /// min_p 0.25 of a top probability 0.5 removes what is below 0.125.
    #[test]
    fn min_p_scales_with_the_top_probability() {
        let mut l: Vec<f32> = [0.5f32, 0.3, 0.12, 0.08].iter().map(|p| p.ln()).collect();
        min_p(&mut l, 0.25);
        assert_eq!(kept(&l), vec![0, 1]);
    }

    /// CTRL's rule, each seen token once: 2 / 2 = 1, -1 * 2 = -2.
    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative() {
        let mut l = vec![2.0f32, -1.0, 4.0];
        repetition_penalty(&mut l, &[0, 1, 0, 1], 2.0);
        assert_eq!(l, vec![1.0, -2.0, 4.0]);
    }

    #[test]
    fn greedy_takes_the_first_argmax_and_sampling_follows_the_distribution() {
        let mut s = Sampler::new(SamplingOptions::default());
        assert_eq!(s.next(&mut [1.0, 3.0, 3.0], &[]), Some(1));
        // Two tokens of probability 0.25 and 0.75: frequencies over 20,000
        // draws within 4 standard deviations (0.012) of them.
        let opts = SamplingOptions { temperature: 1.0, seed: 7, ..SamplingOptions::default() };
        let mut s = Sampler::new(opts);
        let logits = [0.0f32, 3f32.ln()];
        let n = 20_000;
        let ones = (0..n).filter(|_| s.next(&mut logits.clone(), &[]) == Some(1)).count();
        assert!((ones as f64 / n as f64 - 0.75).abs() < 0.012, "{ones}");
        // The same seed, the same tokens.
        let draws = |seed| {
            let mut s = Sampler::new(SamplingOptions { seed, ..opts });
            (0..50).map(|_| s.next(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(draws(3), draws(3));
        assert_ne!(draws(3), draws(4));
    }
}
