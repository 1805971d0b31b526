//! Whole-image operations built on open images: sparse copy (convert, flatten), compare, and
//! the stack operations on layer files (thin wrappers over the methods of an open stack).

pub mod copy;
pub mod stack;
