//! Concurrency and hostile clients: 8 verifying libnbd clients with pipelined requests, a
//! client killed mid-write, and raw-protocol abuse; the server must stay up and correct.

mod nbd_support;
mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use nbd_support::*;
use support::{diskkit_ok, Dir};

/// One verifying client: owns region `idx` (4 MiB) and keeps a model of it; shares an 4 MiB
/// area with every other client where it writes self-describing 4 KiB blocks. Requests go out
/// in pipelined batches (aio) on distinct 256 KiB slots, so replies come back out of order.
const CLIENT: &str = r#"
import nbd, sys, random, struct, hashlib
uri, idx, seed, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
REG = 4 << 20; SLOT = 256 << 10; SHARED = 8 * REG; SHLEN = 4 << 20
h = nbd.NBD(); h.connect_uri(uri)
assert h.can_multi_conn()
base = idx * REG
model = bytearray(REG)
rnd = random.Random(seed)
bad = 0
def block(writer, seq):
    head = struct.pack(">QQ", writer, seq)
    body = hashlib.sha256(head).digest() * ((4096 - 16) // 32) + b"\0" * ((4096 - 16) % 32)
    return head + body
def check_shared(b):
    if b == bytes(4096): return True
    w, s = struct.unpack(">QQ", b[:16])
    return b == block(w, s)
for batch in range(60):
    slots = rnd.sample(range(REG // SLOT), 6)
    pending = []
    for s in slots:
        r = rnd.random(); off = s * SLOT + rnd.randrange(0, SLOT // 2); ln = rnd.randint(1, SLOT // 2)
        if r < 0.45:
            data = rnd.randbytes(ln)
            c = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), base + off,
                             flags=nbd.CMD_FLAG_FUA if rnd.random() < 0.1 else 0)
            model[off:off + ln] = data
            pending.append((c, None, None))
        elif r < 0.85:
            buf = nbd.Buffer(ln)
            c = h.aio_pread(buf, base + off)
            pending.append((c, buf, bytes(model[off:off + ln])))
        else:
            c = h.aio_zero(ln, base + off, flags=nbd.CMD_FLAG_NO_HOLE if rnd.random() < 0.5 else 0)
            model[off:off + ln] = bytes(ln)
            pending.append((c, None, None))
    # Shared area: whole aligned blocks, written by everyone at once.
    for _ in range(3):
        blk = rnd.randrange(SHLEN // 4096)
        if rnd.random() < 0.5:
            c = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(block(idx, batch))), SHARED + blk * 4096)
            pending.append((c, None, None))
        else:
            buf = nbd.Buffer(4096)
            c = h.aio_pread(buf, SHARED + blk * 4096)
            pending.append((c, buf, "shared"))
    while h.aio_in_flight() > 0:
        h.poll(-1)
    for c, buf, want in pending:
        assert h.aio_command_completed(c)
        if buf is None: continue
        got = bytes(buf.to_bytearray())
        if want == "shared":
            if not check_shared(got): bad += 1
        elif got != want:
            bad += 1
    if batch % 10 == 9:
        h.flush()
got = h.pread(REG, base)
if got != bytes(model): bad += 1
open(out, "wb").write(model)
print("mismatches", bad)
"#;

#[test]
fn eight_verifying_clients() {
    let d = Dir::new();
    let img = d.s("d.raw");
    diskkit_ok(&["create", "--format", "raw", "--size", "48M", &img]);
    let s = Served::start(&d.path("x.sock"), &["--export", "disk", "--shared", "16", &img]);
    let u = s.uri("disk");
    let children: Vec<_> = (0..8)
        .map(|i| {
            Command::new("/usr/bin/python3")
                .args([
                    "-c",
                    CLIENT,
                    &u,
                    &i.to_string(),
                    &(1000 + i).to_string(),
                    &d.s(&format!("m{i}")),
                ])
                .env("PATH", debian_path())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("python3 with python3-libnbd")
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "client {i}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(text.trim(), "mismatches 0", "client {i}");
    }
    assert!(s.stop().success());
    let disk = std::fs::read(&img).unwrap();
    for i in 0..8 {
        let model = std::fs::read(d.path(&format!("m{i}"))).unwrap();
        assert!(
            disk[i * (4 << 20)..(i + 1) * (4 << 20)] == model[..],
            "region {i} differs on disk"
        );
    }
}

#[test]
fn client_killed_mid_write_leaves_server_up() {
    let d = Dir::new();
    let img = d.s("d.raw");
    diskkit_ok(&["create", "--format", "raw", "--size", "256M", &img]);
    let mut s = Served::start(&d.path("x.sock"), &["--export", "disk", &img]);
    let u = s.uri("disk");
    let writer = r#"
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
buf = nbd.Buffer.from_bytearray(bytearray(b"\x5a" * (8 << 20)))
for i in range(24):
    h.aio_pwrite(buf, i * (8 << 20))
print("started", flush=True)
while True:
    h.poll(-1)
    if h.aio_in_flight() == 0:
        for i in range(24):
            h.aio_pwrite(buf, i * (8 << 20))
"#;
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", writer, &u])
        .env("PATH", debian_path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = [0u8; 7];
    child.stdout.take().unwrap().read_exact(&mut line).unwrap();
    assert_eq!(&line, b"started");
    child.kill().unwrap();
    child.wait().unwrap();
    // A raw client that dies in the middle of a WRITE payload.
    let mut c = RawClient::connect(&s.sock, 3);
    c.send_opt(1, b"disk");
    c.recv(10);
    c.request(0, 1, 1, 0, 1 << 20);
    c.send(&[1u8; 1000]);
    drop(c);
    assert!(s.running());
    let out = client_ok("nbdinfo", &["--size", &u]);
    assert_eq!(out.trim(), (256u64 << 20).to_string());
    let out = client_ok(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 9 0 4k", "-c", "read -P 9 0 4k", &u],
    );
    assert!(out.contains("read 4096/4096"), "{out}");
    assert!(s.stop().success());
}

#[test]
fn hostile_handshakes_and_requests() {
    let d = Dir::new();
    let img = d.s("d.raw");
    diskkit_ok(&["create", "--format", "raw", "--size", "64M", &img]);
    let mut s = Served::start(&d.path("x.sock"), &["--export", "disk", &img]);
    let closed = |c: &mut RawClient| {
        c.s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut b = [0u8; 64];
        loop {
            match c.s.read(&mut b) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    // Connect and close at once, repeatedly (health-check probes).
    for _ in 0..20 {
        drop(std::os::unix::net::UnixStream::connect(&s.sock).unwrap());
    }
    // Unknown client flags: dropped.
    let mut c = RawClient::connect(&s.sock, 0x8000_0003);
    closed(&mut c);
    // Garbage instead of an option.
    let mut c = RawClient::connect(&s.sock, 3);
    c.send(&[0xffu8; 64]);
    closed(&mut c);
    // A huge option length: dropped without reading 4 GiB.
    let mut c = RawClient::connect(&s.sock, 3);
    c.send(&0x4948_4156_454f_5054u64.to_be_bytes());
    c.send(&7u32.to_be_bytes());
    c.send(&u32::MAX.to_be_bytes());
    closed(&mut c);
    // A truncated option, then the client leaves.
    let mut c = RawClient::connect(&s.sock, 3);
    c.send(&0x4948_4156_454f_5054u64.to_be_bytes());
    c.send(&7u32.to_be_bytes());
    drop(c);
    // Too many options: every one answered until the limit, then the connection is closed.
    let mut c = RawClient::connect(&s.sock, 3);
    let mut answered = 0;
    let mut opts = Vec::new();
    for _ in 0..300 {
        opts.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        opts.extend_from_slice(&0x99u32.to_be_bytes());
        opts.extend_from_slice(&0u32.to_be_bytes());
    }
    // The server stops reading at its limit, so part of this may not be accepted.
    let _ = std::io::Write::write_all(&mut c.s, &opts);
    c.s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 4096];
    let mut total = 0;
    while let Ok(n @ 1..) = c.s.read(&mut buf) {
        total += n;
    }
    answered += total / 40;
    assert!((200..300).contains(&answered), "answered {answered} options");
    // Meta-context queries with lying lengths.
    let mut c = RawClient::connect(&s.sock, 3);
    assert_eq!(c.opt(8, &[])[0].0, REP_ACK);
    let mut q = Vec::new();
    q.extend_from_slice(&4u32.to_be_bytes());
    q.extend_from_slice(b"disk");
    q.extend_from_slice(&1u32.to_be_bytes());
    q.extend_from_slice(&1000u32.to_be_bytes());
    q.extend_from_slice(b"base:allocation");
    assert_eq!(c.opt(10, &q)[0].0, REP_ERR_INVALID);
    q.truncate(12);
    q[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_ne!(c.opt(10, &q)[0].0, REP_ACK);
    // Transmission abuse on one connection; it must keep answering.
    let go = info_request("disk", &[]);
    let r = c.opt(7, &go);
    assert_eq!(r.last().unwrap().0, REP_ACK);
    // Zero-length requests are harmless (structured: READ answers with chunks).
    c.request(0, 1, 10, 0, 0);
    assert_eq!(c.simple_reply(), (0, 10));
    c.request(0, 4, 11, 0, 0);
    assert_eq!(c.simple_reply(), (0, 11));
    c.request(0, 6, 12, 64 << 20, 0);
    assert_eq!(c.simple_reply(), (0, 12));
    // Unknown command and unknown flags: EINVAL.
    c.request(0, 42, 13, 0, 512);
    assert_eq!(c.simple_reply(), (22, 13));
    c.request(1 << 9, 3, 14, 0, 0);
    assert_eq!(c.simple_reply(), (22, 14));
    // A write over the 32 MiB limit: the payload is skipped and EINVAL returned.
    let big = (32 << 20) + 4096;
    c.request(0, 1, 15, 0, big);
    c.send(&vec![0xeeu8; big as usize]);
    assert_eq!(c.simple_reply(), (22, 15));
    // TRIM and WRITE_ZEROES of nearly 4 GiB on a 64 MiB disk: errors, not disconnects...
    c.request(0, 4, 16, 0, u32::MAX);
    assert_eq!(c.simple_reply(), (22, 16));
    c.request(0, 6, 17, 0, u32::MAX);
    assert_eq!(c.simple_reply(), (28, 17));
    // ...and a whole-disk trim works.
    c.request(0, 4, 18, 0, 64 << 20);
    assert_eq!(c.simple_reply(), (0, 18));
    c.request(0, 3, 19, 0, 0);
    assert_eq!(c.simple_reply(), (0, 19));
    // A wrong request magic ends only this connection.
    c.send(&[0u8; 28]);
    closed(&mut c);
    assert!(s.running());
    let out = client_ok("nbdinfo", &["--size", &s.uri("disk")]);
    assert_eq!(out.trim(), (64u64 << 20).to_string());
    assert!(s.stop().success());
}

#[test]
fn four_gib_trim_and_zero() {
    // The kernel and VZ send discards of nearly 4 GiB; they must work, not disconnect.
    let d = Dir::new();
    let img = d.s("big.raw");
    diskkit_ok(&["create", "--format", "raw", "--size", "8G", &img]);
    support::poke(std::path::Path::new(&img), 1 << 30, &[7u8; 4096]);
    let s = Served::start(&d.path("x.sock"), &["--export", "disk", &img]);
    let mut c = RawClient::connect(&s.sock, 3);
    c.send_opt(1, b"disk");
    c.recv(10);
    c.request(0, 4, 1, 0, u32::MAX);
    assert_eq!(c.simple_reply(), (0, 1));
    c.request(2, 6, 2, 4 << 30, u32::MAX);
    assert_eq!(c.simple_reply(), (0, 2));
    c.request(0, 0, 3, 1 << 30, 4096);
    assert_eq!(c.simple_reply(), (0, 3));
    assert!(c.recv(4096).iter().all(|&b| b == 0));
}
