// The GPU emulator's launcher: compiles kernels.cu as C++ (with emulate.h) and runs a kernel by
// name with CUDA's launch conventions (grid, block, and an array of pointers to the arguments),
// so the Rust side packs arguments the same way for the driver and for the emulator.
#include "emulate.h"

#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "kernels.cu"

thread_local iapt_dim3 threadIdx;
thread_local iapt_dim3 blockIdx;
thread_local iapt_dim3 blockDim;
thread_local iapt_dim3 gridDim;

namespace {

thread_local std::barrier<>* block_barrier = nullptr;

template <typename... A, std::size_t... I>
void invoke(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    // args[I] points to a value of the I-th parameter's type (CUDA's kernelParams convention).
    kernel(*static_cast<A*>(args[I])...);
}

template <typename... A>
constexpr int arity(void (*)(A...)) {
    return static_cast<int>(sizeof...(A));
}

template <typename... A>
void call(void (*kernel)(A...), void** args) {
    invoke(kernel, args, std::index_sequence_for<A...>{});
}

struct Entry {
    const char* name;
    int nargs;
    void (*run)(void** args);
};

#define IAPT_EMU_ENTRY(k) {#k, arity(k), [](void** a) { call(k, a); }}

const Entry ENTRIES[] = {
    IAPT_EMU_ENTRY(iapt_scores),   IAPT_EMU_ENTRY(iapt_stats),    IAPT_EMU_ENTRY(iapt_pool),   IAPT_EMU_ENTRY(iapt_down_f32),
    IAPT_EMU_ENTRY(iapt_down_f16), IAPT_EMU_ENTRY(iapt_down_bf16), IAPT_EMU_ENTRY(iapt_up_f32), IAPT_EMU_ENTRY(iapt_up_f16),
    IAPT_EMU_ENTRY(iapt_up_bf16),
};

std::mutex launch_mutex;

}  // namespace

void __syncthreads() {
    block_barrier->arrive_and_wait();
}

// Runs kernel `name` over the grid. Returns 0 on success; -1 unknown kernel, -2 wrong argument
// count, -3 bad block size, -4 a thread could not be started.
extern "C" int iapt_emu_launch(const char* name, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx, void** args,
                               int nargs) {
    const Entry* entry = nullptr;
    for (const Entry& e : ENTRIES) {
        if (std::strcmp(e.name, name) == 0) {
            entry = &e;
        }
    }
    if (entry == nullptr) {
        return -1;
    }
    if (entry->nargs != nargs) {
        return -2;
    }
    if (bx == 0 || bx > IAPT_MAX_BLOCK) {
        return -3;
    }
    std::lock_guard<std::mutex> lock(launch_mutex);
    std::barrier<> bar(static_cast<std::ptrdiff_t>(bx));
    auto body = [&](unsigned int t) {
        block_barrier = &bar;
        threadIdx = {t, 0, 0};
        blockDim = {bx, 1, 1};
        gridDim = {gx, gy, gz};
        for (unsigned int z = 0; z < gz; z++) {
            for (unsigned int y = 0; y < gy; y++) {
                for (unsigned int x = 0; x < gx; x++) {
                    blockIdx = {x, y, z};
                    entry->run(args);
                    // The whole block finishes before the next one reuses the shared statics.
                    bar.arrive_and_wait();
                }
            }
        }
    };
    // Threads wait for `go` before touching the barrier: if one cannot be started, the others are
    // told to leave (go = 2) instead of waiting forever for a missing participant.
    std::atomic<int> go{0};
    std::vector<std::thread> threads;
    bool started = true;
    try {
        threads.reserve(bx);
        for (unsigned int t = 1; t < bx; t++) {
            threads.emplace_back([&, t] {
                go.wait(0);
                if (go.load() == 1) {
                    body(t);
                }
            });
        }
    } catch (const std::exception&) {
        started = false;
    }
    go.store(started ? 1 : 2);
    go.notify_all();
    if (started) {
        body(0);
    }
    for (std::thread& th : threads) {
        th.join();
    }
    if (!started) {
        return -4;
    }
    return 0;
}
