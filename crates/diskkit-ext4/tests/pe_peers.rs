//! The PE section parser against binutils: `objdump -h` section tables of the installed Debian
//! kernel (an EFI-stub PE) and of a hand-made UKI, and `objcopy --dump-section` contents.

use std::path::{Path, PathBuf};
use std::process::Command;

use diskkit_ext4::read::pe::{build_test_pe, parse_pe, PeFile};

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (binutils; .ci/run installs it): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// (name, size, vma, file offset) rows of `objdump -h`.
fn objdump_sections(path: &Path) -> Vec<(String, u64, u64, u64)> {
    run("objdump", &["-h", &path.to_string_lossy()])
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 7 && f[0].parse::<u32>().is_ok()).then(|| {
                let hex = |s: &str| u64::from_str_radix(s, 16).unwrap();
                (f[1].to_owned(), hex(f[2]), hex(f[3]), hex(f[5]))
            })
        })
        .collect()
}

fn ours(pe: &PeFile) -> Vec<(String, u64, u64, u64)> {
    pe.sections
        .iter()
        .map(|s| {
            let (off, len) = s.file_range();
            (s.name.clone(), len, u64::from(s.virtual_address), off)
        })
        .collect()
}

fn debian_kernel() -> PathBuf {
    std::fs::read_dir("/boot")
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("vmlinuz-"))
        .expect("a kernel in /boot (linux-image-cloud-amd64; .ci/run installs it)")
}

#[test]
fn debian_kernel_sections_match_objdump() {
    let path = debian_kernel();
    let data = std::fs::read(&path).unwrap();
    let pe = parse_pe(&data[..]).unwrap();
    assert_eq!(pe.machine_name(), "x86-64");
    assert!(!pe.is_uki());
    // The stub's image base is 0, so objdump's VMA is the RVA.
    assert_eq!(ours(&pe), objdump_sections(&path));
}

#[test]
fn handmade_uki_matches_objdump_and_objcopy() {
    let dir = tempfile::tempdir().unwrap();
    let linux: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let initrd: Vec<u8> = (0..3_333u32).map(|i| (i % 13) as u8).collect();
    let image = build_test_pe(&[
        (".osrel", b"ID=test\n"),
        (".cmdline", b"console=ttyS0 root=/dev/vda"),
        (".uname", b"6.12.0"),
        (".initrd", &initrd),
        (".linux", &linux),
    ]);
    let path = dir.path().join("uki.efi");
    std::fs::write(&path, &image).unwrap();
    let pe = parse_pe(&image[..]).unwrap();
    assert!(pe.is_uki());
    assert_eq!(ours(&pe), objdump_sections(&path));
    for (section, expected) in [
        (".linux", &linux[..]),
        (".initrd", &initrd[..]),
        (".cmdline", &b"console=ttyS0 root=/dev/vda"[..]),
    ] {
        let out = dir.path().join(section.trim_start_matches('.'));
        run(
            "objcopy",
            &[
                "--dump-section",
                &format!("{section}={}", out.display()),
                &path.to_string_lossy(),
                &dir.path().join("scratch").to_string_lossy(),
            ],
        );
        let (off, len) = pe.section(section).unwrap().file_range();
        let mine = &image[off as usize..(off + len) as usize];
        assert_eq!(
            std::fs::read(&out).unwrap(),
            mine,
            "{section} differs from objcopy's"
        );
        assert_eq!(mine, expected);
    }
}
