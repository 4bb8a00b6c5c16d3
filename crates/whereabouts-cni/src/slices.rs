//! Node slices (`node_slice_size`, upstream's "fast IPAM"), the plugin side.
//!
//! The controller cuts the network's first range into slices and records in a NodeSlicePool (named
//! `network_name`, else the CNI network's `name`, in the store's namespace) which node holds which
//! slice. The plugin only reads it: the first range is narrowed to this node's slice and allocated in
//! the node's own pool of it (`[network_name-]<node>-<slice>`), while the result keeps the whole range's
//! prefix. Only the first range is sliced, as upstream's controller slices only the first; any other
//! range (the IPv6 range of a dual-stack network, say) is allocated from its cluster-wide pool as
//! usual. (Upstream's plugin substitutes the first range's slice for every range.)
//!
//! ADD, CHECK and STATUS need the slice: without a node name, or with a NodeSlicePool that does not
//! match the configuration, they fail with code 7; with no NodeSlicePool or no slice for this node yet
//! they fail with code 11, try again later (the controller assigns slices as nodes join; upstream's
//! plugin panics there). DEL and GC do not need the NodeSlicePool: they release from every pool of
//! this node's slices of the first range that the store lists, the current slice's and those of slices
//! the node held before a re-slicing (its pods keep their addresses there until released; upstream
//! looks only in the current slice and leaks them). Without a node name there is nothing sliced to
//! release, and only the other ranges are released.

use ipnet::IpNet;
use whereabouts_core::config::{Datastore, IpamConfig, Purpose};
use whereabouts_core::range::node_pool_cidr;
use whereabouts_core::slice::{AssignedSliceError, Slicing};
use whereabouts_store::{AnyStore, Store};

use crate::error::{CniError, codes};

/// What a call does about node slices, decided before the store is opened.
#[derive(Debug)]
pub enum NodeSlices {
    /// `node_slice_size` is not set.
    Off,
    /// The first range is to be narrowed to the slice of `node`.
    Find {
        /// The slicing of the first range.
        slicing: Slicing,
        /// This node.
        node: String,
    },
    /// DEL or GC without a way to find the slice: the first range is left out.
    NothingSliced(String),
}

/// Checks what can be checked without the store: the datastore, `node_slice_size` and the node name.
/// For ADD, CHECK and STATUS a problem is an error; for DEL and GC it means nothing sliced is released.
pub fn prepare(config: &IpamConfig, purpose: Purpose, node: Option<&str>) -> Result<NodeSlices, CniError> {
    if config.node_slice_size.is_none() {
        return Ok(NodeSlices::Off);
    }
    let found = find_slicing(config, node);
    match (found, purpose) {
        (Ok(found), _) => Ok(found),
        (Err(e), Purpose::Release) => Ok(NodeSlices::NothingSliced(e.msg)),
        (Err(e), Purpose::Allocate) => Err(e),
    }
}

fn find_slicing(config: &IpamConfig, node: Option<&str>) -> Result<NodeSlices, CniError> {
    if !matches!(config.datastore, Datastore::Kubernetes { .. }) {
        return Err(CniError::new(
            codes::UNSUPPORTED_FIELD,
            "node_slice_size: node slices need the kubernetes datastore (the NodeSlicePool assigning \
             each node its slice is a Kubernetes object)",
        ));
    }
    let Some(slicing) = config.node_slicing()? else { return Ok(NodeSlices::Off) };
    let node = node.filter(|n| !n.is_empty()).ok_or_else(|| {
        let file = config
            .configuration_path
            .as_deref()
            .map_or_else(String::new, |dir| format!("{dir}/nodename or "));
        CniError::new(
            codes::INVALID_CONFIG,
            format!(
                "node_slice_size needs the node name, to find this node's slice: set NODENAME, or write it \
                 to {file}/etc/hostname"
            ),
        )
    })?;
    Ok(NodeSlices::Find { slicing, node: node.to_string() })
}

/// The NodeSlicePool's name: `network_name`, else the CNI network's `name` (as upstream).
pub fn node_slice_pool_name<'a>(config: &'a IpamConfig, cni_network: &'a str) -> &'a str {
    if config.network_name.is_empty() { cni_network } else { &config.network_name }
}

