//! Test support for bundles and the cache: a real nginx started on a free localhost port, a
//! fault-injecting TCP proxy in front of it, sparse test disks and GNU tar + zstd helpers.
//! Shared with the CLI's cache tests (`#[path]`-included there).
#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Run a program and require success; returns stdout. The program must be installed
/// (`.ci/run` installs every one the tests use).
pub fn tool_ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (is it installed? .ci/run installs it): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a shell command in `dir` and require success.
pub fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("sh")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "sh -c {script:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A deterministic pseudo-random generator (xorshift).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A sparse RAW disk of `size` bytes with random data at each `(offset, len)`.
pub fn sparse_disk(path: &Path, size: u64, data: &[(u64, u64)], seed: u64) {
    let f = fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng(seed | 1);
    for &(off, len) in data {
        let mut buf = vec![0u8; len as usize];
        rng.fill(&mut buf);
        f.write_all_at(&buf, off).unwrap();
    }
}

/// Bytes allocated to a file (blocks × 512).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).unwrap().blocks() * 512
}

/// `tar -cS --format=gnu -C dir members... | zstd` into `out`.
pub fn gnu_bundle(dir: &Path, members: &[&str], out: &Path) {
    let list = members.join(" ");
    sh(
        dir,
        &format!(
            "tar -cS --format=gnu -f - {list} | zstd -q -f -T0 -o '{}'",
            out.display()
        ),
    );
}

/// `zstd -dc bundle | tar -xS -C dir`.
pub fn gnu_extract(bundle: &Path, dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    sh(dir, &format!("zstd -dc '{}' | tar -xS -f -", bundle.display()));
}

/// Paths under `dir` (recursively), sorted, relative.
pub fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                out.push(p.strip_prefix(base).unwrap().display().to_string());
                if e.file_type().unwrap().is_dir() {
                    walk(base, &p, out);
                }
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// SHA-256 of `data` (by `sha256sum`).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let owned = data.to_vec();
    let w = thread::spawn(move || stdin.write_all(&owned));
    let out = child.wait_with_output().unwrap();
    w.join().unwrap().unwrap();
    let hex = String::from_utf8(out.stdout).unwrap();
    diskkit_deliver::bundle::parse_sha256(hex.split_whitespace().next().unwrap()).unwrap()
}

/// A free TCP port on 127.0.0.1 (bound and released; callers retry on a collision).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(port: u16, child: &mut Child) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
    false
}

/// nginx from Debian serving `root` on a free localhost port, with Range, ETag and
/// Last-Modified (its defaults) and an access log. Stopped when dropped.
pub struct Nginx {
    child: Child,
    pub port: u16,
    pub root: PathBuf,
    dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start(root: &Path) -> Nginx {
        Nginx::start_with(root, None)
    }

    /// nginx serving HTTPS with the certificate chain and key given (PEM files).
    pub fn start_tls(root: &Path, cert: &Path, key: &Path) -> Nginx {
        Nginx::start_with(root, Some((cert, key)))
    }

