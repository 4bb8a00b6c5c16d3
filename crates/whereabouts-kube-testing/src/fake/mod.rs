//! An in-process fake Kubernetes API server that a real `kube::Client` talks to over plain HTTP on
//! 127.0.0.1, honouring the real kube-apiserver protocol closely enough that a test passing on it
//! also passes on a real cluster.
//!
//! # What is modelled
//!
//! * Objects stored generically (JSON) for the built-in types (core/v1 namespaces, pods, nodes,
//!   events, configmaps, secrets, serviceaccounts; coordination.k8s.io/v1 leases; events.k8s.io/v1
//!   events; apiextensions.k8s.io/v1 customresourcedefinitions) and for every type a stored CRD
//!   defines (served from the moment the CRD is created; unserved, with all their objects, when it is
//!   deleted).
//! * One global resourceVersion counter (like etcd's revision), uid, creationTimestamp, generation,
//!   generateName, name validation, `dryRun=All`.
//! * GET, LIST (label and field selectors), WATCH (from a resourceVersion, from "0", bookmarks,
//!   `sendInitialEvents`, `timeoutSeconds`, 410 `Expired` after [`FakeApiServer::compact`] or once
//!   more than 100 000 events, or about 1 GiB of objects, were recorded since), POST, PUT
//!   (optimistic concurrency, 422 for custom resources without a resourceVersion), PATCH (JSON
//!   patch, merge patch, strategic merge patch as a merge patch, server-side apply as
//!   create-or-merge), DELETE (preconditions, finalizers, graceful pod deletion, namespace
//!   termination in the background) and DELETE collection.
//! * The `status` subresource (pods, nodes, namespaces, CRDs, custom resources declaring it).
//! * Structural schemas of custom resources: pruning, defaults, nulls, validation (see `schema`).
//! * Failures as `Status` objects with the real reasons and messages.
//! * The validation of built-in objects for what the real server requires of those tests write (see
//!   `validation`): labels, pods' containers and node name, Events, Leases, ConfigMap and Secret keys.
//! * A request log ([`FakeApiServer::requests`]): each distinct (bearer token, verb, group, resource,
//!   namespace) asked for, in RBAC's terms, so tests can hold ClusterRoles against what components call.
//! * What requests cost ([`FakeOptions`]): CPU time or a latency per request, and per stored write a latency that
//!   grows with the object's size and with the size of the `managedFields` a real server would keep
//!   for it. Writes to one object are serialised, while writes to different objects proceed in
//!   parallel (as with etcd). [`FakeOptions::calibrated`] holds figures measured on a real server.
//! * `metadata.managedFields` only as a cost: a write that sets them to `[{}]` clears them, as on a
//!   real server; otherwise they are not stored, but a write is charged for the managed fields a real
//!   server would have recomputed.
//!
//! # What is not
//!
//! Authentication and authorisation (any token is accepted), admission webhooks, the content of
//! managedFields and server-side apply ownership (apply conflicts never happen, fields dropped from an applied
//! configuration are not removed), strategic-merge-patch list semantics (lists are replaced), pod spec
//! immutability and the other per-type validations of built-in objects (a pod's service account is
//! not looked up), the garbage collector (ownerReferences), field-label restrictions of field
//! selectors, LIST paging (`limit` and `continue` are ignored: everything comes in one page),
//! `resourceVersionMatch`, protobuf, CRD conversion webhooks, CEL validation rules.

mod admission;
mod audit;
mod crd;
mod discovery;
mod error;
mod locks;
mod patch;
mod path;
mod resource;
mod schema;
mod select;
mod store;
mod validation;
mod verbs;
mod watch;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State as AxumState};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use serde_json::json;
use tokio::net::TcpSocket;
use tokio::sync::{oneshot, watch as signal};

pub use audit::RecordedRequest;
use audit::RequestLog;
use error::ApiError;
use locks::ObjectLocks;
use store::State;

