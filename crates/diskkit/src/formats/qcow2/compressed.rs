//! Compressed clusters: raw deflate (QEMU's "zlib") and zstd.
//!
//! A compressed cluster is stored as a byte stream starting at any byte offset, padded to a
//! 512-byte sector; it always decompresses to one whole cluster.

use std::io::Read;

use super::header::CompressionType;
use crate::error::{Error, Result};

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
            .map_err(|s| Error::corrupt(format!("qcow2 compressed cluster does not inflate ({s:?})")))?;
            if n != out.len() {
                return Err(Error::corrupt(format!(
                    "qcow2 compressed cluster inflates to {n} bytes, not {}",
                    out.len()
                )));
            }
        }
        CompressionType::Zstd => {
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
    fn stored_deflate_block_inflates() {
        // A single stored (uncompressed) final deflate block holding 4 bytes, then padding.
        let input = [0x01, 0x04, 0x00, 0xfb, 0xff, 1, 2, 3, 4, 0, 0, 0];
        let mut out = [0u8; 4];
        decompress(CompressionType::Zlib, &input, &mut out).unwrap();
        assert_eq!(out, [1, 2, 3, 4]);
    }
}
