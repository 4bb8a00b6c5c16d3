//! Lowest-free lookup and allocate+release on a /64 holding 100,000 allocations, against a /24 holding
//! 200 (the baseline), measured in the same run. Run with `cargo bench -p whereabouts-core`.

#![allow(clippy::unwrap_used, reason = "benchmark set-up on known-good inputs")]

use std::hint::black_box;

use whereabouts_core::allocate::{apply, assign, lowest_free};
use whereabouts_core::interval::IntervalSet;
use whereabouts_core::pool::{Owner, Pool};
use whereabouts_core::range::IpRange;

fn main() {
    divan::main();
}

fn owner(n: usize) -> Owner {
    Owner {
        container_id: format!("container-{n}"),
        pod_ref: Some(format!("default/pod-{n}")),
        ifname: "net1".into(),
        node: Some("node-1".into()),
        cni_network: Some("bench".into()),
        pod_uid: None,
        statefulset: None,
        ipam_claim: None,
    }
}

/// A pool filled from the bottom with `count` allocations, leaving one hole in the middle, as a pool
/// looks after a long run of ADDs with the odd DEL.
fn filled(cidr: &str, count: usize) -> (IpRange, Pool) {
    let range = IpRange::new(cidr.parse().unwrap(), None, None, vec![]).unwrap();
    let mut pool = Pool::new(range.network());
    let blocked = IntervalSet::new();
    for n in 0..count {
        let o = owner(n);
        let a = assign(&range, &pool, &o, None, None, &blocked).unwrap();
        apply(&mut pool, a, &o);
    }
    let hole = pool.container_addresses(&format!("container-{}", count / 2), "net1")[0];
    pool.remove(hole);
    (range, pool)
}

const CASES: [(&str, usize); 2] = [("192.0.2.0/24", 200), ("2001:db8::/64", 100_000)];

#[divan::bench(args = CASES)]
fn lowest_free_lookup(bencher: divan::Bencher, case: (&str, usize)) {
    let (range, pool) = filled(case.0, case.1);
    let blocked = IntervalSet::new();
    bencher.bench_local(|| lowest_free(black_box(&range), black_box(&pool), None, &blocked));
}

#[divan::bench(args = CASES)]
fn allocate_and_release(bencher: divan::Bencher, case: (&str, usize)) {
    let (range, mut pool) = filled(case.0, case.1);
    let blocked = IntervalSet::new();
    let o = owner(usize::MAX);
    bencher.bench_local(|| {
        let a = assign(&range, &pool, &o, None, None, &blocked).unwrap();
        apply(&mut pool, a, &o);
        let addr = pool.container_addresses(&o.container_id, &o.ifname)[0];
        black_box(pool.remove(addr));
    });
}
