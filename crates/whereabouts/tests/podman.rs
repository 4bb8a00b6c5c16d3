//! Podman as a client: Debian's podman 4 with its CNI backend runs containers on a bridge network
//! whose IPAM is the freshly built `whereabouts` on the file store. The tests hold what podman reports
//! (`podman container inspect`), what the containers see and what the store holds against each other
//! through a container's life: one container, twenty at once, static addresses (`--ip`, `--ip6`),
//! `podman network reload`, `podman restart`, SIGKILL then `rm -f`, and same-named containers of two
//! storage roots.
//!
//! Podman reads a private configuration only, never the machine's: its own `containers.conf`
//! (`CONTAINERS_CONF`: the CNI backend with the test's configuration and plugin directories, runtime
//! `runc` as `crun` refuses hybrid cgroups, cgroupfs, file locks in its own temp dir instead of the
//! machine-wide shared memory segment, no events), `storage.conf` (vfs, storage root and run root in the
//! test's temp dir), an empty `registries.conf`, and a cleared environment. The image is imported from
//! a tarball of `busybox-static`, as no registry is reachable. Each test has its own network, bridge,
//! subnets and cgroup parent, so the tests run in parallel; the bridge has no address, so traffic
//! stays between the test's own containers.
//!
//! Needs root; installs podman, runc, busybox-static, containernetworking-plugins and iproute2 when
//! missing (`scripts/ensure-packages.sh`), and fails when it cannot. Without root a test prints why and passes,
//! unless `CI` is set, where it fails. A Drop guard removes everything a test made (containers, the
//! network and its bridge, the cgroups, podman's CNI cache entries, the temp dir), also on failure.

mod e2e_support;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use e2e_support::{
    CNI_DIR, HostLink, Sandbox, address_part, is_root, output_of, ready_or_skip, run, stdout_of,
};

const IMAGE: &str = "localhost/wb-busybox:latest";
/// The busybox applets the image links: the containers' command and what the tests exec in them.
const APPLETS: &[&str] = &["sh", "sleep", "ip", "ping"];
/// What every container runs. As PID 1, `sleep` ignores SIGTERM: containers are stopped with `-t 0`.
const IDLE: &[&str] = &["sleep", "86400"];
/// What the tests need, installed when missing.
const PACKAGES: &[&str] = &["podman", "runc", "busybox-static", "containernetworking-plugins", "iproute2"];
/// Where libcni (inside podman) caches each attachment's result, as `<network>-<container id>-<ifname>`.
/// Podman 4.3 cannot move it.
const CNI_CACHE: &str = "/var/lib/cni/results";
const PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// Whether podman can run here: as root, once what is missing is installed (once per process; a
/// failed installation fails every test). Without root, see [`ready_or_skip`].
fn preflight() -> bool {
    if !is_root() {
        return ready_or_skip("podman", Some("not running as root".to_string()));
    }
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(why) = INSTALLED.get_or_init(install_packages) {
        panic!("podman: {why}");
    }
    true
}

fn install_packages() -> Result<(), String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ensure-packages.sh");
    let out = output_of(
        Command::new("bash").args(["-c", r#". "$0" && ensure_packages "$@""#]).arg(&script).args(PACKAGES),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        eprint!("{log}");
        Ok(())
    } else {
        Err(format!("cannot install {PACKAGES:?} ({}):\n{log}", out.status))
    }
}

/// `default_ulimits` for `containers.conf`. As root, podman raises the containers' open files and
/// processes to the kernel's maximum, which these machines refuse (no CAP_SYS_RESOURCE); 1024 of
/// each is plenty for `sleep` and `ping`, bounded by the test's own soft limits.
fn default_ulimits() -> String {
    let limits = std::fs::read_to_string("/proc/self/limits").expect("read /proc/self/limits");
    let soft = |name: &str| -> u64 {
        let line = limits.lines().find(|l| l.starts_with(name)).expect("limit in /proc/self/limits");
        let value = line[name.len()..].split_whitespace().next().expect("soft limit");
        value.parse().unwrap_or(u64::MAX) // "unlimited"
    };
    let nofile = soft("Max open files").min(1024);
    let nproc = soft("Max processes").min(1024);
    format!(r#"["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]"#)
}

/// The network configuration, as the README shows it: a bridge of its own, and whereabouts on the
/// file store handing out one address of `v4` and one of `v6` to each container.
fn network_config(name: &str, store: &Path, v4: &str, v6: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [{
            "type": "bridge",
            "bridge": name,
            // Podman passes two or more static addresses (`--ip` with `--ip6`) as `runtimeConfig.ips`
            // to a plugin that takes the `ips` capability; a single one goes into CNI_ARGS as `IP=`.
            "capabilities": { "ips": true },
            "ipam": {
                "type": "whereabouts",
                "datastore": "file",
                "file_store_dir": store,
                "range": v4,
                "ipRanges": [{ "range": v6 }],
            },
        }],
    })
}