/// Narrows the first range of `config` to the slice the NodeSlicePool assigns this node (ADD, CHECK,
/// STATUS), replaces it by this node's pools of its slices (DEL, GC), or leaves it out (see
/// [`NodeSlices::NothingSliced`]).
pub async fn apply(
    plan: NodeSlices,
    config: &mut IpamConfig,
    store: &AnyStore,
    cni_network: &str,
    purpose: Purpose,
) -> Result<(), CniError> {
    match (plan, purpose) {
        (NodeSlices::Off, _) => Ok(()),
        (NodeSlices::NothingSliced(why), _) => {
            // DEL or GC without a node name (or with a configuration that cannot be sliced): this
            // node's pools cannot be named, so nothing sliced is released, and the other ranges are.
            tracing::warn!("{why}: releasing nothing from a node slice");
            if !config.ranges.is_empty() {
                config.ranges.remove(0);
            }
            Ok(())
        }
        (NodeSlices::Find { node, .. }, Purpose::Release) => {
            let first = config.ranges.remove(0);
            let slices = node_slices_in_store(store, &config.network_name, &node, first.network).await?;
            let pools = slices
                .into_iter()
                .map(|slice| first.releasing_in_node_slice(&config.network_name, &node, slice));
            config.ranges.splice(0..0, pools);
            Ok(())
        }
        (NodeSlices::Find { slicing, node }, Purpose::Allocate) => {
            let name = node_slice_pool_name(config, cni_network).to_string();
            let (location, found) = lookup(store, &name, &node).await?;
            let assigned =
                found.as_ref().map(|(range, size, slice)| (range.as_str(), size.as_str(), slice.as_deref()));
            let (slice, inside) = assigned_slice(&slicing, &location, &node, assigned)?;
            let narrowed = config.ranges[0].in_node_slice(&config.network_name, &node, slice, inside)?;
            tracing::debug!(
                "node {node}: allocating {} in pool {}",
                narrowed.range.describe(),
                narrowed.pool.name
            );
            config.ranges[0] = narrowed;
            Ok(())
        }
    }
}

/// The slices overlapping `range` (the first range's network) of which the store has a pool of node
/// `node` (`[network_name-]<node>-<slice>`): its current slice and those it held before a re-slicing
/// (of another size, or of a range since moved or resized). An error listing the pools (an unreachable
/// API server) fails the call: there may be something to release once it answers.
async fn node_slices_in_store(
    store: &AnyStore,
    network_name: &str,
    node: &str,
    range: IpNet,
) -> Result<Vec<IpNet>, CniError> {
    let range = range.trunc();
    let slices: Vec<IpNet> = store
        .list_pools()
        .await?
        .iter()
        .filter_map(|name| node_pool_cidr(network_name, node, name))
        .filter(|slice| slice.trunc().contains(&range) || range.contains(slice))
        .collect();
    tracing::debug!("node {node}: releasing from its pools of slices {slices:?}");
    Ok(slices)
}

/// What the NodeSlicePool says: (`spec.range`, `spec.sliceSize`, this node's `sliceRange`).
type Assignment = (String, String, Option<String>);

#[cfg(feature = "kubernetes")]
async fn lookup(store: &AnyStore, name: &str, node: &str) -> Result<(String, Option<Assignment>), CniError> {
    let AnyStore::Kubernetes(kube) = store else {
        return Err(CniError::new(
            codes::UNSUPPORTED_FIELD,
            "node_slice_size: node slices need the kubernetes datastore",
        ));
    };
    let found = kube.node_slice(name, node).await?;
    Ok((kube.node_slice_pool_location(name), found.map(|a| (a.range, a.slice_size, a.slice))))
}

#[cfg(not(feature = "kubernetes"))]
async fn lookup(_: &AnyStore, _: &str, _: &str) -> Result<(String, Option<Assignment>), CniError> {
    Err(CniError::new(codes::UNSUPPORTED_FIELD, "node_slice_size: this build has no kubernetes datastore"))
}

