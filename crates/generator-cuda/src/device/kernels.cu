// The IAPT generator's CUDA kernels (PoolFirst form, see crates/generator/src/generator.rs).
//
// Compiled twice from this one source:
// - at run time by NVRTC for the device's architecture (no headers: nothing is #included here);
// - with the `emulation` feature, by the host C++ compiler (build.rs), with `emulate.h`
//   force-included first, which maps the CUDA keywords onto CPU threads (see emulate.h).
// So this file uses only what both understand: no warp shuffles or other warp intrinsics, block
// reductions through shared memory with a `__syncthreads()` that every thread of the block reaches
// (never inside divergent code), shared arrays of compile-time size, double-precision accumulators,
// and `atomicAdd(double*)` / `atomicMin(int*)`.
//
// Per sequence and layer the host runs, for every chunk of c instruction rows H (c x d, f32):
//   1. iapt_scores  S[k][i] = s * sum_j H[i][j] K^T[k][j]          (grid c, one block per row)
//   2. iapt_stats   online-softmax update of max/sum, acc *= exp(old max - new max),
//                   S[k][i] := exp(S[k][i] - new max)                (one block)
//   3. iapt_pool    acc[k][j] += sum_i S[k][i] H[i][j]               (grid column blocks x row splits)
// and to finish a layer:
//   4. iapt_down_*  U[k][c] = g((acc[k] . W_down[c]) / sum[k] + b_down[c])   (one 32-thread group per c)
//   5. iapt_up_*    out[k][c] = U[k] . W_up[c] + b_up[c]                      (one 32-thread group per c)
// Stats is its own launch so that no pooling block can observe a half-updated max.
//
// Invariants the host guarantees (checked in src/device/mod.rs before every launch):
// - blockDim.x is a power of two in [IAPT_GROUP, IAPT_MAX_BLOCK]; grids are 1-D except pool's y;
// - 1 <= m <= IAPT_MAX_M; every pointer is valid for the extents its kernel reads or writes;
// - `bad` holds IAPT_NO_BAD_ROW until a non-finite score is seen; then the smallest bad row.

#define IAPT_MAX_BLOCK 256
#define IAPT_MAX_M 8
#define IAPT_GROUP 32
#define IAPT_NO_BAD_ROW 2147483647
#define IAPT_DBL_LOWEST (-1.7976931348623157e308)

// Storage dtype codes (must match `dtype_code` in src/device/mod.rs).
#define IAPT_F32 0
#define IAPT_F16 1
#define IAPT_BF16 2

// Activation codes (must match `act_params` in src/device/mod.rs, its `kind` and `variant`).
#define IAPT_ACT_IDENTITY 0
#define IAPT_ACT_RELU 1
#define IAPT_ACT_GELU 2
#define IAPT_ACT_GELU_TANH 3
#define IAPT_ACT_SILU 4
#define IAPT_ACT_TANH 5
#define IAPT_ACT_RATIONAL 6

// Rational variants (D evaluates as B at inference).
#define IAPT_RAT_A 0
#define IAPT_RAT_B 1
#define IAPT_RAT_C 2

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define IAPT_ON_GPU 1
#endif

__device__ inline float iapt_bits_f32(unsigned int bits) {
#ifdef IAPT_ON_GPU
    return __uint_as_float(bits);
#else
    return __builtin_bit_cast(float, bits);
#endif
}

// IEEE binary16 -> binary32 (exact).
__device__ inline float iapt_h2f(unsigned short h) {
#ifdef IAPT_ON_GPU
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    unsigned int sign = ((unsigned int)h >> 15) << 31;
    unsigned int e = ((unsigned int)h >> 10) & 0x1fu;
    unsigned int man = (unsigned int)h & 0x3ffu;
    if (e == 0) {
        if (man == 0) {
            return iapt_bits_f32(sign);
        }
        // Subnormal: shift the leading one up to bit 10; each shift lowers the exponent by one.
        unsigned int shifts = 0;
        while ((man & 0x400u) == 0) {
            man <<= 1;
            shifts++;
        }
        man &= 0x3ffu;
        return iapt_bits_f32(sign | ((113u - shifts) << 23) | (man << 13));
    }
    if (e == 31) {
        return iapt_bits_f32(sign | 0x7f800000u | (man << 13));
    }
    return iapt_bits_f32(sign | ((e + 112u) << 23) | (man << 13));
#endif
}

