//! [`TestCluster`]: one test, two targets. A test written against it runs on a [`FakeApiServer`] by
//! default and on a real cluster when `WHEREABOUTS_TEST_KUBECONFIG` names a kubeconfig, each time in
//! a fresh namespace with the CRDs installed.
//!
//! A real cluster is shared: by tests running in parallel, and with whatever earlier runs left. So a
//! test keeps to its namespace, and the cluster-scoped objects it makes (Nodes) carry its
//! [`TEST_LABEL`] and names starting with its namespace, for the code under test to be pointed at
//! them with a label selector ([`TestCluster::selector`]). Cleanup deletes what the test made, its
//! Nodes and every object in its namespace, before the namespace itself: a cluster without a
//! namespace controller (a bare API server) never empties a namespace being deleted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{Container, Namespace, Node, Pod, PodSpec, PodTemplateSpec, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, OwnerReference};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, ObjectMeta, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::discovery::{Discovery, Scope, verbs};
use serde_json::Value;
use tempfile::TempDir;
use tokio::time::Instant;

use whereabouts_k8s::crd::ipam_claim_resource;

use crate::fake::{FakeApiServer, FakeOptions};

/// The environment variable naming a real cluster's kubeconfig.
pub const KUBECONFIG_ENV: &str = "WHEREABOUTS_TEST_KUBECONFIG";

/// The NetworkAttachmentDefinition CRD (Multus's), installed along with the whereabouts CRDs.
const NETWORK_ATTACHMENT_DEFINITION_CRD: &str =
    include_str!("crds/k8s.cni.cncf.io_network-attachment-definitions.yaml");

/// The IPAMClaim CRD (KubeVirt's persistent addresses), installed along with the whereabouts CRDs.
const IPAM_CLAIM_CRD: &str = include_str!("crds/k8s.cni.cncf.io_ipamclaims.yaml");

/// The label every cluster-scoped object a test makes carries, with the test's namespace as its value.
pub const TEST_LABEL: &str = "whereabouts-kube-testing/test";

/// How long a CRD may take to be served on a real cluster.
const CRD_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The connect, read and write timeouts of the clients made here.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long cleanup may take (discovery, then one delete request per resource type).
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(60);

/// A namespace with the CRDs installed, on a real cluster or on a fake one.
pub struct TestCluster {
    client: kube::Client,
    namespace: String,
    kubeconfig_path: PathBuf,
    fake: Option<FakeApiServer>,
    cleaned_up: bool,
    /// Holds the kubeconfig file; removed on drop.
    _directory: TempDir,
}

impl std::fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCluster")
            .field("namespace", &self.namespace)
            .field("kubeconfig_path", &self.kubeconfig_path)
            .field("fake", &self.fake)
            .finish_non_exhaustive()
    }
}

/// `wb-test-` and eight random lowercase letters and digits.
fn random_namespace() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let suffix: String = (0..8).map(|_| char::from(ALPHABET[fastrand::usize(..ALPHABET.len())])).collect();
    format!("wb-test-{suffix}")
}

/// `<workspace>/deploy/crds`.
fn workspace_crd_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds")
}

/// Points the kubeconfig's current context at `namespace`, and makes relative file references
/// absolute (relative to `base`, the directory of the original file) since the result is written
/// elsewhere.
fn retarget_kubeconfig(kubeconfig: &mut Value, namespace: &str, base: Option<&Path>) -> Result<(), String> {
    let current = kubeconfig.get("current-context").and_then(Value::as_str).unwrap_or_default().to_owned();
    let context = kubeconfig
        .get_mut("contexts")
        .and_then(Value::as_array_mut)
        .and_then(|contexts| {
            contexts.iter_mut().find(|c| c.get("name").and_then(Value::as_str) == Some(&current))
        })
        .and_then(|named| named.get_mut("context"))
        .and_then(Value::as_object_mut)
        .ok_or_else(|| format!("the kubeconfig has no current context (current-context: {current:?})"))?;
    context.insert("namespace".to_owned(), Value::from(namespace));
    let Some(base) = base else { return Ok(()) };
    for (list, entry, keys) in [
        ("clusters", "cluster", &["certificate-authority"][..]),
        ("users", "user", &["client-certificate", "client-key", "tokenFile"][..]),
    ] {
        let entries = kubeconfig.get_mut(list).and_then(Value::as_array_mut).into_iter().flatten();
        for named in entries.filter_map(|named| named.get_mut(entry)).filter_map(Value::as_object_mut) {
            for key in keys {
                if let Some(Value::String(file)) = named.get_mut(*key)
                    && Path::new(file.as_str()).is_relative()
                {
                    *file = base.join(file.as_str()).to_string_lossy().into_owned();
                }
            }
        }
    }
    Ok(())
}