/// Checks what the NodeSlicePool at `location` says about `node` (`None` when it does not exist):
/// the slice and what it offers, or the CNI error naming the NodeSlicePool and the node.
pub fn assigned_slice(
    slicing: &Slicing,
    location: &str,
    node: &str,
    assigned: Option<(&str, &str, Option<&str>)>,
) -> Result<(ipnet::IpNet, whereabouts_core::range::IpRange), CniError> {
    let later = |what: String| {
        CniError::new(
            codes::TRY_AGAIN,
            format!(
                "{what}: the whereabouts controller assigns node slices of {} as nodes join; try again later",
                slicing.range().network()
            ),
        )
    };
    let Some((range, size, slice)) = assigned else {
        return Err(later(format!("{location} does not exist (yet), so node {node} has no slice")));
    };
    slicing.check_assigned(range, size, slice).map_err(|e| match e {
        AssignedSliceError::Unassigned => later(format!("{location} assigns no slice to node {node} (yet)")),
        AssignedSliceError::Mismatch { .. } => CniError::new(
            codes::INVALID_CONFIG,
            format!(
                "{location} does not match the configuration (range, node_slice_size) of node {node}: {e}"
            ),
        ),
        AssignedSliceError::NotASlice { .. } | AssignedSliceError::Unusable { .. } => {
            CniError::new(codes::INVALID_CONFIG, format!("{location}, node {node}: {e}"))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use whereabouts_core::config::{CallContext, load};

    fn config(ipam: serde_json::Value, purpose: Purpose) -> IpamConfig {
        let call = CallContext { purpose, cni_version: "1.0.0".into(), ..CallContext::default() };
        load(&ipam, None, &call).expect("a valid configuration")
    }

    fn kube(extra: serde_json::Value) -> serde_json::Value {
        let mut ipam = serde_json::json!({
            "type": "whereabouts", "range": "10.0.0.0/24", "node_slice_size": "/26",
            "kubernetes": { "kubeconfig": "/k" }, "configuration_path": "/etc/cni/net.d/whereabouts.d",
        });
        for (k, v) in extra.as_object().expect("an object") {
            ipam[k] = v.clone();
        }
        ipam
    }

    #[test]
    fn what_is_checked_before_the_store() {
        let allocate = config(kube(serde_json::json!({})), Purpose::Allocate);
        assert!(
            matches!(prepare(&allocate, Purpose::Allocate, Some("n1")), Ok(NodeSlices::Find { node, .. }) if node == "n1")
        );
        let missing = prepare(&allocate, Purpose::Allocate, None).expect_err("no node name");
        assert_eq!(missing.code, codes::INVALID_CONFIG);
        assert!(
            missing.msg.contains("NODENAME") && missing.msg.contains("/etc/cni/net.d/whereabouts.d/nodename"),
            "{}",
            missing.msg
        );

        let file = config(kube(serde_json::json!({"datastore": "file"})), Purpose::Allocate);
        let refused = prepare(&file, Purpose::Allocate, Some("n1")).expect_err("file store");
        assert_eq!(refused.code, codes::UNSUPPORTED_FIELD);
        assert!(refused.msg.contains("kubernetes datastore"), "{}", refused.msg);

        let bad = config(kube(serde_json::json!({"node_slice_size": "/20"})), Purpose::Allocate);
        let refused = prepare(&bad, Purpose::Allocate, Some("n1")).expect_err("slices larger than the range");
        assert_eq!(refused.code, codes::INVALID_CONFIG);
        assert!(refused.msg.contains("node_slice_size"), "{}", refused.msg);

        // DEL and GC go ahead, releasing nothing sliced.
        for ipam in [
            kube(serde_json::json!({})),
            kube(serde_json::json!({"datastore": "file"})),
            kube(serde_json::json!({"node_slice_size": "/20"})),
        ] {
            let release = config(ipam, Purpose::Release);
            assert!(matches!(prepare(&release, Purpose::Release, None), Ok(NodeSlices::NothingSliced(_))));
        }
        let unsliced = config(kube(serde_json::json!({"node_slice_size": ""})), Purpose::Allocate);
        assert!(matches!(prepare(&unsliced, Purpose::Allocate, None), Ok(NodeSlices::Off)));
    }

    #[test]
    fn the_node_slice_pool_is_named_after_the_network() {
        let named = config(kube(serde_json::json!({"network_name": "blue"})), Purpose::Allocate);
        assert_eq!(node_slice_pool_name(&named, "cni-net"), "blue");
        let unnamed = config(kube(serde_json::json!({})), Purpose::Allocate);
        assert_eq!(node_slice_pool_name(&unnamed, "cni-net"), "cni-net");
    }

    #[test]
    fn assignment_errors_name_the_node_slice_pool_and_the_node() {
        let cfg = config(kube(serde_json::json!({})), Purpose::Allocate);
        let slicing = cfg.node_slicing().expect("valid").expect("sliced");
        let at = "NodeSlicePool ns/net";
        let check = |assigned| assigned_slice(&slicing, at, "n1", assigned);
        let (slice, _) = check(Some(("10.0.0.0/24", "/26", Some("10.0.0.64/26")))).expect("assigned");
        assert_eq!(slice.to_string(), "10.0.0.64/26");
        for (assigned, code) in [
            (None, codes::TRY_AGAIN),
            (Some(("10.0.0.0/24", "/26", None)), codes::TRY_AGAIN),
            (Some(("10.0.0.0/24", "/27", Some("10.0.0.64/27"))), codes::INVALID_CONFIG),
            (Some(("10.0.0.0/24", "/26", Some("10.0.0.64/27"))), codes::INVALID_CONFIG),
        ] {
            let e = check(assigned).expect_err("refused");
            assert_eq!(e.code, code, "{assigned:?}: {}", e.msg);
            assert!(e.msg.contains(at) && e.msg.contains("node n1"), "{}", e.msg);
        }
        let mismatch = check(Some(("10.0.0.0/23", "/27", Some("10.0.0.64/27")))).expect_err("mismatch").msg;
        assert!(
            mismatch.contains("10.0.0.0/23")
                && mismatch.contains("/27")
                && mismatch.contains("10.0.0.0/24")
                && mismatch.contains("/26"),
            "{mismatch}"
        );
    }
}
