//! The CNI environment variables, validated per command as the CNI library's `skel` does.

use std::collections::HashMap;

use crate::error::{CniError, codes};

/// A CNI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Allocate.
    Add,
    /// Release.
    Del,
    /// Verify.
    Check,
    /// Release stale attachments (1.1).
    Gc,
    /// Report readiness (1.1).
    Status,
    /// List supported versions.
    Version,
}

impl Command {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }

    fn required(self) -> &'static [&'static str] {
        match self {
            Command::Add | Command::Check => &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"],
            Command::Del => &["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"],
            Command::Gc | Command::Status => &["CNI_PATH"],
            Command::Version => &[],
        }
    }
}

/// The validated environment of one CNI call.
#[derive(Debug, Clone)]
pub struct CniEnv {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (empty for GC/STATUS/VERSION).
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`.
    pub args: String,
    /// `NODENAME`, set by some installers; the node name otherwise comes from files.
    pub node_name: Option<String>,
}

fn is_valid_id(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Whether a network or container name is acceptable (`^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`).
pub fn is_valid_name(s: &str) -> bool {
    is_valid_id(s)
}

fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("interface name is empty".into());
    }
    if name.len() > 15 {
        return Err(format!("interface name {name:?} is longer than 15 characters"));
    }
    if name == "." || name == ".." {
        return Err(format!("interface name {name:?} is not a valid name"));
    }
    if name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return Err(format!("interface name {name:?} contains '/', ':' or white space"));
    }
    Ok(())
}

impl CniEnv {
    /// Reads and validates the environment; `None` when `CNI_COMMAND` is not set at all.
    pub fn from_vars(vars: &HashMap<String, String>) -> Option<Result<Self, CniError>> {
        let command = vars.get("CNI_COMMAND")?;
        Some(Self::validate(command, vars))
    }

    fn validate(command: &str, vars: &HashMap<String, String>) -> Result<Self, CniError> {
        let get = |k: &str| vars.get(k).cloned().unwrap_or_default();
        let command = Command::parse(command)
            .ok_or_else(|| CniError::new(codes::INVALID_ENV, format!("unknown CNI_COMMAND: {command}")))?;
        let missing: Vec<&str> = command
            .required()
            .iter()
            .copied()
            .filter(|k| vars.get(*k).is_none_or(|v| v.is_empty()))
            .collect();
        if !missing.is_empty() {
            return Err(CniError::new(
                codes::INVALID_ENV,
                format!("required env variables [{}] missing", missing.join(",")),
            ));
        }
        let env = CniEnv {
            command,
            container_id: get("CNI_CONTAINERID"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
            node_name: vars.get("NODENAME").map(|n| n.trim().to_string()).filter(|n| !n.is_empty()),
        };
        if command.required().contains(&"CNI_CONTAINERID") && !is_valid_id(&env.container_id) {
            return Err(CniError::new(codes::INVALID_ENV, "invalid characters in containerID")
                .with_details(env.container_id.clone()));
        }
        if command.required().contains(&"CNI_IFNAME") {
            check_ifname(&env.ifname).map_err(|m| CniError::new(codes::INVALID_ENV, m))?;
        }
        Ok(env)
    }
}
