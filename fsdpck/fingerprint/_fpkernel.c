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
#include <limits.h>

#if defined(__GNUC__) && !defined(__clang__)
/* The 64-byte vectors below are only ever passed between inlined functions: no ABI is involved. */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

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

/* Statistics of one contiguous run of floating-point values, for the manifest's per-key
 * entries (fsdpck/state/summary.py): out[0] the count of non-finite elements, out[1] the sum of
 * the finite ones (in double), out[2] / out[3] their min / max (+inf / -inf when none is finite).
 * code: 0 float32, 1 float64, 2 bfloat16, 3 float16. Independent lanes keep the arithmetic
 * vectorised without -ffast-math (which would also break the finite test: v - v == 0 is false
 * exactly for NaN and +-inf). */

FSDPCK_INLINE float bf16_to_float(uint16_t h) {
    union { uint32_t u; float f; } c = {(uint32_t)h << 16};
    return c.f;
}

FSDPCK_INLINE float f16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    union { uint32_t u; float f; } c;
    if (exp == 0x1f) {
        c.u = sign | 0x7f800000u | (man << 13); /* inf or NaN */
        return c.f;
    }
    if (exp == 0) { /* zero or subnormal: man * 2**-24, exact in float */
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    c.u = sign | ((exp + 112) << 23) | (man << 13);
    return c.f;
}

/* Explicit vectors (GCC/Clang vector extensions, lowered to whatever the clone's ISA has): 8
 * float lanes (32 bytes: native with AVX2, cheap to lower to SSE2, whose clone would otherwise
 * take many seconds to compile), their sums in two 4-lane double vectors. Lanes whose value is
 * not finite are masked out of the sum, min and max and counted. */
typedef float fsdpck_vf __attribute__((vector_size(32)));
typedef int32_t fsdpck_vi __attribute__((vector_size(32)));
typedef double fsdpck_vd __attribute__((vector_size(32)));
typedef float fsdpck_vf4 __attribute__((vector_size(16)));
#define FSDPCK_L 8

typedef struct { fsdpck_vd sum_lo, sum_hi; fsdpck_vf lo, hi; fsdpck_vi bad; } fsdpck_acc;

FSDPCK_INLINE void acc_init(fsdpck_acc *a) {
    for (int k = 0; k < FSDPCK_L; k++) {
        a->lo[k] = __builtin_inff();
        a->hi[k] = -__builtin_inff();
        a->bad[k] = 0;
    }
    a->sum_lo = (fsdpck_vd){0};
    a->sum_hi = (fsdpck_vd){0};
}

FSDPCK_INLINE fsdpck_vf select_v(fsdpck_vi mask, fsdpck_vf a, fsdpck_vf b) {
    fsdpck_vi ai, bi;
    __builtin_memcpy(&ai, &a, sizeof ai);
    __builtin_memcpy(&bi, &b, sizeof bi);
    fsdpck_vi r = (ai & mask) | (bi & ~mask);
    fsdpck_vf out;
    __builtin_memcpy(&out, &r, sizeof out);
    return out;
}

FSDPCK_INLINE void acc_sum(fsdpck_acc *a, fsdpck_vf w) {
    fsdpck_vf4 w_lo = __builtin_shufflevector(w, w, 0, 1, 2, 3);
    fsdpck_vf4 w_hi = __builtin_shufflevector(w, w, 4, 5, 6, 7);
    a->sum_lo += __builtin_convertvector(w_lo, fsdpck_vd);
    a->sum_hi += __builtin_convertvector(w_hi, fsdpck_vd);
}

FSDPCK_INLINE void acc_add(fsdpck_acc *a, const fsdpck_vf *vp) {
    fsdpck_vf v = *vp;
    fsdpck_vi fin = (v - v) == 0; /* -1 where finite */
    acc_sum(a, select_v(fin, v, (fsdpck_vf){0}));
    a->lo = select_v(fin & (v < a->lo), v, a->lo);
    a->hi = select_v(fin & (v > a->hi), v, a->hi);
    a->bad -= ~fin; /* ~fin is -1 where not finite, 0 where finite */
}

FSDPCK_INLINE void acc_add_scalar(double *sum, double *mn, double *mx, int64_t *bad, double v) {
    if (v - v == 0.0) {
        *sum += v;
        *mn = v < *mn ? v : *mn;
        *mx = v > *mx ? v : *mx;
    } else {
        (*bad)++;
    }
}

FSDPCK_INLINE void acc_finish(const fsdpck_acc *a, double sum, double mn, double mx, int64_t bad, double *out) {
    for (int k = 0; k < FSDPCK_L / 2; k++)
        sum += a->sum_lo[k] + a->sum_hi[k];
    for (int k = 0; k < FSDPCK_L; k++) {
        mn = (double)a->lo[k] < mn ? (double)a->lo[k] : mn;
        mx = (double)a->hi[k] > mx ? (double)a->hi[k] : mx;
        bad += a->bad[k];
    }
    out[0] = (double)bad; out[1] = sum; out[2] = mn; out[3] = mx;
}

/* float32, bfloat16 (the top half of a float32) and float16. Blocks of FSDPCK_L * FSDPCK_BLOCK
 * elements take a fast path: a float sum per lane (FSDPCK_BLOCK terms, then added into the double
 * sums), and min and max through integer keys (a float's bits with the magnitude bits flipped when
 * negative order like the floats themselves, and integer min/max vectorise where float ones do
 * not without -ffast-math); a block whose key bounds reach an infinity's key holds a NaN or an
 * infinity, and is taken again through the masked path, as is one whose float sum overflowed. */
