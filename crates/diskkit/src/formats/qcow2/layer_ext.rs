//! diskkit's layer header extension (type `0x646b6c79`, "dkly").
//!
//! qcow2 has no layer or parent UUIDs, so diskkit keeps them in a header extension of its own.
//! QEMU ignores header extensions it does not know and writes them back when it rewrites the
//! header (`qemu-img amend`, `resize`, `rebase`), so the extension survives QEMU. Layout
//! (big-endian, 56 bytes):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | version (1) |
//! | 4 | 1 | layer type: 0 none, 1 cache, 2 overlay |
//! | 5 | 3 | reserved (0) |
//! | 8 | 16 | layer UUID: replaced (durably) before the first change after each open |
//! | 24 | 16 | parent UUID: the parent's layer UUID when this layer was made; all zero for none |
//! | 40 | 16 | stable UUID: never changes |
//!
//! Writes by QEMU itself do not renew the layer UUID.

use uuid::Uuid;

use crate::layer::LayerType;

/// Bytes of the extension's data.
pub(super) const LEN: usize = 56;
/// Offset of the layer UUID inside the data.
pub(super) const LAYER_UUID_AT: u64 = 8;

/// The decoded extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LayerExt {
    pub(super) layer_type: Option<LayerType>,
    pub(super) layer_uuid: Uuid,
    pub(super) parent_uuid: Option<Uuid>,
    pub(super) stable_uuid: Uuid,
}

impl LayerExt {
    /// A new standalone layer.
    pub(super) fn new() -> LayerExt {
        LayerExt {
            layer_type: None,
            layer_uuid: Uuid::new_v4(),
            parent_uuid: None,
            stable_uuid: Uuid::new_v4(),
        }
    }

    /// Decode; `None` for data of another version or length (then ignored).
    pub(super) fn decode(data: &[u8]) -> Option<LayerExt> {
        if data.len() != LEN || data[..4] != 1u32.to_be_bytes() {
            return None;
        }
        let uuid = |at: usize| Uuid::from_slice(&data[at..at + 16]).ok();
        let layer_type = match data[4] {
            0 => None,
            1 => Some(LayerType::Cache),
            2 => Some(LayerType::Overlay),
            _ => return None,
        };
        let parent = uuid(24)?;
        Some(LayerExt {
            layer_type,
            layer_uuid: uuid(8)?,
            parent_uuid: (!parent.is_nil()).then_some(parent),
            stable_uuid: uuid(40)?,
        })
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut d = vec![0u8; LEN];
        d[..4].copy_from_slice(&1u32.to_be_bytes());
        d[4] = match self.layer_type {
            None => 0,
            Some(LayerType::Cache) => 1,
            Some(LayerType::Overlay) => 2,
        };
        d[8..24].copy_from_slice(self.layer_uuid.as_bytes());
        d[24..40].copy_from_slice(self.parent_uuid.unwrap_or_default().as_bytes());
        d[40..56].copy_from_slice(self.stable_uuid.as_bytes());
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_ignores_other_versions() {
        let mut e = LayerExt::new();
        e.layer_type = Some(LayerType::Overlay);
        e.parent_uuid = Some(Uuid::new_v4());
        let d = e.encode();
        assert_eq!(LayerExt::decode(&d), Some(e));
        let mut other = d.clone();
        other[3] = 2;
        assert_eq!(LayerExt::decode(&other), None);
        assert_eq!(LayerExt::decode(&d[..40]), None);
    }
}
