//! `whereabouts check`: whether the stored pools and reservations agree with each other.
//!
//! * every reservation has a pool entry of the same holder (a reservation left behind blocks its
//!   address in every overlapping range);
//! * with `enable_overlapping_ranges`, every pool entry has a reservation of the same holder (without
//!   one, an overlapping range may hand the address out again);
//! * no address is held in two pools of the same network by different holders: the pool name before
//!   its range, less the node for node-slice pools, so that the pools of different nodes' slices, of
//!   the layout before a re-slicing and after it, are compared too;
//! * every allocation key decodes to an address inside its pool's range, and every pool decodes.
//!
//! Problems make it exit 1. Warnings alone do not: they are what only matters in some future, such as
//! entries upstream whereabouts cannot read, which a rollback to it would lose.
//!
//! With `--repair`, what can be repaired safely is, as the controller's reconciler repairs it:
//! reservations no pool entry of their holder stands behind (left by a release cut off between its two
//! writes, see the IPAM engine) are deleted, each only if it is still as listed; and, where pods can
//! be looked up, the missing reservations of running pods' allocations are made again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use clap::Args;
use serde::Serialize;
use whereabouts_controller::judge::PodView;
use whereabouts_controller::pools::{DecodedPool, Found, names_address, network_names};
use whereabouts_controller::reconcile::{missing_reservations, orphans};
use whereabouts_core::addr::to_u128;
use whereabouts_store::ipam::Ipam;
use whereabouts_store::{AnyStore, Deletion, Reservation, ReserveOutcome, Store, VersionedReservation};

use super::output::{Format, OutputArgs, Table, print, print_json};
use super::store::{StoreArgs, open, pod_views_of, read_pools};
use super::{CliError, Outcome};

/// `whereabouts check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Allocations need no reservation (the networks set `enable_overlapping_ranges` false; with
    /// --config, its value is used).
    #[arg(long)]
    no_overlapping_ranges: bool,
    /// Repair what can be: delete the reservations no pool entry of their holder stands behind
    /// (orphan-reservation, holder-mismatch), each only if it is still as listed; and make the missing
    /// reservations of running pods' allocations again (pods are looked up in Kubernetes: the
    /// Kubernetes store's cluster, or --kubeconfig's).
    #[arg(long)]
    repair: bool,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// The first offset upstream whereabouts cannot read: it parses allocation keys as signed 64-bit
/// numbers and skips the others, and its next write of the pool, a patch from what it read, removes
/// them.
const UPSTREAM_UNREADABLE_OFFSET: u128 = 1 << 63;

/// Kinds of findings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    /// A pool that cannot be decoded at all.
    UnreadablePool,
    /// An allocation key that is not an address of the pool.
    UndecodableKey,
    /// An allocation outside its pool's range.
    OutsideRange,
    /// A reservation with no pool entry at its address.
    OrphanReservation,
    /// A reservation whose address is held in the pools by someone else.
    HolderMismatch,
    /// A pool entry without a reservation of its address.
    MissingReservation,
    /// An address held in two pools of one network by different holders.
    DuplicateAddress,
    /// An allocation whose key upstream whereabouts cannot read (a warning).
    UpstreamUnreadableOffset,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::UnreadablePool => "unreadable-pool",
            Kind::UndecodableKey => "undecodable-key",
            Kind::OutsideRange => "outside-range",
            Kind::OrphanReservation => "orphan-reservation",
            Kind::HolderMismatch => "holder-mismatch",
            Kind::MissingReservation => "missing-reservation",
            Kind::DuplicateAddress => "duplicate-address",
            Kind::UpstreamUnreadableOffset => "upstream-unreadable-offset",
        }
    }
}

/// What `--repair` did about a problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Repair {
    /// Repaired.
    Repaired,
    /// Left alone: it changed since it was listed (a recreated pod took the reservation over, say).
    Changed,
    /// The repair failed; the error is on stderr.
    Failed,
}

impl Repair {
    fn as_str(self) -> &'static str {
        match self {
            Repair::Repaired => "repaired",
            Repair::Changed => "changed",
            Repair::Failed => "failed",
        }
    }
}