#define FSDPCK_BLOCK 32

FSDPCK_INLINE int32_t order_key(int32_t bits) { return bits ^ ((bits >> 31) & 0x7fffffff); }

/* The keys of -inf and +inf. Every finite float's key lies strictly between them, every NaN's
 * outside (a NaN with the sign bit clear above +inf's, one with it set below -inf's), so the
 * block's key bounds alone say whether it holds a NaN or an infinity. */
#define FSDPCK_KEY_POS_INF ((int32_t)0x7f800000)
#define FSDPCK_KEY_NEG_INF ((int32_t)0x807fffff)

FSDPCK_INLINE float key_to_float(int32_t key) {
    int32_t bits = order_key(key); /* the map is its own inverse */
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

/* Whether every lane is finite: a block's float sum of finite values can still overflow. */
FSDPCK_INLINE int finite_v(fsdpck_vf v) {
    fsdpck_vi fin = (v - v) == 0;
    int all = -1;
    for (int k = 0; k < FSDPCK_L; k++)
        all &= fin[k];
    return all != 0;
}

/* bsum = the lane-wise float sum of one block (FSDPCK_BLOCK vectors from q), in four chains of
 * additions: one chain would wait on each addition's latency, and the block's sum would cost
 * several times the loop that hashes it. */
#define FSDPCK_BLOCK_SUM(bsum, LOADV, q)                                                    \
    fsdpck_vf bsum;                                                                         \
    do {                                                                                    \
        fsdpck_vf c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};                                   \
        for (int b = 0; b < FSDPCK_BLOCK; b += 4) {                                         \
            c0 += LOADV((q) + FSDPCK_L * b);                                                \
            c1 += LOADV((q) + FSDPCK_L * (b + 1));                                          \
            c2 += LOADV((q) + FSDPCK_L * (b + 2));                                          \
            c3 += LOADV((q) + FSDPCK_L * (b + 3));                                          \
        }                                                                                   \
        bsum = (c0 + c1) + (c2 + c3);                                                       \
    } while (0)

