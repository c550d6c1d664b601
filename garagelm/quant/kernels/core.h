/* What every build of the kernels shares, in plain C (no Python: the ARM test driver includes it
 * too): sizes, the job a product runs, f16/bf16 conversions, the packed weight kinds, per-thread
 * scratch, and which CPU variant this translation unit is compiled for.
 *
 * Variants (setup.py builds _kernels.c once per variant, each with its own -m flags; the best
 * one this CPU executes is chosen at import, see garagelm/quant/cpu.py):
 *   avx512   AVX-512 F/BW/VL/DQ with VNNI and BITALG (Ice Lake, Sapphire Rapids, Zen 4 and later)
 *   avxvnni  AVX2 + FMA + F16C + AVX-VNNI (Intel Core 12th gen and later, Core Ultra)
 *   avx2     AVX2 + FMA + F16C (Haswell and later, AMD Zen 1-3)
 *   neon     AArch64 with the dot-product instructions (Apple silicon, recent ARM laptops)
 *   generic  plain C, any CPU
 * Every variant computes int8-activation products with the same integer arithmetic and the
 * same float32 operations per output, in the same order, so their outputs are the same bits.
 */
#ifndef GARAGE_CORE_H
#define GARAGE_CORE_H
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    defined(__AVX512BITALG__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX512 1
#define VARIANT_NAME "avx512"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define HAVE_AVX2 1
#if defined(__AVXVNNI__)
#define HAVE_AVXVNNI 1
#define VARIANT_NAME "avxvnni"
#else
#define VARIANT_NAME "avx2"
#endif
#elif defined(__aarch64__) && defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#define HAVE_NEON 1
#define VARIANT_NAME "neon"
#else
#define VARIANT_NAME "generic"
#endif

#define QK 32
#define MAX_ROWS 8
#define MAX_THREADS 64
#ifndef CHUNKS_PER_THREAD
#define CHUNKS_PER_THREAD 4
#endif
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 8
#endif
#ifndef ATT_SPLIT_MIN
#define ATT_SPLIT_MIN 256 /* positions below which one thread attends alone */
#endif
#ifndef INT8_PREFETCH
#define INT8_PREFETCH 1
#endif
#ifndef ATT_PREFETCH
#define ATT_PREFETCH 16
#endif

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu, bits;
    if (exp == 0) {
        float f = (float)mant * (1.0f / 16777216.0f); /* subnormal: mant * 2^-24, exact */
        memcpy(&bits, &f, 4);
        bits |= sign;
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

typedef struct job job_t;
struct job {
    int qtype, M, N, K;
    int ldy; /* elements between output rows (N, or more when products sit side by side) */
    const uint8_t *w;
    const float *x;
    float *y;
    /* packed layout (see matmul_packed): nibbles or int8 values, f16 scales and mins */
    const uint16_t *d, *m;
    const float *xsum; /* (M, K/32): sum of x over each block, for the min term */
    void (*rows)(const job_t *, int, int);
    /* int8 activations (rows_int8): x as q8_0, its blocks' d and sums of values, (M, K/32) */
    const int8_t *xq;
    const float *xd;
    const int32_t *xqs;
    const float *xds; /* per block: its scale times the sum of its values */
    int chunk; /* units a thread takes at a time; 0: about a quarter of a thread's share */
    void (*inner)(const job_t *, int, int); /* rows_int8_many: the kernel each group of 8 rows runs */
    const float *sct; /* rows_int8_many: the weight rows' scales transposed once (int8_scales_all) */
};
/* Scratch for x quantized to q8_0 (int8 activations): M * K values, and per block of 32 its
 * scale, the sum of its values and their product (the min term's factor). */
typedef struct {
    int8_t *q;
    float *d;
    int32_t *s;
    float *ds;
} xq_t;
#define XQ_BYTES(M, K) ((size_t)(M) * (K) + 12 * (size_t)(M) * ((K) / QK))

/* float32 -> f16 bits, rounded to nearest even (as F16C's vcvtps2ph and AArch64's fcvt do). */
static inline uint16_t f32_to_f16(float f) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#elif defined(__aarch64__)
    __fp16 h = (__fp16)f;
    uint16_t u;
    memcpy(&u, &h, 2);
    return u;
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    x &= 0x7FFFFFFFu;
    uint16_t o;
    if (x >= 0x47800000u) { /* 65536 and up (rounds to inf), inf, NaN */
        o = x > 0x7F800000u ? (uint16_t)(0x7E00u | ((x >> 13) & 0x3FFu)) : 0x7C00u;
    } else if (x < 0x38800000u) { /* below 2^-14: an f16 subnormal; the float adder rounds it */
        float t;
        memcpy(&t, &x, 4);
        t += 0.5f;
        uint32_t u;
        memcpy(&u, &t, 4);
        o = (uint16_t)(u - 0x3F000000u);
    } else { /* normal: rebias, then round the 13 dropped bits to nearest even */
        x += ((uint32_t)(15 - 127) << 23) + 0xFFFu + ((x >> 13) & 1u);
        o = (uint16_t)(x >> 13);
    }
    return o | sign;
#endif
}

/* float32 -> bf16 bits, rounded to nearest even as torch's .to(torch.bfloat16) (finite input). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* q8_0 as llama.cpp writes it: per 32 values d = max|x| / 127, q = round(x / d), d kept in f16. */
static void quantize_q8_0(const float *x, int8_t *q, uint16_t *d, int n) {
    for (int b = 0; b < n / QK; b++) {
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(x[b * QK + i]));
        const float s = amax / 127.0f, inv = s ? 1.0f / s : 0.0f;
        d[b] = f32_to_f16(s);
        for (int i = 0; i < QK; i++) q[b * QK + i] = (int8_t)nearbyintf(x[b * QK + i] * inv);
    }
}

