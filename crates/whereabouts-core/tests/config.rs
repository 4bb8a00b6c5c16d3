//! Integration tests of configuration loading (`config::load`) against the compatibility contract
//! (shared/upstream-behaviour.md §1.1-1.5) and the validation whereabouts-rs adds on top of it.
//!
//! Sections: Go-style key decoding, `type`, range syntaxes and normalisation, refusals (key and value),
//! flat-file merge, when the flat file is optional, requested addresses, `cniVersion`, logging, pools and
//! node slices, and property tests (no panics on arbitrary input, every valid range lies strictly inside
//! its network).

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::{Map, Value, json};
use whereabouts_core::ConfigError;
use whereabouts_core::addr::{Family, from_u128, net_bounds};
use whereabouts_core::cni_args::parse_cni_args;
use whereabouts_core::config::{
    self, CallContext, DEFAULT_FILE_STORE_DIR, Datastore, Dns, EtcdConfig, FLAT_FILE_PATHS, FlatFile,
    InlineIpam, IpamConfig, LogLevel, LogSettings, Purpose, Route, StaticAddress,
};
use whereabouts_core::range::IpRange;

// === helpers ===

const KUBECONFIG: &str = "/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig";
const FLAT_PATH: &str = FLAT_FILE_PATHS[1];
const KUBECONFIG_MISSING: &str = "you have not configured the storage engine \
    (looks like you're using an invalid `kubernetes.kubeconfig` parameter in your config)";

/// Every top-level key of upstream's schema (§1.2), and the keys of its nested objects.
const TOP_LEVEL_KEYS: &str = "type range range_start range_end exclude ipRanges gateway routes dns addresses \
    enable_overlapping_ranges network_name node_slice_size kubernetes configuration_path log_file log_level \
    leader_lease_duration leader_renew_deadline leader_retry_period sleep_for_race \
    reconciler_cron_expression datastore file_store_dir etcd_host etcd_username etcd_password etcd_key_file \
    etcd_cert_file etcd_ca_cert_file";
const RANGE_KEYS: &str = "range range_start range_end exclude";
const ROUTE_KEYS: &str = "dst gw mtu advmss priority table scope";
const DNS_KEYS: &str = "nameservers domain search options";
const ADDRESS_KEYS: &str = "address gateway";
const KUBERNETES_KEYS: &str = "kubeconfig k8s_api_root";

fn top_level_keys() -> impl Iterator<Item = &'static str> {
    TOP_LEVEL_KEYS.split_whitespace()
}

type Loaded = Result<IpamConfig, ConfigError>;

/// Requested addresses as `CallContext::requested_ips` takes them: (where from, value).
type Requested = &'static [(&'static str, &'static str)];

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a test IP")
}

fn net(s: &str) -> IpNet {
    s.parse().expect("a test CIDR")
}

/// `base` with the keys of the object `extra` inserted (an exact key replaces, a differently cased one is
/// appended and so wins after case folding).
fn with(mut base: Value, extra: Value) -> Value {
    let (Value::Object(base_map), Value::Object(extra_map)) = (&mut base, extra) else {
        panic!("with() takes two objects");
    };
    base_map.extend(extra_map);
    base
}

/// An inline `ipam` of type whereabouts on the file store (complete without a flat file), plus `extra`.
fn ipam(extra: Value) -> Value {
    with(json!({"type": "whereabouts", "datastore": "file"}), extra)
}

/// An inline `ipam` of type whereabouts naming no store at all, plus `extra`.
fn bare(extra: Value) -> Value {
    with(json!({"type": "whereabouts"}), extra)
}

