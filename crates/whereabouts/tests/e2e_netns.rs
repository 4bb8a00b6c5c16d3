//! End-to-end tests in real network namespaces: the Debian reference plugins (`bridge`, `macvlan`
//! from `/usr/lib/cni`) are executed exactly as a container runtime would, and they execute our
//! `whereabouts` binary as their IPAM plugin through `CNI_PATH`.
//!
//! Each test creates two namespaces, attaches both (ADD), checks that the addresses in the CNI results
//! are the lowest free ones, that they are configured on `eth0` inside the namespaces and that the
//! namespaces reach each other (ping, v4 and v6), runs CHECK, detaches both (DEL, twice, as the spec
//! allows) and checks that the file store holds no allocation and no reservation any more.
//!
//! Needs root, iproute2, ping and `/usr/lib/cni/{bridge,macvlan}`. Without them a test prints why
//! and passes, unless `CI` is set, where it fails. Only documentation ranges are used, every name
//! carries the process id and a counter, and everything is removed by Drop guards, also on failure.

mod e2e_support;

mod support {
    use std::collections::BTreeSet;
    use std::net::IpAddr;
    use std::path::Path;
    use std::process::{Command, Output, Stdio};
    use std::time::{Duration, Instant};

    use serde_json::{Value, json};

    use crate::e2e_support::{
        CNI_DIR, HostLink, Sandbox, address_part, have_tool, is_root, output, ready_or_skip, run, unique,
    };

    /// Whether this machine can run the tests (see [`ready_or_skip`]).
    pub fn preflight(plugin: &str) -> bool {
        let plugin_path = Path::new(CNI_DIR).join(plugin);
        let problem = if !is_root() {
            Some("not running as root".to_string())
        } else if !plugin_path.is_file() {
            Some(format!("{} is missing", plugin_path.display()))
        } else if !have_tool("ip") || !have_tool("ping") {
            Some("iproute2 or iputils-ping is missing".to_string())
        } else {
            None
        };
        ready_or_skip("e2e_netns", problem)
    }

    /// A network namespace, deleted on drop.
    #[derive(Debug)]
    pub struct Netns {
        pub name: String,
    }

    impl Netns {
        /// Creates a namespace with loopback up and IPv6 duplicate address detection off (so that
        /// addresses are usable at once; set before ADD so that `eth0` inherits it).
        pub fn new() -> Self {
            let name = unique("wbe2e-");
            run("ip", &["netns", "add", &name]);
            let ns = Netns { name };
            run("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
            ns.exec(&[
                "sysctl",
                "-q",
                "-w",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ]);
            ns
        }

        pub fn path(&self) -> String {
            format!("/var/run/netns/{}", self.name)
        }

        /// Runs a command inside the namespace; it must succeed.
        pub fn exec(&self, args: &[&str]) -> String {
            let mut full = vec!["netns", "exec", &self.name];
            full.extend_from_slice(args);
            run("ip", &full)
        }

        /// The global addresses on `ifname`, as `ip/prefix`, and whether any is still tentative.
        pub fn global_addresses(&self, ifname: &str) -> (BTreeSet<String>, bool) {
            let json = run("ip", &["-j", "-n", &self.name, "addr", "show", "dev", ifname]);
            let links: Value = serde_json::from_str(&json).expect("ip -j prints JSON");
            let mut addrs = BTreeSet::new();
            let mut tentative = false;
            for info in links[0]["addr_info"].as_array().into_iter().flatten() {
                if info["scope"] != "global" {
                    continue;
                }
                let local = info["local"].as_str().expect("addr_info.local");
                let prefix = info["prefixlen"].as_u64().expect("addr_info.prefixlen");
                addrs.insert(format!("{local}/{prefix}"));
                tentative |= info["tentative"] == true;
            }
            (addrs, tentative)
        }

        /// The global addresses on `ifname` once none is tentative (DAD is off, so this is a
        /// safety net), waiting up to 5 s.
        pub fn settled_addresses(&self, ifname: &str) -> BTreeSet<String> {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let (addrs, tentative) = self.global_addresses(ifname);
                if !tentative {
                    return addrs;
                }
                assert!(Instant::now() < deadline, "{}: addresses stay tentative: {addrs:?}", self.name);
                std::thread::sleep(Duration::from_millis(100));
            }
        }

