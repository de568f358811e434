//! The committed CRD YAML must be exactly what the Rust types print. When the
//! types change, regenerate with:
//!
//! `WEFT_UPDATE_GOLDEN=1 cargo test -p weft-crds --test generated`

use std::path::PathBuf;

const COPIES: [&str; 2] = [
    "crds/generated/weft.dev_trainingjobs.yaml",
    "charts/weft/crds/weft.dev_trainingjobs.yaml",
];

#[test]
fn committed_crd_yaml_matches_the_rust_types() {
    let rendered = weft_crds::render_crds_yaml().unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for copy in COPIES {
        let path = root.join(copy);
        if std::env::var_os("WEFT_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &rendered).unwrap();
            continue;
        }
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{copy}: {e}; regenerate with WEFT_UPDATE_GOLDEN=1"));
        assert!(
            committed == rendered,
            "{copy} differs from what the Rust types print; regenerate with \
             WEFT_UPDATE_GOLDEN=1 cargo test -p weft-crds --test generated"
        );
    }
}
