//! The NBD test matrix of the field notes (rows 1-18 and 20), run against `diskkit serve` with
//! real clients: nbdinfo, nbdsh, nbdcopy (libnbd), qemu-img, qemu-io, qemu-nbd -L. Expected
//! outputs are the reference results recorded against qemu-nbd 7.2 and nbdkit 1.32.

mod nbd_support;
mod support;

use nbd_support::*;
use support::{diskkit_ok, Dir};

/// The standard setup: 64 MiB RAW with data at [0,1M) and [8M,9M), export 'disk', described.
fn serve_small(d: &Dir, extra: &[&str]) -> (Served, Vec<u8>) {
    let img = d.path("small.raw");
    let data = small_raw(&img, 7);
    let mut args = vec!["-f", "raw", "--export", "disk", "--description", "test disk"];
    args.extend_from_slice(extra);
    let img = img.to_str().unwrap().to_owned();
    args.push(&img);
    (Served::start(&d.path("x.sock"), &args), data)
}

fn serve_small_logged(d: &Dir) -> (Served, std::path::PathBuf) {
    let img = d.path("small.raw");
    small_raw(&img, 7);
    let log = d.path("server.log");
    let s = Served::start_logged(
        &d.path("x.sock"),
        &["-f", "raw", "--export", "disk", img.to_str().unwrap()],
        &log,
    );
    (s, log)
}

fn log_lines(log: &std::path::Path, cmd: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter(|l| l.contains(&format!(": {cmd} ")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn row01_02_nbdinfo_and_list() {
    let d = Dir::new();
    let (s, _) = serve_small(&d, &[]);
    let u = s.uri("disk");
    let out = client_ok("nbdinfo", &[&u]);
    for want in [
        "protocol: newstyle-fixed without TLS, using structured packets",
        "base:allocation",
        "qemu:allocation-depth",
        "block_size_minimum: 1",
        "block_size_preferred: 4096",
        "block_size_maximum: 33554432",
        "export-size: 67108864 (64M)",
    ] {
        assert!(out.contains(want), "nbdinfo lacks {want:?}:\n{out}");
    }
    let out = client_ok("nbdinfo", &["--list", &u]);
    assert!(out.contains("export=\"disk\":"), "{out}");
    assert!(out.contains("description: test disk"), "{out}");
    let out = client_ok("qemu-nbd", &["-L", "-k", s.sock.to_str().unwrap()]);
    for want in [
        "export: 'disk'",
        "description: test disk",
        "flags: 0xded ( flush fua trim zeroes df multi cache fast-zero )",
        "min block: 1",
        "opt block: 4096",
        "max block: 33554432",
        "base:allocation",
    ] {
        assert!(out.contains(want), "qemu-nbd -L lacks {want:?}:\n{out}");
    }
}

#[test]
fn row03_option_corner_cases_and_export_name() {
    let d = Dir::new();
    let (s, _) = serve_small(&d, &[]);
    let mut c = RawClient::connect(&s.sock, 3);
    assert_eq!(c.opt(0x1234, b"junk")[0].0, REP_ERR_UNSUP);
    assert_eq!(c.opt(11, &[])[0].0, REP_ERR_UNSUP, "EXTENDED_HEADERS");
    assert_eq!(c.opt(8, b"x")[0].0, REP_ERR_INVALID, "STRUCTURED_REPLY with data");
    assert_eq!(c.opt(3, b"x")[0].0, REP_ERR_INVALID, "LIST with data");
    let list = c.opt(3, &[]);
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].0, REP_SERVER);
    assert_eq!(&list[0].1[..4], &4u32.to_be_bytes());
    assert_eq!(&list[0].1[4..], b"disktest disk");
    assert_eq!(list[1].0, REP_ACK);
    assert_eq!(c.opt(6, &info_request("nope", &[]))[0].0, REP_ERR_UNKNOWN);
    assert_eq!(
        c.opt(6, &[0, 0, 0, 9, b'x'])[0].0,
        REP_ERR_INVALID,
        "truncated INFO"
    );
    let info = c.opt(6, &info_request("disk", &[1, 2, 3]));
    let mut seen = Vec::new();
    for (typ, data) in &info[..info.len() - 1] {
        assert_eq!(*typ, REP_INFO);
        let item = u16::from_be_bytes([data[0], data[1]]);
        seen.push(item);
        match item {
            0 => {
                assert_eq!(u64::from_be_bytes(data[2..10].try_into().unwrap()), 64 << 20);
                assert_eq!(
                    u16::from_be_bytes([data[10], data[11]]),
                    0xd6d,
                    "tflags without SR"
                );
            }
            1 => assert_eq!(&data[2..], b"disk"),
            2 => assert_eq!(&data[2..], b"test disk"),
            3 => {
                let v: Vec<u32> = data[2..]
                    .chunks(4)
                    .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
                    .collect();
                assert_eq!(v, [1, 4096, 33554432]);
            }
            other => panic!("unexpected info {other}"),
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, [0, 1, 2, 3]);
    assert_eq!(info.last().unwrap().0, REP_ACK);
    assert_eq!(c.opt(2, &[]), vec![(REP_ACK, vec![])], "ABORT");

    // EXPORT_NAME with NO_ZEROES: 10 bytes, then a simple-reply READ echoing the cookie.
    let mut c = RawClient::connect(&s.sock, 3);
    c.send_opt(1, b"disk");
    let r = c.recv(10);
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), 64 << 20);
    assert_eq!(u16::from_be_bytes([r[8], r[9]]), 0xd6d);
    c.request(0, 0, 0xc0ffee, 0, 512);
    assert_eq!(c.simple_reply(), (0, 0xc0ffee));
    assert_eq!(c.recv(512).len(), 512);
    // Without NO_ZEROES the 124 zero bytes follow.
    let mut c = RawClient::connect(&s.sock, 1);
    c.send_opt(1, b"disk");
    let r = c.recv(134);
    assert!(r[10..].iter().all(|&b| b == 0));
    // An unknown name in EXPORT_NAME can only be answered by closing.
    let mut c = RawClient::connect(&s.sock, 3);
    c.send_opt(1, b"nope");
    let mut b = [0u8; 1];
    assert_eq!(std::io::Read::read(&mut c.s, &mut b).unwrap_or(0), 0);
}

