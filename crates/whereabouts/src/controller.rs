//! The `controller` and `reconcile` commands: flags and environment to options, logging, signals,
//! exit codes. The work is the controller library's.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use whereabouts_controller::leader::LeaseConfig;
use whereabouts_controller::metrics::Metrics;
use whereabouts_controller::nad::FlatFile;
use whereabouts_controller::schedule::{self, Sources};
use whereabouts_controller::{Context, controller, nodeslice, reconcile};
use whereabouts_k8s::client::kubeconfig_path;

/// Where the controller finds the API server and its objects.
#[derive(Debug, Args)]
pub struct Connection {
    /// A kubeconfig; without it, the one `KUBECONFIG` names, else the pod's service account
    /// (in-cluster).
    #[arg(long, env = "KUBECONFIG_PATH")]
    kubeconfig: Option<PathBuf>,
    /// The namespace of the IPPools, reservations, NodeSlicePools and the leader Lease (default: the
    /// kubeconfig context's, else kube-system).
    #[arg(long, env = "WHEREABOUTS_NAMESPACE")]
    namespace: Option<String>,
    /// Log what would be released or written, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Log level.
    #[arg(long, env = "WHEREABOUTS_LOG_LEVEL", value_enum, default_value_t = Level::Info)]
    log_level: Level,
    /// Log lines as text or as JSON objects (one per line, with the fields of each event).
    #[arg(long, env = "WHEREABOUTS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Log line formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

/// Log levels.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// How the controller runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Leader-elected: cleanup for every node, the scheduled reconciler, node slices (the Deployment).
    Cluster,
    /// Cleanup for the pods of this node only, no election (the DaemonSet; needs NODENAME).
    Node,
}

/// `whereabouts controller`.
#[derive(Debug, Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    connection: Connection,
    /// Cluster-wide (leader-elected) or per-node.
    #[arg(long, env = "WHEREABOUTS_CONTROLLER_MODE", value_enum, default_value_t = Mode::Cluster)]
    mode: Mode,
    /// This node's name (per-node mode).
    #[arg(long, env = "NODENAME")]
    node: Option<String>,
    /// Act without leader election (a single replica only).
    #[arg(long)]
    no_leader_election: bool,
    /// The leader Lease's name.
    #[arg(long, default_value = "whereabouts-controller")]
    lease_name: String,
    /// This candidate's identity in the Lease (default: the pod name, else the host name, plus a
    /// random suffix).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long a leader's Lease lasts without renewal.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "15s")]
    lease_duration: Duration,
    /// How long a leader keeps trying to renew before it stops leading.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    renew_deadline: Duration,
    /// How often the Lease is renewed or tried.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
    retry_period: Duration,
    /// Leave reconciliation to a CronJob running `whereabouts reconcile`.
    #[arg(long)]
    no_reconciler: bool,
    /// The mounted ConfigMap file with the reconciler's cron expression.
    #[arg(long, default_value = schedule::DEFAULT_FILE)]
    cron_file: PathBuf,
    /// How often the schedule's sources are re-read.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    schedule_reload: Duration,
    /// Do not run the node-slice controller.
    #[arg(long)]
    no_node_slices: bool,
    /// The flat file (whereabouts.conf) merged into NetworkAttachmentDefinitions' configurations
    /// (default: the first that exists of upstream's locations).
    #[arg(long)]
    flat_file: Option<PathBuf>,
    /// Only Nodes matching this label selector take node slices (default: every Node); a node that
    /// stops matching gives its slice up once its pool of the slice is empty.
    #[arg(long, value_name = "SELECTOR")]
    node_slice_node_selector: Option<String>,
    /// Only NetworkAttachmentDefinitions matching this label selector are sliced (default: every one);
    /// the NodeSlicePools of the others are deleted.
    #[arg(long, value_name = "SELECTOR")]
    node_slice_nad_selector: Option<String>,
    /// Where to serve /metrics, /healthz and /readyz; empty for nowhere.
    #[arg(long, env = "WHEREABOUTS_METRICS_ADDRESS", default_value = "0.0.0.0:9445")]
    metrics_address: String,
}

/// `whereabouts reconcile`.
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    connection: Connection,
}

/// Logs to stderr: ours at `level`, the libraries' (kube, hyper, tower) warnings and errors only, so
/// that debug logging shows what the controller does rather than every HTTP request.
pub(crate) fn init_logging(level: Level, format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let ours = match level {
        Level::Debug => LevelFilter::DEBUG,
        Level::Info => LevelFilter::INFO,
        Level::Warn => LevelFilter::WARN,
        Level::Error => LevelFilter::ERROR,
    };
    let filter = Targets::new().with_default(ours.min(LevelFilter::WARN)).with_target("whereabouts", ours);
    let text =
        (format == LogFormat::Text).then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer().json().with_current_span(false).with_writer(std::io::stderr)
    });
    let _ = tracing_subscriber::registry().with(text).with(json).with(filter).try_init();
}

/// Sets up logging, a runtime and the connection, then runs `command` to its exit code.
fn run_connected<F, Fut>(connection: &Connection, command: F) -> ExitCode
where
    F: FnOnce(Context) -> Fut,
    Fut: Future<Output = ExitCode>,
{
    init_logging(connection.log_level, connection.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!("starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match context(connection).await {
            Ok(ctx) => command(ctx).await,
            Err(code) => code,
        }
    })
}

