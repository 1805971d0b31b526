//! Compressed clusters: raw deflate (QEMU's "zlib") and zstd.
//!
//! A compressed cluster is stored as a byte stream starting at any byte offset, padded to a
//! 512-byte sector; it always decompresses to one whole cluster.

use std::io::Read;

use super::header::CompressionType;
use crate::error::{Error, Result};

/// The largest zstd window accepted: a cluster is at most 2 MiB, so QEMU never needs more;
/// hostile frames could otherwise make the decoder reserve up to 100 MiB per read.
const MAX_ZSTD_WINDOW: u64 = 8 << 20;

/// The window size a zstd frame header asks for (RFC 8878, 3.1.1.1).
fn zstd_window(input: &[u8]) -> Result<u64> {
    let bad = || Error::corrupt("qcow2 zstd cluster has a bad frame header");
    if input.len() < 6 || input[..4] != [0x28, 0xb5, 0x2f, 0xfd] {
        return Err(bad());
    }
    let fhd = input[4];
    let single_segment = fhd & 0x20 != 0;
    if !single_segment {
        let wd = input[5];
        let base = 1u64 << (10 + u32::from(wd >> 3));
        return Ok(base + base / 8 * u64::from(wd & 7));
    }
    // Single segment: the window is the frame content size, after the dictionary ID.
    let dict_len = [0usize, 1, 2, 4][usize::from(fhd & 3)];
    let fcs_len = [1usize, 2, 4, 8][usize::from(fhd >> 6)];
    let start = 5 + dict_len;
    let field = input.get(start..start + fcs_len).ok_or_else(bad)?;
    let mut v = 0u64;
    for (i, &b) in field.iter().enumerate() {
        v |= u64::from(b) << (8 * i);
    }
    Ok(if fcs_len == 2 { v + 256 } else { v })
}

/// Decompress `input` (which may carry trailing padding) into `out`, exactly one cluster.
pub(super) fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Zlib => {
            let n = miniz_oxide::inflate::decompress_slice_iter_to_slice(
                out,
                std::iter::once(input),
                false,
                true,
            )
            .map_err(|_| Error::corrupt("qcow2 compressed cluster is not a valid deflate stream"))?;
            if n != out.len() {
                return Err(Error::corrupt(format!(
                    "qcow2 compressed cluster inflates to {n} bytes, not {}",
                    out.len()
                )));
            }
        }
        CompressionType::Zstd => {
            let window = zstd_window(input)?;
            if window > MAX_ZSTD_WINDOW {
                return Err(Error::corrupt(format!(
                    "qcow2 zstd cluster asks for a {window}-byte window (at most {MAX_ZSTD_WINDOW})"
                )));
            }
            let mut dec = ruzstd::decoding::StreamingDecoder::new(input)
                .map_err(|e| Error::corrupt("qcow2 zstd cluster has a bad frame header").with_source(e))?;
            dec.read_exact(out).map_err(|e| {
                Error::corrupt("qcow2 zstd cluster does not decompress to a whole cluster").with_source(e)
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut out = vec![0u8; 4096];
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            assert!(decompress(kind, &[0xff; 100], &mut out).is_err());
            assert!(decompress(kind, &[], &mut out).is_err());
        }
    }

    #[test]
    fn zstd_window_is_bounded() {
        // Window descriptor exponent 30: a 1 GiB window.
        let frame = [0x28, 0xb5, 0x2f, 0xfd, 0x00, 30 << 3, 0, 0];
        let mut out = vec![0u8; 512];
        let e = decompress(CompressionType::Zstd, &frame, &mut out).unwrap_err();
        assert!(e.to_string().contains("window"), "{e}");
    }

    #[test]
    fn stored_deflate_block_inflates() {
        // A single stored (uncompressed) final deflate block holding 4 bytes, then padding.
        let input = [0x01, 0x04, 0x00, 0xfb, 0xff, 1, 2, 3, 4, 0, 0, 0];
        let mut out = [0u8; 4];
        decompress(CompressionType::Zlib, &input, &mut out).unwrap();
        assert_eq!(out, [1, 2, 3, 4]);
    }
}
