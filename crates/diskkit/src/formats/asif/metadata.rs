//! The metadata block: a small header and an XML property list.
//!
//! Apple's images hold `internal metadata` (with `stable uuid`) and `user metadata`. diskkit keeps
//! its layer information in `internal metadata` too (see the README): `layer type`
//! (`cache` | `overlay`), `parent uuid`, `parent path` (relative to the layer's file) and
//! `parent format`.

use std::io::Cursor;

use plist::{Dictionary, Value};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::layer::LayerInfo;

/// `meta`.
const MAGIC: u32 = 0x6D65_7461;
const VERSION: u32 = 1;
const HEADER_SIZE: u32 = 0x200;

const INTERNAL: &str = "internal metadata";
const USER: &str = "user metadata";
const STABLE_UUID: &str = "stable uuid";
const LAYER_TYPE: &str = "layer type";
const PARENT_UUID: &str = "parent uuid";
const PARENT_PATH: &str = "parent path";
const PARENT_FORMAT: &str = "parent format";

/// Parsed metadata: the whole dictionary (unknown keys are kept) and the layer fields.
#[derive(Debug, Clone)]
pub(crate) struct Metadata {
    pub(super) root: Dictionary,
}

impl Metadata {
    /// Metadata for a new image.
    pub(super) fn new(stable_uuid: Uuid) -> Metadata {
        let mut internal = Dictionary::new();
        internal.insert(
            STABLE_UUID.into(),
            // Lower case, as macOS writes it.
            Value::String(stable_uuid.hyphenated().to_string()),
        );
        let mut root = Dictionary::new();
        root.insert(INTERNAL.into(), Value::Dictionary(internal));
        root.insert(USER.into(), Value::Dictionary(Dictionary::new()));
        Metadata { root }
    }

    /// Parse a metadata block (one chunk, or less).
    pub(crate) fn parse(block: &[u8]) -> Result<Metadata> {
        let field = |at: usize, len: usize| -> Result<&[u8]> {
            block
                .get(at..at + len)
                .ok_or_else(|| Error::corrupt("metadata block is truncated"))
        };
        let magic = u32::from_be_bytes(field(0, 4)?.try_into().unwrap_or_default());
        if magic != MAGIC {
            return Err(Error::corrupt(format!(
                "bad metadata magic {magic:#010x} (expected 'meta')"
            )));
        }
        let version = u32::from_be_bytes(field(4, 4)?.try_into().unwrap_or_default());
        if version != VERSION {
            return Err(Error::unsupported(format!("metadata version {version}")));
        }
        let header_size = u32::from_be_bytes(field(8, 4)?.try_into().unwrap_or_default()) as usize;
        let data_size = u64::from_be_bytes(field(12, 8)?.try_into().unwrap_or_default());
        if header_size < 20 || header_size > block.len() {
            return Err(Error::corrupt(format!(
                "metadata header size {header_size} is out of range"
            )));
        }
        let room = (block.len() - header_size) as u64;
        if data_size > room {
            return Err(Error::corrupt(format!(
                "metadata length {data_size} exceeds its block ({room} bytes)"
            )));
        }
        let data = &block[header_size..header_size + data_size as usize];
        let end = data.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
        let value = Value::from_reader(Cursor::new(&data[..end]))
            .map_err(|e| Error::corrupt("metadata property list is unreadable").with_source(e))?;
        let Value::Dictionary(root) = value else {
            return Err(Error::corrupt("metadata property list is not a dictionary"));
        };
        Ok(Metadata { root })
    }

