//! The CNI contract of whereabouts-rs, end to end through [`whereabouts_cni::run`]:
//! (environment variables, stdin) in, (stdout JSON, exit code) out, for every command and every
//! supported spec version.
//!
//! The host is an in-memory file map (flat files, node name files) and the store is the embedded file
//! store in a temporary directory, so every test is hermetic. Outputs are parsed with serde_json and
//! compared as whole values.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::Path;

use proptest::prelude::*;
use serde_json::{Value, json};
use tempfile::TempDir;
use whereabouts_cni::{Host, Reply, run};
use whereabouts_core::config::LogSettings;

// === the host ===

/// A host whose file system is a map; paths listed in `denied` fail with `PermissionDenied`.
#[derive(Debug, Default, Clone)]
struct MemHost {
    files: HashMap<String, Vec<u8>>,
    denied: HashSet<String>,
}

impl MemHost {
    fn with_file(mut self, path: &str, content: impl Into<Vec<u8>>) -> Self {
        self.files.insert(path.to_string(), content.into());
        self
    }

    fn deny(mut self, path: &str) -> Self {
        self.denied.insert(path.to_string());
        self
    }
}

impl Host for MemHost {
    fn read_file(&self, path: &str) -> io::Result<Vec<u8>> {
        if self.denied.contains(path) {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        self.files.get(path).cloned().ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    fn init_logging(&self, _settings: &LogSettings) {}
}

// === constants ===

const VERSIONS: [&str; 7] = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
const LEGACY: [&str; 2] = ["0.1.0", "0.2.0"];
const VERSIONED: [&str; 3] = ["0.3.0", "0.3.1", "0.4.0"];
const CURRENT: [&str; 2] = ["1.0.0", "1.1.0"];
const FLAT_FILE: &str = "/etc/cni/net.d/whereabouts.d/whereabouts.conf";
const FIRST_FLAT_FILE: &str = "/etc/kubernetes/cni/net.d/whereabouts.d/whereabouts.conf";

/// The result layout a version uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// 0.1.0 / 0.2.0: `ip4` / `ip6`.
    Legacy,
    /// 0.3.x / 0.4.0: `ips` with `version`, `dns` always present.
    Versioned,
    /// 1.x: `ips` without `version`, `dns` only when set.
    Current,
}

fn layout(version: &str) -> Layout {
    if LEGACY.contains(&version) {
        Layout::Legacy
    } else if VERSIONED.contains(&version) {
        Layout::Versioned
    } else {
        assert!(CURRENT.contains(&version), "unknown version {version}");
        Layout::Current
    }
}

// === the environment ===

/// The CNI environment of one call.
#[derive(Debug, Clone, Default)]
struct Env(HashMap<String, String>);

impl Env {
    /// Only `CNI_COMMAND`.
    fn command(command: &str) -> Self {
        Env::default().set("CNI_COMMAND", command)
    }

    /// A command with everything ADD/CHECK/DEL need, for container `id` on `eth0`.
    fn attachment(command: &str, id: &str) -> Self {
        Env::command(command)
            .set("CNI_CONTAINERID", id)
            .set("CNI_NETNS", &format!("/var/run/netns/{id}"))
            .set("CNI_IFNAME", "eth0")
            .set("CNI_PATH", "/opt/cni/bin")
    }

    fn add(id: &str) -> Self {
        Env::attachment("ADD", id)
    }

    fn del(id: &str) -> Self {
        Env::attachment("DEL", id)
    }

    fn check(id: &str) -> Self {
        Env::attachment("CHECK", id)
    }

    fn gc() -> Self {
        Env::command("GC").set("CNI_PATH", "/opt/cni/bin")
    }

    fn status() -> Self {
        Env::command("STATUS").set("CNI_PATH", "/opt/cni/bin")
    }

    /// `CNI_ARGS` as Kubernetes runtimes send it, for pod `ns/<name>`.
    fn pod(self, name: &str) -> Self {
        self.set("CNI_ARGS", &format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME={name}"))
    }

    fn node(self, name: &str) -> Self {
        self.set("NODENAME", name)
    }

    fn ifname(self, name: &str) -> Self {
        self.set("CNI_IFNAME", name)
    }

    fn set(mut self, key: &str, value: &str) -> Self {
        self.0.insert(key.to_string(), value.to_string());
        self
    }

    fn unset(mut self, key: &str) -> Self {
        self.0.remove(key);
        self
    }
}

// === the network configuration ===

/// A network configuration (stdin).
#[derive(Debug, Clone)]
struct Conf(Value);

impl Conf {
    /// Network `net` with a whereabouts ipam on `192.0.2.0/24`, stored in `store`.
    fn new(version: &str, store: &Path) -> Self {
        Conf(json!({
            "cniVersion": version,
            "name": "net",
            "type": "macvlan",
            "master": "eth0",
            "ipam": {
                "type": "whereabouts",
                "datastore": "file",
                "file_store_dir": store.to_str().expect("utf-8 temp dir"),
                "range": "192.0.2.0/24",
            },
        }))
    }

    /// Sets a top-level key.
    fn set(mut self, key: &str, value: Value) -> Self {
        self.0[key] = value;
        self
    }

    /// Removes a top-level key.
    fn unset(mut self, key: &str) -> Self {
        self.0.as_object_mut().expect("object").remove(key);
        self
    }

    /// Sets an `ipam` key.
    fn ipam(mut self, key: &str, value: Value) -> Self {
        self.0["ipam"][key] = value;
        self
    }

    /// Removes an `ipam` key.
    fn ipam_unset(mut self, key: &str) -> Self {
        self.0["ipam"].as_object_mut().expect("ipam object").remove(key);
        self
    }

    /// With `prevResult` (CHECK).
    fn prev(self, result: &Value) -> Self {
        self.set("prevResult", result.clone())
    }

    fn bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&self.0).expect("serialisable")
    }
}

// === replies ===

