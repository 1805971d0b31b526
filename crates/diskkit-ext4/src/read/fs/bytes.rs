//! Little- and big-endian field access that never panics: a field that does not fit in the
//! slice reads as zero. Parsers check a structure's length before reading its fields, so the
//! fallback only guards against mistakes, never against hostile input.

fn arr<const N: usize>(b: &[u8], off: usize) -> [u8; N] {
    off.checked_add(N)
        .and_then(|end| b.get(off..end))
        .and_then(|s| <[u8; N]>::try_from(s).ok())
        .unwrap_or([0; N])
}

pub(crate) fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(arr(b, off))
}

pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(arr(b, off))
}

pub(crate) fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes(arr(b, off))
}

pub(crate) fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(arr(b, off))
}

pub(crate) fn be64(b: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(arr(b, off))
}

/// `lo | hi << 32`.
pub(crate) fn hilo(lo: u32, hi: u32) -> u64 {
    u64::from(lo) | (u64::from(hi) << 32)
}

/// `b[off..off + len]`, or `None` when it does not fit.
pub(crate) fn slice(b: &[u8], off: usize, len: usize) -> Option<&[u8]> {
    b.get(off..off.checked_add(len)?)
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_reads_zero() {
        let b = [1u8, 2, 3];
        assert_eq!(le16(&b, 1), 0x0302);
        assert_eq!(le16(&b, 2), 0);
        assert_eq!(le32(&b, usize::MAX), 0);
        assert_eq!(slice(&b, 1, 2), Some(&b[1..3]));
        assert_eq!(slice(&b, usize::MAX, 2), None);
    }
}
