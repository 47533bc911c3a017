//! IEEE binary16 and bfloat16 conversions on bits, without the `half` (its docs are in the [parent module](super))

/// binary16 bits to f32 (exact; a NaN is quieted, its payload kept).
///
/// Branch-free, so that loops over many values vectorize: normal values
/// move their exponent and mantissa into place with an integer add,
/// subnormals convert their integer mantissa (`m 2^-24`, never an f32
/// subnormal, so no flush-to-zero mode can change them), and the three
/// results are selected.
pub fn f16_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    let normal = (em << 13) + (112 << 23);
    let subnormal = (em as f32 * (1.0 / 16_777_216.0)).to_bits();
    let man = em & 0x3ff;
    let special = 0x7f80_0000 | if man != 0 { 0x40_0000 } else { 0 } | (man << 13);
    let bits = if em >= 0x7c00 {
        special
    } else if em < 0x400 {
        subnormal
    } else {
        normal
    };
    f32::from_bits(bits | sign)
}

/// f32 to binary16 bits, rounded to nearest, ties to even (overflow to
/// infinity, underflow to subnormals and zero).
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 255 {
        return sign | 0x7c00 | if man != 0 { 0x200 | (man >> 13) as u16 } else { 0 };
    }
    let e = exp - 112;
    if e >= 31 {
        return sign | 0x7c00;
    }
    let round = |q: u32, rem: u32, half: u32| if rem > half || (rem == half && q & 1 == 1) { q + 1 } else { q };
    if e <= 0 {
        // Subnormal (or zero): q = m 2^(e - 14) with the implicit bit.
        if e < -10 {
            return sign;
        }
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let q = round(m >> shift, m & ((1 << shift) - 1), 1 << (shift - 1));
        return sign | q as u16;
    }
    // A carry out of the mantissa moves to the exponent (and to infinity).
    let q = round(((e as u32) << 10) | (man >> 13), man & 0x1fff, 0x1000);
    sign | q as u16
}

/// bfloat16 bits to f32 (exact).
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// f32 to bfloat16 bits, rounded to nearest, ties to even; NaN stays NaN.
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_f16_round_trips_and_matches_the_half_crate() {
        for h in 0..=u16::MAX {
            let x = f16_to_f32(h);
            #[cfg(feature = "half")]
            assert_eq!(x.to_bits(), half::f16::from_bits(h).to_f32().to_bits(), "{h:#06x}");
            if x.is_nan() {
                assert!(f16_to_f32(f32_to_f16(x)).is_nan());
                continue;
            }
            assert_eq!(f32_to_f16(x), h, "{h:#06x} -> {x}");
        }
    }

    #[cfg(feature = "half")]
    #[test]
    fn narrowing_rounds_as_the_half_crate() {
        // Every 97th f32 bit pattern (all exponents, mantissas and ties).
        let mut b = 0u32;
        while let Some(next) = b.checked_add(97) {
            let x = f32::from_bits(b);
            if !x.is_nan() {
                assert_eq!(f32_to_f16(x), half::f16::from_f32(x).to_bits(), "{x:e} ({b:#010x})");
                assert_eq!(f32_to_bf16(x), half::bf16::from_f32(x).to_bits(), "{x:e} ({b:#010x})");
            }
            b = next;
        }
    }

    #[test]
    fn by_hand() {
        assert_eq!(f32_to_f16(1.0), 0x3c00);
        assert_eq!(f32_to_f16(65504.0), 0x7bff);
        assert_eq!(f32_to_f16(65520.0), 0x7c00, "the tie above the largest half rounds to infinity");
        assert_eq!(f32_to_f16(2.0f32.powi(-24)), 0x0001);
        assert_eq!(f32_to_f16(2.0f32.powi(-25)), 0x0000, "a tie to the even zero");
        assert_eq!(f32_to_bf16(1.0 + 2.0f32.powi(-8)), 0x3f80, "a tie to even");
        assert_eq!(bf16_to_f32(0x3f81), 1.0 + 2.0f32.powi(-7));
        assert_eq!(f16_to_f32(0x0001), 2.0f32.powi(-24), "the smallest subnormal");
        assert_eq!(f16_to_f32(0x83ff), -1023.0 * 2.0f32.powi(-24), "the largest negative subnormal");
        assert_eq!(f16_to_f32(0x0400), 2.0f32.powi(-14), "the smallest normal");
        assert_eq!(f16_to_f32(0xfc00), f32::NEG_INFINITY);
        assert_eq!(f16_to_f32(0x7c01).to_bits(), 0x7fc0_2000, "a NaN is quieted, its payload kept");
    }
}
