//! Server lifecycle: durability across SIGKILL, orderly SIGTERM, `--sync full` on disconnect,
//! background start with a pid file, TCP and several exports.

mod nbd_support;
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nbd_support::*;
use support::{diskkit, diskkit_ok, Dir};

/// `write SEED`: writes 24 pieces (FUA on some), FLUSHes, prints "flushed", then keeps writing
/// elsewhere until killed. `verify SEED`: checks the 24 pieces. `nowait SEED`: writes the
/// pieces and disconnects without FLUSH. `hold SEED`: writes them and stays connected.
const PIECES: &str = r#"
import nbd, sys, random
uri, mode, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = nbd.NBD(); h.connect_uri(uri)
rnd = random.Random(seed)
slots = rnd.sample(range(256), 24)
pieces = [(s * 65536 + rnd.randrange(0, 4096), rnd.randbytes(rnd.randint(1, 60000))) for s in slots]
if mode == "verify":
    bad = sum(1 for off, data in pieces if h.pread(len(data), off) != data)
    print("bad", bad)
    sys.exit(0)
for i, (off, data) in enumerate(pieces):
    h.pwrite(data, off, nbd.CMD_FLAG_FUA if i % 5 == 0 else 0)
if mode == "nowait":
    h.shutdown()
    print("done", flush=True)
    sys.exit(0)
if mode == "hold":
    print("written", flush=True)
    import time; time.sleep(600)
h.flush()
print("flushed", flush=True)
buf = nbd.Buffer.from_bytearray(bytearray(b"\xaa" * (1 << 20)))
while True:
    for i in range(8):
        h.aio_pwrite(buf, (32 << 20) + i * (1 << 20))
    while h.aio_in_flight() > 0:
        h.poll(-1)
"#;

fn pieces(uri: &str, mode: &str, seed: u64) -> std::process::Child {
    Command::new("/usr/bin/python3")
        .args(["-c", PIECES, uri, mode, &seed.to_string()])
        .env("PATH", debian_path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3 with python3-libnbd")
}

fn first_line(child: &mut std::process::Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim().to_owned()
}

fn verify(sock: &std::path::Path, img: &str, seed: u64) {
    let s = Served::start(sock, &["--read-only", "--export", "disk", img]);
    let out = pieces(&s.uri("disk"), "verify", seed).wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "bad 0",
        "flushed writes lost in {img}"
    );
}

#[test]
fn sigkill_after_flush_keeps_every_flushed_write() {
    for format in ["asif", "raw"] {
        let d = Dir::new();
        let img = d.s(&format!("d.{format}"));
        diskkit_ok(&["create", "--format", format, "--size", "64M", &img]);
        let sock = d.path("x.sock");
        let s = Served::start(&sock, &["--sync", "fsync", "--export", "disk", &img]);
        let mut c = pieces(&s.uri("disk"), "write", 5);
        assert_eq!(first_line(&mut c), "flushed");
        // Writes are still streaming in when the server dies.
        s.signal("KILL");
        drop(s);
        let _ = c.kill();
        let _ = c.wait();
        verify(&sock, &img, 5);
        // The image is consistent: diskkit opens it and qemu-img reads it over NBD.
        diskkit_ok(&["info", &img]);
    }
}

#[test]
fn sync_full_makes_a_disconnect_durable() {
    // VZ sends no FLUSH: with --sync full (the default) a client's end is a flush point.
    let d = Dir::new();
    let img = d.s("d.asif");
    diskkit_ok(&["create", "--format", "asif", "--size", "64M", &img]);
    let sock = d.path("x.sock");
    let log = d.path("log");
    let s = Served::start_logged(&sock, &["--export", "disk", &img], &log);
    let mut c = pieces(&s.uri("disk"), "nowait", 9);
    assert_eq!(first_line(&mut c), "done");
    c.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log).unwrap().contains(": closed") {
        assert!(Instant::now() < deadline, "the server never finished the session");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!std::fs::read_to_string(&log).unwrap().contains(": FLUSH "));
    s.signal("KILL");
    drop(s);
    verify(&sock, &img, 9);
}