/// One problem or warning found.
#[derive(Debug, Serialize)]
struct Finding {
    kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reservation: Option<String>,
    detail: String,
    /// With `--repair`, what was done about it (absent: nothing could be).
    #[serde(skip_serializing_if = "Option::is_none")]
    repair: Option<Repair>,
}

impl Finding {
    /// Whether it is still a problem: not repaired, and not changed meanwhile.
    fn remains(&self) -> bool {
        !matches!(self.repair, Some(Repair::Repaired | Repair::Changed))
    }
}

/// The report.
#[derive(Debug, Serialize)]
struct Report {
    pools: usize,
    allocations: usize,
    reservations: usize,
    /// What is wrong now (exit 1).
    problems: Vec<Finding>,
    /// What is not wrong now but may become so (exit 0 when alone).
    warnings: Vec<Finding>,
}

fn describe(r: &Reservation) -> String {
    let pod = if r.pod_ref.is_empty() { format!("container {}", r.container_id) } else { r.pod_ref.clone() };
    if r.ifname.is_empty() { pod } else { format!("{pod} {}", r.ifname) }
}

/// The networks a pool's allocations are compared within: its [`network_names`] given the nodes its
/// allocations record, or its own name when that does not end with its range.
fn networks_of(pool: &DecodedPool) -> Vec<String> {
    let nodes: BTreeSet<&str> = pool.found.iter().filter_map(|f| f.allocation.node.as_deref()).collect();
    let networks: Vec<String> = network_names(&pool.target, nodes).into_iter().map(String::from).collect();
    if networks.is_empty() { vec![pool.target.name.clone()] } else { networks }
}

/// A warning for each allocation upstream whereabouts cannot read (its offset from the IP written in
/// `spec.range` is 2^63 or more: IPv6 only).
fn upstream_unreadable(found: &[Found]) -> Vec<Finding> {
    found
        .iter()
        .filter_map(|f| {
            let offset = to_u128(f.ip) - to_u128(f.pool.network.addr());
            (offset >= UPSTREAM_UNREADABLE_OFFSET).then(|| Finding {
                kind: Kind::UpstreamUnreadableOffset,
                pool: Some(f.pool.name.clone()),
                ip: Some(f.ip),
                reservation: None,
                detail: format!(
                    "held by {} at offset {offset}, 2^63 or more: upstream whereabouts skips it when reading \
                     and its next write of the pool removes it, so once upstream writes the pool (after a \
                     rollback, or during a rolling upgrade) the address can be handed out twice",
                    describe(&f.allocation.reservation())
                ),
                repair: None,
            })
        })
        .collect()
}