fn parse(reply: &Reply) -> Value {
    serde_json::from_str(&reply.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", reply.stdout))
}

/// A success with a JSON document.
fn success(reply: &Reply) -> Value {
    assert_eq!(reply.exit_code, 0, "expected success, got {}", reply.stdout);
    parse(reply)
}

/// A success with empty stdout.
fn silent(reply: &Reply) {
    assert_eq!((reply.exit_code, reply.stdout.as_str()), (0, ""), "expected a silent success");
}

/// A failure: exit code 1 and an error object.
fn failure(reply: &Reply) -> Value {
    assert_eq!(reply.exit_code, 1, "expected failure, got {}", reply.stdout);
    let error = parse(reply);
    assert!(error["code"].is_u64(), "code is an integer: {error}");
    assert!(error["msg"].is_string(), "msg is a string: {error}");
    error
}

/// A failure with `code`; returns `msg`.
fn failure_code(reply: &Reply, cni_version: &str, code: u64) -> String {
    let error = failure(reply);
    assert_eq!(error["code"], code, "{error}");
    assert_eq!(error["cniVersion"], cni_version, "{error}");
    error["msg"].as_str().expect("string msg").to_string()
}

/// The spec's error object.
fn error_json(cni_version: &str, code: u64, msg: &str) -> Value {
    json!({ "cniVersion": cni_version, "code": code, "msg": msg })
}

/// The first address of a 0.3+ result (without the prefix).
fn first_ip(result: &Value) -> String {
    let address = result["ips"][0]["address"].as_str().unwrap_or_else(|| panic!("no ips in {result}"));
    address.split('/').next().expect("address").to_string()
}

// === the fixture ===

/// A store directory and a host.
struct Fx {
    dir: TempDir,
    host: MemHost,
}

impl Fx {
    fn new() -> Self {
        Fx::with_host(MemHost::default())
    }

    fn with_host(host: MemHost) -> Self {
        Fx { dir: tempfile::tempdir().expect("temp dir"), host }
    }

    fn store(&self) -> &Path {
        self.dir.path()
    }

    fn store_str(&self) -> &str {
        self.store().to_str().expect("utf-8 temp dir")
    }

    fn conf(&self, version: &str) -> Conf {
        Conf::new(version, self.store())
    }

    async fn run(&self, env: &Env, conf: &Conf) -> Reply {
        run(&env.0, &conf.bytes(), &self.host).await
    }

    async fn run_raw(&self, env: &Env, stdin: &[u8]) -> Reply {
        run(&env.0, stdin, &self.host).await
    }

    /// A successful ADD; returns the result.
    async fn add(&self, conf: &Conf, env: Env) -> Value {
        success(&self.run(&env, conf).await)
    }

    /// A successful ADD of container `id` for pod `ns/<pod>`; returns its first address.
    async fn add_pod(&self, conf: &Conf, id: &str, pod: &str) -> String {
        first_ip(&self.add(conf, Env::add(id).pod(pod)).await)
    }

    /// A successful DEL of container `id` on `eth0`.
    async fn del(&self, conf: &Conf, id: &str) {
        silent(&self.run(&Env::del(id), conf).await);
    }
}

// === 1. environment ===

#[tokio::test]
async fn version_lists_supported_versions_whatever_stdin() {
    let fx = Fx::new();
    let expected = json!({ "cniVersion": "1.1.0", "supportedVersions": VERSIONS });
    let stdins: [&[u8]; 3] = [b"", b"not json", &fx.conf("0.3.1").bytes()];
    for stdin in stdins {
        let reply = fx.run_raw(&Env::command("VERSION"), stdin).await;
        assert_eq!(success(&reply), expected);
    }
}

#[tokio::test]
async fn missing_cni_command_is_code_4() {
    let fx = Fx::new();
    let reply = fx.run(&Env::add("c1").unset("CNI_COMMAND"), &fx.conf("1.0.0")).await;
    assert_eq!(failure(&reply), error_json("1.1.0", 4, "required env variables [CNI_COMMAND] missing"));
}

#[tokio::test]
async fn unknown_command_is_code_4_naming_it() {
    let fx = Fx::new();
    for command in ["FOO", "add", ""] {
        let reply = fx.run(&Env::attachment(command, "c1"), &fx.conf("1.0.0")).await;
        assert_eq!(failure(&reply), error_json("1.1.0", 4, &format!("unknown CNI_COMMAND: {command}")));
    }
}

#[tokio::test]
async fn missing_required_variables_are_code_4() {
    let fx = Fx::new();
    let conf = fx.conf("1.1.0");
    let all = ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"];
    let cases: &[(&str, &[&str], &str)] = &[
        ("ADD", &["CNI_CONTAINERID"], "[CNI_CONTAINERID]"),
        ("ADD", &["CNI_NETNS"], "[CNI_NETNS]"),
        ("ADD", &["CNI_IFNAME"], "[CNI_IFNAME]"),
        ("ADD", &["CNI_PATH"], "[CNI_PATH]"),
        ("ADD", &all, "[CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME,CNI_PATH]"),
        ("CHECK", &["CNI_NETNS"], "[CNI_NETNS]"),
        ("CHECK", &all, "[CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME,CNI_PATH]"),
        ("DEL", &all, "[CNI_CONTAINERID,CNI_IFNAME,CNI_PATH]"),
        ("DEL", &["CNI_IFNAME"], "[CNI_IFNAME]"),
        ("GC", &all, "[CNI_PATH]"),
        ("STATUS", &all, "[CNI_PATH]"),
    ];
    for (command, removed, listed) in cases {
        let expected = error_json("1.1.0", 4, &format!("required env variables {listed} missing"));
        let without = removed.iter().fold(Env::attachment(command, "c1"), |env, key| env.unset(key));
        assert_eq!(failure(&fx.run(&without, &conf).await), expected, "{command} without {removed:?}");
        // An empty value counts as missing.
        let empty = removed.iter().fold(Env::attachment(command, "c1"), |env, key| env.set(key, ""));
        assert_eq!(failure(&fx.run(&empty, &conf).await), expected, "{command} with empty {removed:?}");
    }
}

#[tokio::test]
async fn del_without_netns_and_gc_status_with_only_cni_path_are_fine() {
    let fx = Fx::new();
    let conf = fx.conf("1.1.0");
    fx.add(&conf, Env::add("c1")).await;
    silent(&fx.run(&Env::del("c1").unset("CNI_NETNS"), &conf).await);
    silent(
        &fx.run(&Env::gc().node("node-a"), &conf.clone().set("cni.dev/valid-attachments", json!([]))).await,
    );
    silent(&fx.run(&Env::status(), &conf).await);
}

#[tokio::test]
async fn bad_container_ids_are_code_4_with_details() {
    let fx = Fx::new();
    let conf = fx.conf("1.0.0");
    for id in ["-abc", "_abc", ".abc", "a b", "a/b", "a:b", "caf\u{e9}", "a\nb"] {
        for env in [Env::add(id), Env::del(id), Env::check(id)] {
            let reply = fx.run(&env, &conf).await;
            assert_eq!(
                failure(&reply),
                json!({
                    "cniVersion": "1.1.0",
                    "code": 4,
                    "msg": "invalid characters in containerID",
                    "details": id,
                }),
                "{id:?}"
            );
        }
    }
    // The whole allowed alphabet is accepted.
    fx.add(&conf, Env::add("Aa0_.-z9")).await;
}

#[tokio::test]
async fn bad_interface_names_are_code_4() {
    let fx = Fx::new();
    let conf = fx.conf("1.0.0");
    let long = "a".repeat(16);
    let cases = [
        ("", "required env variables [CNI_IFNAME] missing".to_string()),
        (long.as_str(), format!("interface name {long:?} is longer than 15 characters")),
        (".", "interface name \".\" is not a valid name".to_string()),
        ("..", "interface name \"..\" is not a valid name".to_string()),
    ];
    let forbidden = ["eth/0", "eth:0", "eth 0", "eth\t0", " eth0"]
        .map(|n| (n, format!("interface name {n:?} contains '/', ':' or white space")));
    for (ifname, msg) in cases.into_iter().chain(forbidden) {
        for env in [Env::add("c1"), Env::del("c1"), Env::check("c1")] {
            let reply = fx.run(&env.ifname(ifname), &conf).await;
            assert_eq!(failure(&reply), error_json("1.1.0", 4, &msg), "{ifname:?}");
        }
    }
    // 15 characters is the limit.
    fx.add(&conf, Env::add("c1").ifname(&"b".repeat(15))).await;
}

// === 2. stdin and configuration ===

#[tokio::test]
async fn stdin_that_is_not_a_network_config_is_code_6() {
    let fx = Fx::new();
    let stdins: [&[u8]; 5] = [
        b"",
        b"not json",
        b"{\"name\": \"net\"",
        b"{\"cniVersion\": \"1.0.0\", \"name\": 5, \"ipam\": {}}",
        b"[1, 2]",
    ];
    for command in ["ADD", "DEL", "CHECK", "GC", "STATUS"] {
        for stdin in stdins {
            let msg = failure_code(&fx.run_raw(&Env::attachment(command, "c1"), stdin).await, "1.1.0", 6);
            assert!(msg.starts_with("error unmarshall network config: "), "{msg}");
        }
    }
}

#[tokio::test]
async fn missing_or_invalid_network_name_is_code_7() {
    let fx = Fx::new();
    for version in VERSIONS {
        for conf in [fx.conf(version).unset("name"), fx.conf(version).set("name", json!(""))] {
            let reply = fx.run(&Env::add("c1"), &conf).await;
            assert_eq!(failure(&reply), error_json(version, 7, "missing network name"));
        }
        for name in ["my net", "-net", "net/1", "n\u{e9}t"] {
            let reply = fx.run(&Env::del("c1"), &fx.conf(version).set("name", json!(name))).await;
            assert_eq!(
                failure(&reply),
                json!({
                    "cniVersion": version,
                    "code": 7,
                    "msg": "invalid characters found in network name",
                    "details": name,
                })
            );
        }
    }
}

/// Go's decoder (the CNI library's `skel`) leaves a field at its default for `null`: `"name": null` is
/// "missing network name" (code 7) and `"cniVersion": null` means 0.1.0. `run` refuses both as
/// undecodable stdin (code 6).
/// The top level is decoded like Go does: keys case-insensitively, the last duplicate winning.
#[tokio::test]
async fn top_level_keys_are_matched_case_insensitively() {
    let fx = Fx::new();
    let conf = fx.conf("1.0.0");
    let mut text = serde_json::to_string(&conf.0).expect("json");
    text = text.replacen("\"ipam\"", "\"IPAM\"", 1).replacen("\"cniVersion\"", "\"CNIVERSION\"", 1);
    text = text.replacen('{', "{\"name\":\"first\",", 1);
    let reply = fx.run_raw(&Env::add("c1"), text.as_bytes()).await;
    assert_eq!(success(&reply), json!({ "cniVersion": "1.0.0", "ips": [{ "address": "192.0.2.1/24" }] }));
}

#[tokio::test]
async fn null_name_and_version_are_treated_as_absent() {
    let fx = Fx::new();
    let reply = fx.run(&Env::add("c1"), &fx.conf("1.0.0").set("name", Value::Null)).await;
    assert_eq!(failure(&reply), error_json("1.0.0", 7, "missing network name"));
    let result = fx.add(&fx.conf("").set("cniVersion", Value::Null), Env::add("c1")).await;
    assert_eq!(result["ip4"]["ip"], "192.0.2.1/24", "{result}");
}

#[tokio::test]
async fn unsupported_cni_version_is_code_1() {
    let fx = Fx::new();
    for version in ["9.9.9", "1.2.0", "0.3", "v1.0.0", "1.0.0 "] {
        for command in ["ADD", "DEL", "CHECK", "GC", "STATUS"] {
            let reply = fx.run(&Env::attachment(command, "c1"), &fx.conf(version)).await;
            assert_eq!(
                failure(&reply),
                json!({
                    "cniVersion": version,
                    "code": 1,
                    "msg": "incompatible CNI versions",
                    "details": format!(
                        "config is {version:?}, plugin supports [\"0.1.0\", \"0.2.0\", \"0.3.0\", \
                         \"0.3.1\", \"0.4.0\", \"1.0.0\", \"1.1.0\"]"
                    ),
                })
            );
        }
    }
}

#[tokio::test]
async fn absent_cni_version_means_0_1_0() {
    let fx = Fx::new();
    let conf = fx.conf("").unset("cniVersion");
    let result = fx.add(&conf, Env::add("c1")).await;
    assert_eq!(result, json!({ "cniVersion": "", "ip4": { "ip": "192.0.2.1/24" }, "dns": {} }));
    let reply = fx.run(&Env::check("c1"), &conf.prev(&result)).await;
    assert_eq!(failure(&reply), error_json("1.1.0", 1, "config version does not allow CHECK"));
}

#[tokio::test]
async fn cni_versions_list_picks_the_highest_supported_version_when_cni_version_is_absent() {
    let fx = Fx::new();
    let conf = fx.conf("").unset("cniVersion").set("cniVersions", json!(["0.3.1", "1.0.0", "9.9.9"]));
    let result = fx.add(&conf, Env::add("c1")).await;
    assert_eq!(result, json!({ "cniVersion": "1.0.0", "ips": [{ "address": "192.0.2.1/24" }] }));
    let none_supported = fx.conf("").unset("cniVersion").set("cniVersions", json!(["9.9.9"]));
    let reply = fx.run(&Env::add("c2"), &none_supported).await;
    assert_eq!(failure(&reply)["code"], 1);
}

#[tokio::test]
async fn commands_refused_by_old_versions_are_code_1() {
    let fx = Fx::new();
    for version in VERSIONS {
        let conf = fx.conf(version);
        let mut refused = Vec::new();
        if ["0.1.0", "0.2.0", "0.3.0", "0.3.1"].contains(&version) {
            refused.push((Env::check("c1"), "CHECK"));
        }
        if version != "1.1.0" {
            refused.push((Env::gc().node("node-a"), "GC"));
            refused.push((Env::status(), "STATUS"));
        }
        for (env, what) in refused {
            let reply = fx.run(&env, &conf).await;
            assert_eq!(
                failure(&reply),
                error_json(version, 1, &format!("config version does not allow {what}")),
            );
        }
    }
}

#[tokio::test]
async fn missing_ipam_is_code_7() {
    let fx = Fx::new();
    for version in VERSIONS {
        for conf in [fx.conf(version).unset("ipam"), fx.conf(version).set("ipam", Value::Null)] {
            for env in [Env::add("c1"), Env::del("c1")] {
                assert_eq!(
                    failure(&fx.run(&env, &conf).await),
                    error_json(version, 7, "IPAM config missing 'ipam' key")
                );
            }
        }
    }
}

#[tokio::test]
async fn ipam_type_other_than_whereabouts_is_code_7() {
    let fx = Fx::new();
    for version in VERSIONS {
        for (value, shown) in
            [(json!("host-local"), "host-local"), (json!("Whereabouts"), "Whereabouts"), (json!(""), "")]
        {
            let reply = fx.run(&Env::add("c1"), &fx.conf(version).ipam("type", value)).await;
            assert_eq!(
                failure(&reply),
                error_json(
                    version,
                    7,
                    &format!(
                        "invalid ipam.type {shown:?}: only networks whose IPAM type is 'whereabouts' are handled"
                    )
                )
            );
        }
        let reply = fx.run(&Env::add("c1"), &fx.conf(version).ipam_unset("type")).await;
        assert_eq!(
            failure_code(&reply, version, 7),
            "invalid ipam.type \"\": only networks whose IPAM type is 'whereabouts' are handled"
        );
    }
}

#[tokio::test]
async fn invalid_config_values_are_code_7_naming_key_and_value() {
    let fx = Fx::new();
    let v6 = |extra: Value| {
        let mut entry = json!({ "range": "2001:db8::/64" });
        entry.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
        json!([entry])
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        ("range", json!("banana"), "invalid range \"banana\": not a CIDR"),
        (
            "range",
            json!("192.0.2.1/32"),
            "invalid range \"192.0.2.1/32\": the subnet has no usable addresses",
        ),
        (
            "range",
            json!("192.0.3.5-192.0.2.25/28"),
            "invalid range \"192.0.3.5-192.0.2.25/28\": range start 192.0.3.5 is outside 192.0.2.16/28",
        ),
        ("range_start", json!("192.0.3.1"), "invalid range_start \"192.0.3.1\": outside 192.0.2.0/24"),
        ("range_start", json!("nope"), "invalid range_start \"nope\": not an IP address"),
        ("gateway", json!("10.9.9.9"), "invalid gateway \"10.9.9.9\": lies outside every range"),
        ("gateway", json!("nope"), "invalid gateway \"nope\": not an IP address"),
        ("exclude", json!(["bad"]), "invalid exclude[0] \"bad\": not a CIDR or an IP address"),
        (
            "exclude",
            json!(["2001:db8::/120"]),
            "invalid exclude[0] \"2001:db8::/120\": not of the address family of 192.0.2.0/24",
        ),
        (
            "ipRanges",
            v6(json!({ "range_start": "2001:db9::1" })),
            "invalid ipRanges[0].range_start \"2001:db9::1\": outside 2001:db8::/64",
        ),
        (
            "ipRanges",
            json!([{ "range": "192.0.2.128/25" }]),
            "invalid ipRanges \"192.0.2.128/25\": overlaps 192.0.2.0/24; every range of a network must be disjoint",
        ),
        ("ipRanges", json!([{}]), "invalid ipRanges[0].range \"\": a range is required"),
        ("routes", json!([{ "dst": "nope" }]), "invalid routes[0].dst \"nope\": not a CIDR"),
        (
            "routes",
            json!([{ "dst": "0.0.0.0/0", "gw": "nope" }]),
            "invalid routes[0].gw \"nope\": not an IP address",
        ),
        ("addresses", json!([{ "address": "x" }]), "invalid addresses[0].address \"x\": not a CIDR"),
    ];
    for version in VERSIONS {
        for (key, value, msg) in &cases {
            let conf = fx.conf(version).ipam(key, value.clone());
            let reply = fx.run(&Env::add("c1"), &conf).await;
            assert_eq!(failure(&reply), error_json(version, 7, msg), "{key} = {value}");
            // The DEL that follows a refused ADD must succeed, or the sandbox could never be removed.
            silent(&fx.run(&Env::del("c1"), &conf).await);
        }
    }
}

#[tokio::test]
async fn wrongly_typed_config_values_are_code_6() {
    let fx = Fx::new();
    for (key, value, path) in [
        ("range", json!(5), "range"),
        ("enable_overlapping_ranges", json!("true"), "enable_overlapping_ranges"),
        ("routes", json!({}), "routes"),
        ("leader_lease_duration", json!("1500"), "leader_lease_duration"),
    ] {
        let reply = fx.run(&Env::add("c1"), &fx.conf("0.4.0").ipam(key, value)).await;
        let msg = failure_code(&reply, "0.4.0", 6);
        assert!(msg.starts_with(&format!("ipam: JSON parsing error: {path}: ")), "{msg}");
    }
    let reply = fx.run(&Env::add("c1"), &fx.conf("0.4.0").set("ipam", json!("whereabouts"))).await;
    let msg = failure_code(&reply, "0.4.0", 6);
    assert!(msg.starts_with("ipam: JSON parsing error"), "{msg}");
}

/// Node slices need the Kubernetes store (code 2 with any other), a valid `node_slice_size` and the
/// node name (code 7, before the store is contacted); STATUS says "not available" for all of these, and
/// the DEL after any of these refused ADDs succeeds. The slices themselves: `kube_node_slices.rs`.
#[tokio::test]
async fn node_slices_need_the_kubernetes_store_a_valid_size_and_the_node_name() {
    let fx = Fx::new();
    let on_file = fx.conf("1.1.0").ipam("node_slice_size", json!("/28"));
    let on_etcd = on_file.clone().ipam("datastore", json!("etcd")).ipam("etcd_host", json!("127.0.0.1:1"));
    for conf in [&on_file, &on_etcd] {
        let msg = failure_code(&fx.run(&Env::add("c1").node("n1"), conf).await, "1.1.0", 2);
        assert!(msg.contains("node_slice_size") && msg.contains("kubernetes datastore"), "{msg}");
        failure_code(&fx.run(&Env::status(), conf).await, "1.1.0", 50);
    }
    fx.del(&on_file, "c1").await;

    // An API server nobody answers for (port 1 on loopback): what is refused is refused before.
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = unreachable_kubeconfig(dir.path());
    let on_kube = fx
        .conf("1.1.0")
        .ipam("datastore", json!("kubernetes"))
        .ipam("kubernetes", json!({ "kubeconfig": kubeconfig }))
        .ipam("configuration_path", json!("/etc/cni/net.d/whereabouts.d"))
        .ipam("node_slice_size", json!("/28"));
    let msg = failure_code(&fx.run(&Env::add("c1").pod("p1"), &on_kube).await, "1.1.0", 7);
    assert!(msg.contains("NODENAME") && msg.contains("/etc/cni/net.d/whereabouts.d/nodename"), "{msg}");
    failure_code(&fx.run(&Env::status(), &on_kube).await, "1.1.0", 50);
    fx.del(&on_kube, "c1").await;

    let too_large = on_kube.clone().ipam("node_slice_size", json!("/16"));
    let msg = failure_code(&fx.run(&Env::add("c1").pod("p1").node("n1"), &too_large).await, "1.1.0", 7);
    assert!(msg.starts_with("invalid node_slice_size \"/16\""), "{msg}");
    silent(&fx.run(&Env::del("c1").node("n1"), &too_large).await);

    // With everything in place ADD reads the NodeSlicePool, DEL lists the IPPools (for this node's
    // pools of its slices); nobody answers: try again later, naming what was read.
    let msg = failure_code(&fx.run(&Env::add("c1").pod("p1").node("n1"), &on_kube).await, "1.1.0", 11);
    assert!(msg.contains("NodeSlicePool wb/net"), "{msg}");
    let msg = failure_code(&fx.run(&Env::del("c1").node("n1"), &on_kube).await, "1.1.0", 11);
    assert!(msg.contains("IPPools in wb"), "{msg}");
}

/// A kubeconfig for an API server nobody answers for (port 1 on loopback refuses connections), in
/// namespace `wb`.
fn unreachable_kubeconfig(dir: &std::path::Path) -> std::path::PathBuf {
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
         clusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]\n\
         users: [{name: u, user: {token: t}}]\n\
         contexts: [{name: c, context: {cluster: c, user: u, namespace: wb}}]\n",
    )
    .expect("write kubeconfig");
    kubeconfig
}