#[test]
fn sigterm_finishes_in_flight_requests_and_flushes() {
    let d = Dir::new();
    let img = d.s("d.asif");
    diskkit_ok(&["create", "--format", "asif", "--size", "64M", &img]);
    let sock = d.path("x.sock");
    // --sync none: FLUSH does not commit, so only the shutdown flush can make the data durable.
    let s = Served::start(&sock, &["--sync", "none", "--export", "disk", &img]);
    let mut busy = pieces(&s.uri("disk"), "write", 3);
    assert_eq!(first_line(&mut busy), "flushed");
    // An idle client stays connected during the shutdown.
    let mut idle = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import nbd,sys,time\nh=nbd.NBD(); h.connect_uri(sys.argv[1]); print('x', flush=True); time.sleep(600)",
            &s.uri("disk"),
        ])
        .env("PATH", debian_path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(first_line(&mut idle), "x");
    let status = s.stop();
    assert!(status.success(), "{status}");
    for c in [&mut busy, &mut idle] {
        let _ = c.kill();
        let _ = c.wait();
    }
    assert!(!sock.exists(), "socket removed");
    verify(&sock, &img, 3);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn background_server_with_pid_file_tcp_and_two_exports() {
    let d = Dir::new();
    let a = d.s("a.raw");
    let b = d.s("b.asif");
    diskkit_ok(&["create", "--format", "raw", "--size", "16M", &a]);
    diskkit_ok(&["create", "--format", "asif", "--size", "32M", &b]);
    let pid_file = d.path("serve.pid");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let started = Instant::now();
    diskkit_ok(&[
        "serve",
        "--listen",
        &listen,
        "--export",
        &format!("a={a}"),
        "--export",
        &format!("b={b}"),
        "--pid-file",
        pid_file.to_str().unwrap(),
    ]);
    assert!(started.elapsed() < Duration::from_secs(60));
    let pid = std::fs::read_to_string(&pid_file).unwrap().trim().to_owned();
    let list = client_ok("nbdinfo", &["--list", &format!("nbd://{listen}")]);
    assert!(
        list.contains("export=\"a\":") && list.contains("export=\"b\":"),
        "{list}"
    );
    assert_eq!(
        client_ok("nbdinfo", &["--size", &format!("nbd://{listen}/b")]).trim(),
        "33554432"
    );
    assert_eq!(
        client_ok("nbdinfo", &["--size", &format!("nbd://{listen}/a")]).trim(),
        "16777216"
    );
    let out = client_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x42 0 64k",
            &format!("nbd://{listen}/b"),
        ],
    );
    assert!(out.contains("wrote 65536/65536"));
    // Unknown export: the client gets an error, the server stays.
    assert!(!client("nbdinfo", &[&format!("nbd://{listen}/zzz")])
        .status
        .success());
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while pid_file.exists() {
        assert!(Instant::now() < deadline, "background server did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }
    let back = d.path("back.bin");
    diskkit_ok(&["read", &b, "--length", "64K", "--to", back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap().iter().all(|&x| x == 0x42));
}

#[test]
fn startup_errors_are_reported() {
    let d = Dir::new();
    let out = diskkit(&["serve", "--socket", &d.s("s.sock"), &d.s("missing.raw")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.raw"), "{err}");
    let out = diskkit(&["serve", "--foreground", "--socket", &d.s("s.sock")]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn shared_limit_queues_clients_instead_of_dropping_them() {
    let d = Dir::new();
    let img = d.s("d.raw");
    diskkit_ok(&["create", "--format", "raw", "--size", "16M", &img]);
    let s = Served::start(&d.path("x.sock"), &["--shared", "1", "--export", "disk", &img]);
    // --shared 1: no multi-conn.
    assert_eq!(
        client("nbdinfo", &["--can", "multi-conn", &s.uri("disk")])
            .status
            .code(),
        Some(2)
    );
    let mut holder = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import nbd,sys,time\nh=nbd.NBD(); h.connect_uri(sys.argv[1]); print('x', flush=True); time.sleep(600)",
            &s.uri("disk"),
        ])
        .env("PATH", debian_path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(first_line(&mut holder), "x");
    let waiter = Command::new("nbdinfo")
        .args(["--size", &s.uri("disk")])
        .env("PATH", debian_path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    holder.kill().unwrap();
    holder.wait().unwrap();
    let out = waiter.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "16777216");
}

#[test]
fn cache_none_is_write_through() {
    // Every acknowledged write is durable: SIGKILL with the client still connected and no
    // FLUSH sent loses nothing (ASIF keeps its tables in memory until a flush).
    let d = Dir::new();
    let img = d.s("d.asif");
    diskkit_ok(&["create", "--format", "asif", "--size", "64M", &img]);
    let sock = d.path("x.sock");
    let s = Served::start(
        &sock,
        &["--cache", "none", "--sync", "fsync", "--export", "disk", &img],
    );
    let mut c = pieces(&s.uri("disk"), "hold", 21);
    assert_eq!(first_line(&mut c), "written");
    s.signal("KILL");
    drop(s);
    let _ = c.kill();
    let _ = c.wait();
    verify(&sock, &img, 21);
}

#[test]
fn sigterm_stops_a_server_whose_socket_path_was_removed() {
    // The accepting thread is woken through the listening socket itself, not its path.
    let d = Dir::new();
    let img = d.s("d.raw");
    diskkit_ok(&["create", "--format", "raw", "--size", "16M", &img]);
    let sock = d.path("x.sock");
    let s = Served::start(&sock, &["--export", "disk", &img]);
    std::fs::remove_file(&sock).unwrap();
    assert!(s.stop().success());
}
