//! Replays the fuzz corpus (`fuzz/corpus/nbd_session/`) through the fuzz entry point, and
//! checks what the server answered to a hand-made seed.

use std::path::Path;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/nbd_session");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        out.push((name, std::fs::read(&path).unwrap()));
    }
    assert!(!out.is_empty(), "empty corpus in {}", dir.display());
    out
}

#[test]
fn nbd_session_corpus() {
    for (_, data) in corpus() {
        diskkit_nbd::fuzzing::session(&data);
    }
}

/// (cookie, error) of each finished reply in a transmission reply stream: simple replies and
/// the structured chunks carrying the DONE flag. Simple replies to READs carry data, so this
/// only parses streams where reads used structured replies.
pub fn reply_cookies(mut b: &[u8]) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        assert!(b.len() >= 16, "truncated reply");
        let magic = u32::from_be_bytes(b[..4].try_into().unwrap());
        if magic == 0x6744_6698 {
            let err = u32::from_be_bytes(b[4..8].try_into().unwrap());
            out.push((u64::from_be_bytes(b[8..16].try_into().unwrap()), err));
            b = &b[16..];
        } else if magic == 0x668e_33ef {
            let flags = u16::from_be_bytes([b[4], b[5]]);
            let typ = u16::from_be_bytes([b[6], b[7]]);
            let cookie = u64::from_be_bytes(b[8..16].try_into().unwrap());
            let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
            let err = if typ & 0x8000 != 0 {
                u32::from_be_bytes(b[20..24].try_into().unwrap())
            } else {
                0
            };
            if flags & 1 != 0 {
                out.push((cookie, err));
            }
            b = &b[20 + len..];
        } else {
            panic!("bad reply magic {magic:#x}");
        }
    }
    out
}

#[test]
fn structured_seed_answers_every_request_in_order() {
    // The seed (made with structured replies and both contexts) sends: write, unaligned write,
    // read, DF read, block status, block status REQ_ONE, trim, write zeroes NO_HOLE, write
    // zeroes FAST_ZERO, flush, cache, unknown command 42, read past the end, write past the
    // end, zero-length read, then DISC.
    let data = corpus()
        .into_iter()
        .find(|(n, _)| n == "requests-structured")
        .unwrap()
        .1;
    let out = diskkit_nbd::fuzzing::session_output(&data);
    let got = reply_cookies(&out);
    let mut want: Vec<(u64, u32)> = (1..=11).map(|c| (c, 0)).collect();
    want.extend([(12, 22), (13, 22), (14, 28), (15, 0)]);
    assert_eq!(got, want);
}
