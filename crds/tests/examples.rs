//! Every example under manifests/examples is a valid TrainingJob for these types.

use std::path::PathBuf;

use weft_crds::TrainingJob;

#[test]
fn every_example_manifest_parses_as_a_training_job() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let job: TrainingJob =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            job.spec.workers.min <= job.spec.workers.max,
            "{}",
            path.display()
        );
        assert!(job.metadata.name.is_some(), "{}", path.display());
        // GPU workers run the CUDA build of the trainer; CPU workers the CPU
        // one; both of this release.
        let (image, tag) = job.spec.image.rsplit_once(':').unwrap_or_default();
        assert_eq!(tag, env!("CARGO_PKG_VERSION"), "{}", path.display());
        let expected = if job.spec.resources.gpus > 0 {
            "ghcr.io/weft-dev/weft-trainer-cuda"
        } else {
            "ghcr.io/weft-dev/weft-trainer"
        };
        assert_eq!(image, expected, "{}", path.display());
        seen += 1;
    }
    assert!(seen >= 2, "expected example manifests in {}", dir.display());
}
