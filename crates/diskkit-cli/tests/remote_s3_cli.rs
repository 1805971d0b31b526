//! S3 remote bases from the command line, against the moto server (PyPI; no S3-compatible
//! server is packaged for Debian 12): `layer create --type cache --parent s3://BUCKET/KEY
//! --s3-endpoint URL`, an overlay on it written by qemu-io through `diskkit serve`, and
//! `map`/`info`/`compare`/`convert` checked against the same stack built from the local file
//! with qemu-img; then a replaced object, missing credentials, an unknown bucket.
//!
//! Signatures: moto does not verify the SigV4 signatures of presigned requests (what diskkit
//! sends; see `diskkit-deliver/tests/support/moto.rs`), so a wrong secret key is accepted
//! by it and nothing here asserts a refusal. Instead every request diskkit sent is checked
//! with botocore's signer: signed with the secret from the environment, and with no other.
//!
//! Credentials go to each diskkit process through its environment only (nothing here
//! changes this process's environment), with HOME pointing at an empty directory so that no
//! `~/.aws` of the machine is read.

#[path = "../../diskkit-deliver/tests/support/moto.rs"]
mod moto;
mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use moto::Moto;
use support::{diskkit_bin, tool_ok, Dir};

const MIB: u64 = 1 << 20;
const BUCKET: &str = "images";
const URL: &str = "s3://images/golden/base.qcow2";

/// Every variable through which the AWS CLI (and diskkit) finds S3 settings.
const AWS_VARS: [&str; 15] = [
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_EC2_METADATA_SERVICE_ENDPOINT",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
];

/// diskkit with exactly the AWS settings in `env` (and an empty HOME). The instance metadata
/// service is off unless `env` says where it is (on a cloud machine a real one would answer).
fn dk(home: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(diskkit_bin());
    for v in AWS_VARS {
        c.env_remove(v);
    }
    if !env.iter().any(|(k, _)| *k == "AWS_EC2_METADATA_SERVICE_ENDPOINT") {
        c.env("AWS_EC2_METADATA_DISABLED", "true");
    }
    c.env("HOME", home).envs(env.iter().copied()).args(args);
    c.output().expect("run diskkit")
}

fn ok(out: Output, what: &str) -> String {
    let Output {
        status,
        stdout,
        stderr,
    } = out;
    assert!(
        status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&stderr)
    );
    String::from_utf8(stdout).unwrap()
}

fn error_line(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("diskkit: error: "), "{err}");
    err
}

