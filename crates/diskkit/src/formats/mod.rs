//! Format drivers.

pub mod asif;
pub mod raw;
