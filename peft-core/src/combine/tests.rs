//! Combination tests: hand calculations for the element-wise kinds, a dense
//! f64 oracle and the truncated-SVD characterization for `cat` and `svd`.
//! PEFT's own results are checked by `peft-faer`'s `tests/combine.rs`
//! against the `lora_weighted` fixture.

extern crate std;
use std::vec;
use std::vec::Vec;

use super::*;
use crate::lora::LoraConfig;

/// A rank-`r` adapter with scale `s` (alpha = s r).
fn lora(r: usize, n_in: usize, n_out: usize, s: f64, a: Vec<f64>, b: Vec<f64>) -> Lora<f64, Vec<f64>> {
    Lora::new(&LoraConfig::new(r, s * r as f64), n_in, n_out, a, b).unwrap()
}

/// A random rank-`r` adapter `in -> out` with scale `s`, its factors in
/// `[-1, 1)`.
fn random_lora(rng: &mut Rng, (n_in, n_out): (usize, usize), r: usize, s: f64) -> Lora<f64, Vec<f64>> {
    lora(r, n_in, n_out, s, random(rng, r * n_in), random(rng, n_out * r))
}

fn random(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.uniform_range(-1.0, 1.0)).collect()
}

/// Dense `B A` (`[out, in]`) of `b [out, r]`, `a [r, in]`.
fn product(b: &[f64], a: &[f64], n_out: usize, r: usize, n_in: usize) -> Vec<f64> {
    let mut m = vec![0.0; n_out * n_in];
    for i in 0..n_out {
        for j in 0..n_in {
            m[i * n_in + j] = (0..r).map(|l| b[i * r + l] * a[l * n_in + j]).sum();
        }
    }
    m
}