/// A client from a kubeconfig file, with 10 s connect, read and write timeouts. (A watch without
/// bookmarks that stays quiet for longer than the read timeout ends with a timeout error.)
async fn client_from(kubeconfig_path: &Path) -> Result<kube::Client, String> {
    let kubeconfig =
        Kubeconfig::read_from(kubeconfig_path).map_err(|e| format!("reading the kubeconfig: {e}"))?;
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| format!("loading the kubeconfig: {e}"))?;
    config.connect_timeout = Some(CLIENT_TIMEOUT);
    config.read_timeout = Some(CLIENT_TIMEOUT);
    config.write_timeout = Some(CLIENT_TIMEOUT);
    // Count the read timeout from each request, not from when a pooled connection went idle.
    config.reset_reader_on_write = true;
    kube::Client::try_from(config).map_err(|e| format!("making the client: {e}"))
}

/// Every CustomResourceDefinition document in the `*.yaml` files of `directory` (none if it does
/// not exist), after the NetworkAttachmentDefinition CRD.
fn read_crds(directory: &Path) -> Result<Vec<CustomResourceDefinition>, String> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(directory) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| {
                path.extension().is_some_and(|extension| extension == "yaml" || extension == "yml")
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    let mut texts = vec![
        ("(built in)".to_owned(), NETWORK_ATTACHMENT_DEFINITION_CRD.to_owned()),
        ("(built in)".to_owned(), IPAM_CLAIM_CRD.to_owned()),
    ];
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| format!("reading {}: {e}", file.display()))?;
        texts.push((file.display().to_string(), text));
    }
    let mut crds = Vec::new();
    for (origin, text) in texts {
        let documents: Vec<Value> =
            serde_saphyr::from_multiple(&text).map_err(|e| format!("parsing {origin}: {e}"))?;
        for document in documents {
            if document.get("kind").and_then(Value::as_str) == Some("CustomResourceDefinition") {
                crds.push(
                    serde_json::from_value(document)
                        .map_err(|e| format!("decoding a CRD of {origin}: {e}"))?,
                );
            }
        }
    }
    Ok(crds)
}

fn is_status(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == code)
}

/// Creates the CRD, or replaces the one that exists (retrying on write conflicts with others).
async fn install_crd(
    api: &Api<CustomResourceDefinition>,
    crd: &CustomResourceDefinition,
) -> Result<(), String> {
    let name = crd.metadata.name.clone().unwrap_or_default();
    let failed = |e: kube::Error| format!("installing CRD {name}: {e}");
    for _ in 0..10 {
        match api.create(&PostParams::default(), crd).await {
            Ok(_) => return Ok(()),
            Err(e) if is_status(&e, 409) => {
                let existing = api.get(&name).await.map_err(failed)?;
                let mut updated = crd.clone();
                updated.metadata.resource_version = existing.metadata.resource_version;
                match api.replace(&name, &PostParams::default(), &updated).await {
                    Ok(_) => return Ok(()),
                    Err(e) if is_status(&e, 409) => continue,
                    Err(e) => return Err(failed(e)),
                }
            }
            Err(e) => return Err(failed(e)),
        }
    }
    Err(format!("installing CRD {name}: it kept changing under us"))
}