/// Options of a [`FakeApiServer`]: what its requests cost. The default costs nothing.
#[derive(Debug, Clone, Default)]
pub struct FakeOptions {
    /// Added to every request before it is handled, as a wait.
    pub request_latency: Duration,
    /// CPU time spent on every request before it is handled (a real server's TLS, authentication,
    /// authorisation, decoding and encoding, and its garbage collector's share), on one of the fake's
    /// two worker threads. A real API server beside its clients takes that CPU from them: under a
    /// burst of plugin processes on a 2-core machine the server and the plugins share the cores, which
    /// a wait would not show (the fake then ran bursts twice as fast as the real server did).
    pub request_cpu: Duration,
    /// Added to every stored write (POST/PUT/PATCH/DELETE) while holding that object's write path, to
    /// model a real API server's etcd round trip (writes to one object are serialised, as in etcd).
    pub write_latency: Duration,
    /// Added to a stored write per KiB of the object as stored (a real server decodes, validates,
    /// converts and encodes the whole object on every write, and etcd stores all of it).
    pub write_latency_per_kib: Duration,
    /// Added to a stored write per KiB of the `managedFields` a real server keeps for the object
    /// (about as large as its spec, unless the writes clear them), which it recomputes on every write.
    pub managed_fields_latency_per_kib: Duration,
}

impl FakeOptions {
    /// The costs of a real kube-apiserver (v1.31, over Debian's etcd 3.4 on loopback, 2 cores),
    /// measured with JSON patches adding one allocation to IPPools of 0, 200 and 1000 allocations:
    /// 9, 32 and 108 ms for objects of 2.4, 22 and 102 KiB whose managedFields were cleared, and 12, 53
    /// and 281 ms for the same objects carrying their managedFields (1.5, 14 and 65 KiB); a GET of a
    /// small object on a kept-alive connection about 1 ms. The fixed part of a write is set below the
    /// first of those figures: measured since on a quiet server, creating a reservation takes 3.4 ms
    /// and a whole sequential ADD (a read, a patch and a reservation, with the plugin's own start) 13
    /// ms, which a fixed 7 ms per write made 33 ms on the fake.
    ///
    /// A real server's requests cost CPU more than time: over a burst of 200 ADDs and their DELs it
    /// spent 2.3 ms of CPU per request, and a sequential ADD (three requests, two of them writes)
    /// took 10 to 13 ms with the plugin's own start. Hence 2 ms of CPU per request and a write's
    /// fixed wait down to 0.5 ms. (Spending the per-KiB costs as CPU too brought the ADD bursts closer
    /// still, but made the controller's release of 1000 addresses five times slower than on the real
    /// server.)
    pub fn calibrated() -> FakeOptions {
        FakeOptions {
            request_latency: Duration::ZERO,
            request_cpu: Duration::from_micros(2000),
            write_latency: Duration::from_micros(500),
            write_latency_per_kib: Duration::from_micros(950),
            managed_fields_latency_per_kib: Duration::from_micros(2800),
        }
    }

    /// What one stored write costs, for the sizes of the object and its managed fields (measured only
    /// when some cost depends on them).
    fn stored_write_latency(&self, sizes: impl FnOnce() -> (usize, usize)) -> Duration {
        if self.write_latency_per_kib.is_zero() && self.managed_fields_latency_per_kib.is_zero() {
            return self.write_latency;
        }
        let (object_bytes, managed_bytes) = sizes();
        let kib = |bytes: usize| bytes as f64 / 1024.0;
        self.write_latency
            + self.write_latency_per_kib.mul_f64(kib(object_bytes))
            + self.managed_fields_latency_per_kib.mul_f64(kib(managed_bytes))
    }
}

