//! CNI spec versions: what we support and how results are shaped for each.

/// Every spec version the plugin speaks, oldest first (`VERSION` lists them).
pub const SUPPORTED_VERSIONS: [&str; 7] = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest supported version.
pub const LATEST: &str = "1.1.0";

/// A supported spec version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SpecVersion {
    major: u8,
    minor: u8,
    patch: u8,
}

impl SpecVersion {
    /// `0.4.0`: the first version with CHECK.
    pub const CHECK: SpecVersion = SpecVersion { major: 0, minor: 4, patch: 0 };
    /// `1.1.0`: the first version with GC and STATUS.
    pub const GC: SpecVersion = SpecVersion { major: 1, minor: 1, patch: 0 };

    /// Parses a supported version; an absent `cniVersion` means `0.1.0`.
    pub fn parse(version: &str) -> Option<Self> {
        let version = if version.is_empty() { "0.1.0" } else { version };
        if !SUPPORTED_VERSIONS.contains(&version) {
            return None;
        }
        let mut parts = version.split('.').map(|p| p.parse::<u8>().ok());
        Some(SpecVersion { major: parts.next()??, minor: parts.next()??, patch: parts.next()?? })
    }

    /// The result layout this version uses.
    pub fn layout(self) -> Layout {
        match (self.major, self.minor) {
            (0, 1 | 2) => Layout::Legacy,
            (0, _) => Layout::Versioned,
            _ => Layout::Current,
        }
    }
}

/// The three result layouts of the spec's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// 0.1.0 / 0.2.0: `ip4` / `ip6` objects.
    Legacy,
    /// 0.3.x / 0.4.0: `ips` whose entries carry `version`, `dns` always present.
    Versioned,
    /// 1.x: `ips` without `version`.
    Current,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_only_supported_versions() {
        assert_eq!(SpecVersion::parse("").map(SpecVersion::layout), Some(Layout::Legacy));
        assert_eq!(SpecVersion::parse("0.3.1").map(SpecVersion::layout), Some(Layout::Versioned));
        assert_eq!(SpecVersion::parse("1.1.0").map(SpecVersion::layout), Some(Layout::Current));
        assert!(SpecVersion::parse("1.2.0").is_none());
        assert!(SpecVersion::parse("0.3").is_none());
        assert!(SpecVersion::parse("0.3.1") < SpecVersion::parse("0.4.0"));
        assert!(SpecVersion::parse("1.0.0") < Some(SpecVersion::GC));
    }
}