/// The Kubernetes store: an unreadable kubeconfig is a configuration error naming the key and path, an
/// API server nobody answers for is "try again later" naming the pool, and an ADD without a pod is
/// refused (the controller would free its address at once). Port 1 on loopback refuses connections.
#[tokio::test]
async fn kubernetes_store_errors_name_what_is_wrong() {
    let fx = Fx::new();
    let missing = fx
        .conf("1.0.0")
        .ipam("datastore", json!("kubernetes"))
        .ipam("kubernetes", json!({ "kubeconfig": "/nonexistent/whereabouts.kubeconfig" }));
    let msg = failure_code(&fx.run(&Env::add("c1").pod("p1"), &missing).await, "1.0.0", 7);
    assert!(
        msg.contains("kubernetes.kubeconfig") && msg.contains("/nonexistent/whereabouts.kubeconfig"),
        "{msg}"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = unreachable_kubeconfig(dir.path());
    let unreachable = fx
        .conf("1.0.0")
        .ipam("datastore", json!("kubernetes"))
        .ipam("kubernetes", json!({ "kubeconfig": kubeconfig }));
    // The plugin keeps trying an unreachable store until its call's budget is spent: 1 s here.
    let within_a_second = Env::add("c1").pod("p1").set(whereabouts_cni::BUDGET_ENV, "1");
    let msg = failure_code(&fx.run(&within_a_second, &unreachable).await, "1.0.0", 11);
    assert!(msg.contains("IPPool wb/"), "{msg}");

    let msg = failure_code(&fx.run(&Env::add("c1"), &unreachable).await, "1.0.0", 4);
    assert!(msg.contains("K8S_POD_NAME"), "{msg}");
}

/// An etcd nobody answers for is "try again later" naming `etcd_host`, never a fallback to the file
/// store. (Port 1 on loopback refuses connections.)
#[tokio::test]
async fn an_unreachable_etcd_is_try_again_later_naming_etcd_host() {
    let fx = Fx::new();
    let conf = fx.conf("1.0.0").ipam("datastore", json!("etcd")).ipam("etcd_host", json!("127.0.0.1:1"));
    for env in [Env::add("c1"), Env::del("c1")] {
        // The plugin keeps trying an unreachable store until its call's budget is spent: 1 s here.
        let env = env.set(whereabouts_cni::BUDGET_ENV, "1");
        let msg = failure_code(&fx.run(&env, &conf).await, "1.0.0", 11);
        assert!(msg.contains("etcd_host") && msg.contains("127.0.0.1:1"), "{msg}");
    }
}

// === 3. ADD result shapes ===

/// The expected ADD result for `version` from parts common to all layouts.
struct Expected {
    /// (address with prefix, gateway) in result order.
    ips: Vec<(&'static str, Option<&'static str>)>,
    /// Routes as the 1.x result shows them.
    routes: Vec<Value>,
    /// DNS as the result shows it (`{}` when unset).
    dns: Value,
}

impl Expected {
    fn json(&self, version: &str) -> Value {
        let layout = layout(version);
        let mut out = json!({ "cniVersion": version });
        if layout == Layout::Legacy {
            for (key, v6) in [("ip4", false), ("ip6", true)] {
                let Some((address, gateway)) = self.ips.iter().find(|(a, _)| a.contains(':') == v6) else {
                    continue;
                };
                let mut entry = json!({ "ip": address });
                if let Some(gw) = gateway {
                    entry["gateway"] = json!(gw);
                }
                let routes: Vec<Value> = self
                    .routes
                    .iter()
                    .filter(|r| r["dst"].as_str().is_some_and(|d| d.contains(':') == v6))
                    .map(|r| {
                        let mut legacy = json!({ "dst": r["dst"] });
                        if !r["gw"].is_null() {
                            legacy["gw"] = r["gw"].clone();
                        }
                        legacy
                    })
                    .collect();
                if !routes.is_empty() {
                    entry["routes"] = json!(routes);
                }
                out[key] = entry;
            }
            out["dns"] = self.dns.clone();
            return out;
        }
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|(address, gateway)| {
                let mut entry = json!({ "address": address });
                if layout == Layout::Versioned {
                    entry["version"] = json!(if address.contains(':') { "6" } else { "4" });
                }
                if let Some(gw) = gateway {
                    entry["gateway"] = json!(gw);
                }
                entry
            })
            .collect();
        out["ips"] = json!(ips);
        if !self.routes.is_empty() {
            out["routes"] = json!(self.routes);
        }
        if layout == Layout::Versioned || self.dns != json!({}) {
            out["dns"] = self.dns.clone();
        }
        out
    }
}

