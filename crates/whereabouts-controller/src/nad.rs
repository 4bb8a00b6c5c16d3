//! The whereabouts configuration of a NetworkAttachmentDefinition (`spec.config`), loaded as the plugin
//! would load it on a node: the inline `ipam` object merged with the flat file, through the core's loader.
//!
//! Unlike upstream's controllers, a conflist is searched for its whereabouts plugin (upstream reads only
//! `plugins[0]`), and the CNI network name of a conflist is the list's `name`, the one the runtime passes
//! to the plugin (upstream takes `plugins[0].name`, usually empty).

use serde_json::{Map, Value};
use thiserror::Error;
use whereabouts_core::ConfigError;
use whereabouts_core::config::{CallContext, InlineIpam, IpamConfig, Purpose};

/// The flat file (`whereabouts.conf`) the controller merges into every configuration, as read at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlatFile {
    /// Where it was read from (errors name it).
    pub path: String,
    /// Its content.
    pub content: Vec<u8>,
}

/// A whereabouts network, as a NetworkAttachmentDefinition configures it.
#[derive(Debug, Clone)]
pub struct NadConfig {
    /// The CNI network name: the top-level `name` (of the list, for a conflist).
    pub cni_name: String,
    /// The merged and validated IPAM configuration of the whereabouts plugin.
    pub ipam: IpamConfig,
}

impl NadConfig {
    /// The name of the network's NodeSlicePool: `network_name`, else the CNI network name (what the
    /// plugin looks up).
    pub fn slice_pool_name(&self) -> &str {
        if self.ipam.network_name.is_empty() { &self.cni_name } else { &self.ipam.network_name }
    }
}

/// Why a NetworkAttachmentDefinition's configuration cannot be loaded; each names the NAD
/// (`<namespace>/<name>`) and the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NadError {
    /// `spec.config` is not a JSON object.
    #[error("NetworkAttachmentDefinition {nad}: spec.config is not a JSON object: {message}")]
    Json {
        /// The NAD.
        nad: String,
        /// What is wrong.
        message: String,
    },
    /// A key of the network configuration has the wrong JSON type.
    #[error("NetworkAttachmentDefinition {nad}: spec.config key {key}: expected {expected}")]
    Shape {
        /// The NAD.
        nad: String,
        /// The key (`plugins`, `plugins[1].ipam`, `name`).
        key: String,
        /// The JSON type expected.
        expected: &'static str,
    },
    /// The whereabouts IPAM configuration is refused by the loader.
    #[error("NetworkAttachmentDefinition {nad}: spec.config key {key}: {source}")]
    Config {
        /// The NAD.
        nad: String,
        /// Where the IPAM object is (`ipam`, `plugins[1].ipam`).
        key: String,
        /// The loader's error, which names the IPAM key.
        source: ConfigError,
    },
}

/// Loads the whereabouts configuration of the NAD `nad` (`<namespace>/<name>`, for errors) from its
/// `spec.config`, merging `flat`. `Ok(None)` when it does not use whereabouts (or has no `spec.config`:
/// the configuration is then a file on the nodes).
pub fn load(
    nad: &str,
    spec_config: Option<&str>,
    flat: Option<&FlatFile>,
) -> Result<Option<NadConfig>, NadError> {
    let Some(text) = spec_config.filter(|t| !t.trim().is_empty()) else { return Ok(None) };
    let json_error = |message: String| NadError::Json { nad: nad.to_string(), message };
    let config: Value = serde_json::from_str(text).map_err(|e| json_error(e.to_string()))?;
    let Value::Object(config) = config else { return Err(json_error("found another JSON type".into())) };
    let shape =
        |key: &str, expected| NadError::Shape { nad: nad.to_string(), key: key.to_string(), expected };
    let string = |object: &Map<String, Value>, key: &str| match object.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(shape(key, "a string")),
    };
    let cni_name = string(&config, "name")?;
    let cni_version = string(&config, "cniVersion")?;
    // As the CNI libraries decide: a configuration without a `type` is a list.
    let (key, ipam) = if string(&config, "type")?.is_empty() {
        let plugins = match config.get("plugins") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Array(plugins)) => plugins,
            Some(_) => return Err(shape("plugins", "an array")),
        };
        let found = plugins.iter().enumerate().find_map(|(i, plugin)| {
            plugin
                .get("ipam")
                .filter(|ipam| is_whereabouts(ipam))
                .map(|ipam| (format!("plugins[{i}].ipam"), ipam))
        });
        match found {
            Some(found) => found,
            None => return Ok(None),
        }
    } else {
        match config.get("ipam").filter(|ipam| is_whereabouts(ipam)) {
            Some(ipam) => ("ipam".to_string(), ipam),
            None => return Ok(None),
        }
    };
    let refused = |source| NadError::Config { nad: nad.to_string(), key: key.clone(), source };
    let inline = InlineIpam::parse(ipam).map_err(refused)?;
    // The controller calls no plugin: no CNI_ARGS, no requested addresses; everything is validated.
    let call = CallContext { purpose: Purpose::Allocate, cni_version, ..CallContext::default() };
    let flat = flat.map(|f| whereabouts_core::config::FlatFile { path: &f.path, content: &f.content });
    let ipam = inline.resolve(flat, &call).map_err(refused)?;
    Ok(Some(NadConfig { cni_name, ipam }))
}

