//! `machine.json`: taskcluster-worker's machine definition, format version 1.
//!
//! Every key but `version` is optional; unknown keys, `null`s, duplicate keys, values outside
//! the enumerations and ranges below and documents over 1 MiB are refused, as taskcluster's
//! schema (go-schematypes, no additional properties) refuses them.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Largest accepted machine.json.
pub const MAX_MACHINE_JSON: u64 = 1 << 20;

/// The keyboard layouts taskcluster accepts (QEMU's keymaps).
const KEYBOARD_LAYOUTS: &[&str] = &[
    "ar", "da", "de", "de-ch", "en-gb", "en-us", "es", "et", "fi", "fo", "fr", "fr-be", "fr-ca", "fr-ch",
    "hr", "hu", "is", "it", "ja", "lt", "lv", "mk", "nl", "nl-be", "no", "pl", "pt", "pt-br", "ru", "sl",
    "sv", "th", "tr",
];
const SOUND: &[&str] = &[
    "none",
    "AC97",
    "ES1370",
    "hda-duplex/intel-hda",
    "hda-micro/intel-hda",
    "hda-output/intel-hda",
    "hda-duplex/ich9-intel-hda",
    "hda-micro/ich9-intel-hda",
    "hda-output/ich9-intel-hda",
];

/// A machine definition (taskcluster's `machine.json`, version 1). Fields left `None` take
/// the consumer's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Machine {
    /// Always 1.
    pub version: u32,
    /// System UUID: lowercase RFC 4122, versions 1 to 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// `pc-i440fx-2.8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chipset: Option<String>,
    /// `host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// CPU flags: the schema lists none, so the array must be empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<Vec<String>>,
    /// Threads per core, 1 to 255.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    /// Cores per socket, 1 to 255.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cores: Option<u32>,
    /// Sockets, 1 to 255.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sockets: Option<u32>,
    /// Memory in MiB, 1 to 1048576.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u32>,
    /// USB host controller: `piix3-usb-uhci`, `piix4-usb-uhci` or `nec-usb-xhci`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usb: Option<String>,
    /// Network card: `rtl8139` or `e1000`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Locally administered unicast MAC address, lowercase (`^[0-9a-f][26ae](:[0-9a-f]{2}){5}$`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Storage device: `virtio-blk-pci`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    /// `VGA`, `vmware-svga`, `qxl-vga` or `virtio-vga`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graphics: Option<String>,
    /// `none`, `AC97`, `ES1370` or `hda-{duplex,micro,output}/{intel-hda,ich9-intel-hda}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sound: Option<String>,
    /// `usb-kbd` or `PS/2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyboard: Option<String>,
    /// One of QEMU's 33 keymaps (`en-us`, `de`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyboard_layout: Option<String>,
    /// `usb-mouse` or `PS/2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mouse: Option<String>,
    /// `usb-tablet` or `none`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tablet: Option<String>,
}

