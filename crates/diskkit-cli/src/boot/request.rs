//! What a boot is asked to do: [`BootRequest`] and its parts, parsed from the command line
//! or filled by other callers.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use diskkit::ImageFormat;

use crate::args::{Output, ParentArgs};

/// Largest COMMAND script: systemd refuses credentials over 1 MiB.
pub(crate) const MAX_SCRIPT: usize = 512 << 10;

/// The virtual hardware: what a machine definition supplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Machine {
    /// Memory in bytes.
    pub(crate) memory: u64,
    /// Virtual CPUs.
    pub(crate) cpus: u32,
    /// The network card's MAC address (QEMU's default when `None`).
    pub(crate) mac: Option<[u8; 6]>,
}

/// Memory when neither `--memory` nor a machine definition gives it.
pub(crate) const DEFAULT_MEMORY: u64 = 2 << 30;
/// Virtual CPUs when neither `--cpus` nor a machine definition gives them.
pub(crate) const DEFAULT_CPUS: u32 = 2;
/// Most virtual CPUs (as `--cpus` accepts).
pub(crate) const MAX_CPUS: u32 = 1024;

/// The virtual hardware asked for on the command line; what it leaves unset comes from the
/// machine definition of a cache instance, else from the defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct MachineRequest {
    pub(crate) memory: Option<u64>,
    pub(crate) cpus: Option<u32>,
    pub(crate) mac: Option<[u8; 6]>,
}

impl MachineRequest {
    /// The machine: explicit values first, then those of `definition` (a taskcluster
    /// `machine.json`, version 1, already validated: `memory` in MiB, `threads` × `cores` ×
    /// `sockets` CPUs, `mac`), then the defaults. Also returns which values came from the
    /// definition. Its other keys (chipset, devices) do not apply to a direct-kernel-boot
    /// virtio VM and are not used.
    pub(crate) fn resolve(
        &self,
        definition: Option<&diskkit_deliver::bundle::Machine>,
    ) -> Result<(Machine, Vec<&'static str>)> {
        let mut from = Vec::new();
        let memory = match (self.memory, definition.and_then(|d| d.memory)) {
            (Some(m), _) => m,
            (None, Some(mib)) => {
                if mib < 64 {
                    bail!(
                        "the machine definition asks for {mib} MiB of memory; a guest needs at least 64 MiB: give --memory"
                    );
                }
                from.push("memory");
                u64::from(mib) << 20
            }
            (None, None) => DEFAULT_MEMORY,
        };
        let defined_cpus = definition
            .filter(|d| d.threads.is_some() || d.cores.is_some() || d.sockets.is_some())
            .map(|d| d.cpus());
        let cpus = match (self.cpus, defined_cpus) {
            (Some(c), _) => c,
            (None, Some(c)) => {
                if !(1..=MAX_CPUS).contains(&c) {
                    bail!(
                        "the machine definition asks for {c} CPUs (threads × cores × sockets); at most {MAX_CPUS} are possible: give --cpus"
                    );
                }
                from.push("cpus");
                c
            }
            (None, None) => DEFAULT_CPUS,
        };
        let mac = match (self.mac, definition.and_then(|d| d.mac.as_deref())) {
            (Some(m), _) => Some(m),
            (None, Some(text)) => {
                from.push("mac");
                Some(parse_mac(text).context("the machine definition's mac")?)
            }
            (None, None) => None,
        };
        Ok((Machine { memory, cpus, mac }, from))
    }
}

/// Parse `52:54:00:12:34:56`; multicast addresses are refused.
pub(crate) fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    let mut mac = [0u8; 6];
    if parts.len() != 6 {
        bail!("MAC address '{s}' must be six hex bytes like 52:54:00:12:34:56");
    }
    for (m, p) in mac.iter_mut().zip(&parts) {
        *m = u8::from_str_radix(p, 16)
            .ok()
            .filter(|_| p.len() == 2)
            .with_context(|| format!("MAC address '{s}' must be six hex bytes like 52:54:00:12:34:56"))?;
    }
    if mac[0] & 1 == 1 {
        bail!("MAC address '{s}' is a multicast address");
    }
    Ok(mac)
}