#define FSDPCK_STATS_V(NAME, T, LOADV, LOAD1, BITS1)                                        \
    FSDPCK_INLINE void NAME(const T *p, int64_t n, double *out) {                           \
        fsdpck_acc a;                                                                       \
        acc_init(&a);                                                                       \
        int32_t kmin = INT32_MAX, kmax = INT32_MIN;                                         \
        int64_t j = 0;                                                                      \
        for (; j + FSDPCK_L * FSDPCK_BLOCK <= n; j += FSDPCK_L * FSDPCK_BLOCK) {            \
            fsdpck_vf bsum = {0};                                                           \
            for (int b = 0; b < FSDPCK_BLOCK; b++)                                          \
                bsum += LOADV(p + j + FSDPCK_L * b);                                        \
            int32_t bmin = INT32_MAX, bmax = INT32_MIN;                                     \
            for (int k = 0; k < FSDPCK_L * FSDPCK_BLOCK; k++) {                             \
                int32_t key = order_key(BITS1(p[j + k]));                                   \
                bmin = key < bmin ? key : bmin;                                             \
                bmax = key > bmax ? key : bmax;                                             \
            }                                                                               \
            if (bmin > FSDPCK_KEY_NEG_INF && bmax < FSDPCK_KEY_POS_INF && finite_v(bsum)) { \
                acc_sum(&a, bsum);                                                          \
                kmin = bmin < kmin ? bmin : kmin;                                           \
                kmax = bmax > kmax ? bmax : kmax;                                           \
            } else {                                                                        \
                for (int b = 0; b < FSDPCK_BLOCK; b++) {                                    \
                    fsdpck_vf v = LOADV(p + j + FSDPCK_L * b);                              \
                    acc_add(&a, &v);                                                        \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
        for (; j + FSDPCK_L <= n; j += FSDPCK_L) {                                          \
            fsdpck_vf v = LOADV(p + j);                                                     \
            acc_add(&a, &v);                                                                \
        }                                                                                   \
        double sum = 0.0, mn = __builtin_inf(), mx = -__builtin_inf();                      \
        int64_t bad = 0;                                                                    \
        for (; j < n; j++)                                                                  \
            acc_add_scalar(&sum, &mn, &mx, &bad, (double)LOAD1(p[j]));                      \
        if (kmin <= kmax) {                                                                 \
            float lo = key_to_float(kmin), hi = key_to_float(kmax);                         \
            mn = (double)lo < mn ? (double)lo : mn;                                         \
            mx = (double)hi > mx ? (double)hi : mx;                                         \
        }                                                                                   \
        acc_finish(&a, sum, mn, mx, bad, out);                                              \
    }

FSDPCK_INLINE int32_t bits_f32(float f) {
    int32_t x;
    __builtin_memcpy(&x, &f, 4);
    return x;
}

FSDPCK_INLINE int32_t bits_bf16(uint16_t h) { return (int32_t)((uint32_t)h << 16); }

FSDPCK_INLINE int32_t bits_f16(uint16_t h) {
#if defined(__FLT16_MAX__)
    _Float16 v;
    __builtin_memcpy(&v, &h, 2);
    return bits_f32((float)v);
#else
    return bits_f32(f16_to_float(h));
#endif
}

FSDPCK_INLINE fsdpck_vf load_f32(const float *p) {
    fsdpck_vf v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

FSDPCK_INLINE fsdpck_vf vf_of_bits(fsdpck_vi bits) {
    fsdpck_vf f;
    __builtin_memcpy(&f, &bits, sizeof f);
    return f;
}

FSDPCK_INLINE fsdpck_vf load_bf16(const uint16_t *p) {
    typedef uint16_t vh __attribute__((vector_size(FSDPCK_L * 2)));
    vh h;
    __builtin_memcpy(&h, p, sizeof h);
    return vf_of_bits(__builtin_convertvector(h, fsdpck_vi) << 16);
}

FSDPCK_INLINE fsdpck_vf load_f16(const uint16_t *p) {
#if defined(__FLT16_MAX__)
    typedef _Float16 vhf __attribute__((vector_size(FSDPCK_L * 2)));
    vhf h;
    __builtin_memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, fsdpck_vf);
#else
    fsdpck_vf v;
    for (int k = 0; k < FSDPCK_L; k++)
        v[k] = f16_to_float(p[k]);
    return v;
#endif
}

#define FSDPCK_AS_IS(x) (x)
FSDPCK_STATS_V(stats_f32, float, load_f32, FSDPCK_AS_IS, bits_f32)
FSDPCK_STATS_V(stats_bf16, uint16_t, load_bf16, bf16_to_float, bits_bf16)
FSDPCK_STATS_V(stats_f16, uint16_t, load_f16, f16_to_float, bits_f16)

/* float64: 4 double lanes. */
typedef int64_t fsdpck_vl __attribute__((vector_size(32)));

FSDPCK_INLINE fsdpck_vd select_d(fsdpck_vl mask, fsdpck_vd a, fsdpck_vd b) {
    fsdpck_vl ai, bi;
    __builtin_memcpy(&ai, &a, sizeof ai);
    __builtin_memcpy(&bi, &b, sizeof bi);
    fsdpck_vl r = (ai & mask) | (bi & ~mask);
    fsdpck_vd out;
    __builtin_memcpy(&out, &r, sizeof out);
    return out;
}

FSDPCK_INLINE void stats_f64(const double *p, int64_t n, double *out) {
    fsdpck_vd sum = {0}, lo, hi;
    fsdpck_vl bad = {0};
    for (int k = 0; k < 4; k++) {
        lo[k] = __builtin_inf();
        hi[k] = -__builtin_inf();
    }
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        fsdpck_vd v;
        __builtin_memcpy(&v, p + j, sizeof v);
        fsdpck_vl fin = (v - v) == 0;
        sum += select_d(fin, v, (fsdpck_vd){0});
        lo = select_d(fin & (v < lo), v, lo);
        hi = select_d(fin & (v > hi), v, hi);
        bad -= ~fin;
    }
    double total = 0.0, mn = __builtin_inf(), mx = -__builtin_inf();
    int64_t nonfinite = 0;
    for (; j < n; j++)
        acc_add_scalar(&total, &mn, &mx, &nonfinite, p[j]);
    for (int k = 0; k < 4; k++) {
        total += sum[k];
        mn = lo[k] < mn ? lo[k] : mn;
        mx = hi[k] > mx ? hi[k] : mx;
        nonfinite += bad[k];
    }
    out[0] = (double)nonfinite; out[1] = total; out[2] = mn; out[3] = mx;
}

FSDPCK_INLINE int stats_contiguous(const void *data, int64_t code, int64_t n, double *out) {
    switch (code) {
    case 0: stats_f32((const float *)data, n, out); return 0;
    case 1: stats_f64((const double *)data, n, out); return 0;
    case 2: stats_bf16((const uint16_t *)data, n, out); return 0;
    case 3: stats_f16((const uint16_t *)data, n, out); return 0;
    default: return -1;
    }
}

FSDPCK_INLINE double load_one(const char *p, int64_t code) {
    switch (code) {
    case 0: { float v; __builtin_memcpy(&v, p, 4); return v; }
    case 1: { double v; __builtin_memcpy(&v, p, 8); return v; }
    case 2: { uint16_t h; __builtin_memcpy(&h, p, 2); return bf16_to_float(h); }
    default: { uint16_t h; __builtin_memcpy(&h, p, 2); return f16_to_float(h); }
    }
}

int64_t fsdpck_stats(const void *data, int64_t code, int64_t n, double *out);

/* The fused walk's inner loop for a contiguous run (memory and global strides 1) of float32,
 * bfloat16 or float16: each element's hash and its order key's min and max in one loop, while
 * the value is in a register. The hash is bound by its 64-bit multiplies; the key's shift, xor,
 * min and max run on the units those leave idle, so the bounds come almost free, where a second
 * loop over the same elements would cost its own pass of instructions. */
#define FSDPCK_HASH_KEYS(NAME, T, KEY)                                                   \
    FSDPCK_INLINE uint64_t NAME(const T *p, int64_t n, uint64_t i0, int32_t *kmin, int32_t *kmax) { \
        uint64_t acc = 0, i1 = i0 + 1;                                                     \
        int32_t lo = INT32_MAX, hi = INT32_MIN;                                            \
        for (int64_t j = 0; j < n; j++) {                                                  \
            acc += mix((uint64_t)p[j] ^ mix(i1 + (uint64_t)j));                            \
            int32_t key = KEY(p[j]);                                                       \
            lo = key < lo ? key : lo;                                                      \
            hi = key > hi ? key : hi;                                                      \
        }                                                                                  \
        *kmin = lo;                                                                        \
        *kmax = hi;                                                                        \
        return acc;                                                                        \
    }

/* The sum of a run known to hold no NaN or infinity: float lanes over blocks (the fast path's
 * sum), a block whose float sum overflowed again in double. */
#define FSDPCK_SUM_CLEAN(NAME, T, LOADV, LOAD1)                                            \
    FSDPCK_INLINE double NAME(const T *p, int64_t n) {                                     \
        fsdpck_acc a;                                                                      \
        acc_init(&a);                                                                      \
        int64_t j = 0;                                                                     \
        for (; j + FSDPCK_L * FSDPCK_BLOCK <= n; j += FSDPCK_L * FSDPCK_BLOCK) {           \
            FSDPCK_BLOCK_SUM(bsum, LOADV, p + j);                                          \
            if (finite_v(bsum)) {                                                          \
                acc_sum(&a, bsum);                                                         \
            } else {                                                                       \
                for (int b = 0; b < FSDPCK_BLOCK; b++)                                     \
                    acc_sum(&a, LOADV(p + j + FSDPCK_L * b));                              \
            }                                                                              \
        }                                                                                  \
        for (; j + FSDPCK_L <= n; j += FSDPCK_L)                                           \
            acc_sum(&a, LOADV(p + j));                                                     \
        double sum = 0.0;                                                                  \
        for (; j < n; j++)                                                                 \
            sum += (double)LOAD1(p[j]);                                                    \
        for (int k = 0; k < FSDPCK_L / 2; k++)                                             \
            sum += a.sum_lo[k] + a.sum_hi[k];                                              \
        return sum;                                                                        \
    }

/* Order keys as int32 for that loop: float32's and bfloat16's are float32 keys; float16's are
 * its own 16-bit pattern's key (the same map at 16 bits, sign-extended), so that the loop needs
 * no conversion to float and vectorises. */
FSDPCK_INLINE int32_t key_f32(uint32_t x) { return order_key((int32_t)x); }
FSDPCK_INLINE int32_t key_bf16(uint16_t h) { return order_key(bits_bf16(h)); }
FSDPCK_INLINE int32_t key_f16(uint16_t h) {
    int32_t x = (int16_t)h;
    return x ^ ((x >> 15) & 0x7fff);
}
FSDPCK_INLINE double f16_of_key(int32_t key) {
    int32_t x = key ^ ((key >> 15) & 0x7fff); /* its own inverse, as order_key */
    return f16_to_float((uint16_t)x);
}
/* float16's infinities as such keys: every finite value's key lies strictly between them. */
#define FSDPCK_KEY16_POS_INF ((int32_t)0x7c00)
#define FSDPCK_KEY16_NEG_INF ((int32_t)(int16_t)0x83ff)
FSDPCK_HASH_KEYS(hash_keys_f32, uint32_t, key_f32)
FSDPCK_HASH_KEYS(hash_keys_bf16, uint16_t, key_bf16)
FSDPCK_HASH_KEYS(hash_keys_f16, uint16_t, key_f16)
FSDPCK_SUM_CLEAN(sum_clean_f32, float, load_f32, FSDPCK_AS_IS)

/* bfloat16's clean sum takes 16 values a load: a 32-bit lane holds two, the even one becomes a
 * float by a shift and the odd one by a mask, where widening 8 values to 32 bits costs a
 * conversion and a shift per 8 (this pass was 40 % of the fingerprint's time). */

FSDPCK_INLINE double sum_clean_bf16(const uint16_t *p, int64_t n) {
    fsdpck_acc a;
    acc_init(&a);
    const fsdpck_vi high = (fsdpck_vi){0} + (int32_t)0xffff0000u;
    int64_t j = 0;
    for (; j + FSDPCK_L * FSDPCK_BLOCK <= n; j += FSDPCK_L * FSDPCK_BLOCK) {
        fsdpck_vf c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0};
        for (int b = 0; b < FSDPCK_BLOCK / 2; b += 2) {
            fsdpck_vi q0, q1;
            __builtin_memcpy(&q0, p + j + 2 * FSDPCK_L * b, sizeof q0);
            __builtin_memcpy(&q1, p + j + 2 * FSDPCK_L * (b + 1), sizeof q1);
            c0 += vf_of_bits(q0 << 16);
            c1 += vf_of_bits(q0 & high);
            c2 += vf_of_bits(q1 << 16);
            c3 += vf_of_bits(q1 & high);
        }
        fsdpck_vf bsum = (c0 + c1) + (c2 + c3);
        if (finite_v(bsum)) {
            acc_sum(&a, bsum);
        } else {
            for (int b = 0; b < FSDPCK_BLOCK; b++)
                acc_sum(&a, load_bf16(p + j + FSDPCK_L * b));
        }
    }
    for (; j + FSDPCK_L <= n; j += FSDPCK_L)
        acc_sum(&a, load_bf16(p + j));
    double sum = 0.0;
    for (; j < n; j++)
        sum += (double)bf16_to_float(p[j]);
    for (int k = 0; k < FSDPCK_L / 2; k++)
        sum += a.sum_lo[k] + a.sum_hi[k];
    return sum;
}
FSDPCK_SUM_CLEAN(sum_clean_f16, uint16_t, load_f16, f16_to_float)

/* Hash (returned) and statistics (added into tot) of a contiguous run of m >= 1 elements, for
 * codes 0, 2 and 3; a run holding a NaN or an infinity takes its statistics from fsdpck_stats. */
#if defined(__GNUC__) && !defined(__clang__) && !defined(FSDPCK_TWO_PASS)
/* With GCC, float32 and bfloat16 pieces take their sum in the same loop as well, in double: the
 * loop then reads memory once in all, where a second pass over the piece in the L1 cache still
 * cost 1.5-1.6x the fingerprint alone on 64 MiB (1.3x in one loop; the statistics alone, in the
 * cache, about 1.2x). A vectorised sum must reassociate the additions, which C forbids unless
 * asked: this function alone asks (the order of a sum's terms is fsdpck's choice; no NaN or
 * infinity reaches a sum that is kept, and a float32 sum in double cannot overflow). It is not
 * inlined, as a function with its own optimisation options cannot be. Other compilers (and a
 * build with -DFSDPCK_TWO_PASS, which the tests make) sum in a second pass over the cached piece. */
#define FSDPCK_ONE_PASS 1
FSDPCK_INLINE float value_f32(uint32_t x) {
    float f;
    __builtin_memcpy(&f, &x, 4);
    return f;
}
FSDPCK_INLINE float value_bf16(uint16_t h) { return value_f32((uint32_t)h << 16); }

#define FSDPCK_HASH_KEYS_SUM(NAME, T, KEY, VALUE)                                              \
    FSDPCK_CLONES __attribute__((noinline, optimize("associative-math", "no-signed-zeros",     \
                                                     "no-trapping-math")))                     \
    static uint64_t NAME(const T *p, int64_t n, uint64_t i0, int32_t *kmin, int32_t *kmax,     \
                         double *sum) {                                                        \
        uint64_t acc = 0, i1 = i0 + 1;                                                         \
        int32_t lo = INT32_MAX, hi = INT32_MIN;                                                \
        double s = 0.0;                                                                        \
        for (int64_t j = 0; j < n; j++) {                                                      \
            acc += mix((uint64_t)p[j] ^ mix(i1 + (uint64_t)j));                                \
            int32_t key = KEY(p[j]);                                                           \
            lo = key < lo ? key : lo;                                                          \
            hi = key > hi ? key : hi;                                                          \
            s += (double)VALUE(p[j]);                                                          \
        }                                                                                      \
        *kmin = lo;                                                                            \
        *kmax = hi;                                                                            \
        *sum = s;                                                                              \
        return acc;                                                                            \
    }
FSDPCK_HASH_KEYS_SUM(hash_keys_sum_f32, uint32_t, key_f32, value_f32)
FSDPCK_HASH_KEYS_SUM(hash_keys_sum_bf16, uint16_t, key_bf16, value_bf16)
#endif

FSDPCK_INLINE uint64_t hash_stats_piece(const char *r, int64_t code, int64_t m, uint64_t i0, double *tot) {
    int32_t kmin, kmax;
    uint64_t h;
    double sum = 0.0;
    int summed = 0;
    switch (code) {
#ifdef FSDPCK_ONE_PASS
    case 0: h = hash_keys_sum_f32((const uint32_t *)r, m, i0, &kmin, &kmax, &sum); summed = 1; break;
    case 2: h = hash_keys_sum_bf16((const uint16_t *)r, m, i0, &kmin, &kmax, &sum); summed = 1; break;
#else
    case 0: h = hash_keys_f32((const uint32_t *)r, m, i0, &kmin, &kmax); break;
    case 2: h = hash_keys_bf16((const uint16_t *)r, m, i0, &kmin, &kmax); break;
#endif
    default: h = hash_keys_f16((const uint16_t *)r, m, i0, &kmin, &kmax); break;
    }
    const int clean = code == 3 ? kmin > FSDPCK_KEY16_NEG_INF && kmax < FSDPCK_KEY16_POS_INF
                                : kmin > FSDPCK_KEY_NEG_INF && kmax < FSDPCK_KEY_POS_INF;
    if (clean) {
        double lo = code == 3 ? f16_of_key(kmin) : key_to_float(kmin);
        double hi = code == 3 ? f16_of_key(kmax) : key_to_float(kmax);
        if (!summed)
            sum = code == 0 ? sum_clean_f32((const float *)r, m)
                : code == 2 ? sum_clean_bf16((const uint16_t *)r, m) : sum_clean_f16((const uint16_t *)r, m);
        tot[1] += sum;
        tot[2] = lo < tot[2] ? lo : tot[2];
        tot[3] = hi > tot[3] ? hi : tot[3];
    } else {
        double part[4] = {0.0, 0.0, __builtin_inf(), -__builtin_inf()};
        fsdpck_stats(r, code, m, part);
        tot[0] += part[0];
        tot[1] += part[1];
        tot[2] = part[2] < tot[2] ? part[2] : tot[2];
        tot[3] = part[3] > tot[3] ? part[3] : tot[3];
    }
    return h;
}

/* Adds the statistics of n elements at memory stride s (elements) into tot (out[]'s layout). A
 * contiguous run goes to fsdpck_stats, which the loader resolves to its clone for this CPU: the
 * vector code is compiled once per clone, not again inside every walk. */
FSDPCK_INLINE void stats_run(const char *p, int64_t itemsize, int64_t code, int64_t n, int64_t s, double *tot) {
    double part[4] = {0.0, 0.0, __builtin_inf(), -__builtin_inf()};
    if (s == 1) {
        fsdpck_stats(p, code, n, part);
    } else {
        int64_t bad = 0;
        for (int64_t j = 0; j < n; j++)
            acc_add_scalar(&part[1], &part[2], &part[3], &bad, load_one(p + j * s * itemsize, code));
        part[0] = (double)bad;
    }
    tot[0] += part[0];
    tot[1] += part[1];
    tot[2] = part[2] < tot[2] ? part[2] : tot[2];
    tot[3] = part[3] > tot[3] ? part[3] : tot[3];
}

/* Statistics of one contiguous run; returns 0, or -1 for a code it does not know. */
FSDPCK_CLONES
int64_t fsdpck_stats(const void *data, int64_t code, int64_t n, double *out) {
    return stats_contiguous(data, code, n, out);
}

#define FSDPCK_MAX_DIMS 64
/* With statistics, a run is walked in pieces of this many elements, so that memory is read once
 * for both: a contiguous float32/bfloat16/float16 piece is hashed and its key bounds taken in one
 * loop (hash_stats_piece), then summed while it is still in the L1 cache; any other piece is
 * hashed, then its statistics are taken from the cache. */
#define FSDPCK_FUSED_PIECE 4096

/* The walk over a strided chunk (see the top of the file); with code >= 0 it also adds the
 * statistics of every element into tot. */
FSDPCK_INLINE uint64_t walk(const void *data, int64_t itemsize, int64_t ndim, const int64_t *shape,
                            const int64_t *strides, const int64_t *gstrides, uint64_t base, int64_t code,
                            double *tot) {
    const char *p = (const char *)data;
    if (ndim <= 0) {
        if (code >= 0)
            stats_run(p, itemsize, code, 1, 1, tot);
        return run(p, itemsize, 1, 1, base, 1);
    }
    const int64_t last = ndim - 1;
    const int64_t n = shape[last], s = strides[last], g = gstrides[last];
    int64_t idx[FSDPCK_MAX_DIMS] = {0};
    int64_t offset = 0; /* in elements, from data */
    uint64_t i0 = base, acc = 0;
    for (;;) {
        const char *q = p + offset * itemsize;
        if (code < 0) {
            acc += run(q, itemsize, n, s, i0, g);
        } else {
            const int one_loop = s == 1 && g == 1 && code != 1;
            for (int64_t k = 0; k < n; k += FSDPCK_FUSED_PIECE) {
                const int64_t m = n - k < FSDPCK_FUSED_PIECE ? n - k : FSDPCK_FUSED_PIECE;
                const char *r = q + k * s * itemsize;
                if (one_loop) {
                    acc += hash_stats_piece(r, code, m, i0 + (uint64_t)k, tot);
                } else {
                    acc += run(r, itemsize, m, s, i0 + (uint64_t)k * (uint64_t)g, g);
                    stats_run(r, itemsize, code, m, s, tot);
                }
            }
        }
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

/* The partial fingerprint of the chunk, mod 2**64. itemsize is 1, 2, 4 or 8; 0 <= ndim <= 64;
 * every size >= 1 (the caller returns 0 for empty chunks and never calls with them). */
FSDPCK_CLONES
uint64_t fsdpck_fp_strided(const void *data, int64_t itemsize, int64_t ndim, const int64_t *shape,
                           const int64_t *strides, const int64_t *gstrides, uint64_t base) {
    return walk(data, itemsize, ndim, shape, strides, gstrides, base, -1, 0);
}

/* The same fingerprint, and the chunk's statistics in out[] (as fsdpck_stats gives them) in the
 * same pass; code as for fsdpck_stats, and it must match itemsize (the caller checks). */
FSDPCK_CLONES
uint64_t fsdpck_fp_stats_strided(const void *data, int64_t itemsize, int64_t ndim, const int64_t *shape,
                                 const int64_t *strides, const int64_t *gstrides, uint64_t base, int64_t code,
                                 double *out) {
    out[0] = 0.0;
    out[1] = 0.0;
    out[2] = __builtin_inf();
    out[3] = -__builtin_inf();
    return walk(data, itemsize, ndim, shape, strides, gstrides, base, code, out);
}

/* The statistics `inspect --stats` and `show` report of a contiguous run (fsdpck/commands/stats.py
 * says what each is): zeros (-0.0 too), NaN, +inf and -inf counted; min, max, mean and the sum of
 * squared deviations (m2) of the finite values. Read a block of FSDPCK_VS_BLOCK elements at a
 * time, twice while it is in the L1 cache: first the counts and the extremes (floats through the
 * order keys of their bits, so that the loop is integer compares and needs no floating-point
 * flags), then, in double, the sum and the sum of squares of the finite values less a shift (the
 * middle of the block's range: no cancellation however large the mean is against the spread).
 * Blocks merge by Chan's formula. Integers have exact extremes in out_i; floats in out_d. The
 * finite test is a mask (all ones or zero) and selects are and/or with it: GCC vectorises the
 * min and max reductions then, where a conditional select kept the loop scalar (5x slower).
 * Codes: 0 float32, 1 float64, 2 bfloat16, 3 float16; 10 int8, 11 uint8 (and bool), 12 int16,
 * 13 int32, 14 int64. */
#define FSDPCK_VS_BLOCK 2048

typedef struct {
    int64_t n;
    double mean, m2;
} fsdpck_moments;

FSDPCK_INLINE void moments_merge(fsdpck_moments *a, int64_t nb, double s1, double s2, double shift) {
    if (nb == 0)
        return;
    const double mb = shift + s1 / (double)nb;
    double m2b = s2 - s1 * s1 / (double)nb;
    m2b = m2b > 0.0 ? m2b : 0.0;
    if (a->n == 0) {
        a->n = nb;
        a->mean = mb;
        a->m2 = m2b;
        return;
    }
    const double n = (double)(a->n + nb), d = mb - a->mean;
    a->m2 += m2b + d * d * ((double)a->n * (double)nb / n);
    a->mean += d * (double)nb / n;
    a->n += nb;
}

#if defined(__GNUC__) && !defined(__clang__)
/* The double sums reassociate (vectorised lanes); nothing else in these functions is affected. */
#define FSDPCK_VS_ATTR FSDPCK_CLONES __attribute__((noinline, optimize("associative-math", "no-signed-zeros", \
                                                                       "no-trapping-math")))
