//! `whereabouts`: the CNI IPAM plugin when `CNI_COMMAND` is set (the runtime execs it that way),
//! otherwise the operator CLI.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::ExitCode;

use clap::Parser;
use whereabouts_cni::error::{CniError, codes};
use whereabouts_cni::version::{LATEST, SUPPORTED_VERSIONS};
use whereabouts_cni::{FsHost, Reply};

/// A cluster-wide IPAM plugin for CNI. Invoked with CNI_COMMAND set it speaks the CNI protocol on
/// stdin/stdout; the operator subcommands come here.
#[derive(Debug, Parser)]
#[command(name = "whereabouts", version, about, long_about = None)]
struct Cli {}

fn cni_main(vars: HashMap<String, String>) -> Reply {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        let error = CniError::new(codes::IO, format!("reading stdin: {e}"));
        return Reply { stdout: error.to_json(LATEST).to_string(), exit_code: 1 };
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            let error = CniError::new(codes::INTERNAL, format!("starting the runtime: {e}"));
            return Reply { stdout: error.to_json(LATEST).to_string(), exit_code: 1 };
        }
    };
    // A bug must still answer with a CNI error object, not a bare panic message.
    std::panic::catch_unwind(|| runtime.block_on(whereabouts_cni::run(&vars, &stdin, &FsHost)))
        .unwrap_or_else(|_| {
            let error = CniError::new(codes::INTERNAL, "internal error (panic); see stderr");
            Reply { stdout: error.to_json(LATEST).to_string(), exit_code: 1 }
        })
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
    Cli::parse();
    eprintln!(
        "whereabouts {} {}/{}",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::OS,
        std::env::consts::ARCH
    );
    eprintln!("CNI protocol versions supported: {}", SUPPORTED_VERSIONS.join(", "));
    ExitCode::SUCCESS
}