// bfloat16 is the upper half of a binary32.
__device__ inline float iapt_bf2f(unsigned short b) {
    return iapt_bits_f32((unsigned int)b << 16);
}

// Element i of a weight tensor stored as DT, in double.
template <int DT> struct IaptLoad;
template <> struct IaptLoad<IAPT_F32> {
    typedef float T;
    __device__ static double at(const T* p, long long i) { return (double)p[i]; }
};
template <> struct IaptLoad<IAPT_F16> {
    typedef unsigned short T;
    __device__ static double at(const T* p, long long i) { return (double)iapt_h2f(p[i]); }
};
template <> struct IaptLoad<IAPT_BF16> {
    typedef unsigned short T;
    __device__ static double at(const T* p, long long i) { return (double)iapt_bf2f(p[i]); }
};

// Element i of a small tensor (bias, rational coefficients) of run-time dtype `dt`.
__device__ inline double iapt_load(const void* p, int dt, long long i) {
    if (dt == IAPT_F16) {
        return (double)iapt_h2f(((const unsigned short*)p)[i]);
    }
    if (dt == IAPT_BF16) {
        return (double)iapt_bf2f(((const unsigned short*)p)[i]);
    }
    return (double)((const float*)p)[i];
}

// Sums red[q][0 .. nt) into red[q][0] for q < rows. Called by every thread of the block (it holds
// barriers); starts with a barrier so that the callers' writes to `red` are visible, and ends with
// one, so red[q][0] may be read by every thread afterwards. Before `red` is written again, the
// caller needs one more barrier (all readers done).
__device__ inline void iapt_block_sum(double (*red)[IAPT_MAX_BLOCK], int rows, int tid, int nt) {
    __syncthreads();
    for (int s = nt >> 1; s > 0; s >>= 1) {
        if (tid < s) {
            for (int q = 0; q < rows; q++) {
                red[q][tid] += red[q][tid + s];
            }
        }
        __syncthreads();
    }
}

// As iapt_block_sum with max.
__device__ inline void iapt_block_max(double (*red)[IAPT_MAX_BLOCK], int rows, int tid, int nt) {
    __syncthreads();
    for (int s = nt >> 1; s > 0; s >>= 1) {
        if (tid < s) {
            for (int q = 0; q < rows; q++) {
                red[q][tid] = fmax(red[q][tid], red[q][tid + s]);
            }
        }
        __syncthreads();
    }
}

// Sums within each group of IAPT_GROUP consecutive threads: afterwards red[q][g * IAPT_GROUP]
// holds group g's sum. Same barrier contract as iapt_block_sum (every thread calls it).
__device__ inline void iapt_group_sum(double (*red)[IAPT_MAX_BLOCK], int rows, int tid) {
    __syncthreads();
    int lane = tid % IAPT_GROUP;
    for (int s = IAPT_GROUP >> 1; s > 0; s >>= 1) {
        if (lane < s) {
            for (int q = 0; q < rows; q++) {
                red[q][tid] += red[q][tid + s];
            }
        }
        __syncthreads();
    }
}

