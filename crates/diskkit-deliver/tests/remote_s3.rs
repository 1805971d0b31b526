//! Remote bases in S3, against the moto server (no S3-compatible server is packaged for
//! Debian 12; moto from PyPI speaks the S3 API): credentials and region from an AWS profile in
//! files named by the environment, as the AWS CLI reads them, SigV4-signed range requests
//! (signatures checked with botocore: moto does not check them),
//! a custom endpoint, a replaced object refused.
//!
//! One test in this binary, because it sets process-wide environment variables.

#[path = "support/moto.rs"]
mod moto;
mod support;

use std::sync::Arc;
use std::time::Duration;

use diskkit::{CreateOptions, DiskImage, ErrorKind, ImageFormat, LayerOptions, OpenOptions, ParentPolicy};
use diskkit_deliver::http::{ClientOptions, RetryPolicy};
use diskkit_deliver::remote::{
    create_cache_layer, AllowRemote, CacheLayerOptions, RemoteOptions, RemoteResolver,
};
use moto::Moto;
use support::Rng;

const MIB: u64 = 1 << 20;

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
    // No instance metadata service: on a cloud machine a real one would answer.
    std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    for v in [
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    ] {
        std::env::remove_var(v);
    }

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

    // moto does not verify presigned signatures (see support/moto.rs): botocore checks every
    // request moto saw, signed with the `ci` profile's secret, not the default profile's.
    let (good, bad) = moto.check_signatures("/images/", moto::SECRET);
    assert!(good as u64 >= requests && bad == 0, "{good} good, {bad} bad");
    assert_eq!(moto.check_signatures("/images/", "wrong").0, 0);

    // A bucket that is not allowed is never contacted.
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