    fn start_with(root: &Path, tls: Option<(&Path, &Path)>) -> Nginx {
        let listen_extra = match tls {
            Some((cert, key)) => format!(
                " ssl;\n    ssl_certificate {};\n    ssl_certificate_key {}",
                cert.display(),
                key.display()
            ),
            None => String::new(),
        };
        for _ in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let port = free_port();
            let d = dir.path();
            for t in ["client", "proxy", "fastcgi", "uwsgi", "scgi"] {
                fs::create_dir_all(d.join(t)).unwrap();
            }
            let conf = format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
                 error_log {d}/error.log;\nevents {{ worker_connections 256; }}\n\
                 http {{\n  access_log {d}/access.log;\n  default_type application/octet-stream;\n\
                   sendfile on;\n  keepalive_requests 10000;\n\
                   client_body_temp_path {d}/client;\n  proxy_temp_path {d}/proxy;\n\
                   fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                   server {{\n    listen 127.0.0.1:{port}{listen_extra};\n    root {root};\n    location / {{ }}\n  }}\n}}\n",
                d = d.display(),
                root = root.display()
            );
            fs::write(d.join("nginx.conf"), conf).unwrap();
            let mut child = Command::new("nginx")
                .arg("-p")
                .arg(d)
                .arg("-c")
                .arg(d.join("nginx.conf"))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("nginx must be installed (.ci/run installs nginx-light)");
            if wait_listening(port, &mut child) {
                return Nginx {
                    child,
                    port,
                    root: root.to_path_buf(),
                    dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("nginx did not start");
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// The access log's lines (after waiting until the log has not grown for 300 ms: nginx
    /// logs a request after sending its response).
    pub fn access_log(&self) -> Vec<String> {
        let path = self.dir.path().join("access.log");
        let mut last = None;
        let start = Instant::now();
        loop {
            let len = fs::metadata(&path).map(|m| m.len()).ok();
            if len == last || start.elapsed() > Duration::from_secs(10) {
                break;
            }
            last = len;
            thread::sleep(Duration::from_millis(300));
        }
        fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Requests for `name` and their status codes and byte counts, from the access log.
    pub fn requests_for(&self, name: &str) -> Vec<(u16, u64)> {
        let needle = format!("GET /{name} ");
        self.access_log()
            .iter()
            .filter(|l| l.contains(&needle))
            .filter_map(|l| {
                let after = l.split('"').nth(2)?;
                let mut it = after.split_whitespace();
                let status = it.next()?.parse().ok()?;
                let bytes = it.next()?.parse().ok()?;
                Some((status, bytes))
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the proxy does to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Pass everything through.
    None,
    /// Pass the response through until `n` bytes (headers included), then close.
    CutAfter(u64),
    /// Answer `500 Internal Server Error` without asking the server.
    Status500,
    /// Answer `503` with `Retry-After: 1`.
    Status503RetryAfter,
    /// Pass `n` bytes of the response, then send nothing for `d` and close.
    StallAfter(u64, Duration),
    /// Pass everything through at about this many bytes per second.
    Throttle(u64),
}

/// A TCP proxy in front of a server that applies one [`Fault`] per connection, in order
/// (then passes through). Stopped when dropped.
pub struct FaultProxy {
    pub port: u16,
    faults: Arc<Mutex<VecDeque<Fault>>>,
    /// The fault for connections after the listed ones.
    pub default: Arc<Mutex<Fault>>,
    pub connections: Arc<AtomicUsize>,
    /// The client side of every connection accepted, for [`FaultProxy::cut_all`].
    live: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl FaultProxy {
    pub fn start(upstream: u16, faults: &[Fault]) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(Mutex::new(faults.iter().copied().collect::<VecDeque<_>>()));
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let default = Arc::new(Mutex::new(Fault::None));
        let live = Arc::new(Mutex::new(Vec::new()));
        let (f, c, s, dflt) = (faults.clone(), connections.clone(), stop.clone(), default.clone());
        let l = live.clone();
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        client.set_nonblocking(false).unwrap();
                        c.fetch_add(1, Ordering::Relaxed);
                        if let Ok(clone) = client.try_clone() {
                            l.lock().unwrap().push(clone);
                        }
                        let fault = f.lock().unwrap().pop_front().unwrap_or(*dflt.lock().unwrap());
                        thread::spawn(move || serve(client, upstream, fault));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FaultProxy {
            port,
            faults,
            default,
            connections,
            live,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// Apply `fault` to every connection after the listed ones.
    pub fn set_default(&self, fault: Fault) {
        *self.default.lock().unwrap() = fault;
    }

    /// Close every connection accepted so far (clients must connect again, and meet the
    /// faults from then on).
    pub fn cut_all(&self) {
        for c in self.live.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    pub fn push(&self, fault: Fault) {
        self.faults.lock().unwrap().push_back(fault);
    }

    pub fn pending(&self) -> usize {
        self.faults.lock().unwrap().len()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_request_head(client: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match client.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    head
}

fn serve(mut client: TcpStream, upstream: u16, fault: Fault) {
    match fault {
        Fault::Status500 | Fault::Status503RetryAfter => {
            let _ = read_request_head(&mut client);
            let resp: &[u8] = if fault == Fault::Status500 {
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            } else {
                b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            };
            let _ = client.write_all(resp);
            let _ = client.shutdown(Shutdown::Both);
        }
        _ => {
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                return;
            };
            let mut to_server = server.try_clone().unwrap();
            let mut from_client = client.try_clone().unwrap();
            let up = thread::spawn(move || {
                let _ = std::io::copy(&mut from_client, &mut to_server);
                let _ = to_server.shutdown(Shutdown::Write);
            });
            let rate = match fault {
                Fault::Throttle(r) => Some(r.max(1)),
                _ => None,
            };
            let begun = Instant::now();
            let limit = match fault {
                Fault::CutAfter(n) | Fault::StallAfter(n, _) => n,
                _ => u64::MAX,
            };
            let mut from_server = server;
            let mut sent = 0u64;
            let mut buf = vec![0u8; if rate.is_some() { 16 << 10 } else { 64 << 10 }];
            while sent < limit {
                let want = (limit - sent).min(buf.len() as u64) as usize;
                match from_server.read(&mut buf[..want]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        sent += n as u64;
                        if let Some(r) = rate {
                            let due = Duration::from_secs_f64(sent as f64 / r as f64);
                            if let Some(wait) = due.checked_sub(begun.elapsed()) {
                                thread::sleep(wait);
                            }
                        }
                    }
                }
            }
            if let Fault::StallAfter(_, d) = fault {
                thread::sleep(d);
            }
            let _ = client.shutdown(Shutdown::Both);
            let _ = from_server.shutdown(Shutdown::Both);
            let _ = up.join();
        }
    }
}
