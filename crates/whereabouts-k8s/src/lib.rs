//! The Kubernetes API of whereabouts-rs: the custom resources as Rust types ([`crd`]) and the one way a
//! kube client is built from a kubeconfig ([`client`]). The rest of the workspace reaches kube and
//! k8s-openapi through the re-exports here, so their versions are chosen in one place.

pub mod client;
pub mod crd;

pub use k8s_openapi;
pub use kube;