#[test]
fn row04_05_export_name_only_and_simple_replies() {
    let d = Dir::new();
    let (s, data) = serve_small(&d, &[]);
    let u = s.uri("disk");
    let out = client_ok(
        "nbdsh",
        &[
            "-n",
            "-c",
            &format!("h=nbd.NBD(); h.set_handshake_flags(0); h.connect_uri('{u}'); print(h.get_protocol(), h.get_size())"),
        ],
    );
    assert_eq!(out.trim(), "newstyle 67108864");
    let out = client_ok(
        "nbdsh",
        &[
            "-n",
            "-c",
            &format!(
                "h=nbd.NBD(); h.set_request_structured_replies(False); h.connect_uri('{u}'); \
                 b=h.pread(1<<20,0); print(h.get_structured_replies_negotiated(), h.can_df(), len(b)); \
                 import sys; sys.stdout.flush(); open('{}','wb').write(b)",
                d.s("first.bin")
            ),
        ],
    );
    assert_eq!(out.trim(), "False False 1048576");
    assert_eq!(std::fs::read(d.path("first.bin")).unwrap(), &data[..1 << 20]);
}

#[test]
fn row06_transmission_flags() {
    let d = Dir::new();
    let (s, _) = serve_small(&d, &[]);
    let u = s.uri("disk");
    for c in [
        "connect",
        "read",
        "write",
        "flush",
        "fua",
        "trim",
        "zero",
        "fast-zero",
        "df",
        "cache",
        "multi-conn",
        "structured-reply",
    ] {
        let out = client("nbdinfo", &["--can", c, &u]);
        assert_eq!(out.status.code(), Some(0), "nbdinfo --can {c}");
    }
    let out = client("nbdinfo", &["--is", "read-only", &u]);
    assert_eq!(out.status.code(), Some(2), "not read-only");
}

