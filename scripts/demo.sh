#!/usr/bin/env bash
# whereabouts-rs demo: two network namespaces attached to a bridge by the real CNI bridge plugin, which
# execs whereabouts as its IPAM plugin (dual stack, file store in a temp dir). Shows the assigned
# addresses, pings both ways on IPv4 and IPv6, shows the store, detaches both and shows the pools empty.
#
# Needs: root and either cargo or WHEREABOUTS_BIN=<path to a binary>; installs iproute2, ping, the
# reference CNI plugins (Debian: containernetworking-plugins in /usr/lib/cni; override with
# CNI_PLUGIN_DIR) and protoc (to build) when they are missing.
# Uses only documentation ranges (198.51.100.0/24, 2001:db8:1::/64; not 192.0.2.0/24, which some hosts
# use for themselves) and names carrying this shell's pid;
# everything it creates is removed on exit, also on failure or Ctrl-C.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
plugin_dir=${CNI_PLUGIN_DIR:-/usr/lib/cni}

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() { printf '\033[31merror:\033[0m %s\n' "$*" >&2; exit 1; }

# --- preflight ---------------------------------------------------------------------------------------
[[ $(id -u) -eq 0 ]] || die "run as root (network namespaces and bridges need CAP_NET_ADMIN)"
. "$repo_root/scripts/ensure-packages.sh"
ensure_packages iproute2 iputils-ping containernetworking-plugins protobuf-compiler || die "cannot install the packages"
for tool in ip ping; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install iproute2 iputils-ping)"
done
[[ -x $plugin_dir/bridge ]] || die "$plugin_dir/bridge is missing (apt-get install containernetworking-plugins)"

# --- names and cleanup -------------------------------------------------------------------------------
tag=$$
ns_a=wbdemo-$tag-a
ns_b=wbdemo-$tag-b
bridge=wbdemo$tag # <= 15 characters
work=$(mktemp -d "${TMPDIR:-/tmp}/whereabouts-demo.XXXXXX")
created_ns=()

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    step "Cleaning up"
    for ns in "${created_ns[@]}"; do
        ip netns del "$ns" 2>/dev/null && info "deleted namespace $ns" || true
    done
    if ip link show dev "$bridge" >/dev/null 2>&1; then
        ip link del dev "$bridge" && info "deleted bridge $bridge"
    fi
    rm -rf "$work" && info "removed $work"
    if [[ $status -eq 0 ]]; then
        printf '\n\033[32mDemo finished successfully.\033[0m\n'
    else
        printf '\n\033[31mDemo FAILED (exit status %s).\033[0m\n' "$status" >&2
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- the binary --------------------------------------------------------------------------------------
step "Building whereabouts"
if [[ -n ${WHEREABOUTS_BIN:-} ]]; then
    binary=$WHEREABOUTS_BIN
    info "using WHEREABOUTS_BIN=$binary"
elif command -v cargo >/dev/null; then
    (cd "$repo_root" && cargo build --release -p whereabouts)
    binary=$repo_root/target/release/whereabouts
elif [[ -x $repo_root/target/release/whereabouts ]]; then
    binary=$repo_root/target/release/whereabouts
    info "cargo not found; using the existing $binary"
else
    die "cargo not found and no binary built; set WHEREABOUTS_BIN"
fi
[[ -x $binary ]] || die "$binary is not an executable"
mkdir -p "$work/bin"
ln -s "$(readlink -f "$binary")" "$work/bin/whereabouts"
export CNI_PATH=$work/bin:$plugin_dir
info "CNI_PATH=$CNI_PATH"

# --- the network -------------------------------------------------------------------------------------
# isGateway: the bridge takes the gateway address each range returns: 198.51.100.1 and, from the IPv6
# range's own gateway key, 2001:db8:1::1. whereabouts never hands either out.
store=$work/store
conf=$work/demo.conflist.json
cat >"$conf" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "whereabouts-demo",
  "type": "bridge",
  "bridge": "$bridge",
  "isGateway": true,
  "ipam": {
    "type": "whereabouts",
    "datastore": "file",
    "file_store_dir": "$store",
    "range": "198.51.100.0/24",
    "gateway": "198.51.100.1",
    "ipRanges": [{ "range": "2001:db8:1::/64", "gateway": "2001:db8:1::1" }]
  }
}
EOF
step "Network configuration ($conf)"
sed 's/^/    /' "$conf"