/// ADDs with `conf(version)` for every version (fresh store each) and compares with `expected`.
async fn assert_add_shapes(make: impl Fn(&Fx, &str) -> Conf, expected: &Expected) {
    for version in VERSIONS {
        let fx = Fx::new();
        let result = fx.add(&make(&fx, version), Env::add("c1").pod("p")).await;
        assert_eq!(result, expected.json(version), "cniVersion {version}");
    }
}

#[tokio::test]
async fn add_ipv4_every_version() {
    assert_add_shapes(
        |fx, v| {
            fx.conf(v)
                .ipam("gateway", json!("192.0.2.1"))
                .ipam("routes", json!([{ "dst": "0.0.0.0/0", "gw": "192.0.2.1" }]))
        },
        &Expected {
            ips: vec![("192.0.2.2/24", Some("192.0.2.1"))],
            routes: vec![json!({ "dst": "0.0.0.0/0", "gw": "192.0.2.1" })],
            dns: json!({}),
        },
    )
    .await;
    // Without gateway, routes and dns: the bare minimum of each layout.
    for version in VERSIONS {
        let fx = Fx::new();
        let result = fx.add(&fx.conf(version), Env::add("c1")).await;
        let expected = match layout(version) {
            Layout::Legacy => json!({ "cniVersion": version, "ip4": { "ip": "192.0.2.1/24" }, "dns": {} }),
            Layout::Versioned => json!({
                "cniVersion": version,
                "ips": [{ "version": "4", "address": "192.0.2.1/24" }],
                "dns": {},
            }),
            Layout::Current => json!({ "cniVersion": version, "ips": [{ "address": "192.0.2.1/24" }] }),
        };
        assert_eq!(result, expected, "{version}");
    }
}

#[tokio::test]
async fn add_ipv6_every_version() {
    assert_add_shapes(
        |fx, v| {
            fx.conf(v)
                .ipam("range", json!("2001:db8::/64"))
                .ipam("gateway", json!("2001:db8::1"))
                .ipam("routes", json!([{ "dst": "::/0", "gw": "2001:db8::1" }]))
                .ipam("dns", json!({ "nameservers": ["2001:db8::53"] }))
        },
        &Expected {
            ips: vec![("2001:db8::2/64", Some("2001:db8::1"))],
            routes: vec![json!({ "dst": "::/0", "gw": "2001:db8::1" })],
            dns: json!({ "nameservers": ["2001:db8::53"] }),
        },
    )
    .await;
}

#[tokio::test]
async fn add_dual_stack_every_version() {
    assert_add_shapes(
        |fx, v| {
            fx.conf(v)
                .ipam("ipRanges", json!([{ "range": "2001:db8::/64" }]))
                .ipam("gateway", json!("192.0.2.1"))
                .ipam(
                    "routes",
                    json!([
                        { "dst": "0.0.0.0/0", "gw": "192.0.2.1" },
                        { "dst": "2001:db8:1::/48", "gw": "2001:db8::ffff" },
                        { "dst": "198.51.100.0/24" },
                    ]),
                )
                .ipam(
                    "dns",
                    json!({
                        "nameservers": ["192.0.2.53"],
                        "domain": "example.org",
                        "search": ["example.org", "example.net"],
                        "options": ["ndots:2"],
                    }),
                )
        },
        &Expected {
            // The v4 gateway only on the address of the range that contains it.
            ips: vec![("192.0.2.2/24", Some("192.0.2.1")), ("2001:db8::1/64", None)],
            routes: vec![
                json!({ "dst": "0.0.0.0/0", "gw": "192.0.2.1" }),
                json!({ "dst": "2001:db8:1::/48", "gw": "2001:db8::ffff" }),
                json!({ "dst": "198.51.100.0/24" }),
            ],
            dns: json!({
                "nameservers": ["192.0.2.53"],
                "domain": "example.org",
                "search": ["example.org", "example.net"],
                "options": ["ndots:2"],
            }),
        },
    )
    .await;
}

