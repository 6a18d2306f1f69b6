//! Sets the `iapt` binary's run-time library search path to find the one llama.cpp (shared
//! libraries that llama-cpp-sys-2 built, see `iapt-llama`): `$ORIGIN` first (a binary copied
//! beside its libraries, as `scripts/gpu/` and installs do), then the build tree's copy.
// Cargo reads a build script's stdout; the binary's ban on println! (a closed stdout) is not
// about this.
#[allow(clippy::disallowed_macros)]
fn main() {
    let lib = std::env::var("DEP_IAPT_LLAMA_LIB_DIR").expect("iapt-llama exports llama.cpp's library directory");
    println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN:{lib}");
    println!("cargo:rustc-link-arg-tests=-Wl,-rpath,{lib}");
}