/// Whether the CRD is Established and a LIST of each of its served versions succeeds.
async fn crd_served(client: &kube::Client, crd: &CustomResourceDefinition, namespace: &str) -> bool {
    let name = crd.metadata.name.clone().unwrap_or_default();
    let established = Api::<CustomResourceDefinition>::all(client.clone())
        .get(&name)
        .await
        .ok()
        .and_then(|stored| stored.status?.conditions)
        .is_some_and(|conditions| conditions.iter().any(|c| c.type_ == "Established" && c.status == "True"));
    if !established {
        return false;
    }
    for version in crd.spec.versions.iter().filter(|version| version.served) {
        let resource = ApiResource {
            group: crd.spec.group.clone(),
            version: version.name.clone(),
            api_version: format!("{}/{}", crd.spec.group, version.name),
            kind: crd.spec.names.kind.clone(),
            plural: crd.spec.names.plural.clone(),
        };
        let api: Api<DynamicObject> = if crd.spec.scope == "Namespaced" {
            Api::namespaced_with(client.clone(), namespace, &resource)
        } else {
            Api::all_with(client.clone(), &resource)
        };
        if api.list(&ListParams::default().limit(1)).await.is_err() {
            return false;
        }
    }
    true
}

/// Installs the CRDs and waits until each is served.
async fn install_crds(client: &kube::Client, crd_dir: &Path, namespace: &str) -> Result<(), String> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let crds = read_crds(crd_dir)?;
    for crd in &crds {
        install_crd(&api, crd).await?;
    }
    let deadline = Instant::now() + CRD_READY_TIMEOUT;
    for crd in &crds {
        while !crd_served(client, crd, namespace).await {
            if Instant::now() > deadline {
                return Err(format!(
                    "CRD {} is not served after {CRD_READY_TIMEOUT:?}",
                    crd.metadata.name.clone().unwrap_or_default()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// Deletes without grace (a pod bound to a node would otherwise wait for a kubelet that may not exist)
/// and with background propagation (orphaning, the default of a few types, sets a finalizer that only
/// a garbage collector removes).
fn at_once() -> DeleteParams {
    DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::background() }
}

/// Deletes what the test made: the Nodes with its label, every object of every deletable namespaced
/// type in its namespace (found by discovery, as the namespace controller does), then the namespace.
/// Failures are logged: cleanup goes on with the rest.
async fn delete_test_objects(client: &kube::Client, namespace: &str) {
    let warn = |what: &str, e: &dyn std::fmt::Display| {
        tracing::warn!(namespace, error = %e, "cleanup: could not delete {what}");
    };
    let labelled = ListParams::default().labels(&format!("{TEST_LABEL}={namespace}"));
    if let Err(e) = Api::<Node>::all(client.clone()).delete_collection(&at_once(), &labelled).await {
        warn("the test's Nodes", &e);
    }
    match Discovery::new(client.clone()).run().await {
        Ok(discovery) => {
            let deletable = discovery.groups().flat_map(|group| group.recommended_resources()).filter(
                |(_, capabilities)| {
                    capabilities.scope == Scope::Namespaced
                        && capabilities.supports_operation(verbs::DELETE_COLLECTION)
                },
            );
            let deletions = deletable.map(|(resource, _)| async move {
                let api = Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &resource);
                match api.delete_collection(&at_once(), &ListParams::default()).await {
                    Ok(_) => {}
                    Err(e) if is_status(&e, 404) || is_status(&e, 405) => {}
                    Err(e) => warn(&resource.plural, &e),
                }
            });
            futures::future::join_all(deletions).await;
        }
        Err(e) => warn("the namespace's objects (discovery failed)", &e),
    }
    match Api::<Namespace>::all(client.clone()).delete(namespace, &DeleteParams::background()).await {
        Ok(_) => {}
        Err(e) if is_status(&e, 404) => {}
        Err(e) => warn("the namespace", &e),
    }
}

/// A pod of one container (`app`, image `pause`: the real server requires both), bound to `node`
/// when given.
fn pod_object(name: &str, node: Option<&str>) -> Pod {
    Pod {
        metadata: ObjectMeta { name: Some(name.into()), ..ObjectMeta::default() },
        spec: Some(PodSpec {
            node_name: node.map(String::from),
            containers: vec![Container {
                name: "app".into(),
                image: Some("pause".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

impl TestCluster {
    /// Starts a test cluster with the workspace's CRDs (`deploy/crds/*.yaml`, a missing directory
    /// meaning none) and the NetworkAttachmentDefinition CRD.
    ///
    /// # Panics
    ///
    /// When the cluster cannot be set up (test support: the test cannot go on).
    pub async fn start() -> TestCluster {
        TestCluster::start_with_crds(&workspace_crd_dir()).await
    }

    /// Like [`TestCluster::start`], with the CRDs of the `*.yaml` files in `crd_dir` (multi-document
    /// files allowed; documents of other kinds are skipped).
    ///
    /// # Panics
    ///
    /// When the cluster cannot be set up.
    pub async fn start_with_crds(crd_dir: &Path) -> TestCluster {
        match TestCluster::try_start(crd_dir, FakeOptions::default()).await {
            Ok(cluster) => cluster,
            Err(e) => panic!("starting the test cluster: {e}"),
        }
    }

    /// Like [`TestCluster::start`], on a fake API server with `options` (a real cluster is what it is).
    ///
    /// # Panics
    ///
    /// When the cluster cannot be set up.
    pub async fn start_with_options(options: FakeOptions) -> TestCluster {
        match TestCluster::try_start(&workspace_crd_dir(), options).await {
            Ok(cluster) => cluster,
            Err(e) => panic!("starting the test cluster: {e}"),
        }
    }

    async fn try_start(crd_dir: &Path, options: FakeOptions) -> Result<TestCluster, String> {
        let (mut kubeconfig, base, fake) =
            match std::env::var_os(KUBECONFIG_ENV).filter(|path| !path.is_empty()) {
                Some(path) => {
                    let path = PathBuf::from(path);
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| format!("reading {}: {e}", path.display()))?;
                    let kubeconfig: Value = serde_saphyr::from_str(&text)
                        .map_err(|e| format!("parsing {}: {e}", path.display()))?;
                    let base =
                        std::path::absolute(&path).ok().and_then(|path| path.parent().map(Path::to_path_buf));
                    (kubeconfig, base, None)
                }
                None => {
                    let fake = FakeApiServer::start_with(options);
                    let kubeconfig: Value = serde_json::from_str(&fake.kubeconfig("default"))
                        .map_err(|e| format!("the fake's kubeconfig: {e}"))?;
                    (kubeconfig, None, Some(fake))
                }
            };
        let namespace = random_namespace();
        retarget_kubeconfig(&mut kubeconfig, &namespace, base.as_deref())?;
        let directory = tempfile::tempdir().map_err(|e| format!("making a temporary directory: {e}"))?;
        let kubeconfig_path = directory.path().join("kubeconfig.json");
        let text =
            serde_json::to_string_pretty(&kubeconfig).map_err(|e| format!("writing the kubeconfig: {e}"))?;
        std::fs::write(&kubeconfig_path, text)
            .map_err(|e| format!("writing {}: {e}", kubeconfig_path.display()))?;
        let client = client_from(&kubeconfig_path).await?;
        let labels = [("app.kubernetes.io/created-by".to_owned(), "whereabouts-kube-testing".to_owned())];
        let object = Namespace {
            metadata: ObjectMeta {
                name: Some(namespace.clone()),
                labels: Some(labels.into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &object)
            .await
            .map_err(|e| format!("creating namespace {namespace}: {e}"))?;
        // Pods are refused until their service account exists, which a real cluster's controller
        // manager makes a moment after the namespace (or never, on a bare API server).
        let account = ServiceAccount {
            metadata: ObjectMeta { name: Some("default".to_owned()), ..ObjectMeta::default() },
            ..ServiceAccount::default()
        };
        match Api::<ServiceAccount>::namespaced(client.clone(), &namespace)
            .create(&PostParams::default(), &account)
            .await
        {
            Ok(_) => {}
            Err(e) if is_status(&e, 409) => {}
            Err(e) => return Err(format!("creating the default service account of {namespace}: {e}")),
        }
        let cluster = TestCluster {
            client,
            namespace,
            kubeconfig_path,
            fake,
            cleaned_up: false,
            _directory: directory,
        };
        install_crds(&cluster.client, crd_dir, &cluster.namespace).await?;
        Ok(cluster)
    }

    /// A client whose default namespace is the test namespace, with 10 s connect, read and write
    /// timeouts (kube's default retries of 429/503/504 included). A watch that stays quiet for longer
    /// than the read timeout ends in an error: ask for bookmarks (kube's default), which the fake
    /// sends every second of silence (a real server only about once a minute).
    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// A kubeconfig (JSON) whose current context's namespace is the test namespace.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The fake server, or None on a real cluster.
    pub fn fake(&self) -> Option<&FakeApiServer> {
        self.fake.as_ref()
    }

    pub fn is_real(&self) -> bool {
        self.fake.is_none()
    }

    /// `<namespace>-<name>`: a name no other test uses, for cluster-scoped objects and for objects
    /// named after a network.
    pub fn unique(&self, name: &str) -> String {
        format!("{}-{name}", self.namespace)
    }

    /// The test's label ([`TEST_LABEL`] with the namespace as its value), for the objects it makes.
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(TEST_LABEL.to_owned(), self.namespace.clone())])
    }

    /// The label selector of the objects carrying [`TestCluster::labels`].
    pub fn selector(&self) -> String {
        format!("{TEST_LABEL}={}", self.namespace)
    }

    /// Creates the Node [`TestCluster::unique`]`(name)`, with the test's label; returns its name.
    /// Cleanup deletes it.
    ///
    /// # Panics
    ///
    /// When the Node cannot be created.
    pub async fn create_node(&self, name: &str) -> String {
        let name = self.unique(name);
        let node = Node {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(self.labels()),
                ..ObjectMeta::default()
            },
            ..Node::default()
        };
        if let Err(e) = Api::<Node>::all(self.client()).create(&PostParams::default(), &node).await {
            panic!("creating Node {name}: {e}");
        }
        name
    }

    /// Deletes a Node (gone already is fine).
    ///
    /// # Panics
    ///
    /// When the deletion fails otherwise.
    pub async fn delete_node(&self, name: &str) {
        match Api::<Node>::all(self.client()).delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => panic!("deleting Node {name}: {e}"),
        }
    }

    /// Creates a pod of the test namespace with one container, bound to `node` when given (as the
    /// scheduler would); returns its uid.
    ///
    /// # Panics
    ///
    /// When the pod cannot be created.
    pub async fn create_pod(&self, name: &str, node: Option<&str>) -> String {
        let api: Api<Pod> = Api::namespaced(self.client(), &self.namespace);
        match api.create(&PostParams::default(), &pod_object(name, node)).await {
            Ok(created) => created.metadata.uid.unwrap_or_else(|| panic!("pod {name} has no uid")),
            Err(e) => panic!("creating pod {name}: {e}"),
        }
    }

    /// Deletes a pod at once, as after a force delete or once a kubelet confirmed it (no CNI DEL).
    ///
    /// # Panics
    ///
    /// When the deletion fails.
    pub async fn delete_pod(&self, name: &str) {
        let api: Api<Pod> = Api::namespaced(self.client(), &self.namespace);
        if let Err(e) = api.delete(name, &at_once()).await {
            panic!("deleting pod {name}: {e}");
        }
    }

    /// Creates a StatefulSet of the test namespace wanting `replicas` pods (its pods are the test's
    /// to make, as the StatefulSet controller would: see [`TestCluster::create_statefulset_pod`]);
    /// returns its uid.
    ///
    /// # Panics
    ///
    /// When the creation fails.
    pub async fn create_statefulset(&self, name: &str, replicas: i32) -> String {
        let labels = BTreeMap::from([("app".to_string(), name.to_string())]);
        let statefulset = StatefulSet {
            metadata: ObjectMeta { name: Some(name.into()), ..ObjectMeta::default() },
            spec: Some(StatefulSetSpec {
                replicas: Some(replicas),
                selector: LabelSelector { match_labels: Some(labels.clone()), ..LabelSelector::default() },
                service_name: Some(name.into()),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta { labels: Some(labels), ..ObjectMeta::default() }),
                    spec: pod_object(name, None).spec,
                },
                ..StatefulSetSpec::default()
            }),
            ..StatefulSet::default()
        };
        let api: Api<StatefulSet> = Api::namespaced(self.client(), &self.namespace);
        match api.create(&PostParams::default(), &statefulset).await {
            Ok(created) => created.metadata.uid.unwrap_or_else(|| panic!("StatefulSet {name} has no uid")),
            Err(e) => panic!("creating StatefulSet {name}: {e}"),
        }
    }

    /// Sets a StatefulSet's `spec.replicas`, as `kubectl scale` does.
    ///
    /// # Panics
    ///
    /// When the update fails.
    pub async fn scale_statefulset(&self, name: &str, replicas: i32) {
        let api: Api<StatefulSet> = Api::namespaced(self.client(), &self.namespace);
        let patch = serde_json::json!({ "spec": { "replicas": replicas } });
        if let Err(e) = api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            panic!("scaling StatefulSet {name}: {e}");
        }
    }

    /// Deletes a StatefulSet (its pods stay: no garbage collector runs here; the test deletes them).
    ///
    /// # Panics
    ///
    /// When the deletion fails.
    pub async fn delete_statefulset(&self, name: &str) {
        let api: Api<StatefulSet> = Api::namespaced(self.client(), &self.namespace);
        if let Err(e) = api.delete(name, &at_once()).await {
            panic!("deleting StatefulSet {name}: {e}");
        }
    }

    /// Creates pod `<statefulset>-<ordinal>` of a StatefulSet (owner reference to it, as the StatefulSet
    /// controller makes them), bound to `node`; returns its uid.
    ///
    /// # Panics
    ///
    /// When the creation fails.
    pub async fn create_statefulset_pod(
        &self,
        statefulset: (&str, &str),
        ordinal: u32,
        node: &str,
    ) -> String {
        let (name, uid) = statefulset;
        let pod_name = format!("{name}-{ordinal}");
        let mut pod = pod_object(&pod_name, Some(node));
        pod.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "apps/v1".into(),
            kind: "StatefulSet".into(),
            name: name.into(),
            uid: uid.into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]);
        let api: Api<Pod> = Api::namespaced(self.client(), &self.namespace);
        match api.create(&PostParams::default(), &pod).await {
            Ok(created) => created.metadata.uid.unwrap_or_else(|| panic!("pod {pod_name} has no uid")),
            Err(e) => panic!("creating pod {pod_name}: {e}"),
        }
    }

    /// Creates a pod of the test namespace bound to `node` with `annotations` (a virtual machine's
    /// launcher pod with its network selection elements, say); returns its uid.
    ///
    /// # Panics
    ///
    /// When the creation fails.
    pub async fn create_annotated_pod(
        &self,
        name: &str,
        node: &str,
        annotations: BTreeMap<String, String>,
    ) -> String {
        let mut pod = pod_object(name, Some(node));
        pod.metadata.annotations = Some(annotations);
        let api: Api<Pod> = Api::namespaced(self.client(), &self.namespace);
        match api.create(&PostParams::default(), &pod).await {
            Ok(created) => created.metadata.uid.unwrap_or_else(|| panic!("pod {name} has no uid")),
            Err(e) => panic!("creating pod {name}: {e}"),
        }
    }

    fn ipam_claims(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client(), &self.namespace, &ipam_claim_resource())
    }

    /// Creates an IPAMClaim of the test namespace, as KubeVirt does for a virtual machine's network.
    ///
    /// # Panics
    ///
    /// When the creation fails.
    pub async fn create_ipam_claim(&self, name: &str, network: &str, interface: &str) {
        let claim = DynamicObject::new(name, &ipam_claim_resource())
            .data(serde_json::json!({ "spec": { "network": network, "interface": interface } }));
        if let Err(e) = self.ipam_claims().create(&PostParams::default(), &claim).await {
            panic!("creating IPAMClaim {name}: {e}");
        }
    }

    /// An IPAMClaim's `status` (`null` when it has none).
    ///
    /// # Panics
    ///
    /// When the claim cannot be read.
    pub async fn ipam_claim_status(&self, name: &str) -> Value {
        match self.ipam_claims().get(name).await {
            Ok(claim) => claim.data["status"].clone(),
            Err(e) => panic!("reading IPAMClaim {name}: {e}"),
        }
    }

    /// Deletes an IPAMClaim, as KubeVirt's garbage collection does with its virtual machine.
    ///
    /// # Panics
    ///
    /// When the deletion fails.
    pub async fn delete_ipam_claim(&self, name: &str) {
        if let Err(e) = self.ipam_claims().delete(name, &at_once()).await {
            panic!("deleting IPAMClaim {name}: {e}");
        }
    }

    /// Deletes what the test made (the CRDs stay): see the module documentation. Failures are logged.
    pub async fn delete_test_objects(&self) {
        if tokio::time::timeout(CLEANUP_TIMEOUT, delete_test_objects(&self.client, &self.namespace))
            .await
            .is_err()
        {
            tracing::warn!(namespace = %self.namespace, "cleanup did not finish in {CLEANUP_TIMEOUT:?}");
        }
    }

    /// [`TestCluster::delete_test_objects`], then a fake stops; on a fake too, so that the cleanup a
    /// real cluster relies on runs in every test run.
    pub async fn cleanup(mut self) {
        self.cleaned_up = true;
        self.delete_test_objects().await;
    }
}

