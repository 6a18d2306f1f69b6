//! Builds the C++ shim (`src/ffi/shim.cpp`: every llama.cpp call that can throw, wrapped so that no
//! C++ exception unwinds into Rust) against the llama.cpp that llama-cpp-sys-2 built, and tells the
//! crates above where that llama.cpp's shared libraries and headers are (`DEP_IAPT_LLAMA_LIB_DIR`,
//! `DEP_IAPT_LLAMA_INCLUDE_DIR` for direct dependents: the `iapt` binary and libiapt set their
//! run-time search path from it).
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/ffi/shim.cpp");
    // llama-cpp-sys-2 installs llama.cpp into its OUT_DIR (lib/, include/) and exports
    // lib/cmake as `ggml_cmake_dir`.
    let cmake_dir = PathBuf::from(std::env::var("DEP_LLAMA_GGML_CMAKE_DIR").expect("llama-cpp-sys-2 exports its ggml cmake directory"));
    let lib = cmake_dir.parent().expect("OUT_DIR/lib").to_path_buf();
    let prefix = lib.parent().expect("OUT_DIR").to_path_buf();
    let include = prefix.join("include");
    assert!(include.join("llama.h").is_file(), "llama.h not found in {}", include.display());
    cc::Build::new().cpp(true).std("c++17").file("src/ffi/shim.cpp").include(&include).warnings(true).compile("iapt_llama_shim");
    println!("cargo:lib_dir={}", lib.display());
    println!("cargo:include_dir={}", include.display());
    println!("cargo:prefix={}", prefix.display());
    remove_dangling_links(&PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")));
}

/// llama-cpp-sys-2 hard-links each `lib*.so` of its OUT_DIR into the target directory (and its
/// `deps/`, `examples/`); those are soname symlinks (`libllama.so -> libllama.so.0`), so the links
/// dangle there, and its next run (another feature set, a changed `GGML_*` variable) panics on
/// them (`exists()` is false for a dangling link, `hard_link` then fails). Nothing uses them (the
/// binaries' search path points at OUT_DIR/lib), so dangling ones are removed.
fn remove_dangling_links(out_dir: &std::path::Path) {
    // OUT_DIR is target/<profile>/build/<crate>-<hash>/out.
    let Some(profile_dir) = out_dir.ancestors().nth(3) else { return };
    for dir in [profile_dir.to_path_buf(), profile_dir.join("deps"), profile_dir.join("examples")] {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let is_lib = name.starts_with("lib") && name.ends_with(".so");
            if is_lib && p.is_symlink() && !p.exists() {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
}