impl Machine {
    /// A valid definition with taskcluster's defaults, a random UUID and a random locally
    /// administered unicast MAC address. Memory and CPU topology are left to the consumer.
    pub fn default_random() -> Machine {
        let uuid = uuid::Uuid::new_v4();
        let r = uuid::Uuid::new_v4();
        let b = r.as_bytes();
        // Locally administered (bit 1 set), unicast (bit 0 clear).
        let mac = format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            (b[0] & 0xfc) | 0x02,
            b[1],
            b[2],
            b[3],
            b[4],
            b[5]
        );
        Machine {
            version: 1,
            uuid: Some(uuid.to_string()),
            chipset: Some("pc-i440fx-2.8".into()),
            cpu: Some("host".into()),
            flags: Some(Vec::new()),
            threads: None,
            cores: None,
            sockets: None,
            memory: None,
            usb: Some("nec-usb-xhci".into()),
            network: Some("e1000".into()),
            mac: Some(mac),
            storage: Some("virtio-blk-pci".into()),
            graphics: Some("qxl-vga".into()),
            sound: Some("none".into()),
            keyboard: Some("usb-kbd".into()),
            keyboard_layout: Some("en-us".into()),
            mouse: Some("usb-mouse".into()),
            tablet: Some("usb-tablet".into()),
        }
    }

    /// Parse and validate a machine.json document.
    pub fn parse(bytes: &[u8]) -> Result<Machine> {
        if bytes.len() as u64 > MAX_MACHINE_JSON {
            return Err(Error::bundle(format!(
                "machine.json is {} bytes, more than the 1 MiB allowed",
                bytes.len()
            )));
        }
        let bad = |m: String| Error::bundle(format!("machine.json: {m}"));
        // serde_json's Value keeps the last of duplicate keys, so nulls are looked for here
        // and duplicates are caught by the typed parse below.
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        let object = value.as_object().ok_or_else(|| bad("not a JSON object".into()))?;
        if let Some((k, _)) = object.iter().find(|(_, v)| v.is_null()) {
            return Err(bad(format!("'{k}' is null")));
        }
        match object.get("version") {
            Some(v) if v.as_u64() == Some(1) => {}
            Some(v) => return Err(bad(format!("version {v} is not supported (only version 1)"))),
            None => {
                return Err(bad(
                    "no 'version' (version 0 definitions are not accepted; add \"version\": 1)".into(),
                ))
            }
        }
        let machine: Machine = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        machine.validate()?;
        Ok(machine)
    }

    /// Check every field against the version 1 schema.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::bundle(format!("machine.json: {m}")));
        if self.version != 1 {
            return bad(format!(
                "version {} is not supported (only version 1)",
                self.version
            ));
        }
        fn one_of(key: &str, v: &Option<String>, allowed: &[&str]) -> std::result::Result<(), String> {
            match v {
                Some(v) if !allowed.contains(&v.as_str()) => {
                    Err(format!("'{key}' is {v:?}; allowed: {}", allowed.join(", ")))
                }
                _ => Ok(()),
            }
        }
        let checks = [
            one_of("chipset", &self.chipset, &["pc-i440fx-2.8"]),
            one_of("cpu", &self.cpu, &["host"]),
            one_of(
                "usb",
                &self.usb,
                &["piix3-usb-uhci", "piix4-usb-uhci", "nec-usb-xhci"],
            ),
            one_of("network", &self.network, &["rtl8139", "e1000"]),
            one_of("storage", &self.storage, &["virtio-blk-pci"]),
            one_of(
                "graphics",
                &self.graphics,
                &["VGA", "vmware-svga", "qxl-vga", "virtio-vga"],
            ),
            one_of("sound", &self.sound, SOUND),
            one_of("keyboard", &self.keyboard, &["usb-kbd", "PS/2"]),
            one_of("keyboardLayout", &self.keyboard_layout, KEYBOARD_LAYOUTS),
            one_of("mouse", &self.mouse, &["usb-mouse", "PS/2"]),
            one_of("tablet", &self.tablet, &["usb-tablet", "none"]),
        ];
        for c in checks {
            if let Err(m) = c {
                return bad(m);
            }
        }
        if let Some(flags) = &self.flags {
            if let Some(f) = flags.first() {
                return bad(format!(
                    "'flags' must be empty (no CPU flags are defined), not {f:?}"
                ));
            }
        }
        for (key, v) in [
            ("threads", self.threads),
            ("cores", self.cores),
            ("sockets", self.sockets),
        ] {
            if let Some(v) = v {
                if !(1..=255).contains(&v) {
                    return bad(format!("'{key}' is {v}; must be 1 to 255"));
                }
            }
        }
        if let Some(m) = self.memory {
            if !(1..=1 << 20).contains(&m) {
                return bad(format!("'memory' is {m} MiB; must be 1 to 1048576"));
            }
        }
        if let Some(u) = &self.uuid {
            if !valid_uuid(u) {
                return bad(format!(
                    "'uuid' {u:?} is not a lowercase RFC 4122 UUID of version 1 to 5"
                ));
            }
        }
        if let Some(m) = &self.mac {
            if !valid_mac(m) {
                return bad(format!(
                    "'mac' {m:?} is not a lowercase locally administered unicast MAC address \
                     (like 02:xx:xx:xx:xx:xx)"
                ));
            }
        }
        Ok(())
    }

    /// The definition as pretty JSON (keys in schema order, unset keys left out).
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Virtual CPUs: threads × cores × sockets, each 1 when unset.
    pub fn cpus(&self) -> u32 {
        self.threads.unwrap_or(1) * self.cores.unwrap_or(1) * self.sockets.unwrap_or(1)
    }
}