/// Request counters of a [`FakeApiServer`] (since it started or [`FakeApiServer::reset_stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Every HTTP request, including discovery, watches and refused ones.
    pub requests: u64,
    /// Mutating requests (POST, PUT, PATCH, DELETE), whatever their outcome.
    pub writes: u64,
    /// Answers 409 (Conflict and AlreadyExists).
    pub conflicts: u64,
    /// Answers 422 (Invalid).
    pub invalid: u64,
    /// Answers 404 (NotFound).
    pub not_found: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    writes: AtomicU64,
    conflicts: AtomicU64,
    invalid: AtomicU64,
    not_found: AtomicU64,
}

/// What the request handlers share.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    locks: ObjectLocks,
    options: FakeOptions,
    counters: Counters,
    /// What was asked, by whom (see [`FakeApiServer::requests`]).
    log: Mutex<RequestLog>,
    /// True while the server answers every request with 503.
    unavailable: signal::Sender<bool>,
    /// `127.0.0.1:<port>`.
    address: String,
}

impl Shared {
    fn new(options: FakeOptions, address: String) -> Shared {
        let mut state = State::new();
        if let Some(namespaces) = state.resolve("", "v1", "namespaces") {
            for name in ["default", "kube-system"] {
                let namespace = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
                let namespace = admission::prepare_create(&namespaces, namespace)
                    .expect("the initial namespaces are valid");
                state.put(&namespaces, namespace);
            }
        }
        Shared {
            state: Mutex::new(state),
            locks: ObjectLocks::default(),
            options,
            counters: Counters::default(),
            log: Mutex::new(RequestLog::default()),
            unavailable: signal::Sender::new(false),
            address,
        }
    }

    /// The state, held only for in-memory work (never across an await).
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The one handler: every path is parsed by hand (see `path`).
async fn handle(AxumState(shared): AxumState<Arc<Shared>>, request: Request) -> Response {
    let counters = &shared.counters;
    counters.requests.fetch_add(1, Ordering::Relaxed);
    if matches!(*request.method(), Method::POST | Method::PUT | Method::PATCH | Method::DELETE) {
        counters.writes.fetch_add(1, Ordering::Relaxed);
    }
    tracing::trace!(method = %request.method(), uri = %request.uri(), "request");
    if !shared.options.request_latency.is_zero() {
        tokio::time::sleep(shared.options.request_latency).await;
    }
    if !shared.options.request_cpu.is_zero() {
        burn_cpu(shared.options.request_cpu);
    }
    shared.log.lock().unwrap_or_else(PoisonError::into_inner).record(
        request.method(),
        request.uri(),
        request.headers(),
    );
    let response = if *shared.unavailable.borrow() {
        ApiError::unavailable().into_response()
    } else {
        verbs::dispatch(&shared, request).await.unwrap_or_else(IntoResponse::into_response)
    };
    let counter = match response.status() {
        StatusCode::CONFLICT => Some(&counters.conflicts),
        StatusCode::UNPROCESSABLE_ENTITY => Some(&counters.invalid),
        StatusCode::NOT_FOUND => Some(&counters.not_found),
        _ => None,
    };
    if let Some(counter) = counter {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    response
}

/// Spends `cpu` of the calling thread's CPU time. Counted in CPU time, not wall time: a thread that
/// other work on the machine preempts burns on until it has had its share of a core.
fn burn_cpu(cpu: Duration) {
    let used = || {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        Duration::new(u64::try_from(now.tv_sec).unwrap_or(0), u32::try_from(now.tv_nsec).unwrap_or(0))
    };
    let until = used() + cpu;
    while used() < until {
        std::hint::spin_loop();
    }
}

/// A running fake API server. It serves on its own OS thread (with its own two-worker tokio
/// runtime), so it works from sync code, from any test runtime and from benchmarks. Dropping it
/// stops the server: connections and watches end.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    url: String,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("url", &self.url)
            .field("options", &self.shared.options)
            .finish()
    }
}

impl FakeApiServer {
    /// Starts a server with default options; see [`FakeApiServer::start_with`].
    pub fn start() -> FakeApiServer {
        FakeApiServer::start_with(FakeOptions::default())
    }

