//! Replays `fuzz/corpus/layer_unpack/` through the fuzz entry point; every accepted input's
//! filesystem must pass `e2fsck -fn`.

use std::process::Command;

#[test]
fn layer_unpack_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/layer_unpack");
    let tmp = tempfile::tempdir().unwrap();
    let mut n = 0;
    let mut accepted = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        n += 1;
        if let Some(fs) = diskkit_oci::fuzzing::layer_unpack(&data) {
            accepted += 1;
            let img = tmp.path().join("fs.img");
            std::fs::write(&img, fs).unwrap();
            let out = Command::new("e2fsck")
                .arg("-fn")
                .arg(&img)
                .output()
                .expect("e2fsck must be installed");
            assert!(
                out.status.success(),
                "{}: e2fsck failed:\n{}",
                path.display(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    assert!(n > 0, "empty corpus in {}", dir.display());
    eprintln!("{accepted} of {n} inputs accepted");
    assert!(accepted > 0, "no corpus input was accepted");
}
