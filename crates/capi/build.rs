//! Links libiapt against the vendored llama.cpp's shared libraries (scripts/vendor-llama): NEEDED
//! entries for `libllama.so.0` and `libggml-base.so.0`, found at run time through RUNPATH `$ORIGIN`
//! (the install prefix's `lib/`) or whatever the process has already loaded under those sonames.
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=IAPT_VENDOR_DIR");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let dir = match std::env::var_os("IAPT_VENDOR_DIR") {
        // A relative IAPT_VENDOR_DIR is relative to the repository root, where the scripts run.
        Some(d) => manifest.join("../..").join(d),
        None => manifest.join("../../target/vendor-llama"),
    };
    let bin = dir.join("build/bin");
    println!("cargo:rerun-if-changed={}", dir.join("env.sh").display());
    for lib in ["libllama.so", "libggml-base.so"] {
        if !Path::new(&bin.join(lib)).exists() {
            panic!(
                "libiapt links llama.cpp's shared libraries, but {} is missing: run `bash scripts/vendor-llama` \
                 (or set IAPT_VENDOR_DIR to a prefix it built)",
                bin.join(lib).display()
            );
        }
    }
    println!("cargo:rustc-link-search=native={}", bin.display());
    println!("cargo:rustc-link-lib=dylib=llama");
    println!("cargo:rustc-link-lib=dylib=ggml-base");
    // The installed library finds the libraries installed beside it ($ORIGIN) first; in the build
    // tree (tests) the vendor build where it is.
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN:{}", bin.display());
}