#[tokio::test]
async fn add_ip_ranges_only_in_order() {
    assert_add_shapes(
        |fx, v| {
            fx.conf(v).ipam_unset("range").ipam(
                "ipRanges",
                json!([
                    { "range": "2001:db8::/64", "range_start": "2001:db8::10" },
                    { "range": "198.51.100.0/24", "exclude": ["198.51.100.0/30"] },
                ]),
            )
        },
        &Expected {
            ips: vec![("2001:db8::10/64", None), ("198.51.100.4/24", None)],
            routes: vec![],
            dns: json!({}),
        },
    )
    .await;
}

#[tokio::test]
async fn add_static_addresses_follow_allocated_ones() {
    for version in VERSIONS {
        let fx = Fx::new();
        let conf = fx
            .conf(version)
            .ipam("ipRanges", json!([{ "range": "2001:db8::/64" }]))
            .ipam("gateway", json!("198.51.100.1"))
            .ipam(
                "addresses",
                json!([
                    { "address": "198.51.100.7/24" },
                    { "address": "2001:db8:5::7/64", "gateway": "2001:db8:5::1" },
                ]),
            );
        let expected = Expected {
            // The gateway belongs to the static subnet, so only the static address carries it.
            ips: vec![
                ("192.0.2.1/24", None),
                ("2001:db8::1/64", None),
                ("198.51.100.7/24", Some("198.51.100.1")),
                ("2001:db8:5::7/64", Some("2001:db8:5::1")),
            ],
            routes: vec![],
            dns: json!({}),
        };
        assert_eq!(fx.add(&conf, Env::add("c1")).await, expected.json(version), "{version}");
    }
}

#[tokio::test]
async fn add_route_attributes_per_layout() {
    let routes = json!([
        { "dst": "10.0.0.0/8", "gw": "192.0.2.254", "mtu": 1400, "table": 100 },
        { "dst": "2001:db8:9::1/64", "advmss": 1300, "priority": 5, "scope": 253 },
    ]);
    for version in VERSIONS {
        let fx = Fx::new();
        let result = fx.add(&fx.conf(version).ipam("routes", routes.clone()), Env::add("c1")).await;
        let expected = match layout(version) {
            // Only dst and gw survive the conversion, and only routes of a family with an address.
            Layout::Legacy => json!({
                "cniVersion": version,
                "ip4": { "ip": "192.0.2.1/24", "routes": [{ "dst": "10.0.0.0/8", "gw": "192.0.2.254" }] },
                "dns": {},
            }),
            // As upstream (the CNI library's shared Route type): the attributes are kept in 0.3/0.4
            // results too (shared/upstream-behaviour.md §2.3 step 5).
            Layout::Versioned => json!({
                "cniVersion": version,
                "ips": [{ "version": "4", "address": "192.0.2.1/24" }],
                "routes": routes,
                "dns": {},
            }),
            Layout::Current => json!({
                "cniVersion": version,
                "ips": [{ "address": "192.0.2.1/24" }],
                "routes": routes,
            }),
        };
        assert_eq!(result, expected, "{version}");
    }
}

/// A configuration with nothing to assign answers an error naming the keys, not an empty success
/// that leaves the pod an interface without an address.
#[tokio::test]
async fn add_without_any_address_is_code_7() {
    for version in VERSIONS {
        let fx = Fx::new();
        let conf = fx.conf(version).ipam_unset("range");
        let msg = failure_code(&fx.run(&Env::add("c1"), &conf).await, version, 7);
        assert_eq!(
            msg,
            "invalid range \"\": nothing to assign: set range, ipRanges or addresses (or request an address outside any range)"
        );
        // Its DEL has nothing to do and succeeds.
        silent(&fx.run(&Env::del("c1"), &conf).await);
    }
}

#[tokio::test]
async fn legacy_versions_refuse_two_static_addresses_of_one_family() {
    for version in LEGACY {
        let fx = Fx::new();
        let conf = fx
            .conf(version)
            .ipam("addresses", json!([{ "address": "198.51.100.7/24" }, { "address": "198.51.100.8/24" }]));
        let msg = failure_code(&fx.run(&Env::add("c1"), &conf).await, version, 7);
        assert_eq!(
            msg,
            format!("invalid cniVersion {version:?}: does not support more than one static IPv4 address")
        );
    }
}

// === 4. ADD idempotency ===

#[tokio::test]
async fn same_pod_and_interface_get_the_same_address_again() {
    for version in ["0.3.1", "1.1.0"] {
        let fx = Fx::new();
        let conf = fx.conf(version);
        assert_eq!(fx.add_pod(&conf, "c1", "p").await, "192.0.2.1");
        // The same pod again (restarted sandbox: new container ID).
        assert_eq!(fx.add_pod(&conf, "c2", "p").await, "192.0.2.1");
        assert_eq!(fx.add_pod(&conf, "c2", "p").await, "192.0.2.1");
        // Another pod gets the next address; another interface of the same pod too.
        assert_eq!(fx.add_pod(&conf, "c3", "q").await, "192.0.2.2");
        let net1 = fx.add(&conf, Env::add("c2").pod("p").ifname("net1")).await;
        assert_eq!(first_ip(&net1), "192.0.2.3");
        // The old container ID no longer owns the address: deleting it frees nothing.
        fx.del(&conf, "c1").await;
        assert_eq!(fx.add_pod(&conf, "c4", "r").await, "192.0.2.4");
        // The current one does.
        fx.del(&conf, "c2").await;
        assert_eq!(fx.add_pod(&conf, "c5", "s").await, "192.0.2.1");
    }
}

#[tokio::test]
async fn plain_containers_are_told_apart_by_container_id() {
    let fx = Fx::new();
    let conf = fx.conf("1.0.0");
    let first = first_ip(&fx.add(&conf, Env::add("c1")).await);
    let second = first_ip(&fx.add(&conf, Env::add("c2")).await);
    assert_eq!((first.as_str(), second.as_str()), ("192.0.2.1", "192.0.2.2"));
    // The same container again is idempotent.
    assert_eq!(first_ip(&fx.add(&conf, Env::add("c1")).await), "192.0.2.1");
}

#[tokio::test]
async fn bad_cni_args_are_code_4() {
    let fx = Fx::new();
    let cases = [
        ("K8S_POD_NAME=p;", "CNI_ARGS: invalid pair \"\""),
        ("K8S_POD_NAME=a=b", "CNI_ARGS: invalid pair \"K8S_POD_NAME=a=b\""),
        ("K8S_POD_NAME", "CNI_ARGS: invalid pair \"K8S_POD_NAME\""),
        ("K8S_POD_UID=x", "CNI_ARGS: unknown args [\"K8S_POD_UID=x\"]"),
        (
            "IgnoreUnknown=maybe;K8S_POD_NAME=p",
            "CNI_ARGS: error parsing value of pair \"IgnoreUnknown=maybe\": boolean unmarshal error: invalid input",
        ),
        (
            "IgnoreUnknown=1;IP=192.0.2.x",
            "CNI_ARGS: invalid address in IP \"192.0.2.x\": expected an IP address or a CIDR",
        ),
        ("GATEWAY=nope", "CNI_ARGS: invalid gateway address \"nope\""),
    ];
    for version in VERSIONS {
        for (args, msg) in cases {
            let reply = fx.run(&Env::add("c1").set("CNI_ARGS", args), &fx.conf(version)).await;
            assert_eq!(failure(&reply), error_json(version, 4, msg), "{args}");
            // DEL does not need CNI_ARGS, so a bad one never keeps a sandbox from being torn down.
            silent(&fx.run(&Env::del("c1").set("CNI_ARGS", args), &fx.conf(version)).await);
        }
    }
}

// === 5. requested addresses ===

/// The three ways to ask for an address.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// The `ips` capability.
    RuntimeConfig,
    /// `args.cni.ips` in the network configuration.
    ArgsCni,
    /// `IP=` in `CNI_ARGS`.
    CniArgs,
}

const SOURCES: [Source; 3] = [Source::RuntimeConfig, Source::ArgsCni, Source::CniArgs];

/// `conf` and an ADD environment for container `id` of pod `ns/<pod>` asking for `ip` through `source`.
fn request(conf: Conf, source: Source, ip: &str, id: &str, pod: &str) -> (Conf, Env) {
    let env = Env::add(id).pod(pod);
    match source {
        Source::RuntimeConfig => (conf.set("runtimeConfig", json!({ "ips": [ip] })), env),
        Source::ArgsCni => (conf.set("args", json!({ "cni": { "ips": [ip] } })), env),
        Source::CniArgs => {
            let args = format!("{};IP={ip}", env.0["CNI_ARGS"]);
            (conf, env.set("CNI_ARGS", &args))
        }
    }
}

#[tokio::test]
async fn requested_addresses_are_returned() {
    for version in VERSIONS {
        for source in SOURCES {
            let fx = Fx::new();
            let (conf, env) = request(fx.conf(version), source, "192.0.2.50/24", "c1", "a");
            let expected = Expected { ips: vec![("192.0.2.50/24", None)], routes: vec![], dns: json!({}) };
            assert_eq!(fx.add(&conf, env).await, expected.json(version), "{source:?} {version}");
        }
    }
}

