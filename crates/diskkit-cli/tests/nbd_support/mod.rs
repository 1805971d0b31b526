//! Running `diskkit serve` and NBD clients in tests.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// PATH with Debian's /usr/bin first: nbdsh and the python3-libnbd module need Debian's python3.
pub fn debian_path() -> String {
    format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default())
}

/// Run a client tool (with Debian's PATH); never panics on a failure exit code, but the tool
/// must be installed.
pub fn client(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env("PATH", debian_path())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed? .ci/run installs it): {e}"))
}

/// Run a client tool and require success; returns stdout.
pub fn client_ok(program: &str, args: &[&str]) -> String {
    let out = client(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a Python script with Debian's python3 (which has the `nbd` module from python3-libnbd).
pub fn python(script: &str, args: &[&str]) -> Output {
    let mut all = vec!["-c", script];
    all.extend_from_slice(args);
    client("/usr/bin/python3", &all)
}

/// A `diskkit serve --foreground` process on a Unix socket; killed when dropped.
pub struct Served {
    pub child: Child,
    pub sock: PathBuf,
}

impl Served {
    /// Start serving with `args` (image, exports, options) on `sock`; waits until it accepts.
    pub fn start(sock: &Path, args: &[&str]) -> Served {
        Served::spawn(sock, args, Stdio::inherit())
    }

    /// Like [`Served::start`] with `-vv`, logging every request to `log`.
    pub fn start_logged(sock: &Path, args: &[&str], log: &Path) -> Served {
        let f = std::fs::File::create(log).expect("create server log");
        let mut all = vec!["-vv"];
        all.extend_from_slice(args);
        Served::spawn(sock, &all, Stdio::from(f))
    }

    fn spawn(sock: &Path, args: &[&str], stderr: Stdio) -> Served {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_diskkit"));
        cmd.arg("serve")
            .arg("--foreground")
            .arg("--socket")
            .arg(sock)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = cmd.spawn().expect("start diskkit serve");
        let mut served = Served {
            child,
            sock: sock.to_path_buf(),
        };
        served.wait_ready();
        served
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.sock).is_ok() {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("poll server") {
                panic!("diskkit serve exited early: {status}");
            }
            assert!(Instant::now() < deadline, "diskkit serve did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `nbd+unix:///NAME?socket=...`
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send a signal (by name, e.g. "TERM", "KILL") with kill(1).
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{sig} failed");
    }

    /// SIGTERM, then wait for the exit status.
    pub fn stop(mut self) -> ExitStatus {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait server") {
                return st;
            }
            assert!(Instant::now() < deadline, "diskkit serve did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("poll server").is_none()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The 64 MiB test disk of the field notes: random data at [0, 1M) and [8M, 9M), the rest
/// sparse. Returns the data.
pub fn small_raw(path: &Path, seed: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create small.raw");
    f.set_len(64 << 20).expect("size small.raw");
    let mut rng = super_rng(seed);
    let mut all = vec![0u8; 64 << 20];
    for start in [0usize, 8 << 20] {
        let chunk = rng(1 << 20);
        f.write_all_at(&chunk, start as u64).expect("write small.raw");
        all[start..start + (1 << 20)].copy_from_slice(&chunk);
    }
    all
}

fn super_rng(seed: u64) -> impl FnMut(usize) -> Vec<u8> {
    let mut x = seed | 1;
    move |len| {
        let mut v = Vec::with_capacity(len + 8);
        while v.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&x.to_le_bytes());
        }
        v.truncate(len);
        v
    }
}

/// A hand-driven NBD client speaking the raw protocol (for corner cases no tool sends).
pub struct RawClient {
    pub s: std::os::unix::net::UnixStream,
}

/// Option reply: (reply type, payload).
pub type OptReply = (u32, Vec<u8>);

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) | 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;

impl RawClient {
    /// Connect, check the greeting, send client `flags`.
    pub fn connect(sock: &Path, flags: u32) -> RawClient {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), IHAVEOPT);
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            3,
            "handshake flags FIXED_NEWSTYLE|NO_ZEROES"
        );
        s.write_all(&flags.to_be_bytes()).unwrap();
        RawClient { s }
    }

    /// Send an option.
    pub fn send_opt(&mut self, opt: u32, data: &[u8]) {
        use std::io::Write;
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// Read option replies up to and including the final one (ACK or an error).
    pub fn replies(&mut self, opt: u32) -> Vec<OptReply> {
        use std::io::Read;
        let mut out = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h).expect("option reply");
            assert_eq!(
                u64::from_be_bytes(h[..8].try_into().unwrap()),
                0x0003_e889_0455_65a9
            );
            assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), opt);
            let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut data = vec![0u8; len as usize];
            self.s.read_exact(&mut data).unwrap();
            let last = typ == REP_ACK || typ & (1 << 31) != 0;
            out.push((typ, data));
            if last {
                return out;
            }
        }
    }

    /// Option then its replies.
    pub fn opt(&mut self, opt: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_opt(opt, data);
        self.replies(opt)
    }

    /// Send raw bytes.
    pub fn send(&mut self, b: &[u8]) {
        use std::io::Write;
        self.s.write_all(b).unwrap();
    }

    /// Read exactly `n` bytes.
    pub fn recv(&mut self, n: usize) -> Vec<u8> {
        use std::io::Read;
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("read from server");
        b
    }

    /// Send a transmission request.
    pub fn request(&mut self, flags: u16, typ: u16, cookie: u64, offset: u64, len: u32) {
        let mut b = Vec::new();
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.send(&b);
    }

    /// Read a simple reply: (error, cookie).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let r = self.recv(16);
        assert_eq!(
            u32::from_be_bytes(r[..4].try_into().unwrap()),
            0x6744_6698,
            "simple reply magic"
        );
        (
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
        )
    }
}

/// INFO/GO payload for `name` with info `requests`.
pub fn info_request(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        b.extend_from_slice(&r.to_be_bytes());
    }
    b
}