/* Set when a kernel could not get its scratch memory (its output is then not computed); the
 * Python entry points turn it into MemoryError. */
static atomic_int g_nomem;


/* Per-thread scratch kept between calls (an allocation per product or attention part showed as
 * 2% of decode at long context): slot 0 for products, 1 for attention. NULL if it cannot grow. */
static float *thread_scratch(int slot, size_t n) {
    static __thread float *buf[2];
    static __thread size_t cap[2];
    if (n > cap[slot]) {
        free(buf[slot]);
        cap[slot] = (n + 4095) & ~(size_t)4095; /* room to grow: whole 16 KiB steps */
        buf[slot] = aligned_alloc(64, cap[slot] * sizeof(float));
        if (!buf[slot]) cap[slot] = 0;
    }
    return buf[slot];
}

/* ---- packed layout ------------------------------------------------------------------------
 * A GGML Q4_0 / Q4_1 / Q8_0 weight split at load into: values (N, K/2 nibble bytes in GGML's
 * order, or N x K int8), scales d (N, K/32) f16 and, for Q4_1, mins m (N, K/32) f16. Same bits,
 * no per-block header to step over, and the scales of a row convert 16 at a time.
 * The product is factored per block: d * sum(q * x) + m * sum(x), with sum(x) computed once per
 * call (for Q4_0, m = -8 d). That is the dequantized weights' product up to float32 rounding.
 */
/* P_I8 / P_I8_16: Q5_K (P_I8) and Q6_K (P_I8_16) unpacked at load to int8 values with their
 * K-quant scales (KSCALES below) per 32 / 16 values: ~1.08 bytes a weight, same values.
 * (Q4_K keeps its 4 bits: P_Q4_F32 below; Q5_0/Q5_1 their 5: P_Q5_0/P_Q5_1.) */
/* P_F32 / P_BF16 / P_F16: plain float rows (a float model's weights; no scales), widened to
 * float32 exactly as they are read. */
/* P_Q4_F32: Q4_K kept at 4 bits: nibbles in Q4_0's order per 32 values (byte i holds values i
 * and i + 16), with the K-quant scales (KSCALES below): 0.59 bytes a weight (the file: 0.5625). */
