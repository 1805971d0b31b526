//! Container images through a real registry (Debian's docker-registry), against skopeo:
//! pulls into OCI layouts and Apple-style stores, platform selection, basic auth with
//! htpasswd, the bearer-token flow with a token endpoint, chunked uploads, a connection
//! cut mid-blob, a blob whose bytes do not match its digest, and hostile manifests.

#[path = "support/registry.rs"]
mod registry_support;
mod support;

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use diskkit_deliver::http::{ClientOptions, RetryPolicy};
use diskkit_deliver::registry::{
    self, BlobEvent, Credentials, Destination, PullOptions, Reference, Registry, RegistryOptions,
};
use diskkit_deliver::ErrorKind;
use diskkit_oci::Platform;
use registry_support::{
    layout_blobs, skopeo, tar_layer, Auth, DockerRegistry, HostileRegistry, LayoutBuilder, TokenKey,
    TokenServer,
};
use support::{Fault, FaultProxy, Rng};

fn options() -> RegistryOptions {
    RegistryOptions {
        http: ClientOptions {
            read_timeout: Duration::from_secs(20),
            retry: RetryPolicy {
                attempts: 5,
                initial_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(200),
            },
            ..ClientOptions::default()
        },
        auth_files: Vec::new(),
        ..RegistryOptions::default()
    }
}

