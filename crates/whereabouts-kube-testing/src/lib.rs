//! Test support for the Kubernetes-facing parts of whereabouts-rs.
//!
//! * [`FakeApiServer`]: an in-process fake Kubernetes API server that a real `kube::Client` talks to
//!   over HTTP, modelling the real server's protocol (see [`fake`] for what is and is not modelled).
//! * [`TestCluster`]: one test, two targets: a fresh namespace with the whereabouts CRDs installed,
//!   on a real cluster when `WHEREABOUTS_TEST_KUBECONFIG` names a kubeconfig, on a fake otherwise.
//! * [`upstream`]: an emulation of upstream whereabouts' Kubernetes storage path (the cluster-wide Lease,
//!   resourceVersion-tested patches), run as the `upstream-whereabouts` plugin binary for the
//!   rolling-upgrade test and as the benchmark's baseline.
//! * [`binaries`]: finds (and builds when stale) the plugin binaries for tests and benchmarks.

pub mod binaries;
pub mod cluster;
pub mod fake;
pub mod plugin;
pub mod upstream;

pub use cluster::TestCluster;
pub use fake::{FakeApiServer, FakeOptions, RecordedRequest, Stats};
