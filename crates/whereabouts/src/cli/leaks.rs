//! `whereabouts leaks`: allocations whose pod is gone, and reservations no allocation stands behind,
//! decided exactly as the controller's reconciler decides ([`whereabouts_controller::reconcile::leaks`]);
//! with `--release`, freed as it frees them.

use std::net::IpAddr;

use clap::Args;
use serde::Serialize;
use whereabouts_controller::pools::Found;
use whereabouts_controller::reconcile::{Leaks, Listings, leaks, list_persistence, node_names};
use whereabouts_controller::release::release_batch;
use whereabouts_store::ipam::{Ipam, JudgedReservation};
use whereabouts_store::{Deletion, Reservation, Store};

use super::output::{Format, OutputArgs, Progress, Table, or_dash, print, print_json};
use super::store::{Kind, StoreArgs, open, pod_views_of, read_pools};
use super::{CliError, Outcome};

/// `whereabouts leaks`.
#[derive(Debug, Args)]
pub struct LeaksArgs {
    /// Release what is found (without it, only list it).
    #[arg(long)]
    release: bool,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// What became of a leak.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Status {
    /// Found (a dry run).
    Leaked,
    /// Released.
    Released,
    /// Left alone: it changed since it was read (a new sandbox of its pod took it over, say).
    Changed,
    /// The release failed; the error says why.
    Failed,
}

impl Status {
    fn as_str(&self) -> &'static str {
        match self {
            Status::Leaked => "leaked",
            Status::Released => "released",
            Status::Changed => "changed",
            Status::Failed => "failed",
        }
    }
}

/// A leaked allocation.
#[derive(Debug, Serialize)]
struct LeakedAllocation {
    ip: IpAddr,
    pool: String,
    pod: String,
    pod_uid: Option<String>,
    container_id: String,
    interface: String,
    node: Option<String>,
    /// Why it is a leak (`pod_gone`, `pod_replaced`, `pod_finished`, `not_in_network_status`).
    reason: &'static str,
    /// The reservations of the address its holder has, released with it.
    reservations: Vec<String>,
    status: Status,
}

/// A reservation no pool entry of the same holder stands behind.
#[derive(Debug, Serialize)]
struct OrphanReservation {
    name: String,
    pod: String,
    interface: String,
    container_id: String,
    status: Status,
}

/// The whole report.
#[derive(Debug, Serialize)]
struct Report {
    dry_run: bool,
    allocations: Vec<LeakedAllocation>,
    orphan_reservations: Vec<OrphanReservation>,
    /// Pools that could not be read: their allocations were not judged, and orphaned reservations
    /// were not looked for (their entries might be in them).
    unreadable_pools: Vec<String>,
    errors: Vec<String>,
}

impl LeakedAllocation {
    fn new(found: &Found, reason: &'static str, reservations: &[JudgedReservation]) -> Self {
        LeakedAllocation {
            ip: found.ip,
            pool: found.pool.name.clone(),
            pod: found.allocation.pod_ref.clone(),
            pod_uid: found.allocation.pod_uid.clone(),
            container_id: found.allocation.container_id.clone(),
            interface: found.allocation.ifname.clone(),
            node: found.allocation.node.clone(),
            reason,
            reservations: reservations.iter().map(|judged| judged.name.clone()).collect(),
            status: Status::Leaked,
        }
    }
}

