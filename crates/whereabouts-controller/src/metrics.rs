//! The controller's Prometheus metrics, in one explicit registry (no globals, so a test builds its own
//! and reads the numbers back).
//!
//! Pool figures come from the controller's watch of the IPPools: every version of a pool it sees sets
//! the pool's gauges, and the difference from the previous version counts allocations and releases,
//! whoever made them (the plugins on every node, this controller, an operator). What only this process
//! knows, its own releases and compare-and-swap conflicts, is counted where it happens.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use whereabouts_store::ipam::EngineEvent;

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Labels naming one pool.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// The IPPool's name.
    pub pool: String,
}

/// Why the controller released an address.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum ReleaseReason {
    /// Its pod no longer exists.
    PodGone,
    /// A pod of the same name exists, but it is a newer pod than the one the address was allocated to.
    PodReplaced,
    /// Its pod has finished (phase Succeeded or Failed).
    PodFinished,
    /// Its pod's network-status no longer lists it (addresses recorded without a pod uid only).
    NotInNetworkStatus,
    /// A cluster-wide reservation with no pool entry behind it.
    OrphanReservation,
}

/// Labels of a release by the controller.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReleaseLabels {
    /// Which part of the controller released it.
    pub source: Source,
    /// Why.
    pub reason: ReleaseReason,
}

/// The part of the controller that acted.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Source {
    /// The pod-deletion cleanup.
    PodCleanup,
    /// The scheduled (or one-shot) reconciler.
    Reconciler,
}

/// How a reconciler run ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum RunResult {
    /// Every orphan was released (or, in a dry run, reported).
    Success,
    /// The run stopped on an error; the next scheduled run tries again.
    Error,
}

/// Labels of a reconciler run.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunLabels {
    /// How it ended.
    pub result: RunResult,
}

/// The state of a node slice.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum SliceState {
    /// Assigned to a node.
    Assigned,
    /// Free for the next node that joins.
    Free,
}

/// Labels of node-slice counts.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SliceLabels {
    /// The NodeSlicePool's name.
    pub pool: String,
    /// Assigned or free.
    pub state: SliceState,
}

/// Gives label enums snake_case values (`pod_gone`), as Prometheus label values usually are.
macro_rules! snake_case_values {
    ($($type:ty { $($variant:ident => $value:literal),+ $(,)? })+) => {$(
        impl $type {
            /// The label value.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $value),+ }
            }
        }
        impl EncodeLabelValue for $type {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    )+};
}

snake_case_values! {
    ReleaseReason {
        PodGone => "pod_gone",
        PodReplaced => "pod_replaced",
        PodFinished => "pod_finished",
        NotInNetworkStatus => "not_in_network_status",
        OrphanReservation => "orphan_reservation",
    }
    Source { PodCleanup => "pod_cleanup", Reconciler => "reconciler" }
    RunResult { Success => "success", Error => "error" }
    SliceState { Assigned => "assigned", Free => "free" }
}