/* P_Q5_1 / P_Q5_0: Q5_1 and Q5_0 kept at 5 bits: per 32 values 20 bytes, the 16 nibble bytes in
 * Q4_0's order then the 32 high bits (bit i: value i), with f16 scales (and, Q5_1, f16 mins).
 * 0.69 / 0.75 bytes a weight, as in the file. Q5_0's values are centred (v - 16) before they are
 * multiplied, as llama.cpp does: factored as d * sum(v x) - 16 d * sum(x) instead, the two terms
 * nearly cancel on large activations and float32 rounding of each shows (measured on Gemma 3:
 * 0.1 logits between two evaluation orders, against 3e-3 centred). */
enum { P_Q4_MIN = 0, P_Q4_0 = 1, P_Q8 = 2, P_I8 = 3, P_I8_16 = 4, P_F32 = 5, P_BF16 = 6, P_F16 = 7, P_Q4_F32 = 8,
       P_Q5_1 = 9, P_Q5_0 = 10 };
#define LAST_KIND P_Q5_0
#define IS_Q5(kind) ((kind) == P_Q5_1 || (kind) == P_Q5_0)
#define IS_FLOAT(kind) ((kind) >= P_F32 && (kind) <= P_F16)
#define F32_SCALES(kind) ((kind) == P_I8 || (kind) == P_I8_16 || (kind) == P_Q4_F32)
#define FLOAT_BYTES(kind) ((kind) == P_F32 ? 4 : 2)

static inline float float_at(const uint8_t *w, int kind, size_t i) {
    if (kind == P_F32) return ((const float *)w)[i];
    if (kind == P_F16) return f16_to_f32(((const uint16_t *)w)[i]);
    uint32_t bits = (uint32_t)((const uint16_t *)w)[i] << 16; /* bf16: the top half of a float32 */
    float out;
    memcpy(&out, &bits, 4);
    return out;
}
#define MAX_BLOCKS 4096 /* K up to 131072 */
#define BYTE_VALUES(kind) ((kind) >= P_Q8 && (kind) != P_Q4_F32 && !IS_Q5(kind))
#define HAS_MIN(kind) ((kind) == P_Q4_MIN || (kind) == P_Q4_0 || (kind) == P_I8 || (kind) == P_Q4_F32 || (kind) == P_Q5_1)
/* bytes of values per 32-value block, and per row of K values */
#define BLOCK_BYTES(kind) (BYTE_VALUES(kind) ? QK : IS_Q5(kind) ? 20 : 16)
#define ROW_BYTES(kind, K) ((size_t)(K) / QK * BLOCK_BYTES(kind))
#define N_SCALES(kind, nb) ((kind) == P_I8_16 ? 2 * (nb) : (nb))

/* KSCALES: the scales of the K-quant kinds (F32_SCALES: Q4_K, Q5_K, Q6_K), kept as the file
 * has them, per weight row in d's bytes: the float32 d of each 256-value super-block, for Q4_K
 * and Q5_K then the float32 dmin of each, then per 32 values (Q6_K: per 16) the integer scale
 * (uint8 0..63; Q6_K int8) and, for Q4_K and Q5_K, the integer min. A block's float32 scale is
 * d * scale and its added min -(dmin * min), the products the file's dequantizer forms, made
 * where they are read: 3 bytes a 32 values instead of 8 as floats, which decode of a 1.5B
 * Q4_K_M model read 20% more of every token. */
#define KSB(nb) ((nb) / 8) /* super-blocks a row */
#define KROW_BYTES(kind, nb) ((size_t)((kind) == P_I8_16 ? 4 * KSB(nb) + 2 * (nb) : 8 * KSB(nb) + 2 * (nb)))

/* Row n's block scales into a and, into m, Q4_K/Q5_K's added mins or Q6_K's second-half scales
 * (a: the first halves'): what the int8 kernels read, a vector a super-block where the CPU has
 * one (a row's scales are made for each of its products: scalar code was 5% of decode). */
