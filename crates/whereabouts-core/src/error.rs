//! Errors of configuration loading. Every variant says which key and value are at fault; the CNI shell
//! maps [`ConfigError::Decode`] to CNI code 6 and the others to code 7.

use thiserror::Error;

/// Why a network configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    /// The JSON could not be decoded (syntax error or a value of the wrong JSON type).
    #[error("{context}: JSON parsing error: {message}")]
    Decode {
        /// Where the JSON came from (`ipam`, or the flat file's path).
        context: String,
        /// serde's description, which names the line and column.
        message: String,
    },
    /// A key holds a value that decodes but is not acceptable.
    #[error("invalid {key} {value:?}: {reason}")]
    Invalid {
        /// The key, with its position for list entries (`ipRanges[1].range_start`).
        key: String,
        /// The offending value as written.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A required part of the configuration is missing.
    #[error("{0}")]
    Missing(String),
}

impl ConfigError {
    pub(crate) fn invalid(
        key: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        ConfigError::Invalid { key: key.into(), value: value.into(), reason: reason.into() }
    }
}
