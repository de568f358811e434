//! The JSON schemas of the documents the planner publishes or reads (the step
//! plan, the mesh plan, the device profile) are committed in planner/schemas and must match the Rust
//! types. Regenerate with
//! `WEFT_UPDATE_GOLDEN=1 cargo test -p weft-planner --test schemas`.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use weft_planner::mesh::MeshPlan;
use weft_planner::plan::StepPlan;
use weft_planner::profile::Profile;

#[test]
fn committed_schemas_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    for (file, schema) in [
        ("step-plan.schema.json", schemars::schema_for!(StepPlan)),
        ("mesh-plan.schema.json", schemars::schema_for!(MeshPlan)),
        ("profile.schema.json", schemars::schema_for!(Profile)),
    ] {
        let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
        let path = dir.join(file);
        if std::env::var_os("WEFT_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; regenerate with WEFT_UPDATE_GOLDEN=1",
                path.display()
            )
        });
        assert!(
            committed == text,
            "{} differs from the Rust types; regenerate with WEFT_UPDATE_GOLDEN=1",
            path.display()
        );
    }
}
