//! What `diskkit serve` tells people: each export's URL (which real clients then use), its pid
//! when it goes to the background, and `-v` logs written for people.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{diskkit, diskkit_bin, diskkit_ok, tool_ok, Dir};

/// Wait (generously; never a timing assertion) until `cond` holds.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn background_server_prints_urls_and_pid() {
    let d = Dir::new();
    let img = d.s("disk.qcow2");
    diskkit_ok(&["create", "--size", "16M", &img]);
    let sock = d.path("s.sock");
    let pid_file = d.path("s.pid");
    let out = diskkit_ok(&[
        "serve",
        "--socket",
        sock.to_str().unwrap(),
        "--pid-file",
        pid_file.to_str().unwrap(),
        &img,
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let url = format!("nbd+unix:///?socket={}", sock.display());
    assert_eq!(
        lines[0],
        format!("serving '{img}' (qcow2, 16 MiB) read-write at {url}")
    );
    let pid = std::fs::read_to_string(&pid_file).unwrap().trim().to_owned();
    assert_eq!(
        lines[1],
        format!("running in the background as pid {pid} (stop it with: kill {pid})")
    );
    // The printed URL is what clients use.
    assert_eq!(tool_ok("nbdinfo", &["--size", &url]).trim(), "16777216");
    tool_ok("kill", &[&pid]);
    wait_for("the pid file to go", || !pid_file.exists());
    assert!(!sock.exists());
}

#[test]
fn tcp_exports_each_get_their_url_and_quiet_prints_nothing() {
    let d = Dir::new();
    let a = d.s("a.raw");
    let b = d.s("b.asif");
    diskkit_ok(&["create", "--size", "4M", &a]);
    diskkit_ok(&["create", "--size", "8M", &b]);
    let pid_file = d.path("p.pid");
    let out = diskkit_ok(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--read-only",
        "--pid-file",
        pid_file.to_str().unwrap(),
        "--export",
        &format!("first disk={a}"),
        "--export",
        &format!("b={b}"),
    ]);
    let urls: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once(" at ").map(|(_, u)| u))
        .collect();
    assert_eq!(urls.len(), 2, "{out}");
    assert!(
        urls[0].starts_with("nbd://127.0.0.1:") && urls[0].ends_with("/first%20disk"),
        "{out}"
    );
    assert!(
        out.contains(&format!("serving '{a}' (raw, 4 MiB) read-only at")),
        "{out}"
    );
    assert_eq!(tool_ok("nbdinfo", &["--size", urls[0]]).trim(), "4194304");
    assert_eq!(tool_ok("nbdinfo", &["--size", urls[1]]).trim(), "8388608");
    let pid = std::fs::read_to_string(&pid_file).unwrap().trim().to_owned();
    tool_ok("kill", &[&pid]);
    wait_for("the pid file to go", || !pid_file.exists());

    let sock = d.path("q.sock");
    let pid_file = d.path("q.pid");
    let o = diskkit(&[
        "serve",
        "-q",
        "--socket",
        sock.to_str().unwrap(),
        "--pid-file",
        pid_file.to_str().unwrap(),
        &a,
    ]);
    assert!(o.status.success());
    assert!(o.stdout.is_empty() && o.stderr.is_empty());
    let pid = std::fs::read_to_string(&pid_file).unwrap().trim().to_owned();
    tool_ok("kill", &[&pid]);
    wait_for("the pid file to go", || !pid_file.exists());
}

#[test]
fn verbose_logs_are_for_people() {
    let d = Dir::new();
    let img = d.s("disk.raw");
    diskkit_ok(&["create", "--size", "4M", &img]);
    let sock = d.path("v.sock");
    let mut child = Command::new(diskkit_bin())
        .args([
            "serve",
            "--foreground",
            "-v",
            "--socket",
            sock.to_str().unwrap(),
            "--export",
            "disk",
            &img,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(
        first.starts_with(&format!(
            "serving '{img}' (raw, 4 MiB) read-write at nbd+unix:///disk?socket="
        )),
        "{first}"
    );
    tool_ok(
        "nbdinfo",
        &["--map", &format!("nbd+unix:///disk?socket={}", sock.display())],
    );
    tool_ok("kill", &["-TERM", &child.id().to_string()]);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("diskkit serve: connection 0: on the Unix socket"),
        "{log}"
    );
    assert!(
        log.contains("diskkit serve: connection 0: using export 'disk' (read-write; structured replies, base:allocation"),
        "{log}"
    );
    assert!(log.contains("diskkit serve: connection 0: closed"), "{log}");
    // -v is not a request trace (that is -vv), and shows no Rust debug names.
    assert!(
        !log.contains("BLOCK_STATUS") && !log.contains("Some(") && !log.contains('{'),
        "{log}"
    );
}
