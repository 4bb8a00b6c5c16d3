//! The controller process: which parts run where, leadership, metrics and health, shutdown.
//!
//! * **Per-node mode** (the DaemonSet, `NODENAME` set): the cleanup of this node's deleted pods. No
//!   election: each node's controller looks after its own pods, as upstream's ip-control-loop.
//! * **Cluster mode** (the Deployment): elected on a Lease; the leader cleans up after deleted pods of
//!   every node (including nodes whose DaemonSet pod died with them), runs the scheduled reconciler and
//!   the node-slice controller. Standbys keep their pool index warm so a takeover acts at once.
//!
//! Both may run at the same time and any number of times: every release is a compare-and-swap, so two
//! controllers acting on the same pod release each address once.

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::index::PoolIndex;
use crate::leader::{Leadership, LeaseConfig};
use crate::schedule::Sources;
use crate::{Context, cleanup, http, leader, nodeslice, reconcile, schedule};

/// What the process runs.
#[derive(Debug)]
pub struct Options {
    /// Per-node mode for this node; cluster mode when `None`.
    pub node: Option<String>,
    /// Cluster mode: the leader Lease, or `None` to act without election (a single replica).
    pub election: Option<LeaseConfig>,
    /// Cluster mode: the reconciler's schedule sources and how often they are re-read; `None` leaves
    /// reconciliation to a CronJob running `whereabouts reconcile`.
    pub reconciler: Option<(Sources, Duration)>,
    /// Cluster mode: run the node-slice controller with these settings.
    pub node_slices: Option<nodeslice::Settings>,
    /// Where to serve `/metrics`, `/healthz` and `/readyz`.
    pub listener: Option<TcpListener>,
}

/// Runs until `shutdown` resolves; a leader then hands its Lease back.
pub async fn run(ctx: Context, mut options: Options, shutdown: impl Future<Output = ()> + Send + 'static) {
    let index = PoolIndex::default();
    let (stop, stopped) = watch::channel(false);
    let server = options.listener.take().map(|listener| {
        let (metrics, ready, mut stopped) = (ctx.metrics.clone(), index.synced(), stopped.clone());
        let local = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        tracing::info!("serving /metrics, /healthz and /readyz on {local}");
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            if let Err(e) = http::serve(listener, metrics, ready, shutdown).await {
                tracing::error!("the metrics server stopped: {e}");
            }
        })
    });
    let leadership = match (&options.node, &options.election) {
        (None, Some(config)) => {
            tracing::info!(
                "cluster mode: electing a leader on Lease {}/{}",
                config.namespace(),
                config.name()
            );
            Some(leader::spawn(ctx.client.clone(), config.clone(), ctx.metrics.clone()))
        }
        _ => None,
    };
    let work = async {
        match &options.node {
            Some(node) => {
                tracing::info!("per-node mode: cleaning up after deleted pods of node {node}");
                ctx.metrics.leader.set(1);
                tokio::join!(index.run(&ctx), cleanup::run(ctx.clone(), index.clone(), Some(node.clone())));
            }
            None => {
                tokio::join!(index.run(&ctx), lead(&ctx, &index, &options, leadership.as_ref()));
            }
        }
    };
    tokio::select! {
        () = work => {}
        () = shutdown => tracing::info!("shutting down"),
    }
    // A standby takes over at once instead of after the lease duration.
    if let Some(leadership) = leadership {
        leadership.step_down().await;
    }
    let _ = stop.send(true);
    if let Some(server) = server {
        let _ = server.await;
    }
}

/// Cluster mode: runs the cluster-wide parts while leading (always, without election).
async fn lead(ctx: &Context, index: &PoolIndex, options: &Options, leadership: Option<&Leadership>) {
    let Some(leadership) = leadership else {
        ctx.metrics.leader.set(1);
        return cluster_parts(ctx, index, options).await;
    };
    let mut leading = leadership.subscribe();
    loop {
        if leading.wait_for(|leading| *leading).await.is_err() {
            return;
        }
        tracing::info!("leading: cleanup of every node's pods, reconciler, node slices");
        tokio::select! {
            () = cluster_parts(ctx, index, options) => return,
            _ = leading.wait_for(|leading| !*leading) => {
                tracing::warn!("lost the leader Lease; the cluster-wide parts stop until it is won back");
            }
        }
    }
}

async fn cluster_parts(ctx: &Context, index: &PoolIndex, options: &Options) {
    let reconciler = async {
        let Some((sources, reload)) = &options.reconciler else { return std::future::pending().await };
        schedule::run(sources, *reload, || async {
            match reconcile::reconcile_once(ctx).await {
                Ok(report) => tracing::info!(
                    "reconciler: released {} addresses and {} orphaned reservations, restored {} missing \
                     reservations",
                    report.released.len(),
                    report.orphan_reservations.len(),
                    report.restored_reservations.len()
                ),
                Err(e) => tracing::error!("reconciler: {e}; the next scheduled run tries again"),
            }
        })
        .await;
    };
    let slices = async {
        let Some(settings) = &options.node_slices else { return std::future::pending().await };
        if let Err(e) = nodeslice::run(ctx.clone(), settings.clone()).await {
            tracing::error!("the node-slice controller stopped: {e}");
        }
    };
    tokio::join!(cleanup::run(ctx.clone(), index.clone(), None), reconciler, slices);
}
