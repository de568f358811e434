//! Prints weft's CustomResourceDefinitions as YAML.
//! `cargo run -p weft-crds --bin crdgen > crds/generated/weft.dev_trainingjobs.yaml`

fn main() -> std::process::ExitCode {
    match weft_crds::render_crds_yaml() {
        Ok(yaml) => {
            print!("{yaml}");
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("crdgen: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