#[test]
fn row07_read_integrity() {
    let d = Dir::new();
    let (s, _) = serve_small(&d, &[]);
    let u = s.uri("disk");
    let img = d.s("small.raw");
    let out = client_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", &img, &u]);
    assert!(out.contains("Images are identical."), "{out}");
    let copy = d.s("copy.raw");
    client_ok("nbdcopy", &[&u, &copy]);
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&img).unwrap());
    let out = client_ok("qemu-img", &["info", &u]);
    assert!(out.contains("virtual size: 64 MiB (67108864 bytes)"), "{out}");
}

#[test]
fn row08_to_13_writes_fua_flush_zeroes_trim() {
    let d = Dir::new();
    let (s, log) = serve_small_logged(&d);
    let u = s.uri("disk");
    // Row 8: WRITE + verified READ.
    let out = client_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 2M 64k",
            "-c",
            "read -P 0xab 2M 64k",
            &u,
        ],
    );
    assert!(out.contains("wrote 65536/65536 bytes at offset 2097152"), "{out}");
    assert!(out.contains("read 65536/65536 bytes at offset 2097152"), "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // Row 9: FUA only on the second write with -t writeback.
    let before = log_lines(&log, "WRITE").len();
    client_ok(
        "qemu-io",
        &[
            "-t",
            "writeback",
            "-f",
            "raw",
            "-c",
            "write -P 1 256k 4k",
            "-c",
            "write -f -P 1 256k 4k",
            &u,
        ],
    );
    let writes = log_lines(&log, "WRITE");
    let new: Vec<_> = writes[before..]
        .iter()
        .filter(|l| l.contains("offset=262144"))
        .collect();
    assert_eq!(new.len(), 2, "{new:?}");
    assert!(new[0].contains("flags=[]"), "{}", new[0]);
    assert!(new[1].contains("flags=[FUA]"), "{}", new[1]);
    // Row 10: FLUSH.
    client_ok("qemu-io", &["-f", "raw", "-c", "flush", &u]);
    assert!(!log_lines(&log, "FLUSH").is_empty());
    // Row 11: WRITE_ZEROES with NO_HOLE (write -z), then without (write -z -u); reads zeroes.
    let out = client_ok(
        "qemu-io",
        &[
            "-t",
            "writeback",
            "-f",
            "raw",
            "-c",
            "write -z 0 64k",
            "-c",
            "write -z -u 64k 64k",
            "-c",
            "read -P 0 0 128k",
            &u,
        ],
    );
    assert!(out.contains("read 131072/131072 bytes at offset 0"), "{out}");
    let zeroes = log_lines(&log, "WRITE_ZEROES");
    assert!(
        zeroes
            .iter()
            .any(|l| l.contains("offset=0 ") && l.contains("NO_HOLE")),
        "{zeroes:?}"
    );
    assert!(
        zeroes
            .iter()
            .any(|l| l.contains("offset=65536 ") && !l.contains("NO_HOLE")),
        "{zeroes:?}"
    );
    // Row 12: FAST_ZERO is advertised and honoured.
    let out = client_ok("qemu-io", &["-f", "raw", "-c", "write -z -n 4M 1M", &u]);
    assert!(
        out.contains("wrote 1048576/1048576 bytes at offset 4194304"),
        "{out}"
    );
    assert!(log_lines(&log, "WRITE_ZEROES")
        .iter()
        .any(|l| l.contains("FAST_ZERO") && l.contains("error=0")));
    // Row 13: TRIM; the range maps as a hole afterwards.
    let out = client_ok("qemu-io", &["-f", "raw", "-c", "discard 2M 1M", &u]);
    assert!(
        out.contains("discard 1048576/1048576 bytes at offset 2097152"),
        "{out}"
    );
    let map = client_ok("nbdinfo", &["--map", &u]);
    assert!(map.contains("   1048576     7340032    3  hole,zero"), "{map}");
    let out = client_ok("qemu-io", &["-f", "raw", "-c", "read -P 0 2M 1M", &u]);
    assert!(out.contains("read 1048576/1048576"), "{out}");
}