    /// Starts a server on an ephemeral port of 127.0.0.1; returns once it is listening. Namespaces
    /// `default` and `kube-system` exist.
    ///
    /// # Panics
    ///
    /// If no socket or thread can be had (test support: there is nothing sensible to carry on with).
    pub fn start_with(options: FakeOptions) -> FakeApiServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-kube-apiserver")
            .enable_all()
            .build()
            .expect("building the fake API server's runtime");
        // A long accept queue: many plugin processes may connect at once.
        let listener = {
            let _runtime = runtime.enter();
            let socket = TcpSocket::new_v4().expect("a socket");
            socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).expect("binding 127.0.0.1:0");
            socket.listen(4096).expect("listening")
        };
        let address = listener.local_addr().expect("the listener's address").to_string();
        let shared = Arc::new(Shared::new(options, address.clone()));
        let (shutdown, stopped) = oneshot::channel::<()>();
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let thread = std::thread::Builder::new()
            .name("fake-kube-apiserver".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = listener.tap_io(|stream| {
                        // Small request/answer exchanges: no Nagle delays.
                        let _ = stream.set_nodelay(true);
                    });
                    tokio::select! {
                        result = axum::serve(listener, app) => {
                            if let Err(error) = result {
                                tracing::error!(%error, "the fake API server stopped");
                            }
                        }
                        _ = stopped => {}
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .expect("spawning the fake API server's thread");
        FakeApiServer {
            shared,
            url: format!("http://{address}"),
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// A kubeconfig (JSON, which is valid YAML) with one cluster, user and context pointing at this
    /// server, the context's namespace set to `namespace`, and a dummy bearer token.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        let kubeconfig = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{
                "name": "fake",
                "cluster": {"server": self.url},
            }],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{
                "name": "fake",
                "context": {"cluster": "fake", "user": "fake", "namespace": namespace},
            }],
            "current-context": "fake",
            "preferences": {},
        });
        serde_json::to_string_pretty(&kubeconfig).unwrap_or_default()
    }

    pub fn stats(&self) -> Stats {
        let counters = &self.shared.counters;
        Stats {
            requests: counters.requests.load(Ordering::Relaxed),
            writes: counters.writes.load(Ordering::Relaxed),
            conflicts: counters.conflicts.load(Ordering::Relaxed),
            invalid: counters.invalid.load(Ordering::Relaxed),
            not_found: counters.not_found.load(Ordering::Relaxed),
        }
    }

    /// Every distinct resource request since the server started or [`FakeApiServer::reset_stats`]:
    /// bearer token, authorisation verb, group, version, resource, subresource, namespace, with a
    /// count, in the order first seen. Refused requests (404, 409, 503) count too, as a real API
    /// server authorises a request before it looks at the object.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.log.lock().unwrap_or_else(PoisonError::into_inner).requests()
    }

    /// Clears the counters of [`FakeApiServer::stats`] and the log of [`FakeApiServer::requests`].
    pub fn reset_stats(&self) {
        self.shared.log.lock().unwrap_or_else(PoisonError::into_inner).clear();
        let counters = &self.shared.counters;
        for counter in [
            &counters.requests,
            &counters.writes,
            &counters.conflicts,
            &counters.invalid,
            &counters.not_found,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }

    /// While true every request answers 503 ServiceUnavailable (a Status object) and open watches
    /// end; models an API server restart. (kube's default client retries 503s with backoff, up to
    /// 15 times, so its requests wait for the server to come back rather than fail.)
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.unavailable.send_replace(unavailable);
    }

    /// Forgets the watch history up to the current resourceVersion, as an etcd compaction does: a
    /// watch from an older resourceVersion then gets an ERROR event with a 410 `Expired` Status.
    pub fn compact(&self) {
        self.shared.state().compact();
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