async fn context(connection: &Connection) -> Result<Context, ExitCode> {
    let connected = whereabouts_k8s::client::connect_controller(
        kubeconfig_path(connection.kubeconfig.as_deref()).as_deref(),
        connection.namespace.as_deref(),
    )
    .await
    .map_err(|e| {
        tracing::error!("{e}");
        ExitCode::FAILURE
    })?;
    Ok(Context {
        client: connected.client,
        namespace: connected.namespace,
        metrics: Arc::new(Metrics::new()),
        dry_run: connection.dry_run,
    })
}

/// The first flat file that exists: the one given, else upstream's locations.
fn flat_file(given: Option<&PathBuf>) -> Result<Option<FlatFile>, ExitCode> {
    let candidates: Vec<PathBuf> = match given {
        Some(path) => vec![path.clone()],
        None => Sources::standard().flat_files,
    };
    for path in candidates {
        match std::fs::read(&path) {
            Ok(content) => return Ok(Some(FlatFile { path: path.display().to_string(), content })),
            Err(e) if given.is_some() => {
                tracing::error!("--flat-file {}: {e}", path.display());
                return Err(ExitCode::FAILURE);
            }
            Err(_) => {}
        }
    }
    Ok(None)
}

async fn terminated() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!("cannot listen for SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs the controller until SIGTERM or SIGINT (exit 0); 1 when it cannot start.
pub fn controller(args: ControllerArgs) -> ExitCode {
    run_connected(&args.connection, |ctx| async {
        let node = match (args.mode, args.node.as_deref().map(str::trim).filter(|n| !n.is_empty())) {
            (Mode::Node, None) => {
                tracing::error!("--mode node needs the node's name: set NODENAME or --node");
                return ExitCode::FAILURE;
            }
            (Mode::Node, Some(node)) => {
                // As upstream's ip-control-loop: a node that does not exist is a misconfiguration.
                if let Err(e) = Api::<Node>::all(ctx.client.clone()).get(node).await {
                    tracing::error!("could not find node with node name {node:?}: {e}");
                    return ExitCode::FAILURE;
                }
                Some(node.to_string())
            }
            (Mode::Cluster, _) => None,
        };
        let election = if args.no_leader_election {
            None
        } else {
            let identity = args
                .identity
                .clone()
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| "whereabouts-controller".into());
            // A restarted pod keeps its name: the suffix tells its new process from the old one.
            let identity = format!("{identity}_{:08x}", fastrand::u32(..));
            let config = LeaseConfig::new(&args.lease_name, &ctx.namespace, identity).and_then(|config| {
                config.with_timings(args.lease_duration, args.renew_deadline, args.retry_period)
            });
            match config {
                Ok(config) => Some(config),
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
            }
        };
        let node_slices = if args.no_node_slices {
            None
        } else {
            let selector = |given: &Option<String>| {
                given.as_deref().map(str::trim).filter(|s| !s.is_empty()).map(String::from)
            };
            match flat_file(args.flat_file.as_ref()) {
                Ok(flat_file) => Some(nodeslice::Settings {
                    flat_file,
                    node_selector: selector(&args.node_slice_node_selector),
                    nad_selector: selector(&args.node_slice_nad_selector),
                }),
                Err(code) => return code,
            }
        };
        let reconciler = (!args.no_reconciler)
            .then(|| (Sources { file: args.cron_file.clone(), ..Sources::standard() }, args.schedule_reload));
        let listener = if args.metrics_address.trim().is_empty() {
            None
        } else {
            match tokio::net::TcpListener::bind(args.metrics_address.trim()).await {
                Ok(listener) => Some(listener),
                Err(e) => {
                    tracing::error!("--metrics-address {}: {e}", args.metrics_address);
                    return ExitCode::FAILURE;
                }
            }
        };
        let options = controller::Options { node, election, reconciler, node_slices, listener };
        controller::run(ctx, options, terminated()).await;
        ExitCode::SUCCESS
    })
}

/// Runs one reconciliation: prints what it released and restored on stdout; exit 0, or 1 when anything
/// failed.
pub fn reconcile(args: ReconcileArgs) -> ExitCode {
    run_connected(&args.connection, |ctx| async move {
        match reconcile::reconcile_once(&ctx).await {
            Ok(report) => {
                let verb = if ctx.dry_run { "would release" } else { "released" };
                let mut out = std::io::stdout().lock();
                for r in &report.released {
                    let _ = writeln!(
                        out,
                        "{verb} {} in pool {} (pod {}, {})",
                        r.ip,
                        r.pool,
                        r.pod_ref,
                        r.reason.as_str()
                    );
                }
                for name in &report.orphan_reservations {
                    let _ = writeln!(out, "{verb} orphaned reservation {name}");
                }
                let restore = if ctx.dry_run { "would restore" } else { "restored" };
                for name in &report.restored_reservations {
                    let _ = writeln!(out, "{restore} missing reservation {name}");
                }
                let _ = writeln!(
                    out,
                    "{} {} addresses and {} orphaned reservations; {restore} {} missing reservations",
                    verb,
                    report.released.len(),
                    report.orphan_reservations.len(),
                    report.restored_reservations.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!("{e}");
                ExitCode::FAILURE
            }
        }
    })
}