        /// Pings `target` (which must be in another namespace of this test) from here.
        pub fn ping(&self, target: IpAddr) {
            let family = if target.is_ipv6() { "-6" } else { "-4" };
            let target = target.to_string();
            let args = ["netns", "exec", &self.name, "ping", family, "-n", "-c", "1", "-W", "2", &target];
            let mut last = None;
            for _ in 0..3 {
                let out = output("ip", &args);
                if out.status.success() {
                    return;
                }
                last = Some(out);
            }
            let out = last.expect("at least one attempt");
            panic!(
                "ping from {} to {target} failed:\n{}{}",
                self.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = output("ip", &["netns", "del", &self.name]);
        }
    }

    /// Creates a dummy link to be a macvlan master and sets it up. Kernels built without the
    /// dummy driver get an empty bridge instead (no ports, no address): to macvlan it is the
    /// same isolated lower device.
    fn macvlan_master() -> HostLink {
        let link = HostLink::named("wbd");
        let dummy = output("ip", &["link", "add", &link.name, "type", "dummy"]);
        if !dummy.status.success() {
            eprintln!(
                "e2e_netns: no dummy links here ({}); using an empty bridge as macvlan master",
                String::from_utf8_lossy(&dummy.stderr).trim()
            );
            run("ip", &["link", "add", &link.name, "type", "bridge"]);
        }
        run("ip", &["link", "set", &link.name, "up"]);
        link
    }

    /// One attachment: a container (namespace) with its id and pod.
    #[derive(Debug)]
    pub struct Attachment {
        pub netns: Netns,
        pub container_id: String,
        pub pod_namespace: String,
        pub pod_name: String,
    }

    impl Attachment {
        pub fn new() -> Self {
            let netns = Netns::new();
            let tag = netns.name.trim_start_matches("wbe2e-").to_string();
            Attachment {
                netns,
                container_id: format!("e2e-container-{tag}"),
                pod_namespace: "e2e".to_string(),
                pod_name: format!("pod-{tag}"),
            }
        }

        pub fn podref(&self) -> String {
            format!("{}/{}", self.pod_namespace, self.pod_name)
        }
    }

    /// Executes a reference plugin the way a runtime does.
    #[derive(Debug)]
    pub struct Plugin<'a> {
        pub name: &'a str,
        pub sandbox: &'a Sandbox,
        /// The network configuration, `ipam` included.
        pub conf: Value,
    }

