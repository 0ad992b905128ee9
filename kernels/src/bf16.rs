//! bfloat16 rounding, bit-identical to libtorch's `c10::BFloat16(float)`.

/// `x` rounded to the nearest bfloat16 (ties to even), as raw bits; NaN maps
/// to libtorch's canonical quiet NaN `0x7FC0`.
#[inline(always)]
pub fn from_f32(x: f32) -> u16 {
    if x.is_nan() {
        return 0x7FC0;
    }
    let bits = x.to_bits();
    let rounding = 0x7FFF + ((bits >> 16) & 1);
    (bits.wrapping_add(rounding) >> 16) as u16
}

/// The f32 value of bfloat16 bits (exact).
#[inline(always)]
pub fn to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_nearest_even_and_keeps_specials() {
        assert_eq!(from_f32(1.0), 0x3F80);
        assert_eq!(from_f32(-2.0), 0xC000);
        assert_eq!(from_f32(0.0), 0);
        assert_eq!(from_f32(-0.0), 0x8000);
        assert_eq!(from_f32(f32::INFINITY), 0x7F80);
        assert_eq!(from_f32(f32::NEG_INFINITY), 0xFF80);
        assert_eq!(from_f32(f32::NAN), 0x7FC0);
        // halfway between 0x3F80 and 0x3F81: ties to the even one
        assert_eq!(from_f32(f32::from_bits(0x3F80_8000)), 0x3F80);
        assert_eq!(from_f32(f32::from_bits(0x3F81_8000)), 0x3F82);
        assert_eq!(from_f32(f32::from_bits(0x3F80_8001)), 0x3F81);
        // the largest finite values round to infinity only past the halfway point
        assert_eq!(from_f32(f32::MAX), 0x7F80);
        assert_eq!(from_f32(f32::from_bits(0x7F7F_7FFF)), 0x7F7F);
        for b in [0x0001u16, 0x3F80, 0x4049, 0xC2F7, 0x7F7F] {
            assert_eq!(from_f32(to_f32(b)), b);
        }
    }
}