#[tokio::test]
async fn requested_addresses_outside_every_range_are_static() {
    for source in SOURCES {
        let fx = Fx::new();
        let (conf, env) = request(fx.conf("1.0.0"), source, "198.51.100.9/24", "c1", "a");
        assert_eq!(
            fx.add(&conf, env).await,
            json!({
                "cniVersion": "1.0.0",
                "ips": [{ "address": "192.0.2.1/24" }, { "address": "198.51.100.9/24" }],
            }),
            "{source:?}"
        );
    }
}

#[tokio::test]
async fn requested_addresses_are_reserved() {
    for source in SOURCES {
        let fx = Fx::new();
        // Candidates 192.0.2.49 - 192.0.2.54.
        let plain = fx.conf("1.1.0").ipam("range", json!("192.0.2.48/29"));
        let (conf, env) = request(plain.clone(), source, "192.0.2.50/29", "ca", "a");
        assert_eq!(first_ip(&fx.add(&conf, env).await), "192.0.2.50", "{source:?}");
        // Asking again is idempotent.
        let (conf, env) = request(plain.clone(), source, "192.0.2.50/29", "ca2", "a");
        assert_eq!(first_ip(&fx.add(&conf, env).await), "192.0.2.50", "{source:?}");
        // Another pod asking for it is refused, naming the holder.
        let (conf, env) = request(plain.clone(), source, "192.0.2.50/29", "cb", "b");
        assert_eq!(
            failure(&fx.run(&env, &conf).await),
            error_json(
                "1.1.0",
                999,
                "pool 192.0.2.48-29: requested address 192.0.2.50 is already allocated to ns/a"
            ),
            "{source:?}"
        );
        // Pods not asking never receive it, down to exhaustion.
        let mut got = Vec::new();
        for n in 0..5 {
            got.push(fx.add_pod(&plain, &format!("c{n}"), &format!("p{n}")).await);
        }
        assert_eq!(got, ["192.0.2.49", "192.0.2.51", "192.0.2.52", "192.0.2.53", "192.0.2.54"]);
        assert_eq!(
            failure(&fx.run(&Env::add("c9").pod("p9"), &plain).await),
            error_json(
                "1.1.0",
                999,
                "pool 192.0.2.48-29: no free address in range 192.0.2.49 - 192.0.2.54 in 192.0.2.48/29 excluding []"
            )
        );
        // Once the holder is deleted, the address is free again.
        fx.del(&plain, "ca2").await;
        assert_eq!(fx.add_pod(&plain, "c9", "p9").await, "192.0.2.50");
    }
}

#[tokio::test]
async fn add_is_all_or_nothing_across_ranges() {
    let fx = Fx::new();
    let one_v6 =
        json!([{ "range": "2001:db8::/64", "range_start": "2001:db8::5", "range_end": "2001:db8::5" }]);
    let dual = fx.conf("1.0.0").ipam("ipRanges", one_v6);
    fx.add(&dual, Env::add("a")).await;
    assert_eq!(
        failure(&fx.run(&Env::add("b"), &dual).await),
        error_json(
            "1.0.0",
            999,
            "pool 2001-db8---64: no free address in range 2001:db8::5 - 2001:db8::5 in 2001:db8::/64 excluding []"
        )
    );
    // The IPv4 address b took before the IPv6 range failed was given back.
    assert_eq!(first_ip(&fx.add(&fx.conf("1.0.0"), Env::add("c")).await), "192.0.2.2");
}

// === 6. DEL ===

#[tokio::test]
async fn del_frees_the_address_every_version() {
    for version in VERSIONS {
        let fx = Fx::new();
        let conf = fx.conf(version).ipam("ipRanges", json!([{ "range": "2001:db8::/64" }]));
        let plain = |id: &str| Env::add(id).pod(id);
        fx.add(&conf, plain("a")).await;
        fx.add(&conf, plain("b")).await;
        fx.del(&conf, "a").await;
        let next = fx
            .add(&fx.conf("1.0.0").ipam("ipRanges", json!([{ "range": "2001:db8::/64" }])), plain("c"))
            .await;
        assert_eq!(
            next,
            json!({
                "cniVersion": "1.0.0",
                "ips": [{ "address": "192.0.2.1/24" }, { "address": "2001:db8::1/64" }],
            }),
            "{version}"
        );
    }
}

#[tokio::test]
async fn del_of_unknown_containers_and_twice_succeeds() {
    for version in VERSIONS {
        let fx = Fx::new();
        let conf = fx.conf(version);
        fx.del(&conf, "never-added").await;
        fx.add(&conf, Env::add("c1")).await;
        fx.del(&conf, "c1").await;
        fx.del(&conf, "c1").await;
        // Another interface of the container is not touched by DEL of eth0.
        fx.add(&conf, Env::add("c2").ifname("net1")).await;
        fx.del(&conf, "c2").await;
        assert_eq!(first_ip(&fx.add(&fx.conf("1.0.0"), Env::add("c3")).await), "192.0.2.2");
    }
}

#[tokio::test]
async fn del_when_the_store_directory_was_deleted_succeeds() {
    let fx = Fx::new();
    let conf = fx.conf("0.3.1");
    fx.add(&conf, Env::add("c1")).await;
    std::fs::remove_dir_all(fx.store()).expect("remove store");
    fx.del(&conf, "c1").await;
    fx.del(&conf, "c1").await;
}

// === 7. CHECK ===

#[tokio::test]
async fn check_accepts_the_result_of_add() {
    for version in ["0.4.0", "1.0.0", "1.1.0"] {
        let fx = Fx::new();
        let conf = fx.conf(version).ipam("ipRanges", json!([{ "range": "2001:db8::/64" }]));
        let result = fx.add(&conf, Env::add("c1").pod("p")).await;
        silent(&fx.run(&Env::check("c1").pod("p"), &conf.clone().prev(&result)).await);
        // Also after an idempotent re-ADD under a new container ID.
        let again = fx.add(&conf, Env::add("c2").pod("p")).await;
        assert_eq!(again, result);
        silent(&fx.run(&Env::check("c2").pod("p"), &conf.prev(&again)).await);
    }
}

#[tokio::test]
async fn check_reports_what_differs() {
    for version in ["0.4.0", "1.0.0"] {
        let fx = Fx::new();
        let conf = fx.conf(version);
        let result = fx.add(&conf, Env::add("c1")).await;
        let listing = |addresses: &[&str]| {
            let ips: Vec<Value> = addresses.iter().map(|a| json!({ "address": a })).collect();
            json!({ "cniVersion": version, "ips": ips })
        };
        let cases = [
            (
                listing(&["192.0.2.9/24"]),
                "the store holds 192.0.2.1 in range 192.0.2.0/24, but prevResult does not list it",
            ),
            (
                listing(&["192.0.2.1/24", "192.0.2.9/24"]),
                "prevResult lists 192.0.2.9 in range 192.0.2.0/24, but the store holds 192.0.2.1",
            ),
            (
                json!({ "cniVersion": version }),
                "the store holds 192.0.2.1 in range 192.0.2.0/24, but prevResult does not list it",
            ),
        ];
        for (prev, msg) in cases {
            let reply = fx.run(&Env::check("c1"), &conf.clone().prev(&prev)).await;
            assert_eq!(failure(&reply), error_json(version, 999, msg), "{prev}");
        }
        // No prevResult at all.
        for conf in [conf.clone(), conf.clone().set("prevResult", Value::Null)] {
            let reply = fx.run(&Env::check("c1"), &conf).await;
            assert_eq!(failure(&reply), error_json(version, 7, "CHECK needs prevResult"));
        }
        // A container without allocation (never added, or deleted).
        let reply = fx.run(&Env::check("c9"), &conf.clone().prev(&result)).await;
        assert_eq!(
            failure(&reply),
            error_json(version, 999, "no allocation for container c9 interface eth0 in range 192.0.2.0/24")
        );
        fx.del(&conf, "c1").await;
        let reply = fx.run(&Env::check("c1"), &conf.prev(&result)).await;
        assert_eq!(
            failure(&reply),
            error_json(version, 999, "no allocation for container c1 interface eth0 in range 192.0.2.0/24")
        );
    }
}

/// A static address inside a range's network is part of ADD's result and must not make CHECK take it
/// for a second allocation.
#[tokio::test]
async fn check_accepts_static_addresses_inside_a_range_network() {
    let fx = Fx::new();
    let conf = fx.conf("1.0.0").ipam("addresses", json!([{ "address": "192.0.2.200/24" }]));
    let result = fx.add(&conf, Env::add("c1")).await;
    assert_eq!(result["ips"].as_array().map(Vec::len), Some(2), "{result}");
    silent(&fx.run(&Env::check("c1"), &conf.prev(&result)).await);
}

