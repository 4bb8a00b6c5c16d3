//! Persistent addresses, the plugin side: `sticky_statefulsets`, and IPAMClaims.
//!
//! A network with `allowPersistentIPs` (KubeVirt's switch) allocates for the IPAMClaim that the pod's
//! network selection element names (`ipam-claim-reference`), instead of for the pod: the claim's
//! next launcher pod (a restarted or migrating virtual machine, two pods at once) gets the same
//! addresses, which are written to the claim's status, and DEL holds them as it holds a
//! StatefulSet's. The controller releases them once the claim is deleted.
//!
//! ADD asks the API server which StatefulSet owns the pod (its owner reference of kind `StatefulSet`)
//! and records it in the allocation; DEL then holds such an entry for the pod's next sandbox instead of
//! releasing it (see [`whereabouts_core::pool::Allocation::held`]), and the next ADD of the pod, on
//! any node, gets the same addresses back by the idempotent match on pod and interface. The controller
//! releases the entry once the StatefulSet no longer wants the pod (scaled below its ordinal, or
//! deleted).
//!
//! With node slices the held address lies in the slice pool of the node the pod ran on, so ADD and DEL
//! of a sticky network look for the pod's entry in every node's pool of the first range's slices,
//! not only in their own node's.

use whereabouts_core::cni_args::CniArgs;
use whereabouts_core::config::{Datastore, IpamConfig, ManagedRange};
use whereabouts_core::pool::Owner;
use whereabouts_core::range::any_node_pool;
use whereabouts_store::ipam::Ipam;
use whereabouts_store::{AnyStore, Store};

use crate::error::{CniError, codes};

/// Refuses `sticky_statefulsets` with a store that has no pods to ask about.
pub fn check(config: &IpamConfig) -> Result<(), CniError> {
    if config.sticky_statefulsets && !matches!(config.datastore, Datastore::Kubernetes { .. }) {
        return Err(CniError::new(
            codes::UNSUPPORTED_FIELD,
            "sticky_statefulsets: needs the kubernetes datastore (a pod's StatefulSet is read from the API server)",
        ));
    }
    Ok(())
}

/// Whom an ADD allocates for besides its pod: the StatefulSet owning the pod (a sticky network) and
/// the IPAMClaim of the attachment (a network with `allowPersistentIPs`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Persistence {
    /// The pod's StatefulSet.
    pub statefulset: Option<String>,
    /// The attachment's IPAMClaim.
    pub ipam_claim: Option<String>,
}

/// Reads the pod of this ADD when the network wants persistence (`sticky_statefulsets`, or
/// `allowPersistentIPs` at the top of the network configuration, KubeVirt's switch for IPAMClaims);
/// nothing otherwise, and nothing for a pod that is gone. A claim named but not (yet) there is error 11:
/// KubeVirt creates the claim before the pod, and an address allocated for the pod alone would not
/// survive it.
pub async fn persistence_of(
    config: &IpamConfig,
    allow_persistent_ips: bool,
    store: &AnyStore,
    args: &CniArgs,
    ifname: &str,
) -> Result<Persistence, CniError> {
    if !(config.sticky_statefulsets || allow_persistent_ips)
        || args.pod_namespace.is_empty()
        || args.pod_name.is_empty()
    {
        return Ok(Persistence::default());
    }
    let found = lookup(store, &args.pod_namespace, &args.pod_name, ifname).await?;
    let persistence = Persistence {
        statefulset: found.statefulset.filter(|_| config.sticky_statefulsets),
        ipam_claim: found.ipam_claim.filter(|_| allow_persistent_ips),
    };
    if let Some(claim) = &persistence.ipam_claim
        && !claim_exists(store, &args.pod_namespace, claim).await?
    {
        return Err(CniError::new(
            codes::TRY_AGAIN,
            format!("IPAMClaim {}/{claim} does not exist (yet); try again later", args.pod_namespace),
        ));
    }
    Ok(persistence)
}

/// Writes what an ADD allocated for an IPAMClaim to its status, as its holder `pod`.
#[cfg(feature = "kubernetes")]
pub async fn record_claim(
    store: &AnyStore,
    namespace: &str,
    claim: &str,
    ips: &[String],
    pod: &str,
) -> Result<(), CniError> {
    match store {
        AnyStore::Kubernetes(kube) => Ok(kube.set_claim_status(namespace, claim, ips, pod).await?),
        _ => Ok(()),
    }
}

/// Without the Kubernetes store no ADD allocates for a claim.
#[cfg(not(feature = "kubernetes"))]
pub async fn record_claim(_: &AnyStore, _: &str, _: &str, _: &[String], _: &str) -> Result<(), CniError> {
    Ok(())
}

