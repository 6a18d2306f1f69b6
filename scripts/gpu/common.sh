# shellcheck shell=bash
# Shared by scripts/gpu/build-kit, verify-kit and device-run (sourced, not run): the kit's layout
# and the one CMake line that builds llama.cpp as shared libraries.
#
# The kit (an ignored folder, /gpu-kit/ at the repository root, carried to the GPU machine):
#   gpu-kit/bin/iapt              the CLI, linked to libllama.so.0 / libggml*.so.0 (no rpath)
#   gpu-kit/tests/<name>          the test executables of iapt-llama, iapt-engine and iapt-generator-cuda (unit
#                                 tests: iapt_llama, iapt_generator_cuda)
#   gpu-kit/llama.cpp.tar.gz      the llama.cpp source bundled in llama-cpp-sys-2 (trimmed)
#   gpu-kit/wheels/gguf-*.whl     gguf-py, for converters/python/make_bench_model.py
#   gpu-kit/MANIFEST.txt          what was built from which commit, sizes and checksums

# The llama-cpp-sys-2 version the workspace pins (Cargo.toml: "=0.1.161").
export LLAMA_SYS_VERSION=0.1.161

# The CMake options for libllama + libggml as shared libraries, chosen to match what
# llama-cpp-sys-2 0.1.161's build.rs passes for iapt-llama (default features off, so no `common`,
# no OpenMP), so that the libraries built here or there are the ones the Rust binaries were linked
# against, with the same exported API and struct layouts:
#   LLAMA_BUILD_{TESTS,EXAMPLES,SERVER,TOOLS,APP}=OFF, LLAMA_BUILD_COMMON=OFF, LLAMA_CURL=OFF,
#   GGML_OPENMP=OFF, BUILD_SHARED_LIBS=ON (LLAMA_BUILD_SHARED_LIBS=1), CMAKE_BUILD_TYPE=Release.
# GGML_NATIVE=ON differs from the kit's own cargo build (OFF there, no target-cpu): these libraries
# are compiled on the machine that runs them, so its own CPU features are the right ones. CPU
# features change code generation only, never the ABI.
# Extra arguments are appended (the device adds -DGGML_CUDA=ON ...).
llama_cmake_args() {
  printf '%s\n' \
    -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_BUILD_COMMON=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_TOOLS=OFF \
    -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_CURL=OFF \
    -DGGML_OPENMP=OFF \
    -DGGML_NATIVE=ON \
    "$@"
}

# The shared libraries a build leaves in <build>/bin (CMAKE_LIBRARY_OUTPUT_DIRECTORY).
llama_lib_dir() {
  printf '%s/bin\n' "$1"
}