#else
#define FSDPCK_VS_ATTR FSDPCK_CLONES __attribute__((noinline))
#endif

/* One block of a float type whose elements give float32 bits (BITS) and a value (VALUE). */
#define FSDPCK_VS_FLOAT32(NAME, T, BITS)                                                                  \
    FSDPCK_VS_ATTR static void NAME(const T *p, int64_t n, int64_t *cnt, int32_t *kmin, int32_t *kmax,    \
                                    fsdpck_moments *mo) {                                                 \
        for (int64_t k = 0; k < n; k += FSDPCK_VS_BLOCK) {                                                \
            const int64_t m = n - k < FSDPCK_VS_BLOCK ? n - k : FSDPCK_VS_BLOCK;                          \
            const T *q = p + k;                                                                           \
            int32_t zeros = 0, pinf = 0, ninf = 0, fin = 0, lo = INT32_MAX, hi = INT32_MIN;              \
            for (int64_t j = 0; j < m; j++) {                                                             \
                const int32_t b = BITS(q[j]), key = order_key(b);                                         \
                const int32_t f = -((b & 0x7f800000) != 0x7f800000); /* all ones when finite */          \
                zeros -= -((b & 0x7fffffff) == 0);                                                        \
                pinf -= -(b == (int32_t)0x7f800000);                                                      \
                ninf -= -(b == (int32_t)0xff800000);                                                      \
                fin -= f;                                                                                 \
                const int32_t kl = (key & f) | (INT32_MAX & ~f), kh = (key & f) | (INT32_MIN & ~f);        \
                lo = kl < lo ? kl : lo;                                                                   \
                hi = kh > hi ? kh : hi;                                                                   \
            }                                                                                             \
            cnt[0] += zeros;                                                                              \
            cnt[1] += m - fin - pinf - ninf;                                                              \
            cnt[2] += pinf;                                                                               \
            cnt[3] += ninf;                                                                               \
            if (!fin)                                                                                     \
                continue;                                                                                 \
            *kmin = lo < *kmin ? lo : *kmin;                                                              \
            *kmax = hi > *kmax ? hi : *kmax;                                                              \
            const double shift = 0.5 * ((double)key_to_float(lo) + (double)key_to_float(hi));             \
            double s1 = 0.0, s2 = 0.0;                                                                    \
            for (int64_t j = 0; j < m; j++) {                                                             \
                const int32_t b = BITS(q[j]);                                                             \
                float x;                                                                                  \
                __builtin_memcpy(&x, &b, 4);                                                              \
                const double d = (b & 0x7f800000) != 0x7f800000 ? (double)x - shift : 0.0;                \
                s1 += d;                                                                                  \
                s2 += d * d;                                                                              \
            }                                                                                             \
            moments_merge(mo, fin, s1, s2, shift);                                                        \
        }                                                                                                 \
    }