/// Checks the store; exit 1 when anything is wrong.
pub async fn run(args: CheckArgs) -> Result<Outcome, CliError> {
    let opened = open(&args.store).await?;
    let overlapping = opened.overlapping && !args.no_overlapping_ranges;
    let reservations: BTreeMap<String, VersionedReservation> =
        opened.store.list_reservations().await?.into_iter().collect();
    let pools = read_pools(&opened.store).await?;
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let mut found: Vec<Found> = Vec::new();
    // Indexes into `found` by network and address: where duplicates are looked for.
    let mut by_network: BTreeMap<(String, IpAddr), Vec<usize>> = BTreeMap::new();
    let pool_count = pools.len();
    for pool in pools {
        match pool.decoded {
            Ok(decoded) => {
                for key in &decoded.skipped {
                    problems.push(Finding {
                        kind: Kind::UndecodableKey,
                        pool: Some(pool.name.clone()),
                        ip: None,
                        reservation: None,
                        detail: format!("allocation key {key:?} is not an address of range {}", pool.range),
                        repair: None,
                    });
                }
                for f in &decoded.found {
                    if !f.pool.network.trunc().contains(&f.ip) {
                        problems.push(Finding {
                            kind: Kind::OutsideRange,
                            pool: Some(pool.name.clone()),
                            ip: Some(f.ip),
                            reservation: None,
                            detail: format!(
                                "held by {} outside range {}",
                                describe(&f.allocation.reservation()),
                                pool.range
                            ),
                            repair: None,
                        });
                    }
                }
                warnings.extend(upstream_unreadable(&decoded.found));
                for network in networks_of(&decoded) {
                    for (i, f) in decoded.found.iter().enumerate() {
                        by_network.entry((network.clone(), f.ip)).or_default().push(found.len() + i);
                    }
                }
                found.extend(decoded.found);
            }
            Err(e) => problems.push(Finding {
                kind: Kind::UnreadablePool,
                pool: Some(pool.name),
                ip: None,
                reservation: None,
                detail: e.reason,
                repair: None,
            }),
        }
    }

    let mut by_ip: BTreeMap<IpAddr, Vec<&Found>> = BTreeMap::new();
    for f in &found {
        by_ip.entry(f.ip).or_default().push(f);
    }
    for (name, listed) in &reservations {
        let reserved = &listed.holder;
        let at: Vec<&Found> = by_ip
            .iter()
            .filter(|(ip, _)| names_address(name, **ip))
            .flat_map(|(_, f)| f.iter().copied())
            .collect();
        if at.iter().any(|f| f.allocation.reservation().same_owner(reserved)) {
            continue;
        }
        let (kind, detail, pool, ip) = match at.first() {
            None => (
                Kind::OrphanReservation,
                format!("held by {}; no pool entry holds its address", describe(reserved)),
                None,
                None,
            ),
            Some(f) => (
                Kind::HolderMismatch,
                format!(
                    "held by {}, but the pool entry is {}'s",
                    describe(reserved),
                    describe(&f.allocation.reservation())
                ),
                Some(f.pool.name.clone()),
                Some(f.ip),
            ),
        };
        problems.push(Finding { kind, pool, ip, reservation: Some(name.clone()), detail, repair: None });
    }
    if overlapping {
        for f in &found {
            if !reservations.keys().any(|name| names_address(name, f.ip)) {
                problems.push(Finding {
                    kind: Kind::MissingReservation,
                    pool: Some(f.pool.name.clone()),
                    ip: Some(f.ip),
                    reservation: None,
                    detail: format!(
                        "held by {} without a reservation",
                        describe(&f.allocation.reservation())
                    ),
                    repair: None,
                });
            }
        }
    }
    // A pair of pools may share more than one network name: each pair is reported once.
    let mut duplicates: BTreeSet<(usize, usize)> = BTreeSet::new();
    for indexes in by_network.values() {
        for (i, &a) in indexes.iter().enumerate() {
            for &b in &indexes[i + 1..] {
                let (fa, fb) = (&found[a], &found[b]);
                if fa.pool.name != fb.pool.name
                    && !fa.allocation.same_holder(&fb.allocation)
                    && duplicates.insert((a, b))
                {
                    problems.push(Finding {
                        kind: Kind::DuplicateAddress,
                        pool: Some(fa.pool.name.clone()),
                        ip: Some(fa.ip),
                        reservation: None,
                        detail: format!(
                            "held by {} here and by {} in pool {}",
                            describe(&fa.allocation.reservation()),
                            describe(&fb.allocation.reservation()),
                            fb.pool.name
                        ),
                        repair: None,
                    });
                }
            }
        }
    }

    if args.repair {
        repair_orphans(&opened.store, &found, &reservations, &mut problems).await;
        match opened.pods.clone() {
            _ if !overlapping => {}
            Some(client) => {
                let pods = pod_views_of(client).await?;
                restore_missing(&opened.store, &found, &reservations, &pods, &mut problems).await;
            }
            None => eprintln!(
                "not making missing reservations again: whether their pods run is looked up in Kubernetes \
                 (give --kubeconfig)"
            ),
        }
    }

    let report = Report {
        pools: pool_count,
        allocations: found.len(),
        reservations: reservations.len(),
        problems,
        warnings,
    };
    match args.output.output {
        Format::Json => print_json(&report)?,
        Format::Table => {
            let mut text = String::new();
            for (heading, findings) in [("PROBLEM", &report.problems), ("WARNING", &report.warnings)] {
                if findings.is_empty() {
                    continue;
                }
                let repairs = args.repair && heading == "PROBLEM";
                let mut headers = vec![heading, "POOL", "IP", "RESERVATION", "DETAIL"];
                if repairs {
                    headers.push("REPAIR");
                }
                let mut table = Table::new(&headers);
                for p in findings {
                    let mut row = vec![
                        p.kind.as_str().to_string(),
                        p.pool.clone().unwrap_or_else(|| "-".into()),
                        p.ip.map_or_else(|| "-".into(), |ip| ip.to_string()),
                        p.reservation.clone().unwrap_or_else(|| "-".into()),
                        p.detail.clone(),
                    ];
                    if repairs {
                        row.push(p.repair.map_or("-", Repair::as_str).to_string());
                    }
                    table.row(row);
                }
                text.push_str(&table.render());
            }
            let repaired = if args.repair {
                let remaining = report.problems.iter().filter(|p| p.remains()).count();
                format!(" ({} repaired or changed meanwhile)", report.problems.len() - remaining)
            } else {
                String::new()
            };
            text.push_str(&format!(
                "{} problems{repaired} in {} pools, {} allocations, {} reservations",
                report.problems.len(),
                report.pools,
                report.allocations,
                report.reservations
            ));
            if !report.warnings.is_empty() {
                text.push_str(&format!("; {} warnings", report.warnings.len()));
            }
            text.push('\n');
            print(&text)?;
        }
    }
    Ok(if report.problems.iter().any(Finding::remains) { Outcome::Problems } else { Outcome::Clean })
}