// The activation g of channel `ch` (of r) at x, in double; exactly crates/generator/src/activation.rs.
// `num` is [groups, nl], `den` is [groups, dl] (both of dtype cdt; unused unless rational).
__device__ inline double iapt_act(double x, int ch, int r, int kind, int variant, const void* num, const void* den, int cdt, int nl,
                                  int dl, int groups) {
    if (kind == IAPT_ACT_RELU) {
        return x > 0.0 ? x : 0.0;
    }
    if (kind == IAPT_ACT_GELU) {
        return 0.5 * x * (1.0 + erf(x * 0.70710678118654752440));
    }
    if (kind == IAPT_ACT_GELU_TANH) {
        return 0.5 * x * (1.0 + tanh(0.79788456080286535588 * (x + 0.044715 * x * x * x)));
    }
    if (kind == IAPT_ACT_SILU) {
        return x / (1.0 + exp(-x));
    }
    if (kind == IAPT_ACT_TANH) {
        return tanh(x);
    }
    if (kind != IAPT_ACT_RATIONAL) {
        return x;
    }
    int g_count = groups > 1 ? groups : 1;
    int per = r / g_count > 1 ? r / g_count : 1;
    int g = ch / per < g_count - 1 ? ch / per : g_count - 1;
    long long a0 = (long long)g * nl;
    long long b0 = (long long)g * dl;
    double p = 0.0;
    for (int j = nl - 1; j >= 0; j--) {
        p = p * x + iapt_load(num, cdt, a0 + j);
    }
    double t = 0.0;
    double q;
    if (variant == IAPT_RAT_A) {
        double ax = fabs(x);
        for (int i = dl - 1; i >= 0; i--) {
            t = (t + fabs(iapt_load(den, cdt, b0 + i))) * ax;
        }
        q = 1.0 + t;
    } else if (variant == IAPT_RAT_C) {
        for (int i = dl - 1; i >= 0; i--) {
            t = t * x + iapt_load(den, cdt, b0 + i);
        }
        q = 0.1 + fabs(t);
    } else {
        for (int i = dl - 1; i >= 0; i--) {
            t = (t + iapt_load(den, cdt, b0 + i)) * x;
        }
        q = 1.0 + fabs(t);
    }
    return p / q;
}

// 1. Scores of one chunk. Grid: (n, 1, 1), block b = row i. S is m x n (row k = soft token k).
// A non-finite score lowers *bad to the row's index in the sequence (row0 + i).
extern "C" __global__ void iapt_scores(const float* h, int n, int d, const float* kt, int m, double scale, double* s, int* bad,
                                       int row0) {
    __shared__ double red[IAPT_MAX_M][IAPT_MAX_BLOCK];
    int tid = (int)threadIdx.x;
    int nt = (int)blockDim.x;
    int i = (int)blockIdx.x;
    const float* row = h + (long long)i * d;
    double part[IAPT_MAX_M];
    for (int k = 0; k < IAPT_MAX_M; k++) {
        part[k] = 0.0;
    }
    for (int j = tid; j < d; j += nt) {
        double x = (double)row[j];
        for (int k = 0; k < IAPT_MAX_M; k++) {
            if (k < m) {
                part[k] += x * (double)kt[(long long)k * d + j];
            }
        }
    }
    for (int k = 0; k < IAPT_MAX_M; k++) {
        red[k][tid] = part[k];
    }
    iapt_block_sum(red, m, tid, nt);
    if (tid == 0) {
        for (int k = 0; k < m; k++) {
            double v = red[k][0] * scale;
            s[(long long)k * n + i] = v;
            if (!isfinite(v)) {
                atomicMin(bad, row0 + i);
            }
        }
    }
}

