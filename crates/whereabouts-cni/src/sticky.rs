//! `sticky_statefulsets`, the plugin side.
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

/// The StatefulSet owning the pod of this ADD, when the network is sticky; `None` otherwise, and for
/// a pod that is not a StatefulSet's (or already gone).
pub async fn statefulset_of(
    config: &IpamConfig,
    store: &AnyStore,
    args: &CniArgs,
) -> Result<Option<String>, CniError> {
    if !config.sticky_statefulsets {
        return Ok(None);
    }
    if args.pod_namespace.is_empty() || args.pod_name.is_empty() {
        return Ok(None);
    }
    lookup(store, &args.pod_namespace, &args.pod_name).await
}

#[cfg(feature = "kubernetes")]
async fn lookup(store: &AnyStore, namespace: &str, name: &str) -> Result<Option<String>, CniError> {
    match store {
        AnyStore::Kubernetes(kube) => Ok(kube.pod_statefulset(namespace, name).await?),
        _ => Ok(None),
    }
}

#[cfg(not(feature = "kubernetes"))]
async fn lookup(_: &AnyStore, _: &str, _: &str) -> Result<Option<String>, CniError> {
    Ok(None)
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