fn quiet(_: BlobEvent<'_>) {}

/// A layout with two layers (one of 3 MB of noise) tagged `v1`.
fn test_layout(dir: &Path) -> (LayoutBuilder, String) {
    let b = LayoutBuilder::new(dir);
    let mut noise = vec![0u8; 3 << 20];
    Rng(7).fill(&mut noise);
    let l1 = tar_layer(&[("etc/hello", b"hello\n"), ("etc/os-release", b"ID=test\n")]);
    let l2 = tar_layer(&[("usr/share/noise", &noise)]);
    let m = b.manifest("amd64", &[l1, l2]);
    let d = b.finish("v1", &[("amd64", m)]);
    (b, d)
}

fn connect(reference: &str, opts: &RegistryOptions, push: bool) -> Registry {
    Registry::connect(&Reference::parse(reference).unwrap(), opts, push).unwrap()
}

fn pull_layout(
    reference: &str,
    opts: &RegistryOptions,
    dir: &Path,
    tag: Option<&str>,
) -> registry::PullReport {
    let reg = connect(reference, opts, false);
    registry::pull(
        &reg,
        &Destination::Layout(dir.to_path_buf()),
        &PullOptions {
            platform: None,
            ref_name: tag.map(str::to_string),
        },
        &quiet,
    )
    .unwrap()
}

#[test]
fn skopeo_pushes_diskkit_pulls_the_same_blobs_as_skopeo() {
    let reg = DockerRegistry::start(Auth::None);
    let t = tempfile::tempdir().unwrap();
    let (lay, _) = test_layout(&t.path().join("src"));
    let host = reg.host();
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", lay.dir.display()),
        &format!("docker://{host}/test/img:v1"),
    ]);
    let ours = t.path().join("ours");
    let report = pull_layout(&format!("{host}/test/img:v1"), &options(), &ours, Some("v1"));
    assert_eq!(report.blobs, 3);
    assert_eq!(report.fetched, 3);
    let theirs = t.path().join("theirs");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{host}/test/img:v1"),
        &format!("oci:{}:v1", theirs.display()),
    ]);
    assert_eq!(
        layout_blobs(&ours),
        layout_blobs(&theirs),
        "blobs differ from skopeo's pull"
    );
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(ours.join("index.json")).unwrap()).unwrap();
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        "v1"
    );
    assert_eq!(
        index["manifests"][0]["digest"].as_str().unwrap(),
        report.manifest_digest
    );
    assert!(
        !ours.join(".diskkit-ingest").exists(),
        "the ingest directory is left"
    );
    // Pulled again: nothing is downloaded.
    let before = reg.requests().len();
    let again = pull_layout(
        &format!("docker://{host}/test/img:v1"),
        &options(),
        &ours,
        Some("v1"),
    );
    assert_eq!(again.fetched, 0);
    let blob_gets = reg.requests()[before..]
        .iter()
        .filter(|(m, p, _)| m == "GET" && p.contains("/blobs/"))
        .count();
    assert_eq!(blob_gets, 0);
    // By digest, into another layout: the same manifest.
    let by_digest = pull_layout(
        &format!("{host}/test/img@{}", report.manifest_digest),
        &options(),
        &t.path().join("bydigest"),
        None,
    );
    assert_eq!(by_digest.manifest_digest, report.manifest_digest);

    // Docker media types (skopeo converts the image to schema 2 on the way in).
    skopeo(&[
        "copy",
        "--format",
        "v2s2",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", lay.dir.display()),
        &format!("docker://{host}/test/docker:v1"),
    ]);
    let d = t.path().join("docker");
    let r = pull_layout(&format!("{host}/test/docker:v1"), &options(), &d, Some("v1"));
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(d.join("blobs/sha256").join(&r.manifest_digest[7..])).unwrap())
            .unwrap();
    assert_eq!(
        m["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    let image = diskkit_oci::select(&d, Some("v1"), &Platform::host(), false).unwrap();
    assert_eq!(image.layer_count(), 2);
}

#[test]
fn index_platforms_and_an_apple_store() {
    let reg = DockerRegistry::start(Auth::None);
    let t = tempfile::tempdir().unwrap();
    let b = LayoutBuilder::new(&t.path().join("src"));
    let amd = b.manifest("amd64", &[tar_layer(&[("arch", b"amd64")])]);
    let arm = b.manifest("arm64", &[tar_layer(&[("arch", b"arm64")])]);
    let index = b.finish("v1", &[("amd64", amd.clone()), ("arm64", arm.clone())]);
    let host = reg.host();
    let reference = format!("{host}/test/multi:v1");
    // Pushed by diskkit (the index and both manifests), read back by skopeo.
    let pusher = connect(&reference, &options(), true);
    let pushed = registry::push_layout(&pusher, &b.dir, Some("v1"), &quiet).unwrap();
    assert_eq!(pushed.digest, index);
    assert_eq!(pushed.blobs, 4);
    let sk = t.path().join("sk");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--override-arch",
        "arm64",
        &format!("docker://{reference}"),
        &format!("oci:{}:v1", sk.display()),
    ]);
    let reg_client = connect(&reference, &options(), false);
    let pull = |platform: Option<&str>, dest: Destination| {
        registry::pull(
            &reg_client,
            &dest,
            &PullOptions {
                platform: platform.map(|p| p.parse().unwrap()),
                ref_name: Some("v1".into()),
            },
            &quiet,
        )
    };
    let r = pull(Some("linux/arm64"), Destination::Layout(t.path().join("arm"))).unwrap();
    assert_eq!(r.manifest_digest, arm.0);
    assert_eq!(r.platform.as_deref(), Some("linux/arm64"));
    assert_eq!(layout_blobs(&t.path().join("arm")), layout_blobs(&sk));
    let r = pull(Some("linux/amd64"), Destination::Layout(t.path().join("amd"))).unwrap();
    assert_eq!(r.manifest_digest, amd.0);
    let e = pull(Some("linux/s390x"), Destination::Layout(t.path().join("none"))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound);
    assert!(e.to_string().contains("linux/amd64, linux/arm64"), "{e}");
    // An Apple container-style store: the index and the arm64 image, named in state.json.
    let store = t.path().join("store");
    let r = pull(Some("linux/arm64"), Destination::Store(store.clone())).unwrap();
    assert_eq!(r.root_digest, index);
    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(store.join("state.json")).unwrap()).unwrap();
    assert_eq!(state[&reference]["digest"], index.as_str());
    assert!(store.join("content/blobs/sha256").join(&index[7..]).is_file());
    let arm64: Platform = "linux/arm64".parse().unwrap();
    let image = diskkit_oci::select(&store, Some(&reference), &arm64, true).unwrap();
    assert_eq!(image.manifest_digest, arm.0);
    assert_eq!(image.layer_count(), 1);
}

