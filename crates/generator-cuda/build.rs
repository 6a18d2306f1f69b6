//! Build script: with the `emulation` feature, compiles the GPU generator's CUDA kernels
//! (`src/device/kernels.cu`) as C++20 for the CPU emulator (`src/device/emulate.cpp` includes
//! them after `emulate.h`). Without the feature it does nothing: the real kernels are compiled at
//! run time by NVRTC, so building never needs a CUDA toolkit.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "emulation")]
    {
        for f in ["kernels.cu", "emulate.h", "emulate.cpp"] {
            println!("cargo:rerun-if-changed=src/device/{f}");
        }
        cc::Build::new()
            .cpp(true)
            .std("c++20")
            .file("src/device/emulate.cpp")
            .flag_if_supported("-pthread")
            .warnings(true)
            .opt_level(2)
            .compile("iapt_gpu_emulator");
        println!("cargo:rustc-link-lib=pthread");
    }
}
