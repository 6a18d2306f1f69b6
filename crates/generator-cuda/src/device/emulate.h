// The CUDA subset that kernels.cu uses, mapped onto CPU threads, so that the same kernel source
// runs (and is tested) without a GPU. Included only in the `emulation` build (emulate.cpp).
//
// Execution model: a launch runs its blocks one after another; each block runs with blockDim.x
// real threads (std::thread), which meet at `__syncthreads()` (a std::barrier). Because exactly one
// block runs at a time, a function-local `static` variable is exactly block-shared memory, so
// `__shared__` is `static`. Launches are serialised process-wide (one mutex), which also keeps
// those statics private to one block at a time. Atomics are std::atomic_ref. "Device memory" is
// host memory.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>

struct iapt_dim3 {
    unsigned int x, y, z;
};

extern thread_local iapt_dim3 threadIdx;
extern thread_local iapt_dim3 blockIdx;
extern thread_local iapt_dim3 blockDim;
extern thread_local iapt_dim3 gridDim;

#define __global__
#define __device__
#define __shared__ static

void __syncthreads();

using std::isfinite;

inline double atomicAdd(double* address, double value) {
    return std::atomic_ref<double>(*address).fetch_add(value);
}

inline int atomicMin(int* address, int value) {
    std::atomic_ref<int> a(*address);
    int old = a.load();
    while (value < old && !a.compare_exchange_weak(old, value)) {
    }
    return old;
}
