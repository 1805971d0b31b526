//! Choosing the accelerator. `--accel auto` uses KVM only when `/dev/kvm` opens *and* a
//! guest actually runs on it: on some hosts (nested virtualisation without the CPU features
//! QEMU's default model asks for) the device opens, a few instructions run, and the kernel
//! then hangs or QEMU aborts. So the probe boots the image's own kernel under KVM with the
//! same machine and CPU options as the real boot, with a tiny initramfs whose `/init`
//! prints a marker on the serial console and powers off. The result is kept per host boot
//! (`/proc/sys/kernel/random/boot_id`) and QEMU binary in the runtime directory base, so
//! only the first boot after a reboot pays for it.

use std::fs;
use std::io::Read;
#[cfg(test)]
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::kernel::Arch;
use super::qemu::Engine;

/// How long the probe guest may take to print its marker.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
const MARKER: &[u8] = b"diskkit-kvm-probe-ok\n";

/// x86-64 code of the probe's `/init`: `write(1, marker, 21)`, `reboot(POWER_OFF)`, spin.
/// Assembled from:
/// ```text
/// mov eax, 1; mov edi, 1; lea rsi, [rip+msg]; mov edx, 21; syscall
/// mov eax, 169; mov edi, 0xfee1dead; mov esi, 0x28121969; mov edx, 0x4321fedc; syscall
/// 1: jmp 1b
/// ```
const X86_64_CODE: [u8; 48] = [
    0xb8, 0x01, 0x00, 0x00, 0x00, 0xbf, 0x01, 0x00, 0x00, 0x00, 0x48, 0x8d, 0x35, 0x1f, 0x00, 0x00, 0x00,
    0xba, 0x15, 0x00, 0x00, 0x00, 0x0f, 0x05, 0xb8, 0xa9, 0x00, 0x00, 0x00, 0xbf, 0xad, 0xde, 0xe1, 0xfe,
    0xbe, 0x69, 0x19, 0x12, 0x28, 0xba, 0xdc, 0xfe, 0x21, 0x43, 0x0f, 0x05, 0xeb, 0xfe,
];

/// The same for arm64 (`write` is syscall 64, `reboot` 142), one instruction per word:
/// `movz x0,#1; adr x1,msg; movz x2,#21; movz x8,#64; svc #0; movz x0,#0xdead;
/// movk x0,#0xfee1,lsl #16; movz x1,#0x1969; movk x1,#0x2812,lsl #16; movz x2,#0xfedc;
/// movk x2,#0x4321,lsl #16; movz x8,#142; svc #0; b .` (the marker follows at byte 56).
const AARCH64_CODE: [u32; 14] = [
    0xD280_0020,
    0x1000_01A1,
    0xD280_02A2,
    0xD280_0808,
    0xD400_0001,
    0xD29B_D5A0,
    0xF2BF_DC20,
    0xD283_2D21,
    0xF2A5_0241,
    0xD29F_DB82,
    0xF2A8_6422,
    0xD280_11C8,
    0xD400_0001,
    0x1400_0000,
];

/// A static ELF executable of `code` followed by the marker.
fn init_elf(arch: Arch) -> Vec<u8> {
    let (machine, mut code): (u16, Vec<u8>) = match arch {
        Arch::X86_64 => (0x3E, X86_64_CODE.to_vec()),
        Arch::Aarch64 => (0xB7, AARCH64_CODE.iter().flat_map(|w| w.to_le_bytes()).collect()),
    };
    code.extend_from_slice(MARKER);
    const BASE: u64 = 0x40_0000;
    const HEADERS: u64 = 64 + 56;
    let total = HEADERS + code.len() as u64;
    let mut e = Vec::with_capacity(total as usize);
    e.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&machine.to_le_bytes());
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(BASE + HEADERS).to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // program headers
    e.extend_from_slice(&0u64.to_le_bytes()); // no sections
    e.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    e.extend_from_slice(&0u64.to_le_bytes());
    e.extend_from_slice(&BASE.to_le_bytes());
    e.extend_from_slice(&BASE.to_le_bytes());
    e.extend_from_slice(&total.to_le_bytes());
    e.extend_from_slice(&total.to_le_bytes());
    e.extend_from_slice(&0x1000u64.to_le_bytes());
    e.extend_from_slice(&code);
    e
}