#[test]
fn basic_auth_with_htpasswd() {
    let reg = DockerRegistry::start(Auth::Basic {
        user: "alice".into(),
        password: "s3cret:pw".into(),
    });
    let t = tempfile::tempdir().unwrap();
    let (lay, _) = test_layout(&t.path().join("src"));
    let reference = format!("{}/team/app:v1", reg.host());
    let r = Reference::parse(&reference).unwrap();
    // No credentials: a clear error, before anything is written.
    let anon = Registry::connect(&r, &options(), true)
        .and_then(|c| registry::push_layout(&c, &lay.dir, None, &quiet));
    let e = anon.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Authentication);
    assert!(e.to_string().contains("wants credentials"), "{e}");
    let with = |user: &str, pw: &str| RegistryOptions {
        credentials: Some(Credentials::parse(&format!("{user}:{pw}")).unwrap()),
        ..options()
    };
    let e = Registry::connect(&r, &with("alice", "wrong"), true)
        .and_then(|c| registry::push_layout(&c, &lay.dir, None, &quiet))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Authentication);
    assert!(e.to_string().contains("refused"), "{e}");
    let c = Registry::connect(&r, &with("alice", "s3cret:pw"), true).unwrap();
    registry::push_layout(&c, &lay.dir, None, &quiet).unwrap();
    // Credentials from a docker config.json.
    let cfg = t.path().join("config.json");
    let auth = base64_encode(b"alice:s3cret:pw");
    fs::write(
        &cfg,
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.host()),
    )
    .unwrap();
    let opts = RegistryOptions {
        auth_files: vec![t.path().join("missing.json"), cfg],
        ..options()
    };
    let out = t.path().join("out");
    let report = pull_layout(&reference, &opts, &out, Some("v1"));
    assert_eq!(report.fetched, 3);
    assert_eq!(layout_blobs(&out), layout_blobs(&lay.dir));
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[test]
fn bearer_token_flow() {
    let key = Arc::new(TokenKey::new());
    let tokens = TokenServer::start(key.clone(), Some(("bob".into(), "pw".into())));
    let reg = DockerRegistry::start(Auth::Token {
        realm: tokens.realm(),
        cert: key.cert.clone(),
    });
    let t = tempfile::tempdir().unwrap();
    let (lay, _) = test_layout(&t.path().join("src"));
    let reference = Reference::parse(&format!("{}/team/tok:v1", reg.host())).unwrap();
    let creds = RegistryOptions {
        credentials: Some(Credentials::parse("bob:pw").unwrap()),
        ..options()
    };
    let c = Registry::connect(&reference, &creds, true).unwrap();
    registry::push_layout(&c, &lay.dir, None, &quiet).unwrap();
    let asked: Vec<_> = tokens.requests.lock().unwrap().clone();
    assert!(asked
        .iter()
        .all(|r| r.query.get("service").map(String::as_str) == Some("test-registry")));
    assert!(
        asked
            .iter()
            .any(|r| r.query.get("scope").map(String::as_str) == Some("repository:team/tok:pull,push")),
        "{asked:?}"
    );
    assert!(asked
        .iter()
        .all(|r| r.authorization.as_deref() == Some("Basic Ym9iOnB3")));
    let out = t.path().join("out");
    let c = Registry::connect(&reference, &creds, false).unwrap();
    registry::pull(
        &c,
        &Destination::Layout(out.clone()),
        &PullOptions::default(),
        &quiet,
    )
    .unwrap();
    assert_eq!(layout_blobs(&out), layout_blobs(&lay.dir));
    assert!(tokens
        .requests
        .lock()
        .unwrap()
        .iter()
        .any(|r| r.query.get("scope").map(String::as_str) == Some("repository:team/tok:pull")));
    // skopeo reads what diskkit pushed through the same token flow.
    skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--creds",
        "bob:pw",
        &format!("docker://{}/team/tok:v1", reg.host()),
    ]);
    // Without credentials the token service refuses: a clear error.
    let e = Registry::connect(&reference, &options(), false)
        .and_then(|c| {
            registry::pull(
                &c,
                &Destination::Layout(t.path().join("x")),
                &PullOptions::default(),
                &quiet,
            )
        })
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Authentication);
    assert!(e.to_string().contains("credentials"), "{e}");
}

