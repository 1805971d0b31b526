//! Test support for registries: Debian's `docker-registry` (the CNCF distribution server)
//! started on a free localhost port with filesystem storage (anonymous, htpasswd basic auth,
//! or token auth), a small token endpoint for the bearer flow (JWTs signed with `openssl`),
//! a hostile "registry" that serves crafted manifests, and OCI layouts built by hand.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::Digest;

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// `sha256:<hex>`.
pub fn digest(data: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(data))
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How the registry authenticates.
#[derive(Debug, Clone)]
pub enum Auth {
    /// Anonymous access.
    None,
    /// htpasswd basic auth with one user.
    Basic { user: String, password: String },
    /// Token auth: tokens from `realm`, signed by the key whose certificate is `cert`.
    Token { realm: String, cert: PathBuf },
}

/// A running `docker-registry`, stopped when dropped.
pub struct DockerRegistry {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
    log: PathBuf,
}

impl DockerRegistry {
    /// Start one; `allow_foreign_urls` lets manifests name layers by URL (to test
    /// clients against such manifests).
    pub fn start(auth: Auth) -> DockerRegistry {
        Self::start_with(auth, false)
    }

    #[allow(clippy::needless_pass_by_value)] // test support: callers build the Auth inline
    pub fn start_with(auth: Auth, allow_foreign_urls: bool) -> DockerRegistry {
        for _ in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            let port = free_port();
            let auth_yaml = match &auth {
                Auth::None => String::new(),
                Auth::Basic { user, password } => {
                    let out = Command::new("htpasswd")
                        .args(["-Bbn", user, password])
                        .output()
                        .expect("htpasswd (apache2-utils) must be installed");
                    assert!(out.status.success());
                    fs::write(d.join("htpasswd"), &out.stdout).unwrap();
                    format!(
                        "auth:\n  htpasswd:\n    realm: test-realm\n    path: {}\n",
                        d.join("htpasswd").display()
                    )
                }
                Auth::Token { realm, cert } => format!(
                    "auth:\n  token:\n    realm: {realm}\n    service: test-registry\n    issuer: test-issuer\n    rootcertbundle: {}\n",
                    cert.display()
                ),
            };
            let validation = if allow_foreign_urls {
                "validation:\n  manifests:\n    urls:\n      allow:\n        - ^https?://\n"
            } else {
                ""
            };
            let conf = format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: test-secret\n{auth_yaml}{validation}",
                d.join("data").display()
            );
            fs::write(d.join("config.yml"), conf).unwrap();
            let log = d.join("registry.log");
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(d.join("config.yml"))
                .stdout(fs::File::create(&log).unwrap())
                .stderr(fs::File::create(d.join("registry.err")).unwrap())
                .spawn()
                .expect("docker-registry must be installed (.ci/run installs it)");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(30) {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return DockerRegistry {
                        child,
                        port,
                        dir,
                        log,
                    };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                thread::sleep(Duration::from_millis(30));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("docker-registry did not start");
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The access log's requests: (method, path, status), in order.
    pub fn requests(&self) -> Vec<(String, String, u16)> {
        // The server logs a request after answering it.
        thread::sleep(Duration::from_millis(300));
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter(|l| !l.starts_with("time="))
            .filter_map(|l| {
                let req = l.split('"').nth(1)?;
                let mut it = req.split_whitespace();
                let method = it.next()?.to_string();
                let path = it.next()?.to_string();
                let status = l.split('"').nth(2)?.split_whitespace().next()?.parse().ok()?;
                Some((method, path, status))
            })
            .collect()
    }

    /// Where the registry stores blob `digest`'s bytes.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// Bytes the registry's storage uses (allocated blocks).
    pub fn stored_bytes(&self) -> u64 {
        fn walk(p: &Path) -> u64 {
            use std::os::unix::fs::MetadataExt;
            let Ok(m) = fs::symlink_metadata(p) else { return 0 };
            let own = m.blocks() * 512;
            if !m.is_dir() {
                return own;
            }
            own + fs::read_dir(p)
                .map(|rd| rd.flatten().map(|e| walk(&e.path())).sum::<u64>())
                .unwrap_or(0)
        }
        walk(&self.dir.path().join("data/docker/registry/v2/blobs"))
    }
}

impl Drop for DockerRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A key and self-signed certificate for signing tokens.
pub struct TokenKey {
    pub dir: tempfile::TempDir,
    pub key: PathBuf,
    pub cert: PathBuf,
    cert_der: Vec<u8>,
}

impl TokenKey {
    pub fn new() -> TokenKey {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        let cert = dir.path().join("cert.pem");
        let ok = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=test-issuer",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success();
        assert!(ok, "openssl req failed");
        let der = Command::new("openssl")
            .args(["x509", "-outform", "DER", "-in"])
            .arg(&cert)
            .output()
            .unwrap()
            .stdout;
        TokenKey {
            dir,
            key,
            cert,
            cert_der: der,
        }
    }

