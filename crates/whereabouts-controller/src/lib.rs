//! The whereabouts controller: everything that keeps the stored state true over time, beside the CNI
//! plugin that writes it.
//!
//! * [`cleanup`]: releases the addresses of deleted pods within seconds (upstream's ip-control-loop).
//! * [`reconcile`]: finds and releases leaked allocations and orphaned reservations, and makes
//!   missing reservations again, on a cron schedule or once (upstream's ip-reconciler).
//! * [`schedule`]: where the reconciler's cron expression comes from, and its reloading.
//! * [`judge`]: the single, pure decision whether an allocation still belongs to a live pod.
//! * [`controller`]: the process: which parts run where, leadership, health, shutdown.
//! * [`metrics`]: the Prometheus registry.
//! * [`nad`]: the whereabouts configuration of a NetworkAttachmentDefinition.
//! * [`nodeslice`]: assigns each node a slice of every network with `node_slice_size` (upstream's
//!   node-slice controller).
//! * [`http`]: the HTTP server of `/metrics`, `/healthz` and `/readyz`.
//! * [`leader`]: leader election on a Lease, so that one replica of several does the releasing.
//!
//! Every release is a compare-and-swap through the store's IPAM engine, so the controller, the plugins
//! and several controller processes can all act at once without ever freeing an address that was
//! reassigned in between.

pub mod cleanup;
pub mod controller;
pub mod http;
pub mod index;
pub mod judge;
pub mod leader;
pub mod metrics;
pub mod nad;
pub mod network_status;
pub mod nodeslice;
pub mod pools;
pub mod reconcile;
pub mod release;
pub mod schedule;

use std::sync::Arc;

/// What every part of the controller works with.
#[derive(Clone)]
pub struct Context {
    /// The API server.
    pub client: kube::Client,
    /// Where the IPPools, reservations, NodeSlicePools and the leader Lease live
    /// (`WHEREABOUTS_NAMESPACE`).
    pub namespace: String,
    /// The metrics registry.
    pub metrics: Arc<metrics::Metrics>,
    /// Log what would be released (or written) instead of doing it.
    pub dry_run: bool,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("namespace", &self.namespace).field("dry_run", &self.dry_run).finish()
    }
}
