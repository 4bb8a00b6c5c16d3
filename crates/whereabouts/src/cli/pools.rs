//! `whereabouts pools`: every pool with its range, size, and how full it is.

use clap::Args;
use serde::Serialize;
use whereabouts_controller::pools::range_capacity;

use super::output::{Format, OutputArgs, Table, print, print_json};
use super::store::{StoreArgs, open, read_pools};
use super::{CliError, Outcome};

/// `whereabouts pools`.
#[derive(Debug, Args)]
pub struct PoolsArgs {
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    output: OutputArgs,
}

/// One pool's line.
#[derive(Debug, Serialize)]
struct PoolRow {
    name: String,
    range: String,
    /// Addresses the range spans, network and broadcast addresses left out.
    size: Option<u128>,
    used: usize,
    free: Option<u128>,
    percent_used: Option<f64>,
    /// Allocation keys that are not addresses (kept as they are, not counted).
    undecodable_keys: usize,
    /// Why the pool cannot be read, if it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Lists the pools.
pub async fn run(args: PoolsArgs) -> Result<Outcome, CliError> {
    let opened = open(&args.store).await?;
    let rows: Vec<PoolRow> = read_pools(&opened.store)
        .await?
        .into_iter()
        .map(|pool| {
            let size = range_capacity(&pool.range);
            match pool.decoded {
                Ok(decoded) => {
                    let used = decoded.found.len();
                    // Precision is of no concern for a percentage.
                    #[allow(clippy::cast_precision_loss)]
                    let percent_used =
                        size.filter(|s| *s > 0).map(|s| (used as f64 * 10_000.0 / s as f64).round() / 100.0);
                    PoolRow {
                        name: pool.name,
                        range: pool.range,
                        size,
                        used,
                        free: size.map(|s| s.saturating_sub(used as u128)),
                        percent_used,
                        undecodable_keys: decoded.skipped.len(),
                        error: None,
                    }
                }
                Err(e) => PoolRow {
                    name: pool.name,
                    range: pool.range,
                    size,
                    used: 0,
                    free: None,
                    percent_used: None,
                    undecodable_keys: 0,
                    error: Some(e.reason),
                },
            }
        })
        .collect();
    match args.output.output {
        Format::Json => print_json(&rows)?,
        Format::Table => {
            let mut table = Table::new(&["POOL", "RANGE", ">SIZE", ">USED", ">FREE", ">USED%", "NOTE"]);
            for row in &rows {
                let number = |n: Option<u128>| n.map_or_else(|| "-".to_string(), |n| n.to_string());
                let note = match (&row.error, row.undecodable_keys) {
                    (Some(e), _) => format!("unreadable: {e}"),
                    (None, 0) => String::new(),
                    (None, n) => format!("{n} undecodable keys"),
                };
                table.row(vec![
                    row.name.clone(),
                    row.range.clone(),
                    number(row.size),
                    row.used.to_string(),
                    number(row.free),
                    row.percent_used.map_or_else(|| "-".to_string(), |p| format!("{p:.1}%")),
                    note,
                ]);
            }
            print(&table.render())?;
        }
    }
    Ok(Outcome::Clean)
}
