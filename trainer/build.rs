//! Builds the c10d shim (trainer/csrc/c10d_shim.cpp) against the libtorch that
//! tch links (torch-sys exports its lib directory as DEP_TCH_LIBTORCH_LIB), and
//! sets an rpath so binaries and tests find libtorch without LD_LIBRARY_PATH.
//!
//! NCCL is built in when the libtorch is the full CUDA set (what
//! `WEFT_TORCH_FULL=1 scripts/setup` installs on GPU machines): libtorch_cuda
//! and, beside the torch folder, the NCCL, CUDA runtime, crt and cccl headers
//! of the wheels torch pins. The CPU set installed by default has no NCCL
//! headers and none of the libraries libtorch_cuda needs, so there the
//! trainer is built for CPU (Gloo) only, and asking it for CUDA is an error
//! that says so. `WEFT_NO_NCCL=1` forces the CPU-only build.

use std::path::{Path, PathBuf};

/// Include directories for ProcessGroupNCCL, if every one is there.
fn nccl_includes(torch: &Path, lib: &Path) -> Option<Vec<PathBuf>> {
    if std::env::var_os("WEFT_NO_NCCL").is_some_and(|v| !v.is_empty() && v != "0") {
        return None;
    }
    let site = torch.parent()?;
    let nccl = site.join("nvidia/nccl/include");
    let cuda = site.join("nvidia/cu13/include");
    // cccl's `nv/target` sits either at the top of the CUDA include folder
    // or in its cccl/ subfolder, by wheel version.
    let cccl = [cuda.clone(), cuda.join("cccl")]
        .into_iter()
        .find(|dir| dir.join("nv/target").is_file());
    let needed = [
        lib.join("libtorch_cuda.so"),
        nccl.join("nccl.h"),
        cuda.join("cuda_runtime_api.h"),
        cuda.join("crt/host_config.h"),
    ];
    let missing: Vec<String> = needed
        .iter()
        .filter(|path| !path.is_file())
        .map(|path| path.display().to_string())
        .chain(
            cccl.is_none()
                .then(|| format!("{}/nv/target", cuda.display())),
        )
        .collect();
    if !missing.is_empty() {
        // The NCCL headers without the rest: a full set from an older
        // set-up. Say why the build is CPU-only rather than leave it to a
        // GPU run to find out.
        if nccl.join("nccl.h").is_file() {
            println!(
                "cargo:warning=building without NCCL (CPU only): missing {}; run `WEFT_TORCH_FULL=1 scripts/setup`",
                missing.join(", ")
            );
        }
        return None;
    }
    Some(vec![nccl, cuda, cccl?])
}

fn main() {
    println!("cargo:rerun-if-changed=csrc/c10d_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/attention_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/guarded.hpp");
    println!("cargo:rerun-if-env-changed=WEFT_NO_NCCL");
    let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        // torch-sys always exports it; without it the link below cannot work.
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is not set; run scripts/setup-libtorch");
        std::process::exit(1);
    };
    let torch = lib
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| lib.clone());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .std("c++20")
        .file("csrc/c10d_shim.cpp")
        .file("csrc/attention_shim.cpp")
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        // The PyPI wheel is built with the C++11 ABI.
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .flag("-fvisibility=hidden")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false);
    let nccl = nccl_includes(&torch, &lib);
    if let Some(includes) = &nccl {
        build
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .define("WEFT_WITH_NCCL", None);
        for dir in includes {
            build.include(dir);
        }
    }
    build.compile("weft_c10d_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    if nccl.is_some() {
        // Kept even where nothing in the binary names it: loading
        // libtorch_cuda registers CUDA with libtorch, without which tch sees
        // no GPU. libnccl and libcudart resolve through its own RUNPATH.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    // Binaries, tests and examples of this crate find libtorch at run time.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