/// Deletes the reservations no pool entry of their holder stands behind, each only if it is still as
/// listed, as the reconciler does, and notes the outcome on their problems. Nothing is deleted when a
/// pool could not be read: it may hold their entries.
async fn repair_orphans(
    store: &AnyStore,
    found: &[Found],
    reservations: &BTreeMap<String, VersionedReservation>,
    problems: &mut [Finding],
) {
    if problems.iter().any(|p| p.kind == Kind::UnreadablePool) {
        eprintln!("not repairing reservations: a pool could not be read, and may hold their entries");
        return;
    }
    let ipam = Ipam::new(store);
    for orphan in orphans(found, reservations) {
        let repair = match ipam.release_reservation(&orphan.judged()).await {
            Ok(Deletion::Deleted) => Repair::Repaired,
            Ok(Deletion::Changed) => Repair::Changed,
            Err(e) => {
                eprintln!("error: {e}");
                Repair::Failed
            }
        };
        let concerns = |p: &&mut Finding| {
            matches!(p.kind, Kind::OrphanReservation | Kind::HolderMismatch)
                && p.reservation.as_deref() == Some(orphan.name.as_str())
        };
        if let Some(problem) = problems.iter_mut().find(concerns) {
            problem.repair = Some(repair);
        }
    }
}

/// Makes the missing reservations of running pods' allocations again, as the reconciler does, and
/// notes the outcome on their problems (and the name made on the problem).
async fn restore_missing(
    store: &AnyStore,
    found: &[Found],
    reservations: &BTreeMap<String, VersionedReservation>,
    pods: &HashMap<String, PodView>,
    problems: &mut [Finding],
) {
    let ipam = Ipam::new(store);
    for missing in missing_reservations(found, reservations, pods) {
        let repair = match ipam.reserve(&missing.name, &missing.holder()).await {
            Ok(ReserveOutcome::Reserved) => Repair::Repaired,
            // Another attachment reserved the address since it was listed.
            Ok(ReserveOutcome::HeldBy(_)) => Repair::Changed,
            Err(e) => {
                eprintln!("error: {e}");
                Repair::Failed
            }
        };
        let concerns = |p: &&mut Finding| {
            p.kind == Kind::MissingReservation
                && p.pool.as_deref() == Some(missing.found.pool.name.as_str())
                && p.ip == Some(missing.found.ip)
        };
        if let Some(problem) = problems.iter_mut().find(concerns) {
            problem.reservation = Some(missing.name.clone());
            problem.repair = Some(repair);
        }
    }
}
