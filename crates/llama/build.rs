//! Build script: with the `gpu-emulation` feature, compiles the GPU generator's CUDA kernels
//! (`src/ffi/gpu/kernels.cu`) as C++20 for the CPU emulator (`src/ffi/gpu/emulate.cpp` includes
//! them after `emulate.h`). Without the feature it does nothing: the real kernels are compiled at
//! run time by NVRTC, so building never needs a CUDA toolkit.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "gpu-emulation")]
    {
        for f in ["kernels.cu", "emulate.h", "emulate.cpp"] {
            println!("cargo:rerun-if-changed=src/ffi/gpu/{f}");
        }
        cc::Build::new()
            .cpp(true)
            .std("c++20")
            .file("src/ffi/gpu/emulate.cpp")
            .flag_if_supported("-pthread")
            .warnings(true)
            .opt_level(2)
            .compile("iapt_gpu_emulator");
        println!("cargo:rustc-link-lib=pthread");
    }
}
