//! `inline_data`: small files and directories stored in `i_block` (60 bytes) continued in the
//! `system.data` extended attribute inside the inode.

use diskkit::Result;

use super::inode::Inode;
use super::xattr::INDEX_SYSTEM;
use super::Fs;

impl Fs {
    /// `i_block` followed by the `system.data` value: the inline data area, at most
    /// 60 + (inode size - 128) bytes.
    pub(crate) fn inline_data(&self, inode: &Inode) -> Result<Vec<u8>> {
        let mut data = inode.block.to_vec();
        for x in self.inode_xattrs(inode)? {
            if x.index == INDEX_SYSTEM && x.name == b"data" {
                data.extend_from_slice(&x.value);
                break;
            }
        }
        Ok(data)
    }
}