/// A newc cpio archive: `/dev`, `/dev/console` (5:1, the kernel opens it for init) and
/// `/init`.
fn probe_initramfs(arch: Arch) -> Vec<u8> {
    let mut out = Vec::new();
    let mut add = |ino: u32, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| {
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    add(1, "dev", 0o040755, (0, 0), &[]);
    add(2, "dev/console", 0o020600, (5, 1), &[]);
    add(3, "init", 0o100755, (0, 0), &init_elf(arch));
    add(0, "TRAILER!!!", 0, (0, 0), &[]);
    out
}

/// What the probe found, as kept between runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Verdict {
    boot_id: String,
    qemu: PathBuf,
    qemu_mtime: i64,
    arch: Arch,
    /// `None` when KVM works, else why not.
    failure: Option<String>,
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Whether `/dev/kvm` can be opened read-write; the error otherwise.
pub(crate) fn kvm_opens() -> std::result::Result<(), String> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))
}

/// The accelerator for `--accel auto`: KVM if the host runs `arch`, `/dev/kvm` opens and a
/// probe guest runs on it; TCG otherwise, with the reason.
pub(crate) fn choose_auto(
    arch: Arch,
    qemu: &Path,
    kernel: &Path,
    cache_dir: &Path,
    scratch: &Path,
) -> (Engine, Option<String>) {
    if Arch::host() != Some(arch) {
        return (
            Engine::Tcg,
            Some(format!("the image is {}, the host is not", arch.name())),
        );
    }
    if let Err(e) = kvm_opens() {
        return (Engine::Tcg, Some(e));
    }
    let verdict_path = cache_dir.join(format!("kvm-probe-{}.json", arch.name()));
    let mtime = fs::metadata(qemu).map(|m| m.mtime()).unwrap_or(0);
    let id = boot_id();
    if let Some(v) = fs::read(&verdict_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Verdict>(&b).ok())
        .filter(|v| {
            v.boot_id == id && !id.is_empty() && v.qemu == qemu && v.qemu_mtime == mtime && v.arch == arch
        })
    {
        return match v.failure {
            None => (Engine::Kvm, None),
            Some(f) => (Engine::Tcg, Some(f)),
        };
    }
    let failure = probe(arch, qemu, kernel, scratch, Engine::Kvm, PROBE_TIMEOUT)
        .err()
        .map(|e| format!("{e:#}"));
    let v = Verdict {
        boot_id: id,
        qemu: qemu.to_path_buf(),
        qemu_mtime: mtime,
        arch,
        failure: failure.clone(),
    };
    if let Ok(json) = serde_json::to_vec(&v) {
        let tmp = verdict_path.with_extension(format!("tmp{}", std::process::id()));
        if fs::write(&tmp, json).is_ok() && fs::rename(&tmp, &verdict_path).is_err() {
            let _ = fs::remove_file(&tmp);
        }
    }
    match failure {
        None => (Engine::Kvm, None),
        Some(f) => (Engine::Tcg, Some(f)),
    }
}