fn lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `^[0-9a-f]{8}-[0-9a-f]{4}-[1-5][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`
fn valid_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts.iter().all(|p| lower_hex(p))
        && (b'1'..=b'5').contains(&parts[2].as_bytes()[0])
        && b"89ab".contains(&parts[3].as_bytes()[0])
}

/// `^[0-9a-f][26ae](:[0-9a-f]{2}){5}$`
fn valid_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts.iter().all(|p| p.len() == 2 && lower_hex(p))
        && b"26ae".contains(&parts[0].as_bytes()[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_round_trips() {
        for _ in 0..50 {
            let m = Machine::default_random();
            m.validate().unwrap();
            assert_eq!(Machine::parse(&m.to_json()).unwrap(), m);
        }
    }

    #[test]
    fn minimal_and_full_definitions_parse() {
        let m = Machine::parse(br#"{"version": 1}"#).unwrap();
        assert_eq!(m.cpus(), 1);
        let m = Machine::parse(
            br#"{"version":1,"uuid":"52bab607-10f1-4049-a0f8-ee4725cb715b","memory":4096,
                "threads":2,"cores":2,"sockets":1,"sound":"hda-duplex/ich9-intel-hda",
                "keyboardLayout":"de-ch","mac":"aa:54:1a:30:5c:de","flags":[]}"#,
        )
        .unwrap();
        assert_eq!((m.memory, m.cpus()), (Some(4096), 4));
    }

    #[test]
    fn every_rule_is_enforced() {
        let bad: &[&str] = &[
            r#"{}"#,
            r#"[]"#,
            r#"{"version":0}"#,
            r#"{"version":2}"#,
            r#"{"version":"1"}"#,
            r#"{"version":1,"extra":1}"#,
            r#"{"version":1,"memory":null}"#,
            r#"{"version":1,"memory":0}"#,
            r#"{"version":1,"memory":1048577}"#,
            r#"{"version":1,"memory":1.5}"#,
            r#"{"version":1,"threads":256}"#,
            r#"{"version":1,"cores":0}"#,
            r#"{"version":1,"network":"virtio-net"}"#,
            r#"{"version":1,"mac":"01:00:00:00:00:00"}"#,
            r#"{"version":1,"mac":"AA:54:1A:30:5C:DE"}"#,
            r#"{"version":1,"mac":"a8:54:1a:30:5c:de"}"#,
            r#"{"version":1,"uuid":"52bab607-10f1-6049-a0f8-ee4725cb715b"}"#,
            r#"{"version":1,"uuid":"52BAB607-10f1-4049-a0f8-ee4725cb715b"}"#,
            r#"{"version":1,"flags":["vmx"]}"#,
            r#"{"version":1,"keyboardLayout":"xx"}"#,
            r#"{"version":1,"memory":1,"memory":2}"#,
            r#"{"version":1} x"#,
            r#"{"uuid":"52bab607-10f1-4049-a0f8-ee4725cb715b","network":{"device":"e1000"}}"#,
        ];
        for b in bad {
            let e = Machine::parse(b.as_bytes()).unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::InvalidBundle, "{b}");
        }
        let big = format!(r#"{{"version":1,"uuid":"{}"}}"#, " ".repeat(2 << 20));
        assert!(Machine::parse(big.as_bytes())
            .unwrap_err()
            .to_string()
            .contains("1 MiB"));
    }
}