#[test]
fn chunked_uploads_and_a_cut_connection_mid_blob() {
    let reg = DockerRegistry::start(Auth::None);
    let t = tempfile::tempdir().unwrap();
    let (lay, _) = test_layout(&t.path().join("src"));
    let reference = format!("{}/test/chunks:v1", reg.host());
    let opts = RegistryOptions {
        chunk_size: Some(256 << 10),
        ..options()
    };
    let c = connect(&reference, &opts, true);
    let pushed = registry::push_layout(&c, &lay.dir, Some("v1"), &quiet).unwrap();
    assert_eq!(pushed.uploaded, 3);
    let patches = reg
        .requests()
        .iter()
        .filter(|(m, _, s)| m == "PATCH" && *s == 202)
        .count();
    assert!(
        patches >= 12,
        "{patches} PATCH requests for a 3 MiB blob in 256 KiB chunks"
    );
    // A proxy that cuts the second connection (the first is the client trying HTTPS) 1.5 MB
    // into its responses: in the middle of the 3 MiB layer (one transfer at a time, so the
    // order is fixed).
    let proxy = FaultProxy::start(reg.port, &[Fault::None, Fault::CutAfter(1_500_000)]);
    let via = format!("127.0.0.1:{}/test/chunks:v1", proxy.port);
    let out = t.path().join("out");
    let opts = RegistryOptions { jobs: 1, ..options() };
    let report = pull_layout(&via, &opts, &out, Some("v1"));
    assert_eq!(report.fetched, 3);
    assert_eq!(layout_blobs(&out), layout_blobs(&lay.dir));
    assert!(proxy.connections.load(std::sync::atomic::Ordering::Relaxed) >= 3);
    let resumed = reg
        .requests()
        .iter()
        .filter(|(m, p, s)| m == "GET" && p.contains("/blobs/") && *s == 206)
        .count();
    assert_eq!(resumed, 1, "the cut blob is resumed with one ranged GET");
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_refused_and_never_used() {
    let reg = DockerRegistry::start(Auth::None);
    let t = tempfile::tempdir().unwrap();
    let (lay, _) = test_layout(&t.path().join("src"));
    let reference = format!("{}/test/bad:v1", reg.host());
    registry::push_layout(&connect(&reference, &options(), true), &lay.dir, None, &quiet).unwrap();
    // Damage the big layer in the registry's storage (same size, one byte changed).
    let m: serde_json::Value = serde_json::from_slice(
        &fs::read(
            lay.dir.join("blobs/sha256").join(
                serde_json::from_slice::<serde_json::Value>(&fs::read(lay.dir.join("index.json")).unwrap())
                    .unwrap()["manifests"][0]["digest"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("sha256:"),
            ),
        )
        .unwrap(),
    )
    .unwrap();
    let layer = m["layers"][1]["digest"].as_str().unwrap().to_string();
    let data = reg.blob_data(&layer);
    let mut bytes = fs::read(&data).unwrap();
    bytes[1 << 20] ^= 0x40;
    fs::write(&data, &bytes).unwrap();
    let out = t.path().join("out");
    let c = connect(&reference, &options(), false);
    let e = registry::pull(
        &c,
        &Destination::Layout(out.clone()),
        &PullOptions::default(),
        &quiet,
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DigestMismatch, "{e}");
    assert!(e.to_string().contains(&layer), "{e}");
    assert!(
        !out.join("blobs/sha256").join(&layer[7..]).exists(),
        "the bad blob became visible"
    );
    assert!(
        !out.join(".diskkit-ingest").join(&layer[7..]).exists(),
        "the bad bytes are kept"
    );
    assert!(!out.join("index.json").exists(), "the image was named");
}

#[test]
fn hostile_manifests_get_clear_errors() {
    let t = tempfile::tempdir().unwrap();
    let d = |n: u8| format!("sha256:{}", format!("{n:02x}").repeat(32));
    let good = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":2}},"layers":[]}}"#,
        d(1)
    );
    let pull_from = |host: &str| {
        let reference = Reference::parse(&format!("{host}/evil/img:v1")).unwrap();
        Registry::connect(&reference, &options(), false).and_then(|c| {
            registry::pull(
                &c,
                &Destination::Layout(t.path().join("out")),
                &PullOptions::default(),
                &quiet,
            )
        })
    };
    // Larger than 4 MiB.
    let mut big = good.clone().into_bytes();
    big.pop();
    big.extend(std::iter::repeat_n(b' ', 5 << 20));
    big.push(b'}');
    let h = HostileRegistry::start("application/vnd.oci.image.manifest.v1+json", big, Vec::new());
    let e = pull_from(&h.host()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidManifest, "{e}");
    assert!(e.to_string().contains("larger than"), "{e}");
    // Served as HTML.
    let h = HostileRegistry::start("text/html", good.clone().into_bytes(), Vec::new());
    let e = pull_from(&h.host()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidManifest, "{e}");
    assert!(e.to_string().contains("not a manifest media type"), "{e}");
    // A layer media type with control characters and a path.
    let evil = good.replace(
        r#""layers":[]"#,
        &format!(
            r#""layers":[{{"mediaType":"application/x\u0000/../../etc","digest":"{}","size":1}}]"#,
            d(2)
        ),
    );
    let h = HostileRegistry::start(
        "application/vnd.oci.image.manifest.v1+json",
        evil.into_bytes(),
        Vec::new(),
    );
    let e = pull_from(&h.host()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidManifest, "{e}");
    assert!(e.to_string().contains("invalid media type"), "{e}");
    // A digest that is a path.
    let evil = good.replace(&d(1), "sha256:../../../../etc/passwd");
    let h = HostileRegistry::start(
        "application/vnd.oci.image.manifest.v1+json",
        evil.into_bytes(),
        Vec::new(),
    );
    assert_eq!(
        pull_from(&h.host()).unwrap_err().kind(),
        ErrorKind::InvalidManifest
    );
    assert!(!t.path().join("out/index.json").exists());

    // A real registry that accepts foreign layers: a manifest pointing outside the
    // repository.
    let reg = DockerRegistry::start_with(Auth::None, true);
    let (lay, _) = test_layout(&t.path().join("src"));
    let reference = format!("{}/test/foreign:v1", reg.host());
    let c = connect(&reference, &options(), true);
    registry::push_layout(&c, &lay.dir, None, &quiet).unwrap();
    let pulled = pull_layout(&reference, &options(), &t.path().join("ok"), None);
    let m = fs::read(
        t.path()
            .join("ok/blobs/sha256")
            .join(&pulled.manifest_digest[7..]),
    )
    .unwrap();
    let mut m: serde_json::Value = serde_json::from_slice(&m).unwrap();
    m["layers"][1]["urls"] = serde_json::json!(["https://elsewhere.example/layer.tar.gz"]);
    m["layers"][1]["mediaType"] = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip".into();
    c.put_manifest(
        "foreign",
        "application/vnd.oci.image.manifest.v1+json",
        m.to_string().as_bytes(),
    )
    .unwrap();
    let c = connect(&format!("{}/test/foreign:foreign", reg.host()), &options(), false);
    let e = registry::pull(
        &c,
        &Destination::Layout(t.path().join("f")),
        &PullOptions::default(),
        &quiet,
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidManifest, "{e}");
    assert!(e.to_string().contains("points outside the repository"), "{e}");
}
