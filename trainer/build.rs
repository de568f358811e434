//! Builds the c10d shim (trainer/csrc/c10d_shim.cpp) against the libtorch that
//! tch links (torch-sys exports its lib directory as DEP_TCH_LIBTORCH_LIB), and
//! sets an rpath so binaries and tests find libtorch without LD_LIBRARY_PATH.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/c10d_shim.cpp");
    let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        // torch-sys always exports it; without it the link below cannot work.
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is not set; run scripts/setup-libtorch");
        std::process::exit(1);
    };
    let torch = lib
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| lib.clone());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++20")
        .file("csrc/c10d_shim.cpp")
        .include(torch.join("include"))
        .include(torch.join("include/torch/csrc/api/include"))
        // The PyPI wheel is built with the C++11 ABI.
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .flag("-fvisibility=hidden")
        .flag_if_supported("-Wno-unused-parameter")
        .warnings(false)
        .compile("weft_c10d_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    // Binaries, tests and examples of this crate find libtorch at run time.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}