/// A call context with a current `cniVersion`, requested addresses and a `CNI_ARGS` string.
fn call(cni_version: &str, requested: &[(&'static str, &str)], cni_args: &str) -> CallContext {
    CallContext {
        cni_version: cni_version.to_string(),
        args: parse_cni_args(cni_args).expect("valid test CNI_ARGS"),
        requested_ips: requested.iter().map(|(key, value)| (*key, value.to_string())).collect(),
        ..CallContext::default()
    }
}

fn ctx() -> CallContext {
    call("1.0.0", &[], "")
}

/// Loads without a flat file.
fn load(ipam: &Value) -> Loaded {
    config::load(ipam, None, &ctx())
}

/// Loads with `flat` as the content of the flat file at [`FLAT_PATH`].
fn load_flat(ipam: &Value, flat: &str) -> Loaded {
    config::load(ipam, Some(FlatFile { path: FLAT_PATH, content: flat.as_bytes() }), &ctx())
}

#[track_caller]
fn ok(result: Loaded) -> IpamConfig {
    result.unwrap_or_else(|e| panic!("expected the configuration to load, got {e:?}"))
}

#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(case: &str, result: Result<T, ConfigError>, key: &str, value: &str) {
    match result {
        Err(ConfigError::Invalid { key: k, value: v, reason }) => {
            assert_eq!((k.as_str(), v.as_str()), (key, value), "{case}: wrong key/value (reason: {reason})");
            assert!(!reason.is_empty(), "{case}: empty reason");
        }
        other => panic!("{case}: expected Invalid {{ key: {key:?}, value: {value:?} }}, got {other:?}"),
    }
}

/// Asserts a `Decode` error from `context` whose message mentions `mentions` (a key path or a reason).
#[track_caller]
fn assert_decode(case: &str, result: Loaded, context: &str, mentions: &str) {
    match result {
        Err(ConfigError::Decode { context: c, message }) => {
            assert_eq!(c, context, "{case}: wrong context (message: {message})");
            assert!(message.contains(mentions), "{case}: {message:?} does not mention {mentions:?}");
        }
        other => panic!("{case}: expected Decode from {context:?}, got {other:?}"),
    }
}

#[track_caller]
fn assert_missing(case: &str, result: Loaded, message: &str) {
    assert_eq!(result, Err(ConfigError::Missing(message.to_string())), "{case}");
}

/// A range as `network first-last`.
fn summary(range: &IpRange) -> String {
    let family = range.family();
    format!("{} {}-{}", range.network(), from_u128(family, range.first()), from_u128(family, range.last()))
}

/// Every range of a configuration, in allocation order, as [`summary`] strings.
fn ranges(cfg: &IpamConfig) -> Vec<String> {
    cfg.ranges.iter().map(|r| summary(&r.range)).collect()
}

fn requested(cfg: &IpamConfig) -> Vec<Option<IpAddr>> {
    cfg.ranges.iter().map(|r| r.requested).collect()
}

fn static_address(address: &str, gateway: Option<&str>) -> StaticAddress {
    StaticAddress { address: net(address), gateway: gateway.map(ip) }
}

fn route(dst: &str, gw: Option<&str>) -> Route {
    Route { dst: net(dst), gw: gw.map(ip), mtu: None, advmss: None, priority: None, table: None, scope: None }
}

fn file_store(dir: &str) -> Datastore {
    Datastore::File { dir: dir.to_string() }
}

fn kube_store(kubeconfig: &str) -> Datastore {
    Datastore::Kubernetes { kubeconfig: kubeconfig.to_string() }
}

/// What `{"type": "whereabouts", "datastore": "file"}` loads to.
fn defaults() -> IpamConfig {
    IpamConfig {
        ranges: vec![],
        gateway: None,
        routes: vec![],
        dns: Dns::default(),
        addresses: vec![],
        network_name: String::new(),
        enable_overlapping_ranges: true,
        node_slice_size: None,
        release_cooldown: None,
        sticky_statefulsets: false,
        configuration_path: None,
        datastore: file_store(DEFAULT_FILE_STORE_DIR),
        log: LogSettings { file: None, level: LogLevel::Debug, warning: None },
    }
}

// === 1. Go-style decoding of keys and values ===

#[test]
fn keys_match_case_insensitively_at_every_level() {
    let shouty = json!({
        "TYPE": "whereabouts", "DataStore": "file", "Range": "10.0.0.0/24", "RANGE_START": "10.0.0.10",
        "range_END": "10.0.0.20", "Exclude": ["10.0.0.16/30"],
        "iprANGES": [{"RANGE": "10.1.0.0/24", "Range_Start": "10.1.0.5", "EXCLUDE": ["10.1.0.8/29"]}],
        "Routes": [{"DST": "0.0.0.0/0", "Gw": "10.0.0.1", "MTU": 1400}],
        "DNS": {"NameServers": ["10.0.0.2"], "DOMAIN": "example.org"},
        "Network_Name": "blue", "Log_Level": "error", "File_Store_Dir": "/tmp/store",
    });
    let quiet = json!({
        "type": "whereabouts", "datastore": "file", "range": "10.0.0.0/24", "range_start": "10.0.0.10",
        "range_end": "10.0.0.20", "exclude": ["10.0.0.16/30"],
        "ipRanges": [{"range": "10.1.0.0/24", "range_start": "10.1.0.5", "exclude": ["10.1.0.8/29"]}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.1", "mtu": 1400}],
        "dns": {"nameservers": ["10.0.0.2"], "domain": "example.org"},
        "network_name": "blue", "log_level": "error", "file_store_dir": "/tmp/store",
    });
    let cfg = ok(load(&shouty));
    assert_eq!(Ok(&cfg), load(&quiet).as_ref());
    assert_eq!(ranges(&cfg), ["10.0.0.0/24 10.0.0.10-10.0.0.20", "10.1.0.0/24 10.1.0.5-10.1.0.254"]);
    assert_eq!(cfg.ranges[0].range.exclude(), [net("10.0.0.16/30")]);
    assert_eq!(cfg.ranges[1].range.exclude(), [net("10.1.0.8/29")]);
    assert_eq!(cfg.routes, [Route { mtu: Some(1400), ..route("0.0.0.0/0", Some("10.0.0.1")) }]);
    assert_eq!(cfg.dns.nameservers, ["10.0.0.2"]);
    assert_eq!(cfg.dns.domain.as_deref(), Some("example.org"));
    assert_eq!(cfg.network_name, "blue");
    assert_eq!(cfg.log.level, LogLevel::Error);
    assert_eq!(cfg.datastore, file_store("/tmp/store"));
}

#[test]
fn last_duplicate_key_wins() {
    // Exact duplicates, as they arrive on stdin.
    let exact: Value = serde_json::from_str(
        r#"{"type": "whereabouts", "datastore": "file", "range": "10.0.0.0/24", "range": "10.9.0.0/24"}"#,
    )
    .unwrap();
    assert_eq!(ranges(&ok(load(&exact))), ["10.9.0.0/24 10.9.0.1-10.9.0.254"]);
    // Duplicates that differ in case: the order decides, not the spelling.
    let later_upper = ipam(json!({"range": "10.0.0.0/24", "RANGE": "10.9.0.0/24"}));
    assert_eq!(ranges(&ok(load(&later_upper))), ["10.9.0.0/24 10.9.0.1-10.9.0.254"]);
    let later_lower = ipam(json!({"RANGE": "10.9.0.0/24", "range": "10.0.0.0/24"}));
    assert_eq!(ranges(&ok(load(&later_lower))), ["10.0.0.0/24 10.0.0.1-10.0.0.254"]);
    // Even a later bad value wins over an earlier good one.
    let later_bad = ipam(json!({"range": "10.0.0.0/24", "Range": "not-a-cidr"}));
    assert_invalid("later bad value", load(&later_bad), "range", "not-a-cidr");
    // Inside nested objects too.
    let nested = ipam(json!({"dns": {"domain": "a.example", "Domain": "b.example"}}));
    assert_eq!(ok(load(&nested)).dns.domain.as_deref(), Some("b.example"));
}

#[test]
fn unknown_keys_are_ignored() {
    let noisy = ipam(json!({
        "range": "10.0.0.0/24",
        "master": "eth0", "name": "net", "podName": "p", "podNamespace": "ns", "Gateway_IP": 7,
        "something": {"deeply": [{"nested": null}]},
        "ipRanges": [{"range": "10.1.0.0/24", "comment": 5}],
        "routes": [{"dst": "0.0.0.0/0", "via": true}],
        "dns": {"sortlist": 1},
        "kubernetes": {"k8s_api_root": "https://example.invalid"},
        "leader_lease_duration": 1500, "leader_renew_deadline": 1000, "leader_retry_period": 500,
        "sleep_for_race": 0, "reconciler_cron_expression": "30 4 * * *",
    }));
    let plain = ipam(json!({
        "range": "10.0.0.0/24", "ipRanges": [{"range": "10.1.0.0/24"}], "routes": [{"dst": "0.0.0.0/0"}],
    }));
    assert_eq!(load(&noisy), Ok(ok(load(&plain))));
}

#[test]
fn null_leaves_every_default() {
    let nulls: Map<String, Value> = top_level_keys()
        .filter(|k| !matches!(*k, "type" | "datastore"))
        .map(|k| (k.to_string(), Value::Null))
        .collect();
    assert_eq!(load(&ipam(Value::Object(nulls))), Ok(defaults()));
    // Nulls inside nested objects too.
    let nested = ipam(json!({
        "ipRanges": [{"range": "10.0.0.0/24", "range_start": null, "range_end": null, "exclude": null}],
        "dns": {"nameservers": null, "domain": null, "search": null, "options": null},
        "routes": [{"dst": "0.0.0.0/0", "gw": null, "mtu": null}],
        "addresses": [{"address": "10.0.0.9/24", "gateway": null}],
    }));
    let cfg = ok(load(&nested));
    assert_eq!(ranges(&cfg), ["10.0.0.0/24 10.0.0.1-10.0.0.254"]);
    assert_eq!(cfg.dns, Dns::default());
    assert_eq!(cfg.routes, [route("0.0.0.0/0", None)]);
    assert_eq!(cfg.addresses, [static_address("10.0.0.9/24", None)]);
}

#[test]
fn wrong_json_type_is_a_decode_error() {
    let cases = [
        (json!({"enable_overlapping_ranges": "true"}), "enable_overlapping_ranges"),
        (json!({"leader_lease_duration": 1500.5}), "leader_lease_duration"),
        (json!({"leader_lease_duration": "1500"}), "leader_lease_duration"),
        (json!({"sleep_for_race": true}), "sleep_for_race"),
        (json!({"range": "10.0.0.0/24", "range_start": 10}), "range_start"),
        (json!({"range": ["10.0.0.0/24"]}), "range"),
        (json!({"exclude": "10.0.0.1"}), "exclude"),
        (json!({"ipRanges": {"range": "10.0.0.0/24"}}), "ipranges"),
        (json!({"ipRanges": [{"range": 10}]}), "ipranges[0].range"),
        (json!({"routes": [{"dst": "0.0.0.0/0", "mtu": "1500"}]}), "routes[0].mtu"),
        (json!({"dns": ["10.0.0.2"]}), "dns"),
        (json!({"dns": {"nameservers": "10.0.0.2"}}), "dns.nameservers"),
        (json!({"addresses": [{"address": 1}]}), "addresses[0].address"),
        (json!({"kubernetes": {"kubeconfig": 5}}), "kubernetes.kubeconfig"),
        (json!({"log_level": false}), "log_level"),
        (json!({"datastore": 0}), "datastore"),
    ];
    for (extra, path) in cases {
        let case = extra.to_string();
        assert_decode(&case, load(&ipam(extra)), "ipam", path);
    }
}

#[test]
fn ipam_that_is_not_an_object_is_a_decode_error() {
    for value in [Value::Null, json!([]), json!("whereabouts"), json!(1)] {
        assert_decode(&value.to_string(), load(&value), "ipam", "expected an object");
    }
}

// === 2. type ===

#[test]
fn type_must_be_exactly_whereabouts() {
    let cases = [
        (json!({}), ""),
        (json!({"type": null}), ""),
        (json!({"type": ""}), ""),
        (json!({"type": "Whereabouts"}), "Whereabouts"),
        (json!({"type": "host-local"}), "host-local"),
        (json!({"type": " whereabouts"}), " whereabouts"),
    ];
    for (value, written) in cases {
        let with_store = with(value.clone(), json!({"datastore": "file"}));
        assert_invalid(&value.to_string(), load(&with_store), "ipam.type", written);
    }
    assert_decode("numeric type", load(&json!({"type": 1, "datastore": "file"})), "ipam", "type");
    assert_eq!(load(&json!({"TyPe": "whereabouts", "datastore": "file"})), Ok(defaults()));
}

#[test]
fn type_is_checked_on_the_inline_value_before_the_flat_file() {
    let flat = r#"{"type": "whereabouts", "kubernetes": {"kubeconfig": "/k"}}"#;
    assert_invalid("flat cannot supply the type", load_flat(&json!({}), flat), "ipam.type", "");
    let broken = FlatFile { path: FLAT_PATH, content: b"{not json" };
    let result = config::load(&json!({"type": "static"}), Some(broken), &ctx());
    assert_invalid("flat file never read", result, "ipam.type", "static");
}

// === 3. range syntaxes and normalisation ===

#[test]
fn range_as_cidr_keeps_only_the_network() {
    let cfg = ok(load(&ipam(json!({"range": "192.168.2.225/28"}))));
    assert_eq!(ranges(&cfg), ["192.168.2.224/28 192.168.2.225-192.168.2.238"]);
    assert_eq!(cfg.ranges[0].range.network(), net("192.168.2.224/28"));
    assert_eq!(cfg.ranges[0].requested, None);
}

#[test]
fn range_end_syntax() {
    let cfg = ok(load(&ipam(json!({"range": "192.168.2.225-192.168.2.230/28"}))));
    assert_eq!(ranges(&cfg), ["192.168.2.224/28 192.168.2.225-192.168.2.230"]);
    // It overrides explicit range_start / range_end.
    let overridden = ipam(json!({
        "range": "192.168.2.225-192.168.2.230/28",
        "range_start": "192.168.2.227", "range_end": "192.168.2.228",
    }));
    assert_eq!(ranges(&ok(load(&overridden))), ["192.168.2.224/28 192.168.2.225-192.168.2.230"]);
    // Inside ipRanges and with sloppy octets too.
    let listed = ipam(json!({"ipRanges": [{"range": "010.0.0.5-010.0.0.9/24"}]}));
    assert_eq!(ranges(&ok(load(&listed))), ["10.0.0.0/24 10.0.0.5-10.0.0.9"]);
}

#[test]
fn top_level_range_and_bounds_are_parsed_sloppily() {
    let cfg = ok(load(&ipam(json!({
        "range": "00192.00168.1.0/24", "range_start": "00192.00168.1.010", "range_end": "192.168.001.020",
    }))));
    assert_eq!(ranges(&cfg), ["192.168.1.0/24 192.168.1.10-192.168.1.20"]);
}

#[test]
fn ip_ranges_bounds_are_parsed_strictly() {
    // The range itself is sloppy-parsed, its bounds are not.
    let cfg = ok(load(&ipam(json!({"ipRanges": [{"range": "010.0.0.0/24", "range_start": "10.0.0.5"}]}))));
    assert_eq!(ranges(&cfg), ["10.0.0.0/24 10.0.0.5-10.0.0.254"]);
    for (bound, value) in
        [("range_start", "010.0.0.5"), ("range_end", "10.0.0.0250"), ("range_start", "10.0.0")]
    {
        let entry = json!({"ipRanges": [{"range": "10.1.0.0/24"}, {"range": "10.0.0.0/24", bound: value}]});
        assert_invalid(value, load(&ipam(entry)), &format!("ipRanges[1].{bound}"), value);
    }
    // An empty string is absent.
    let empty = ipam(json!({"ipRanges": [{"range": "10.0.0.0/24", "range_start": "", "range_end": ""}]}));
    assert_eq!(ranges(&ok(load(&empty))), ["10.0.0.0/24 10.0.0.1-10.0.0.254"]);
}

#[test]
fn ipv6_ranges_are_normalised() {
    for range in ["abcd::1/64", "ABCD:0:0:0::1/64", "abcd:0000::0001/64"] {
        let cfg = ok(load(&ipam(json!({"range": range}))));
        assert_eq!(ranges(&cfg), ["abcd::/64 abcd::1-abcd::ffff:ffff:ffff:fffe"], "{range}");
    }
    let bounded =
        ipam(json!({"range": "2001:db8::/120", "range_start": "2001:DB8::10", "range_end": "2001:db8::20"}));
    assert_eq!(ranges(&ok(load(&bounded))), ["2001:db8::/120 2001:db8::10-2001:db8::20"]);
}

#[test]
fn bounds_on_network_or_broadcast_are_ignored_as_upstream() {
    for (start, end) in [("10.0.0.0", "10.0.0.255"), ("10.0.0.255", "10.0.0.0")] {
        let cfg = ok(load(&ipam(json!({"range": "10.0.0.0/24", "range_start": start, "range_end": end}))));
        assert_eq!(ranges(&cfg), ["10.0.0.0/24 10.0.0.1-10.0.0.254"]);
    }
    assert_eq!(ranges(&ok(load(&ipam(json!({"range": "10.0.0.4/30"}))))), ["10.0.0.4/30 10.0.0.5-10.0.0.6"]);
}

#[test]
fn ranges_come_in_order_and_excludes_apply_to_their_own_range() {
    let cfg = ok(load(&ipam(json!({
        "ipRanges": [{"range": "10.1.0.0/24", "exclude": ["10.1.0.1"]}, {"range": "fd00::/64"}],
        "range": "10.0.0.0/24",
        "exclude": ["10.0.0.229/30", "10.0.0.240", "10.0.0.0/28"],
    }))));
    assert_eq!(
        ranges(&cfg),
        [
            "10.0.0.0/24 10.0.0.1-10.0.0.254",
            "10.1.0.0/24 10.1.0.1-10.1.0.254",
            "fd00::/64 fd00::1-fd00::ffff:ffff:ffff:fffe"
        ]
    );
    let excludes: Vec<Vec<IpNet>> = cfg.ranges.iter().map(|r| r.range.exclude().to_vec()).collect();
    let expected = [
        vec![net("10.0.0.228/30"), net("10.0.0.240/32"), net("10.0.0.0/28")],
        vec![net("10.1.0.1/32")],
        vec![],
    ];
    assert_eq!(excludes, expected);
}

// === 4. refusals naming the key and the value ===

/// Runs `(description, extra ipam keys, key, value)` cases on the file store without a flat file.
fn assert_refusals(cases: &[(&str, Value, &str, &str)]) {
    for (case, extra, key, value) in cases {
        assert_invalid(case, load(&ipam(extra.clone())), key, value);
    }
}

#[test]
fn refuses_bad_range_bounds() {
    assert_refusals(&[
        (
            "invalid range_start",
            json!({"range": "10.0.0.0/24", "range_start": "10.0.0.x"}),
            "range_start",
            "10.0.0.x",
        ),
        (
            "invalid range_end",
            json!({"range": "10.0.0.0/24", "range_end": "10.0.0.256"}),
            "range_end",
            "10.0.0.256",
        ),
        (
            "range_start outside",
            json!({"range": "10.0.0.0/24", "range_start": "10.0.1.5"}),
            "range_start",
            "10.0.1.5",
        ),
        (
            "range_end outside",
            json!({"range": "10.0.0.0/24", "range_end": "10.0.1.0"}),
            "range_end",
            "10.0.1.0",
        ),
        (
            "range_start of the other family",
            json!({"range": "10.0.0.0/24", "range_start": "2001:db8::1"}),
            "range_start",
            "2001:db8::1",
        ),
        (
            "range_start after range_end",
            json!({"range": "10.0.0.0/24", "range_start": "10.0.0.20", "range_end": "10.0.0.10"}),
            "range_start",
            "10.0.0.20",
        ),
        (
            "ipRanges range_end outside",
            json!({"ipRanges": [{"range": "10.0.0.0/24"},
                                {"range": "10.1.0.0/24", "range_end": "10.2.0.1"}]}),
            "ipRanges[1].range_end",
            "10.2.0.1",
        ),
        (
            "ipRanges start after end",
            json!({"ipRanges": [{"range": "10.1.0.0/24",
                                 "range_start": "10.1.0.9", "range_end": "10.1.0.8"}]}),
            "ipRanges[0].range_start",
            "10.1.0.9",
        ),
        ("range_start without range", json!({"range_start": "10.0.0.5"}), "range_start", "10.0.0.5"),
        ("range_end without range", json!({"range_end": "10.0.0.5"}), "range_end", "10.0.0.5"),
        (
            "range_start with an empty range",
            json!({"range": "", "range_start": "10.0.0.5", "ipRanges": [{"range": "10.0.0.0/24"}]}),
            "range_start",
            "10.0.0.5",
        ),
    ]);
}

#[test]
fn refuses_bad_ranges() {
    // Unparsable, too small (/31, /32, /127, /128), or a first-last/prefix whose first is outside the CIDR.
    for range in [
        "10.0.0.0",
        "10.0.0.0/33",
        "ten/8",
        "10.0.0.0/31",
        "10.0.0.5/32",
        "2001:db8::/127",
        "2001:db8::1/128",
        "192.168.1.5-192.168.2.25/28",
        "192.168.2.17-192.168.2.25",
        "garbage-192.168.2.25/28",
        "192.168.2.17-192.168.2.25/33",
        "-",
        "10.0.0.1-10.0.0.1/32",
    ] {
        assert_invalid(range, load(&ipam(json!({"range": range}))), "range", range);
    }
    assert_refusals(&[
        (
            "ipRanges first-last outside",
            json!({"ipRanges": [{"range": "192.168.1.5-192.168.2.25/28"}]}),
            "ipRanges[0].range",
            "192.168.1.5-192.168.2.25/28",
        ),
        ("ipRanges /32", json!({"ipRanges": [{"range": "10.0.0.5/32"}]}), "ipRanges[0].range", "10.0.0.5/32"),
        (
            "ipRanges without range",
            json!({"ipRanges": [{"range_start": "10.0.0.5"}]}),
            "ipRanges[0].range",
            "",
        ),
        (
            "ipRanges inside the top-level range",
            json!({"range": "10.0.0.0/16", "ipRanges": [{"range": "10.0.5.0/24"}]}),
            "ipRanges",
            "10.0.5.0/24",
        ),
        (
            "ipRanges around an earlier one",
            json!({"ipRanges": [{"range": "10.1.0.128/25"}, {"range": "fd00::/64"},
                                {"range": "10.1.0.0/24"}]}),
            "ipRanges",
            "10.1.0.0/24",
        ),
        (
            "the same range twice",
            json!({"range": "fd00::/64", "ipRanges": [{"range": "fd00::1-fd00::9/64"}]}),
            "ipRanges",
            "fd00::/64",
        ),
    ]);
    // Ranges of different families never overlap.
    let dual = ipam(json!({"range": "10.0.0.0/8", "ipRanges": [{"range": "::a00:0/104"}]}));
    assert_eq!(
        ranges(&ok(load(&dual))),
        ["10.0.0.0/8 10.0.0.1-10.255.255.254", "::a00:0/104 ::a00:1-::aff:fffe"]
    );
}

#[test]
fn refuses_bad_excludes() {
    assert_refusals(&[
        (
            "second entry",
            json!({"range": "10.0.0.0/24", "exclude": ["10.0.0.0/28", "10.0.0.300"]}),
            "exclude[1]",
            "10.0.0.300",
        ),
        (
            "leading zeros",
            json!({"range": "10.0.0.0/24", "exclude": ["010.0.0.1"]}),
            "exclude[0]",
            "010.0.0.1",
        ),
        (
            "bad prefix",
            json!({"range": "10.0.0.0/24", "exclude": ["10.0.0.0/40"]}),
            "exclude[0]",
            "10.0.0.0/40",
        ),
        (
            "inside ipRanges",
            json!({"ipRanges": [{"range": "10.0.0.0/24", "exclude": ["10.0.0.1", "x", "y"]}]}),
            "ipRanges[0].exclude[1]",
            "x",
        ),
    ]);
}

#[test]
fn refuses_an_exclude_of_the_other_family() {
    for extra in [
        json!({"range": "10.0.0.0/24", "exclude": ["10.0.0.1", "2001:db8::/64"]}),
        json!({"ipRanges": [{"range": "2001:db8::/64", "exclude": ["10.0.0.0/8"]}]}),
    ] {
        let result = load(&ipam(extra.clone()));
        assert!(
            matches!(&result, Err(ConfigError::Invalid { key, reason, .. })
                if key.contains("exclude") && reason.contains("address family")),
            "{extra}: {result:?}"
        );
    }
}

#[test]
fn exclude_of_the_other_family_names_the_entry_as_written() {
    let extra = json!({"range": "10.0.0.0/24", "exclude": ["10.0.0.1", "2001:DB8::1"]});
    assert_invalid("other family", load(&ipam(extra)), "exclude[1]", "2001:DB8::1");
}

#[test]
fn bound_outside_the_network_is_reported_as_written() {
    let extra = json!({"range": "10.0.0.0/24", "range_start": "010.0.1.5"});
    assert_invalid("sloppy bound outside", load(&ipam(extra)), "range_start", "010.0.1.5");
}

#[test]
fn reversed_range_end_syntax_names_the_range() {
    let range = "192.168.2.230-192.168.2.225/28";
    assert_invalid("reversed", load(&ipam(json!({"range": range}))), "range", range);
}

#[test]
fn refuses_gateways_outside_every_range() {
    assert_refusals(&[
        ("outside the range", json!({"range": "10.0.0.0/24", "gateway": "10.0.1.1"}), "gateway", "10.0.1.1"),
        ("other family", json!({"range": "10.0.0.0/24", "gateway": "fd00::1"}), "gateway", "fd00::1"),
        ("no range at all", json!({"gateway": "10.0.0.1"}), "gateway", "10.0.0.1"),
        ("not an IP", json!({"range": "10.0.0.0/24", "gateway": "10.0.0.1/24"}), "gateway", "10.0.0.1/24"),
    ]);
    // Inside a range (sloppy, anywhere in its network), or inside a static address's subnet.
    let cases = [
        (json!({"range": "10.0.0.0/24", "gateway": "010.0.0.001"}), "10.0.0.1"),
        (json!({"range": "10.0.0.0/24", "range_start": "10.0.0.100", "gateway": "10.0.0.255"}), "10.0.0.255"),
        (
            json!({"ipRanges": [{"range": "10.0.0.0/24"}, {"range": "fd00::/64"}], "gateway": "fd00::1"}),
            "fd00::1",
        ),
        (json!({"addresses": [{"address": "192.168.0.5/24"}], "gateway": "192.168.0.1"}), "192.168.0.1"),
    ];
    for (extra, gateway) in cases {
        assert_eq!(ok(load(&ipam(extra))).gateway, Some(ip(gateway)), "{gateway}");
    }
}

#[test]
fn refuses_bad_routes_and_addresses() {
    assert_refusals(&[
        ("dst without prefix", json!({"routes": [{"dst": "10.0.0.0"}]}), "routes[0].dst", "10.0.0.0"),
        ("dst missing", json!({"routes": [{"dst": "0.0.0.0/0"}, {"gw": "10.0.0.1"}]}), "routes[1].dst", ""),
        ("sloppy dst", json!({"routes": [{"dst": "010.0.0.0/8"}]}), "routes[0].dst", "010.0.0.0/8"),
        (
            "bad gw",
            json!({"routes": [{"dst": "0.0.0.0/0", "gw": "10.0.0.one"}]}),
            "routes[0].gw",
            "10.0.0.one",
        ),
        (
            "address without prefix",
            json!({"addresses": [{"address": "10.0.0.5"}]}),
            "addresses[0].address",
            "10.0.0.5",
        ),
        ("address missing", json!({"addresses": [{"gateway": "10.0.0.1"}]}), "addresses[0].address", ""),
        (
            "bad address gateway",
            json!({"addresses": [{"address": "10.0.0.5/24"},
                                 {"address": "10.0.1.5/24", "gateway": "010.0.1.1"}]}),
            "addresses[1].gateway",
            "010.0.1.1",
        ),
    ]);
    // Accepted forms keep host bits (and routes re-print IPv6 canonically).
    let cfg = ok(load(&ipam(json!({
        "routes": [{"dst": "3ffe:ffff:0:01ff::1/64", "gw": "3ffe:ffff:0:1ff::fe", "mtu": 1280, "advmss": 1220,
                    "priority": 5, "table": 100, "scope": 0}],
        "addresses": [{"address": "010.10.0.1/24", "gateway": "10.10.0.254"}],
    }))));
    let full = Route {
        mtu: Some(1280),
        advmss: Some(1220),
        priority: Some(5),
        table: Some(100),
        scope: Some(0),
        ..route("3ffe:ffff:0:1ff::1/64", Some("3ffe:ffff:0:1ff::fe"))
    };
    assert_eq!(cfg.routes, [full]);
    assert_eq!(cfg.routes[0].dst.to_string(), "3ffe:ffff:0:1ff::1/64");
    assert_eq!(cfg.addresses, [static_address("10.10.0.1/24", Some("10.10.0.254"))]);
}

#[test]
fn refuses_unknown_datastores() {
    let flat = format!(r#"{{"kubernetes": {{"kubeconfig": "{KUBECONFIG}"}}}}"#);
    for store in ["consul", "File", "etcd3"] {
        assert_invalid(store, load_flat(&bare(json!({"datastore": store})), &flat), "datastore", store);
    }
    // etcd needs a host.
    assert_invalid("etcd", load_flat(&bare(json!({"datastore": "etcd"})), &flat), "etcd_host", "");
}

// === 5. flat file merge ===

#[test]
fn inline_non_empty_values_win_over_the_flat_file() {
    let inline = bare(json!({"range": "10.0.0.0/24", "network_name": "inline", "log_level": "error"}));
    let flat = format!(
        r#"{{"range": "10.9.0.0/24", "network_name": "flat", "log_level": "panic",
            "kubernetes": {{"kubeconfig": "{KUBECONFIG}"}}}}"#
    );
    let cfg = ok(load_flat(&inline, &flat));
    assert_eq!(ranges(&cfg), ["10.0.0.0/24 10.0.0.1-10.0.0.254"]);
    assert_eq!(cfg.network_name, "inline");
    assert_eq!(cfg.log.level, LogLevel::Error);
    assert_eq!(cfg.datastore, kube_store(KUBECONFIG));
}

#[test]
fn flat_file_supplies_missing_keys() {
    // Also: the flat file's keys are matched case-insensitively and normalised like inline ones, and an
    // inline range_start combines with a flat range (the merge happens before normalisation).
    let inline = bare(json!({"range_start": "10.0.0.100", "network_name": "", "ipRanges": []}));
    let flat = format!(
        r#"{{"Range": "010.0.0.0/24", "IPRanges": [{{"range": "fd00::/120"}}], "gateway": "10.0.0.1",
            "addresses": [{{"address": "192.168.0.5/24"}}], "network_name": "flat-net",
            "node_slice_size": "/28",
            "configuration_path": "/etc/cni/net.d/whereabouts.d", "log_file": "/var/log/wb.log",
            "KUBERNETES": {{"KubeConfig": "{KUBECONFIG}"}}}}"#
    );
    let cfg = ok(load_flat(&inline, &flat));
    assert_eq!(ranges(&cfg), ["10.0.0.0/24 10.0.0.100-10.0.0.254", "fd00::/120 fd00::1-fd00::fe"]);
    assert_eq!(cfg.gateway, Some(ip("10.0.0.1")));
    assert_eq!(cfg.addresses, [static_address("192.168.0.5/24", None)]);
    assert_eq!(cfg.network_name, "flat-net");
    assert_eq!(cfg.node_slice_size.as_deref(), Some("/28"));
    assert_eq!(cfg.configuration_path.as_deref(), Some("/etc/cni/net.d/whereabouts.d"));
    assert_eq!(cfg.log.file.as_deref(), Some("/var/log/wb.log"));
    assert_eq!(cfg.datastore, kube_store(KUBECONFIG));
}