/// Boot `kernel` with the probe initramfs; Ok once the marker arrives within `limit`.
fn probe(
    arch: Arch,
    qemu: &Path,
    kernel: &Path,
    scratch: &Path,
    engine: Engine,
    limit: Duration,
) -> Result<()> {
    let initrd = scratch.join("kvm-probe.cpio");
    fs::write(&initrd, probe_initramfs(arch)).with_context(|| format!("writing '{}'", initrd.display()))?;
    let machine = match arch {
        Arch::X86_64 => "q35",
        Arch::Aarch64 => "virt,gic-version=max",
    };
    let mut cmd = Command::new(qemu);
    let cpu = match engine {
        Engine::Kvm => "host",
        Engine::Tcg => "max",
    };
    cmd.args([
        "-machine",
        machine,
        "-accel",
        engine.name(),
        "-cpu",
        cpu,
        "-m",
        "256",
        "-smp",
        "1",
    ])
    .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(&initrd)
    .args([
        "-append",
        &format!("console={} panic=-1 rdinit=/init", arch.console()),
    ])
    .args(["-serial", "stdio"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe; it only sets this process's parent-death signal.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting '{}'", qemu.display()))?;
    let mut stdout = child.stdout.take().context("probe stdout")?;
    let mut stderr = child.stderr.take().context("probe stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    seen.extend_from_slice(&buf[..n]);
                    // The console turns the newline into CR LF: match the text only.
                    let text = &MARKER[..MARKER.len() - 1];
                    if seen.windows(text.len()).any(|w| w == text) {
                        let _ = tx.send(());
                        break;
                    }
                    if seen.len() > 1 << 20 {
                        seen.drain(..seen.len() - 4096);
                    }
                }
            }
        }
    });
    let err_thread = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = (&mut stderr).take(64 << 10).read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let start = Instant::now();
    let outcome = loop {
        if rx.recv_timeout(Duration::from_millis(50)).is_ok() {
            break Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            // Give the reader a moment: the marker may be in flight.
            if rx.recv_timeout(Duration::from_millis(200)).is_ok() {
                break Ok(());
            }
            let _ = status;
            break Err(None);
        }
        if start.elapsed() > limit {
            break Err(Some(format!(
                "a probe guest did not start on {} within {}s",
                engine.name().to_uppercase(),
                limit.as_secs()
            )));
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let stderr_text = err_thread.join().unwrap_or_default();
    match outcome {
        Ok(()) => Ok(()),
        Err(Some(msg)) => anyhow::bail!("{msg}"),
        Err(None) => {
            let line = stderr_text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no output")
                .trim();
            anyhow::bail!("QEMU failed on {}: {line}", engine.name().to_uppercase())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_tmp(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    /// The probe guest under TCG with the host's Debian kernel (installed by `.ci/run`):
    /// the ELF and the cpio are right when the marker arrives.
    #[test]
    fn probe_guest_runs_under_tcg() {
        let kernel = fs::read_dir("/boot")
            .expect("/boot")
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .expect("a kernel in /boot (linux-image-cloud-amd64)");
        let qemu = super::super::qemu::find(Arch::X86_64, None).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        probe(
            Arch::X86_64,
            &qemu,
            &kernel,
            scratch.path(),
            Engine::Tcg,
            Duration::from_secs(120),
        )
        .unwrap();
    }

    #[test]
    fn aarch64_words_encode_what_they_say() {
        let movz = |rd: u32, imm: u32, hw: u32| 0xD280_0000 | hw << 21 | imm << 5 | rd;
        let movk = |rd: u32, imm: u32, hw: u32| 0xF280_0000 | hw << 21 | imm << 5 | rd;
        let adr = |rd: u32, off: u32| 0x1000_0000 | (off & 3) << 29 | (off >> 2) << 5 | rd;
        let expect = [
            movz(0, 1, 0),
            adr(1, 56 - 4),
            movz(2, MARKER.len() as u32, 0),
            movz(8, 64, 0),
            0xD400_0001,
            movz(0, 0xdead, 0),
            movk(0, 0xfee1, 1),
            movz(1, 0x1969, 0),
            movk(1, 0x2812, 1),
            movz(2, 0xfedc, 0),
            movk(2, 0x4321, 1),
            movz(8, 142, 0),
            0xD400_0001,
            0x1400_0000,
        ];
        assert_eq!(AARCH64_CODE, expect);
        assert_eq!(AARCH64_CODE.len() * 4, 56);
    }

    #[test]
    fn x86_64_marker_offset() {
        // `lea rsi, [rip+0x1f]` ends at byte 17: the marker starts at 17 + 0x1f = 48.
        assert_eq!(X86_64_CODE.len(), 17 + 0x1f);
        assert_eq!(MARKER.len(), 21);
    }

    #[test]
    fn initramfs_lists_with_cpio() {
        let f = write_tmp(&probe_initramfs(Arch::X86_64));
        let out = std::process::Command::new("cpio")
            .args(["-itv", "-F"])
            .arg(f.path())
            .output()
            .expect("cpio");
        let list = String::from_utf8_lossy(&out.stdout);
        assert!(list.contains("dev/console"), "{list}");
        assert!(
            list.lines()
                .any(|l| l.starts_with("crw-------") && l.contains("5,")),
            "{list}"
        );
        assert!(
            list.lines()
                .any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with("init")),
            "{list}"
        );
    }

    #[test]
    fn init_elf_is_an_executable_objdump_reads() {
        let f = write_tmp(&init_elf(Arch::X86_64));
        let out = std::process::Command::new("readelf")
            .args(["-h", "-l"])
            .arg(f.path())
            .output()
            .expect("readelf");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("EXEC (Executable file)"), "{text}");
        assert!(text.contains("Advanced Micro Devices X86-64"), "{text}");
        assert!(
            text.contains("Entry point address:               0x400078"),
            "{text}"
        );
        let f = write_tmp(&init_elf(Arch::Aarch64));
        let out = std::process::Command::new("readelf")
            .arg("-h")
            .arg(f.path())
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&out.stdout).contains("AArch64"));
    }
}
