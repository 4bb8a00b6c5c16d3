//! The etcd v3 store, for clusters without Kubernetes (and operators who keep IPAM state out of the
//! API server).
//!
//! Layout under a key prefix (default `/whereabouts/`):
//! * `<prefix>pools/<pool name>`: the pool in upstream's IPPool spec form (`range`, `allocations`),
//!   plus `cooldowns` (the release cooldowns, [`PoolSpec::cooldowns`]) when there are any; its version
//!   is the key's `mod_revision`.
//! * `<prefix>reservations/<reservation name>`: one per reserved address (`podref`, `ifname`,
//!   `containerid`), the ORIP equivalent.
//!
//! Every change is one transaction guarded by a revision compare: a pool write compares the pool key's
//! `mod_revision` (or `create_revision == 0` when creating it), a reservation is created only if its
//! key's `create_revision` is 0, and is taken over or deleted only if its `mod_revision` is still the
//! one that was read. So a client killed at any point leaves the previous or the new state.
//!
//! Every write of a pool changes its one key, so concurrent writers of a pool conflict whatever
//! addresses they pick. Writers on one node therefore queue on a node-local lock file
//! ([`Store::lock_pool`]) instead of racing each other; only writers on different nodes still meet
//! in compare-and-swap. The lock is an optimisation: correctness rests on the revision compares alone.

use std::collections::BTreeMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KvClient, TlsOptions, Txn,
    TxnOp, TxnOpResponse, TxnResponse,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tonic::Code;
use whereabouts_core::config::EtcdConfig;
use whereabouts_core::pool::PoolSpec;

use crate::lock::{node_local_lock, queue_path};
use crate::{
    Deletion, PoolLock, Reservation, ReservationVersion, ReserveOutcome, Store, StoreError, Version,
    VersionedPool, VersionedReservation,
};

/// A pool key's value: the spec, with the release cooldowns beside its fields.
#[derive(Deserialize)]
struct EtcdPool {
    #[serde(flatten)]
    spec: PoolSpec,
    #[serde(default)]
    cooldowns: BTreeMap<String, u64>,
}

/// [`EtcdPool`] for writing.
#[derive(Serialize)]
struct EtcdPoolRef<'a> {
    #[serde(flatten)]
    spec: &'a PoolSpec,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    cooldowns: &'a BTreeMap<String, u64>,
}

/// How long establishing the connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long any one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Rounds of read-then-compare on one reservation before giving up (each lost round means another
/// writer changed it in between).
const RESERVATION_ROUNDS: usize = 50;

/// Why the store could not be opened; every variant names the configuration key at fault.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EtcdConnectError {
    /// A setting is wrong (a TLS file, the credentials, an endpoint).
    #[error("invalid {key} {value:?}: {reason}")]
    Invalid {
        /// The configuration key.
        key: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// No endpoint answered; trying again later may work.
    #[error("etcd_host {hosts:?}: etcd cannot be reached: {reason}")]
    Unreachable {
        /// `etcd_host`.
        hosts: String,
        /// The client's error.
        reason: String,
    },
}

pub use crate::lock::DEFAULT_LOCK_DIR;

/// The etcd store.
///
/// It talks to one endpoint at a time and fails over to the next one when a call fails in a way
/// another member might not (the client library does not route around a dead member by itself).
pub struct EtcdStore {
    endpoints: Vec<String>,
    options: ConnectOptions,
    active: Mutex<Active>,
    /// `etcd_username`, for messages about refused requests.
    username: String,
    prefix: String,
    /// Distinguishes this cluster's lock files from another's on the same node.
    cluster_key: u64,
    lock_dir: std::path::PathBuf,
}