/// A container on the test's network as `podman container inspect` reports it.
#[derive(Debug, PartialEq, Eq)]
struct Attached {
    id: String,
    ips: BTreeSet<IpAddr>,
}

/// One podman installation: its `containers.conf`, `storage.conf`, storage root, run root and temp dir
/// under `podman-<index>` of the sandbox; the network, CNI plugins and `registries.conf` of its
/// [`Setup`].
#[derive(Debug)]
struct Podman {
    dir: PathBuf,
    registries: PathBuf,
    network: String,
}

impl Podman {
    /// Writes the configuration and imports the image.
    fn new(sandbox: &Sandbox, network: &str, index: usize) -> Self {
        let dir = sandbox.path().join(format!("podman-{index}"));
        std::fs::create_dir(&dir).expect("mkdir podman dir");
        let containers_conf = format!(
            r#"[containers]
default_ulimits = {ulimits}

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
lock_type = "file"
events_logger = "none"
tmp_dir = {tmp:?}

[network]
network_backend = "cni"
cni_plugin_dirs = [{bin:?}, {CNI_DIR:?}]
network_config_dir = {net_d:?}
"#,
            ulimits = default_ulimits(),
            tmp = dir.join("tmp").display().to_string(),
            bin = sandbox.bin_dir().display().to_string(),
            net_d = sandbox.path().join("net.d").display().to_string(),
        );
        std::fs::write(dir.join("containers.conf"), containers_conf).expect("write containers.conf");
        let storage_conf = format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = {:?}\nrunroot = {:?}\n",
            dir.join("root").display().to_string(),
            dir.join("run").display().to_string(),
        );
        std::fs::write(dir.join("storage.conf"), storage_conf).expect("write storage.conf");
        let podman =
            Podman { dir, registries: sandbox.path().join("registries.conf"), network: network.to_string() };
        let tarball = sandbox.path().join("image.tar").display().to_string();
        podman.run(&["import", "--quiet", &tarball, IMAGE]);
        podman
    }

    /// `podman ARGS` on this installation's configuration alone.
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("podman");
        command
            .env_clear()
            .env("PATH", PATH)
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", self.dir.join("storage.conf"))
            .env("CONTAINERS_REGISTRIES_CONF", &self.registries)
            .args(args);
        command
    }

    fn output(&self, args: &[&str]) -> Output {
        output_of(&mut self.command(args))
    }

    /// Runs `podman ARGS`, which must succeed; returns its stdout.
    fn run(&self, args: &[&str]) -> String {
        stdout_of(&mut self.command(args))
    }

    /// `podman run` of an idle container `name` on the test's network, with `options`. Its cgroups
    /// go below one named after the network, for the guard to remove.
    fn start_command(&self, name: &str, options: &[&str]) -> Command {
        let cgroup_parent = format!("/{}", self.network);
        let mut args = vec![
            "run",
            "--detach",
            "--name",
            name,
            "--network",
            &self.network,
            "--cgroup-parent",
            &cgroup_parent,
        ];
        args.extend_from_slice(options);
        args.push(IMAGE);
        args.extend_from_slice(IDLE);
        self.command(&args)
    }

    /// Starts container `name`, which must succeed, and returns what podman reports of it.
    fn start(&self, name: &str, options: &[&str]) -> Attached {
        stdout_of(&mut self.start_command(name, options));
        self.attached(name)
    }

    fn attached(&self, name: &str) -> Attached {
        let text = self.run(&["container", "inspect", name]);
        let inspected: Value = serde_json::from_str(&text).expect("podman inspect prints JSON");
        let container = &inspected[0];
        let on_network = &container["NetworkSettings"]["Networks"][&self.network];
        let ips = ["IPAddress", "GlobalIPv6Address"]
            .into_iter()
            .filter_map(|key| on_network[key].as_str().filter(|a| !a.is_empty()))
            .map(|a| a.parse().unwrap_or_else(|e| panic!("{name}: address {a:?}: {e}")))
            .collect();
        Attached { id: container["Id"].as_str().expect("inspect: Id").to_string(), ips }
    }

    /// The global addresses on the container's `eth0`, as it sees them.
    fn addresses_inside(&self, name: &str) -> BTreeSet<IpAddr> {
        let text = self.run(&["exec", name, "ip", "-o", "addr", "show", "dev", "eth0", "scope", "global"]);
        text.lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                words.find(|w| *w == "inet" || *w == "inet6")?;
                words.next()
            })
            .map(address_part)
            .collect()
    }

    /// Pings `target` (another of the test's containers) from container `from`, retrying for up to
    /// 10 s while IPv6 duplicate address detection still holds a fresh address back.
    fn ping(&self, from: &str, target: IpAddr) {
        let target = target.to_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = self.output(&["exec", from, "ping", "-c", "1", "-W", "1", &target]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "ping from {from} to {target} failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `podman rm --force --time 0 NAMES`, which must succeed.
    fn remove(&self, names: &[&str]) {
        let mut args = vec!["rm", "--force", "--time", "0"];
        args.extend_from_slice(names);
        self.run(&args);
    }
}

/// One test's world: a bridge network of its own (the network, its bridge and the containers' cgroup
/// parent share one unique name) with whereabouts on the sandbox's file store, and podman
/// installations (storage roots) on it. Everything is removed on drop.
#[derive(Debug)]
struct Setup {
    installations: Vec<Podman>,
    bridge: HostLink,
    sandbox: Sandbox,
}

impl Setup {
    /// `roots` podman installations on one network handing out addresses of `v4` and `v6`.
    fn new(v4: &str, v6: &str, roots: usize) -> Self {
        let sandbox = Sandbox::new();
        let bridge = HostLink::named("wbp");
        let net_d = sandbox.path().join("net.d");
        std::fs::create_dir(&net_d).expect("mkdir net.d");
        let config = network_config(&bridge.name, &sandbox.store(), v4, v6);
        std::fs::write(net_d.join(format!("{}.conflist", bridge.name)), config.to_string())
            .expect("write conflist");
        std::fs::write(sandbox.path().join("registries.conf"), "").expect("write registries.conf");
        write_image_tarball(&sandbox);
        let installations = (0..roots).map(|index| Podman::new(&sandbox, &bridge.name, index)).collect();
        Setup { installations, bridge, sandbox }
    }

    fn podman(&self) -> &Podman {
        &self.installations[0]
    }

    /// The store's allocations as (address, container id).
    fn held(&self) -> BTreeSet<(IpAddr, String)> {
        self.sandbox.allocations().into_iter().map(|(ip, id, _podref)| (ip, id)).collect()
    }

    /// The store holds exactly the addresses of `containers`, for them, each reserved once.
    fn assert_store_holds(&self, containers: &[&Attached]) {
        let want: BTreeSet<(IpAddr, String)> =
            containers.iter().flat_map(|c| c.ips.iter().map(|ip| (*ip, c.id.clone()))).collect();
        assert_eq!(self.held(), want, "store and podman disagree; store:\n{}", self.sandbox.dump_store());
        assert_eq!(
            self.sandbox.reservations().len(),
            want.len(),
            "one reservation per held address; store:\n{}",
            self.sandbox.dump_store()
        );
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        for podman in &self.installations {
            // Tears down each container's network (CNI DEL) before removing it.
            if let Ok(out) = podman.command(&["rm", "--all", "--force", "--time", "0"]).output()
                && !out.status.success()
            {
                eprintln!("podman rm --all failed: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        if let Some(podman) = self.installations.first() {
            // Removes the conflist and the bridge; the HostLink guard catches a bridge left anyway.
            let _ = podman.command(&["network", "rm", "--force", &self.bridge.name]).output();
        }
        remove_cgroups(&format!("/{}", self.bridge.name));
        remove_cni_cache(&self.bridge.name);
    }
}

/// `image.tar` in the sandbox: a root filesystem of `/bin/busybox` (static) and its applets.
fn write_image_tarball(sandbox: &Sandbox) {
    let rootfs = sandbox.path().join("rootfs");
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir rootfs/bin");
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("copy /bin/busybox");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("symlink applet");
    }
    let tarball = sandbox.path().join("image.tar").display().to_string();
    run("tar", &["-C", &rootfs.display().to_string(), "-cf", &tarball, "."]);
}

/// Removes the cgroup `parent` (and the empty cgroups podman left below it: conmon's) from every
/// hierarchy: the cgroup v2 root and each v1 controller's.
fn remove_cgroups(parent: &str) {
    let root = Path::new("/sys/fs/cgroup");
    let hierarchies = std::fs::read_dir(root).into_iter().flatten().flatten().map(|e| e.path());
    for hierarchy in std::iter::once(root.to_path_buf()).chain(hierarchies) {
        remove_cgroup_tree(&hierarchy.join(parent.trim_start_matches('/')));
    }
}

fn remove_cgroup_tree(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Removes libcni's cached results of `network`, which remain when a test failed between ADD and DEL.
fn remove_cni_cache(network: &str) {
    let prefix = format!("{network}-");
    for entry in std::fs::read_dir(CNI_CACHE).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn ips(addresses: &[&str]) -> BTreeSet<IpAddr> {
    addresses.iter().map(|a| a.parse().expect("address")).collect()
}

/// One container: the lowest addresses of both ranges, the same in `podman inspect`, on its `eth0`
/// and in the store; released by `podman rm`.
#[test]
fn one_container() {
    if !preflight() {
        return;
    }
    let setup = Setup::new("203.0.113.0/28", "2001:db8:ad:1::/64", 1);
    let podman = setup.podman();
    let solo = podman.start("solo", &[]);
    assert_eq!(solo.ips, ips(&["203.0.113.1", "2001:db8:ad:1::1"]));
    assert_eq!(podman.addresses_inside("solo"), solo.ips, "eth0 carries what podman reports");
    setup.assert_store_holds(&[&solo]);
    podman.remove(&["solo"]);
    setup.assert_store_holds(&[]);
}

/// Twenty `podman run` at once: twenty distinct addresses per family, the twenty lowest, the store as
/// podman reports them; two of them reach each other; all released by one `podman rm`.
#[test]
fn twenty_at_once() {
    if !preflight() {
        return;
    }
    let setup = Setup::new("203.0.113.32/27", "2001:db8:ad:2::/64", 1);
    let podman = setup.podman();
    let names: Vec<String> = (0..20).map(|i| format!("crowd-{i}")).collect();
    let children: Vec<_> = names
        .iter()
        .map(|name| {
            podman
                .start_command(name, &[])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn podman run")
        })
        .collect();
    for (name, child) in names.iter().zip(children) {
        let out = child.wait_with_output().expect("wait for podman run");
        assert!(out.status.success(), "podman run {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let crowd: Vec<Attached> = names.iter().map(|name| podman.attached(name)).collect();
    let all: BTreeSet<IpAddr> = crowd.iter().flat_map(|c| c.ips.iter().copied()).collect();
    let lowest: BTreeSet<IpAddr> = (1..=20u8)
        .flat_map(|n| [format!("203.0.113.{}", 32 + n), format!("2001:db8:ad:2::{n:x}")])
        .map(|a| a.parse().expect("address"))
        .collect();
    assert_eq!(all, lowest, "forty distinct addresses, the lowest of each range: {crowd:?}");
    setup.assert_store_holds(&crowd.iter().collect::<Vec<_>>());
    for target in &crowd[1].ips {
        podman.ping(&names[0], *target);
    }
    for target in &crowd[0].ips {
        podman.ping(&names[1], *target);
    }
    podman.remove(&names.iter().map(String::as_str).collect::<Vec<_>>());
    setup.assert_store_holds(&[]);
}

/// A container started with `request` (static address options) gets `want`, held in the store; a
/// second one with `rival_request` claiming `contested` too fails with an error naming it and holds
/// nothing; removing the first releases everything.
fn static_addresses_held(
    setup: &Setup,
    request: &[&str],
    want: &[&str],
    rival_request: &[&str],
    contested: &str,
) {
    let podman = setup.podman();
    let holder = podman.start("holder", request);
    assert_eq!(holder.ips, ips(want), "{request:?}");
    assert_eq!(podman.addresses_inside("holder"), holder.ips);
    setup.assert_store_holds(&[&holder]);

    let rival = output_of(&mut podman.start_command("rival", rival_request));
    let stderr = String::from_utf8_lossy(&rival.stderr);
    assert!(!rival.status.success(), "a second claimant of {contested} was started");
    assert!(
        stderr.contains(contested) && stderr.contains("already allocated"),
        "the error should say that {contested} is taken: {stderr}"
    );
    setup.assert_store_holds(&[&holder]);

    podman.remove(&["holder", "rival"]);
    setup.assert_store_holds(&[]);
}

/// `--ip` with `--ip6` (podman passes both as `runtimeConfig.ips`): exactly these, held.
#[test]
fn static_ip_and_ip6() {
    if !preflight() {
        return;
    }
    let setup = Setup::new("203.0.113.16/28", "2001:db8:ad:3::/64", 1);
    static_addresses_held(
        &setup,
        &["--ip", "203.0.113.25", "--ip6", "2001:db8:ad:3::25"],
        &["203.0.113.25", "2001:db8:ad:3::25"],
        &["--ip", "203.0.113.25", "--ip6", "2001:db8:ad:3::26"],
        "203.0.113.25",
    );
}

/// `--ip` alone (podman passes a bare `IP=` in CNI_ARGS): that address and the lowest IPv6 one.
#[test]
fn static_ip() {
    if !preflight() {
        return;
    }
    let setup = Setup::new("203.0.113.64/28", "2001:db8:ad:4::/64", 1);
    static_addresses_held(
        &setup,
        &["--ip", "203.0.113.70"],
        &["203.0.113.70", "2001:db8:ad:4::1"],
        &["--ip", "203.0.113.70"],
        "203.0.113.70",
    );
}

/// `--ip6` alone (a bare `IP=` too): that address and the lowest IPv4 one.
#[test]
fn static_ip6() {
    if !preflight() {
        return;
    }
    let setup = Setup::new("203.0.113.80/28", "2001:db8:ad:5::/64", 1);
    static_addresses_held(
        &setup,
        &["--ip6", "2001:db8:ad:5::70"],
        &["203.0.113.81", "2001:db8:ad:5::70"],
        &["--ip6", "2001:db8:ad:5::70"],
        "2001:db8:ad:5::70",
    );
}

/// Starts `first` and `second`, applies `disturb` to `first` (which tears its network down and sets
/// it up again), and checks that `first` has its addresses again, that the store holds nothing
/// more, and that the two still reach each other.
fn addresses_survive(v4: &str, v6: &str, disturb: &[&str]) {
    let setup = Setup::new(v4, v6, 1);
    let podman = setup.podman();
    let first = podman.start("first", &[]);
    let second = podman.start("second", &[]);
    setup.assert_store_holds(&[&first, &second]);

    podman.run(&[disturb, &["first"]].concat());
    let again = podman.attached("first");
    assert_eq!(again, first, "after {disturb:?}");
    assert_eq!(podman.addresses_inside("first"), first.ips, "after {disturb:?}");
    setup.assert_store_holds(&[&first, &second]);
    for target in &second.ips {
        podman.ping("first", *target);
    }

    podman.remove(&["first", "second"]);
    setup.assert_store_holds(&[]);
}

/// `podman network reload` (DEL and ADD for the running container): its addresses kept.
#[test]
fn network_reload_keeps_addresses() {
    if !preflight() {
        return;
    }
    addresses_survive("203.0.113.96/28", "2001:db8:ad:6::/64", &["network", "reload"]);
}

/// `podman restart` (DEL on stop, ADD in a new namespace on start): its addresses again.
#[test]
fn restart_keeps_addresses() {
    if !preflight() {
        return;
    }
    addresses_survive("203.0.113.112/28", "2001:db8:ad:7::/64", &["restart", "--time", "0"]);
}

/// SIGKILL to the container, then `podman rm -f`: everything released.
#[test]
fn sigkill_then_rm_releases() {
    if !preflight() {
        return;
    }
    let setup = Setup::new("203.0.113.128/28", "2001:db8:ad:8::/64", 1);
    let podman = setup.podman();
    let victim = podman.start("victim", &[]);
    setup.assert_store_holds(&[&victim]);
    podman.run(&["kill", "--signal", "KILL", "victim"]);
    assert_eq!(podman.run(&["wait", "victim"]).trim(), "137", "killed by SIGKILL");
    podman.remove(&["victim"]);
    setup.assert_store_holds(&[]);
}

/// Two storage roots each run a container named `twin` (podman sends the name as K8S_POD_NAME and no
/// namespace): distinct addresses, and removing one releases its own only.
#[test]
fn same_name_in_two_storage_roots() {
    if !preflight() {
        return;
    }
    let setup = Setup::new("203.0.113.144/28", "2001:db8:ad:9::/64", 2);
    let [left, right] = [&setup.installations[0], &setup.installations[1]];
    let left_twin = left.start("twin", &[]);
    let right_twin = right.start("twin", &[]);
    assert!(
        left_twin.ips.is_disjoint(&right_twin.ips),
        "same-named containers share addresses: {left_twin:?} {right_twin:?}"
    );
    setup.assert_store_holds(&[&left_twin, &right_twin]);
    left.ping("twin", *right_twin.ips.first().expect("an address"));

    left.remove(&["twin"]);
    setup.assert_store_holds(&[&right_twin]);
    right.remove(&["twin"]);
    setup.assert_store_holds(&[]);
}