/// Runs `combine` and returns `(A, B)`.
fn run(
    c: &Combination,
    sources: &[Weighted<'_, f64, Vec<f64>>],
    rank: usize,
    seed: u64,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (n_in, n_out) = (sources[0].lora.in_features(), sources[0].lora.out_features());
    let mut a = vec![f64::NAN; rank * n_in];
    let mut b = vec![f64::NAN; n_out * rank];
    let mut scratch = vec![0.0; combine_scratch_len(c, sources, rank)];
    combine(c, sources, rank, &mut a, &mut b, &mut scratch, &mut Rng::new(seed))?;
    Ok((a, b))
}

#[test]
fn linear_weights_a_by_signed_and_b_by_plain_square_roots() {
    // By hand: k_1 = 0.25 * 1, k_2 = -1 * 1.
    // A = 0.5 * 2 + (-1) * 4 = -3;   B = 0.5 * 3 + 1 * 1 = 2.5.
    let l1 = lora(1, 1, 1, 1.0, vec![2.0], vec![3.0]);
    let l2 = lora(1, 1, 1, 1.0, vec![4.0], vec![1.0]);
    let src = [Weighted { lora: &l1, weight: 0.25 }, Weighted { lora: &l2, weight: -1.0 }];
    assert_eq!(run(&Combination::Linear, &src, 1, 0).unwrap(), (vec![-3.0], vec![2.5]));
}

#[test]
fn ties_elects_signs_and_averages_the_agreeing_entries() {
    // By hand (k = 1 for both, no pruning at density 1):
    // A_1 = [1, -2], A_2 = [-3, 1]. Total: sums [-2, -1] -> signs [-, -]:
    //   entry 0 keeps -3 alone, entry 1 keeps -2 alone -> A = [-3, -2].
    // Frequency: sign sums [0, 0] -> [+, +]: entry 0 keeps 1, entry 1 keeps 1.
    // B_1 = B_2 = [1]: both agree -> (1 + 1) / 2 = 1.
    let l1 = lora(1, 2, 1, 1.0, vec![1.0, -2.0], vec![1.0]);
    let l2 = lora(1, 2, 1, 1.0, vec![-3.0, 1.0], vec![1.0]);
    let src = [Weighted { lora: &l1, weight: 1.0 }, Weighted { lora: &l2, weight: 1.0 }];
    let total = Combination::Ties { density: 1.0, sign: MajoritySign::Total };
    assert_eq!(run(&total, &src, 1, 0).unwrap(), (vec![-3.0, -2.0], vec![1.0]));
    let freq = Combination::Ties { density: 1.0, sign: MajoritySign::Frequency };
    assert_eq!(run(&freq, &src, 1, 0).unwrap(), (vec![1.0, 1.0], vec![1.0]));
    // One source: ties at density 1 is linear (sign(k) sqrt|k| = 1 here).
    assert_eq!(run(&total, &src[..1], 1, 0).unwrap(), run(&Combination::Linear, &src[..1], 1, 0).unwrap());
}

#[test]
fn magnitude_pruning_keeps_the_largest_and_the_first_of_equals() {
    let mut dst = [0.0; 4];
    let mut sel = [0.0; 4];
    prune::magnitude(&[1.0, -4.0, 3.0, 2.0], 0.5, &mut dst, &mut sel);
    assert_eq!(dst, [0.0, -4.0, 3.0, 0.0]);
    prune::magnitude(&[1.0, -1.0, 1.0, 1.0], 0.5, &mut dst, &mut sel);
    assert_eq!(dst, [1.0, -1.0, 0.0, 0.0], "ties keep the lowest indices");
    // int(0.3 * 4) = 1.
    prune::magnitude(&[1.0, -1.0, 5.0, 1.0], 0.3, &mut dst, &mut sel);
    assert_eq!(dst, [0.0, 0.0, 5.0, 0.0]);
}

#[test]
fn densities_are_respected_and_density_one_is_linear() {
    let (n_in, n_out, r) = (40, 30, 8);
    let mut rng = Rng::new(3);
    let l1 = random_lora(&mut rng, (n_in, n_out), r, 2.0);
    let l2 = random_lora(&mut rng, (n_in, n_out), r, 0.5);
    let both = [Weighted { lora: &l1, weight: 0.7 }, Weighted { lora: &l2, weight: 0.3 }];
    let linear = run(&Combination::Linear, &both, r, 0).unwrap();
    for c in [Combination::MagnitudePrune { density: 1.0 }, Combination::DareLinear { density: 1.0 }] {
        assert_eq!(run(&c, &both, r, 9).unwrap(), linear, "{}", c.name());
    }
    // One source: magnitude keeps exactly int(d * n) entries of each factor.
    let one = &both[..1];
    let (a, b) = run(&Combination::MagnitudePrune { density: 0.3 }, one, r, 0).unwrap();
    assert_eq!(a.iter().filter(|v| **v != 0.0).count(), (0.3 * (r * n_in) as f64) as usize);
    assert_eq!(b.iter().filter(|v| **v != 0.0).count(), (0.3 * (n_out * r) as f64) as usize);
    // DARE keeps about d of them (320 + 240 Bernoulli(0.25) draws: within
    // 0.25 +- 0.06 holds with probability > 0.999), each scaled by 1 / d.
    let (a, b) = run(&Combination::DareLinear { density: 0.25 }, one, r, 5).unwrap();
    let kept = a.iter().chain(&b).filter(|v| **v != 0.0).count() as f64 / (a.len() + b.len()) as f64;
    assert!((kept - 0.25).abs() < 0.06, "kept fraction {kept}");
    let k = (0.7f64 * 2.0).sqrt();
    for (got, src) in a.iter().zip(l1.lora_a()) {
        assert!(*got == 0.0 || (got - k * src / 0.25).abs() <= 1e-12, "{got} vs {src}");
    }
    // Same seed, same masks.
    assert_eq!(run(&Combination::DareLinear { density: 0.25 }, one, r, 5).unwrap(), (a, b));
}

#[test]
fn cat_is_exact_and_pads_with_zeros() {
    let (n_in, n_out) = (6, 5);
    let mut rng = Rng::new(11);
    let l1 = random_lora(&mut rng, (n_in, n_out), 2, 2.0);
    let l2 = random_lora(&mut rng, (n_in, n_out), 3, 0.5);
    let src = [Weighted { lora: &l1, weight: 0.7 }, Weighted { lora: &l2, weight: -0.3 }];
    let (a, b) = run(&Combination::Cat, &src, 6, 0).unwrap();
    let got = product(&b, &a, n_out, 6, n_in);
    let m1 = product(l1.lora_b(), l1.lora_a(), n_out, 2, n_in);
    let m2 = product(l2.lora_b(), l2.lora_a(), n_out, 3, n_in);
    for ((g, x), y) in got.iter().zip(&m1).zip(&m2) {
        assert!((g - (1.4 * x - 0.15 * y)).abs() <= 1e-14, "{g}");
    }
    assert!(a[5 * n_in..].iter().all(|v| *v == 0.0) && b.chunks(6).all(|row| row[5] == 0.0), "padding");
    assert_eq!(
        run(&Combination::Cat, &src, 4, 0),
        Err(Error::InvalidParameter { name: "rank", rule: "must be at least the sum of the sources' ranks for cat" })
    );
}

/// Largest singular value of the dense `m x n` matrix `x`, by power
/// iteration on `x^T x` (an independent route to the spectrum).
fn sigma_max(x: &[f64], m: usize, n: usize) -> f64 {
    let mut v = vec![1.0; n];
    let mut sigma = 0.0;
    for _ in 0..2000 {
        let xv: Vec<f64> = (0..m).map(|i| (0..n).map(|j| x[i * n + j] * v[j]).sum()).collect();
        let w: Vec<f64> = (0..n).map(|j| (0..m).map(|i| x[i * n + j] * xv[i]).sum()).collect();
        let norm = w.iter().map(|t| t * t).sum::<f64>().sqrt();
        if norm == 0.0 {
            return 0.0;
        }
        sigma = norm.sqrt();
        v = w.iter().map(|t| t / norm).collect();
    }
    sigma
}

#[test]
fn svd_is_the_truncation_of_the_weighted_sum() {
    let (n_in, n_out) = (7, 9);
    let mut rng = Rng::new(5);
    let l1 = random_lora(&mut rng, (n_in, n_out), 2, 2.0);
    let l2 = random_lora(&mut rng, (n_in, n_out), 3, 0.5);
    let src = [Weighted { lora: &l1, weight: 0.7 }, Weighted { lora: &l2, weight: 0.3 }];
    let m1 = product(l1.lora_b(), l1.lora_a(), n_out, 2, n_in);
    let m2 = product(l2.lora_b(), l2.lora_a(), n_out, 3, n_in);
    let m: Vec<f64> = m1.iter().zip(&m2).map(|(x, y)| 1.4 * x + 0.15 * y).collect();
    // Full rank (5 = 2 + 3) and beyond (7, zero-padded): B A = M.
    for rank in [5, 7] {
        let (a, b) = run(&Combination::Svd { rank: Some(rank) }, &src, rank, 0).unwrap();
        let got = product(&b, &a, n_out, rank, n_in);
        assert!(got.iter().zip(&m).all(|(g, w)| (g - w).abs() <= 1e-13), "rank {rank}");
    }
    // Rank 3: A's rows orthonormal, B's columns orthogonal with decreasing
    // norms (the singular values), and the residual's largest singular value
    // no larger than the smallest kept one (Eckart-Young).
    let k = 3;
    let (a, b) = run(&Combination::Svd { rank: Some(k) }, &src, k, 0).unwrap();
    for i in 0..k {
        for j in 0..k {
            let dot: f64 = (0..n_in).map(|c| a[i * n_in + c] * a[j * n_in + c]).sum();
            assert!((dot - if i == j { 1.0 } else { 0.0 }).abs() <= 1e-13, "A rows {i}, {j}: {dot}");
            let bdot: f64 = (0..n_out).map(|r| b[r * k + i] * b[r * k + j]).sum();
            assert!(i == j || bdot.abs() <= 1e-13, "B columns {i}, {j}: {bdot}");
        }
    }
    let sig: Vec<f64> = (0..k).map(|i| (0..n_out).map(|r| b[r * k + i].powi(2)).sum::<f64>().sqrt()).collect();
    assert!(sig.windows(2).all(|w| w[0] >= w[1]), "{sig:?}");
    let low = product(&b, &a, n_out, k, n_in);
    let residual: Vec<f64> = m.iter().zip(&low).map(|(x, y)| x - y).collect();
    let next = sigma_max(&residual, n_out, n_in);
    assert!(next <= sig[k - 1] * (1.0 + 1e-9), "sigma_{} = {next} > {}", k + 1, sig[k - 1]);
    // ||M||_F^2 = ||B A||_F^2 + ||M - B A||_F^2 (the residual is orthogonal).
    let f = |v: &[f64]| v.iter().map(|t| t * t).sum::<f64>();
    assert!((f(&m) - f(&low) - f(&residual)).abs() <= 1e-12 * f(&m));
    assert_eq!(run(&Combination::Svd { rank: Some(8) }, &src, 8, 0), Err(Error::InvalidRank { rank: 8, max: 7 }));
}

/// Weights near f64's range (issue 27, class 7: 1e200 gave zeros, its
/// square overflowing inside the decomposition): the factors are those of
/// weight 1 with `B = U S` scaled by the weight, bit for bit (the scaling
/// is by a power of two, exact; 2^660 here).
#[test]
fn svd_of_huge_weights_is_the_scaled_svd() {
    let mut rng = Rng::new(9);
    let [l1, l2] = [(); 2].map(|()| random_lora(&mut rng, (6, 5), 2, 1.0));
    let big = libm::ldexp(1.0, 660);
    let unit = [Weighted { lora: &l1, weight: 1.0 }, Weighted { lora: &l2, weight: 0.5 }];
    let huge = [Weighted { lora: &l1, weight: big }, Weighted { lora: &l2, weight: 0.5 * big }];
    let (a1, b1) = run(&Combination::Svd { rank: Some(3) }, &unit, 3, 0).unwrap();
    let (a2, b2) = run(&Combination::Svd { rank: Some(3) }, &huge, 3, 0).unwrap();
    assert_eq!(a2, a1);
    assert!(b2.iter().zip(&b1).all(|(h, u)| *h == u * big), "{b2:?} vs {b1:?} * 2^660");
    assert!(b1.iter().any(|v| *v != 0.0));
}

#[test]
fn bad_parameters_are_refused_before_writing() {
    let l1 = lora(1, 2, 2, 1.0, vec![1.0, 2.0], vec![3.0, 4.0]);
    let l2 = lora(2, 2, 2, 1.0, vec![1.0; 4], vec![1.0; 4]);
    let src = [Weighted { lora: &l1, weight: 1.0 }, Weighted { lora: &l2, weight: 1.0 }];
    let mut a = [7.0; 2];
    let mut b = [7.0; 2];
    let mut scratch = [0.0; 64];
    let rng = &mut Rng::new(0);
    let e = combine(&Combination::Linear, &src, 1, &mut a, &mut b, &mut scratch, rng);
    assert!(matches!(e, Err(Error::InvalidParameter { name: "source ranks", .. })));
    let e = combine(&Combination::MagnitudePrune { density: 1.5 }, &src[..1], 1, &mut a, &mut b, &mut scratch, rng);
    assert_eq!(e, Err(Error::InvalidParameter { name: "density", rule: "must be in [0, 1]" }));
    let e = combine(
        &Combination::DareTies { density: 0.0, sign: MajoritySign::Total },
        &src[..1],
        1,
        &mut a,
        &mut b,
        &mut scratch,
        rng,
    );
    assert!(matches!(e, Err(Error::InvalidParameter { name: "density", .. })));
    let nan = [Weighted { lora: &l1, weight: f64::NAN }];
    let e = combine(&Combination::Linear, &nan, 1, &mut a, &mut b, &mut scratch, rng);
    assert!(matches!(e, Err(Error::InvalidParameter { name: "weight", .. })));
    assert_eq!((a, b), ([7.0; 2], [7.0; 2]), "nothing written");
    assert_eq!(
        Combination::Linear.rank([4, 8]),
        Err(Error::InvalidParameter {
            name: "source ranks",
            rule: "must be equal for linear, ties, dare_linear, dare_ties and magnitude_prune",
        })
    );
    assert_eq!(Combination::Cat.rank([4, 8]), Ok(12));
    assert_eq!(Combination::Svd { rank: None }.rank([4, 8]), Ok(8));
}