static inline void kscales_pair(int kind, const void *blob, size_t n, int nb, float *a, float *m) {
    const uint8_t *row = (const uint8_t *)blob + n * KROW_BYTES(kind, nb);
    const int sb = KSB(nb);
    int s = 0;
    if (kind == P_I8_16) {
        const int8_t *sc = (const int8_t *)(row + 4 * sb);
#if defined(HAVE_AVX512) || defined(HAVE_AVX2)
        const __m128i halves = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        for (; s < sb; s++) {
            float dd;
            memcpy(&dd, row + 4 * s, 4);
            const __m256 d = _mm256_set1_ps(dd);
            const __m128i v = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(sc + 16 * s)), halves);
            _mm256_storeu_ps(a + 8 * s, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))));
            _mm256_storeu_ps(m + 8 * s,
                             _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)))));
        }
#endif
        for (; s < sb; s++) {
            float dd;
            memcpy(&dd, row + 4 * s, 4);
            for (int i = 0; i < 8; i++)
                a[8 * s + i] = dd * (float)sc[16 * s + 2 * i], m[8 * s + i] = dd * (float)sc[16 * s + 2 * i + 1];
        }
        return;
    }
    const uint8_t *sc = row + 8 * sb, *mn = sc + nb;
#if defined(HAVE_AVX512) || defined(HAVE_AVX2)
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (; s < sb; s++) {
        float dd, dm;
        memcpy(&dd, row + 4 * s, 4);
        memcpy(&dm, row + 4 * sb + 4 * s, 4);
        const __m256 vs = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(sc + 8 * s))));
        const __m256 vm = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(mn + 8 * s))));
        _mm256_storeu_ps(a + 8 * s, _mm256_mul_ps(_mm256_set1_ps(dd), vs));
        _mm256_storeu_ps(m + 8 * s, _mm256_xor_ps(_mm256_mul_ps(_mm256_set1_ps(dm), vm), sign));
    }
#endif
    for (; s < sb; s++) {
        float dd, dm;
        memcpy(&dd, row + 4 * s, 4);
        memcpy(&dm, row + 4 * sb + 4 * s, 4);
        for (int i = 0; i < 8; i++) a[8 * s + i] = dd * (float)sc[8 * s + i], m[8 * s + i] = -(dm * (float)mn[8 * s + i]);
    }
}

/* Block b of row n alone (the plain C kernel's way): its scale, and its added min (Q6_K: the
 * second half's scale). */
static inline void kscales_block(int kind, const void *blob, size_t n, int nb, int b, float *d, float *m) {
    const uint8_t *row = (const uint8_t *)blob + n * KROW_BYTES(kind, nb);
    const int sb = KSB(nb);
    float dd;
    memcpy(&dd, row + 4 * (b / 8), 4);
    if (kind == P_I8_16) {
        const int8_t *sc = (const int8_t *)(row + 4 * sb);
        *d = dd * (float)sc[2 * b], *m = dd * (float)sc[2 * b + 1];
        return;
    }
    float dm;
    memcpy(&dm, row + 4 * sb + 4 * (b / 8), 4);
    *d = dd * (float)row[8 * sb + b];
    *m = -(dm * (float)row[8 * sb + nb + b]);
}

static inline void row_scales(const uint16_t *src, float *dst, int nb) {
    int b = 0;
#ifdef HAVE_AVX512
    for (; b + 16 <= nb; b += 16)
        _mm512_storeu_ps(dst + b, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + b))));
#endif
    for (; b < nb; b++) dst[b] = f16_to_f32(src[b]);
}

/* Row n's scales (and mins) as float32 into d and m, whatever the kind stores. */
static void load_row_scales(const job_t *j, int n, float *d, float *m, int nb) {
    const int kind = j->qtype, ns = N_SCALES(kind, nb);
    if (F32_SCALES(kind)) {
        kscales_pair(kind, j->d, (size_t)n, nb, d, m);
        if (kind == P_I8_16) /* the float kernels take Q6_K's halves interleaved: block b's at 2b, 2b + 1
                              * (from the last block down, so the move stays in place) */
            for (int b = nb - 1; b >= 0; b--) d[2 * b + 1] = m[b], d[2 * b] = d[b];
    } else {
        row_scales(j->d + (size_t)n * nb, d, nb);
        if (kind == P_Q4_MIN || kind == P_Q5_1) row_scales(j->m + (size_t)n * nb, m, nb);
    }
    if (kind == P_Q4_0)
        for (int b = 0; b < nb; b++) m[b] = -8.0f * d[b];
    for (int b = ns; b < ((ns + 15) & ~15); b++) d[b] = m[b] = 0.0f; /* padding lanes */
}


