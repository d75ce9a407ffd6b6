/* The fingerprint's partial sum over one strided chunk, in C (DESIGN.md, "The fingerprint").
 *
 * fsdpck/fingerprint.py compiles this file at first use with the system C compiler into a
 * per-user cache and calls it through ctypes for CPU tensors; any failure there falls back to
 * the torch path. One loop in registers instead of the torch path's ~25 passes over int64
 * temporaries: each element is read once, and the arithmetic is the definition's, in uint64
 * (wrapping mod 2**64, logical shifts).
 *
 * The chunk is given as ndim dims, each with its size, its stride in the tensor's memory
 * (elements) and its stride in the global row-major index; `base` is the global index of the
 * element at `data`. The innermost dim is walked by a tight loop (the caller orders and merges
 * dims so that it is the longest run with the smallest memory stride), the outer dims by an
 * odometer. ndim 0 is one element.
 *
 * Built without -march=native so that one cached library serves every node of a cluster that
 * shares a home dir; on x86-64 Linux the entry point is cloned for AVX2 and x86-64-v4
 * (AVX-512), and the loader picks the clone for the CPU it runs on. The 64-bit multiplies
 * vectorise with AVX2 (about 2x the scalar loop) and natively with AVX-512DQ.
 */

#include <stdint.h>

#define FSDPCK_MUL1 0xbf58476d1ce4e5b9ULL
#define FSDPCK_MUL2 0x94d049bb133111ebULL

/* fingerprint.py retries without the clones (-DFSDPCK_NO_CLONES) where they do not build or load. */
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(FSDPCK_NO_CLONES)
#define FSDPCK_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define FSDPCK_CLONES
#endif

#define FSDPCK_INLINE static inline __attribute__((always_inline))

FSDPCK_INLINE uint64_t mix(uint64_t z) {
    z ^= z >> 30;
    z *= FSDPCK_MUL1;
    z ^= z >> 27;
    z *= FSDPCK_MUL2;
    z ^= z >> 31;
    return z;
}

/* Sum of h(i, b) over one run of n elements: memory stride s (elements), global index stride g,
 * global index of the first element i0. The unit-stride case is its own loop so that the
 * compiler vectorises it. T is the unsigned type of the itemsize, so widening zero-extends. */
#define FSDPCK_RUN(T)                                                                  \
    FSDPCK_INLINE uint64_t run_##T(const T *p, int64_t n, int64_t s, uint64_t i0, int64_t g) { \
        uint64_t acc = 0;                                                              \
        uint64_t i1 = i0 + 1; /* the definition hashes i + 1 */                        \
        if (s == 1 && g == 1) {                                                        \
            for (int64_t j = 0; j < n; j++)                                            \
                acc += mix((uint64_t)p[j] ^ mix(i1 + (uint64_t)j));                    \
        } else {                                                                       \
            for (int64_t j = 0; j < n; j++)                                            \
                acc += mix((uint64_t)p[j * s] ^ mix(i1 + (uint64_t)j * (uint64_t)g));  \
        }                                                                              \
        return acc;                                                                    \
    }

FSDPCK_RUN(uint8_t)
FSDPCK_RUN(uint16_t)
FSDPCK_RUN(uint32_t)
FSDPCK_RUN(uint64_t)

FSDPCK_INLINE uint64_t run(const char *p, int64_t itemsize, int64_t n, int64_t s, uint64_t i0, int64_t g) {
    switch (itemsize) {
    case 1: return run_uint8_t((const uint8_t *)p, n, s, i0, g);
    case 2: return run_uint16_t((const uint16_t *)p, n, s, i0, g);
    case 4: return run_uint32_t((const uint32_t *)p, n, s, i0, g);
    default: return run_uint64_t((const uint64_t *)p, n, s, i0, g);
    }
}

#define FSDPCK_MAX_DIMS 64

/* The partial fingerprint of the chunk, mod 2**64. itemsize is 1, 2, 4 or 8; 0 <= ndim <= 64;
 * every size >= 1 (the caller returns 0 for empty chunks and never calls with them). */
FSDPCK_CLONES
uint64_t fsdpck_fp_strided(const void *data, int64_t itemsize, int64_t ndim, const int64_t *shape,
                           const int64_t *strides, const int64_t *gstrides, uint64_t base) {
    const char *p = (const char *)data;
    if (ndim <= 0)
        return run(p, itemsize, 1, 1, base, 1);
    const int64_t last = ndim - 1;
    const int64_t n = shape[last], s = strides[last], g = gstrides[last];
    int64_t idx[FSDPCK_MAX_DIMS] = {0};
    int64_t offset = 0; /* in elements, from data */
    uint64_t i0 = base, acc = 0;
    for (;;) {
        acc += run(p + offset * itemsize, itemsize, n, s, i0, g);
        /* Odometer over the outer dims, innermost first. */
        int64_t d = last - 1;
        for (; d >= 0; d--) {
            offset += strides[d];
            i0 += (uint64_t)gstrides[d];
            if (++idx[d] < shape[d])
                break;
            offset -= strides[d] * shape[d];
            i0 -= (uint64_t)gstrides[d] * (uint64_t)shape[d];
            idx[d] = 0;
        }
        if (d < 0)
            return acc;
    }
}

/* Which clone the loader picked on this CPU, for benchmarks and bug reports. */
const char *fsdpck_fp_isa(void) {
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(FSDPCK_NO_CLONES)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512cd"))
        return "x86-64-v4";
    if (__builtin_cpu_supports("avx2"))
        return "avx2";
    return "x86-64";
#elif defined(__aarch64__)
    return "aarch64";
#else
    return "generic";
#endif
}