    /// Serialise into a block of exactly `block_len` bytes.
    ///
    /// As macOS writes it: the XML ends with a newline, and the recorded data length is the
    /// XML's length rounded up to 512 (the padding is NUL bytes).
    pub(crate) fn to_block(&self, block_len: usize) -> Result<Vec<u8>> {
        let mut xml = Vec::new();
        Value::Dictionary(self.root.clone())
            .to_writer_xml(&mut xml)
            .map_err(|e| {
                Error::new(crate::ErrorKind::Io, "cannot write the metadata property list").with_source(e)
            })?;
        if xml.last() != Some(&b'\n') {
            xml.push(b'\n');
        }
        let recorded = xml.len().div_ceil(512) * 512;
        let header = HEADER_SIZE as usize;
        if header + recorded > block_len {
            return Err(Error::invalid_argument(format!(
                "metadata of {} bytes does not fit in a {block_len}-byte chunk",
                xml.len()
            )));
        }
        let mut block = vec![0u8; block_len];
        block[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        block[4..8].copy_from_slice(&VERSION.to_be_bytes());
        block[8..12].copy_from_slice(&HEADER_SIZE.to_be_bytes());
        block[12..20].copy_from_slice(&(recorded as u64).to_be_bytes());
        block[header..header + xml.len()].copy_from_slice(&xml);
        Ok(block)
    }

    fn internal(&self) -> Option<&Dictionary> {
        self.root.get(INTERNAL).and_then(Value::as_dictionary)
    }

    fn internal_mut(&mut self) -> &mut Dictionary {
        if !matches!(self.root.get(INTERNAL), Some(Value::Dictionary(_))) {
            self.root
                .insert(INTERNAL.into(), Value::Dictionary(Dictionary::new()));
        }
        // OK to unwrap: the entry was made a dictionary just above.
        self.root
            .get_mut(INTERNAL)
            .and_then(Value::as_dictionary_mut)
            .expect("internal metadata is a dictionary")
    }

    fn string(&self, key: &str) -> Option<&str> {
        self.internal()
            .and_then(|d| d.get(key))
            .and_then(Value::as_string)
    }

    fn uuid(&self, key: &str) -> Result<Option<Uuid>> {
        match self.string(key) {
            None => Ok(None),
            Some(s) => Uuid::parse_str(s)
                .map(Some)
                .map_err(|e| Error::corrupt(format!("metadata '{key}' is not a UUID: '{s}'")).with_source(e)),
        }
    }

    /// The layer fields (the layer UUID itself lives in the header).
    pub(crate) fn layer_info(&self) -> Result<LayerInfo> {
        let layer_type = match self.string(LAYER_TYPE) {
            None => None,
            Some(s) => Some(
                s.parse()
                    .map_err(|e: Error| Error::corrupt(format!("metadata 'layer type': {e}")))?,
            ),
        };
        let parent_format = match self.string(PARENT_FORMAT) {
            None => None,
            Some(s) => Some(
                s.parse()
                    .map_err(|e: Error| Error::corrupt(format!("metadata 'parent format': {e}")))?,
            ),
        };
        Ok(LayerInfo {
            layer_type,
            layer_uuid: None,
            stable_uuid: self.uuid(STABLE_UUID)?,
            parent_uuid: self.uuid(PARENT_UUID)?,
            parent_path: self.string(PARENT_PATH).map(str::to_owned),
            parent_format,
        })
    }

    /// Replace the layer fields (the stable UUID is kept).
    pub(crate) fn set_layer_info(&mut self, info: &LayerInfo) {
        let d = self.internal_mut();
        let mut put = |key: &str, value: Option<String>| match value {
            Some(v) => {
                d.insert(key.into(), Value::String(v));
            }
            None => {
                d.remove(key);
            }
        };
        put(LAYER_TYPE, info.layer_type.map(|t| t.name().to_owned()));
        put(
            PARENT_UUID,
            info.parent_uuid
                .map(|u| u.hyphenated().to_string().to_uppercase()),
        );
        put(PARENT_PATH, info.parent_path.clone());
        put(PARENT_FORMAT, info.parent_format.map(|f| f.name().to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{ImageFormat, LayerType};

    #[test]
    fn round_trip() {
        let id = Uuid::new_v4();
        let mut m = Metadata::new(id);
        let info = LayerInfo {
            layer_type: Some(LayerType::Overlay),
            parent_uuid: Some(Uuid::new_v4()),
            parent_path: Some("base.asif".into()),
            parent_format: Some(ImageFormat::Asif),
            ..LayerInfo::default()
        };
        m.set_layer_info(&info);
        let block = m.to_block(1 << 20).unwrap();
        let back = Metadata::parse(&block).unwrap().layer_info().unwrap();
        assert_eq!(back.stable_uuid, Some(id));
        assert_eq!(back.layer_type, info.layer_type);
        assert_eq!(back.parent_uuid, info.parent_uuid);
        assert_eq!(back.parent_path, info.parent_path);
        assert_eq!(back.parent_format, info.parent_format);
    }

    #[test]
    fn rejects_bad_blocks() {
        let good = Metadata::new(Uuid::nil()).to_block(4096).unwrap();
        let mut b = good.clone();
        b[0] = b'x';
        assert!(Metadata::parse(&b).is_err());
        let mut b = good.clone();
        b[12..20].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(Metadata::parse(&b).is_err());
        let mut b = good.clone();
        b[0x200..0x210].copy_from_slice(b"not a plist at a");
        assert!(Metadata::parse(&b).is_err());
        assert!(Metadata::parse(&good[..10]).is_err());
    }

    #[test]
    fn rejects_bad_uuid_and_layer_type() {
        let mut m = Metadata::new(Uuid::nil());
        m.internal_mut()
            .insert(LAYER_TYPE.into(), Value::String("weird".into()));
        assert!(m.layer_info().is_err());
        let mut m = Metadata::new(Uuid::nil());
        m.internal_mut()
            .insert(PARENT_UUID.into(), Value::String("nope".into()));
        assert!(m.layer_info().is_err());
    }
}

#[cfg(test)]
mod macos_tests {
    use super::*;

    /// The metadata block macOS wrote for an image (dissect.hypervisor's `basic.asif`): the
    /// XML text, its newline, the lower-case UUID and the length rounded up to 512.
    #[test]
    fn block_matches_what_macos_writes() {
        let id = Uuid::parse_str("13db9632-b79f-4e95-aada-835d5ef97bba").unwrap();
        let block = Metadata::new(id).to_block(1 << 20).unwrap();
        let macos = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
<!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
<plist version=\"1.0\">\n<dict>\n\t<key>internal metadata</key>\n\t<dict>\n\t\t<key>stable uuid</key>\n\
\t\t<string>13db9632-b79f-4e95-aada-835d5ef97bba</string>\n\t</dict>\n\t<key>user metadata</key>\n\
\t<dict/>\n</dict>\n</plist>\n";
        assert_eq!(macos.len(), 351);
        assert_eq!(&block[..20], b"meta\0\0\0\x01\0\0\x02\0\0\0\0\0\0\0\x02\0");
        assert_eq!(String::from_utf8_lossy(&block[0x200..0x200 + macos.len()]), macos);
        assert!(block[0x200 + macos.len()..].iter().all(|&b| b == 0));
        assert_eq!(
            Metadata::parse(&block).unwrap().layer_info().unwrap().stable_uuid,
            Some(id)
        );
    }
}
