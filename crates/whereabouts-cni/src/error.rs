//! CNI error objects and the one place where library errors become CNI codes.

use serde_json::{Value, json};
use whereabouts_core::ConfigError;
use whereabouts_core::cni_args::CniArgsError;
use whereabouts_store::StoreError;
use whereabouts_store::ipam::IpamError;

/// The spec's well-known error codes.
pub mod codes {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO: u32 = 5;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network configuration.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later.
    pub const TRY_AGAIN: u32 = 11;
    /// STATUS: the plugin cannot serve ADD.
    pub const NOT_AVAILABLE: u32 = 50;
    /// Plugin-specific failure (upstream uses 999 for every error of its own).
    pub const INTERNAL: u32 = 999;
}

/// A CNI error: printed as JSON on stdout with a non-zero exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// The code.
    pub code: u32,
    /// The message.
    pub msg: String,
    /// Optional details.
    pub details: Option<String>,
}

impl CniError {
    /// An error without details.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError { code, msg: msg.into(), details: None }
    }

    /// Adds details.
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = Some(details.into());
        self
    }

    /// The spec's error object.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut v = json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg });
        if let Some(d) = &self.details {
            v["details"] = Value::String(d.clone());
        }
        v
    }
}

impl From<ConfigError> for CniError {
    fn from(e: ConfigError) -> Self {
        let code = match e {
            ConfigError::Decode { .. } => codes::DECODE,
            ConfigError::Invalid { .. } | ConfigError::Missing(_) => codes::INVALID_CONFIG,
        };
        CniError::new(code, e.to_string())
    }
}

impl From<CniArgsError> for CniError {
    fn from(e: CniArgsError) -> Self {
        CniError::new(codes::INVALID_ENV, e.to_string())
    }
}

fn store_code(e: &StoreError) -> u32 {
    match e {
        StoreError::Conflict | StoreError::Unavailable(_) => codes::TRY_AGAIN,
        StoreError::Io(_) => codes::IO,
        StoreError::Corrupt { .. } | StoreError::ForeignVersion(_) => codes::INTERNAL,
        StoreError::Denied(_) | StoreError::Rejected(_) => codes::INVALID_CONFIG,
    }
}

impl From<StoreError> for CniError {
    fn from(e: StoreError) -> Self {
        CniError::new(store_code(&e), e.to_string())
    }
}

impl From<IpamError> for CniError {
    fn from(e: IpamError) -> Self {
        let code = match &e {
            IpamError::Store { source, .. } => store_code(source),
            IpamError::Contention { .. } => codes::TRY_AGAIN,
            IpamError::Pool { .. } | IpamError::Alloc { .. } => codes::INTERNAL,
        };
        CniError::new(code, e.to_string())
    }
}