/// The endpoint in use and its client.
struct Active {
    index: usize,
    kv: KvClient,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

fn invalid(key: &'static str, value: &str, reason: impl Into<String>) -> EtcdConnectError {
    EtcdConnectError::Invalid { key, value: value.to_string(), reason: reason.into() }
}

/// Reads a PEM file, naming the key when it cannot be read or holds no PEM block.
fn read_pem(key: &'static str, path: &str) -> Result<Vec<u8>, EtcdConnectError> {
    let content = std::fs::read(path).map_err(|e| invalid(key, path, e.to_string()))?;
    if !String::from_utf8_lossy(&content).contains("-----BEGIN ") {
        return Err(invalid(key, path, "not a PEM file"));
    }
    Ok(content)
}

/// `etcd_host` as URLs: a scheme is added where missing (`https://` when TLS files are configured).
pub fn endpoints(hosts: &str, tls: bool) -> Result<Vec<String>, EtcdConnectError> {
    let scheme = if tls { "https://" } else { "http://" };
    let endpoints: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| if h.contains("://") { h.to_string() } else { format!("{scheme}{h}") })
        .collect();
    if endpoints.is_empty() {
        return Err(invalid("etcd_host", hosts, "no endpoint"));
    }
    if let Some(bad) = endpoints.iter().find(|e| !(e.starts_with("http://") || e.starts_with("https://"))) {
        return Err(invalid("etcd_host", hosts, format!("{bad} is neither http:// nor https://")));
    }
    Ok(endpoints)
}

fn is_auth_failure(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            matches!(status.code(), Code::Unauthenticated | Code::PermissionDenied)
                || status.message().contains("authentication failed")
                || status.message().contains("user name is empty")
        }
        _ => false,
    }
}

/// Errors a later try may not see: the cluster is (re)electing, restarting or out of reach.
fn is_transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Aborted
                | Code::ResourceExhausted
                | Code::Unknown
                // tonic reports its own request timeout as Cancelled.
                | Code::Cancelled
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// Connects to one member and proves it answers (and takes the credentials) with one read, all within
/// a hard time limit: the client's own timeouts do not cover a TLS handshake that never completes.
async fn connect_one(
    endpoint: &str,
    options: &ConnectOptions,
    prefix: &str,
) -> Result<KvClient, etcd_client::Error> {
    let attempt = async {
        let client = Client::connect([endpoint], Some(options.clone())).await?;
        let mut kv = client.kv_client();
        // A point read: cheap however many keys live under the prefix.
        kv.get(prefix, None).await?;
        Ok(kv)
    };
    tokio::time::timeout(CONNECT_TIMEOUT + REQUEST_TIMEOUT, attempt).await.unwrap_or_else(|_| {
        Err(etcd_client::Error::GRpcStatus(tonic::Status::deadline_exceeded(format!(
            "{endpoint} did not answer within {:?}",
            CONNECT_TIMEOUT + REQUEST_TIMEOUT
        ))))
    })
}

fn corrupt(key: &str, e: serde_json::Error) -> StoreError {
    StoreError::Corrupt { location: format!("etcd key {key}"), reason: e.to_string() }
}