/// Whether an `ipam` object is whereabouts' (`type`, matched case-insensitively as the loader does).
fn is_whereabouts(ipam: &Value) -> bool {
    let Value::Object(ipam) = ipam else { return false };
    ipam.iter().any(|(k, v)| k.eq_ignore_ascii_case("type") && v.as_str() == Some("whereabouts"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn flat() -> FlatFile {
        FlatFile {
            path: "/host/etc/cni/net.d/whereabouts.d/whereabouts.conf".into(),
            content: br#"{"datastore": "kubernetes", "kubernetes": {"kubeconfig": "/k"}, "node_slice_size": "/28"}"#
                .to_vec(),
        }
    }

    fn load_json(config: Value, flat: Option<&FlatFile>) -> Result<Option<NadConfig>, NadError> {
        load("ns/nad", Some(&config.to_string()), flat)
    }

    #[test]
    fn a_single_plugin_merged_with_the_flat_file() {
        let config = json!({"cniVersion": "0.3.1", "name": "blue", "type": "macvlan",
            "ipam": {"type": "whereabouts", "range": "10.0.0.0/24"}});
        let loaded = load_json(config, Some(&flat())).unwrap().unwrap();
        assert_eq!(loaded.cni_name, "blue");
        assert_eq!(loaded.slice_pool_name(), "blue");
        assert_eq!(loaded.ipam.node_slice_size.as_deref(), Some("/28"), "from the flat file");
        assert_eq!(loaded.ipam.ranges[0].range.network().to_string(), "10.0.0.0/24");
    }

    #[test]
    fn a_conflist_uses_its_whereabouts_plugin_and_its_own_name() {
        let config = json!({"cniVersion": "1.0.0", "name": "list-net", "plugins": [
            {"type": "bridge", "ipam": {"type": "host-local"}},
            {"type": "macvlan", "name": "ignored", "ipam": {"type": "whereabouts", "range": "2001:db8::/112",
                "network_name": "green"}},
        ]});
        let loaded = load_json(config, Some(&flat())).unwrap().unwrap();
        assert_eq!(loaded.cni_name, "list-net");
        assert_eq!(loaded.slice_pool_name(), "green");
        assert_eq!(loaded.ipam.ranges[0].range.network().to_string(), "2001:db8::/112");
    }

    #[test]
    fn other_networks_are_none() {
        for config in [
            json!({"name": "n", "type": "macvlan", "ipam": {"type": "host-local"}}),
            json!({"name": "n", "type": "macvlan"}),
            json!({"name": "n", "plugins": [{"type": "bridge", "ipam": {"type": "dhcp"}}]}),
            json!({"name": "n"}),
        ] {
            assert!(load_json(config.clone(), None).unwrap().is_none(), "{config}");
        }
        assert!(load("ns/nad", None, None).unwrap().is_none());
        assert!(load("ns/nad", Some(""), None).unwrap().is_none());
    }

    #[test]
    fn errors_name_the_nad_and_the_key() {
        let e = load("ns/bad", Some("{"), None).unwrap_err();
        assert!(matches!(&e, NadError::Json { nad, .. } if nad == "ns/bad"), "{e}");
        let e = load_json(json!({"name": "n", "plugins": {}}), None).unwrap_err();
        assert_eq!(e, NadError::Shape { nad: "ns/nad".into(), key: "plugins".into(), expected: "an array" });
        let e = load_json(json!({"name": 3, "type": "x"}), None).unwrap_err();
        assert!(e.to_string().contains("spec.config key name: expected a string"), "{e}");

        let config = json!({"name": "n", "plugins": [{"type": "tuning"},
            {"type": "macvlan", "ipam": {"type": "whereabouts", "range": "10.0.0.0/24", "exclude": ["nope"]}}]});
        let e = load_json(config, Some(&flat())).unwrap_err();
        let NadError::Config { nad, key, source } = &e else { panic!("{e}") };
        assert_eq!((nad.as_str(), key.as_str()), ("ns/nad", "plugins[1].ipam"));
        assert!(matches!(source, ConfigError::Invalid { key, .. } if key == "exclude[0]"), "{source}");
        assert!(e.to_string().contains("ns/nad") && e.to_string().contains("exclude[0]"), "{e}");

        // Without a flat file, the inline configuration must name the store itself.
        let config =
            json!({"name": "n", "type": "macvlan", "ipam": {"type": "whereabouts", "range": "10.0.0.0/24"}});
        assert!(matches!(
            load_json(config, None),
            Err(NadError::Config { source: ConfigError::Missing(_), .. })
        ));
    }
}
