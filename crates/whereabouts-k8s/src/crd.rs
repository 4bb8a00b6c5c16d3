//! The custom resources, as upstream defines them (`whereabouts.cni.cncf.io/v1alpha1`, namespaced,
//! one served and stored version, no subresources), so that a cluster switches implementations without
//! touching its objects.
//!
//! The specs are the core's stored types themselves ([`PoolSpec`], [`Reservation`]); the CRDs are
//! generated from them by kube's derive and adjusted where upstream's schema differs from what the
//! derive emits (see [`crds`]). Fields we add are additive and optional; upstream's readers ignore them:
//! an allocation's `node` and `network`, an ORIP's `containerid` (in upstream's schema, never written
//! by it).

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResource;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use whereabouts_core::pool::{PoolSpec, Reservation};

/// The API group of every whereabouts resource.
pub const GROUP: &str = "whereabouts.cni.cncf.io";

/// An IPPool's spec: the range and its allocations, keyed by the decimal offset of each address from
/// the IP written in `range`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "whereabouts.cni.cncf.io",
    version = "v1alpha1",
    kind = "IPPool",
    plural = "ippools",
    singular = "ippool",
    namespaced,
    derive = "PartialEq",
    doc = "IPPool is the Schema for the ippools API"
)]
pub struct IPPoolSpec {
    /// The pool.
    #[serde(flatten)]
    pub pool: PoolSpec,
}

/// The group of Multus's objects (NetworkAttachmentDefinition, IPAMClaim).
pub const NETWORK_GROUP: &str = "k8s.cni.cncf.io";

/// `IPAMClaim` (`k8s.cni.cncf.io/v1alpha1`, namespaced; CRD of k8snetworkplumbingwg/ipamclaims): a
/// persistent allocation that KubeVirt makes for a virtual machine's network and Multus hands to the
/// IPAM plugin as the attachment's `ipam-claim-reference`. Not ours: read as JSON.
pub fn ipam_claim_resource() -> kube::api::ApiResource {
    kube::api::ApiResource {
        group: NETWORK_GROUP.into(),
        version: "v1alpha1".into(),
        api_version: format!("{NETWORK_GROUP}/v1alpha1"),
        kind: "IPAMClaim".into(),
        plural: "ipamclaims".into(),
    }
}

/// An OverlappingRangeIPReservation's spec: who holds one address across every range of a network.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "whereabouts.cni.cncf.io",
    version = "v1alpha1",
    kind = "OverlappingRangeIPReservation",
    plural = "overlappingrangeipreservations",
    singular = "overlappingrangeipreservation",
    namespaced,
    derive = "PartialEq",
    doc = "OverlappingRangeIPReservation is the Schema for the OverlappingRangeIPReservations API"
)]
pub struct OverlappingRangeIPReservationSpec {
    /// The holder.
    #[serde(flatten)]
    pub holder: Reservation,
}

/// A NodeSlicePool's spec: a network's whole range and the size of the slice each node gets.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "whereabouts.cni.cncf.io",
    version = "v1alpha1",
    kind = "NodeSlicePool",
    plural = "nodeslicepools",
    singular = "nodeslicepool",
    namespaced,
    status = "NodeSlicePoolStatus",
    derive = "PartialEq",
    doc = "NodeSlicePool is the Schema for the nodesliceippools API"
)]
pub struct NodeSlicePoolSpec {
    /// The entire range (CIDR) from which each node is assigned a slice.
    pub range: String,
    /// The prefix length of each slice, as configured (e.g. `/22`).
    #[serde(rename = "sliceSize")]
    pub slice_size: String,
}

/// Which node holds which slice.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct NodeSlicePoolStatus {
    /// One entry per slice.
    pub allocations: Vec<NodeSliceAllocation>,
}

/// One slice and its node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct NodeSliceAllocation {
    /// The node holding the slice; empty when the slice is free.
    #[serde(rename = "nodeName")]
    pub node_name: String,
    /// The slice (CIDR).
    #[serde(rename = "sliceRange")]
    pub slice_range: String,
}

/// The three CRDs as they are installed (and checked in under `deploy/crds`).
///
/// Adjustments to what the derive emits, to be exactly as permissive as upstream's CRDs:
/// * IPPool and NodeSlicePool do not require `spec` at the top level (upstream's schemas do not).
/// * NodeSlicePool has no status subresource: upstream's controller writes `status` through the main
///   resource, which a status subresource would silently ignore during a mixed-version upgrade.
/// * `listKind` is spelled out as upstream's CRDs do.
pub fn crds() -> Vec<CustomResourceDefinition> {
    let mut ippool = IPPool::crd();
    optional_spec(&mut ippool);
    let mut node_slice_pool = NodeSlicePool::crd();
    optional_spec(&mut node_slice_pool);
    for version in &mut node_slice_pool.spec.versions {
        version.subresources = None;
    }
    let mut all = vec![ippool, node_slice_pool, OverlappingRangeIPReservation::crd()];
    for crd in &mut all {
        crd.spec.names.list_kind = Some(format!("{}List", crd.spec.names.kind));
    }
    all
}

/// Drops the top-level `required: [spec]`.
fn optional_spec(crd: &mut CustomResourceDefinition) {
    for version in &mut crd.spec.versions {
        if let Some(root) = version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) {
            root.required = None;
        }
    }
}

/// The file name of a CRD under `deploy/crds` (upstream's: `<group>_<plural>.yaml`).
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural)
}

/// A CRD as YAML, as checked in.
pub fn to_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_saphyr::ser::Error> {
    serde_saphyr::to_string(crd).map(|yaml| format!("---\n{yaml}"))
}
