//! Format drivers.

pub mod asif;
pub mod qcow2;
pub mod raw;