impl EtcdStore {
    /// Connects and proves the connection (and credentials) with one read below the prefix.
    pub async fn connect(settings: &EtcdConfig) -> Result<Self, EtcdConnectError> {
        let tls_files = [&settings.key_file, &settings.cert_file, &settings.ca_cert_file];
        let tls = tls_files.iter().any(|f| f.is_some());
        let endpoints = endpoints(&settings.hosts, tls)?;
        let mut anonymous =
            ConnectOptions::new().with_timeout(REQUEST_TIMEOUT).with_connect_timeout(CONNECT_TIMEOUT);
        if settings.username.is_none() && settings.password.is_some() {
            return Err(invalid("etcd_username", "", "etcd_password is set without it"));
        }
        if tls {
            let mut config = TlsOptions::new();
            if let Some(ca) = &settings.ca_cert_file {
                config = config.ca_certificate(Certificate::from_pem(read_pem("etcd_ca_cert_file", ca)?));
            }
            match (&settings.cert_file, &settings.key_file) {
                (Some(cert), Some(key)) => {
                    let identity = Identity::from_pem(
                        read_pem("etcd_cert_file", cert)?,
                        read_pem("etcd_key_file", key)?,
                    );
                    config = config.identity(identity);
                }
                (Some(cert), None) => {
                    return Err(invalid("etcd_key_file", "", format!("needed with etcd_cert_file {cert}")));
                }
                (None, Some(key)) => {
                    return Err(invalid("etcd_cert_file", "", format!("needed with etcd_key_file {key}")));
                }
                (None, None) => {}
            }
            anonymous = anonymous.with_tls(config);
        }
        let mut options = match &settings.username {
            Some(user) => {
                anonymous.clone().with_user(user.clone(), settings.password.clone().unwrap_or_default())
            }
            None => anonymous.clone(),
        };
        let classify = |e: etcd_client::Error| {
            let message = e.to_string();
            // TLS failures only show in the message, in several spellings.
            let says = |needles: &[&str]| {
                let lower = message.to_ascii_lowercase();
                needles.iter().any(|n| lower.contains(n))
            };
            let cert = settings.cert_file.as_deref().unwrap_or("");
            if is_auth_failure(&e) {
                let user = settings.username.clone().unwrap_or_default();
                invalid("etcd_username", &user, format!("etcd refused the credentials: {message}"))
            } else if tls && says(&["unknownissuer", "invalid peer certificate"]) {
                let ca = settings.ca_cert_file.as_deref().unwrap_or("");
                invalid(
                    "etcd_ca_cert_file",
                    ca,
                    format!("the server's certificate is not trusted: {message}"),
                )
            } else if tls
                && settings.cert_file.is_none()
                && says(&["connection closed", "broken pipe", "connection reset", "certificate"])
            {
                // Without a client certificate, a server that demands one hangs up or sends an alert.
                invalid(
                    "etcd_cert_file",
                    "",
                    format!("the server may require a client certificate: {message}"),
                )
            } else if tls && (says(&["certificate"]) || !is_transient(&e)) {
                invalid("etcd_cert_file", cert, format!("TLS: {message}"))
            } else {
                EtcdConnectError::Unreachable { hosts: settings.hosts.clone(), reason: message }
            }
        };
        // Start at a random member so nodes spread their load; take the first one that answers.
        let first = fastrand::usize(..endpoints.len());
        let mut last_error = None;
        for step in 0..endpoints.len() {
            let index = (first + step) % endpoints.len();
            let mut connected = connect_one(&endpoints[index], &options, &settings.key_prefix).await;
            if settings.username.is_some()
                && matches!(&connected, Err(e) if e.to_string().contains("authentication is not enabled"))
            {
                // As upstream's client: credentials for a cluster without auth are not an error.
                tracing::warn!(
                    "etcd_username is set but etcd has no authentication enabled; connecting without it"
                );
                options = anonymous.clone();
                connected = connect_one(&endpoints[index], &options, &settings.key_prefix).await;
            }
            match connected {
                Ok(kv) => {
                    let mut hasher = std::collections::hash_map::DefaultHasher::new();
                    (&endpoints, &settings.key_prefix).hash(&mut hasher);
                    return Ok(EtcdStore {
                        endpoints,
                        options,
                        active: Mutex::new(Active { index, kv }),
                        username: settings.username.clone().unwrap_or_default(),
                        prefix: settings.key_prefix.clone(),
                        cluster_key: hasher.finish(),
                        lock_dir: DEFAULT_LOCK_DIR.into(),
                    });
                }
                // A configuration error is the same on every member.
                Err(e) => match classify(e) {
                    unreachable @ EtcdConnectError::Unreachable { .. } => last_error = Some(unreachable),
                    invalid => return Err(invalid),
                },
            }
        }
        Err(last_error.unwrap_or_else(|| EtcdConnectError::Unreachable {
            hosts: settings.hosts.clone(),
            reason: "no endpoint".into(),
        }))
    }

    /// The endpoint in use.
    fn active(&self) -> (usize, KvClient) {
        let active = self.active.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        (active.index, active.kv.clone())
    }

    /// Moves to the next member that answers, unless another call already moved on from `failed`.
    async fn fail_over(&self, failed: usize) {
        for step in 1..=self.endpoints.len() {
            let index = (failed + step) % self.endpoints.len();
            if let Ok(kv) = connect_one(&self.endpoints[index], &self.options, &self.prefix).await {
                let mut active = self.active.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if active.index == failed {
                    *active = Active { index, kv };
                }
                return;
            }
        }
    }