impl Drop for TestCluster {
    /// Best effort: cleans up a real cluster after a test that did not (it panicked), from a
    /// short-lived thread with its own runtime (no ambient runtime needed); a fake stops by itself.
    fn drop(&mut self) {
        if self.cleaned_up || !self.is_real() {
            return;
        }
        let (path, namespace) = (self.kubeconfig_path.clone(), self.namespace.clone());
        let worker = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async {
                let deletion = async {
                    if let Ok(client) = client_from(&path).await {
                        delete_test_objects(&client, &namespace).await;
                    }
                };
                let _ = tokio::time::timeout(CLEANUP_TIMEOUT, deletion).await;
            });
        });
        let _ = worker.join();
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn retargeting_sets_the_namespace_and_absolutises_files() {
        let mut kubeconfig = json!({
            "current-context": "b",
            "contexts": [{"name": "a", "context": {}}, {"name": "b", "context": {"namespace": "x"}}],
            "clusters": [{"name": "c", "cluster": {"certificate-authority": "ca.pem", "server": "https://h"}}],
            "users": [{"name": "u", "user": {"client-key": "/abs/key.pem", "client-certificate": "c.pem"}}],
        });
        retarget_kubeconfig(&mut kubeconfig, "wb-test-1", Some(Path::new("/base"))).expect("retargeted");
        assert_eq!(kubeconfig["contexts"][1]["context"]["namespace"], "wb-test-1");
        assert_eq!(kubeconfig["contexts"][0]["context"], json!({}));
        assert_eq!(kubeconfig["clusters"][0]["cluster"]["certificate-authority"], "/base/ca.pem");
        assert_eq!(kubeconfig["users"][0]["user"]["client-key"], "/abs/key.pem");
        assert_eq!(kubeconfig["users"][0]["user"]["client-certificate"], "/base/c.pem");
        assert!(retarget_kubeconfig(&mut json!({"current-context": "z"}), "n", None).is_err());
        let namespace = random_namespace();
        assert!(namespace.len() == 16 && namespace.starts_with("wb-test-"));
    }

    #[test]
    fn the_network_attachment_definition_crd_is_read_first() {
        let crds = read_crds(Path::new("/nonexistent")).expect("read");
        assert_eq!(crds.len(), 2);
        assert_eq!(crds[0].spec.names.kind, "NetworkAttachmentDefinition");
        assert_eq!(crds[1].spec.names.kind, "IPAMClaim");
    }
}