#[test]
fn row14_block_status_maps() {
    let d = Dir::new();
    let (s, _) = serve_small(&d, &[]);
    let u = s.uri("disk");
    let map = client_ok("nbdinfo", &["--map", &u]);
    let want = "         0     1048576    0  data\n   1048576     7340032    3  hole,zero\n   8388608     1048576    0  data\n   9437184    57671680    3  hole,zero\n";
    assert_eq!(map, want);
    // Asked again (and with the other context selected too) it must not change.
    assert_eq!(client_ok("nbdinfo", &["--map", &u]), want);
    let json = client_ok("qemu-img", &["map", "--output=json", "-f", "raw", &u]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let got: Vec<(u64, u64, bool, bool)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
                e["zero"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (0, 1 << 20, true, false),
            (1 << 20, 7 << 20, false, true),
            (8 << 20, 1 << 20, true, false),
            (9 << 20, 55 << 20, false, true)
        ]
    );
}

const PROBE: &str = r#"
import nbd, sys
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
print("proto", h.get_protocol(), "sr", h.get_structured_replies_negotiated())
h.cache(1048576, 0); print("cache ok")
chunks = []
def ccb(sub, off, st, err):
    chunks.append((off, len(sub), st)); return 0
h.pread_structured(65536, 65536, ccb, nbd.CMD_FLAG_DF); print("df", chunks)
chunks.clear(); h.pread_structured(1048576, 1048576 - 65536, ccb); print("nondf", chunks)
def cb(meta, off, ents, err):
    print("bs", meta, off, list(ents)); return 0
h.block_status(64*1024*1024, 0, cb)
h.block_status(64*1024*1024, 0, cb, nbd.CMD_FLAG_REQ_ONE)
h.zero(65536, 4 << 20, nbd.CMD_FLAG_FAST_ZERO); print("fast zero ok")
h.pwrite(b"x"*4096, 4 << 20, nbd.CMD_FLAG_FUA); print("fua write ok")
h.flush(); h.trim(4096, 4 << 20); print("flush trim ok")
h.set_strict_mode(0)
for name, fn in [("read past end", lambda: h.pread(4096, h.get_size())),
                 ("write past end", lambda: h.pwrite(b"y"*4096, h.get_size())),
                 ("zero past end", lambda: h.zero(4096, h.get_size())),
                 ("trim past end", lambda: h.trim(4096, h.get_size())),
                 ("unknown flag", lambda: h.pread(512, 0, 1<<7)),
                 ("bs length 0", lambda: h.block_status(0, 0, cb)),
                 ]:
    try:
        fn(); print(name, "-> ok?!")
    except nbd.Error as e: print(name, "->", e.errno)
print("still", len(h.pread(512, 0)))
"#;

