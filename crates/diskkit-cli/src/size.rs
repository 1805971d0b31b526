//! Sizes and offsets on the command line: decimal bytes, `0x` hex bytes, or a number with a
//! binary unit (`40G`, `40GB`, `40GiB`, `1.5T`, `512M`, `4k`, `4096B`).
//!
//! Units are binary (K = 1024), as in `qemu-img` and `diskutil`. These are clap value parsers,
//! so a bad value is reported by clap with the option's name, the usage and a pointer to the
//! subcommand's help.

use std::fmt;

/// A byte count or offset as given on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bytes {
    /// The value in bytes.
    pub(crate) value: u64,
    /// Whether the text carried no unit and was decimal (`40`, not `40G`, `40B` or `0x28`):
    /// such a value is in bytes, which for a disk size is rarely what was meant.
    pub(crate) bare: bool,
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.value)
    }
}

const UNIT_HELP: &str = "expected bytes (4096, 0x1000) or a number with a unit (512M, 40G, 1.5T)";

/// Parse an offset or length: any non-negative byte count.
pub(crate) fn bytes(text: &str) -> Result<Bytes, String> {
    let t = text.trim();
    if t.starts_with('-') {
        return Err("offsets and sizes cannot be negative".into());
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("'{text}' is not a hexadecimal number"));
        }
        let value = u64::from_str_radix(hex, 16).map_err(|_| format!("'{text}' is too large"))?;
        return Ok(Bytes { value, bare: false });
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() || num == "." {
        return Err(UNIT_HELP.into());
    }
    let unit = unit.trim();
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        _ => {
            return Err(format!(
                "unknown unit '{unit}': use K, M, G, T, P or E (powers of 1024), or B for bytes"
            ))
        }
    };
    let scale = 1u128 << shift;
    let value: u128 = match num.split_once('.') {
        Some((int, frac)) => {
            if shift == 0 {
                return Err("a number of bytes must be whole".into());
            }
            if frac.is_empty() || frac.len() > 9 || frac.contains('.') {
                return Err(UNIT_HELP.into());
            }
            let int: u128 = if int.is_empty() {
                0
            } else {
                int.parse().map_err(|_| format!("'{text}' is too large"))?
            };
            let f: u128 = frac.parse().map_err(|_| UNIT_HELP.to_owned())?;
            let denom = 10u128.pow(frac.len() as u32);
            int.checked_mul(scale)
                .and_then(|v| v.checked_add(f * scale / denom))
                .unwrap_or(u128::MAX)
        }
        None => {
            let n: u128 = num.parse().map_err(|_| format!("'{text}' is too large"))?;
            n.saturating_mul(scale)
        }
    };
    let value = u64::try_from(value).map_err(|_| format!("'{text}' is too large"))?;
    Ok(Bytes {
        value,
        bare: unit.is_empty(),
    })
}

/// Below this, a disk size without a unit is taken for a forgotten unit.
const SMALLEST_BARE_DISK: u64 = 1 << 20;

/// Parse the size of a disk or filesystem: like [`bytes`], but greater than zero, and a
/// number without a unit below 1 MiB is refused (`--size 40` almost always meant `40G`).
pub(crate) fn disk_size(text: &str) -> Result<Bytes, String> {
    let b = bytes(text)?;
    if b.value == 0 {
        return Err("a disk size must be greater than zero".into());
    }
    if b.bare && b.value < SMALLEST_BARE_DISK {
        let n = text.trim();
        return Err(format!(
            "'{n}' has no unit, so it means {n} bytes; write {n}G, {n}M or {n}K, or {n}B if you \
             really mean bytes"
        ));
    }
    Ok(b)
}

/// A size change for `resize`: absolute, or relative with a leading `+` / `-`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SizeChange {
    Absolute(Bytes),
    Grow(Bytes),
    Shrink(Bytes),
}

/// Parse `SIZE`, `+SIZE` or `-SIZE`.
pub(crate) fn size_change(text: &str) -> Result<SizeChange, String> {
    let t = text.trim();
    if t.starts_with("--") || t.starts_with("+-") || t.starts_with("-+") || t.starts_with("++") {
        return Err("give one sign: +SIZE to grow, -SIZE to shrink, or SIZE".into());
    }
    Ok(if let Some(rest) = t.strip_prefix('+') {
        SizeChange::Grow(bytes(rest)?)
    } else if let Some(rest) = t.strip_prefix('-') {
        SizeChange::Shrink(bytes(rest)?)
    } else {
        SizeChange::Absolute(disk_size(t)?)
    })
}