#[cfg(feature = "kubernetes")]
async fn lookup(
    store: &AnyStore,
    namespace: &str,
    name: &str,
    ifname: &str,
) -> Result<Persistence, CniError> {
    let AnyStore::Kubernetes(kube) = store else { return Ok(Persistence::default()) };
    let found = kube.pod_persistence(namespace, name, ifname).await?.unwrap_or_default();
    Ok(Persistence { statefulset: found.statefulset, ipam_claim: found.ipam_claim })
}

#[cfg(not(feature = "kubernetes"))]
async fn lookup(_: &AnyStore, _: &str, _: &str, _: &str) -> Result<Persistence, CniError> {
    Ok(Persistence::default())
}

#[cfg(feature = "kubernetes")]
async fn claim_exists(store: &AnyStore, namespace: &str, claim: &str) -> Result<bool, CniError> {
    match store {
        AnyStore::Kubernetes(kube) => Ok(kube.claim_exists(namespace, claim).await?),
        _ => Ok(false),
    }
}

#[cfg(not(feature = "kubernetes"))]
async fn claim_exists(_: &AnyStore, _: &str, _: &str) -> Result<bool, CniError> {
    Ok(false)
}

/// Every node's pool of the first range's slices that the store lists, as ranges to release from or
/// to find a held entry in.
async fn every_nodes_slice_pools(
    config: &IpamConfig,
    store: &AnyStore,
    first: &ManagedRange,
) -> Result<Vec<ManagedRange>, CniError> {
    let pools = store.list_pools().await?;
    Ok(pools
        .iter()
        .filter_map(|name| any_node_pool(&config.network_name, name, &first.network))
        .map(|(node, slice)| first.releasing_in_node_slice(&config.network_name, &node, slice))
        .collect())
}

/// DEL of a sticky sliced network: adds every other node's slice pools to those [`crate::slices`] put
/// in place of the first range (this node's), so that the pod's entry is held wherever it lies.
pub async fn widen_release(
    config: &mut IpamConfig,
    store: &AnyStore,
    original_first: &ManagedRange,
) -> Result<(), CniError> {
    let known: Vec<String> = config.ranges.iter().map(|r| r.pool.name.clone()).collect();
    let others: Vec<ManagedRange> = every_nodes_slice_pools(config, store, original_first)
        .await?
        .into_iter()
        .filter(|r| !known.contains(&r.pool.name))
        .collect();
    config.ranges.extend(others);
    Ok(())
}

/// ADD of a sticky sliced network: when the pod's entry is held in another node's slice pool, the
/// first range is allocated there (the pod's address back), instead of in this node's slice.
pub async fn follow_held_entry(
    config: &mut IpamConfig,
    store: &AnyStore,
    ipam: &Ipam<'_, AnyStore>,
    original_first: &ManagedRange,
    owner: &Owner,
) -> Result<(), CniError> {
    if config.ranges[0].requested.is_some() {
        return Ok(());
    }
    let candidates = every_nodes_slice_pools(config, store, original_first).await?;
    if let Some(found) = ipam.find_owner(&candidates, owner).await?
        && found.pool != config.ranges[0].pool
    {
        tracing::debug!("pod {:?}: its address is held in pool {}", owner.pod_ref, found.pool.name);
        // Only the held entry is taken back there (an idempotent ADD); the range is narrowed to the
        // slice so that a pool emptied meanwhile hands out nothing outside it.
        let slice = found.pool.network;
        let inside = whereabouts_core::range::IpRange::new(slice, None, None, Vec::new())
            .map_err(|e| CniError::new(codes::INVALID_CONFIG, format!("slice {slice}: {e:?}")))?;
        config.ranges[0] = ManagedRange { range: inside, ..found.clone() };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use whereabouts_core::config::{CallContext, load};

    #[test]
    fn stickiness_needs_the_kubernetes_store() {
        let config = |datastore: &str| {
            let ipam = serde_json::json!({
                "type": "whereabouts", "range": "10.0.0.0/24", "sticky_statefulsets": true,
                "datastore": datastore, "kubernetes": { "kubeconfig": "/k" }, "etcd_host": "127.0.0.1:2379",
            });
            load(&ipam, None, &CallContext::default()).expect("a valid configuration")
        };
        assert!(check(&config("kubernetes")).is_ok());
        for datastore in ["file", "etcd"] {
            let refused = check(&config(datastore)).expect_err(datastore);
            assert_eq!(refused.code, codes::UNSUPPORTED_FIELD);
            assert!(refused.msg.contains("sticky_statefulsets"), "{}", refused.msg);
        }
    }
}