/* A copy per row count (decode steps carry 1..MAX_ROWS sequences), with M a constant, so the
 * accumulators live in registers rather than on the stack: with M rows each block's FMAs would
 * otherwise wait on stores and reloads of acc. */
/* CALL(m) for m = the job's row count as a compile-time constant (M is at most MAX_ROWS). */
#define BY_ROWS(M, CALL)                                                                                   \
    switch (M) {                                                                                           \
    case 1: CALL(1); break;                                                                                \
    case 2: CALL(2); break;                                                                                \
    case 3: CALL(3); break;                                                                                \
    case 4: CALL(4); break;                                                                                \
    case 5: CALL(5); break;                                                                                \
    case 6: CALL(6); break;                                                                                \
    case 7: CALL(7); break;                                                                                \
    default: CALL(MAX_ROWS); break;                                                                        \
    }


/* Int8-activation products (int8.h, int8_avx512.h): the kinds whose blocks add a min term, and
 * what the integer values carry above the signed ones (Q4_0's 8, Q5_0's 16; Q8_0 is read signed,
 * or with 128 more where a kernel makes it unsigned). */
#define INT8_MINS(kind) ((kind) == P_Q4_MIN || (kind) == P_Q5_1 || (kind) == P_Q4_F32 || (kind) == P_I8)
#define INT8_OFFSET(kind) ((kind) == P_Q4_0 ? 8 : (kind) == P_Q5_0 ? 16 : 0)

/* rows_int8 of every vector variant: KERNEL(j, n0, n1, M, kind) inlined once per int8 kind and
 * row count, both compile-time constants, so the kind's tests and offsets fold away and the
 * registers they held are free for the 8-row loop (which spilled: 8 rows of gate/up on one
 * AVX-512 thread 145-156 us before, 127-128 after). */
#define INT8_BY_ROWS(KERNEL, j, n0, n1, kind)                                                             \
    switch ((j)->M) {                                                                                  \
    case 1: KERNEL(j, n0, n1, 1, kind); break;                                                         \
    case 2: KERNEL(j, n0, n1, 2, kind); break;                                                         \
    case 3: KERNEL(j, n0, n1, 3, kind); break;                                                         \
    case 4: KERNEL(j, n0, n1, 4, kind); break;                                                         \
    case 5: KERNEL(j, n0, n1, 5, kind); break;                                                         \
    case 6: KERNEL(j, n0, n1, 6, kind); break;                                                         \
    case 7: KERNEL(j, n0, n1, 7, kind); break;                                                         \
    default: KERNEL(j, n0, n1, MAX_ROWS, kind); break;                                                 \
    }
#define INT8_DISPATCH(KERNEL, j, n0, n1)                                                                  \
    switch ((j)->qtype) {                                                                              \
    case P_Q4_MIN: INT8_BY_ROWS(KERNEL, j, n0, n1, P_Q4_MIN) break;                                    \
    case P_Q4_0: INT8_BY_ROWS(KERNEL, j, n0, n1, P_Q4_0) break;                                        \
    case P_Q8: INT8_BY_ROWS(KERNEL, j, n0, n1, P_Q8) break;                                            \
    case P_Q4_F32: INT8_BY_ROWS(KERNEL, j, n0, n1, P_Q4_F32) break;                                    \
    case P_Q5_1: INT8_BY_ROWS(KERNEL, j, n0, n1, P_Q5_1) break;                                        \
    case P_Q5_0: INT8_BY_ROWS(KERNEL, j, n0, n1, P_Q5_0) break;                                        \
    case P_I8: INT8_BY_ROWS(KERNEL, j, n0, n1, P_I8) break;                                            \
    case P_I8_16: INT8_BY_ROWS(KERNEL, j, n0, n1, P_I8_16) break;                                      \
    default: break; /* a float kind: packed_product never sends one */                                 \
    }

#endif /* GARAGE_CORE_H */