/// A chunk or cluster size: bytes or a unit, at most 4 GiB.
pub(crate) fn unit_size(text: &str) -> Result<u32, String> {
    let b = bytes(text)?;
    u32::try_from(b.value).map_err(|_| format!("'{text}' is too large"))
}

/// `size` rounded up to whole blocks of `block`; warns when that changes it.
pub(crate) fn whole_blocks(size: u64, block: u32, what: &str) -> anyhow::Result<u64> {
    let rounded = size
        .checked_next_multiple_of(u64::from(block))
        .ok_or_else(|| anyhow::anyhow!("{what} {size} is too large"))?;
    if rounded != size {
        crate::messages::warn(format_args!(
            "{what} of {size} bytes is not a whole number of {block}-byte blocks; rounded up to \
             {rounded} bytes"
        ));
    }
    Ok(rounded)
}

/// `64 MiB (67108864 bytes)`, or `22 bytes` below 1 KiB: an amount people read and can check.
pub(crate) fn human_exact(bytes: u64) -> String {
    if bytes < 1024 {
        format!("{bytes} bytes")
    } else {
        format!("{} ({bytes} bytes)", human(bytes))
    }
}

/// `40 GiB` style, for human output.
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        let s = format!("{v:.2}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        format!("{s} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> u64 {
        bytes(s).unwrap().value
    }

    #[test]
    fn units() {
        assert_eq!(v("4096"), 4096);
        assert_eq!(v("40G"), 40 << 30);
        assert_eq!(v("40GB"), 40 << 30);
        assert_eq!(v("40GiB"), 40 << 30);
        assert_eq!(v("512M"), 512 << 20);
        assert_eq!(v("512m"), 512 << 20);
        assert_eq!(v("1.5K"), 1536);
        assert_eq!(v("64k"), 65536);
        assert_eq!(v("40B"), 40);
        assert_eq!(v("+1G"), 1 << 30);
    }

    #[test]
    fn hex() {
        assert_eq!(v("0x400"), 0x400);
        assert_eq!(v("0X7fffFFFF"), 0x7fff_ffff);
        assert!(!bytes("0x400").unwrap().bare);
        assert!(bytes("0x").is_err());
        assert!(bytes("0xg").is_err());
        assert!(bytes("0x10000000000000000").is_err());
    }

    #[test]
    fn bare_is_noticed() {
        assert!(bytes("40").unwrap().bare);
        assert!(!bytes("40B").unwrap().bare);
        assert!(!bytes("40G").unwrap().bare);
    }

    #[test]
    fn bad_sizes() {
        for bad in [
            "",
            "G",
            "12X",
            "-5",
            "-5G",
            "1.5",
            "99999999999999999999",
            "17E",
            "1..5G",
            "abc",
            ".",
        ] {
            assert!(bytes(bad).is_err(), "{bad}");
        }
        assert!(bytes("-5G").unwrap_err().contains("negative"));
    }

    #[test]
    fn disk_sizes() {
        assert!(disk_size("40").unwrap_err().contains("40G"));
        assert!(disk_size("0").is_err());
        assert!(disk_size("0G").is_err());
        assert_eq!(disk_size("40B").unwrap().value, 40);
        assert_eq!(disk_size("1048576").unwrap().value, 1 << 20);
        assert_eq!(disk_size("0x200").unwrap().value, 512);
    }

    #[test]
    fn changes() {
        assert_eq!(
            size_change("+1G").unwrap(),
            SizeChange::Grow(bytes("1G").unwrap())
        );
        assert_eq!(
            size_change("-1M").unwrap(),
            SizeChange::Shrink(bytes("1M").unwrap())
        );
        assert_eq!(
            size_change("2G").unwrap(),
            SizeChange::Absolute(bytes("2G").unwrap())
        );
        assert!(size_change("--1M").is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(40 << 30), "40 GiB");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human((1 << 30) + (1 << 20)), "1 GiB");
        assert_eq!(human(1395864576), "1.3 GiB");
        assert_eq!(human_exact(22), "22 bytes");
        assert_eq!(human_exact(4096), "4 KiB (4096 bytes)");
    }
}