// 2. Online-softmax statistics of one chunk. Grid: (1, 1, 1). For each soft token k: new max =
// max(old, chunk max); f = exp(old - new) (0 for the first chunk, whose old max is -inf);
// sum = sum * f + sum_i exp(S - new); acc[k][:] *= f; and S[k][i] := exp(S[k][i] - new), the
// pooling weights. mx/sum/acc are this layer's state (m, m, m x d).
extern "C" __global__ void iapt_stats(double* s, int n, int m, double* mx, double* sum, double* acc, int d) {
    __shared__ double red[1][IAPT_MAX_BLOCK];
    __shared__ double sh_new;
    __shared__ double sh_f;
    int tid = (int)threadIdx.x;
    int nt = (int)blockDim.x;
    for (int k = 0; k < m; k++) {
        double* sk = s + (long long)k * n;
        double lm = IAPT_DBL_LOWEST;
        for (int i = tid; i < n; i += nt) {
            lm = fmax(lm, sk[i]);
        }
        red[0][tid] = lm;
        iapt_block_max(red, 1, tid, nt);
        if (tid == 0) {
            double old = mx[k];
            double nw = fmax(old, red[0][0]);
            sh_new = nw;
            sh_f = exp(old - nw);
            mx[k] = nw;
        }
        __syncthreads();
        double nw = sh_new;
        double f = sh_f;
        double ls = 0.0;
        for (int i = tid; i < n; i += nt) {
            double w = exp(sk[i] - nw);
            sk[i] = w;
            ls += w;
        }
        red[0][tid] = ls;
        iapt_block_sum(red, 1, tid, nt);
        if (tid == 0) {
            sum[k] = sum[k] * f + red[0][0];
        }
        if (f != 1.0) {
            double* ak = acc + (long long)k * d;
            for (int j = tid; j < d; j += nt) {
                ak[j] *= f;
            }
        }
        // Everyone is done with red, sh_new and sh_f before the next soft token rewrites them.
        __syncthreads();
    }
}

// 3. Weighted pooling of one chunk. Grid: (ceil(d / b), splits, 1). Thread t of block (x, y) owns
// column j = x * b + t and rows [y * rows_per_split, min(n, (y + 1) * rows_per_split)): H is read
// coalesced and once, all m soft tokens per thread, and the partial sums are added atomically
// (splits fill the chip when d / b is small). No barriers, so the early return is safe.
extern "C" __global__ void iapt_pool(const float* h, int n, int d, const double* w, int m, double* acc, int rows_per_split) {
    int j = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    if (j >= d) {
        return;
    }
    int i0 = (int)blockIdx.y * rows_per_split;
    int i1 = i0 + rows_per_split < n ? i0 + rows_per_split : n;
    if (i0 >= i1) {
        return;
    }
    double part[IAPT_MAX_M];
    for (int k = 0; k < IAPT_MAX_M; k++) {
        part[k] = 0.0;
    }
    for (int i = i0; i < i1; i++) {
        double x = (double)h[(long long)i * d + j];
        for (int k = 0; k < IAPT_MAX_M; k++) {
            if (k < m) {
                part[k] += w[(long long)k * n + i] * x;
            }
        }
    }
    // Compile-time trip count, so that part[] stays in registers.
    for (int k = 0; k < IAPT_MAX_M; k++) {
        if (k < m) {
            atomicAdd(&acc[(long long)k * d + j], part[k]);
        }
    }
}

// 4. Down-projection of the m pooled rows, bias and activation. Grid: (ceil(r / (b / 32)), 1, 1);
// group g (32 consecutive threads) of block x owns channel c = x * (b / 32) + g and reads row c of
// W_down (d values) coalesced, exactly once, for all m soft tokens. Writes U (m x r, double).
template <int DT>
__device__ void iapt_down_body(const double* acc, const double* sum, int m, int d, const typename IaptLoad<DT>::T* wd, const void* bd,
                               int bd_dt, int r, int kind, int variant, const void* num, const void* den, int cdt, int nl, int dl,
                               int groups, double* u) {
    __shared__ double red[IAPT_MAX_M][IAPT_MAX_BLOCK];
    __shared__ double inv[IAPT_MAX_M];
    int tid = (int)threadIdx.x;
    int nt = (int)blockDim.x;
    int lane = tid % IAPT_GROUP;
    int c = (int)blockIdx.x * (nt / IAPT_GROUP) + tid / IAPT_GROUP;
    if (tid < m) {
        inv[tid] = 1.0 / sum[tid];
    }
    double part[IAPT_MAX_M];
    for (int k = 0; k < IAPT_MAX_M; k++) {
        part[k] = 0.0;
    }
    if (c < r) {
        const typename IaptLoad<DT>::T* row = wd + (long long)c * d;
        for (int j = lane; j < d; j += IAPT_GROUP) {
            double x = IaptLoad<DT>::at(row, j);
            for (int k = 0; k < IAPT_MAX_M; k++) {
                if (k < m) {
                    part[k] += x * acc[(long long)k * d + j];
                }
            }
        }
    }
    for (int k = 0; k < IAPT_MAX_M; k++) {
        red[k][tid] = part[k];
    }
    iapt_group_sum(red, m, tid);
    if (lane == 0 && c < r) {
        double b = bd ? iapt_load(bd, bd_dt, c) : 0.0;
        for (int k = 0; k < m; k++) {
            double y = red[k][tid] * inv[k] + b;
            u[(long long)k * r + c] = iapt_act(y, c, r, kind, variant, num, den, cdt, nl, dl, groups);
        }
    }
}