#[test]
fn flat_values_are_validated_like_inline_ones() {
    let flat = format!(r#"{{"range": "10.0.0.0/32", "kubernetes": {{"kubeconfig": "{KUBECONFIG}"}}}}"#);
    assert_invalid("flat /32", load_flat(&bare(json!({})), &flat), "range", "10.0.0.0/32");
}

#[test]
fn objects_merge_field_by_field() {
    let inline = ipam(json!({"dns": {"domain": "inline.example", "search": []},
                              "kubernetes": {"k8s_api_root": "https://example.invalid"}}));
    let flat = r#"{"dns": {"nameservers": ["10.0.0.10", "10.0.0.11"], "domain": "flat.example",
                           "search": ["svc.example"], "options": ["ndots:5"]},
                   "kubernetes": {"kubeconfig": "/k"}}"#;
    let cfg = ok(load_flat(&inline, flat));
    let expected = Dns {
        nameservers: vec!["10.0.0.10".into(), "10.0.0.11".into()],
        domain: Some("inline.example".into()),
        search: vec!["svc.example".into()],
        options: vec!["ndots:5".into()],
    };
    assert_eq!(cfg.dns, expected);
    // The inline datastore is "file": the merged kubeconfig is not used.
    assert_eq!(cfg.datastore, file_store(DEFAULT_FILE_STORE_DIR));
}

