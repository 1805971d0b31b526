//! Entry points for fuzzing (used by `fuzz/` and by the corpus replay test).

use crate::bundle::{self, BundleInfo, ExtractOptions};

/// Largest disk the fuzz entry point accepts.
const MAX_DISK: u64 = 64 << 20;

/// Read `data` as a bundle and check every rule, writing only `layer.qcow2` (to a temporary
/// directory). `data` is used as it is when it starts with the zstd magic number, and is
/// compressed first otherwise (so that the fuzzer explores the tar and member rules rather
/// than zstd's). Must never panic, whatever `data` holds.
pub fn bundle_read(data: &[u8]) -> Option<BundleInfo> {
    let compressed;
    let input: &[u8] = if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        data
    } else {
        compressed = zstd::encode_all(data, 1).ok()?;
        &compressed
    };
    let options = ExtractOptions {
        max_disk_size: MAX_DISK,
        ..ExtractOptions::default()
    };
    bundle::verify(&mut &input[..], &options, &mut |_| {}).ok()
}

/// Parse `data` as machine.json; a definition that parses must validate and survive a round
/// trip through its JSON.
pub fn machine_json(data: &[u8]) {
    if let Ok(m) = bundle::Machine::parse(data) {
        assert!(m.validate().is_ok());
        assert_eq!(bundle::Machine::parse(&m.to_json()).ok(), Some(m));
    }
}

/// Parse `data` as a manifest or index (the first byte picks the `Content-Type` it was
/// served with and the media type the caller expects; the rest is the body), check every
/// descriptor it names, and read an accepted manifest as a VM disk in tart's layout (its
/// configs are the bytes after the first NUL). An accepted document must survive a round
/// trip through its JSON. Returns what was accepted: "index", "manifest" or "tart" (a
/// manifest read as a VM disk). Must never panic.
pub fn registry_manifest(data: &[u8]) -> Option<&'static str> {
    use crate::registry::manifest::{self, Document};
    let (&selector, rest) = data.split_first()?;
    const TYPES: [Option<&str>; 6] = [
        None,
        Some(manifest::OCI_MANIFEST),
        Some(manifest::OCI_INDEX),
        Some(manifest::DOCKER_MANIFEST),
        Some(manifest::DOCKER_LIST),
        Some("application/json; charset=utf-8"),
    ];
    let content_type = TYPES[usize::from(selector & 7) % TYPES.len()];
    let expected = TYPES[usize::from(selector >> 4) % TYPES.len()].filter(|t| !t.contains(';'));
    let (body, configs) = match rest.iter().position(|&b| b == 0) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let (media_type, doc) = manifest::parse(body, content_type, expected).ok()?;
    assert!(manifest::kind_of(&media_type).is_some(), "{media_type}");
    match doc {
        Document::Index(index) => {
            for d in &index.manifests {
                let _ = d.validate("manifest");
            }
            let again = serde_json::to_vec(&index).expect("an index serialises");
            assert!(manifest::parse(&again, None, Some(&media_type)).is_ok());
            Some("index")
        }
        Document::Manifest(m) => {
            for d in m.layers.iter().chain([&m.config]) {
                let _ = d.validate("layer");
            }
            let again = serde_json::to_vec(&m).expect("a manifest serialises");
            assert!(manifest::parse(&again, None, Some(&media_type)).is_ok());
            let mut fetch = |d: &manifest::Descriptor| -> crate::Result<Vec<u8>> {
                Ok(configs[..configs.len().min(d.size.min(1 << 20) as usize)].to_vec())
            };
            if let Ok(layout) = crate::tart::pull::read_layout(&"fuzz", &m, &mut fetch) {
                let mut at = 0u64;
                for s in &layout.slices {
                    assert_eq!(s.offset, at);
                    assert!(s.len > 0);
                    at += s.len;
                }
                assert_eq!(at, layout.size);
                assert_eq!(layout.size % 512, 0);
                return Some("tart");
            }
            Some("manifest")
        }
    }
}

/// Parse `data` (as UTF-8) as an image reference; an accepted reference must print to a
/// form that parses back to the same reference. Must never panic.
pub fn registry_reference(data: &[u8]) {
    use crate::registry::Reference;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = crate::registry::looks_like_reference(text);
    let _ = crate::registry::reference::check_digest(text);
    if let Ok(r) = Reference::parse(text) {
        let _ = (r.api_host(), r.name(), r.manifest_reference(), r.is_local());
        let printed = r.to_string();
        let again = Reference::parse(&printed).unwrap_or_else(|e| panic!("{printed}: {e}"));
        assert_eq!(again.to_string(), printed);
        assert_eq!(again.name(), r.name());
    }
}

/// Parse `data` (as UTF-8) as a `WWW-Authenticate` header, as a token endpoint's answer and
/// as `USER:PASSWORD` credentials. Must never panic.
pub fn auth_header(data: &[u8]) {
    use crate::registry::auth;
    let _ = auth::parse_token(data, "fuzz");
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(challenges) = auth::parse_challenges(text) {
        for c in &challenges {
            let _ = (c.param("realm"), c.param("service"), c.param("scope"));
        }
    }
    if let Ok(c) = auth::Credentials::parse(text) {
        assert!(c.basic_header().starts_with("Basic "));
    }
}

/// Decode `data` as Apple's LZ4 framing (at most 16 MiB), in one go and through the
/// streaming decoder with small reads; both must agree, and what decodes must encode and
/// decode back to itself. Must never panic.
pub fn apple_lz4(data: &[u8]) {
    use crate::tart::lz4;
    use std::io::Read;
    const LIMIT: u64 = 16 << 20;
    let whole = lz4::decode(data, LIMIT);
    let mut d = lz4::Decoder::new(data);
    let mut streamed = Vec::new();
    let mut buf = [0u8; 1000];
    let mut ok = true;
    loop {
        match d.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                streamed.extend_from_slice(&buf[..n]);
                if streamed.len() as u64 > LIMIT {
                    ok = false;
                    break;
                }
            }
            Err(_) => {
                ok = false;
                break;
            }
        }
    }
    let ok = ok && d.finish().is_ok();
    match whole {
        Ok(out) => {
            assert!(ok, "decode accepted what the streaming decoder refused");
            assert_eq!(out, streamed);
            let again = lz4::encode(&out);
            assert_eq!(lz4::decode(&again, out.len() as u64).expect("own encoding"), out);
        }
        Err(_) => assert!(!ok, "the streaming decoder accepted what decode refused"),
    }
}

/// Parse `data` as the parent hint of a layer naming a remote base (URL and identity); a hint
/// that parses must survive a round trip, and its URL must be a remote one.
pub fn remote_hint(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(Some(hint)) = crate::remote::RemoteHint::parse(text) {
        assert!(crate::remote::is_remote(&hint.url));
        let again = crate::remote::RemoteHint::parse(&hint.to_hint());
        assert_eq!(again.ok().flatten(), Some(hint.clone()));
        let _ = crate::remote::remote_host(&hint.url);
    }
}
