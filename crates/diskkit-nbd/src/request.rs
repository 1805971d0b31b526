//! Transmission-phase requests: decoding and validation, free of I/O so they can be fuzzed.

use crate::proto::*;

/// Size of a (compact) request header.
pub const HEADER_LEN: usize = 28;

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub typ: u16,
    /// Opaque cookie, echoed in the reply.
    pub cookie: u64,
    /// Offset into the export.
    pub offset: u64,
    /// Length of the operation (and of the payload for WRITE).
    pub length: u32,
}

impl Header {
    /// Decode a header; `None` if the magic is wrong (the stream cannot be resynchronised).
    pub fn parse(b: &[u8; HEADER_LEN]) -> Option<Header> {
        let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
        if u32_at(0) != REQUEST_MAGIC {
            return None;
        }
        Some(Header {
            flags: u16_at(4),
            typ: u16_at(6),
            cookie: u64_at(8),
            offset: u64_at(16),
            length: u32_at(24),
        })
    }

    /// Encode (used by tests and the fuzz harness).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = Buf::with_capacity(HEADER_LEN);
        b.u32(REQUEST_MAGIC)
            .u16(self.flags)
            .u16(self.typ)
            .u64(self.cookie)
            .u64(self.offset)
            .u32(self.length);
        let mut out = [0u8; HEADER_LEN];
        out.copy_from_slice(&b.0);
        out
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.typ == CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

/// What an export allows, for [`validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Export size in bytes.
    pub size: u64,
    /// Writes are allowed.
    pub writable: bool,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// At least one metadata context is selected.
    pub has_contexts: bool,
}

/// Check a request against the protocol and the export before doing any I/O. Returns the
/// NBD error to reply with, following the specification: unknown commands and flags EINVAL,
/// writes to a read-only export EPERM, writes past the end ENOSPC, other accesses past the
/// end EINVAL, payloads over 32 MiB EINVAL.
pub fn validate(h: &Header, l: &Limits) -> Result<(), u32> {
    let allowed = match h.typ {
        CMD_READ => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE | CMD_DISC => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => return Err(EINVAL),
    };
    if h.flags & !allowed != 0 {
        return Err(EINVAL);
    }
    if h.flags & CMD_FLAG_DF != 0 && !l.structured {
        return Err(EINVAL);
    }
    let writes = matches!(h.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && !l.writable {
        return Err(EPERM);
    }
    if matches!(h.typ, CMD_READ | CMD_WRITE) && h.length > MAX_PAYLOAD {
        return Err(EINVAL);
    }
    if h.typ == CMD_BLOCK_STATUS && (!l.structured || !l.has_contexts || h.length == 0) {
        return Err(EINVAL);
    }
    if matches!(h.typ, CMD_FLUSH | CMD_DISC) {
        return Ok(());
    }
    let past_end = match h.offset.checked_add(u64::from(h.length)) {
        Some(end) => end > l.size,
        None => true,
    };
    if past_end {
        return Err(if matches!(h.typ, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(typ: u16, flags: u16, offset: u64, length: u32) -> Header {
        Header {
            flags,
            typ,
            cookie: 0xfeed,
            offset,
            length,
        }
    }

    const RW: Limits = Limits {
        size: 1 << 20,
        writable: true,
        structured: true,
        has_contexts: true,
    };

    #[test]
    fn header_round_trips() {
        let x = h(CMD_WRITE, CMD_FLAG_FUA, 0x1234_5678_9abc, 4096);
        assert_eq!(Header::parse(&x.encode()), Some(x));
        let mut bad = x.encode();
        bad[0] ^= 1;
        assert_eq!(Header::parse(&bad), None);
    }

    #[test]
    fn errors_follow_the_specification() {
        assert_eq!(validate(&h(CMD_READ, 0, 1 << 20, 1), &RW), Err(EINVAL));
        assert_eq!(validate(&h(CMD_WRITE, 0, 1 << 20, 1), &RW), Err(ENOSPC));
        assert_eq!(validate(&h(CMD_WRITE_ZEROES, 0, u64::MAX, 2), &RW), Err(ENOSPC));
        assert_eq!(validate(&h(CMD_TRIM, 0, 1 << 20, 1), &RW), Err(EINVAL));
        assert_eq!(validate(&h(CMD_READ, CMD_FLAG_NO_HOLE, 0, 1), &RW), Err(EINVAL));
        assert_eq!(validate(&h(99, 0, 0, 1), &RW), Err(EINVAL));
        assert_eq!(validate(&h(CMD_READ, 0, 0, MAX_PAYLOAD + 1), &RW), Err(EINVAL));
        let ro = Limits {
            writable: false,
            ..RW
        };
        assert_eq!(validate(&h(CMD_WRITE, 0, 0, 1), &ro), Err(EPERM));
        assert_eq!(validate(&h(CMD_TRIM, 0, 0, 1), &ro), Err(EPERM));
        let simple = Limits {
            structured: false,
            ..RW
        };
        assert_eq!(validate(&h(CMD_READ, CMD_FLAG_DF, 0, 1), &simple), Err(EINVAL));
        assert_eq!(validate(&h(CMD_BLOCK_STATUS, 0, 0, 1), &simple), Err(EINVAL));
    }

    #[test]
    fn accepted_requests() {
        assert_eq!(validate(&h(CMD_READ, 0, 0, 0), &RW), Ok(()));
        assert_eq!(validate(&h(CMD_WRITE, 0, 1 << 20, 0), &RW), Ok(()));
        assert_eq!(validate(&h(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), &RW), Ok(()));
        let big = Limits { size: 8 << 30, ..RW };
        assert_eq!(validate(&h(CMD_TRIM, 0, 0, u32::MAX), &big), Ok(()));
        assert_eq!(
            validate(
                &h(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                    0,
                    u32::MAX
                ),
                &big
            ),
            Ok(())
        );
        assert_eq!(
            validate(&h(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 512), &RW),
            Ok(())
        );
    }
}