FSDPCK_INLINE int32_t vs_bits_f32(uint32_t x) { return (int32_t)x; }

/* float16 to float32 bits without a branch or a conversion instruction (which the default clone
 * lacks, and which left the loop a libcall per element): normal values rebias the exponent,
 * subnormals are exact products, infinities and NaNs keep their payload. */
FSDPCK_INLINE int32_t vs_bits_f16(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = h & 0x7c00u, m = h & 0x3ffu;
    const uint32_t normal = sign | (((uint32_t)(h & 0x7fff) + 0x1c000u) << 13);
    const uint32_t special = sign | 0x7f800000u | (m << 13);
    const float tiny = (float)(int32_t)m * 5.9604644775390625e-8f; /* m * 2**-24 */
    uint32_t sub;
    __builtin_memcpy(&sub, &tiny, 4);
    sub |= sign;
    const uint32_t r = e == 0x7c00u ? special : normal;
    return (int32_t)(e == 0 ? sub : r);
}

FSDPCK_VS_FLOAT32(vs_f32, uint32_t, vs_bits_f32)
FSDPCK_VS_FLOAT32(vs_bf16, uint16_t, bits_bf16)
FSDPCK_VS_FLOAT32(vs_f16, uint16_t, vs_bits_f16)

FSDPCK_INLINE int64_t order_key64(int64_t bits) { return bits ^ ((bits >> 63) & INT64_MAX); }

