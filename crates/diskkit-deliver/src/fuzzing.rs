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
