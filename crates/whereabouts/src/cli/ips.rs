//! `whereabouts ips POOL`: who holds each address of a pool.

use clap::Args;
use serde::Serialize;

use super::output::{Format, OutputArgs, Table, or_dash, print, print_json};
use super::store::{StoreArgs, open, read_pool};
use super::{CliError, Outcome};

/// `whereabouts ips`.
#[derive(Debug, Args)]
pub struct IpsArgs {
    /// The pool's name (see `whereabouts pools`).
    pool: String,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// One held address.
#[derive(Debug, Serialize)]
struct Holder {
    ip: std::net::IpAddr,
    /// `namespace/name`; empty for containers outside Kubernetes.
    pod: String,
    container_id: String,
    interface: String,
    node: Option<String>,
    pod_uid: Option<String>,
    /// The StatefulSet owning the pod, for a network with `sticky_statefulsets`.
    statefulset: Option<String>,
    /// Whether the address is held for the pod between two of its sandboxes (no container has it).
    held: bool,
    /// The CNI network of the ADD that took it.
    network: Option<String>,
}

/// Lists the holders of a pool's addresses, in address order.
pub async fn run(args: IpsArgs) -> Result<Outcome, CliError> {
    let opened = open(&args.store).await?;
    let pool =
        read_pool(&opened.store, &args.pool).await?.ok_or_else(|| CliError::NoPool(args.pool.clone()))?;
    let decoded = pool.decoded?;
    for key in &decoded.skipped {
        tracing::warn!("pool {}: allocation key {key:?} is not an address of the pool; left out", pool.name);
    }
    let holders: Vec<Holder> = decoded
        .found
        .into_iter()
        .map(|found| Holder {
            held: found.allocation.is_held(),
            ip: found.ip,
            pod: found.allocation.pod_ref,
            container_id: found.allocation.container_id,
            interface: found.allocation.ifname,
            node: found.allocation.node,
            pod_uid: found.allocation.pod_uid,
            statefulset: found.allocation.statefulset,
            network: found.allocation.cni_network,
        })
        .collect();
    match args.output.output {
        Format::Json => print_json(&holders)?,
        Format::Table => {
            let mut table =
                Table::new(&["IP", "POD", "CONTAINER ID", "INTERFACE", "NODE", "POD UID", "STATEFULSET"]);
            for h in &holders {
                table.row(vec![
                    h.ip.to_string(),
                    or_dash(Some(&h.pod)),
                    if h.held { "(held for the pod)".to_string() } else { h.container_id.clone() },
                    or_dash(Some(&h.interface)),
                    or_dash(h.node.as_deref()),
                    or_dash(h.pod_uid.as_deref()),
                    or_dash(h.statefulset.as_deref()),
                ]);
            }
            print(&table.render())?;
        }
    }
    Ok(Outcome::Clean)
}
