//! The CRDs under `deploy/crds` are generated from the Rust types; this test fails when the checked-in
//! YAML drifts from what the types generate. Regenerate with
//! `WHEREABOUTS_UPDATE_CRDS=1 cargo test -p whereabouts-k8s --test crds`.

use std::path::PathBuf;

use whereabouts_k8s::crd::{crds, file_name, to_yaml};

fn crd_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds")
}

#[test]
fn checked_in_crds_match_the_types() {
    let update = std::env::var_os("WHEREABOUTS_UPDATE_CRDS").is_some();
    let mut stale = Vec::new();
    for crd in crds() {
        let path = crd_dir().join(file_name(&crd));
        let generated = to_yaml(&crd).expect("serialise the CRD");
        if update {
            std::fs::write(&path, &generated).expect("write the CRD");
            continue;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != generated {
            stale.push(path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "{stale:?} differ from the Rust types; regenerate with WHEREABOUTS_UPDATE_CRDS=1 cargo test -p whereabouts-k8s --test crds"
    );
}

#[test]
fn every_checked_in_crd_is_generated() {
    let generated: Vec<String> = crds().iter().map(file_name).collect();
    for entry in std::fs::read_dir(crd_dir()).expect("deploy/crds exists") {
        let name = entry.expect("directory entry").file_name().to_string_lossy().into_owned();
        assert!(generated.contains(&name), "deploy/crds/{name} is not generated from a type; remove it");
    }
}
