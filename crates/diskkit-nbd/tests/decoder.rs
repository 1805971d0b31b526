//! Property tests of the protocol engine: arbitrary client bytes never panic it, and random
//! request sequences are answered once each, in order here, with the errors the specification
//! asks for and the data a flat model of the disk predicts.

use diskkit_nbd::fuzzing::session_output;
use diskkit_nbd::request::Header;
use proptest::prelude::*;

const SIZE: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, data: Vec<u8>, flags: u16 },
    Read { off: u64, len: u32, flags: u16 },
    Trim { off: u64, len: u32 },
    Zero { off: u64, len: u32, flags: u16 },
    Flush,
    Cache { off: u64, len: u32 },
    Status { off: u64, len: u32, flags: u16 },
    Unknown { typ: u16 },
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..SIZE,
        Just(SIZE),
        (SIZE - 4096)..(SIZE + 4096),
        Just(u64::MAX - 10)
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let flags = prop_oneof![Just(0u16), Just(1u16), 0u16..64];
    prop_oneof![
        (
            offset(),
            proptest::collection::vec(any::<u8>(), 0..9000),
            flags.clone()
        )
            .prop_map(|(off, data, flags)| Op::Write { off, data, flags }),
        (offset(), 0u32..70_000, flags.clone()).prop_map(|(off, len, flags)| Op::Read { off, len, flags }),
        (offset(), 0u32..300_000).prop_map(|(off, len)| Op::Trim { off, len }),
        (offset(), 0u32..300_000, flags.clone()).prop_map(|(off, len, flags)| Op::Zero { off, len, flags }),
        Just(Op::Flush),
        (offset(), 0u32..70_000).prop_map(|(off, len)| Op::Cache { off, len }),
        (offset(), 0u32..(2 << 20), flags).prop_map(|(off, len, flags)| Op::Status { off, len, flags }),
        (8u16..300).prop_map(|typ| Op::Unknown { typ }),
    ]
}

fn in_range(off: u64, len: u32) -> bool {
    off.checked_add(u64::from(len)).is_some_and(|e| e <= SIZE)
}