/// A dynamic interval carved out of a subnet leaves the rest for fixed addresses: an address asked
/// for outside range_start..range_end or inside exclude is given and recorded, so a second claimant is
/// refused and the dynamic pick never hands it out; the subnet's broadcast address is refused.
#[tokio::test]
async fn requested_addresses_outside_the_dynamic_interval_are_reserved() {
    let fx = Fx::new();
    let carved =
        fx.conf("1.0.0").ipam("range_start", json!("192.0.2.100")).ipam("exclude", json!(["192.0.2.128/25"]));
    for (ip, id) in [("192.0.2.10", "c1"), ("192.0.2.130/24", "c2")] {
        let (conf, env) = request(carved.clone(), Source::CniArgs, ip, id, id);
        assert_eq!(first_ip(&fx.add(&conf, env).await), ip.trim_end_matches("/24"));
        let (conf, env) = request(carved.clone(), Source::RuntimeConfig, ip, "other", "other");
        assert_eq!(failure(&fx.run(&env, &conf).await)["code"], 999, "{ip} is held");
    }
    assert_eq!(fx.add_pod(&carved, "c3", "c3").await, "192.0.2.100");
    let conf = carved.clone().set("runtimeConfig", json!({ "ips": ["192.0.2.255/24"] }));
    let msg = failure_code(&fx.run(&Env::add("c4"), &conf).await, "1.0.0", 7);
    assert_eq!(msg, "invalid runtimeConfig.ips \"192.0.2.255/24\": is the broadcast address of 192.0.2.0/24");
    silent(&fx.run(&Env::del("c4"), &conf).await);
}

/// podman's `--ip` sends a bare address in `CNI_ARGS` `IP=`, and may send the same one through the
/// `ips` capability as well.
#[tokio::test]
async fn bare_and_repeated_requested_addresses_are_one_request() {
    let fx = Fx::new();
    let env = Env::add("c1").set("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web;IP=192.0.2.50");
    let conf = fx.conf("1.0.0").set("runtimeConfig", json!({ "ips": ["192.0.2.50/24"] }));
    assert_eq!(
        fx.add(&conf, env).await,
        json!({ "cniVersion": "1.0.0", "ips": [{ "address": "192.0.2.50/24" }] })
    );
}

/// Runtimes outside Kubernetes pass a container name as K8S_POD_NAME and no namespace; two containers
/// of one name (two podman storage roots on one network) are two attachments.
#[tokio::test]
async fn containers_named_alike_without_a_namespace_are_told_apart() {
    let fx = Fx::new();
    let conf = fx.conf("1.0.0");
    let named = |id: &str| Env::add(id).set("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=web");
    assert_eq!(first_ip(&fx.add(&conf, named("root1-web")).await), "192.0.2.1");
    assert_eq!(first_ip(&fx.add(&conf, named("root2-web")).await), "192.0.2.2");
    assert_eq!(first_ip(&fx.add(&conf, named("root1-web")).await), "192.0.2.1", "idempotent");
    // Removing one frees its address only.
    fx.del(&conf, "root1-web").await;
    assert_eq!(first_ip(&fx.add(&conf, named("root2-web")).await), "192.0.2.2");
    assert_eq!(first_ip(&fx.add(&conf, named("root3-web")).await), "192.0.2.1");
}

/// Dual stack behind a bridge with isGateway: each ipRanges entry may carry its own gateway, returned
/// with that range's address and never handed out.
#[tokio::test]
async fn each_range_returns_its_own_gateway() {
    let fx = Fx::new();
    let conf = fx
        .conf("1.0.0")
        .ipam("gateway", json!("192.0.2.1"))
        .ipam("ipRanges", json!([{ "range": "2001:db8::/64", "gateway": "2001:db8::1" }]));
    assert_eq!(
        fx.add(&conf, Env::add("c1")).await,
        json!({
            "cniVersion": "1.0.0",
            "ips": [
                { "address": "192.0.2.2/24", "gateway": "192.0.2.1" },
                { "address": "2001:db8::2/64", "gateway": "2001:db8::1" },
            ],
        })
    );
    let conf = conf.ipam("ipRanges", json!([{ "range": "2001:db8::/64", "gateway": "2001:db9::1" }]));
    let msg = failure_code(&fx.run(&Env::add("c2"), &conf).await, "1.0.0", 7);
    assert_eq!(
        msg,
        "invalid ipRanges[0].gateway \"2001:db9::1\": lies outside the range's network 2001:db8::/64"
    );
}

// === 8. GC ===

#[tokio::test]
async fn gc_releases_only_this_nodes_stale_attachments_of_this_network() {
    let fx = Fx::new();
    let conf = fx.conf("1.1.0");
    let other_network = conf.clone().set("name", json!("other"));
    let on = |id: &str, node: &str| Env::add(id).pod(id).node(node);
    assert_eq!(first_ip(&fx.add(&conf, on("stale", "node-a")).await), "192.0.2.1");
    assert_eq!(first_ip(&fx.add(&conf, on("valid", "node-a")).await), "192.0.2.2");
    assert_eq!(first_ip(&fx.add(&conf, on("remote", "node-b")).await), "192.0.2.3");
    assert_eq!(first_ip(&fx.add(&other_network, on("foreign", "node-a")).await), "192.0.2.4");
    // A valid container ID on another interface is stale too.
    let stale_if = fx.add(&conf, on("valid", "node-a").ifname("net1")).await;
    assert_eq!(first_ip(&stale_if), "192.0.2.5");

    let gc = conf.clone().set(
        "cni.dev/valid-attachments",
        json!([{ "containerID": "valid", "ifname": "eth0" }, { "containerID": "gone", "ifname": "eth0" }]),
    );
    silent(&fx.run(&Env::gc().node("node-a"), &gc).await);
    silent(&fx.run(&Env::gc().node("node-a"), &gc).await);

    // Exactly .1 and .5 were released.
    let mut got = Vec::new();
    for id in ["n1", "n2", "n3"] {
        got.push(first_ip(&fx.add(&conf, on(id, "node-a")).await));
    }
    assert_eq!(got, ["192.0.2.1", "192.0.2.5", "192.0.2.6"]);
    // The kept attachments still CHECK.
    let valid = fx.add(&conf, on("valid", "node-a")).await;
    assert_eq!(first_ip(&valid), "192.0.2.2");
    silent(&fx.run(&Env::check("valid").pod("valid"), &conf.clone().prev(&valid)).await);
}

#[tokio::test]
async fn gc_with_an_empty_list_releases_everything_of_this_node() {
    let fx = Fx::new();
    let conf = fx.conf("1.1.0").ipam("ipRanges", json!([{ "range": "2001:db8::/64" }]));
    fx.add(&conf, Env::add("a").node("node-a")).await;
    fx.add(&conf, Env::add("b").node("node-b")).await;
    silent(
        &fx.run(&Env::gc().node("node-a"), &conf.clone().set("cni.dev/valid-attachments", json!([]))).await,
    );
    assert_eq!(
        fx.add(&conf, Env::add("c").node("node-a")).await,
        json!({ "cniVersion": "1.1.0", "ips": [{ "address": "192.0.2.1/24" }, { "address": "2001:db8::1/64" }] })
    );
    assert_eq!(first_ip(&fx.add(&conf, Env::add("d").node("node-a")).await), "192.0.2.3");
}

#[tokio::test]
async fn gc_finds_the_node_name_in_etc_hostname() {
    let fx = Fx::with_host(MemHost::default().with_file("/etc/hostname", "node-a\n"));
    let conf = fx.conf("1.1.0");
    fx.add(&conf, Env::add("a")).await;
    silent(&fx.run(&Env::gc(), &conf.clone().set("cni.dev/valid-attachments", json!([]))).await);
    assert_eq!(first_ip(&fx.add(&conf, Env::add("b")).await), "192.0.2.1");
}

#[tokio::test]
async fn gc_finds_the_node_name_in_the_configuration_path() {
    let store = tempfile::tempdir().expect("temp dir");
    let flat = json!({
        "datastore": "file",
        "file_store_dir": store.path().to_str().expect("utf-8"),
        "configuration_path": "/etc/cni/net.d/whereabouts.d",
    });
    let host = MemHost::default()
        .with_file(FLAT_FILE, flat.to_string())
        .with_file("/etc/cni/net.d/whereabouts.d/nodename", "node-z\n")
        .with_file("/etc/hostname", "ignored");
    let fx = Fx::with_host(host);
    let conf = incomplete(fx.conf("1.1.0"));
    fx.add(&conf, Env::add("a")).await;
    // An allocation made where no node name could be found is never collected.
    let anonymous = Fx::new();
    let anon_conf = anonymous.conf("1.1.0").ipam("file_store_dir", json!(store.path().to_str()));
    assert_eq!(first_ip(&anonymous.add(&anon_conf, Env::add("b")).await), "192.0.2.2");
    silent(&fx.run(&Env::gc(), &conf.clone().set("cni.dev/valid-attachments", json!([]))).await);
    assert_eq!(first_ip(&fx.add(&conf, Env::add("c")).await), "192.0.2.1");
    assert_eq!(first_ip(&fx.add(&conf, Env::add("d")).await), "192.0.2.3");
}