pub(crate) fn format_mac(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Parse `90`, `90s`, `5m`, `1h`, `1h30m`, `1.5m`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration> {
    const FORM: &str = "expected a number with s, m or h: 90s, 5m, 1h30m";
    let t = s.trim();
    if t.is_empty() {
        bail!("{FORM}");
    }
    let mut total = 0f64;
    let mut num = String::new();
    let mut any = false;
    for c in t.chars() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1.0,
            'm' => 60.0,
            'h' => 3600.0,
            _ => bail!("{FORM}"),
        };
        let n: f64 = num.parse().map_err(|_| anyhow!(FORM))?;
        total += n * unit;
        num.clear();
        any = true;
    }
    if !num.is_empty() {
        total += num.parse::<f64>().map_err(|_| anyhow!(FORM))?;
        any = true;
    }
    if !any || !total.is_finite() {
        bail!("{FORM}");
    }
    if total <= 0.0 {
        bail!("a duration must be greater than zero");
    }
    if total > 1e9 {
        bail!("'{s}' is too long");
    }
    Ok(Duration::from_secs_f64(total))
}

/// The accelerator requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accel {
    Auto,
    Kvm,
    Tcg,
}

/// Guest networking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Net {
    User,
    None,
}

/// How disks reach QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// Files when QEMU opens every layer, else NBD.
    Auto,
    /// Always NBD.
    Nbd,
}

/// What to boot.
#[derive(Debug, Clone)]
pub(crate) enum SourceSpec {
    /// A disk image or an OCI image (`PATH[:REF]`).
    Path(String),
    /// An Apple `container` store and an image reference.
    AppleStore { root: PathBuf, reference: String },
    /// A cache instance (`diskkit cache instance`): its overlay is the root's writable layer,
    /// its machine definition the default hardware. `cache`: the cache directory (default:
    /// the cache's own default).
    Instance { cache: Option<PathBuf>, name: String },
}

/// An extra disk (`--disk PATH[,ro][,format=F]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DiskSpec {
    pub(crate) path: PathBuf,
    pub(crate) read_only: bool,
    pub(crate) format: Option<ImageFormat>,
}

impl DiskSpec {
    /// Parse `PATH[,ro][,format=F]`. A path containing commas is written with them doubled
    /// (`a,,b`), as QEMU does.
    pub(crate) fn parse(s: &str) -> Result<DiskSpec> {
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            if c == ',' {
                if chars.peek() == Some(&',') {
                    chars.next();
                    cur.push(',');
                } else {
                    fields.push(std::mem::take(&mut cur));
                }
            } else {
                cur.push(c);
            }
        }
        fields.push(cur);
        let mut it = fields.into_iter();
        let path = it
            .next()
            .filter(|p| !p.is_empty())
            .context("no path before the options (PATH[,ro][,format=F])")?;
        let mut spec = DiskSpec {
            path: PathBuf::from(path),
            read_only: false,
            format: None,
        };
        for f in it {
            match f.split_once('=') {
                None if f == "ro" => spec.read_only = true,
                None if f == "rw" => spec.read_only = false,
                Some(("format", v)) => {
                    spec.format = Some(match v {
                        "raw" => ImageFormat::Raw,
                        "asif" => ImageFormat::Asif,
                        "qcow2" => ImageFormat::Qcow2,
                        _ => bail!("format={v}: the format is raw, asif or qcow2"),
                    })
                }
                _ => bail!("unknown option '{f}': PATH[,ro][,format=raw|asif|qcow2] (a comma in PATH is written twice)"),
            }
        }
        Ok(spec)
    }
}