FSDPCK_INLINE double key64_to_double(int64_t key) {
    const int64_t bits = order_key64(key);
    double d;
    __builtin_memcpy(&d, &bits, 8);
    return d;
}

FSDPCK_VS_ATTR static void vs_f64(const int64_t *p, int64_t n, int64_t *cnt, int64_t *kmin, int64_t *kmax,
                                  fsdpck_moments *mo) {
    const int64_t expo = 0x7ff0000000000000LL;
    for (int64_t k = 0; k < n; k += FSDPCK_VS_BLOCK) {
        const int64_t m = n - k < FSDPCK_VS_BLOCK ? n - k : FSDPCK_VS_BLOCK;
        const int64_t *q = p + k;
        int64_t zeros = 0, pinf = 0, ninf = 0, fin = 0, lo = INT64_MAX, hi = INT64_MIN;
        for (int64_t j = 0; j < m; j++) {
            const int64_t b = q[j], key = order_key64(b);
            const int64_t f = -(int64_t)((b & expo) != expo); /* all ones when finite */
            zeros -= -(int64_t)((b & INT64_MAX) == 0);
            pinf -= -(int64_t)(b == expo);
            ninf -= -(int64_t)(b == (int64_t)0xfff0000000000000ULL);
            fin -= f;
            const int64_t kl = (key & f) | (INT64_MAX & ~f), kh = (key & f) | (INT64_MIN & ~f);
            lo = kl < lo ? kl : lo;
            hi = kh > hi ? kh : hi;
        }
        cnt[0] += zeros;
        cnt[1] += m - fin - pinf - ninf;
        cnt[2] += pinf;
        cnt[3] += ninf;
        if (!fin)
            continue;
        *kmin = lo < *kmin ? lo : *kmin;
        *kmax = hi > *kmax ? hi : *kmax;
        const double shift = 0.5 * key64_to_double(lo) + 0.5 * key64_to_double(hi); /* no overflow */
        double s1 = 0.0, s2 = 0.0;
        for (int64_t j = 0; j < m; j++) {
            double x;
            __builtin_memcpy(&x, &q[j], 8);
            const double d = (q[j] & expo) != expo ? x - shift : 0.0;
            s1 += d;
            s2 += d * d;
        }
        moments_merge(mo, fin, s1, s2, shift);
    }
}

