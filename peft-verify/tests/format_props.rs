//! The adapter-file reader under hostile input (the proptest twin of the
//! `cargo fuzz` target in `peft-core/fuzz`): random bytes, valid files
//! truncated, extended, bit-flipped, or edited and re-sealed with a correct
//! checksum. Every case must return (never panic), and a buffer that parses
//! must be safe to walk. Valid files round-trip bit-exact in every element
//! type.

use std::panic::{AssertUnwindSafe, catch_unwind};

use half::{bf16, f16};
use peft_core::Element;
use peft_core::format::{AdapterFile, FormatError, Tensor, Value, crc32, encode, encoded_len};
use peft_core::optim::Method;
use proptest::prelude::*;

/// Parses and, if that succeeds, walks everything a caller could touch.
fn exercise(bytes: &[u8]) -> Result<(), FormatError> {
    let f = AdapterFile::parse(bytes)?;
    for (k, v) in f.config() {
        assert!(!k.is_empty());
        let _ = v;
    }
    let mut n = 0;
    for t in f.tensors() {
        let mut out = vec![0.0f64; t.numel()];
        t.read_into(&mut out).expect("length matches numel");
        assert_eq!(t.shape().iter().product::<usize>(), t.numel());
        n += 1;
    }
    assert_eq!(n, f.num_tensors());
    Ok(())
}

fn no_panic(bytes: &[u8]) -> Result<(), FormatError> {
    catch_unwind(AssertUnwindSafe(|| exercise(bytes))).expect("the reader panicked")
}

/// A valid file: 1 to 4 f32 tensors of random shapes and values, and a few
/// config entries.
fn valid_file() -> impl Strategy<Value = Vec<u8>> {
    let tensor = (prop::collection::vec(0usize..5, 0..4), any::<u64>());
    (prop::collection::vec(tensor, 1..4), any::<u64>(), -1e6f64..1e6).prop_map(|(ts, k, x)| {
        let data: Vec<Vec<f32>> = ts
            .iter()
            .map(|(shape, seed)| {
                let n: usize = shape.iter().product();
                (0..n).map(|i| ((seed.wrapping_mul(i as u64 + 1) % 1000) as f32 - 500.0) / 7.0).collect()
            })
            .collect();
        let names: Vec<String> = (0..ts.len()).map(|i| format!("t{i}")).collect();
        let tensors: Vec<Tensor<'_, f32>> =
            ts.iter().zip(&data).zip(&names).map(|(((shape, _), d), name)| Tensor { name, shape, data: d }).collect();
        let config = [
            ("r", Value::U64(k)),
            ("alpha", Value::F64(x)),
            ("on", Value::Bool(k % 2 == 0)),
            ("s", Value::Str("q_proj")),
        ];
        let mut out = vec![0u8; encoded_len(&config, &tensors).unwrap()];
        encode(Method::Lora, &config, &tensors, &mut out).unwrap();
        out
    })
}

fn reseal(bytes: &mut [u8]) {
    let n = bytes.len();
    if n >= 4 {
        let crc = crc32(&bytes[..n - 4]);
        bytes[n - 4..].copy_from_slice(&crc.to_le_bytes());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = no_panic(&bytes);
    }

    #[test]
    fn random_bytes_behind_a_valid_magic_never_panic(tail in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = b"PEFTADPT\x01\x00\x00\x00".to_vec();
        bytes.extend_from_slice(&tail);
        reseal(&mut bytes);
        let _ = no_panic(&bytes);
    }

    #[test]
    fn valid_files_parse(file in valid_file()) {
        prop_assert!(no_panic(&file).is_ok());
    }

    #[test]
    fn truncations_and_extensions_are_rejected(file in valid_file(), cut in any::<prop::sample::Index>(), extra in 1usize..16) {
        let cut = cut.index(file.len());
        let is_truncated = matches!(no_panic(&file[..cut]), Err(FormatError::Truncated { .. }));
        prop_assert!(is_truncated);
        let mut longer = file.clone();
        longer.extend(std::iter::repeat_n(0u8, extra));
        let is_trailing = matches!(no_panic(&longer), Err(FormatError::TrailingBytes { .. }));
        prop_assert!(is_trailing);
    }

    #[test]
    fn flipped_bytes_are_rejected(file in valid_file(), at in any::<prop::sample::Index>(), mask in 1u8..=255) {
        let mut bad = file.clone();
        let i = at.index(bad.len());
        bad[i] ^= mask;
        prop_assert!(no_panic(&bad).is_err());
    }

    /// Edits the checksum cannot see: any outcome but a panic is fine, and
    /// a file that still parses is safe to walk (checked in `exercise`).
    #[test]
    fn resealed_edits_never_panic(file in valid_file(), edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)) {
        let mut bad = file.clone();
        for (at, v) in edits {
            let i = at.index(bad.len());
            bad[i] = v;
        }
        reseal(&mut bad);
        let _ = no_panic(&bad);
    }

    /// Huge declared lengths: a typed error from the header alone, no
    /// allocation of the declared size.
    #[test]
    fn huge_declared_sizes_are_rejected(file in valid_file(), header in any::<u64>(), data in 1u64 << 40..u64::MAX) {
        let mut bad = file.clone();
        bad[24..32].copy_from_slice(&header.to_le_bytes());
        bad[32..40].copy_from_slice(&data.to_le_bytes());
        reseal(&mut bad);
        let r = no_panic(&bad);
        let is_typed = matches!(r, Err(FormatError::Truncated { .. } | FormatError::Overflow));
        prop_assert!(is_typed, "{r:?}");
    }

    #[test]
    fn round_trip_is_bit_exact_in_every_element_type(bits in prop::collection::vec(any::<u64>(), 1..40)) {
        fn check<E: Element>(bits: &[u64]) -> Result<(), TestCaseError> {
            let v: Vec<E> = bits.iter().map(|&b| E::from_bits64(b)).collect();
            let t = [Tensor { name: "x", shape: &[v.len()], data: &v[..] }];
            let mut out = vec![0u8; encoded_len::<E>(&[], &t).unwrap()];
            encode(Method::Prompt, &[], &t, &mut out).unwrap();
            let f = AdapterFile::parse(&out).unwrap();
            let mut back = vec![E::ZERO; v.len()];
            f.tensor("x").unwrap().read_into(&mut back).unwrap();
            for (a, b) in v.iter().zip(&back) {
                prop_assert_eq!(a.to_bits64(), b.to_bits64());
            }
            Ok(())
        }
        check::<f32>(&bits)?;
        check::<f64>(&bits)?;
        check::<f16>(&bits)?;
        check::<bf16>(&bits)?;
    }
}