    /// Runs one request with a hard time limit, failing over to the next member on errors another
    /// member might not give. Every request here is a read, a compare-guarded transaction, or
    /// idempotent, so repeating one whose outcome is unknown is safe.
    async fn call<T, F: Future<Output = Result<T, etcd_client::Error>>>(
        &self,
        request: impl Fn(KvClient) -> F,
    ) -> Result<T, StoreError> {
        let mut last = String::new();
        for _ in 0..self.endpoints.len() {
            let (index, kv) = self.active();
            match tokio::time::timeout(REQUEST_TIMEOUT, request(kv)).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) if is_auth_failure(&e) => {
                    let user = &self.username;
                    return Err(StoreError::Denied(format!(
                        "etcd refused the request of etcd_username {user:?}: {e}"
                    )));
                }
                Ok(Err(e)) if !is_transient(&e) => return Err(StoreError::Io(format!("etcd: {e}"))),
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => last = format!("no answer within {REQUEST_TIMEOUT:?}"),
            }
            tracing::debug!("etcd member {} failed ({last}), trying the next one", self.endpoints[index]);
            self.fail_over(index).await;
        }
        Err(StoreError::Unavailable(format!("etcd: {last}")))
    }

    /// Uses another directory for the node-local lock files.
    pub fn with_lock_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.lock_dir = dir.into();
        self
    }

    fn pool_key(&self, name: &str) -> String {
        format!("{}pools/{name}", self.prefix)
    }

    fn reservation_key(&self, name: &str) -> String {
        format!("{}reservations/{name}", self.prefix)
    }

    /// One key's value and mod_revision.
    async fn get(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>, StoreError> {
        let response = self.call(|mut kv| async move { kv.get(key, None).await }).await?;
        Ok(response.kvs().first().map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    async fn get_reservation(&self, key: &str) -> Result<Option<VersionedReservation>, StoreError> {
        self.get(key)
            .await?
            .map(|(value, revision)| {
                Ok(VersionedReservation {
                    holder: serde_json::from_slice(&value).map_err(|e| corrupt(key, e))?,
                    // Revisions are the cluster's, never repeated: one names the key's state and
                    // incarnation at once.
                    version: ReservationVersion { uid: String::new(), revision: revision.to_string() },
                })
            })
            .transpose()
    }

    /// One transaction, through [`EtcdStore::call`].
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.call(|mut kv| {
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
    }

    /// Names of every key below `<prefix><kind>/`.
    async fn names(&self, kind: &str) -> Result<Vec<String>, StoreError> {
        let base = format!("{}{kind}/", self.prefix);
        let response = self
            .call(|mut kv| {
                let base = base.clone();
                async move { kv.get(base, Some(GetOptions::new().with_prefix().with_keys_only())).await }
            })
            .await?;
        let mut names: Vec<String> = response
            .kvs()
            .iter()
            .filter_map(|kv| kv.key_str().ok()?.strip_prefix(&base).map(str::to_string))
            .collect();
        names.sort();
        Ok(names)
    }
}

impl Store for EtcdStore {
    async fn lock_pool(&self, name: &str, deadline: Instant) -> Result<Option<PoolLock>, StoreError> {
        node_local_lock(&self.lock_dir, "etcd", (self.cluster_key, name), deadline).await
    }

    fn queue_dir(&self, name: &str) -> Option<std::path::PathBuf> {
        Some(queue_path(&self.lock_dir, "etcd", (self.cluster_key, name)).with_extension("queue"))
    }

    async fn read_pool(&self, name: &str) -> Result<Option<VersionedPool>, StoreError> {
        let key = self.pool_key(name);
        let Some((value, revision)) = self.get(&key).await? else { return Ok(None) };
        let stored: EtcdPool = serde_json::from_slice(&value).map_err(|e| corrupt(&key, e))?;
        let spec = PoolSpec { cooldowns: stored.cooldowns, ..stored.spec };
        Ok(Some(VersionedPool { spec, version: Version::Revision(revision) }))
    }

    async fn write_pool(
        &self,
        name: &str,
        spec: &PoolSpec,
        base: Option<&VersionedPool>,
        _lock: Option<&PoolLock>,
    ) -> Result<Version, StoreError> {
        let key = self.pool_key(name);
        let guard = match base {
            None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
            Some(base) => {
                let Version::Revision(revision) = base.version else {
                    return Err(base.version.foreign("etcd"));
                };
                Compare::mod_revision(key.clone(), CompareOp::Equal, revision)
            }
        };
        let stored = EtcdPoolRef { spec, cooldowns: &spec.cooldowns };
        let value = serde_json::to_vec(&stored).map_err(|e| StoreError::Io(e.to_string()))?;
        let txn = Txn::new().when([guard]).and_then([TxnOp::put(key, value, None)]);
        let response = self.txn(txn).await?;
        if !response.succeeded() {
            return Err(StoreError::Conflict);
        }
        let revision = response.header().map(|h| h.revision()).unwrap_or_default();
        Ok(Version::Revision(revision))
    }

    async fn create_reservation(
        &self,
        name: &str,
        owner: &Reservation,
    ) -> Result<ReserveOutcome, StoreError> {
        let key = self.reservation_key(name);
        let value = serde_json::to_vec(owner).map_err(|e| StoreError::Io(e.to_string()))?;
        for _ in 0..RESERVATION_ROUNDS {
            let create = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.clone(), value.clone(), None)])
                .or_else([TxnOp::get(key.clone(), None)]);
            let response = self.txn(create).await?;
            if response.succeeded() {
                return Ok(ReserveOutcome::Reserved);
            }
            let held = response.op_responses().into_iter().find_map(|r| match r {
                TxnOpResponse::Get(get) => {
                    get.kvs().first().map(|kv| (kv.value().to_vec(), kv.mod_revision()))
                }
                _ => None,
            });
            // Deleted between the compare and the get: try again.
            let Some((held, revision)) = held else { continue };
            let holder: Reservation = serde_json::from_slice(&held).map_err(|e| corrupt(&key, e))?;
            if holder == *owner {
                return Ok(ReserveOutcome::Reserved);
            }
            if !holder.same_owner(owner) {
                return Ok(ReserveOutcome::HeldBy(holder));
            }
            // The same attachment under a new sandbox: take it over if nobody changed it since.
            let take_over = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, revision)])
                .and_then([TxnOp::put(key.clone(), value.clone(), None)]);
            let taken = self.txn(take_over).await?;
            if taken.succeeded() {
                return Ok(ReserveOutcome::Reserved);
            }
        }
        Err(StoreError::Unavailable(format!("reservation {name} kept changing")))
    }

    async fn read_reservation(&self, name: &str) -> Result<Option<VersionedReservation>, StoreError> {
        self.get_reservation(&self.reservation_key(name)).await
    }

    async fn delete_reservation(
        &self,
        name: &str,
        as_read: &ReservationVersion,
    ) -> Result<Deletion, StoreError> {
        let key = self.reservation_key(name);
        let revision: i64 = as_read.revision.parse().map_err(|_| {
            StoreError::Io(format!("reservation {name}: {:?} is not an etcd revision", as_read.revision))
        })?;
        // A key that is gone has mod_revision 0 in a compare: the else branch tells that apart.
        let delete = Txn::new()
            .when([Compare::mod_revision(key.clone(), CompareOp::Equal, revision)])
            .and_then([TxnOp::delete(key.clone(), None)])
            .or_else([TxnOp::get(key.clone(), None)]);
        let response = self.txn(delete).await?;
        if response.succeeded() {
            return Ok(Deletion::Deleted);
        }
        let exists = response.op_responses().into_iter().any(|r| match r {
            TxnOpResponse::Get(get) => !get.kvs().is_empty(),
            _ => false,
        });
        Ok(if exists { Deletion::Changed } else { Deletion::Deleted })
    }

    async fn list_pools(&self) -> Result<Vec<String>, StoreError> {
        self.names("pools").await
    }

    async fn list_reservations(&self) -> Result<Vec<(String, VersionedReservation)>, StoreError> {
        let mut out = Vec::new();
        for name in self.names("reservations").await? {
            if let Some(r) = self.read_reservation(&name).await? {
                out.push((name, r));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_a_scheme() {
        assert_eq!(
            endpoints("127.0.0.1:2379, https://10.0.0.1:2379", false).unwrap(),
            ["http://127.0.0.1:2379", "https://10.0.0.1:2379"]
        );
        assert_eq!(endpoints("etcd:2379", true).unwrap(), ["https://etcd:2379"]);
        assert!(matches!(endpoints(" , ", false), Err(EtcdConnectError::Invalid { key: "etcd_host", .. })));
        assert!(matches!(
            endpoints("unix://x", false),
            Err(EtcdConnectError::Invalid { key: "etcd_host", .. })
        ));
    }
}
