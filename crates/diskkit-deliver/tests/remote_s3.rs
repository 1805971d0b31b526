//! Remote bases in S3, against the moto server (no S3-compatible server is packaged for
//! Debian 12; moto from PyPI speaks the S3 API): credentials and region from an AWS profile in
//! files named by the environment, as the AWS CLI reads them, SigV4-signed range requests,
//! a custom endpoint, a replaced object refused.
//!
//! One test in this binary, because it sets process-wide environment variables.

mod support;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use diskkit::{CreateOptions, DiskImage, ErrorKind, ImageFormat, LayerOptions, OpenOptions, ParentPolicy};
use diskkit_deliver::http::{ClientOptions, RetryPolicy};
use diskkit_deliver::remote::{
    create_cache_layer, AllowRemote, CacheLayerOptions, RemoteOptions, RemoteResolver,
};
use support::Rng;

const MIB: u64 = 1 << 20;

struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Moto {
        for _ in 0..5 {
            let port = support::free_port();
            let mut child = Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("moto_server must be installed (.ci/run: pip install 'moto[server]')");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(60) {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Moto { child, port };
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

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Create the bucket (if needed) and put `file` at `key`, with boto3 (moto's own client).
    fn put(&self, bucket: &str, key: &str, file: &Path) {
        support::tool_ok(
            "python3",
            &[
                "-c",
                "import sys, boto3\n\
                 s3 = boto3.client('s3', endpoint_url=sys.argv[1], aws_access_key_id='AKIDTEST', \
                 aws_secret_access_key='secret', region_name='eu-central-1')\n\
                 try:\n    s3.create_bucket(Bucket=sys.argv[2], CreateBucketConfiguration={'LocationConstraint': 'eu-central-1'})\n\
                 except s3.exceptions.BucketAlreadyOwnedByYou:\n    pass\n\
                 s3.upload_file(sys.argv[4], sys.argv[2], sys.argv[3])\n",
                &self.endpoint(),
                bucket,
                key,
                file.to_str().unwrap(),
            ],
        );
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_all(image: &DiskImage) -> Vec<u8> {
    let mut out = vec![0u8; image.size() as usize];
    for (i, c) in out.chunks_mut(4 * MIB as usize).enumerate() {
        image.read_at(c, i as u64 * 4 * MIB).unwrap();
    }
    out
}

#[test]
fn s3_bases_with_profiles_signing_and_a_custom_endpoint() {
    let work = tempfile::tempdir().unwrap();
    let aws = work.path().join("aws");
    std::fs::create_dir(&aws).unwrap();
    std::fs::write(
        aws.join("credentials"),
        "[default]\naws_access_key_id = WRONG\naws_secret_access_key = wrong\n\n[ci]\naws_access_key_id = AKIDTEST\naws_secret_access_key = secret\n",
    )
    .unwrap();
    std::fs::write(aws.join("config"), "[profile ci]\nregion = eu-central-1\n").unwrap();
    for v in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
    ] {
        std::env::remove_var(v);
    }
    std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", aws.join("credentials"));
    std::env::set_var("AWS_CONFIG_FILE", aws.join("config"));
    std::env::set_var("AWS_PROFILE", "ci");

    // A qcow2 base with data in places.
    let base = work.path().join("base.qcow2");
    let size = 24 * MIB;
    {
        let image = DiskImage::create(&base, &CreateOptions::new(ImageFormat::Qcow2, size)).unwrap();
        let mut rng = Rng(17);
        for _ in 0..12 {
            let len = (rng.below(2 * MIB) + 1) & !511;
            let off = rng.below(size - len) & !511;
            let mut buf = vec![0u8; len as usize];
            rng.fill(&mut buf);
            image.write_at(&buf, off).unwrap();
        }
    }
    let mut model = read_all(&DiskImage::open(&base, &OpenOptions::new()).unwrap());
    let moto = Moto::start();
    moto.put("images", "golden/base.qcow2", &base);
    let url = "s3://images/golden/base.qcow2";
    let mut options = RemoteOptions {
        client: ClientOptions {
            retry: RetryPolicy {
                attempts: 3,
                initial_backoff: Duration::from_millis(20),
                max_backoff: Duration::from_millis(100),
            },
            ..ClientOptions::default()
        },
        ..RemoteOptions::default()
    };
    options.s3.endpoint = Some(moto.endpoint());
    let cache = work.path().join("cache.asif");
    let made = create_cache_layer(&cache, url, &options, &CacheLayerOptions::default()).unwrap();
    assert_eq!(made.base_format, ImageFormat::Qcow2);
    assert!(made.identity.strong_etag().is_some());
    let resolver = Arc::new(RemoteResolver::new(
        options.clone(),
        AllowRemote::Hosts(vec!["images".into()]),
    ));
    let policy = ParentPolicy::same_directory().with_resolver(resolver.clone());
    let overlay = work.path().join("vm.asif");
    {
        let mut image =
            DiskImage::open(&cache, &OpenOptions::new().writable(true).parents(policy.clone())).unwrap();
        image.append_new(&overlay, &LayerOptions::overlay()).unwrap();
        let data = vec![0xabu8; 70_000];
        image.write_at(&data, 5 * MIB + 3).unwrap();
        model[(5 * MIB + 3) as usize..(5 * MIB + 3) as usize + data.len()].copy_from_slice(&data);
        assert!(read_all(&image) == model);
    }
    let requests = resolver.opened()[0].1.requests;
    assert!(requests > 1);
    {
        let image = DiskImage::open(
            &overlay,
            &OpenOptions::new().writable(true).parents(policy.clone()),
        )
        .unwrap();
        assert!(read_all(&image) == model, "after reopening");
    }

    // The default profile's credentials are refused by nobody (moto accepts any key), but a
    // bucket that is not allowed is never contacted.
    let other = Arc::new(RemoteResolver::new(
        options.clone(),
        AllowRemote::Hosts(vec!["other".into()]),
    ));
    let e = DiskImage::open(
        &overlay,
        &OpenOptions::new().parents(ParentPolicy::deny().with_resolver(other)),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PolicyDenied);

    // Replaced by a new upload: the next open is refused.
    let other_file = work.path().join("other.img");
    std::fs::write(&other_file, vec![7u8; 4 << 20]).unwrap();
    moto.put("images", "golden/base.qcow2", &other_file);
    let e = DiskImage::open(&overlay, &OpenOptions::new().parents(policy)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LayerMismatch, "{e}");
    assert!(e.to_string().contains("s3://images/golden/base.qcow2"), "{e}");

    // Without credentials (anonymous requests), moto refuses the private object: a clear
    // HTTP error, not a hang.
    std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", work.path().join("none"));
    std::env::set_var("AWS_CONFIG_FILE", work.path().join("none"));
    let e = create_cache_layer(
        &work.path().join("anon.asif"),
        url,
        &options,
        &CacheLayerOptions::default(),
    )
    .unwrap_err();
    assert_eq!(e.kind(), diskkit_deliver::ErrorKind::HttpStatus, "{e}");
    assert!(e.to_string().contains("403"), "{e}");
}