/// Everything one boot needs.
#[derive(Debug, Clone)]
pub(crate) struct BootRequest {
    pub(crate) source: SourceSpec,
    pub(crate) format: Option<ImageFormat>,
    pub(crate) parents: ParentArgs,
    /// `--max-cache-size`: the bound of the root stack's cache layer (a remote base's).
    pub(crate) max_cache_size: Option<u64>,
    pub(crate) partition: Option<String>,
    pub(crate) platform: Option<String>,
    pub(crate) machine: MachineRequest,
    pub(crate) accel: Accel,
    pub(crate) kargs: Vec<String>,
    pub(crate) disks: Vec<DiskSpec>,
    pub(crate) persist: Option<PathBuf>,
    pub(crate) ssh: bool,
    pub(crate) net: Net,
    pub(crate) size: Option<u64>,
    pub(crate) store: Option<PathBuf>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) qemu: Option<PathBuf>,
    pub(crate) kernel_version: Option<String>,
    pub(crate) console_log: Option<PathBuf>,
    pub(crate) command: Vec<String>,
    /// `Some(output)`: print the plan and start nothing.
    pub(crate) dry_run: Option<Output>,
    pub(crate) verbose: bool,
    /// No notes on stderr (errors and warnings are still printed).
    pub(crate) quiet: bool,
    pub(crate) transport: Transport,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        for bad in ["", "0", "5x", "m", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn disk_specs() {
        assert_eq!(
            DiskSpec::parse("a,,b.img,ro,format=qcow2").unwrap(),
            DiskSpec {
                path: "a,b.img".into(),
                read_only: true,
                format: Some(ImageFormat::Qcow2)
            }
        );
        assert!(!DiskSpec::parse("x.raw").unwrap().read_only);
        assert!(DiskSpec::parse("x.raw,format=vmdk").is_err());
        assert!(DiskSpec::parse(",ro").is_err());
        assert!(DiskSpec::parse("x,bogus").is_err());
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56").unwrap(),
            [0x52, 0x54, 0, 0x12, 0x34, 0x56]
        );
        assert_eq!(
            format_mac([0xaa, 0x54, 0x1a, 0x30, 0x5c, 0xde]),
            "aa:54:1a:30:5c:de"
        );
        assert!(parse_mac("01:00:5e:00:00:01").is_err());
        assert!(parse_mac("52:54:00:12:34").is_err());
        assert!(parse_mac("52:54:00:12:34:5").is_err());
    }

    #[test]
    fn machine_definitions() {
        let def: diskkit_deliver::bundle::Machine = diskkit_deliver::bundle::Machine::parse(
            br#"{"version":1,"memory":4096,"threads":2,"cores":2,"mac":"aa:54:1a:30:5c:de","chipset":"pc-i440fx-2.8"}"#,
        )
        .unwrap();
        let none = MachineRequest::default();
        let (m, from) = none.resolve(Some(&def)).unwrap();
        assert_eq!(
            m,
            Machine {
                memory: 4 << 30,
                cpus: 4,
                mac: Some([0xaa, 0x54, 0x1a, 0x30, 0x5c, 0xde])
            }
        );
        assert_eq!(from, ["memory", "cpus", "mac"]);
        // Explicit values win, one by one.
        let some = MachineRequest {
            memory: Some(1 << 30),
            cpus: None,
            mac: Some([0x52, 0x54, 0, 1, 2, 3]),
        };
        let (m, from) = some.resolve(Some(&def)).unwrap();
        assert_eq!(
            (m.memory, m.cpus, m.mac),
            (1 << 30, 4, Some([0x52, 0x54, 0, 1, 2, 3]))
        );
        assert_eq!(from, ["cpus"]);
        // Nothing defined: the defaults.
        let bare = diskkit_deliver::bundle::Machine::parse(br#"{"version":1}"#).unwrap();
        let defaults = Machine {
            memory: DEFAULT_MEMORY,
            cpus: DEFAULT_CPUS,
            mac: None,
        };
        assert_eq!(none.resolve(Some(&bare)).unwrap(), (defaults, vec![]));
        assert_eq!(none.resolve(None).unwrap(), (defaults, vec![]));
        // Values a VM cannot have: a clear error naming the flag that overrides them.
        let tiny = diskkit_deliver::bundle::Machine::parse(br#"{"version":1,"memory":32}"#).unwrap();
        let e = none.resolve(Some(&tiny)).unwrap_err().to_string();
        assert!(e.contains("32 MiB") && e.contains("--memory"), "{e}");
        assert!(MachineRequest {
            memory: Some(1 << 30),
            ..none
        }
        .resolve(Some(&tiny))
        .is_ok());
        let huge =
            diskkit_deliver::bundle::Machine::parse(br#"{"version":1,"threads":16,"cores":16,"sockets":16}"#)
                .unwrap();
        let e = none.resolve(Some(&huge)).unwrap_err().to_string();
        assert!(e.contains("4096 CPUs") && e.contains("--cpus"), "{e}");
    }
}