    /// A signed JWT granting `access` ((name, actions)) for the test registry.
    pub fn token(&self, access: &[(String, Vec<String>)]) -> String {
        let header = serde_json::json!({
            "typ": "JWT", "alg": "RS256",
            "x5c": [base64::engine::general_purpose::STANDARD.encode(&self.cert_der)],
        });
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = serde_json::json!({
            "iss": "test-issuer", "sub": "tester", "aud": "test-registry",
            "exp": now + 600, "nbf": now - 60, "iat": now - 60,
            "jti": format!("{now}-{}", rand_u64()),
            "access": access.iter().map(|(name, actions)| serde_json::json!({
                "type": "repository", "name": name, "actions": actions,
            })).collect::<Vec<_>>(),
        });
        let signing_input = format!(
            "{}.{}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        );
        let mut child = Command::new("openssl")
            .args(["dgst", "-sha256", "-sign"])
            .arg(&self.key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(signing_input.as_bytes())
            .unwrap();
        let sig = child.wait_with_output().unwrap().stdout;
        format!("{signing_input}.{}", b64url(&sig))
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    u64::from_le_bytes(b)
}

/// A request the token endpoint saw.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub query: BTreeMap<String, String>,
    pub authorization: Option<String>,
}

/// A small token endpoint for the bearer flow: `GET /token?service=…&scope=…`, basic auth
/// required when `credentials` is set; grants what the scope asks for.
pub struct TokenServer {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<TokenRequest>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl TokenServer {
    pub fn start(key: Arc<TokenKey>, credentials: Option<(String, String)>) -> TokenServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (requests.clone(), stop.clone());
        let expected = credentials.map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let (mut c, _) = match listener.accept() {
                    Ok(x) => x,
                    Err(_) => {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                c.set_nonblocking(false).unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && c.read(&mut byte).map(|n| n == 1).unwrap_or(false) {
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let target = text.split_whitespace().nth(1).unwrap_or("").to_string();
                let query: BTreeMap<String, String> = target
                    .split_once('?')
                    .map(|(_, q)| q)
                    .unwrap_or("")
                    .split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (percent_decode(k), percent_decode(v)))
                    .collect();
                let authorization = text
                    .lines()
                    .find_map(|l| {
                        l.split_once(':')
                            .filter(|(n, _)| n.eq_ignore_ascii_case("authorization"))
                    })
                    .map(|(_, v)| v.trim().to_string());
                r.lock().unwrap().push(TokenRequest {
                    query: query.clone(),
                    authorization: authorization.clone(),
                });
                let resp = if expected.is_some() && authorization != expected {
                    "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
                } else {
                    let mut access = Vec::new();
                    if let Some(scope) = query.get("scope") {
                        for s in scope.split(' ') {
                            let parts: Vec<&str> = s.split(':').collect();
                            if parts.len() == 3 && parts[0] == "repository" {
                                access.push((
                                    parts[1].to_string(),
                                    parts[2].split(',').map(str::to_string).collect(),
                                ));
                            }
                        }
                    }
                    let token = key.token(&access);
                    let body = serde_json::json!({"token": token, "access_token": token, "expires_in": 600})
                        .to_string();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = c.write_all(resp.as_bytes());
            }
        });
        TokenServer {
            port,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A hostile "registry": answers `/v2/` with 200 and every manifest request with the
/// configured content type and body; blob requests with `blob`. For what no real registry
/// would store (oversized manifests, wrong media types).
pub struct HostileRegistry {
    pub port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl HostileRegistry {
    pub fn start(content_type: &str, manifest: Vec<u8>, blob: Vec<u8>) -> HostileRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let ct = content_type.to_string();
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let (mut c, _) = match listener.accept() {
                    Ok(x) => x,
                    Err(_) => {
                        thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                c.set_nonblocking(false).unwrap();
                let (ct, manifest, blob) = (ct.clone(), manifest.clone(), blob.clone());
                thread::spawn(move || loop {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match c.read(&mut byte) {
                            // A TLS handshake: not spoken here.
                            Ok(1) if head.is_empty() && byte[0] == 0x16 => return,
                            Ok(1) => head.push(byte[0]),
                            _ => return,
                        }
                    }
                    let text = String::from_utf8_lossy(&head).into_owned();
                    let mut it = text.split_whitespace();
                    let method = it.next().unwrap_or("").to_string();
                    let target = it.next().unwrap_or("").to_string();
                    let (status, ctype, body): (&str, &str, &[u8]) = if target == "/v2/" {
                        ("200 OK", "application/json", b"{}")
                    } else if target.contains("/manifests/") {
                        ("200 OK", ct.as_str(), &manifest)
                    } else if target.contains("/blobs/") {
                        ("200 OK", "application/octet-stream", &blob)
                    } else {
                        ("404 Not Found", "text/plain", b"")
                    };
                    let h = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    );
                    if c.write_all(h.as_bytes()).is_err() {
                        return;
                    }
                    if method != "HEAD" && c.write_all(body).is_err() {
                        return;
                    }
                });
            }
        });
        HostileRegistry {
            port,
            stop,
            thread: Some(thread),
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for HostileRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An OCI layout written by hand: `layers` (gzip-compressed tar bytes) for one platform
/// each manifest; returns the manifest digests. With several platforms the layout's image
/// is an index.
pub struct LayoutBuilder {
    pub dir: PathBuf,
}

impl LayoutBuilder {
    pub fn new(dir: &Path) -> LayoutBuilder {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        LayoutBuilder {
            dir: dir.to_path_buf(),
        }
    }

    pub fn blob(&self, data: &[u8]) -> (String, u64) {
        let d = digest(data);
        fs::write(self.dir.join("blobs/sha256").join(&d[7..]), data).unwrap();
        (d, data.len() as u64)
    }

    /// A manifest for `arch` with gzip `layers` (and their uncompressed tars for diff_ids).
    pub fn manifest(&self, arch: &str, layers: &[(Vec<u8>, Vec<u8>)]) -> (String, u64) {
        let diff_ids: Vec<String> = layers.iter().map(|(_, tar)| digest(tar)).collect();
        let config = serde_json::json!({
            "architecture": arch, "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let (cd, cs) = self.blob(config.to_string().as_bytes());
        let layer_descs: Vec<serde_json::Value> = layers
            .iter()
            .map(|(gz, _)| {
                let (d, s) = self.blob(gz);
                serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s})
            })
            .collect();
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": layer_descs,
        });
        self.blob(m.to_string().as_bytes())
    }

    /// Name the image (a manifest, or an index of `manifests` with their platforms).
    pub fn finish(&self, tag: &str, manifests: &[(&str, (String, u64))]) -> String {
        let entry = if manifests.len() == 1 {
            let (_, (d, s)) = &manifests[0];
            serde_json::json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": s,
                "annotations": {"org.opencontainers.image.ref.name": tag}})
        } else {
            let idx = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": manifests.iter().map(|(arch, (d, s))| serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": s,
                    "platform": {"architecture": arch, "os": "linux"},
                })).collect::<Vec<_>>(),
            });
            let (d, s) = self.blob(idx.to_string().as_bytes());
            serde_json::json!({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": d, "size": s,
                "annotations": {"org.opencontainers.image.ref.name": tag}})
        };
        let digest = entry["digest"].as_str().unwrap().to_string();
        fs::write(
            self.dir.join("index.json"),
            serde_json::json!({"schemaVersion": 2, "manifests": [entry]}).to_string(),
        )
        .unwrap();
        digest
    }
}

/// A gzip-compressed tar holding `files` ((path, contents)), made with GNU tar and gzip.
/// Returns (gzip bytes, tar bytes).
pub fn tar_layer(files: &[(&str, &[u8])]) -> (Vec<u8>, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    for (p, data) in files {
        let path = root.join(p);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, data).unwrap();
    }
    fs::create_dir_all(&root).unwrap();
    let tar = dir.path().join("l.tar");
    let ok = Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-C",
        ])
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let tar_bytes = fs::read(&tar).unwrap();
    let gz = Command::new("gzip")
        .args(["-n", "-c"])
        .arg(&tar)
        .output()
        .unwrap()
        .stdout;
    (gz, tar_bytes)
}

/// skopeo, against registries on plain HTTP.
pub fn skopeo(args: &[&str]) {
    let out = Command::new("skopeo")
        .args(args)
        .output()
        .expect("skopeo must be installed");
    assert!(
        out.status.success(),
        "skopeo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The blobs of a layout: file name → bytes.
pub fn layout_blobs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}