#[test]
fn row15_req_one_df_cache_holes_errors() {
    let d = Dir::new();
    let (s, _) = serve_small(&d, &[]);
    let out = python(PROBE, &[&s.uri("disk")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    let want = [
        "proto newstyle-fixed sr True",
        "cache ok",
        "df [(65536, 65536, 1)]",
        // A read over [960K, 1M+960K): data then a hole chunk (2).
        "nondf [(983040, 65536, 1), (1048576, 983040, 2)]",
        "bs base:allocation 0 [1048576, 0, 7340032, 3, 1048576, 0, 57671680, 3]",
        "bs base:allocation 0 [1048576, 0]",
        "fast zero ok",
        "fua write ok",
        "flush trim ok",
        "read past end -> EINVAL",
        "write past end -> ENOSPC",
        "zero past end -> ENOSPC",
        "trim past end -> EINVAL",
        "unknown flag -> EINVAL",
        "bs length 0 -> EINVAL",
        "still 512",
    ];
    assert_eq!(lines, want);
}

#[test]
fn row16_read_only_exports() {
    let d = Dir::new();
    let (s, _) = serve_small(&d, &["--read-only"]);
    let u = s.uri("disk");
    assert_eq!(
        client("nbdinfo", &["--is", "read-only", &u]).status.code(),
        Some(0)
    );
    let out = client("qemu-io", &["-f", "raw", "-c", "write 0 4k", &u]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        err.contains("Permission denied") || err.contains("read-only"),
        "{err}"
    );
    let out = python(
        "import nbd,sys\nh=nbd.NBD(); h.connect_uri(sys.argv[1]); h.set_strict_mode(0)\n\
         for f in (lambda: h.pwrite(b'x'*512, 0), lambda: h.trim(512, 0), lambda: h.zero(512, 0)):\n\
         \x20   try:\n\x20       f(); print('ok?!')\n\x20   except nbd.Error as e: print(e.errno)\n",
        &[&u],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "EPERM\nEPERM\nEPERM\n",
        "EPERM for every write"
    );
    let out = client_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &d.s("small.raw"), &u],
    );
    assert!(out.contains("Images are identical."));
}

#[test]
fn row17_byte_granular_access() {
    // diskkit advertises a 1-byte minimum block size: unaligned I/O goes straight through.
    let d = Dir::new();
    let (s, log) = serve_small_logged(&d);
    let u = s.uri("disk");
    let out = client_ok(
        "qemu-io",
        &[
            "-t",
            "writeback",
            "-f",
            "raw",
            "-c",
            "write -P 7 513 3",
            "-c",
            "read -P 7 513 3",
            &u,
        ],
    );
    assert!(out.contains("wrote 3/3 bytes at offset 513"), "{out}");
    assert!(log_lines(&log, "WRITE")
        .iter()
        .any(|l| l.contains("offset=513 length=3 ")));
}

#[test]
fn row18_multi_conn_nbdcopy() {
    // nbdcopy hands out work in 128 MiB pieces, so the disk must be larger than that for a
    // second connection to get any, and each piece must hold enough data to take a while:
    // pieces that are all holes take one request each, and one connection could take them
    // all before the others start (seen once in a full run).
    let d = Dir::new();
    let img = d.path("big.raw");
    support::sparse_file(&img, 512 << 20);
    support::poke(&img, 0, &[0x11; 8 << 20]);
    support::poke(&img, 140 << 20, &[0x12; 8 << 20]);
    support::poke(&img, 300 << 20, &[0x22; 8 << 20]);
    support::poke(&img, 420 << 20, &[0x23; 8 << 20]);
    let log = d.path("server.log");
    let s = Served::start_logged(
        &d.path("x.sock"),
        &["-f", "raw", "--export", "disk", img.to_str().unwrap()],
        &log,
    );
    let u = s.uri("disk");
    assert_eq!(
        client("nbdinfo", &["--can", "multi-conn", &u]).status.code(),
        Some(0)
    );
    client_ok("nbdcopy", &["--connections=4", &u, "null:"]);
    let text = std::fs::read_to_string(&log).unwrap();
    let mut conns: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(": READ ") || l.contains(": BLOCK_STATUS "))
        .filter_map(|l| l.split(": ").nth(1))
        .collect();
    conns.sort_unstable();
    conns.dedup();
    assert!(conns.len() >= 2, "nbdcopy used {conns:?}");
    assert!(text.contains("offset=314572800"), "the data at 300M was read");
    // A copy into the server over several connections lands intact.
    let src = d.path("src.raw");
    support::sparse_file(&src, 512 << 20);
    support::poke(&src, 200 << 20, &[0x33; 3 << 20]);
    support::poke(&src, 5 << 20, &[0x44; 1 << 20]);
    client_ok("nbdcopy", &["--connections=4", src.to_str().unwrap(), &u]);
    let out = client_ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src.to_str().unwrap(), &u],
    );
    assert!(out.contains("Images are identical."), "{out}");
}