# cni <command> <namespace>: runs the bridge plugin as a container runtime would.
cni() {
    local command=$1 ns=$2
    CNI_COMMAND=$command CNI_CONTAINERID=demo-$ns CNI_NETNS=/var/run/netns/$ns CNI_IFNAME=eth0 \
        CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=$ns" \
        "$plugin_dir/bridge" <"$conf"
}

# Addresses ("ip/prefix") listed in a CNI result.
result_addresses() { grep -o '"address": *"[^"]*"' "$1" | cut -d'"' -f4; }

# --- attach ------------------------------------------------------------------------------------------
for ns in "$ns_a" "$ns_b"; do
    step "ADD: attaching namespace $ns"
    ip netns add "$ns"
    created_ns+=("$ns")
    ip -n "$ns" link set lo up
    # Duplicate address detection off, so the IPv6 addresses are usable at once.
    ip netns exec "$ns" sysctl -q -w net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
    if ! cni ADD "$ns" >"$work/$ns.result.json"; then
        { sed 's/^/    /' "$work/$ns.result.json"; echo; } >&2
        die "ADD failed for $ns"
    fi
    info "CNI result addresses: $(result_addresses "$work/$ns.result.json" | tr '\n' ' ')"
    info "ip -n $ns addr show eth0:"
    ip -n "$ns" -br addr show dev eth0 | sed 's/^/      /'
done

first_address() { # <namespace> <4|6>
    ip -n "$1" -"$2" -o addr show dev eth0 scope global | awk '{ split($4, a, "/"); print a[1]; exit }'
}
a4=$(first_address "$ns_a" 4)
a6=$(first_address "$ns_a" 6)
b4=$(first_address "$ns_b" 4)
b6=$(first_address "$ns_b" 6)
[[ -n $a4 && -n $a6 && -n $b4 && -n $b6 ]] || die "a namespace lacks an IPv4 or IPv6 address"

step "Assigned addresses"
info "$ns_a: $a4  $a6"
info "$ns_b: $b4  $b6"

# --- traffic -----------------------------------------------------------------------------------------
step "Ping each way (IPv4 and IPv6)"
ping_from() { # <namespace> <target>
    if ip netns exec "$1" ping -n -c 1 -W 2 "$2" >/dev/null; then
        info "$1 -> $2: ok"
    else
        die "$1 -> $2: no reply"
    fi
}
ping_from "$ns_a" "$b4"
ping_from "$ns_b" "$a4"
ping_from "$ns_a" "$b6"
ping_from "$ns_b" "$a6"

# --- the store ---------------------------------------------------------------------------------------
show_store() {
    local f
    for f in "$store"/pools/*.json; do
        info "$(basename "$f"): $(cat "$f")"
    done
    local reservations=("$store"/reservations/*.json)
    if [[ -e ${reservations[0]} ]]; then
        for f in "${reservations[@]}"; do
            info "reservations/$(basename "$f"): $(cat "$f")"
        done
    else
        info "reservations: none"
    fi
}
step "The store ($store)"
show_store

# --- detach ------------------------------------------------------------------------------------------
for ns in "$ns_a" "$ns_b"; do
    step "DEL: detaching namespace $ns"
    cni DEL "$ns"
    info "done"
done

step "The store after DEL"
show_store
pools=$(find "$store/pools" -name '*.json' | wc -l)
empty=$(grep -l '"allocations": *{ *}' "$store"/pools/*.json | wc -l)
[[ $pools -eq 2 && $empty -eq $pools ]] || die "the pools still hold allocations"
[[ -z $(find "$store/reservations" -name '*.json') ]] || die "reservations remain"
info "all $pools pools are empty and no reservation remains"
