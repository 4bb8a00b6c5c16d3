//! `whereabouts`: the CNI IPAM plugin when `CNI_COMMAND` is set (the runtime execs it that way),
//! otherwise the controller and the operator commands.

mod cli;
mod controller;
mod install;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use whereabouts_cni::error::{CniError, codes};
use whereabouts_cni::version::{LATEST, SUPPORTED_VERSIONS};
use whereabouts_cni::{FsHost, Reply};

/// A cluster-wide IPAM plugin for CNI. Invoked with CNI_COMMAND set it speaks the CNI protocol on
/// stdin/stdout; otherwise it runs one of the commands below.
#[derive(Debug, Parser)]
#[command(name = "whereabouts", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller: cleanup after deleted pods, the scheduled reconciler, node slices.
    Controller(Box<controller::ControllerArgs>),
    /// Run one reconciliation and exit (for a CronJob): releases leaked addresses and orphaned
    /// reservations. Exits 1 if anything failed; the next run tries again.
    Reconcile(controller::ReconcileArgs),
    /// Install the plugin on this node (the DaemonSet's entrypoint): the binary into the CNI bin
    /// directory, whereabouts.d/{whereabouts.conf,whereabouts.kubeconfig,nodename}; then keep the
    /// kubeconfig current as the service account token rotates.
    Install(Box<install::InstallArgs>),
    /// List every pool: range, size, addresses used and free.
    Pools(cli::pools::PoolsArgs),
    /// Show who holds each address of a pool.
    Ips(cli::ips::IpsArgs),
    /// Find allocations whose pod is gone (as the controller judges them); --release frees them.
    Leaks(cli::leaks::LeaksArgs),
    /// Release one address of a pool (and its reservation).
    Release(cli::release::ReleaseArgs),
    /// Check that pools and reservations agree; exit 1 on problems.
    Check(cli::check::CheckArgs),
}

fn error_reply(code: u32, msg: String) -> Reply {
    Reply { stdout: CniError::new(code, msg).to_json(LATEST).to_string(), exit_code: 1 }
}

fn cni_main(vars: HashMap<String, String>) -> Reply {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        return error_reply(codes::IO, format!("reading stdin: {e}"));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_time().enable_io().build() {
        Ok(runtime) => runtime,
        Err(e) => return error_reply(codes::INTERNAL, format!("starting the runtime: {e}")),
    };
    // A bug must still answer with a CNI error object, not a bare panic message.
    let reply = std::panic::catch_unwind(|| runtime.block_on(whereabouts_cni::run(&vars, &stdin, &FsHost)))
        .unwrap_or_else(|_| error_reply(codes::INTERNAL, "internal error (panic); see stderr".into()));
    // Answer now rather than wait for a blocking thread still stuck on a lock the store gave up on.
    runtime.shutdown_background();
    reply
}

fn main() -> ExitCode {
    let vars: HashMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    if vars.contains_key("CNI_COMMAND") {
        let reply = cni_main(vars);
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(reply.stdout.as_bytes()).and_then(|()| out.flush());
        return ExitCode::from(u8::try_from(reply.exit_code).unwrap_or(1));
    }
    match Cli::parse().command {
        Some(Command::Controller(args)) => controller::controller(*args),
        Some(Command::Reconcile(args)) => controller::reconcile(args),
        Some(Command::Install(args)) => install::install(*args),
        Some(Command::Pools(args)) => cli::main(cli::pools::run(args)),
        Some(Command::Ips(args)) => cli::main(cli::ips::run(args)),
        Some(Command::Leaks(args)) => cli::main(cli::leaks::run(args)),
        Some(Command::Release(args)) => cli::main(cli::release::run(args)),
        Some(Command::Check(args)) => cli::main(cli::check::run(args)),
        None => {
            eprintln!(
                "whereabouts {} {}/{}",
                env!("CARGO_PKG_VERSION"),
                std::env::consts::OS,
                std::env::consts::ARCH
            );
            eprintln!("CNI protocol versions supported: {}", SUPPORTED_VERSIONS.join(", "));
            ExitCode::SUCCESS
        }
    }
}