    impl Plugin<'_> {
        /// Runs `command`; `prev_result` goes into the configuration as runtimes do for CHECK/DEL.
        pub fn exec(&self, command: &str, att: &Attachment, prev_result: Option<&Value>) -> Output {
            let mut conf = self.conf.clone();
            if let Some(prev) = prev_result {
                conf["prevResult"] = prev.clone();
            }
            // The reference plugins refuse unknown CNI_ARGS unless IgnoreUnknown is set, which the
            // Kubernetes runtimes always do.
            let cni_args = format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
                att.pod_namespace, att.pod_name, att.container_id
            );
            let mut child = Command::new(Path::new(CNI_DIR).join(self.name))
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env("CNI_COMMAND", command)
                .env("CNI_CONTAINERID", &att.container_id)
                .env("CNI_NETNS", att.netns.path())
                .env("CNI_IFNAME", "eth0")
                .env("CNI_ARGS", cni_args)
                .env("CNI_PATH", self.sandbox.cni_path())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.name));
            {
                use std::io::Write;
                let mut stdin = child.stdin.take().expect("stdin");
                stdin.write_all(conf.to_string().as_bytes()).expect("write config");
            }
            child.wait_with_output().expect("wait for plugin")
        }

        /// Runs `command`, which must succeed; returns the parsed stdout (`null` when empty).
        pub fn call(&self, command: &str, att: &Attachment, prev_result: Option<&Value>) -> Value {
            let out = self.exec(command, att, prev_result);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{} {command} for {} failed ({}):\nstdout: {stdout}\nstderr: {}\nstore:\n{}",
                self.name,
                att.netns.name,
                out.status,
                String::from_utf8_lossy(&out.stderr),
                self.sandbox.dump_store()
            );
            if stdout.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&stdout)
                    .unwrap_or_else(|e| panic!("{} {command}: stdout is not JSON ({e}): {stdout}", self.name))
            }
        }
    }

    /// The `ip/prefix` addresses of a CNI result placed on the container's `eth0`.
    pub fn result_addresses(result: &Value, netns: &Netns) -> BTreeSet<String> {
        let interfaces = result["interfaces"].as_array().expect("result.interfaces");
        let ips = result["ips"].as_array().expect("result.ips");
        ips.iter()
            .map(|ip| {
                let index = ip["interface"].as_u64().expect("ips[].interface");
                let iface = &interfaces[usize::try_from(index).expect("index")];
                assert_eq!(iface["name"], "eth0", "{result}");
                assert_eq!(iface["sandbox"], netns.path().as_str(), "{result}");
                ip["address"].as_str().expect("ips[].address").to_string()
            })
            .collect()
    }

    /// Which reference plugin attaches the namespaces.
    #[derive(Debug, Clone, Copy)]
    pub enum Attach {
        /// `bridge` with `isGateway` on a fresh bridge.
        Bridge,
        /// `macvlan` in bridge mode on a fresh dummy master (see [`HostLink::macvlan_master`]).
        Macvlan,
    }

    /// One end-to-end run.
    #[derive(Debug)]
    pub struct Scenario<'a> {
        pub attach: Attach,
        pub cni_version: &'a str,
        /// The range keys of the IPAM object (`range`, `gateway`, `ipRanges`, ...); the type and the
        /// file store are added.
        pub ranges: Value,
        /// The addresses each of the two namespaces must get, in attachment order.
        pub expected: [&'a [&'a str]; 2],
    }

    impl Scenario<'_> {
        pub fn run(self) {
            let plugin_name = match self.attach {
                Attach::Bridge => "bridge",
                Attach::Macvlan => "macvlan",
            };
            if !preflight(plugin_name) {
                return;
            }
            let started = Instant::now();
            let sandbox = Sandbox::new();
            // Declared before the namespaces, so dropped after them.
            let link = match self.attach {
                Attach::Bridge => HostLink::named("wbb"),
                Attach::Macvlan => macvlan_master(),
            };
            let net_name = unique("e2e-net-");
            let mut ipam = self.ranges.clone();
            ipam["type"] = json!("whereabouts");
            ipam["datastore"] = json!("file");
            ipam["file_store_dir"] = json!(sandbox.store().display().to_string());
            let conf = match self.attach {
                Attach::Bridge => json!({
                    "cniVersion": self.cni_version, "name": net_name, "type": "bridge",
                    "bridge": link.name, "isGateway": true, "ipam": ipam,
                }),
                Attach::Macvlan => json!({
                    "cniVersion": self.cni_version, "name": net_name, "type": "macvlan",
                    "master": link.name, "mode": "bridge", "ipam": ipam,
                }),
            };
            let plugin = Plugin { name: plugin_name, sandbox: &sandbox, conf };
            let pods = [Attachment::new(), Attachment::new()];

            // ADD both, one after the other: the lowest free addresses, in order.
            let mut results = Vec::new();
            let mut addresses = Vec::new();
            for (pod, expected) in pods.iter().zip(self.expected) {
                let result = plugin.call("ADD", pod, None);
                assert_eq!(result["cniVersion"], self.cni_version, "{result}");
                let from_result = result_addresses(&result, &pod.netns);
                let ips: BTreeSet<IpAddr> = from_result.iter().map(|a| address_part(a)).collect();
                let want: BTreeSet<IpAddr> =
                    expected.iter().map(|a| a.parse().expect("expected address")).collect();
                assert_eq!(ips, want, "{} got other addresses: {result}", pod.netns.name);
                let on_link = pod.netns.settled_addresses("eth0");
                assert_eq!(
                    on_link, from_result,
                    "{}: eth0 does not carry the result's addresses",
                    pod.netns.name
                );
                results.push(result);
                addresses.push(ips);
            }

            // The store records each address for its owner.
            let want: BTreeSet<(IpAddr, String, String)> = pods
                .iter()
                .zip(&addresses)
                .flat_map(|(pod, ips)| ips.iter().map(|ip| (*ip, pod.container_id.clone(), pod.podref())))
                .collect();
            assert_eq!(sandbox.allocations(), want, "store:\n{}", sandbox.dump_store());
            assert_eq!(sandbox.reservations().len(), want.len(), "store:\n{}", sandbox.dump_store());

            // Each namespace reaches the other on every address.
            for (from, to) in [(0, 1), (1, 0)] {
                for ip in &addresses[to] {
                    pods[from].netns.ping(*ip);
                }
            }

            // CHECK (0.4.0 and later): the plugin and whereabouts agree with the stored result.
            for (pod, result) in pods.iter().zip(&results) {
                plugin.call("CHECK", pod, Some(result));
            }

            // DEL both; a repeated DEL (no prevResult) must succeed too.
            for (pod, result) in pods.iter().zip(&results) {
                plugin.call("DEL", pod, Some(result));
                plugin.call("DEL", pod, None);
            }
            assert!(
                sandbox.allocations().is_empty(),
                "pools still hold allocations after DEL:\n{}",
                sandbox.dump_store()
            );
            assert!(
                sandbox.reservations().is_empty(),
                "reservations remain after DEL:\n{}",
                sandbox.dump_store()
            );
            for pod in &pods {
                let gone = output("ip", &["-n", &pod.netns.name, "link", "show", "dev", "eth0"]);
                assert!(!gone.status.success(), "{}: eth0 survived DEL", pod.netns.name);
            }

            // Tear down explicitly and make sure nothing is left behind.
            let names: Vec<String> = pods.iter().map(|p| p.netns.name.clone()).collect();
            drop(pods);
            let link_name = link.name.clone();
            drop(link);
            let netns_list = run("ip", &["netns", "list"]);
            for name in &names {
                assert!(!netns_list.split_whitespace().any(|w| w == name), "namespace {name} left over");
            }
            assert!(
                !output("ip", &["link", "show", "dev", &link_name]).status.success(),
                "link {link_name} left over"
            );
            eprintln!(
                "e2e_netns: {plugin_name} cniVersion {}: {:?} in {:?}",
                self.cni_version,
                addresses,
                started.elapsed()
            );
        }
    }
}