#[test]
fn arrays_are_replaced_whole() {
    let flat = r#"{"routes": [{"dst": "10.1.0.0/16"}, {"dst": "10.2.0.0/16", "gw": "10.0.0.1"}],
                   "exclude": ["10.0.0.0/28"], "range": "10.0.0.0/24"}"#;
    let flat_routes = [route("10.1.0.0/16", None), route("10.2.0.0/16", Some("10.0.0.1"))];
    let cases = [
        (json!({"routes": [{"dst": "0.0.0.0/0"}]}), vec![route("0.0.0.0/0", None)]),
        (json!({"routes": []}), flat_routes.to_vec()),
        (json!({"routes": null}), flat_routes.to_vec()),
        (json!({}), flat_routes.to_vec()),
    ];
    for (extra, expected) in cases {
        let case = extra.to_string();
        assert_eq!(ok(load_flat(&ipam(extra), flat)).routes, expected, "{case}");
    }
    let excluded = ok(load_flat(&ipam(json!({"exclude": ["10.0.0.128/25"]})), flat));
    assert_eq!(excluded.ranges[0].range.exclude(), [net("10.0.0.128/25")]);
}

#[test]
fn flat_empty_values_never_turn_inline_values_off() {
    let inline = bare(json!({
        "range": "10.0.0.0/24", "network_name": "n", "log_level": "error", "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"domain": "inline.example"}, "kubernetes": {"kubeconfig": KUBECONFIG},
        "leader_lease_duration": 1500, "enable_overlapping_ranges": true, "node_slice_size": "/28",
    }));
    let flat = r#"{"range": "", "network_name": "", "log_level": "", "routes": [], "dns": {"domain": ""},
                   "kubernetes": {"kubeconfig": ""}, "leader_lease_duration": 0,
                   "enable_overlapping_ranges": false, "node_slice_size": "", "datastore": ""}"#;
    let alone = ok(load(&inline));
    assert_eq!(load_flat(&inline, flat), Ok(alone.clone()));
    assert_eq!(alone.network_name, "n");
    assert!(alone.enable_overlapping_ranges);
}

