//! `whereabouts release IP --pool POOL`: frees one address and its reservation, as a DEL of its
//! holder would.

use std::collections::BTreeMap;
use std::net::IpAddr;

use clap::Args;
use serde::Serialize;
use whereabouts_controller::pools::reservations_of;
use whereabouts_store::Store;
use whereabouts_store::ipam::{FoundAllocation, Ipam};

use super::output::{Format, OutputArgs, or_dash, print, print_json};
use super::store::{StoreArgs, open, read_pool};
use super::{CliError, Outcome};

/// `whereabouts release`.
#[derive(Debug, Args)]
pub struct ReleaseArgs {
    /// The address.
    ip: IpAddr,
    /// The pool holding it (see `whereabouts pools` and `whereabouts ips`).
    #[arg(long)]
    pool: String,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// What was released.
#[derive(Debug, Serialize)]
struct Released {
    ip: IpAddr,
    pool: String,
    pod: String,
    container_id: String,
    interface: String,
    /// The reservations of the address its holder had, deleted with it.
    reservations: Vec<String>,
}

/// Releases the address: its pool entry, with a compare-and-swap on the entry as read (so an address
/// handed out again meanwhile is left alone), then its holder's reservations, each only if it is still
/// as listed.
pub async fn run(args: ReleaseArgs) -> Result<Outcome, CliError> {
    let opened = open(&args.store).await?;
    // Reservations before the pool, as the reconciler reads them: an ADD writes its pool entry first.
    let reservations: BTreeMap<String, _> = opened.store.list_reservations().await?.into_iter().collect();
    let pool =
        read_pool(&opened.store, &args.pool).await?.ok_or_else(|| CliError::NoPool(args.pool.clone()))?;
    let decoded = pool.decoded?;
    let found = decoded
        .found
        .iter()
        .find(|f| f.ip == args.ip)
        .ok_or_else(|| CliError::NotHeld { pool: args.pool.clone(), ip: args.ip })?;
    let judged = reservations_of(found, reservations.iter());
    let names = judged.iter().map(|judged| judged.name.clone()).collect();
    let ipam = Ipam::new(&opened.store);
    let entry = FoundAllocation { ip: found.ip, allocation: &found.allocation, reservations: judged };
    let removed = ipam.release_found(&decoded.target, &[entry]).await?;
    if !removed.contains(&args.ip) {
        return Err(CliError::Changed { pool: args.pool, ip: args.ip });
    }
    let released = Released {
        ip: args.ip,
        pool: args.pool,
        pod: found.allocation.pod_ref.clone(),
        container_id: found.allocation.container_id.clone(),
        interface: found.allocation.ifname.clone(),
        reservations: names,
    };
    match args.output.output {
        Format::Json => print_json(&released)?,
        Format::Table => {
            let mut text = format!(
                "released {} from pool {} (pod {}, container {}, interface {})\n",
                released.ip,
                released.pool,
                or_dash(Some(&released.pod)),
                released.container_id,
                or_dash(Some(&released.interface)),
            );
            for name in &released.reservations {
                text.push_str(&format!("released reservation {name}\n"));
            }
            print(&text)?;
        }
    }
    Ok(Outcome::Clean)
}