use serde_json::json;
use support::{Attach, Scenario};

/// IPv4 on a bridge; the gateway (on the bridge) is never handed out.
#[test]
fn bridge_ipv4() {
    Scenario {
        attach: Attach::Bridge,
        cni_version: "1.0.0",
        ranges: json!({ "range": "198.51.100.0/26", "gateway": "198.51.100.1" }),
        expected: [&["198.51.100.2"], &["198.51.100.3"]],
    }
    .run();
}

/// The same with the 0.4.0 result format.
#[test]
fn bridge_ipv4_cni_0_4_0() {
    Scenario {
        attach: Attach::Bridge,
        cni_version: "0.4.0",
        ranges: json!({ "range": "198.51.100.64/26", "gateway": "198.51.100.65" }),
        expected: [&["198.51.100.66"], &["198.51.100.67"]],
    }
    .run();
}

/// IPv6 only, from the top-level range.
#[test]
fn bridge_ipv6() {
    Scenario {
        attach: Attach::Bridge,
        cni_version: "1.0.0",
        ranges: json!({ "range": "2001:db8:e2e:6::/64", "gateway": "2001:db8:e2e:6::1" }),
        expected: [&["2001:db8:e2e:6::2"], &["2001:db8:e2e:6::3"]],
    }
    .run();
}

/// Dual stack: v4 from `range`, v6 from `ipRanges`, each range with its own gateway, which the bridge
/// (isGateway) takes from the result and whereabouts never hands out.
#[test]
fn bridge_dual_stack() {
    Scenario {
        attach: Attach::Bridge,
        cni_version: "1.0.0",
        ranges: json!({
            "range": "198.51.100.128/25",
            "gateway": "198.51.100.129",
            "ipRanges": [{ "range": "2001:db8:e2e:46::/64", "gateway": "2001:db8:e2e:46::1" }],
        }),
        expected: [&["198.51.100.130", "2001:db8:e2e:46::2"], &["198.51.100.131", "2001:db8:e2e:46::3"]],
    }
    .run();
}

/// macvlan (bridge mode) on a dummy master, dual stack, no gateway: the two lowest addresses.
#[test]
fn macvlan_dual_stack() {
    Scenario {
        attach: Attach::Macvlan,
        cni_version: "1.0.0",
        ranges: json!({
            "range": "203.0.113.0/24",
            "ipRanges": [{ "range": "2001:db8:e2e:99::/64" }],
        }),
        expected: [&["203.0.113.1", "2001:db8:e2e:99::1"], &["203.0.113.2", "2001:db8:e2e:99::2"]],
    }
    .run();
}
