//! Links libiapt against the one llama.cpp (llama-cpp-sys-2's shared libraries, the same the
//! `iapt` binary loads): NEEDED entries for `libllama.so.0` and the `libggml*.so.0` libraries,
//! found at run time through RUNPATH `$ORIGIN` (the install prefix's `lib/`, where
//! `scripts/install-libiapt` puts them) or whatever the process has already loaded under those
//! sonames, then the build tree's copy.
fn main() {
    let cmake = std::env::var("DEP_LLAMA_GGML_CMAKE_DIR").expect("llama-cpp-sys-2 exports its install prefix");
    let lib = std::path::Path::new(&cmake).parent().expect("OUT_DIR/lib").display().to_string();
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN:{lib}");
}