/// Every metric the controller exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Addresses allocated in each pool.
    pub pool_allocated: Family<PoolLabels, Gauge>,
    /// Addresses each pool's range holds (before `range_start`/`range_end`/`exclude`, which only the
    /// network configurations know).
    pub pool_capacity: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    /// Allocations seen appearing in each pool.
    pub allocations: Family<PoolLabels, Counter>,
    /// Allocations seen disappearing from each pool.
    pub releases: Family<PoolLabels, Counter>,
    /// Addresses this controller released, by source and reason.
    pub controller_releases: Family<ReleaseLabels, Counter>,
    /// Compare-and-swap writes of this controller that lost a race and were retried.
    pub cas_conflicts: Counter,
    /// Store calls of this controller retried after the store was unavailable.
    pub store_retries: Counter,
    /// Reconciler runs, by result.
    pub reconciler_runs: Family<RunLabels, Counter>,
    /// When the last reconciler run succeeded (Unix seconds).
    pub reconciler_last_success: Gauge<f64, AtomicU64>,
    /// Deleted pods waiting for their addresses to be released.
    pub queue_depth: Gauge,
    /// 1 while this process holds the leader Lease (always 1 for a process that does not elect).
    pub leader: Gauge,
    /// Node slices by pool and state.
    pub node_slices: Family<SliceLabels, Gauge>,
    /// Node-slice reconciles (each a look at every sliced network, and the writes it needs).
    pub node_slice_reconciles: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered under the `whereabouts` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("whereabouts");
        let metrics = Metrics {
            registry: Registry::default(),
            pool_allocated: Family::default(),
            pool_capacity: Family::default(),
            allocations: Family::default(),
            releases: Family::default(),
            controller_releases: Family::default(),
            cas_conflicts: Counter::default(),
            store_retries: Counter::default(),
            reconciler_runs: Family::default(),
            reconciler_last_success: Gauge::default(),
            queue_depth: Gauge::default(),
            leader: Gauge::default(),
            node_slices: Family::default(),
            node_slice_reconciles: Counter::default(),
        };
        registry.register(
            "pool_allocated_addresses",
            "Addresses allocated in the pool",
            metrics.pool_allocated.clone(),
        );
        registry.register(
            "pool_capacity_addresses",
            "Addresses in the pool's range",
            metrics.pool_capacity.clone(),
        );
        registry.register(
            "pool_allocations",
            "Allocations seen appearing in the pool",
            metrics.allocations.clone(),
        );
        registry.register(
            "pool_releases",
            "Allocations seen disappearing from the pool",
            metrics.releases.clone(),
        );
        registry.register(
            "controller_releases",
            "Addresses released by this controller",
            metrics.controller_releases.clone(),
        );
        registry.register(
            "cas_conflicts",
            "Compare-and-swap writes of this controller that lost a race and were retried",
            metrics.cas_conflicts.clone(),
        );
        registry.register(
            "store_retries",
            "Store calls of this controller retried while the store was unavailable",
            metrics.store_retries.clone(),
        );
        registry.register("reconciler_runs", "Reconciler runs by result", metrics.reconciler_runs.clone());
        registry.register(
            "reconciler_last_success_timestamp_seconds",
            "When the last reconciler run succeeded",
            metrics.reconciler_last_success.clone(),
        );
        registry.register(
            "controller_queue_depth",
            "Deleted pods waiting for their addresses to be released",
            metrics.queue_depth.clone(),
        );
        registry.register("leader", "1 while this process is the leader", metrics.leader.clone());
        registry.register("node_slices", "Node slices by pool and state", metrics.node_slices.clone());
        registry.register(
            "node_slice_reconciles",
            "Node-slice reconciles",
            metrics.node_slice_reconciles.clone(),
        );
        Metrics { registry, ..metrics }
    }

    /// The OpenMetrics text of every metric ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// Counts what the IPAM engine went through on this controller's behalf.
    pub fn observe_engine(&self, event: EngineEvent) {
        match event {
            EngineEvent::Conflict => self.cas_conflicts.inc(),
            EngineEvent::Unavailable => self.store_retries.inc(),
        };
    }

    /// Counts one release by this controller.
    pub fn released(&self, source: Source, reason: ReleaseReason) {
        self.controller_releases.get_or_create(&ReleaseLabels { source, reason }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_prefixed_names_and_counter_suffixes() {
        let metrics = Metrics::new();
        metrics.pool_allocated.get_or_create(&PoolLabels { pool: "10.0.0.0-24".into() }).set(3);
        metrics.released(Source::Reconciler, ReleaseReason::PodGone);
        metrics.cas_conflicts.inc_by(2);
        let text = metrics.encode();
        assert!(text.contains("whereabouts_pool_allocated_addresses{pool=\"10.0.0.0-24\"} 3"), "{text}");
        assert!(
            text.contains(
                "whereabouts_controller_releases_total{source=\"reconciler\",reason=\"pod_gone\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("whereabouts_cas_conflicts_total 2"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