/// The specification's answer for a request, and the model's update.
fn expect(op: &Op, model: &mut [u8]) -> u32 {
    const EINVAL: u32 = 22;
    const ENOSPC: u32 = 28;
    let bad = |flags: u16, allowed: u16| flags & !allowed != 0;
    match op {
        Op::Write { off, data, flags } => {
            if bad(*flags, 1) {
                return EINVAL;
            }
            if !in_range(*off, data.len() as u32) {
                return ENOSPC;
            }
            model[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            0
        }
        Op::Read { off, len, flags } => {
            if bad(*flags, 1 | 4) || !in_range(*off, *len) {
                EINVAL
            } else {
                0
            }
        }
        Op::Trim { off, len } | Op::Cache { off, len } => {
            if !in_range(*off, *len) {
                return EINVAL;
            }
            if matches!(op, Op::Trim { .. }) {
                model[*off as usize..(*off + u64::from(*len)) as usize].fill(0);
            }
            0
        }
        Op::Zero { off, len, flags } => {
            if bad(*flags, 1 | 2 | 16) {
                return EINVAL;
            }
            if !in_range(*off, *len) {
                return ENOSPC;
            }
            model[*off as usize..(*off + u64::from(*len)) as usize].fill(0);
            0
        }
        Op::Flush => 0,
        Op::Status { off, len, flags } => {
            if bad(*flags, 1 | 8) || *len == 0 || !in_range(*off, *len) {
                EINVAL
            } else {
                0
            }
        }
        Op::Unknown { .. } => EINVAL,
    }
}

fn encode(ops: &[Op]) -> Vec<u8> {
    // Transmission only, structured replies, both metadata contexts.
    let mut b = vec![0x0f];
    for (i, op) in ops.iter().enumerate() {
        let cookie = i as u64 + 1;
        let (typ, flags, offset, length, payload): (u16, u16, u64, u32, &[u8]) = match op {
            Op::Write { off, data, flags } => (1, *flags, *off, data.len() as u32, data),
            Op::Read { off, len, flags } => (0, *flags, *off, *len, &[]),
            Op::Trim { off, len } => (4, 0, *off, *len, &[]),
            Op::Zero { off, len, flags } => (6, *flags, *off, *len, &[]),
            Op::Flush => (3, 0, 0, 0, &[]),
            Op::Cache { off, len } => (5, 0, *off, *len, &[]),
            Op::Status { off, len, flags } => (7, *flags, *off, *len, &[]),
            Op::Unknown { typ } => (*typ, 0, 0, 0, &[]),
        };
        let h = Header {
            flags,
            typ,
            cookie,
            offset,
            length,
        };
        b.extend_from_slice(&h.encode());
        b.extend_from_slice(payload);
    }
    b
}

/// One parsed reply: cookie, error, and for reads the bytes reassembled from the chunks.
#[derive(Debug)]
struct Reply {
    cookie: u64,
    error: u32,
    data: Vec<(u64, Vec<u8>)>,
    status_chunks: usize,
}

fn parse(mut b: &[u8]) -> Vec<Reply> {
    let u32_at = |b: &[u8], i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap());
    let u64_at = |b: &[u8], i: usize| u64::from_be_bytes(b[i..i + 8].try_into().unwrap());
    let mut out = Vec::new();
    let mut cur: Option<Reply> = None;
    while !b.is_empty() {
        match u32_at(b, 0) {
            0x6744_6698 => {
                assert!(cur.is_none(), "simple reply inside a structured one");
                out.push(Reply {
                    cookie: u64_at(b, 8),
                    error: u32_at(b, 4),
                    data: Vec::new(),
                    status_chunks: 0,
                });
                b = &b[16..];
            }
            0x668e_33ef => {
                let flags = u16::from_be_bytes([b[4], b[5]]);
                let typ = u16::from_be_bytes([b[6], b[7]]);
                let cookie = u64_at(b, 8);
                let len = u32_at(b, 16) as usize;
                let p = &b[20..20 + len];
                let r = cur.get_or_insert_with(|| Reply {
                    cookie,
                    error: 0,
                    data: Vec::new(),
                    status_chunks: 0,
                });
                assert_eq!(r.cookie, cookie, "chunks of two replies interleaved");
                match typ {
                    0 => assert_eq!(len, 0),
                    1 => r.data.push((u64_at(p, 0), p[8..].to_vec())),
                    2 => r.data.push((u64_at(p, 0), vec![0; u32_at(p, 8) as usize])),
                    5 => {
                        r.status_chunks += 1;
                        assert_eq!((len - 4) % 8, 0);
                        assert!(len > 4, "at least one extent");
                    }
                    t if t & 0x8000 != 0 => r.error = u32_at(p, 0),
                    t => panic!("unknown chunk type {t}"),
                }
                if flags & 1 != 0 {
                    out.push(cur.take().unwrap());
                }
                b = &b[20 + len..];
            }
            m => panic!("bad reply magic {m:#x}"),
        }
    }
    assert!(cur.is_none(), "reply without DONE");
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, .. ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = session_output(&data);
    }

    #[test]
    fn handshake_prefix_then_garbage(tail in proptest::collection::vec(any::<u8>(), 0..512), flags in 0u32..8) {
        let mut data = vec![0u8];
        data.extend_from_slice(&flags.to_be_bytes());
        data.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        data.extend_from_slice(&tail);
        let out = session_output(&data);
        prop_assert_eq!(&out[..8], b"NBDMAGIC");
    }

    #[test]
    fn requests_match_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let mut model = vec![0u8; SIZE as usize];
        let replies = parse(&session_output(&encode(&ops)));
        prop_assert_eq!(replies.len(), ops.len());
        for (i, (op, r)) in ops.iter().zip(&replies).enumerate() {
            prop_assert_eq!(r.cookie, i as u64 + 1);
            let want = expect(op, &mut model);
            prop_assert_eq!(r.error, want, "op {:?}", op);
            if let (Op::Read { off, len, flags }, 0) = (op, want) {
                let mut got = vec![0xeeu8; *len as usize];
                let mut covered = 0;
                for (o, d) in &r.data {
                    let s = (o - off) as usize;
                    got[s..s + d.len()].copy_from_slice(d);
                    covered += d.len();
                }
                prop_assert_eq!(covered, *len as usize);
                if flags & 4 != 0 && *len > 0 {
                    prop_assert_eq!(r.data.len(), 1, "DF: one chunk");
                }
                prop_assert!(got[..] == model[*off as usize..*off as usize + *len as usize]);
            }
            if let (Op::Status { .. }, 0) = (op, want) {
                prop_assert_eq!(r.status_chunks, 2);
            }
        }
    }
}
