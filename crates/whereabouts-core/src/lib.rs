//! The pure IPAM core of whereabouts-rs: address math, ranges, the configuration model with upstream's
//! parsing and merge rules, and the allocation policy. No I/O and no async: every store and every shell
//! (CNI plugin, controller, CLI) builds on this crate and nothing here knows about them.

pub mod addr;
pub mod allocate;
pub mod cni_args;
pub mod config;
pub mod duration;
pub mod error;
pub mod interval;
pub mod pool;
pub mod range;
pub mod slice;

pub use error::ConfigError;