/// One run of a map: `[start, end)`, what it is, and where a run of the base is in the base
/// file (`None` otherwise).
type Run = (u64, u64, &'static str, Option<u64>);

/// A `map --output json` of diskkit or `qemu-img map --output=json`, as runs that say what
/// each range reads from: `top` (the overlay holds it), `cache` (diskkit's cache layer),
/// `base` (with its offset in the base file) or `zero` (zeroes or absent, anywhere), with
/// adjacent runs of the same kind merged. `layer` names the kind of each depth.
fn runs(json: &str, layer: impl Fn(u64) -> &'static str) -> Vec<Run> {
    let entries: Vec<serde_json::Value> = serde_json::from_str(json).unwrap();
    let mut out: Vec<Run> = Vec::new();
    for e in entries {
        let start = e["start"].as_u64().unwrap();
        let end = start + e["length"].as_u64().unwrap();
        let (kind, at) = if e["data"].as_bool().unwrap() {
            let kind = layer(e["depth"].as_u64().unwrap());
            (kind, (kind == "base").then(|| e["offset"].as_u64().unwrap()))
        } else {
            ("zero", None)
        };
        if let Some(last) = out.last_mut() {
            let follows = match (last.3, at) {
                (Some(a), Some(b)) => a + (last.1 - last.0) == b,
                (None, None) => true,
                _ => false,
            };
            if last.2 == kind && last.1 == start && follows {
                last.1 = end;
                continue;
            }
        }
        out.push((start, end, kind, at));
    }
    out
}

/// qemu-io commands run on `target` (an image file, or an NBD URI with `-f raw`).
fn qemu_io(format: &str, target: &str, commands: &[String]) {
    let mut args = vec!["-f", format];
    for c in commands {
        args.extend(["-c", c.as_str()]);
    }
    args.push(target);
    tool_ok("qemu-io", &args);
}

fn wait_gone(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while path.exists() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the server to stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn s3_cache_layers_from_the_command_line_equal_the_local_file() {
    let d = Dir::new();
    let home = Dir::new();
    let home = home.0.path();
    // The base: qcow2 written by qemu-io, with data, a sub-cluster write and a zeroed cluster.
    let base = d.path("base.qcow2");
    tool_ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", &d.s("base.qcow2"), "40M"],
    );
    let base_writes: Vec<String> = [
        "write -P 0x5a 1M 3M",
        "write -P 0x11 10M 1M",
        "write -P 0xc3 20975616 2M",
        "write -P 0x7e 33554944 70000",
        "write -z 1536K 64K",
        "write -P 0x2b 39M 1M",
    ]
    .map(String::from)
    .to_vec();
    qemu_io("qcow2", &d.s("base.qcow2"), &base_writes);
    let base_len = std::fs::metadata(&base).unwrap().len();
    // The same stack from the local file: an overlay over base.qcow2, for qemu-img.
    tool_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            &d.s("ref.qcow2"),
        ],
    );

    let moto = Moto::start();
    moto.put(BUCKET, "golden/base.qcow2", &base);
    let endpoint = moto.endpoint();
    let creds = [
        ("AWS_ACCESS_KEY_ID", moto::KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", moto::SECRET),
        ("AWS_REGION", moto::REGION),
    ];
    let remote = ["--allow-remote", BUCKET, "--s3-endpoint", &endpoint];
    let with = |extra: &[&str], args: &[&str]| -> Vec<String> {
        let mut all: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        all.extend(remote.iter().map(|s| s.to_string()));
        all.extend(args.iter().map(|s| s.to_string()));
        all
    };
    let run = |extra: &[&str], args: &[&str]| {
        let all = with(extra, args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        dk(home, &creds, &all)
    };

    // The cache layer, and an overlay on it.
    let cache = d.s("cache.asif");
    let out = ok(
        run(
            &["layer", "create", "--type", "cache"],
            &["--parent", URL, &cache],
        ),
        "layer create --type cache",
    );
    assert!(
        out.starts_with(&format!(
            "created cache layer '{cache}' (asif, 40 MiB) over {URL} (qcow2, ETag \""
        )),
        "{out}"
    );
    let vm = d.s("vm.qcow2");
    ok(
        run(&["layer", "create"], &["--parent", &cache, &vm]),
        "layer create",
    );

    // Before anything is read through it: diskkit's map of the stack is qemu-img's map of
    // the base, offsets in the base file included (the base's metadata is read over S3).
    let dk_map = ok(run(&["map", "--output", "json"], &[&vm]), "map");
    let qemu_map = tool_ok("qemu-img", &["map", "--output=json", &d.s("base.qcow2")]);
    let base_runs = runs(&qemu_map, |_| "base");
    assert!(
        base_runs.iter().filter(|r| r.2 == "base").count() >= 4,
        "{base_runs:?}"
    );
    assert_eq!(
        runs(&dk_map, |depth| if depth == 3 { "base" } else { "other" }),
        base_runs
    );

    // `info`: the layers, the remote base's format and size as the object's.
    let info: serde_json::Value =
        serde_json::from_str(&ok(run(&["info", "--output", "json"], &[&vm]), "info")).unwrap();
    let layers = info["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 3, "{info}");
    assert_eq!(info["virtual_size"], 40 * MIB);
    assert_eq!(layers[1]["layer_type"], "cache");
    let hint = layers[1]["parent_path"].as_str().unwrap();
    assert!(
        hint.starts_with(&format!("{URL}#size={base_len}&etag=")),
        "{hint}"
    );
    assert_eq!(layers[2]["format"], "qcow2");
    assert_eq!(layers[2]["file_size"], base_len);
    assert!(layers[2]["path"].is_null());

    // The same writes into both overlays: qemu-io on the reference, and qemu-io through
    // `diskkit serve` (NBD) on the remote stack.
    let writes: Vec<String> = [
        "write -P 0x77 5242883 70000",
        "write -P 0x99 10M 4096",
        "write -z 21M 1M",
        "write -P 0x42 36M 2M",
    ]
    .map(String::from)
    .to_vec();
    qemu_io("qcow2", &d.s("ref.qcow2"), &writes);
    let sock = d.s("vm.sock");
    let pid_file = d.path("vm.pid");
    ok(
        run(
            &["serve"],
            &["--socket", &sock, "--pid-file", pid_file.to_str().unwrap(), &vm],
        ),
        "serve",
    );
    qemu_io("raw", &format!("nbd+unix:///?socket={sock}"), &writes);
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    tool_ok("kill", &[pid.trim()]);
    wait_gone(&pid_file);

    // The overlays hold the same ranges (both qcow2 with 64 KiB clusters).
    let top = |rs: Vec<Run>| -> Vec<Run> { rs.into_iter().filter(|r| r.2 == "top").collect() };
    let ref_map = tool_ok("qemu-img", &["map", "--output=json", &d.s("ref.qcow2")]);
    let dk_map = ok(run(&["map", "--output", "json"], &[&vm]), "map");
    let ref_top = top(runs(&ref_map, |depth| if depth == 0 { "top" } else { "base" }));
    assert!(!ref_top.is_empty());
    assert_eq!(
        top(runs(&dk_map, |depth| if depth == 1 { "top" } else { "below" })),
        ref_top
    );

    // compare: equal to the reference stack; different from the base alone, at the first
    // byte the overlay changed (qemu-img compare names the 512-byte sector holding it).
    let out = ok(run(&["compare"], &[&vm, &d.s("ref.qcow2")]), "compare");
    assert_eq!(out.trim(), "Images are identical.");
    let differs = run(&["compare"], &[&vm, &d.s("base.qcow2")]);
    assert_eq!(differs.status.code(), Some(1), "{differs:?}");
    let qemu = Command::new("qemu-img")
        .args(["compare", &d.s("base.qcow2"), &d.s("ref.qcow2")])
        .output()
        .unwrap();
    assert_eq!(qemu.status.code(), Some(1), "{qemu:?}");
    let first = 5242883u64;
    assert_eq!(
        String::from_utf8_lossy(&differs.stdout),
        format!("Content mismatch at offset {first}!\n")
    );
    assert_eq!(
        String::from_utf8_lossy(&qemu.stdout),
        format!("Content mismatch at offset {}!\n", first & !511)
    );

    // convert: a RAW copy and a flat qcow2 that qemu-img finds equal to the reference.
    let raw = d.s("copy.raw");
    ok(run(&["convert", "-q"], &[&vm, &raw]), "convert to raw");
    tool_ok("qemu-img", &["compare", "-F", "raw", &d.s("ref.qcow2"), &raw]);
    let flat = d.s("flat.qcow2");
    ok(
        run(&["convert", "-q", "-O", "qcow2"], &[&vm, &flat]),
        "convert to qcow2",
    );
    tool_ok("qemu-img", &["check", &flat]);
    tool_ok("qemu-img", &["compare", &d.s("ref.qcow2"), &flat]);

    // The reads filled the cache: nothing is read from the base any more.
    let dk_map = ok(run(&["map", "--output", "json"], &[&vm]), "map");
    let kinds = runs(&dk_map, |depth| match depth {
        1 => "top",
        2 => "cache",
        _ => "base",
    });
    assert!(kinds.iter().any(|r| r.2 == "cache"), "{kinds:?}");
    assert!(kinds.iter().all(|r| r.2 != "base"), "{kinds:?}");

    // The endpoint can also come from AWS_ENDPOINT_URL, as the AWS CLI takes it.
    let mut env = creds.to_vec();
    env.push(("AWS_ENDPOINT_URL", &endpoint));
    ok(
        dk(
            home,
            &env,
            &["compare", "--allow-remote", BUCKET, &vm, &d.s("ref.qcow2")],
        ),
        "compare with AWS_ENDPOINT_URL",
    );

    // Every request was signed with the secret key from the environment (checked by
    // botocore; moto itself accepts any signature).
    let (good, bad) = moto.check_signatures("/images/", moto::SECRET);
    assert!(good >= 5 && bad == 0, "{good} good, {bad} bad signatures");
    assert_eq!(moto.check_signatures("/images/", "not-the-secret").0, 0);

    // Without credentials: anonymous requests, which moto refuses for a private object.
    let anon = d.s("anon.asif");
    let err = error_line(&dk(
        home,
        &[("AWS_REGION", moto::REGION)],
        &[
            "layer",
            "create",
            "--type",
            "cache",
            "--allow-remote",
            BUCKET,
            "--s3-endpoint",
            &endpoint,
            "--parent",
            URL,
            &anon,
        ],
    ));
    assert!(err.contains("403") && err.contains("credentials"), "{err}");
    assert!(!d.path("anon.asif").exists());
    let err = error_line(&dk(
        home,
        &[],
        &["info", "--allow-remote", BUCKET, "--s3-endpoint", &endpoint, &vm],
    ));
    assert!(err.contains("403") && err.contains("credentials"), "{err}");

    // Temporary credentials from the instance metadata service (moto serves one: IMDSv2
    // token, role, credentials with a session token), used to sign.
    let info = ["info", "--allow-remote", BUCKET, "--s3-endpoint", &endpoint, &vm];
    let before = moto.check_signatures("/images/", "test-secret-key").0;
    ok(
        dk(
            home,
            &[
                ("AWS_REGION", moto::REGION),
                ("AWS_EC2_METADATA_SERVICE_ENDPOINT", &endpoint),
            ],
            &info,
        ),
        "info with instance credentials",
    );
    assert!(moto.check_signatures("/images/", "test-secret-key").0 > before);
    let requests = moto.requests();
    assert!(
        requests.iter().any(|r| r == "PUT /latest/api/token"),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.contains("X-Amz-Security-Token=test-session-token")),
        "the session token is sent"
    );
    // And from the profile's credential_process.
    let config = d.path("aws-config");
    std::fs::write(
        &config,
        format!(
            "[profile proc]\ncredential_process = printf '{{\"Version\": 1, \"AccessKeyId\": \"{}\", \"SecretAccessKey\": \"proc-secret\"}}'\n",
            moto::KEY_ID
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    ok(
        dk(
            home,
            &[
                ("AWS_REGION", moto::REGION),
                ("AWS_CONFIG_FILE", config),
                ("AWS_PROFILE", "proc"),
            ],
            &info,
        ),
        "info with credential_process",
    );
    assert!(moto.check_signatures("/images/", "proc-secret").0 > 0);

    // A bucket that does not exist.
    let err = error_line(&run(
        &[
            "layer",
            "create",
            "--type",
            "cache",
            "--allow-remote",
            "no-such-bucket",
        ],
        &[
            "--parent",
            "s3://no-such-bucket/golden/base.qcow2",
            &d.s("nb.asif"),
        ],
    ));
    assert!(
        err.contains("s3://no-such-bucket/golden/base.qcow2") && err.contains("no such bucket"),
        "{err}"
    );
    assert!(!d.path("nb.asif").exists());
    // A bucket that is not allowed: refused before any request, naming the option.
    let before = moto.requests().len();
    let err = error_line(&dk(
        home,
        &creds,
        &[
            "layer",
            "create",
            "--type",
            "cache",
            "--s3-endpoint",
            &endpoint,
            "--parent",
            "s3://other-bucket/k.qcow2",
            &d.s("o.asif"),
        ],
    ));
    assert!(err.contains("--allow-remote other-bucket"), "{err}");
    assert_eq!(moto.requests().len(), before, "a request was sent");

    // The object replaced by another upload: the next open fails, in one line, and reads
    // nothing.
    let other = d.path("other.raw");
    std::fs::write(&other, vec![7u8; 4 << 20]).unwrap();
    moto.put(BUCKET, "golden/base.qcow2", &other);
    let x_raw = d.s("x.raw");
    for (cmd, args) in [("info", vec![vm.as_str()]), ("convert", vec!["-q", &vm, &x_raw])] {
        let err = error_line(&run(&[cmd], &args));
        assert!(
            err.contains(&format!(
                "{URL} is no longer the object the cache layer was made from"
            )),
            "{err}"
        );
    }
    assert!(!d.path("x.raw").exists());
}