/// Finds (and with `--release` frees) the leaks. Exit 1 when leaks remain (a dry run that found
/// some, failed releases) or pools could not be read.
pub async fn run(args: LeaksArgs) -> Result<Outcome, CliError> {
    let opened = open(&args.store).await?;
    let Some(client) = opened.pods.clone() else {
        let store = if opened.kind == Kind::File { "file" } else { "etcd" };
        return Err(CliError::Usage(format!(
            "leaks looks pods up in Kubernetes: with the {store} store, give --kubeconfig or set KUBECONFIG"
        )));
    };
    // The reconciler's order: reservations, pools, pods (see whereabouts_controller::reconcile).
    let reservations = opened.store.list_reservations().await?.into_iter().collect();
    let mut listings = Listings { reservations, ..Listings::default() };
    for pool in read_pools(&opened.store).await? {
        match pool.decoded {
            Ok(decoded) => listings.found.extend(decoded.found),
            Err(e) => {
                tracing::warn!("{e}; its allocations are not judged");
                listings.unreadable_pools.push(pool.name);
            }
        }
    }
    listings.nodes = node_names(&client).await.map_err(CliError::Nodes)?;
    listings.pods = pod_views_of(client.clone()).await?;
    listings.persistence = list_persistence(&client).await.map_err(CliError::Persistence)?;
    // Missing reservations are `check --repair`'s.
    let Leaks { plan, orphans, missing: _ } = leaks(&listings);

    let mut report = Report {
        dry_run: !args.release,
        allocations: Vec::new(),
        orphan_reservations: Vec::new(),
        unreadable_pools: listings.unreadable_pools,
        errors: Vec::new(),
    };
    let ipam = Ipam::new(&opened.store);
    let mut progress = Progress::new("releasing: pool", if args.release { plan.batches().len() } else { 0 });
    for (target, batch) in plan.batches() {
        let outcome = if args.release { Some(release_batch(&ipam, target, batch).await) } else { None };
        for r in batch {
            let mut leaked = LeakedAllocation::new(&r.found, r.reason.as_str(), &r.reservations);
            leaked.status = match &outcome {
                None => Status::Leaked,
                Some(Ok(released)) if released.contains(&r.found.ip) => Status::Released,
                Some(Ok(_)) => Status::Changed,
                Some(Err(_)) => Status::Failed,
            };
            report.allocations.push(leaked);
        }
        if let Some(Err(e)) = outcome {
            report.errors.push(e.to_string());
        }
        progress.step();
    }
    progress.finish();
    for orphan in orphans {
        let status = if !args.release {
            Status::Leaked
        } else {
            match ipam.release_reservation(&orphan.judged()).await {
                Ok(Deletion::Deleted) => Status::Released,
                Ok(Deletion::Changed) => Status::Changed,
                Err(e) => {
                    report.errors.push(e.to_string());
                    Status::Failed
                }
            }
        };
        let Reservation { pod_ref, ifname, container_id } = orphan.listed.holder;
        report.orphan_reservations.push(OrphanReservation {
            name: orphan.name,
            pod: pod_ref,
            interface: ifname,
            container_id,
            status,
        });
    }
    report.allocations.sort_by(|a, b| (&a.pool, a.ip).cmp(&(&b.pool, b.ip)));

    match args.output.output {
        Format::Json => print_json(&report)?,
        Format::Table => print(&render(&report))?,
    }
    for e in &report.errors {
        eprintln!("error: {e}");
    }
    let remaining = |s: &Status| !matches!(s, Status::Released | Status::Changed);
    let clean = report.allocations.iter().all(|a| !remaining(&a.status))
        && report.orphan_reservations.iter().all(|o| !remaining(&o.status))
        && report.unreadable_pools.is_empty();
    Ok(if clean { Outcome::Clean } else { Outcome::Problems })
}

fn render(report: &Report) -> String {
    let mut text = String::new();
    if !report.allocations.is_empty() {
        let mut table =
            Table::new(&["POOL", "IP", "POD", "CONTAINER ID", "INTERFACE", "NODE", "REASON", "STATUS"]);
        for a in &report.allocations {
            table.row(vec![
                a.pool.clone(),
                a.ip.to_string(),
                or_dash(Some(&a.pod)),
                a.container_id.clone(),
                or_dash(Some(&a.interface)),
                or_dash(a.node.as_deref()),
                a.reason.to_string(),
                a.status.as_str().to_string(),
            ]);
        }
        text.push_str(&table.render());
    }
    if !report.orphan_reservations.is_empty() {
        if !text.is_empty() {
            text.push('\n');
        }
        let mut table = Table::new(&["RESERVATION", "POD", "INTERFACE", "CONTAINER ID", "STATUS"]);
        for o in &report.orphan_reservations {
            table.row(vec![
                o.name.clone(),
                or_dash(Some(&o.pod)),
                or_dash(Some(&o.interface)),
                or_dash(Some(&o.container_id)),
                o.status.as_str().to_string(),
            ]);
        }
        text.push_str(&table.render());
    }
    for pool in &report.unreadable_pools {
        text.push_str(&format!("pool {pool} could not be read: its allocations were not judged\n"));
    }
    let count = |status: Status| report.allocations.iter().filter(|a| a.status == status).count();
    let orphans = report.orphan_reservations.len();
    if report.dry_run {
        text.push_str(&format!(
            "{} leaked addresses and {orphans} orphaned reservations (dry run: rerun with --release to free them)\n",
            report.allocations.len()
        ));
    } else {
        text.push_str(&format!(
            "released {} addresses ({} changed meanwhile and were left alone, {} failed) and {} of {orphans} orphaned reservations\n",
            count(Status::Released),
            count(Status::Changed),
            count(Status::Failed),
            report.orphan_reservations.iter().filter(|o| o.status == Status::Released).count(),
        ));
    }
    text
}
