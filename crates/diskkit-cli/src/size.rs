//! Sizes on the command line: bytes or a number with a binary unit.

use anyhow::{bail, Context, Result};

/// Parse `40G`, `40GB`, `40GiB`, `512M`, `1.5T`, `4096` (bytes) and the like. Units are binary
/// (K = 1024), as in `qemu-img` and `diskutil`.
pub(crate) fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        bail!("invalid size '{text}': expected a number, optionally followed by a unit (K, M, G, T, P)");
    }
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        "e" | "eb" | "eib" => 60,
        other => bail!("invalid size '{text}': unknown unit '{other}'"),
    };
    let scale = 1u128 << shift;
    let value: u128 = if let Some((int, frac)) = num.split_once('.') {
        if shift == 0 {
            bail!("invalid size '{text}': bytes must be a whole number");
        }
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse().with_context(|| format!("invalid size '{text}'"))?
        };
        if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            bail!("invalid size '{text}'");
        }
        let f: u128 = frac.parse().with_context(|| format!("invalid size '{text}'"))?;
        let denom = 10u128.pow(frac.len() as u32);
        int.checked_mul(scale)
            .and_then(|v| v.checked_add(f * scale / denom))
            .unwrap_or(u128::MAX)
    } else {
        let n: u128 = num.parse().with_context(|| format!("invalid size '{text}'"))?;
        n.saturating_mul(scale)
    };
    u64::try_from(value).map_err(|_| anyhow::anyhow!("invalid size '{text}': too large"))
}

/// A size change: absolute, or relative with a leading `+` / `-`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SizeChange {
    Absolute(u64),
    Grow(u64),
    Shrink(u64),
}

pub(crate) fn parse_size_change(text: &str) -> Result<SizeChange> {
    let t = text.trim();
    Ok(if let Some(rest) = t.strip_prefix('+') {
        SizeChange::Grow(parse_size(rest)?)
    } else if let Some(rest) = t.strip_prefix('-') {
        SizeChange::Shrink(parse_size(rest)?)
    } else {
        SizeChange::Absolute(parse_size(t)?)
    })
}

/// `40 GiB` style, for human output.
pub(crate) fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
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
        format!("{v:.3} {}", UNITS[u]).replace(".000", "")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("40G").unwrap(), 40 << 30);
        assert_eq!(parse_size("40GB").unwrap(), 40 << 30);
        assert_eq!(parse_size("40GiB").unwrap(), 40 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5K").unwrap(), 1536);
        assert_eq!(parse_size("64k").unwrap(), 65536);
    }

    #[test]
    fn bad_sizes() {
        for bad in [
            "",
            "G",
            "12X",
            "-5",
            "1.5",
            "99999999999999999999",
            "17E",
            "1..5G",
            "abc",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn changes() {
        assert_eq!(parse_size_change("+1G").unwrap(), SizeChange::Grow(1 << 30));
        assert_eq!(parse_size_change("-1M").unwrap(), SizeChange::Shrink(1 << 20));
        assert_eq!(parse_size_change("2G").unwrap(), SizeChange::Absolute(2 << 30));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(40 << 30), "40 GiB");
        assert_eq!(human(1536), "1.500 KiB");
    }
}
