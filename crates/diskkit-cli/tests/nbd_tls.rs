//! TLS via STARTTLS with an X.509 certificate made by certtool (gnutls-bin): nbdinfo, nbdcopy,
//! qemu-img and qemu-io as clients; `--tls require` refuses plaintext, `--tls allow` takes both.

mod nbd_support;
mod support;

use std::path::Path;
use std::process::Command;

use nbd_support::*;
use support::{diskkit_ok, Dir};

/// A CA and a server certificate for localhost in `dir` (ca-cert.pem is what clients load).
fn make_pki(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("certtool")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("certtool (gnutls-bin) must be installed");
        assert!(
            out.status.success(),
            "certtool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    std::fs::write(dir.join("ca-key.pem"), run(&["--generate-privkey"])).unwrap();
    std::fs::write(
        dir.join("ca.info"),
        "cn = diskkit test CA\nca\ncert_signing_key\nexpiration_days = 3650\n",
    )
    .unwrap();
    run(&[
        "--generate-self-signed",
        "--load-privkey",
        "ca-key.pem",
        "--template",
        "ca.info",
        "--outfile",
        "ca-cert.pem",
    ]);
    std::fs::write(dir.join("server-key.pem"), run(&["--generate-privkey"])).unwrap();
    std::fs::write(
        dir.join("server.info"),
        "organization = diskkit test\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 3650\n",
    )
    .unwrap();
    run(&[
        "--generate-certificate",
        "--load-ca-certificate",
        "ca-cert.pem",
        "--load-ca-privkey",
        "ca-key.pem",
        "--load-privkey",
        "server-key.pem",
        "--template",
        "server.info",
        "--outfile",
        "server-cert.pem",
    ]);
}

fn serve_tls(d: &Dir, mode: &str) -> Served {
    let pki = d.path("pki");
    make_pki(&pki);
    let img = d.path("small.raw");
    small_raw(&img, 3);
    Served::start(
        &d.path("t.sock"),
        &[
            "-f",
            "raw",
            "--export",
            "disk",
            "--tls",
            mode,
            "--tls-cert",
            pki.join("server-cert.pem").to_str().unwrap(),
            "--tls-key",
            pki.join("server-key.pem").to_str().unwrap(),
            img.to_str().unwrap(),
        ],
    )
}

fn tls_uri(s: &Served, d: &Dir) -> String {
    format!(
        "nbds+unix:///disk?socket={}&tls-certificates={}",
        s.sock.display(),
        d.s("pki")
    )
}

#[test]
fn tls_required_x509() {
    let d = Dir::new();
    let s = serve_tls(&d, "require");
    let u = tls_uri(&s, &d);
    let out = client_ok("nbdinfo", &[&u]);
    assert!(
        out.contains("protocol: newstyle-fixed with TLS, using structured packets"),
        "{out}"
    );
    assert_eq!(client("nbdinfo", &["--is", "tls", &u]).status.code(), Some(0));
    // Plaintext is refused.
    let out = client("nbdinfo", &[&s.uri("disk")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("server replied with error to opt_go request"));
    let mut c = RawClient::connect(&s.sock, 3);
    for opt in [3, 6, 7, 8, 9, 10, 0x1234] {
        assert_eq!(
            c.opt(opt, &info_request("disk", &[]))[0].0,
            REP_ERR_TLS_REQD,
            "option {opt}"
        );
    }
    assert_eq!(c.opt(2, &[])[0].0, REP_ACK);
    // Data through TLS: libnbd and QEMU.
    let copy = d.path("copy.raw");
    client_ok("nbdcopy", &[&u, copy.to_str().unwrap()]);
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(d.path("small.raw")).unwrap());
    let obj = format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", d.s("pki"));
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},export=disk,tls-creds=tls0,tls-hostname=localhost",
        s.sock.display()
    );
    let out = client_ok("qemu-img", &["info", "--object", &obj, "--image-opts", &opts]);
    assert!(out.contains("virtual size: 64 MiB (67108864 bytes)"), "{out}");
    let out = client_ok(
        "qemu-io",
        &[
            "--object",
            &obj,
            "--image-opts",
            &opts,
            "-c",
            "write -P 0x61 3M 5M",
            "-c",
            "read -P 0x61 3M 5M",
        ],
    );
    assert!(
        out.contains("read 5242880/5242880 bytes at offset 3145728"),
        "{out}"
    );
    // Pipelined requests through one TLS connection.
    let script = r#"
import nbd, sys, random
h = nbd.NBD(); h.set_uri_allow_local_file(True); h.connect_uri(sys.argv[1])
rnd = random.Random(4); model = {}
for batch in range(20):
    cmds = []
    for slot in rnd.sample(range(64), 8):
        data = rnd.randbytes(rnd.randint(1, 200000)); off = (16 << 20) + slot * (256 << 10)
        cmds.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off)); model[off] = data
    while h.aio_in_flight() > 0: h.poll(-1)
    reads = [(off, nbd.Buffer(len(d)), d) for off, d in model.items()]
    cookies = [h.aio_pread(b, off) for off, b, _ in reads]
    while h.aio_in_flight() > 0: h.poll(-1)
    bad = sum(1 for off, b, d in reads if bytes(b.to_bytearray()) != d)
    if bad: print("bad", bad); sys.exit(1)
print("ok")
"#;
    let out = python(script, &[&u]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ok",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s.stop().success());
}

#[test]
fn tls_allowed_takes_both() {
    let d = Dir::new();
    let s = serve_tls(&d, "allow");
    let out = client_ok("nbdinfo", &[&s.uri("disk")]);
    assert!(out.contains("without TLS"), "{out}");
    let out = client_ok("nbdinfo", &[&tls_uri(&s, &d)]);
    assert!(out.contains("with TLS"), "{out}");
    // A client that starts TLS and then drops the connection mid-handshake leaves it running.
    let mut c = RawClient::connect(&s.sock, 3);
    assert_eq!(c.opt(5, &[])[0].0, REP_ACK);
    c.send(b"\x16\x03\x01\x00\x05hello");
    drop(c);
    assert_eq!(
        client_ok("nbdinfo", &["--size", &s.uri("disk")]).trim(),
        "67108864"
    );
    let bad = diskkit_ok_or_err(&d);
    assert!(bad.contains("cannot set up TLS"), "{bad}");
}

fn diskkit_ok_or_err(d: &Dir) -> String {
    std::fs::write(d.path("junk.pem"), "not a certificate\n").unwrap();
    // Another image: the running server holds small.raw's write lock.
    small_raw(&d.path("other.raw"), 3);
    let out = support::diskkit(&[
        "serve",
        "--foreground",
        "--socket",
        &d.s("u.sock"),
        "--tls-cert",
        &d.s("junk.pem"),
        "--tls-key",
        &d.s("junk.pem"),
        &d.s("other.raw"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let _ = diskkit_ok;
    String::from_utf8_lossy(&out.stderr).into_owned()
}