#[test]
fn row20_allocation_depth_and_asif() {
    let d = Dir::new();
    let img = d.s("d.asif");
    diskkit_ok(&["create", "--format", "asif", "--size", "64M", &img]);
    let chunk = d.path("chunk.bin");
    std::fs::write(&chunk, vec![0x5au8; 1 << 20]).unwrap();
    diskkit_ok(&["write", &img, "--offset", "4M", "--from", chunk.to_str().unwrap()]);
    let s = Served::start(&d.path("x.sock"), &["--export", "disk", &img]);
    let u = s.uri("disk");
    let map = client_ok("nbdinfo", &["--map=qemu:allocation-depth", &u]);
    assert_eq!(
        map,
        "         0     4194304    0  absent\n   4194304     1048576    1  local\n   5242880    61865984    0  absent\n"
    );
    let map = client_ok("nbdinfo", &["--map", &u]);
    assert_eq!(
        map,
        "         0     4194304    3  hole,zero\n   4194304     1048576    0  data\n   5242880    61865984    3  hole,zero\n"
    );
    // Writes through NBD land in the ASIF image and survive the server's stop.
    client_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x33 10M 128k", &u]);
    assert!(s.stop().success());
    let back = d.path("back.bin");
    diskkit_ok(&[
        "read",
        &img,
        "--offset",
        "10M",
        "--length",
        "128K",
        "--to",
        back.to_str().unwrap(),
    ]);
    assert!(std::fs::read(&back).unwrap().iter().all(|&b| b == 0x33));
}

#[test]
fn stacks_are_served_whole_with_allocation_depth() {
    let d = Dir::new();
    let base = d.s("base.asif");
    let top = d.s("vm.qcow2");
    diskkit_ok(&["create", "--format", "asif", "--size", "64M", &base]);
    let chunk = d.path("chunk.bin");
    std::fs::write(&chunk, vec![0x5au8; 1 << 20]).unwrap();
    diskkit_ok(&[
        "write",
        &base,
        "--offset",
        "4M",
        "--from",
        chunk.to_str().unwrap(),
    ]);
    let base_before = std::fs::read(&base).unwrap();
    diskkit_ok(&["layer", "create", "--format", "qcow2", "--parent", &base, &top]);
    diskkit_ok(&[
        "write",
        &top,
        "--offset",
        "10M",
        "--from",
        chunk.to_str().unwrap(),
    ]);
    let s = Served::start(&d.path("x.sock"), &["--export", "disk", &top]);
    let u = s.uri("disk");
    let map = client_ok("nbdinfo", &["--map=qemu:allocation-depth", &u]);
    let rows: Vec<(u64, u64, u64)> = map
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            (0, 4 << 20, 0),
            (4 << 20, 1 << 20, 2),
            (5 << 20, 5 << 20, 0),
            (10 << 20, 1 << 20, 1),
            (11 << 20, 53 << 20, 0),
        ],
        "{map}"
    );
    // Reads see both layers; writes land in the top layer only.
    client_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 4M 1M",
            "-c",
            "read -P 0x5a 10M 1M",
            &u,
        ],
    );
    client_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x33 4M 64k", &u]);
    assert!(s.stop().success());
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the base was written"
    );
    // QEMU cannot open an ASIF backing file, so it checks the qcow2 layer on its own.
    let alone =
        format!(r#"json:{{"driver":"qcow2","backing":null,"file":{{"driver":"file","filename":"{top}"}}}}"#);
    client_ok("qemu-img", &["check", &alone]);
    let out = client_ok("qemu-io", &["-c", "read -P 0x33 4M 64k", &alone]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let back = d.path("back.bin");
    diskkit_ok(&[
        "read",
        &top,
        "--offset",
        "4M",
        "--length",
        "1M",
        "--to",
        back.to_str().unwrap(),
    ]);
    let back = std::fs::read(&back).unwrap();
    assert!(back[..65536].iter().all(|&b| b == 0x33) && back[65536..].iter().all(|&b| b == 0x5a));
}
