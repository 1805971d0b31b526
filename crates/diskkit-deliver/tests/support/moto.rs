//! Test support for S3: the `moto` server from PyPI (no S3-compatible server is packaged for
//! Debian 12) started on a free localhost port, objects put with boto3, and SigV4 signatures
//! checked with botocore's signer.
//!
//! moto 5 does not verify the signatures of presigned (query-string signed) requests, which
//! is what diskkit sends: by default it takes any key and any signature, and with its IAM
//! checks on (`INITIAL_NO_AUTH_ACTION_COUNT`) it verifies `Authorization` headers only and
//! answers presigned requests with a 500. [`Moto::check_signatures`] fills that gap: it
//! recomputes, with botocore (the AWS SDK's own signer), the signature of every presigned
//! request moto logged.
#![allow(dead_code, unreachable_pub)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The credentials the tests sign with (moto accepts any).
pub const KEY_ID: &str = "AKIDTEST";
pub const SECRET: &str = "secret";
pub const REGION: &str = "eu-central-1";

/// moto's S3 server, stopped when dropped.
pub struct Moto {
    child: Child,
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (.ci/run installs it): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Moto {
    pub fn start() -> Moto {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("moto.log");
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                // werkzeug logs every request line (with its query string) on stderr.
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("moto_server must be installed (.ci/run: pip install 'moto[server]')");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(60) {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Moto {
                        child,
                        port,
                        log,
                        _dir: dir,
                    };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("moto_server did not start");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Create the bucket (if needed) and put `file` at `key`, with boto3.
    pub fn put(&self, bucket: &str, key: &str, file: &Path) {
        run_ok(Command::new("python3").args([
            "-c",
            "import sys, boto3\n\
             s3 = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id=sys.argv[5], \
             aws_secret_access_key=sys.argv[6], region_name=sys.argv[7])\n\
             try:\n    s3.create_bucket(Bucket=sys.argv[2], CreateBucketConfiguration={'LocationConstraint': sys.argv[7]})\n\
             except s3.exceptions.BucketAlreadyOwnedByYou:\n    pass\n\
             s3.upload_file(sys.argv[4], sys.argv[2], sys.argv[3])\n",
            &self.endpoint(),
            bucket,
            key,
            file.to_str().unwrap(),
            KEY_ID,
            SECRET,
            REGION,
        ]));
    }

    /// The request lines moto logged so far (`METHOD TARGET`, target with its query).
    pub fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let quoted = l.split('"').nth(1)?;
                let target = quoted.strip_suffix(" HTTP/1.1")?;
                Some(target.to_owned())
            })
            .collect()
    }

    /// Check the SigV4 signature of every presigned request moto logged whose path starts with
    /// `path_prefix`, with botocore and `secret`: how many match and how many do not.
    pub fn check_signatures(&self, path_prefix: &str, secret: &str) -> (usize, usize) {
        let script = r#"
import re, sys
from urllib.parse import urlsplit, parse_qsl, urlencode, quote
from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
log, host, secret, prefix = sys.argv[1:5]
good = bad = 0
for line in open(log):
    m = re.search(r'"(GET|HEAD) (\S+) HTTP/1\.1"', line)
    if not m or "X-Amz-Signature=" not in m.group(2):
        continue
    method, target = m.groups()
    parts = urlsplit(target)
    if not parts.path.startswith(prefix):
        continue
    q = parse_qsl(parts.query, keep_blank_values=True)
    p = dict(q)
    key_id, _date, region, service, _ = p["X-Amz-Credential"].split("/")
    unsigned = urlencode([(k, v) for k, v in q if k != "X-Amz-Signature"], quote_via=quote, safe="-_.~")
    req = AWSRequest(method=method, url=f"http://{host}{parts.path}?{unsigned}", headers={"Host": host})
    req.context["timestamp"] = p["X-Amz-Date"]
    auth = S3SigV4QueryAuth(Credentials(key_id, secret), service, region, expires=int(p["X-Amz-Expires"]))
    want = auth.signature(auth.string_to_sign(req, auth.canonical_request(req)), req)
    if want == p["X-Amz-Signature"]:
        good += 1
    else:
        bad += 1
print(good, bad)
"#;
        let out = run_ok(Command::new("python3").args([
            "-c",
            script,
            self.log.to_str().unwrap(),
            &format!("127.0.0.1:{}", self.port),
            secret,
            path_prefix,
        ]));
        let mut it = out.split_whitespace().map(|n| n.parse::<usize>().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
