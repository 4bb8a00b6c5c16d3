//! `whereabouts install`, the DaemonSet's entrypoint, in place of upstream's install-cni.sh and
//! token-watcher.sh: puts the plugin binary into the host's CNI bin directory, writes the flat file, the
//! kubeconfig and the node name under `<CNI_CONF_DIR>/whereabouts.d/`, then keeps the kubeconfig
//! current as the (projected, rotating) service account token and CA change.
//!
//! Environment variables keep upstream's names and, as the script's `${VAR:-default}` does, treat an
//! empty value as unset.

mod files;
mod kubeconfig;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tokio::signal::unix::{SignalKind, signal};

use crate::controller::{Level, LogFormat, init_logging};
use files::Outcome;
use kubeconfig::Tls;

const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
const DEFAULT_NAMESPACE: &str = "kube-system";
const DEFAULT_CRON: &str = "30 4 * * *";
/// The flat file and the node name are private to root, as upstream makes them.
const PRIVATE: u32 = 0o600;
const EXECUTABLE: u32 = 0o755;

/// `whereabouts install`.
#[derive(Debug, Args)]
pub struct InstallArgs {
    /// Install and exit, rather than keep the kubeconfig current as the token and CA rotate.
    #[arg(long)]
    once: bool,
    /// How often the token and CA are checked for a change.
    #[arg(long, value_parser = positive_duration, default_value = "1s")]
    interval: Duration,
    /// The plugin binary to install (default: this one).
    #[arg(long)]
    binary: Option<PathBuf>,
    /// Where the plugin goes, as `whereabouts` (default: /host/opt/cni/bin).
    #[arg(long, env = "CNI_BIN_DIR")]
    cni_bin_dir: Option<PathBuf>,
    /// The CNI configuration directory; the files go into its `whereabouts.d` (default:
    /// /host/etc/cni/net.d).
    #[arg(long, env = "CNI_CONF_DIR")]
    cni_conf_dir: Option<PathBuf>,
    /// Where the host's root is mounted: removed from the paths written into the flat file, which the
    /// plugin reads on the host.
    #[arg(long, default_value = "/host")]
    host_root: PathBuf,
    /// The service account token (default: the pod's).
    #[arg(long, env = "SERVICE_ACCOUNT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The CA bundle the API server's certificate is checked against (default: the pod's).
    #[arg(long, env = "KUBE_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// `true` to write `insecure-skip-tls-verify` instead of the CA.
    #[arg(long, env = "SKIP_TLS_VERIFY", value_name = "true|false")]
    skip_tls_verify: Option<String>,
    /// The API server's address (set in every pod).
    #[arg(long, env = "KUBERNETES_SERVICE_HOST")]
    kubernetes_service_host: Option<String>,
    /// The API server's port (set in every pod).
    #[arg(long, env = "KUBERNETES_SERVICE_PORT")]
    kubernetes_service_port: Option<String>,
    /// The API server's scheme (default: https).
    #[arg(long, env = "KUBERNETES_SERVICE_PROTOCOL")]
    kubernetes_service_protocol: Option<String>,
    /// The kubeconfig context's namespace: where the plugin keeps its objects (default: kube-system).
    #[arg(long, env = "WHEREABOUTS_NAMESPACE")]
    namespace: Option<String>,
    /// The kubeconfig's permission bits, in octal (default: 600).
    #[arg(long, env = "KUBECONFIG_MODE")]
    kubeconfig_mode: Option<String>,
    /// The reconciler's schedule written into the flat file (default: "30 4 * * *").
    #[arg(long, env = "WHEREABOUTS_RECONCILER_CRON")]
    reconciler_cron: Option<String>,
    /// This node's name, written to `whereabouts.d/nodename` for the plugin.
    #[arg(long, env = "NODENAME")]
    node_name: Option<String>,
    /// Log level.
    #[arg(long, env = "WHEREABOUTS_LOG_LEVEL", value_enum, default_value_t = Level::Info)]
    log_level: Level,
    /// Log lines as text or as JSON objects.
    #[arg(long, env = "WHEREABOUTS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// What went wrong; each names the file or variable involved.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{var} is not set: the kubeconfig needs the API server's address")]
    MissingEnv { var: &'static str },
    #[error("KUBECONFIG_MODE {value:?} is not an octal file mode (like 600)")]
    BadMode { value: String },
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{}: the service account token is not UTF-8 text", path.display())]
    TokenNotText { path: PathBuf },
    #[error("{}: the path is not UTF-8, so it cannot go into the flat file", path.display())]
    PathNotText { path: PathBuf },
    #[error("finding this binary to install (give --binary): {0}")]
    CurrentExe(#[source] io::Error),
    #[error("starting the runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error("listening for SIGTERM and SIGINT: {0}")]
    Signals(#[source] io::Error),
}

impl InstallError {
    fn read(path: &Path, source: io::Error) -> Self {
        InstallError::Read { path: path.to_path_buf(), source }
    }

    fn write(path: &Path, source: io::Error) -> Self {
        InstallError::Write { path: path.to_path_buf(), source }
    }
}

/// Runs `whereabouts install` to its exit code.
pub fn install(args: InstallArgs) -> ExitCode {
    init_logging(args.log_level, args.log_format);
    let result = Settings::resolve(args).and_then(|settings| {
        if settings.once { install_all(&settings).map(drop) } else { install_and_watch(&settings) }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

// === Settings ===

/// The arguments with the defaults applied and checked.
#[derive(Debug)]
struct Settings {
    once: bool,
    interval: Duration,
    binary: PathBuf,
    bin_dir: PathBuf,
    conf_dir: PathBuf,
    /// `conf_dir` as the plugin on the host sees it.
    conf_dir_on_host: PathBuf,
    token_file: PathBuf,
    ca_file: PathBuf,
    skip_tls_verify: bool,
    /// The API server's URL, or why there is none (an error only if a token is found).
    server: Result<String, &'static str>,
    namespace: String,
    kubeconfig_mode: u32,
    reconciler_cron: String,
    node_name: Option<String>,
}

/// `value` unless unset or empty.
fn set<T: AsRef<std::ffi::OsStr>>(value: Option<T>) -> Option<T> {
    value.filter(|v| !v.as_ref().is_empty())
}

impl Settings {
    fn resolve(args: InstallArgs) -> Result<Settings, InstallError> {
        let binary = match args.binary {
            Some(binary) => binary,
            None => std::env::current_exe().map_err(InstallError::CurrentExe)?,
        };
        let conf_dir =
            set(args.cni_conf_dir).unwrap_or_else(|| "/host/etc/cni/net.d".into()).join("whereabouts.d");
        let server = match (set(args.kubernetes_service_host), set(args.kubernetes_service_port)) {
            (None, _) => Err("KUBERNETES_SERVICE_HOST"),
            (_, None) => Err("KUBERNETES_SERVICE_PORT"),
            (Some(host), Some(port)) => Ok(kubeconfig::server_url(
                set(args.kubernetes_service_protocol).as_deref().unwrap_or("https"),
                &host,
                &port,
            )),
        };
        let kubeconfig_mode = match set(args.kubeconfig_mode) {
            None => PRIVATE,
            Some(value) => parse_mode(&value).ok_or(InstallError::BadMode { value })?,
        };
        Ok(Settings {
            once: args.once,
            interval: args.interval,
            binary,
            bin_dir: set(args.cni_bin_dir).unwrap_or_else(|| "/host/opt/cni/bin".into()),
            conf_dir_on_host: on_host(&conf_dir, &args.host_root),
            conf_dir,
            token_file: set(args.token_file).unwrap_or_else(|| Path::new(SERVICE_ACCOUNT_DIR).join("token")),
            ca_file: set(args.ca_file).unwrap_or_else(|| Path::new(SERVICE_ACCOUNT_DIR).join("ca.crt")),
            skip_tls_verify: args.skip_tls_verify.as_deref() == Some("true"),
            server,
            namespace: set(args.namespace).unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
            kubeconfig_mode,
            reconciler_cron: set(args.reconciler_cron).unwrap_or_else(|| DEFAULT_CRON.into()),
            node_name: set(args.node_name),
        })
    }

    fn kubeconfig(&self) -> PathBuf {
        self.conf_dir.join("whereabouts.kubeconfig")
    }

    fn flat_file(&self) -> PathBuf {
        self.conf_dir.join("whereabouts.conf")
    }
}

fn positive_duration(value: &str) -> Result<Duration, String> {
    match humantime::parse_duration(value) {
        Ok(duration) if duration.is_zero() => Err("must be more than zero".into()),
        parsed => parsed.map_err(|e| e.to_string()),
    }
}

/// An octal mode as chmod takes it (`600`, `0640`).
fn parse_mode(value: &str) -> Option<u32> {
    u32::from_str_radix(value, 8).ok().filter(|mode| *mode <= 0o7777)
}

/// `path` with the host's mount point removed: `/host/etc/cni/net.d` → `/etc/cni/net.d`.
fn on_host(path: &Path, host_root: &Path) -> PathBuf {
    match path.strip_prefix(host_root) {
        Ok(rest) if host_root.has_root() && host_root != Path::new("/") => Path::new("/").join(rest),
        _ => path.to_path_buf(),
    }
}

// === Installing ===

/// Installs everything, in upstream's order (the binary last, once its configuration is in place);
/// the credentials' fingerprint the kubeconfig was written from.
fn install_all(settings: &Settings) -> Result<Fingerprint, InstallError> {
    std::fs::create_dir_all(&settings.conf_dir).map_err(|e| InstallError::write(&settings.conf_dir, e))?;
    let credentials = Credentials::read(settings)?;
    write_kubeconfig(settings, &credentials)?;
    write_flat_file(settings)?;
    write_node_name(settings)?;
    install_binary(settings)?;
    Ok(credentials.fingerprint())
}

fn report(path: &Path, outcome: Outcome) {
    match outcome {
        Outcome::Unchanged => tracing::debug!(path = %path.display(), "up to date"),
        Outcome::Chmod => tracing::info!(path = %path.display(), "mode changed"),
        Outcome::Written => tracing::info!(path = %path.display(), "written"),
    }
}

fn install_binary(settings: &Settings) -> Result<(), InstallError> {
    std::fs::create_dir_all(&settings.bin_dir).map_err(|e| InstallError::write(&settings.bin_dir, e))?;
    let target = settings.bin_dir.join("whereabouts");
    report(&target, files::ensure_copy(&target, &settings.binary, EXECUTABLE)?);
    Ok(())
}

fn write_flat_file(settings: &Settings) -> Result<(), InstallError> {
    let text = |path: &Path| {
        path.to_str().map(str::to_owned).ok_or_else(|| InstallError::PathNotText { path: path.into() })
    };
    let content = serde_json::json!({
        "datastore": "kubernetes",
        "configuration_path": text(&settings.conf_dir_on_host)?,
        "kubernetes": { "kubeconfig": text(&settings.conf_dir_on_host.join("whereabouts.kubeconfig"))? },
        "reconciler_cron_expression": settings.reconciler_cron,
    });
    let mut bytes = serde_json::to_vec_pretty(&content).unwrap_or_default();
    bytes.push(b'\n');
    let path = settings.flat_file();
    report(&path, files::ensure_content(&path, &bytes, PRIVATE)?);
    Ok(())
}

fn write_node_name(settings: &Settings) -> Result<(), InstallError> {
    let Some(node_name) = &settings.node_name else {
        tracing::warn!(
            "NODENAME is not set: no whereabouts.d/nodename (the plugin falls back to the hostname)"
        );
        return Ok(());
    };
    let path = settings.conf_dir.join("nodename");
    report(&path, files::ensure_content(&path, node_name.as_bytes(), PRIVATE)?);
    Ok(())
}

fn write_kubeconfig(settings: &Settings, credentials: &Credentials) -> Result<(), InstallError> {
    let Some(token) = &credentials.token else {
        tracing::warn!(
            token = %settings.token_file.display(),
            "no service account token: not running in a pod? The kubeconfig is not written"
        );
        return Ok(());
    };
    let server = settings.server.as_ref().map_err(|var| InstallError::MissingEnv { var })?;
    let tls = if settings.skip_tls_verify {
        Tls::Insecure
    } else if let Some(ca) = &credentials.ca {
        Tls::Ca(ca.clone())
    } else {
        tracing::warn!(
            ca = %settings.ca_file.display(),
            "no CA file: the kubeconfig trusts the host's roots for the API server's certificate"
        );
        Tls::SystemRoots
    };
    let content = kubeconfig::render(server, &tls, token, &settings.namespace);
    let path = settings.kubeconfig();
    report(&path, files::ensure_content(&path, &content, settings.kubeconfig_mode)?);
    Ok(())
}

// === Credentials ===

/// The token and CA as last read; `None` for a file that does not exist. No `Debug`: it holds the
/// token.
#[derive(Hash)]
struct Credentials {
    token: Option<String>,
    ca: Option<Vec<u8>>,
}

/// A hash of the credentials, to notice a rotation.
type Fingerprint = u64;

impl Credentials {
    fn read(settings: &Settings) -> Result<Credentials, InstallError> {
        let token = match read_if_exists(&settings.token_file)? {
            // As the script's `$(cat token)` does, without the trailing newlines.
            Some(bytes) => Some(
                String::from_utf8(bytes)
                    .map_err(|_| InstallError::TokenNotText { path: settings.token_file.clone() })?
                    .trim_end_matches('\n')
                    .to_owned(),
            ),
            None => None,
        };
        let ca = if settings.skip_tls_verify { None } else { read_if_exists(&settings.ca_file)? };
        Ok(Credentials { token, ca })
    }

    fn fingerprint(&self) -> Fingerprint {
        let mut hasher = DefaultHasher::new();
        self.hash(&mut hasher);
        hasher.finish()
    }
}

fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, InstallError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(InstallError::read(path, e)),
    }
}

// === Watching ===

/// Installs, then rewrites the kubeconfig whenever the token or the CA changes, until SIGTERM or
/// SIGINT.
fn install_and_watch(settings: &Settings) -> Result<(), InstallError> {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(InstallError::Runtime)?;
    runtime.block_on(async {
        // Before anything else, so that a SIGTERM during the install is an orderly exit too.
        let mut terminate = signal(SignalKind::terminate()).map_err(InstallError::Signals)?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(InstallError::Signals)?;
        let mut last = install_all(settings)?;
        tracing::info!(every = %humantime::format_duration(settings.interval), "installed; watching the token and CA");
        let mut ticks = tokio::time::interval(settings.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error = None;
        loop {
            tokio::select! {
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
                _ = ticks.tick() => {}
            }
            match refresh(settings, last) {
                Ok(fingerprint) => {
                    last = fingerprint;
                    last_error = None;
                }
                // Tried again on the next tick; said again only if it changes.
                Err(e) => {
                    let message = e.to_string();
                    if last_error.as_ref() != Some(&message) {
                        tracing::error!("{message}");
                        last_error = Some(message);
                    }
                }
            }
        }
        tracing::info!("stopping");
        Ok(())
    })
}

/// Rewrites the kubeconfig if the credentials differ from those of `last`.
fn refresh(settings: &Settings, last: Fingerprint) -> Result<Fingerprint, InstallError> {
    let credentials = Credentials::read(settings)?;
    let fingerprint = credentials.fingerprint();
    if fingerprint != last {
        tracing::info!("the service account token or the CA changed");
        write_kubeconfig(settings, &credentials)?;
    }
    Ok(fingerprint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("600"), Some(0o600));
        assert_eq!(parse_mode("0640"), Some(0o640));
        assert_eq!(parse_mode("644"), Some(0o644));
        assert_eq!(parse_mode("800"), None);
        assert_eq!(parse_mode("17777"), None);
        assert_eq!(parse_mode("rw"), None);
    }

    #[test]
    fn the_host_mount_is_removed_from_paths_for_the_plugin() {
        let host = Path::new("/host");
        assert_eq!(on_host(Path::new("/host/etc/cni/net.d"), host), Path::new("/etc/cni/net.d"));
        assert_eq!(on_host(Path::new("/hostile/etc"), host), Path::new("/hostile/etc"));
        assert_eq!(on_host(Path::new("/etc/cni/net.d"), host), Path::new("/etc/cni/net.d"));
        assert_eq!(on_host(Path::new("/etc/cni/net.d"), Path::new("/")), Path::new("/etc/cni/net.d"));
    }
}