#define FSDPCK_VS_INT(NAME, T)                                                                            \
    FSDPCK_VS_ATTR static void NAME(const T *p, int64_t n, int64_t *cnt, int64_t *vmin, int64_t *vmax,    \
                                    fsdpck_moments *mo) {                                                 \
        for (int64_t k = 0; k < n; k += FSDPCK_VS_BLOCK) {                                                \
            const int64_t m = n - k < FSDPCK_VS_BLOCK ? n - k : FSDPCK_VS_BLOCK;                          \
            const T *q = p + k;                                                                           \
            int64_t zeros = 0, lo = INT64_MAX, hi = INT64_MIN;                                            \
            for (int64_t j = 0; j < m; j++) {                                                             \
                const int64_t v = (int64_t)q[j];                                                          \
                zeros += v == 0;                                                                          \
                lo = v < lo ? v : lo;                                                                     \
                hi = v > hi ? v : hi;                                                                     \
            }                                                                                             \
            cnt[0] += zeros;                                                                              \
            *vmin = lo < *vmin ? lo : *vmin;                                                              \
            *vmax = hi > *vmax ? hi : *vmax;                                                              \
            const double shift = 0.5 * (double)lo + 0.5 * (double)hi;                                     \
            double s1 = 0.0, s2 = 0.0;                                                                    \
            for (int64_t j = 0; j < m; j++) {                                                             \
                const double d = (double)q[j] - shift;                                                    \
                s1 += d;                                                                                  \
                s2 += d * d;                                                                              \
            }                                                                                             \
            moments_merge(mo, m, s1, s2, shift);                                                          \
        }                                                                                                 \
    }