// 5. Up-projection into the destination rows. Grid: (ceil(d / (b / 32)), 1, 1); group g of block x
// owns output column c = x * (b / 32) + g and reads row c of W_up (r values) once for all m soft
// tokens. Writes out[k * d + c] (m rows of d floats, contiguous) only when no bad row was seen:
// the early return reads the same value in every thread, so no barrier is skipped by some only.
template <int DT>
__device__ void iapt_up_body(const double* u, int m, int r, const typename IaptLoad<DT>::T* wu, const void* bu, int bu_dt, int d,
                             float* out, const int* bad) {
    __shared__ double red[IAPT_MAX_M][IAPT_MAX_BLOCK];
    if (*bad != IAPT_NO_BAD_ROW) {
        return;
    }
    int tid = (int)threadIdx.x;
    int nt = (int)blockDim.x;
    int lane = tid % IAPT_GROUP;
    int c = (int)blockIdx.x * (nt / IAPT_GROUP) + tid / IAPT_GROUP;
    double part[IAPT_MAX_M];
    for (int k = 0; k < IAPT_MAX_M; k++) {
        part[k] = 0.0;
    }
    if (c < d) {
        const typename IaptLoad<DT>::T* row = wu + (long long)c * r;
        for (int q = lane; q < r; q += IAPT_GROUP) {
            double x = IaptLoad<DT>::at(row, q);
            for (int k = 0; k < IAPT_MAX_M; k++) {
                if (k < m) {
                    part[k] += x * u[(long long)k * r + q];
                }
            }
        }
    }
    for (int k = 0; k < IAPT_MAX_M; k++) {
        red[k][tid] = part[k];
    }
    iapt_group_sum(red, m, tid);
    if (lane == 0 && c < d) {
        double b = bu ? iapt_load(bu, bu_dt, c) : 0.0;
        for (int k = 0; k < m; k++) {
            out[(long long)k * d + c] = (float)(red[k][tid] + b);
        }
    }
}

#define IAPT_DOWN_ENTRY(NAME, DT)                                                                                                      \
    extern "C" __global__ void NAME(const double* acc, const double* sum, int m, int d, const typename IaptLoad<DT>::T* wd,           \
                                    const void* bd, int bd_dt, int r, int kind, int variant, const void* num, const void* den,       \
                                    int cdt, int nl, int dl, int groups, double* u) {                                                 \
        iapt_down_body<DT>(acc, sum, m, d, wd, bd, bd_dt, r, kind, variant, num, den, cdt, nl, dl, groups, u);                       \
    }

#define IAPT_UP_ENTRY(NAME, DT)                                                                                                        \
    extern "C" __global__ void NAME(const double* u, int m, int r, const typename IaptLoad<DT>::T* wu, const void* bu, int bu_dt,    \
                                    int d, float* out, const int* bad) {                                                              \
        iapt_up_body<DT>(u, m, r, wu, bu, bu_dt, d, out, bad);                                                                       \
    }

IAPT_DOWN_ENTRY(iapt_down_f32, IAPT_F32)
IAPT_DOWN_ENTRY(iapt_down_f16, IAPT_F16)
IAPT_DOWN_ENTRY(iapt_down_bf16, IAPT_BF16)
IAPT_UP_ENTRY(iapt_up_f32, IAPT_F32)
IAPT_UP_ENTRY(iapt_up_f16, IAPT_F16)
IAPT_UP_ENTRY(iapt_up_bf16, IAPT_BF16)
