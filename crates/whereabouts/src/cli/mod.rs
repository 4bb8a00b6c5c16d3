//! The operator commands: `pools`, `ips`, `leaks`, `release` and `check`. Each finds the store the way
//! the plugin does ([`store`]), reads or changes it through the same library code as the plugin and
//! the controller, and prints a table or JSON ([`output`]).
//!
//! Exit codes: 0 when all is well, 1 when problems were found or an operation failed, 2 for usage
//! errors (clap's, and flags that are missing for the store at hand).

pub mod check;
pub mod ips;
pub mod leaks;
pub mod output;
pub mod pools;
pub mod release;
pub mod store;

use std::process::ExitCode;

use whereabouts_store::StoreError;
use whereabouts_store::ipam::IpamError;

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The flags do not say enough (or contradict each other).
    #[error("{0}")]
    Usage(String),
    /// The configuration file named by `--config` cannot be used.
    #[error("--config {path}: {reason}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The store could not be opened.
    #[error("opening the {store} store: {reason}")]
    Open {
        /// Which store.
        store: &'static str,
        /// Why.
        reason: String,
    },
    /// A store call failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A release failed.
    #[error(transparent)]
    Ipam(#[from] IpamError),
    /// Looking pods up failed.
    #[error("listing pods: {0}")]
    Pods(#[source] kube::Error),
    /// Looking nodes up failed.
    #[error("listing nodes: {0}")]
    Nodes(#[source] kube::Error),
    /// Looking StatefulSets and IPAMClaims up (for persistent allocations) failed.
    #[error("listing statefulsets and ipamclaims: {0}")]
    Persistence(#[source] kube::Error),
    /// No pool of that name.
    #[error("no pool named {0:?} (see `whereabouts pools`)")]
    NoPool(String),
    /// A pool that cannot be decoded.
    #[error("{0}")]
    Unreadable(#[from] whereabouts_controller::pools::UnreadablePool),
    /// The pool does not hold the address.
    #[error("pool {pool} does not hold {ip}")]
    NotHeld {
        /// The pool.
        pool: String,
        /// The address.
        ip: std::net::IpAddr,
    },
    /// The allocation changed between reading and releasing it (its pod's new sandbox took it over, or
    /// it was released and handed out again): nothing was released.
    #[error("the allocation of {ip} in pool {pool} changed since it was read; nothing released")]
    Changed {
        /// The pool.
        pool: String,
        /// The address.
        ip: std::net::IpAddr,
    },
    /// Writing the output failed (a closed pipe, say).
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// How a command that ran went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing to report (exit 0).
    Clean,
    /// It found problems, or some of its changes failed (exit 1); it said which.
    Problems,
}

/// Runs one command on a fresh runtime: warnings of the libraries go to stderr, and so does the error,
/// if any; returns the exit code.
pub fn main<F>(command: F) -> ExitCode
where
    F: Future<Output = Result<Outcome, CliError>>,
{
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(command) {
        Ok(Outcome::Clean) => ExitCode::SUCCESS,
        Ok(Outcome::Problems) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