FSDPCK_VS_INT(vs_i8, int8_t)
FSDPCK_VS_INT(vs_u8, uint8_t)
FSDPCK_VS_INT(vs_i16, int16_t)
FSDPCK_VS_INT(vs_i32, int32_t)
FSDPCK_VS_INT(vs_i64, int64_t)

/* out_i: zeros, nan, +inf, -inf, finite, then min and max for integer codes; out_d: min and max
 * for float codes (NaN when no value is finite), mean and m2. Returns 0, or -1 for an unknown code. */
FSDPCK_CLONES
int64_t fsdpck_value_stats(const void *data, int64_t code, int64_t n, int64_t *out_i, double *out_d) {
    fsdpck_moments mo = {0, 0.0, 0.0};
    int64_t cnt[4] = {0, 0, 0, 0};
    int32_t kmin = INT32_MAX, kmax = INT32_MIN;
    int64_t lmin = INT64_MAX, lmax = INT64_MIN;
    int is_float = 1;
    switch (code) {
    case 0: vs_f32((const uint32_t *)data, n, cnt, &kmin, &kmax, &mo); break;
    case 1: vs_f64((const int64_t *)data, n, cnt, &lmin, &lmax, &mo); break;
    case 2: vs_bf16((const uint16_t *)data, n, cnt, &kmin, &kmax, &mo); break;
    case 3: vs_f16((const uint16_t *)data, n, cnt, &kmin, &kmax, &mo); break;
    case 10: vs_i8((const int8_t *)data, n, cnt, &lmin, &lmax, &mo); is_float = 0; break;
    case 11: vs_u8((const uint8_t *)data, n, cnt, &lmin, &lmax, &mo); is_float = 0; break;
    case 12: vs_i16((const int16_t *)data, n, cnt, &lmin, &lmax, &mo); is_float = 0; break;
    case 13: vs_i32((const int32_t *)data, n, cnt, &lmin, &lmax, &mo); is_float = 0; break;
    case 14: vs_i64((const int64_t *)data, n, cnt, &lmin, &lmax, &mo); is_float = 0; break;
    default: return -1;
    }
    for (int k = 0; k < 4; k++)
        out_i[k] = cnt[k];
    out_i[4] = mo.n;
    out_i[5] = is_float ? 0 : lmin;
    out_i[6] = is_float ? 0 : lmax;
    if (!is_float || mo.n == 0) {
        out_d[0] = out_d[1] = __builtin_nan("");
    } else if (code == 1) {
        out_d[0] = key64_to_double(lmin);
        out_d[1] = key64_to_double(lmax);
    } else {
        out_d[0] = key_to_float(kmin);
        out_d[1] = key_to_float(kmax);
    }
    out_d[2] = mo.mean;
    out_d[3] = mo.m2;
    return 0;
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