/// Without any attachment list nothing is known to be valid, which is not the same as "nothing is":
/// GC refuses rather than release every allocation of the node. The list's first name (spec 1.1.0 as
/// first published, `cni.dev/attachments`) counts too.
#[tokio::test]
async fn gc_needs_an_attachment_list_under_either_name() {
    let fx = Fx::new();
    let conf = fx.conf("1.1.0");
    fx.add(&conf, Env::add("a").node("node-a")).await;
    assert_eq!(failure(&fx.run(&Env::gc().node("node-a"), &conf).await)["code"], 7);
    let listed = json!([{ "containerID": "a", "ifname": "eth0" }]);
    silent(&fx.run(&Env::gc().node("node-a"), &conf.clone().set("cni.dev/attachments", listed)).await);
    assert_eq!(first_ip(&fx.add(&conf, Env::add("b")).await), "192.0.2.2", "a is still held");
}

#[tokio::test]
async fn gc_without_a_node_name_fails() {
    let fx = Fx::new();
    let conf = fx.conf("1.1.0");
    for env in [Env::gc(), Env::gc().node(""), Env::gc().node("  ")] {
        let reply = fx.run(&env, &conf).await;
        assert_eq!(
            failure(&reply),
            error_json("1.1.0", 7, "GC needs the node name (NODENAME or /etc/hostname)")
        );
    }
}

// === 9. STATUS ===

#[tokio::test]
async fn status_reports_exhausted_pools() {
    let fx = Fx::new();
    let conf = fx
        .conf("1.1.0")
        .ipam("range", json!("192.0.2.0/30"))
        .ipam("ipRanges", json!([{ "range": "2001:db8::/64" }]));
    silent(&fx.run(&Env::status(), &conf).await);
    fx.add(&conf, Env::add("a")).await;
    silent(&fx.run(&Env::status(), &conf).await);
    fx.add(&conf, Env::add("b")).await;
    let reply = fx.run(&Env::status(), &conf).await;
    assert_eq!(failure(&reply), error_json("1.1.0", 50, "no free address in pool 192.0.2.0-30"));
    fx.del(&conf, "a").await;
    silent(&fx.run(&Env::status(), &conf).await);
}

#[tokio::test]
async fn status_reports_an_unusable_store_as_not_available() {
    let fx = Fx::new();
    // A file where the store directory should be: the store cannot be opened.
    let blocker = fx.store().join("not-a-dir");
    std::fs::write(&blocker, b"").expect("write");
    let conf = fx.conf("1.1.0").ipam("file_store_dir", json!(blocker.join("store")));
    assert_eq!(failure(&fx.run(&Env::status(), &conf).await)["code"], 50);
    let kubernetes = fx
        .conf("1.1.0")
        .ipam("datastore", json!("kubernetes"))
        .ipam("kubernetes", json!({"kubeconfig": "/k"}));
    assert_eq!(failure(&fx.run(&Env::status(), &kubernetes).await)["code"], 50);
}

// === 10. flat file ===

fn flat_file(store: &str) -> String {
    json!({ "datastore": "file", "file_store_dir": store }).to_string()
}

/// An inline ipam without any store setting.
fn incomplete(conf: Conf) -> Conf {
    conf.ipam_unset("datastore").ipam_unset("file_store_dir")
}

#[tokio::test]
async fn flat_file_completes_the_inline_config() {
    let store = tempfile::tempdir().expect("temp dir");
    let store = store.path().to_str().expect("utf-8").to_string();
    let fx = Fx::with_host(MemHost::default().with_file(FLAT_FILE, flat_file(&store)));
    let conf = incomplete(fx.conf("1.0.0"));
    assert_eq!(
        fx.add(&conf, Env::add("c1")).await,
        json!({ "cniVersion": "1.0.0", "ips": [{ "address": "192.0.2.1/24" }] })
    );
    assert!(Path::new(&store).join("pools").is_dir(), "allocations live in the flat file's store");
    assert_eq!(first_ip(&fx.add(&conf, Env::add("c2")).await), "192.0.2.2");
    fx.del(&conf, "c1").await;
}

#[tokio::test]
async fn inline_configuration_path_is_tried_first() {
    let custom = "/custom/whereabouts.conf";
    let fx = Fx::new();
    let custom_flat =
        json!({ "datastore": "file", "file_store_dir": fx.store_str(), "range": "10.0.0.0/24" });
    let host = MemHost::default()
        .with_file(FIRST_FLAT_FILE, json!({ "range": "10.9.0.0/24" }).to_string())
        .with_file(custom, custom_flat.to_string());
    let fx = Fx { host, ..fx };
    let conf = incomplete(fx.conf("1.0.0")).ipam_unset("range").ipam("configuration_path", json!(custom));
    assert_eq!(
        fx.add(&conf, Env::add("c1")).await,
        json!({ "cniVersion": "1.0.0", "ips": [{ "address": "10.0.0.1/24" }] })
    );
}

#[tokio::test]
async fn unreadable_flat_file_is_code_5() {
    for denied in [FIRST_FLAT_FILE, FLAT_FILE] {
        let host = MemHost::default().deny(denied).with_file(FLAT_FILE, flat_file("/nonexistent"));
        let fx = Fx::with_host(host);
        // Even a complete inline config does not skip a flat file that exists.
        for conf in [incomplete(fx.conf("0.4.0")), fx.conf("0.4.0")] {
            let reply = fx.run(&Env::add("c1"), &conf).await;
            assert_eq!(
                failure(&reply),
                error_json(
                    "0.4.0",
                    5,
                    &format!("error opening flat configuration file @ {denied} with: permission denied")
                )
            );
        }
    }
}

#[tokio::test]
async fn broken_flat_file_is_code_6() {
    for content in ["{\"datastore\": ", "[]", "{\"range\": 5}"] {
        let fx = Fx::with_host(MemHost::default().with_file(FLAT_FILE, content));
        let reply = fx.run(&Env::add("c1"), &incomplete(fx.conf("1.1.0"))).await;
        let msg = failure_code(&reply, "1.1.0", 6);
        assert!(msg.starts_with(&format!("flat file {FLAT_FILE}: JSON parsing error: ")), "{msg}");
    }
}

#[tokio::test]
async fn flat_file_values_are_validated_after_the_merge() {
    let fx = Fx::with_host(MemHost::default().with_file(FLAT_FILE, flat_file("/nonexistent")));
    for (key, value, msg) in [
        (
            "datastore",
            json!("mongo"),
            "invalid datastore \"mongo\": expected \"file\", \"kubernetes\" or \"etcd\"",
        ),
        ("range", json!("banana"), "invalid range \"banana\": not a CIDR"),
    ] {
        let reply = fx.run(&Env::add("c1"), &incomplete(fx.conf("0.3.0")).ipam(key, value)).await;
        assert_eq!(failure(&reply), error_json("0.3.0", 7, msg), "{key}");
    }
}

#[tokio::test]
async fn no_flat_file_and_incomplete_inline_is_code_7() {
    let fx = Fx::new();
    for version in VERSIONS {
        for env in [Env::add("c1"), Env::del("c1")] {
            let reply = fx.run(&env, &incomplete(fx.conf(version))).await;
            assert_eq!(failure(&reply), error_json(version, 7, "config file not found"));
        }
    }
}

// === 11. no input makes it panic or print garbage ===

/// Everything `run` prints is a silent success, a JSON success, or an error object.
fn assert_well_formed(reply: &Reply) -> Result<(), TestCaseError> {
    match reply.exit_code {
        0 if reply.stdout.is_empty() => Ok(()),
        0 => {
            let value: Value = serde_json::from_str(&reply.stdout)
                .map_err(|e| TestCaseError::fail(format!("success stdout is not JSON: {e}")))?;
            prop_assert!(value.is_object(), "{value}");
            Ok(())
        }
        1 => {
            let value: Value = serde_json::from_str(&reply.stdout)
                .map_err(|e| TestCaseError::fail(format!("error stdout is not JSON: {e}")))?;
            prop_assert!(value["code"].is_u64(), "{value}");
            prop_assert!(value["msg"].is_string(), "{value}");
            Ok(())
        }
        other => Err(TestCaseError::fail(format!("exit code {other}: {}", reply.stdout))),
    }
}

fn cni_args() -> impl Strategy<Value = String> {
    let pair = prop_oneof![
        Just("IgnoreUnknown=1".to_string()),
        "K8S_POD_NAME=[a-z=;]{0,6}",
        "K8S_POD_NAMESPACE=.{0,6}",
        "IP=[0-9./:a-f,]{0,20}",
        "GATEWAY=[0-9.:a-f]{0,12}",
        ".{0,12}",
    ];
    prop_oneof![".{0,64}", proptest::collection::vec(pair, 0..5).prop_map(|p| p.join(";"))]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn run_never_panics_and_always_answers_in_shape(
        command in prop::sample::select(vec!["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "BOGUS"]),
        version in prop::sample::select(VERSIONS.to_vec()),
        kind in 0u8..3,
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        args in cni_args(),
    ) {
        let fx = Fx::new();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let stdin = match kind {
            // Arbitrary bytes.
            0 => bytes,
            // A valid configuration whose range is arbitrary text.
            1 => fx.conf(version).ipam("range", json!(text)).bytes(),
            // A valid configuration asking for an arbitrary address.
            _ => fx.conf(version).set("runtimeConfig", json!({ "ips": [text] })).bytes(),
        };
        let env = Env::attachment(command, "c1").set("CNI_ARGS", &args).node("node-a");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let reply = runtime.block_on(fx.run_raw(&env, &stdin));
        assert_well_formed(&reply)?;
    }
}