#[test]
fn enable_overlapping_ranges_comes_from_the_inline_value_only() {
    let cases = [
        (json!({}), "false", true),
        (json!({"enable_overlapping_ranges": null}), "false", true),
        (json!({"enable_overlapping_ranges": false}), "true", false),
        (json!({"enable_overlapping_ranges": true}), "false", true),
        (json!({"ENABLE_OVERLAPPING_RANGES": false}), "true", false),
        (json!({}), "null", true),
    ];
    for (extra, flat_value, expected) in cases {
        let case = format!("inline {extra}, flat {flat_value}");
        let flat = format!(r#"{{"enable_overlapping_ranges": {flat_value}}}"#);
        assert_eq!(ok(load_flat(&ipam(extra), &flat)).enable_overlapping_ranges, expected, "{case}");
    }
}

#[test]
fn broken_flat_file_is_a_decode_error_naming_its_path() {
    let context = format!("flat file {FLAT_PATH}");
    for (content, mentions) in [
        ("{not json", "line 1"),
        ("", "EOF"),
        ("[]", "expected a JSON object"),
        ("null", "expected a JSON object"),
        (r#"{"enable_overlapping_ranges": "false"}"#, "enable_overlapping_ranges"),
        (r#"{"kubernetes": {"kubeconfig": ["/k"]}}"#, "kubernetes.kubeconfig"),
    ] {
        // Even a complete inline configuration does not skip a flat file that was found.
        assert_decode(
            content,
            load_flat(&ipam(json!({"range": "10.0.0.0/24"})), content),
            &context,
            mentions,
        );
    }
    let bytes = FlatFile { path: "/custom/whereabouts.conf", content: b"\xff\xfe{}" };
    let result = config::load(&ipam(json!({})), Some(bytes), &ctx());
    assert!(
        matches!(&result, Err(ConfigError::Decode { context, .. })
            if context == "flat file /custom/whereabouts.conf"),
        "{result:?}"
    );
}

// === 6. when the flat file is optional ===

#[test]
fn inline_file_store_needs_no_flat_file() {
    assert_eq!(load(&ipam(json!({}))), Ok(defaults()));
    for (dir, expected) in [("/tmp/wb", "/tmp/wb"), ("", DEFAULT_FILE_STORE_DIR)] {
        let cfg = ok(load(&ipam(json!({"file_store_dir": dir}))));
        assert_eq!(cfg.datastore, file_store(expected), "{dir:?}");
    }
    // The flat file can name the store as well.
    let cfg = ok(load_flat(&bare(json!({})), r#"{"datastore": "file", "file_store_dir": "/srv/wb"}"#));
    assert_eq!(cfg.datastore, file_store("/srv/wb"));
}

#[test]
fn without_a_complete_inline_store_the_flat_file_is_required() {
    let not_found = "config file not found";
    let cases = [
        json!({}),
        json!({"datastore": "kubernetes"}),
        json!({"datastore": ""}),
        json!({"kubernetes": {"kubeconfig": ""}}),
        json!({"datastore": "etcd"}),
        json!({"datastore": "etcd", "etcd_host": ""}),
        json!({"datastore": "consul"}),
        json!({"range": "10.0.0.0/24", "file_store_dir": "/tmp/wb"}),
    ];
    for extra in cases {
        assert_missing(&extra.to_string(), load(&bare(extra.clone())), not_found);
    }
    // With a flat file that does not name a kubeconfig either: upstream's storage error.
    for flat in
        ["{}", r#"{"kubernetes": {}}"#, r#"{"kubernetes": {"kubeconfig": ""}, "datastore": "kubernetes"}"#]
    {
        assert_missing(flat, load_flat(&bare(json!({})), flat), KUBECONFIG_MISSING);
    }
}

#[test]
fn kubernetes_store() {
    for extra in [
        json!({"kubernetes": {"kubeconfig": KUBECONFIG}}),
        json!({"datastore": "kubernetes", "Kubernetes": {"KUBECONFIG": KUBECONFIG}}),
    ] {
        let cfg = ok(load(&bare(extra.clone())));
        assert_eq!(cfg.datastore, kube_store(KUBECONFIG), "{extra}");
    }
    // The installer's flat file.
    let installer = r#"{"datastore":"kubernetes","configuration_path":"/etc/cni/net.d/whereabouts.d",
        "kubernetes":{"kubeconfig":"/etc/cni/net.d/whereabouts.d/whereabouts.kubeconfig"},
        "reconciler_cron_expression":"30 4 * * *"}"#;
    let cfg = ok(load_flat(&bare(json!({"range": "10.0.0.0/24"})), installer));
    assert_eq!(cfg.datastore, kube_store(KUBECONFIG));
    assert_eq!(cfg.configuration_path.as_deref(), Some("/etc/cni/net.d/whereabouts.d"));
}

#[test]
fn etcd_store() {
    let cfg = ok(load(&bare(json!({
        "datastore": "etcd", "etcd_host": "https://a:2379,https://b:2379", "etcd_username": "u",
        "etcd_password": "p", "etcd_key_file": "/k.pem", "etcd_cert_file": "/c.pem", "etcd_ca_cert_file": "",
    }))));
    let expected = Datastore::Etcd(EtcdConfig {
        hosts: "https://a:2379,https://b:2379".into(),
        username: Some("u".into()),
        password: Some("p".into()),
        key_file: Some("/k.pem".into()),
        cert_file: Some("/c.pem".into()),
        ca_cert_file: None,
        key_prefix: "/whereabouts/".into(),
    });
    assert_eq!(cfg.datastore, expected);
    // The flat file can supply the host and credentials.
    let flat = r#"{"etcd_host": "h:2379", "etcd_username": "x", "etcd_ca_cert_file": "/ca.pem", "etcd_key_prefix": "/ipam/"}"#;
    let merged = ok(load_flat(&bare(json!({"datastore": "etcd"})), flat));
    let expected = Datastore::Etcd(EtcdConfig {
        hosts: "h:2379".into(),
        username: Some("x".into()),
        password: None,
        key_file: None,
        cert_file: None,
        ca_cert_file: Some("/ca.pem".into()),
        key_prefix: "/ipam/".into(),
    });
    assert_eq!(merged.datastore, expected);
}

#[test]
fn flat_file_candidates_and_completeness() {
    let parse = |extra: Value| InlineIpam::parse(&bare(extra)).unwrap();
    let mut expected = vec!["/my/whereabouts.conf".to_string()];
    expected.extend(FLAT_FILE_PATHS.map(String::from));
    let inline_path = parse(json!({"Configuration_Path": "/my/whereabouts.conf"}));
    assert_eq!(inline_path.flat_file_candidates(), expected);
    assert_eq!(parse(json!({"configuration_path": ""})).flat_file_candidates(), FLAT_FILE_PATHS);
    for (extra, complete) in [
        (json!({}), false),
        (json!({"datastore": "file"}), true),
        (json!({"kubernetes": {"kubeconfig": "/k"}}), true),
        (json!({"datastore": "kubernetes"}), false),
        (json!({"datastore": "etcd", "etcd_host": "h"}), true),
        (json!({"datastore": "etcd", "kubernetes": {"kubeconfig": "/k"}}), false),
    ] {
        assert_eq!(parse(extra.clone()).is_complete(), complete, "{extra}");
    }
}

// === 7. requested addresses ===

/// Loads `extra` (file store) with a current `cniVersion`, the requested addresses and `CNI_ARGS`.
fn load_requested(extra: Value, requested: &[(&'static str, &str)], cni_args: &str) -> Loaded {
    config::load(&ipam(extra), None, &call("1.0.0", requested, cni_args))
}

#[test]
fn requested_addresses_inside_a_range_are_allocated_there() {
    let dual =
        json!({"range": "10.0.0.0/24", "ipRanges": [{"range": "fd00::/64"}, {"range": "10.1.0.0/24"}]});
    let cases: [(Requested, &str, [Option<&str>; 3]); 5] = [
        (&[("runtimeConfig.ips", "10.0.0.50/24")], "", [Some("10.0.0.50"), None, None]),
        (&[], "IP=10.1.0.60/24", [None, None, Some("10.1.0.60")]),
        (
            &[("args.cni.ips", "fd00::5/64"), ("args.cni.ips", "10.0.0.7")],
            "",
            [Some("10.0.0.7"), Some("fd00::5"), None],
        ),
        (
            &[("runtimeConfig.ips", "010.0.0.8/16")],
            "IP=10.1.0.9/8",
            [Some("10.0.0.8"), None, Some("10.1.0.9")],
        ),
        (&[], "", [None, None, None]),
    ];
    for (requested_ips, cni_args, expected) in cases {
        let cfg = ok(load_requested(dual.clone(), requested_ips, cni_args));
        let expected: Vec<Option<IpAddr>> = expected.iter().map(|e| e.map(ip)).collect();
        assert_eq!(requested(&cfg), expected, "{requested_ips:?} {cni_args}");
        assert!(cfg.addresses.is_empty(), "{requested_ips:?} {cni_args}: {:?}", cfg.addresses);
    }
}

#[test]
fn requested_addresses_outside_every_range_become_static() {
    let range = json!({"range": "10.0.0.0/24", "range_start": "10.0.0.100",
                       "addresses": [{"address": "172.16.0.5/16"}]});
    let cfg = ok(load_requested(
        range,
        &[("runtimeConfig.ips", "192.168.5.5/24")],
        "IP=192.168.6.6/24,fd00::6/64;GATEWAY=10.9.9.1,192.168.5.1,fd00::1",
    ));
    assert_eq!(requested(&cfg), [None]);
    assert_eq!(
        cfg.addresses,
        [
            static_address("172.16.0.5/16", None),
            static_address("192.168.5.5/24", Some("192.168.5.1")),
            static_address("192.168.6.6/24", None),
            static_address("fd00::6/64", Some("fd00::1")),
        ]
    );
    // A top-level gateway inside such an address's subnet is accepted.
    let gw =
        ok(load_requested(json!({"gateway": "192.168.5.1"}), &[("runtimeConfig.ips", "192.168.5.5/24")], ""));
    assert_eq!(gw.gateway, Some(ip("192.168.5.1")));
}

/// A dynamic interval carved out of a subnet leaves the rest for fixed addresses (upstream returns
/// them): an address outside range_start..range_end or inside exclude is allocated in the range's pool,
/// so a second claimant is refused. The subnet's IPv4 network and broadcast addresses are refused.
#[test]
fn requested_addresses_anywhere_in_a_range_are_allocated_there() {
    let range = json!({"range": "10.0.0.0/24", "range_start": "10.0.0.100", "exclude": ["10.0.0.200/29"]});
    for (value, source) in [("10.0.0.50/24", "args.cni.ips"), ("10.0.0.201", "runtimeConfig.ips")] {
        let cfg = ok(load_requested(range.clone(), &[(source, value)], ""));
        assert_eq!(requested(&cfg), [Some(ip(value.trim_end_matches("/24")))], "{value}");
    }
    for (value, source) in [("10.0.0.255/24", "runtimeConfig.ips"), ("10.0.0.0", "args.cni.ips")] {
        assert_invalid(value, load_requested(range.clone(), &[(source, value)], ""), source, value);
    }
    assert_invalid("CNI_ARGS", load_requested(range, &[], "IP=10.0.0.255"), "CNI_ARGS IP", "10.0.0.255");
}

/// podman sends `IP=<address>` without a prefix for `--ip`, and may send the same address through
/// `runtimeConfig.ips` too: asked twice, it counts once.
#[test]
fn bare_and_repeated_requests_are_one_request() {
    let dual = json!({"range": "10.0.0.0/24", "ipRanges": [{"range": "fd00::/64"}]});
    let cfg = ok(load_requested(
        dual.clone(),
        &[("runtimeConfig.ips", "10.0.0.50/24"), ("runtimeConfig.ips", "fd00::7")],
        "IP=10.0.0.50,fd00::7,10.0.0.50/24",
    ));
    assert_eq!(requested(&cfg), [Some(ip("10.0.0.50")), Some(ip("fd00::7"))]);
    // A bare address outside every range has no prefix to configure it with.
    assert_invalid(
        "bare outside",
        load_requested(dual.clone(), &[], "IP=192.0.2.9"),
        "CNI_ARGS IP",
        "192.0.2.9",
    );
    // The same static address twice is returned once.
    let cfg = ok(load_requested(dual, &[("runtimeConfig.ips", "192.0.2.9/24")], "IP=192.0.2.9/24"));
    assert_eq!(cfg.addresses, [static_address("192.0.2.9/24", None)]);
}

/// An ADD with nothing to assign is a configuration error, not an empty success.
#[test]
fn a_configuration_without_addresses_cannot_add() {
    let empty = ok(load(&ipam(json!({}))));
    assert_invalid("empty", empty.check_assigns_an_address(), "range", "");
    for extra in [
        json!({"range": "10.0.0.0/24"}),
        json!({"ipRanges": [{"range": "fd00::/64"}]}),
        json!({"addresses": [{"address": "192.0.2.5/24"}]}),
    ] {
        assert_eq!(ok(load(&ipam(extra.clone()))).check_assigns_an_address(), Ok(()), "{extra}");
    }
    let requested_static = ok(load_requested(json!({}), &[], "IP=192.0.2.9/24"));
    assert_eq!(requested_static.check_assigns_an_address(), Ok(()));
}

/// Each ipRanges entry may name its own gateway (dual stack behind a bridge with isGateway): it is
/// that range's, and the top-level gateway belongs to the range containing it.
#[test]
fn each_range_carries_its_gateway() {
    let cfg = ok(load(&ipam(json!({
        "range": "10.0.0.0/24", "gateway": "10.0.0.1",
        "ipRanges": [{"range": "fd00::/64", "gateway": "fd00::1"}, {"range": "10.1.0.0/24"}],
    }))));
    let gateways: Vec<Option<IpAddr>> = cfg.ranges.iter().map(|r| r.gateway).collect();
    assert_eq!(gateways, [Some(ip("10.0.0.1")), Some(ip("fd00::1")), None]);
    assert_refusals(&[
        (
            "outside its range",
            json!({"ipRanges": [{"range": "fd00::/64", "gateway": "fd01::1"}]}),
            "ipRanges[0].gateway",
            "fd01::1",
        ),
        (
            "not an IP",
            json!({"ipRanges": [{"range": "fd00::/64"}, {"range": "10.0.0.0/24", "gateway": "x"}]}),
            "ipRanges[1].gateway",
            "x",
        ),
    ]);
}

/// DEL and GC only need the pools: a configuration ADD refuses still loads, by its ranges' networks.
#[test]
fn the_release_view_accepts_what_add_refuses() {
    let refused = ipam(json!({
        "range": "10.0.0.0/24", "range_start": "10.9.9.9", "gateway": "172.16.0.1", "exclude": ["garbage"],
        "ipRanges": [{"range": "10.0.0.0/25"}, {"range": "not-a-cidr"}, {"range": "2001:db8::5-2001:db8::1/64"}],
        "routes": [{"dst": "bad"}],
    }));
    assert!(load(&refused).is_err());
    let release =
        CallContext { purpose: Purpose::Release, ..call("1.0.0", &[("runtimeConfig.ips", "x")], "") };
    let cfg = config::load(&refused, None, &release).expect("the release view loads");
    let networks: Vec<String> = cfg.ranges.iter().map(|r| r.range.network().to_string()).collect();
    assert_eq!(networks, ["10.0.0.0/24", "10.0.0.0/25", "2001:db8::/64"]);
    // It still needs a store, and an invalid network_name leaves nothing to release.
    assert!(config::load(&bare(json!({"range": "10.0.0.0/24"})), None, &release).is_err());
    let bad_name = ipam(json!({"range": "10.0.0.0/24", "network_name": "Bad/Name"}));
    assert!(config::load(&bad_name, None, &release).expect("loads").ranges.is_empty());
    assert_invalid("network_name", load(&bad_name), "network_name", "Bad/Name");
}

#[test]
fn refuses_unusable_requested_addresses() {
    let range = json!({"range": "10.0.0.0/24"});
    let cases: [(Requested, &str, &str, &str); 5] = [
        (&[("runtimeConfig.ips", "192.168.5.5")], "", "runtimeConfig.ips", "192.168.5.5"),
        (&[("args.cni.ips", "not-an-ip")], "", "args.cni.ips", "not-an-ip"),
        (
            &[("runtimeConfig.ips", "10.0.0.50/24"), ("args.cni.ips", "10.0.0.51/24")],
            "",
            "args.cni.ips",
            "10.0.0.51/24",
        ),
        (&[("runtimeConfig.ips", "10.0.0.50")], "IP=10.0.0.51/24", "CNI_ARGS IP", "10.0.0.51/24"),
        (&[], "IP=10.0.0.50/24,10.0.0.52", "CNI_ARGS IP", "10.0.0.52"),
    ];
    for (requested_ips, cni_args, key, value) in cases {
        let case = format!("{requested_ips:?} {cni_args}");
        assert_invalid(&case, load_requested(range.clone(), requested_ips, cni_args), key, value);
    }
}

// === 8. cniVersion ===

#[test]
fn old_cni_versions_allow_one_static_address_per_family() {
    let two_v4 = json!({"addresses": [{"address": "10.0.0.5/24"}, {"address": "10.0.1.5/24"}]});
    let two_v6 = json!({"addresses": [{"address": "fd00::5/64"}, {"address": "fd01::5/64"}]});
    let one_each = json!({"addresses": [{"address": "10.0.0.5/24"}, {"address": "fd00::5/64"}]});
    let one_v4_in_range = json!({"range": "10.1.0.0/24", "addresses": [{"address": "10.0.0.5/24"}]});
    let cases = [
        ("0.2.0", &two_v4, "", true),
        ("", &two_v4, "", true),
        ("0.1.0", &two_v6, "", true),
        ("0.2.0", &one_v4_in_range, "IP=10.2.0.5/24", true),
        ("0.2.0", &one_each, "", false),
        ("0.3.1", &two_v4, "", false),
        ("1.1.0", &two_v6, "", false),
        ("0.2.0", &one_v4_in_range, "IP=10.1.0.5/24", false),
    ];
    for (version, extra, cni_args, refused) in cases {
        let case = format!("{version:?} {extra} {cni_args}");
        let result = config::load(&ipam(extra.clone()), None, &call(version, &[], cni_args));
        if refused {
            assert_invalid(&case, result, "cniVersion", version);
        } else {
            assert!(result.is_ok(), "{case}: {result:?}");
        }
    }
}

// === 9. logging ===

#[test]
fn log_level_and_file() {
    let warning = |level: &str| Some(format!("Whereabouts logging: cannot set logging level to {level}"));
    let cases = [
        (json!({}), LogLevel::Debug, None),
        (json!({"log_level": ""}), LogLevel::Debug, None),
        (json!({"log_level": "debug"}), LogLevel::Debug, None),
        (json!({"log_level": "VERBOSE"}), LogLevel::Verbose, None),
        (json!({"log_level": "Error"}), LogLevel::Error, None),
        (json!({"log_level": "panic"}), LogLevel::Panic, None),
        (json!({"log_level": "info"}), LogLevel::Debug, warning("info")),
        (json!({"log_level": " error"}), LogLevel::Debug, warning(" error")),
    ];
    for (extra, level, warning) in cases {
        let log = ok(load(&ipam(extra.clone()))).log;
        assert_eq!(log, LogSettings { file: None, level, warning }, "{extra}");
    }
    for (file, expected) in [("/var/log/whereabouts.log", Some("/var/log/whereabouts.log")), ("", None)] {
        assert_eq!(ok(load(&ipam(json!({"log_file": file})))).log.file.as_deref(), expected, "{file:?}");
    }
    // Upstream's names, most verbose first.
    let levels = [LogLevel::Debug, LogLevel::Verbose, LogLevel::Error, LogLevel::Panic];
    assert!(levels.is_sorted());
    assert_eq!(levels.map(LogLevel::name), ["debug", "verbose", "error", "panic"]);
}

#[test]
fn unknown_log_level_warning_keeps_the_value_as_written() {
    let log = ok(load(&ipam(json!({"log_level": "LOUD"})))).log;
    assert_eq!(log.warning.as_deref(), Some("Whereabouts logging: cannot set logging level to LOUD"));
}

// === 9b. pools and node slices ===

#[test]
fn every_range_names_its_cluster_wide_pool_and_keeps_its_prefix() {
    let cfg = ok(load(&ipam(json!({
        "network_name": "blue", "range": "10.0.0.0/24", "ipRanges": [{"range": "fd00::/64"}],
    }))));
    let pools: Vec<(&str, String, String)> = cfg
        .ranges
        .iter()
        .map(|r| (r.pool.name.as_str(), r.pool.network.to_string(), r.network.to_string()))
        .collect();
    assert_eq!(
        pools,
        [
            ("blue-10.0.0.0-24", "10.0.0.0/24".into(), "10.0.0.0/24".into()),
            ("blue-fd00---64", "fd00::/64".into(), "fd00::/64".into()),
        ]
    );
    // DEL finds the same pools.
    let release = CallContext { purpose: Purpose::Release, ..ctx() };
    let cfg =
        ok(config::load(&ipam(json!({"range": "10.0.0.0/24", "network_name": "blue"})), None, &release));
    assert_eq!(cfg.ranges[0].pool.name, "blue-10.0.0.0-24");
}

#[test]
fn node_slice_size_slices_the_first_range() {
    let cfg = ok(load(&ipam(json!({"range": "10.0.0.0/24", "ipRanges": [{"range": "fd00::/64"}]}))));
    assert_eq!(cfg.node_slicing(), Ok(None));
    let cfg = ok(load(&ipam(json!({
        "range": "10.0.0.0/24", "ipRanges": [{"range": "fd00::/64"}], "node_slice_size": "/26",
    }))));
    let slicing = cfg.node_slicing().expect("valid").expect("sliced");
    assert_eq!((slicing.range().network(), slicing.size()), (net("10.0.0.0/24"), 26));
    for (size, range) in [("/x", "10.0.0.0/24"), ("/23", "10.0.0.0/24"), ("/31", "10.0.0.0/24"), ("26", "")] {
        let mut extra = json!({"node_slice_size": size, "addresses": [{"address": "192.0.2.1/24"}]});
        if !range.is_empty() {
            extra["range"] = json!(range);
        }
        let cfg = ok(load(&ipam(extra)));
        assert_invalid(size, cfg.node_slicing().map(|_| cfg.clone()), "node_slice_size", size);
    }
}

#[test]
fn a_range_narrowed_to_a_node_slice() {
    let with_request = call("1.0.0", &[("runtimeConfig.ips", "10.0.0.70")], "");
    let conf = ipam(json!({"range": "10.0.0.0/24", "exclude": ["10.0.0.64/30"], "node_slice_size": "/26",
                           "network_name": "blue"}));
    let cfg = ok(config::load(&conf, None, &with_request));
    let slicing = cfg.node_slicing().expect("valid").expect("sliced");
    let (slice, inside) = slicing.check_assigned("10.0.0.0/24", "/26", Some("10.0.0.64/26")).expect("usable");
    let sliced = cfg.ranges[0].in_node_slice(&cfg.network_name, "node-a", slice, inside).expect("fits");
    assert_eq!(sliced.pool.name, "blue-node-a-10.0.0.64-26");
    assert_eq!(sliced.pool.network, net("10.0.0.64/26"));
    assert_eq!(sliced.network, net("10.0.0.0/24"), "the result keeps the whole range's prefix");
    assert_eq!(summary(&sliced.range), "10.0.0.64/26 10.0.0.65-10.0.0.126");
    assert_eq!(sliced.range.exclude(), [net("10.0.0.64/30")]);
    assert_eq!(sliced.requested, Some(ip("10.0.0.70")));

    // Without network_name, and a requested address in another node's slice.
    let conf = ipam(json!({"range": "10.0.0.0/24", "node_slice_size": "/26"}));
    let cfg = ok(config::load(&conf, None, &call("1.0.0", &[("runtimeConfig.ips", "10.0.0.5")], "")));
    let slicing = cfg.node_slicing().expect("valid").expect("sliced");
    let (slice, inside) = slicing.check_assigned("10.0.0.0/24", "/26", Some("10.0.0.64/26")).expect("usable");
    let refused = cfg.ranges[0].in_node_slice("", "node-a", slice, inside.clone());
    assert_invalid("requested elsewhere", refused.map(|_| cfg.clone()), "requested address", "10.0.0.5");
    let cfg = ok(config::load(&conf, None, &ctx()));
    let sliced = cfg.ranges[0].in_node_slice("", "node-a", slice, inside).expect("fits");
    assert_eq!(sliced.pool.name, "node-a-10.0.0.64-26");
}

// === 10. property tests ===

/// `name` in random case.
fn random_case(name: &'static str) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<bool>(), name.len()).prop_map(move |upper| {
        name.chars().zip(upper).map(|(c, u)| if u { c.to_ascii_uppercase() } else { c }).collect()
    })
}

/// Any key of the schema, at any level, in random case; now and then an arbitrary one.
fn key() -> impl Strategy<Value = String> {
    let all = [TOP_LEVEL_KEYS, RANGE_KEYS, ROUTE_KEYS, DNS_KEYS, ADDRESS_KEYS, KUBERNETES_KEYS];
    let names: Vec<&'static str> = all.iter().flat_map(|keys| keys.split_whitespace()).collect();
    prop_oneof![8 => prop::sample::select(names).prop_flat_map(random_case), 1 => "\\PC{0,8}"]
}

/// IPv4 text, sometimes with leading zeros or out-of-range octets, with or without a prefix.
fn ipv4_text() -> impl Strategy<Value = String> {
    let octets = prop::array::uniform4(prop_oneof![4 => 0u16..256, 1 => 256u16..1000]);
    (octets, prop::array::uniform4(prop_oneof![6 => Just(0usize), 1 => 1usize..3]), prop::option::of(0u8..40))
        .prop_map(|(octets, zeros, prefix)| {
            let parts: Vec<String> =
                octets.iter().zip(zeros).map(|(o, z)| format!("{}{o}", "0".repeat(z))).collect();
            with_prefix(parts.join("."), prefix)
        })
}

/// IPv6 text, often in a small corner of the space so that ranges, bounds and addresses meet.
fn ipv6_text() -> impl Strategy<Value = String> {
    (
        prop_oneof![any::<u128>(), any::<u16>().prop_map(|low| (0xfd00u128 << 112) | u128::from(low))],
        prop::option::of(0u8..135),
    )
        .prop_map(|(bits, prefix)| with_prefix(std::net::Ipv6Addr::from_bits(bits).to_string(), prefix))
}

fn with_prefix(ip: String, prefix: Option<u8>) -> String {
    match prefix {
        Some(p) => format!("{ip}/{p}"),
        None => ip,
    }
}

/// Strings that reach the parsers: addresses, CIDRs, range-end syntax, store names, levels, garbage.
fn text() -> impl Strategy<Value = String> {
    let words = prop::sample::select(vec![
        "whereabouts",
        "file",
        "etcd",
        "kubernetes",
        "debug",
        "VERBOSE",
        "",
        "-",
        "/",
        "10.0.0.0/31",
        "192.168.2.225-192.168.2.230/28",
        "::/0",
        "0.0.0.0/0",
        "abcd::1-abcd::5/126",
        "10.0.0.1-fd00::/64",
    ]);
    prop_oneof![
        3 => ipv4_text(),
        2 => ipv6_text(),
        1 => (ipv4_text(), ipv4_text()).prop_map(|(a, b)| format!("{a}-{b}")),
        2 => words.prop_map(String::from),
        1 => "\\PC{0,24}",
    ]
}

/// Arbitrary JSON of any shape, with keys of the schema and realistic strings.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..8)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A value of the JSON type the schema gives `name`.
fn typed_value(name: &'static str) -> BoxedStrategy<Value> {
    let list = |item: BoxedStrategy<Value>| prop::collection::vec(item, 0..4).prop_map(Value::Array).boxed();
    match name {
        "exclude" | "nameservers" | "search" | "options" => list(text().prop_map(Value::from).boxed()),
        "ipRanges" => list(object(RANGE_KEYS)),
        "routes" => list(object(ROUTE_KEYS)),
        "addresses" => list(object(ADDRESS_KEYS)),
        "dns" => object(DNS_KEYS),
        "kubernetes" => object(KUBERNETES_KEYS),
        "enable_overlapping_ranges" => any::<bool>().prop_map(Value::from).boxed(),
        "mtu" | "advmss" | "priority" | "table" | "scope" | "sleep_for_race" => {
            any::<i64>().prop_map(Value::from).boxed()
        }
        _ if name.starts_with("leader_") => any::<i64>().prop_map(Value::from).boxed(),
        _ => text().prop_map(Value::from).boxed(),
    }
}

/// One field of an object with the keys `names`: a key in random case with, mostly, a value of its type.
fn field(names: &'static str) -> impl Strategy<Value = (String, Value)> {
    prop::sample::select(names.split_whitespace().collect::<Vec<_>>())
        .prop_flat_map(|name| (random_case(name), prop_oneof![8 => typed_value(name), 1 => json_value()]))
}

/// An object with some of the keys `names`.
fn object(names: &'static str) -> BoxedStrategy<Value> {
    prop::collection::vec(field(names), 0..5).prop_map(|kv| Value::Object(kv.into_iter().collect())).boxed()
}

/// An `ipam` object that passes the type check (unless a generated `type` overrides it) and usually names a
/// store, with arbitrary other keys.
fn ipam_value() -> impl Strategy<Value = Value> {
    let store = prop::sample::select(vec![
        json!({"datastore": "file"}),
        json!({"kubernetes": {"kubeconfig": "/k"}}),
        json!({}),
    ]);
    (prop::collection::vec(field(TOP_LEVEL_KEYS), 0..10), store).prop_map(|(fields, store)| {
        let object = Value::Object(fields.into_iter().collect());
        with(with(json!({"type": "whereabouts"}), store), object)
    })
}

fn call_context() -> impl Strategy<Value = CallContext> {
    let version = prop::sample::select(vec!["", "0.2.0", "0.4.0", "1.0.0"]);
    let keys = prop::sample::select(vec!["runtimeConfig.ips", "args.cni.ips"]);
    let requested = prop::collection::vec((keys, prop_oneof![ipv4_text(), ipv6_text(), text()]), 0..3);
    let cni_args = prop_oneof![
        Just(String::new()),
        (ipv4_text(), ipv4_text()).prop_map(|(ip, gw)| format!("IgnoreUnknown=1;IP={ip};GATEWAY={gw}")),
        "\\PC{0,24}",
    ];
    (version, requested, cni_args).prop_map(|(version, requested_ips, cni_args)| CallContext {
        cni_version: version.to_string(),
        args: parse_cni_args(&cni_args).unwrap_or_default(),
        requested_ips,
        purpose: Purpose::Allocate,
    })
}

/// Recases every object key with `upper`, recursively.
fn recase_keys(value: &Value, upper: bool) -> Value {
    match value {
        Value::Object(map) => {
            // Keys that differ only in case collapse into one; as with Go's decoder (and ours), a
            // later `null` then leaves the earlier value.
            let mut out = Map::new();
            for (k, v) in map {
                let k = if upper { k.to_ascii_uppercase() } else { k.to_ascii_lowercase() };
                if !(v.is_null() && out.contains_key(&k)) {
                    out.insert(k, recase_keys(v, upper));
                }
            }
            out.into()
        }
        Value::Array(items) => Value::Array(items.iter().map(|v| recase_keys(v, upper)).collect()),
        other => other.clone(),
    }
}

/// A valid range: its network as written (host bits kept), and optional start/end inside the network.
#[derive(Debug, Clone)]
struct GeneratedRange {
    family: Family,
    address: u128,
    prefix: u8,
    start: Option<u128>,
    end: Option<u128>,
}

fn generated_range() -> impl Strategy<Value = GeneratedRange> {
    let v4 = (any::<u32>(), 8u8..=30).prop_map(|(a, p)| (Family::V4, u128::from(a), p));
    let v6 = (any::<u128>(), 64u8..=126).prop_map(|(a, p)| (Family::V6, a, p));
    (prop_oneof![v4, v6], any::<Option<u128>>(), any::<Option<u128>>()).prop_map(
        |((family, address, prefix), a, b)| {
            let size = 1u128 << (family.bits() - prefix);
            let base = address & !(size - 1);
            let mut offsets = [a.map(|o| base + o % size), b.map(|o| base + o % size)];
            if let [Some(x), Some(y)] = &mut offsets
                && x > y
            {
                std::mem::swap(x, y);
            }
            GeneratedRange { family, address, prefix, start: offsets[0], end: offsets[1] }
        },
    )
}

impl GeneratedRange {
    fn text(&self, value: u128) -> String {
        from_u128(self.family, value).to_string()
    }

    /// The range as configuration keys; range-end syntax when asked and both bounds are set.
    fn keys(&self, range_end_syntax: bool) -> Map<String, Value> {
        let mut keys = Map::new();
        if let (true, Some(start), Some(end)) = (range_end_syntax, self.start, self.end) {
            keys.insert(
                "range".into(),
                format!("{}-{}/{}", self.text(start), self.text(end), self.prefix).into(),
            );
            return keys;
        }
        keys.insert("range".into(), format!("{}/{}", self.text(self.address), self.prefix).into());
        for (key, bound) in [("range_start", self.start), ("range_end", self.end)] {
            if let Some(bound) = bound {
                keys.insert(key.into(), self.text(bound).into());
            }
        }
        keys
    }
}

fn proptest_config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(proptest_config(512))]

    #[test]
    fn load_never_panics_on_arbitrary_ipam(
        value in prop_oneof![json_value(), ipam_value()],
        call in call_context(),
    ) {
        let _ = config::load(&value, None, &call);
    }

    #[test]
    fn load_never_panics_on_arbitrary_flat_files(
        ipam in prop_oneof![Just(json!({"type": "whereabouts"})), ipam_value()],
        content in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64),
            json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
            object(TOP_LEVEL_KEYS).prop_map(|v| serde_json::to_vec(&v).unwrap()),
            (object(TOP_LEVEL_KEYS), any::<prop::sample::Index>()).prop_map(|(v, cut)| {
                let bytes = serde_json::to_vec(&v).unwrap();
                bytes[..cut.index(bytes.len())].to_vec()
            }),
        ],
    ) {
        let flat = FlatFile { path: FLAT_PATH, content: &content };
        let result = config::load(&ipam, Some(flat), &ctx());
        if serde_json::from_slice::<Value>(&content).is_err() {
            prop_assert!(
                matches!(result, Err(ConfigError::Decode { .. } | ConfigError::Invalid { .. })),
                "{:?}", result
            );
        }
    }

    #[test]
    fn key_case_never_changes_the_outcome(value in ipam_value(), call in call_context()) {
        let expected = config::load(&value, None, &call);
        for upper in [false, true] {
            prop_assert_eq!(&config::load(&recase_keys(&value, upper), None, &call), &expected);
        }
    }
}

proptest! {
    #![proptest_config(proptest_config(1024))]

    #[test]
    fn valid_ranges_load_strictly_inside_their_network(
        range in generated_range(),
        range_end_syntax in any::<bool>(),
        listed in any::<bool>(),
    ) {
        let keys = Value::Object(range.keys(range_end_syntax));
        let extra = if listed { json!({"ipRanges": [keys]}) } else { keys };
        let cfg = load(&ipam(extra.clone()));
        prop_assert!(cfg.is_ok(), "{} -> {:?}", extra, cfg);
        let cfg = cfg.unwrap();
        prop_assert_eq!(cfg.ranges.len(), 1);
        let loaded = &cfg.ranges[0].range;
        let network = IpNet::new(from_u128(range.family, range.address), range.prefix).unwrap().trunc();
        prop_assert_eq!(loaded.network(), network);
        let (net_first, net_last) = net_bounds(&network);
        prop_assert!(
            net_first < loaded.first() && loaded.first() <= loaded.last() && loaded.last() < net_last,
            "{} -> {}", extra, summary(loaded)
        );
        // Bounds are kept when usable and ignored (as upstream) on the network or broadcast address.
        let usable = |bound: Option<u128>, default: u128| {
            bound.filter(|b| (net_first + 1..net_last).contains(b)).unwrap_or(default)
        };
        prop_assert_eq!(loaded.first(), usable(range.start, net_first + 1));
        prop_assert_eq!(loaded.last(), usable(range.end, net_last - 1));
        // The network and broadcast addresses are never candidates; the bounds are.
        let probes = [(net_first, false), (net_last, false), (loaded.first(), true), (loaded.last(), true)];
        for (value, candidate) in probes {
            prop_assert_eq!(loaded.in_interval(from_u128(range.family, value)), candidate);
        }
    }
}

#[test]
fn exclude_without_a_range_is_refused() {
    assert_invalid("exclude alone", load(&ipam(json!({"exclude": ["garbage"]}))), "exclude[0]", "garbage");
    assert!(load(&ipam(json!({"exclude": []}))).is_ok());
}

#[test]
fn a_later_null_duplicate_leaves_the_earlier_value() {
    let ipam = Value::from_str(
        r#"{"type":"whereabouts","datastore":"file","enable_overlapping_ranges":false,"ENABLE_OVERLAPPING_RANGES":null}"#,
    )
    .unwrap();
    assert!(!ok(load(&ipam)).enable_overlapping_ranges);
}

// === persistent addresses: release_cooldown, sticky_statefulsets ===

#[test]
fn release_cooldown_is_a_duration_and_a_bad_one_names_the_key() {
    let with = |value: Value| {
        load(
            &json!({"type": "whereabouts", "datastore": "file", "range": "10.0.0.0/24", "release_cooldown": value}),
        )
    };
    assert_eq!(ok(with(json!("30s"))).release_cooldown, Some(std::time::Duration::from_secs(30)));
    assert_eq!(ok(with(json!("1m30s"))).release_cooldown, Some(std::time::Duration::from_secs(90)));
    for off in [json!("0"), json!("0s"), json!(""), Value::Null] {
        assert_eq!(ok(with(off.clone())).release_cooldown, None, "{off}");
    }
    assert_invalid("not a duration", with(json!("30 seconds")), "release_cooldown", "30 seconds");
    assert_invalid("a fraction", with(json!("1.5s")), "release_cooldown", "1.5s");
    assert!(matches!(with(json!(30)), Err(ConfigError::Decode { .. })), "a number is the wrong JSON type");
    // DEL still loads: the address is released without a cooldown.
    let release = CallContext { purpose: Purpose::Release, ..ctx() };
    let del = config::load(
        &json!({"type": "whereabouts", "datastore": "file", "range": "10.0.0.0/24", "release_cooldown": "soon"}),
        None,
        &release,
    );
    assert_eq!(ok(del).release_cooldown, None);
}

#[test]
fn sticky_statefulsets_is_opt_in_and_reaches_del() {
    let base = json!({"type": "whereabouts", "datastore": "file", "range": "10.0.0.0/24"});
    assert!(!ok(load(&base)).sticky_statefulsets);
    let mut sticky = base.clone();
    sticky["sticky_statefulsets"] = json!(true);
    assert!(ok(load(&sticky)).sticky_statefulsets);
    let release = CallContext { purpose: Purpose::Release, ..ctx() };
    assert!(ok(config::load(&sticky, None, &release)).sticky_statefulsets);
    sticky["sticky_statefulsets"] = json!("yes");
    assert!(matches!(load(&sticky), Err(ConfigError::Decode { .. })));
}
