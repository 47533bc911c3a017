use super::*;

fn sample_f32() -> ([f32; 6], [f32; 3]) {
    // -0.0, a subnormal, a NaN with a payload: bits must survive.
    ([1.0, -0.0, f32::from_bits(1), f32::from_bits(0x7fc0_1234), 3.0e38, -2.25], [0.5, 0.25, 0.125])
}

fn encode_vec<E: Element>(
    method: Method,
    config: &[(&str, Value<'_>)],
    tensors: &[Tensor<'_, E>],
) -> ([u8; 512], usize) {
    let mut out = [0u8; 512];
    let n = encode(method, config, tensors, &mut out).unwrap();
    assert_eq!(n, encoded_len(config, tensors).unwrap());
    (out, n)
}

const CONFIG: [(&str, Value<'static>); 4] = [
    ("r", Value::U64(2)),
    ("lora_alpha", Value::F64(16.5)),
    ("use_rslora", Value::Bool(true)),
    ("base", Value::Str("tiny")),
];

/// The standard CRC-32 check value (CRC catalogue: "123456789" -> 0xCBF43926).
#[test]
fn crc32_check_value() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(crc32(b""), 0);
}

/// The byte layout, written out by hand from the module docs.
#[test]
fn layout_matches_the_documentation() {
    let t = [Tensor { name: "a", shape: &[2], data: &[1.0f32, -2.0] }];
    let (buf, n) = encode_vec(Method::Lora, &[("r", Value::U64(2))], &t);
    let mut want = [0u8; 81];
    let header: &[u8] = &[
        b'P', b'E', b'F', b'T', b'A', b'D', b'P', b'T', 1, 0, 0, 0, 1, 0, 0,
        0, // magic, version, method, reserved
        1, 0, 0, 0, 1, 0, 0, 0, // n_config, n_tensors
        24, 0, 0, 0, 0, 0, 0, 0, // header_len: (1 + 1 + 1 + 8) + (2 + 1 + 1 + 1 + 8)
        8, 0, 0, 0, 0, 0, 0, 0, // data_len
        1, b'r', 0, 2, 0, 0, 0, 0, 0, 0, 0, // "r" = u64 2
        1, 0, b'a', 1, 1, 2, 0, 0, 0, 0, 0, 0, 0, // "a": f32, 1 dim of 2
        0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0, // 1.0, -2.0
    ];
    want[..header.len()].copy_from_slice(header);
    let crc = crc32(&want[..header.len()]);
    want[header.len()..header.len() + 4].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(n, header.len() + 4);
    assert_eq!(&buf[..n], &want[..n]);
}

#[test]
fn every_method_code_round_trips() {
    let methods = [
        (Method::Lora, 1),
        (Method::Adapter, 2),
        (Method::Prompt, 3),
        (Method::Prefix, 4),
        (Method::Ia3, 5),
        (Method::Loha, 6),
        (Method::Lokr, 7),
        (Method::Vera, 8),
        (Method::AdaLora, 9),
        (Method::Miss, 10),
        (Method::Hra, 11),
        (Method::Road, 12),
        (Method::C3a, 13),
        (Method::Shira, 14),
        (Method::Oft, 15),
        (Method::Boft, 16),
        (Method::FourierFt, 17),
        (Method::RandLora, 18),
        (Method::VbLora, 19),
        (Method::LnTuning, 20),
        (Method::TrainableTokens, 21),
    ];
    let t = [Tensor { name: "x", shape: &[1], data: &[1.0f32][..] }];
    for (m, code) in methods {
        let (buf, n) = encode_vec(m, &[], &t);
        assert_eq!(buf[12], code, "{m:?}: the code the format documents");
        assert_eq!(AdapterFile::parse(&buf[..n]).unwrap().method(), m);
    }
}

#[test]
fn round_trip_is_bit_exact_for_every_element_type() {
    fn check<E: Element>(values: &[E]) {
        let t = [
            Tensor { name: "lora_A", shape: &[values.len()], data: values },
            Tensor { name: "scalar", shape: &[], data: &values[..1] },
        ];
        let (buf, n) = encode_vec(Method::Prefix, &CONFIG, &t);
        let f = AdapterFile::parse(&buf[..n]).unwrap();
        assert_eq!(f.method(), Method::Prefix);
        assert_eq!(f.get_u64("r"), Ok(2));
        assert_eq!(f.get_f64("lora_alpha"), Ok(16.5));
        assert_eq!(f.get_f64("r"), Ok(2.0));
        assert_eq!(f.get_bool("use_rslora"), Ok(true));
        assert_eq!(f.get_str("base"), Ok("tiny"));
        assert_eq!(f.get_u64("missing"), Err(FormatError::MissingKey { key: "missing" }));
        assert_eq!(f.get_bool("r"), Err(FormatError::WrongType { key: "r" }));
        let tv = f.tensor("lora_A").unwrap();
        assert_eq!((tv.dtype(), tv.shape(), tv.numel()), (Dtype::of::<E>(), &[values.len()][..], values.len()));
        let mut back = [E::ZERO; 8];
        tv.read_into(&mut back[..values.len()]).unwrap();
        for (a, b) in values.iter().zip(&back) {
            assert_eq!(a.to_bits64(), b.to_bits64());
        }
        let s = f.tensor("scalar").unwrap();
        assert_eq!((s.shape(), s.numel()), (&[][..], 1));
        assert_eq!(f.tensor("nope").unwrap_err(), FormatError::MissingTensor);
        // Wrong destination length: typed error, nothing written.
        let mut short = [E::ZERO; 1];
        assert!(tv.read_into(&mut short).is_err());
        assert_eq!(short[0].to_bits64(), E::ZERO.to_bits64());
    }
    let (a, _) = sample_f32();
    check(&a);
    check(&[1.0f64, -0.0, f64::from_bits(1), f64::from_bits(0x7ff8_0000_0000_1234), f64::MAX]);
    #[cfg(feature = "half")]
    {
        check(&[
            half::f16::from_bits(0x0001),
            half::f16::from_bits(0x8000),
            half::f16::MAX,
            half::f16::from_bits(0x7e01),
        ]);
        check(&[
            half::bf16::from_bits(0x0001),
            half::bf16::from_bits(0x8000),
            half::bf16::MAX,
            half::bf16::from_bits(0x7fc1),
        ]);
    }
}

/// Reading into another type widens exactly: f16 bit patterns decoded
/// by hand (IEEE 754 binary16).
#[test]
fn cross_type_read_decodes_exactly() {
    // 0x3c00 = 1, 0xc000 = -2, 0x0001 = 2^-24, 0x7bff = 65504, 0x3555 = 0.333251953125.
    let f16_bits: [u64; 5] = [0x3c00, 0xc000, 0x0001, 0x7bff, 0x3555];
    let want = [1.0, -2.0, 5.960464477539063e-8, 65504.0, 0.333251953125];
    for (b, w) in f16_bits.iter().zip(want) {
        assert_eq!(Dtype::F16.decode(*b), w);
    }
    assert!(Dtype::F16.decode(0x7c00).is_infinite() && Dtype::F16.decode(0x7e00).is_nan());
    // bf16 0x3fc0 = 1.5.
    assert_eq!(Dtype::Bf16.decode(0x3fc0), 1.5);
    let t = [Tensor { name: "w", shape: &[2], data: &[1.5f64, 0.1] }];
    let (buf, n) = encode_vec(Method::Adapter, &[], &t);
    let mut out = [0.0f32; 2];
    AdapterFile::parse(&buf[..n]).unwrap().tensor("w").unwrap().read_into(&mut out).unwrap();
    assert_eq!(out, [1.5, 0.1f32]);
}

#[test]
fn every_truncation_and_extension_is_rejected() {
    let (a, b) = sample_f32();
    let t = [Tensor { name: "A", shape: &[2, 3], data: &a[..] }, Tensor { name: "B", shape: &[3, 1], data: &b[..] }];
    let (buf, n) = encode_vec(Method::Lora, &CONFIG, &t);
    for cut in 0..n {
        let err = AdapterFile::parse(&buf[..cut]).unwrap_err();
        let want = if cut < FIXED {
            FormatError::Truncated { needed: (FIXED + TRAILER) as u64, len: cut }
        } else {
            FormatError::Truncated { needed: n as u64, len: cut }
        };
        assert_eq!(err, want, "cut at {cut}");
    }
    let err = AdapterFile::parse(&buf[..n + 1]).unwrap_err();
    assert_eq!(err, FormatError::TrailingBytes { expected: n as u64, len: n + 1 });
}

#[test]
fn every_single_bit_flip_is_rejected() {
    let (a, b) = sample_f32();
    let t = [Tensor { name: "A", shape: &[2, 3], data: &a[..] }, Tensor { name: "B", shape: &[3, 1], data: &b[..] }];
    let (buf, n) = encode_vec(Method::Lora, &CONFIG, &t);
    for i in 0..n {
        for bit in 0..8 {
            let mut bad = buf;
            bad[i] ^= 1 << bit;
            assert!(AdapterFile::parse(&bad[..n]).is_err(), "flip of bit {bit} in byte {i} accepted");
        }
    }
}

/// Header fields that are wrong in a file whose checksum is right.
#[test]
fn header_checks_with_a_valid_checksum() {
    let t = [Tensor { name: "A", shape: &[2], data: &[1.0f32, 2.0] }];
    let (buf, n) = encode_vec(Method::Lora, &[("r", Value::U64(2))], &t);
    let resealed = |edit: &dyn Fn(&mut [u8])| {
        let mut b = buf;
        edit(&mut b[..n]);
        let crc = crc32(&b[..n - 4]);
        b[n - 4..n].copy_from_slice(&crc.to_le_bytes());
        AdapterFile::parse(&b[..n]).map(|_| ())
    };
    assert_eq!(resealed(&|b| b[0] = b'X'), Err(FormatError::BadMagic));
    assert_eq!(resealed(&|b| b[8] = 2), Err(FormatError::UnsupportedVersion { version: 2 }));
    assert_eq!(resealed(&|b| b[12] = 22), Err(FormatError::UnknownMethod { code: 22 }));
    assert_eq!(resealed(&|b| b[12] = 0), Err(FormatError::UnknownMethod { code: 0 }));
    assert_eq!(resealed(&|b| b[13] = 1), Err(FormatError::Reserved));
    assert_eq!(resealed(&|b| b[23] = 1), Err(FormatError::TooMany { what: "tensors", count: (1 << 24) + 1 }));
    // One tensor more than the directory holds.
    assert_eq!(resealed(&|b| b[20] = 2), Err(FormatError::HeaderLength));
    // A dimension of 3 where the data holds 2 elements.
    assert_eq!(resealed(&|b| b[40 + 11 + 5] = 3), Err(FormatError::DataLength { declared: 8, tensors: 12 }));
    // An element type code of 7.
    assert_eq!(resealed(&|b| b[40 + 11 + 3] = 7), Err(FormatError::UnknownDtype { code: 7 }));
    // Five dimensions.
    assert_eq!(resealed(&|b| b[40 + 11 + 4] = 5), Err(FormatError::TooManyDims { ndim: 5 }));
    // A config tag of 9.
    assert_eq!(resealed(&|b| b[40 + 2] = 9), Err(FormatError::UnknownTag { tag: 9 }));
    // Name bytes that are not UTF-8.
    assert_eq!(resealed(&|b| b[40 + 1] = 0xff), Err(FormatError::BadName));
    // Huge declared sizes: an overflow or a truncation, never an allocation.
    assert_eq!(resealed(&|b| b[24..32].copy_from_slice(&u64::MAX.to_le_bytes())), Err(FormatError::Overflow));
    assert_eq!(
        resealed(&|b| b[32..40].copy_from_slice(&(1u64 << 60).to_le_bytes())),
        Err(FormatError::Truncated { needed: (1u64 << 60) + 24 + 44, len: n })
    );
}

#[test]
fn writer_rejects_bad_entries_and_writes_nothing() {
    let mut out = [7u8; 64];
    let two = [1.0f32, 2.0];
    let cases: [(&[Tensor<'_, f32>], Error); 4] = [
        (&[Tensor { name: "", shape: &[2], data: &two }], FormatError::BadName.into()),
        (
            &[Tensor { name: "a", shape: &[2], data: &two }, Tensor { name: "a", shape: &[2], data: &two }],
            FormatError::DuplicateName.into(),
        ),
        (
            &[Tensor { name: "a", shape: &[3], data: &two }],
            Error::ShapeMismatch { operand: Operand::Parameter, expected: 3, found: 2 },
        ),
        (&[Tensor { name: "a", shape: &[1, 1, 1, 1, 2], data: &two }], FormatError::TooManyDims { ndim: 5 }.into()),
    ];
    for (t, want) in cases {
        assert_eq!(encode(Method::Lora, &[], t, &mut out), Err(want));
    }
    let t = [Tensor { name: "a", shape: &[2], data: &two }];
    let need = encoded_len(&[], &t).unwrap();
    assert_eq!(
        encode(Method::Lora, &[], &t, &mut out[..need - 1]),
        Err(FormatError::BufferTooSmall { needed: need, len: need - 1 }.into())
    );
    assert_eq!(encode(Method::Lora, &[("", Value::Bool(true))], &t, &mut out), Err(FormatError::BadName.into()));
    assert!(out.iter().all(|&b| b == 7));
}

/// Two configuration entries with one key: the writer refuses them, and a
/// file that holds them (written by hand, checksum right) is refused.
#[test]
fn duplicate_config_keys_are_refused_both_ways() {
    let t = [Tensor { name: "a", shape: &[1], data: &[1.0f32] }];
    let mut out = [0u8; 128];
    let dup = [("r", Value::U64(2)), ("r", Value::U64(4))];
    assert_eq!(encode(Method::Lora, &dup, &t, &mut out), Err(FormatError::DuplicateKey.into()));
    // "r" and "s", then "s" patched into a second "r".
    let (mut buf, n) = encode_vec(Method::Lora, &[("r", Value::U64(2)), ("s", Value::U64(4))], &t);
    assert!(AdapterFile::parse(&buf[..n]).is_ok());
    let at = 40 + 11 + 1; // after the first entry: key_len, then the key
    assert_eq!(buf[at], b's');
    buf[at] = b'r';
    let crc = crc32(&buf[..n - 4]);
    buf[n - 4..n].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(AdapterFile::parse(&buf[..n]).map(|_| ()), Err(FormatError::DuplicateKey));
}

/// `encode_raw` writes tensors of different element types from their
/// stored bytes, and the reader gives each back with its type and bits.
#[test]
fn raw_tensors_of_mixed_types_round_trip() {
    let a: [u8; 4] = 1.5f32.to_le_bytes();
    let b: [u8; 8] = [0x00, 0x3c, 0x00, 0xc0, 0x00, 0x7c, 0x01, 0x00]; // f16 1, -2, inf, subnormal
    let t = [
        RawTensor { name: "a", dtype: Dtype::F32, shape: &[1], data: &a },
        RawTensor { name: "b", dtype: Dtype::F16, shape: &[4], data: &b },
    ];
    let mut out = [0u8; 256];
    let n = encode_raw(Method::Lora, &CONFIG, &t, &mut out).unwrap();
    assert_eq!(n, encoded_len_raw(&CONFIG, &t).unwrap());
    let f = AdapterFile::parse(&out[..n]).unwrap();
    let back: [(Dtype, &[u8]); 2] = [(Dtype::F32, &a), (Dtype::F16, &b)];
    for (v, (dtype, bytes)) in f.tensors().zip(back) {
        assert_eq!((v.dtype(), v.bytes()), (dtype, bytes), "{}", v.name());
    }
    // A byte length that is not a whole number of elements.
    let odd = [RawTensor { name: "b", dtype: Dtype::F16, shape: &[4], data: &b[..7] }];
    assert!(encode_raw(Method::Lora, &[], &odd, &mut out).is_err());
}
