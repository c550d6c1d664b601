/* Quantized matrix-vector products, decode attention and whole decoder layers for garagelm.
 *
 * Weights arrive "packed" (see the packed layout section): the values of GGML blocks with their
 * scales (and mins) in separate arrays. Products are computed factored per block, d * sum(q * x)
 * + m * sum(x), which equals a float32 product of the dequantized weights up to float32 rounding;
 * the dequantizer here reproduces gguf-py's values bit for bit (built with -ffp-contract=off so no
 * fused multiply-add changes a rounding). Memory traffic is the quantized bytes, not 4 per weight.
 *
 * Work is split over a small persistent pthread pool whose workers spin briefly between calls
 * (decode issues many small calls per token) and then sleep. A call's work is cut in chunks that
 * the threads claim as they go, so a thread the OS has descheduled does not hold the others up.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

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


#if defined(__AVX512F__) && defined(__F16C__)
#include <immintrin.h>
#define HAVE_AVX512 1
#endif

/* ---- thread pool -------------------------------------------------------------------------- */
static job_t g_job;
static int g_threads = 1, g_started = 0;
static atomic_uint g_gen;
/* The current job's chunks: generation << 32 | chunk count << 16 | next chunk. A thread claims a
 * chunk by a compare-and-swap that also checks the generation, so one that wakes late can never
 * take a chunk of a later job, and the job it reads stays in place until its chunk is done. */
static _Atomic uint64_t g_ctr;
static atomic_int g_finished; /* chunks of the current job done */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t g_cv = PTHREAD_COND_INITIALIZER;
/* Set when a kernel could not get its scratch memory (its output is then not computed); the
 * Python entry points turn it into MemoryError. */
static atomic_int g_nomem;
/* None, or MemoryError when a kernel of the call went without its scratch. */
static PyObject *kernel_result(void) {
    if (atomic_exchange(&g_nomem, 0))
        return PyErr_Format(PyExc_MemoryError, "the kernels could not allocate their scratch memory");
    Py_RETURN_NONE;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

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

/* Take chunks of generation `gen` until none is left. Chunks rather than one fixed share per
 * thread: on two cores the other thread is often descheduled for a while (the server's own
 * Python, its clients), and a fixed share would keep this one spinning until it came back. */
static void run_chunks(unsigned gen) {
    uint64_t v = atomic_load_explicit(&g_ctr, memory_order_acquire);
    for (;;) {
        if ((unsigned)(v >> 32) != gen || (v & 0xFFFF) >= ((v >> 16) & 0xFFFF)) return;
        if (!atomic_compare_exchange_weak_explicit(&g_ctr, &v, v + 1, memory_order_acq_rel, memory_order_acquire))
            continue; /* v now holds the counter's value */
        const int c = (int)(v & 0xFFFF), n0 = c * g_job.chunk, n1 = n0 + g_job.chunk < g_job.N ? n0 + g_job.chunk : g_job.N;
        g_job.rows(&g_job, n0, n1);
        atomic_fetch_add_explicit(&g_finished, 1, memory_order_release);
        v = atomic_load_explicit(&g_ctr, memory_order_acquire);
    }
}

static void *worker(void *arg) {
    int id = (int)(intptr_t)arg;
    unsigned seen = atomic_load(&g_gen);
    for (;;) {
        unsigned gen;
        long spins = 0;
        while ((gen = atomic_load_explicit(&g_gen, memory_order_acquire)) == seen) {
            if (++spins < 10000) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&g_mu);
            while ((gen = atomic_load(&g_gen)) == seen) pthread_cond_wait(&g_cv, &g_mu);
            pthread_mutex_unlock(&g_mu);
            break;
        }
        seen = gen;
        if (id < g_threads) run_chunks(gen);
    }
    return NULL;
}

static void ensure_pool(int threads) {
    for (int i = g_started + 1; i < threads && i < MAX_THREADS; i++) {
        pthread_t t;
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&t, &a, worker, (void *)(intptr_t)i) == 0) g_started = i;
        pthread_attr_destroy(&a);
    }
}

static pthread_mutex_t g_call = PTHREAD_MUTEX_INITIALIZER; /* one product at a time */

/* Run j over the pool in chunks of j->chunk units (0: rows in multiples of 16, four chunks a
 * thread); the caller works too and returns when every chunk is done. The caller holds g_call. */
static void dispatch(const job_t *j) {
    g_job = *j;
    if (g_job.chunk <= 0) {
        const int share = (g_job.N + CHUNKS_PER_THREAD * g_threads - 1) / (CHUNKS_PER_THREAD * g_threads);
        g_job.chunk = (share + 15) & ~15;
    }
    int chunks = (g_job.N + g_job.chunk - 1) / g_job.chunk;
    if (chunks > 0xFFFF) { /* the counter's 16 bits */
        g_job.chunk = (g_job.N + 0xFFFE) / 0xFFFF;
        chunks = (g_job.N + g_job.chunk - 1) / g_job.chunk;
    }
    const unsigned gen = atomic_load(&g_gen) + 1;
    atomic_store_explicit(&g_finished, 0, memory_order_relaxed);
    atomic_store_explicit(&g_ctr, (uint64_t)gen << 32 | (uint64_t)chunks << 16, memory_order_release);
    pthread_mutex_lock(&g_mu);
    atomic_store_explicit(&g_gen, gen, memory_order_release);
    pthread_cond_broadcast(&g_cv);
    pthread_mutex_unlock(&g_mu);
    run_chunks(gen);
    while (atomic_load_explicit(&g_finished, memory_order_acquire) < chunks) cpu_relax();
}

static void matmul(const job_t *j) {
    if (g_threads <= 1 || (long)j->N * j->K < 65536) { /* too small to be worth a handoff */
        j->rows(j, 0, j->N);
        return;
    }
    pthread_mutex_lock(&g_call);
    dispatch(j);
    pthread_mutex_unlock(&g_call);
}

/* ---- packed layout ------------------------------------------------------------------------
 * A GGML Q4_0 / Q4_1 / Q8_0 weight split at load into: values (N, K/2 nibble bytes in GGML's
 * order, or N x K int8), scales d (N, K/32) f16 and, for Q4_1, mins m (N, K/32) f16. Same bits,
 * no per-block header to step over, and the scales of a row convert 16 at a time.
 * The product is factored per block: d * sum(q * x) + m * sum(x), with sum(x) computed once per
 * call (for Q4_0, m = -8 d). That is the dequantized weights' product up to float32 rounding.
 */
/* P_I8 / P_I8_16: Q5_K (P_I8) and Q6_K (P_I8_16) unpacked at load to int8 values with float32
 * scales (and negated mins for P_I8) per 32 / 16 values: ~1.25 bytes a weight, same values.
 * (Q4_K keeps its 4 bits: P_Q4_F32 below; Q5_0/Q5_1 their 5: P_Q5_0/P_Q5_1.) */
/* P_F32 / P_BF16 / P_F16: plain float rows (a float model's weights; no scales), widened to
 * float32 exactly as they are read. */
/* P_Q4_F32: Q4_K kept at 4 bits: nibbles in Q4_0's order per 32 values (byte i holds values i
 * and i + 16), with the float32 scale and negated min of each 32 (0.75 bytes a weight). */
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
/* P_I8 without mins passes m = NULL: load_row_scales leaves zero mins. */
#define N_SCALES(kind, nb) ((kind) == P_I8_16 ? 2 * (nb) : (nb))

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
        memcpy(d, (const float *)j->d + (size_t)n * ns, sizeof(float) * ns);
        if (kind == P_I8 || kind == P_Q4_F32) {
            if (j->m)
                memcpy(m, (const float *)j->m + (size_t)n * ns, sizeof(float) * ns);
            else
                memset(m, 0, sizeof(float) * ns);
        }
    } else {
        row_scales(j->d + (size_t)n * nb, d, nb);
        if (kind == P_Q4_MIN || kind == P_Q5_1) row_scales(j->m + (size_t)n * nb, m, nb);
    }
    if (kind == P_Q4_0)
        for (int b = 0; b < nb; b++) m[b] = -8.0f * d[b];
    for (int b = ns; b < ((ns + 15) & ~15); b++) d[b] = m[b] = 0.0f; /* padding lanes */
}

/* Float32 weights: y = sum(w * x), four partial sums per row as the AVX-512 path keeps lanes. */
static void rows_float_generic(const job_t *j, int n0, int n1) {
    for (int n = n0; n < n1; n++) {
        for (int r = 0; r < j->M; r++) {
            const float *x = j->x + (size_t)r * j->K;
            float acc = 0.0f;
            for (int k = 0; k < j->K; k++) acc += float_at(j->w, j->qtype, (size_t)n * j->K + k) * x[k];
            j->y[(size_t)r * j->ldy + n] = acc;
        }
    }
}

static void rows_packed_generic(const job_t *j, int n0, int n1) {
    const int nb = j->K / QK, kind = j->qtype;
    float d[2 * MAX_BLOCKS + 16], m[2 * MAX_BLOCKS + 16];
    for (int n = n0; n < n1; n++) {
        load_row_scales(j, n, d, m, nb);
        for (int r = 0; r < j->M; r++) {
            const float *x = j->x + (size_t)r * j->K, *xs = j->xsum + (size_t)r * ((nb + 15) & ~15);
            float acc = 0.0f, macc = 0.0f;
            for (int b = 0; b < nb; b++) {
                float t = 0.0f, t2 = 0.0f;
                if (BYTE_VALUES(kind)) {
                    const int8_t *q = (const int8_t *)j->w + (size_t)n * j->K + (size_t)b * QK;
                    for (int i = 0; i < 16; i++) t += (float)q[i] * x[b * QK + i];
                    for (int i = 16; i < QK; i++) t2 += (float)q[i] * x[b * QK + i];
                } else {
                    const uint8_t *q = j->w + ROW_BYTES(kind, j->K) * n + (size_t)b * BLOCK_BYTES(kind);
                    uint32_t qh = 0;
                    if (IS_Q5(kind)) memcpy(&qh, q + 16, 4);
                    for (int i = 0; i < 16; i++) {
                        const int c = kind == P_Q5_0 ? 16 : 0; /* Q5_0: centred values */
                        const int lo = ((q[i] & 0x0F) | (((qh >> i) & 1) << 4)) - c;
                        const int hi = ((q[i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) - c;
                        t += (float)lo * x[b * QK + i] + (float)hi * x[b * QK + 16 + i];
                    }
                }
                acc += kind == P_I8_16 ? d[2 * b] * t + d[2 * b + 1] * t2 : d[b] * (t + t2);
                if (HAS_MIN(kind)) macc += m[b] * xs[b];
            }
            j->y[(size_t)r * j->ldy + n] = acc + macc;
        }
    }
}

#ifdef HAVE_AVX512
static inline void row_scales512(const uint16_t *src, float *dst, int nb) {
    int b = 0;
    for (; b + 16 <= nb; b += 16)
        _mm512_store_ps(dst + b, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + b))));
    if (b < nb) { /* masked tail: no scalar conversions */
        __mmask16 k = (__mmask16)((1u << (nb - b)) - 1);
        __m256i h = _mm256_maskz_loadu_epi16(k, src + b);
        _mm512_store_ps(dst + b, _mm512_cvtph_ps(h)); /* lanes past nb are zero */
    }
}

/* Two output rows at a time: each x vector is loaded once for both, and the two rows' FMA
 * chains are independent, which keeps both FMA ports busy. */
typedef float row_scales_t[2][2 * MAX_BLOCKS + 16];

static inline __attribute__((always_inline)) void rows_packed_avx512_m(const job_t *j, int n0, int n1, const int M,
                                                                       row_scales_t d, row_scales_t m) {
    const int nb = j->K / QK, kind = j->qtype, nb16 = (nb + 15) & ~15;
    const __m128i low = _mm_set1_epi8(0x0F);
    const size_t row_bytes = ROW_BYTES(kind, j->K);
    for (int n = n0; n < n1; n += 2) {
        const int pair = n + 1 < n1 ? 2 : 1;
        const uint8_t *rows[2] = {j->w + (size_t)n * row_bytes, j->w + (size_t)(n + pair - 1) * row_bytes};
        if (n + PREFETCH_ROWS + 1 < n1)
            for (size_t o = 0; o < 2 * row_bytes; o += 64) __builtin_prefetch(rows[0] + PREFETCH_ROWS * row_bytes + o, 0, 3);
        for (int p = 0; p < 2; p++) {
            const int row = n + p * (pair - 1);
            if (F32_SCALES(kind)) {
                load_row_scales(j, row, d[p], m[p], nb);
                continue;
            }
            row_scales512(j->d + (size_t)row * nb, d[p], nb);
            if (kind == P_Q4_MIN || kind == P_Q5_1) row_scales512(j->m + (size_t)row * nb, m[p], nb);
            if (kind == P_Q4_0)
                for (int b = 0; b < nb16; b += 16)
                    _mm512_store_ps(m[p] + b, _mm512_mul_ps(_mm512_set1_ps(-8.0f), _mm512_load_ps(d[p] + b)));
        }
        __m512 acc[MAX_ROWS][2];
        for (int r = 0; r < M; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int b = 0; b < nb; b++) {
            __m512 q[2][2];
            for (int p = 0; p < 2; p++) {
                const uint8_t *row = rows[p];
                if (BYTE_VALUES(kind)) {
                    q[p][0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + b * QK))));
                    q[p][1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + b * QK + 16))));
                } else {
                    const uint8_t *blk = row + (size_t)b * BLOCK_BYTES(kind);
                    __m128i qs = _mm_loadu_si128((const __m128i *)blk);
                    __m512i lo = _mm512_cvtepu8_epi32(_mm_and_si128(qs, low));
                    __m512i hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(qs, 4), low));
                    if (IS_Q5(kind)) { /* the fifth bits, as masks: +16 where set (Q5_0: -16 where not) */
                        uint32_t qh;
                        memcpy(&qh, blk + 16, 4);
                        const __m512i sixteen = _mm512_set1_epi32(16);
                        if (kind == P_Q5_0) {
                            lo = _mm512_mask_sub_epi32(lo, (__mmask16)~qh, lo, sixteen);
                            hi = _mm512_mask_sub_epi32(hi, (__mmask16)~(qh >> 16), hi, sixteen);
                        } else {
                            lo = _mm512_mask_add_epi32(lo, (__mmask16)qh, lo, sixteen);
                            hi = _mm512_mask_add_epi32(hi, (__mmask16)(qh >> 16), hi, sixteen);
                        }
                    }
                    q[p][0] = _mm512_cvtepi32_ps(lo);
                    q[p][1] = _mm512_cvtepi32_ps(hi);
                }
            }
            if (kind == P_I8_16) { /* a scale per 16 values */
                const __m512 d0a = _mm512_set1_ps(d[0][2 * b]), d0b = _mm512_set1_ps(d[0][2 * b + 1]);
                const __m512 d1a = _mm512_set1_ps(d[1][2 * b]), d1b = _mm512_set1_ps(d[1][2 * b + 1]);
                for (int r = 0; r < M; r++) {
                    const float *xr = j->x + (size_t)r * j->K + (size_t)b * QK;
                    const __m512 xa = _mm512_loadu_ps(xr), xb = _mm512_loadu_ps(xr + 16);
                    acc[r][0] = _mm512_fmadd_ps(_mm512_mul_ps(q[0][0], xa), d0a, acc[r][0]);
                    acc[r][0] = _mm512_fmadd_ps(_mm512_mul_ps(q[0][1], xb), d0b, acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(_mm512_mul_ps(q[1][0], xa), d1a, acc[r][1]);
                    acc[r][1] = _mm512_fmadd_ps(_mm512_mul_ps(q[1][1], xb), d1b, acc[r][1]);
                }
                continue;
            }
            const __m512 d0 = _mm512_set1_ps(d[0][b]), d1 = _mm512_set1_ps(d[1][b]);
            for (int r = 0; r < M; r++) {
                const float *xr = j->x + (size_t)r * j->K + (size_t)b * QK;
                const __m512 xa = _mm512_loadu_ps(xr), xb = _mm512_loadu_ps(xr + 16);
                __m512 t0 = _mm512_fmadd_ps(q[0][1], xb, _mm512_mul_ps(q[0][0], xa));
                __m512 t1 = _mm512_fmadd_ps(q[1][1], xb, _mm512_mul_ps(q[1][0], xa));
                acc[r][0] = _mm512_fmadd_ps(t0, d0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(t1, d1, acc[r][1]);
            }
        }
        for (int r = 0; r < M; r++) {
            if (HAS_MIN(kind)) { /* min term, over blocks 16 at a time (padding lanes are zero) */
                const float *xs = j->xsum + (size_t)r * nb16;
                for (int b = 0; b < nb16; b += 16) {
                    const __m512 xv = _mm512_loadu_ps(xs + b);
                    acc[r][0] = _mm512_fmadd_ps(_mm512_load_ps(m[0] + b), xv, acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(_mm512_load_ps(m[1] + b), xv, acc[r][1]);
                }
            }
            j->y[(size_t)r * j->ldy + n] = _mm512_reduce_add_ps(acc[r][0]);
            if (pair == 2) j->y[(size_t)r * j->ldy + n + 1] = _mm512_reduce_add_ps(acc[r][1]);
        }
    }
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

static void rows_packed_avx512(const job_t *j, int n0, int n1) {
    /* one row's scales and mins as float32, shared by the copies (not one 130 KB frame each) */
    row_scales_t d __attribute__((aligned(64))), m __attribute__((aligned(64)));
#define CALL(rows) rows_packed_avx512_m(j, n0, n1, rows, d, m)
    BY_ROWS(j->M, CALL)
#undef CALL
}
#endif

#ifdef HAVE_AVX512
static inline __m512 load_float16(const uint8_t *row, int kind, int k) {
    if (kind == P_F32) return _mm512_loadu_ps((const float *)row + k);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + k));
    if (kind == P_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); /* bf16 */
}

/* Float weights (f32, bf16 or f16), two rows at a time (each x vector loaded once for both). */
static inline __attribute__((always_inline)) void rows_float_avx512_m(const job_t *j, int n0, int n1, const int M) {
    const int K = j->K, kind = j->qtype;
    const size_t row_bytes = (size_t)K * FLOAT_BYTES(kind);
    for (int n = n0; n < n1; n += 2) {
        const int pair = n + 1 < n1 ? 2 : 1;
        const uint8_t *w0 = j->w + (size_t)n * row_bytes, *w1 = j->w + (size_t)(n + pair - 1) * row_bytes;
        if (n + PREFETCH_ROWS + 1 < n1)
            for (size_t o = 0; o < 2 * row_bytes; o += 64) __builtin_prefetch(w0 + PREFETCH_ROWS * row_bytes + o, 0, 3);
        __m512 acc[MAX_ROWS][2];
        for (int r = 0; r < M; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 16) {
            const __m512 a = load_float16(w0, kind, k), b = load_float16(w1, kind, k);
            for (int r = 0; r < M; r++) {
                const __m512 xv = _mm512_loadu_ps(j->x + (size_t)r * K + k);
                acc[r][0] = _mm512_fmadd_ps(a, xv, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(b, xv, acc[r][1]);
            }
        }
        for (int r = 0; r < M; r++) {
            j->y[(size_t)r * j->ldy + n] = _mm512_reduce_add_ps(acc[r][0]);
            if (pair == 2) j->y[(size_t)r * j->ldy + n + 1] = _mm512_reduce_add_ps(acc[r][1]);
        }
    }
}

static void rows_float_avx512(const job_t *j, int n0, int n1) {
#define CALL(rows) rows_float_avx512_m(j, n0, n1, rows)
    BY_ROWS(j->M, CALL)
#undef CALL
}
#endif

#ifdef HAVE_AVX512
/* ---- products with int8 activations (llama.cpp's arithmetic for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0;
 * Q4_K too, with x in q8_0 blocks where llama.cpp takes q8_K's 256) ---------------------------
 * Each 32 values of x are quantized to q8_0 (int8, d = max|x| / 127 kept in f16: llama.cpp's
 * quantize_row_q8_0 / q8_1), each block's dot with the weights' integer values is taken exactly
 * with vpdpbusd, then scaled: y = sum_b dw_b dx_b sum(q xq) [+ m_b dx_b sum(xq)], Q4_0, Q5_0 and
 * Q8_0's offsets (8, 16, and the 128 that makes int8 weights unsigned) taken out of the integer
 * sums. Q5's fifth bits are added to the nibbles after the transpose, 64 at a time, by a bit
 * shuffle (vpshufbitqmb) that picks each byte's bit out of its row's 32 high bits.
 * Sixteen weight rows go together: their blocks are transposed in registers so that one
 * vpdpbusd with 4 bytes of x gives 16 rows' partial dots, with no horizontal sums, for every
 * row of x. Float32 FMAs did a fifth of that work per instruction, so 8 rows of x (a batched
 * decode step) cost four 1-row steps; here the weights' stream stays the limit. */
#if defined(__AVX512BITALG__) /* Q5_0/Q5_1's fifth bits go in by vpshufbitqmb */
#define INT8_KIND(kind) ((kind) == P_Q4_0 || (kind) == P_Q4_MIN || (kind) == P_Q8 || (kind) == P_Q4_F32 || IS_Q5(kind))
#else
#define INT8_KIND(kind) ((kind) == P_Q4_0 || (kind) == P_Q4_MIN || (kind) == P_Q8 || (kind) == P_Q4_F32)
#endif
#if defined(__AVX512VNNI__)
#define DPBUSD(acc, u, s) _mm512_dpbusd_epi32(acc, u, s)
#else
/* vpdpbusd without VNNI: the even and odd bytes widened to 16 bits, two madds (exact) */
static inline __m512i dpbusd_emul(__m512i acc, __m512i u, __m512i s) {
    const __m512i ue = _mm512_and_si512(u, _mm512_set1_epi16(0x00FF)), uo = _mm512_srli_epi16(u, 8);
    const __m512i se = _mm512_srai_epi16(_mm512_slli_epi16(s, 8), 8), so = _mm512_srai_epi16(s, 8);
    return _mm512_add_epi32(acc, _mm512_add_epi32(_mm512_madd_epi16(ue, se), _mm512_madd_epi16(uo, so)));
}
#define DPBUSD(acc, u, s) dpbusd_emul(acc, u, s)
#endif

/* q8_0 as llama.cpp writes it: per 32 values d = max|x| / 127, q = round(x / d), d kept in f16. */
static void quantize_q8_0(const float *x, int8_t *q, uint16_t *d, int n) {
    for (int b = 0; b < n / QK; b++) {
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) amax = fmaxf(amax, fabsf(x[b * QK + i]));
        const float s = amax / 127.0f, inv = s ? 1.0f / s : 0.0f;
        d[b] = _cvtss_sh(s, _MM_FROUND_TO_NEAREST_INT);
        for (int i = 0; i < QK; i++) q[b * QK + i] = (int8_t)nearbyintf(x[b * QK + i] * inv);
    }
}

/* x (M, K) -> xq (M, K) int8 (vectorised quantize_q8_0: the same values), xd (M, nb) its f16 d as
 * float32, xs (M, nb) the sum of each block's int8 values, xds (M, nb) xd * xs (the min term's). */
static void quantize_x(const float *x, int M, int K, int8_t *xq, float *xd, int32_t *xs, float *xds) {
    const int nb = K / QK;
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
    for (int r = 0; r < M; r++)
        for (int b = 0; b < nb; b++) {
            const float *src = x + (size_t)r * K + (size_t)b * QK;
            const __m512 a = _mm512_loadu_ps(src), c = _mm512_loadu_ps(src + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(a, absmask), _mm512_and_ps(c, absmask)));
            const float s = amax / 127.0f, inv = s ? 1.0f / s : 0.0f;
            const uint16_t d16 = _cvtss_sh(s, _MM_FROUND_TO_NEAREST_INT);
            /* x * inv rounded to nearest even, as nearbyintf (MXCSR's default rounding) */
            const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv)));
            const __m512i qc = _mm512_cvtps_epi32(_mm512_mul_ps(c, _mm512_set1_ps(inv)));
            int8_t *dst = xq + (size_t)r * K + (size_t)b * QK;
            _mm_storeu_si128((__m128i *)dst, _mm512_cvtepi32_epi8(qa));
            _mm_storeu_si128((__m128i *)(dst + 16), _mm512_cvtepi32_epi8(qc));
            xd[r * nb + b] = f16_to_f32(d16);
            xs[r * nb + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qc));
            xds[r * nb + b] = xd[r * nb + b] * (float)xs[r * nb + b];
        }
}

/* Rows' 16-byte pieces at offset `at` of 16 consecutive rows (row p at rows[p]), transposed to
 * T[c]: lane 4L + g holds dword c of row 4g + L. */
static inline __attribute__((always_inline)) void load_t16(const uint8_t *const *rows, size_t at, __m512i T[4]) {
    __m512i A[4];
    for (int g = 0; g < 4; g++) {
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(rows[4 * g] + at)));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(rows[4 * g + 1] + at)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(rows[4 * g + 2] + at)), 2);
        A[g] = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(rows[4 * g + 3] + at)), 3);
    }
    const __m512i t0 = _mm512_unpacklo_epi32(A[0], A[1]), t1 = _mm512_unpackhi_epi32(A[0], A[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(A[2], A[3]), t3 = _mm512_unpackhi_epi32(A[2], A[3]);
    T[0] = _mm512_unpacklo_epi64(t0, t2);
    T[1] = _mm512_unpackhi_epi64(t0, t2);
    T[2] = _mm512_unpacklo_epi64(t1, t3);
    T[3] = _mm512_unpackhi_epi64(t1, t3);
}

static inline __attribute__((always_inline)) void rows_int8_m(const job_t *j, int n0, int n1, const int M,
                                                               const int kind) {
    const int K = j->K, nb = K / QK, nb16 = (nb + 15) & ~15;
    const size_t row_bytes = ROW_BYTES(kind, K), bb = BLOCK_BYTES(kind);
    /* lane k of a transposed vector holds row pi(k) = 4 (k % 4) + k / 4 (its own inverse) */
    const __m512i pi = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512i at_row = _mm512_mullo_epi32(pi, _mm512_set1_epi32(nb16));
    const int mins = kind == P_Q4_MIN || kind == P_Q5_1 || kind == P_Q4_F32, f32 = kind == P_Q4_F32;
#ifdef __AVX512BITALG__
    /* Q5: byte e of lane k of w[c] is value 4c + e (w[4 + c]: 16 + 4c + e) of lane k's row, whose
     * fifth bit is that bit of the row's 32 high bits; a lane pair shares a qword of H. */
    __m512i fifth[8];
    for (int c = 0; c < 8; c++) {
        const long long base = (c < 4 ? 4 * c : 16 + 4 * (c - 4)) * 0x0101010101010101LL;
        fifth[c] = _mm512_add_epi8(_mm512_set1_epi64(base), _mm512_set1_epi64(0x2322212003020100LL));
    }
#endif
    float *sc = thread_scratch(0, (size_t)(mins ? 2 : 1) * 16 * nb16);
    if (!sc) { /* no scratch: nothing computed, and the call raises MemoryError */
        atomic_store(&g_nomem, 1);
        return;
    }
    float *mc = sc + 16 * nb16;
    for (int n = n0; n < n1; n += 16) {
        const int have = n1 - n < 16 ? n1 - n : 16; /* rows past n1 repeat the last one, unstored */
        const uint8_t *rows[16];
        for (int p = 0; p < 16; p++) {
            const int row = n + (p < have ? p : have - 1);
            rows[p] = j->w + (size_t)row * row_bytes;
            if (f32) { /* Q4_K: float32 scales and mins already */
                memcpy(sc + p * nb16, (const float *)j->d + (size_t)row * nb, sizeof(float) * nb);
                if (j->m)
                    memcpy(mc + p * nb16, (const float *)j->m + (size_t)row * nb, sizeof(float) * nb);
                else
                    memset(mc + p * nb16, 0, sizeof(float) * nb);
                continue;
            }
            row_scales512(j->d + (size_t)row * nb, sc + p * nb16, nb);
            if (mins) row_scales512(j->m + (size_t)row * nb, mc + p * nb16, nb);
        }
        const uint8_t *next = j->w + (size_t)(n + 16) * row_bytes;
        const int more = n + 16 < n1;
        /* Q5: where each lane's row keeps its high bits, from rows[0] (the last rows may repeat) */
#ifdef __AVX512BITALG__
        __m512i hi_at = _mm512_setzero_si512();
        if (IS_Q5(kind)) {
            int at_lane[16];
            for (int k = 0; k < 16; k++) at_lane[k] = (int)(rows[4 * (k % 4) + k / 4] - rows[0]);
            hi_at = _mm512_loadu_si512(at_lane);
        }
#endif
        __m512 acc[MAX_ROWS];
        for (int r = 0; r < M; r++) acc[r] = _mm512_setzero_ps();
        for (int b = 0; b < nb; b++) {
            if (INT8_PREFETCH && more) /* the next 16 rows, a block's share of them at a time */
                for (size_t o = 0; o < 16 * bb; o += 64) __builtin_prefetch(next + (size_t)b * 16 * bb + o, 0, 3);
            __m512i w[8], T[4];
            if (kind == P_Q8) { /* int8 values as u8 = q + 128 */
                const __m512i flip = _mm512_set1_epi8((char)0x80);
                load_t16(rows, (size_t)b * QK, T);
                for (int c = 0; c < 4; c++) w[c] = _mm512_xor_si512(T[c], flip);
                load_t16(rows, (size_t)b * QK + 16, T);
                for (int c = 0; c < 4; c++) w[4 + c] = _mm512_xor_si512(T[c], flip);
            } else { /* nibbles: byte i holds values i and i + 16 */
                const __m512i nib = _mm512_set1_epi8(0x0F);
                load_t16(rows, (size_t)b * bb, T);
                for (int c = 0; c < 4; c++) {
                    w[c] = _mm512_and_si512(T[c], nib);
                    w[4 + c] = _mm512_and_si512(_mm512_srli_epi16(T[c], 4), nib);
                }
#ifdef __AVX512BITALG__
                if (IS_Q5(kind)) { /* values 0..31: add 16 where the fifth bit is set */
                    const __m512i H = _mm512_i32gather_epi32(hi_at, rows[0] + (size_t)b * bb + 16, 1);
                    for (int c = 0; c < 8; c++)
                        w[c] = _mm512_mask_add_epi8(w[c], _mm512_bitshuffle_epi64_mask(H, fifth[c]), w[c],
                                                    _mm512_set1_epi8(16));
                }
#endif
            }
            const __m512 dw = _mm512_i32gather_ps(at_row, sc + b, 4);
            const __m512 mw = mins ? _mm512_i32gather_ps(at_row, mc + b, 4) : _mm512_setzero_ps();
            /* the weights' offset: Q4_0's 8, Q5_0's 16, Q8_0's 128 (int8 stored unsigned) */
            const int off = kind == P_Q4_0 ? 8 : kind == P_Q5_0 ? 16 : kind == P_Q8 ? 128 : 0;
#pragma GCC unroll 8 /* accumulators in registers, not on the stack */
            for (int r = 0; r < M; r++) {
                const int32_t *xr = (const int32_t *)(j->xq + (size_t)r * K + (size_t)b * QK);
                const int32_t xs = j->xqs[r * nb + b];
                const float xd = j->xd[r * nb + b];
                __m512i a0 = _mm512_set1_epi32(-off * xs), a1 = _mm512_setzero_si512();
                for (int c = 0; c < 8; c += 2) {
                    a0 = DPBUSD(a0, w[c], _mm512_set1_epi32(xr[c]));
                    a1 = DPBUSD(a1, w[c + 1], _mm512_set1_epi32(xr[c + 1]));
                }
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1)),
                                         _mm512_mul_ps(dw, _mm512_set1_ps(xd)), acc[r]);
                if (mins) acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(j->xds[r * nb + b]), acc[r]);
            }
        }
        const __mmask16 keep = (__mmask16)((1u << have) - 1);
        for (int r = 0; r < M; r++)
            _mm512_mask_storeu_ps(j->y + (size_t)r * j->ldy + n, keep, _mm512_permutexvar_ps(pi, acc[r]));
    }
}

/* One copy per kind and row count: the kind's tests and offsets fold away, and the registers
 * they held are free for the 8-row loop, which spilled (8 rows of gate/up on one thread: 145-156
 * us before, 127-128 after). */
static void rows_int8(const job_t *j, int n0, int n1) {
#define CALL(rows) rows_int8_m(j, n0, n1, rows, kind_now)
#define BY_KIND(kind)                                                                                      \
    case kind: {                                                                                           \
        const int kind_now = kind; /* a constant in each inlined copy */                                   \
        BY_ROWS(j->M, CALL)                                                                                \
    } break;
    switch (j->qtype) {
        BY_KIND(P_Q4_MIN)
        BY_KIND(P_Q4_0)
        BY_KIND(P_Q8)
        BY_KIND(P_Q4_F32)
#ifdef __AVX512BITALG__
        BY_KIND(P_Q5_1)
        BY_KIND(P_Q5_0)
#endif
    default: break; /* not an int8 kind: packed_product never sends one */
    }
#undef BY_KIND
#undef CALL
}
#endif

/* y = x @ W.T for packed W; xs: scratch of M * (K/32 rounded up to 16) floats; i8: scratch for
 * int8 activations (NULL: float32 products, `exact`) where the kind has them. */
static void packed_product(int kind, const uint8_t *q, const uint16_t *d, const uint16_t *m, const float *x, float *y,
                           int M, int N, int K, int ldy, float *xs, const xq_t *i8) {
    const int nb = K / QK, nb16 = (nb + 15) & ~15;
#ifdef HAVE_AVX512
    if (i8 && INT8_KIND(kind)) {
        quantize_x(x, M, K, i8->q, i8->d, i8->s, i8->ds);
        job_t j = {kind, M, N, K, ldy, q, x, y, d, m, NULL, rows_int8, i8->q, i8->d, i8->s};
        j.xds = i8->ds;
        matmul(&j);
        return;
    }
#else
    (void)i8;
#endif
    if (IS_FLOAT(kind)) {
        job_t j = {kind, M, N, K, ldy, q, x, y, NULL, NULL, NULL, rows_float_generic};
#ifdef HAVE_AVX512
        j.rows = rows_float_avx512;
#endif
        matmul(&j);
        return;
    }
    for (int r = 0; r < M; r++)
        for (int b = 0; b < nb16; b++) {
            float s = 0.0f;
            for (int i = 0; b < nb && i < QK; i++) s += x[(size_t)r * K + b * QK + i];
            xs[r * nb16 + b] = s; /* rows padded to a multiple of 16 blocks with zeros */
        }
    job_t j = {kind, M, N, K, ldy, q, x, y, d, m, xs, rows_packed_generic};
#ifdef HAVE_AVX512
    j.rows = rows_packed_avx512;
#endif
    matmul(&j);
}

/* matmul_packed(kind, q, d, m, x, y, M, N, K[, int8_x]): int8_x quantizes x to q8_0 for the
 * kinds that have integer products (Q4_0, Q4_1, Q8_0, Q4_K; Q5_0, Q5_1 with BITALG), as decode does outside `exact`. */
static PyObject *py_matmul_packed(PyObject *self, PyObject *args) {
    int kind, M, N, K, int8_x = 0;
    unsigned long long q, d, m, x, y;
    if (!PyArg_ParseTuple(args, "iKKKKKiii|p", &kind, &q, &d, &m, &x, &y, &M, &N, &K, &int8_x)) return NULL;
    if (kind < 0 || kind > LAST_KIND) return PyErr_Format(PyExc_ValueError, "unknown packed kind %d", kind);
    if (M < 1 || M > MAX_ROWS) return PyErr_Format(PyExc_ValueError, "rows must be 1..%d, got %d", MAX_ROWS, M);
    if (N < 1 || K < QK || K % QK || K / QK > MAX_BLOCKS) return PyErr_Format(PyExc_ValueError, "bad shape N=%d K=%d", N, K);
    const int nb = K / QK, nb16 = (nb + 15) & ~15;
    /* x's block sums (float path), or x as int8 with its scales and sums */
    char *buf = PyMem_Malloc(sizeof(float) * M * nb16 + (int8_x ? XQ_BYTES(M, K) : 0));
    if (!buf) return PyErr_NoMemory();
    float *xs = (float *)buf;
    xq_t i8 = {(int8_t *)(buf + sizeof(float) * M * nb16), NULL, NULL, NULL};
    i8.d = (float *)(i8.q + (size_t)M * K);
    i8.s = (int32_t *)(i8.d + (size_t)M * nb);
    i8.ds = (float *)(i8.s + (size_t)M * nb);
    Py_BEGIN_ALLOW_THREADS;
    packed_product(kind, (const uint8_t *)(uintptr_t)q, (const uint16_t *)(uintptr_t)d, (const uint16_t *)(uintptr_t)m,
                   (const float *)(uintptr_t)x, (float *)(uintptr_t)y, M, N, K, N, xs, int8_x ? &i8 : NULL);
    Py_END_ALLOW_THREADS;
    PyMem_Free(buf);
    return kernel_result();
}

/* Packed -> float32 with the dequantizer's exact arithmetic (bit-equal to gguf-py). */
static void dequant_packed_rows(const job_t *j, int n0, int n1) {
    const int K = j->K, nb = K / QK, kind = j->qtype;
    if (IS_FLOAT(kind)) {
        for (size_t i = (size_t)n0 * K; i < (size_t)n1 * K; i++) j->y[i] = float_at(j->w, kind, i);
        return;
    }
    for (long n = n0; n < n1; n++)
        for (int b = 0; b < nb; b++) {
            float *o = j->y + (size_t)n * K + (size_t)b * QK;
            if (kind == P_I8 || kind == P_I8_16) { /* scale * q + (-min), the dequantizer's scale * q - min */
                const int8_t *qq = (const int8_t *)j->w + (size_t)n * K + (size_t)b * QK;
                const float *sc = (const float *)j->d + (size_t)n * N_SCALES(kind, nb);
                for (int i = 0; i < QK; i++) {
                    float v = (kind == P_I8_16 ? sc[2 * b + i / 16] : sc[b]) * (float)qq[i];
                    o[i] = kind == P_I8 && j->m ? v + ((const float *)j->m)[(size_t)n * nb + b] : v;
                }
                continue;
            }
            float db, mb;
            if (kind == P_Q4_F32) { /* float32 scale and negated min: scale * q + (-min) */
                db = ((const float *)j->d)[(size_t)n * nb + b];
                mb = ((const float *)j->m)[(size_t)n * nb + b];
            } else {
                db = f16_to_f32(j->d[n * nb + b]);
                mb = kind == P_Q4_MIN || kind == P_Q5_1 ? f16_to_f32(j->m[n * nb + b]) : 0.0f;
            }
            if (kind == P_Q8) {
                const int8_t *qq = (const int8_t *)j->w + (size_t)n * K + (size_t)b * QK;
                for (int i = 0; i < QK; i++) o[i] = (float)qq[i] * db;
            } else {
                const uint8_t *qq = j->w + ROW_BYTES(kind, K) * n + (size_t)b * BLOCK_BYTES(kind);
                uint32_t qh = 0;
                if (IS_Q5(kind)) memcpy(&qh, qq + 16, 4);
                for (int i = 0; i < 16; i++) {
                    int lo = (qq[i] & 0x0F) | (((qh >> i) & 1) << 4), hi = (qq[i] >> 4) | (((qh >> (i + 16)) & 1) << 4);
                    if (kind == P_Q5_0) {
                        o[i] = db * (float)(lo - 16);
                        o[i + 16] = db * (float)(hi - 16);
                    } else if (kind == P_Q4_MIN || kind == P_Q4_F32 || kind == P_Q5_1) {
                        o[i] = db * (float)lo + mb;
                        o[i + 16] = db * (float)hi + mb;
                    } else {
                        o[i] = db * (float)(lo - 8);
                        o[i + 16] = db * (float)(hi - 8);
                    }
                }
            }
        }
}

#ifdef HAVE_AVX512
/* The same arithmetic 16 values at a time: a multiply, then an add, each rounded as the scalar
 * loop rounds it (no fused multiply-add), so the output stays bit-equal to gguf-py's. */
static inline void dequant_block_avx512(const job_t *j, long n, int b, __m512 *out0, __m512 *out1) {
    const int K = j->K, nb = K / QK, kind = j->qtype;
    const __m128i low = _mm_set1_epi8(0x0F);
    __m512 v0, v1;
    if (BYTE_VALUES(kind)) {
        const int8_t *qq = (const int8_t *)j->w + (size_t)n * K + (size_t)b * QK;
        v0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)qq)));
        v1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qq + 16))));
    } else {
        const uint8_t *blk = j->w + ROW_BYTES(kind, K) * n + (size_t)b * BLOCK_BYTES(kind);
        __m128i qs = _mm_loadu_si128((const __m128i *)blk);
        __m512i lo = _mm512_cvtepu8_epi32(_mm_and_si128(qs, low));
        __m512i hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(qs, 4), low));
        if (IS_Q5(kind)) {
            uint32_t qh;
            memcpy(&qh, blk + 16, 4);
            lo = _mm512_mask_add_epi32(lo, (__mmask16)qh, lo, _mm512_set1_epi32(16));
            hi = _mm512_mask_add_epi32(hi, (__mmask16)(qh >> 16), hi, _mm512_set1_epi32(16));
        }
        if (kind == P_Q4_0 || kind == P_Q5_0) {
            const __m512i off = _mm512_set1_epi32(kind == P_Q4_0 ? 8 : 16);
            lo = _mm512_sub_epi32(lo, off);
            hi = _mm512_sub_epi32(hi, off);
        }
        v0 = _mm512_cvtepi32_ps(lo);
        v1 = _mm512_cvtepi32_ps(hi);
    }
    if (F32_SCALES(kind)) {
        const float *sc = (const float *)j->d + (size_t)n * N_SCALES(kind, nb);
        const float s0 = kind == P_I8_16 ? sc[2 * b] : sc[b], s1 = kind == P_I8_16 ? sc[2 * b + 1] : sc[b];
        v0 = _mm512_mul_ps(_mm512_set1_ps(s0), v0);
        v1 = _mm512_mul_ps(_mm512_set1_ps(s1), v1);
        if ((kind == P_I8 || kind == P_Q4_F32) && j->m) {
            const __m512 mn = _mm512_set1_ps(((const float *)j->m)[(size_t)n * nb + b]);
            v0 = _mm512_add_ps(v0, mn);
            v1 = _mm512_add_ps(v1, mn);
        }
    } else {
        const __m512 db = _mm512_set1_ps(f16_to_f32(j->d[n * nb + b]));
        v0 = _mm512_mul_ps(db, v0);
        v1 = _mm512_mul_ps(db, v1);
        if (kind == P_Q4_MIN || kind == P_Q5_1) {
            const __m512 mb = _mm512_set1_ps(f16_to_f32(j->m[n * nb + b]));
            v0 = _mm512_add_ps(v0, mb);
            v1 = _mm512_add_ps(v1, mb);
        }
    }
    *out0 = v0;
    *out1 = v1;
}

static void dequant_packed_rows_avx512(const job_t *j, int n0, int n1) {
    const int K = j->K, nb = K / QK;
    if (IS_FLOAT(j->qtype)) {
        dequant_packed_rows(j, n0, n1);
        return;
    }
    for (long n = n0; n < n1; n++)
        for (int b = 0; b < nb; b++) {
            float *o = j->y + (size_t)n * K + (size_t)b * QK;
            __m512 v0, v1;
            dequant_block_avx512(j, n, b, &v0, &v1);
            _mm512_storeu_ps(o, v0);
            _mm512_storeu_ps(o + 16, v1);
        }
}

/* float32 -> bf16, rounding to nearest even as torch's .to(torch.bfloat16) does (finite input). */
static inline __m256i to_bf16_avx512(__m512 v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

/* The dequantized weight straight to bf16 (for bf16 prefill products): the float32 values above,
 * rounded once, without a float32 copy of the whole weight in between. */
static void dequant_packed_rows_bf16_avx512(const job_t *j, int n0, int n1) {
    const int K = j->K, nb = K / QK;
    uint16_t *y = (uint16_t *)j->y;
    for (long n = n0; n < n1; n++)
        for (int b = 0; b < nb; b++) {
            uint16_t *o = y + (size_t)n * K + (size_t)b * QK;
            __m512 v0, v1;
            dequant_block_avx512(j, n, b, &v0, &v1);
            _mm256_storeu_si256((__m256i *)o, to_bf16_avx512(v0));
            _mm256_storeu_si256((__m256i *)(o + 16), to_bf16_avx512(v1));
        }
}
#endif

static PyObject *py_dequantize_packed(PyObject *self, PyObject *args) {
    int kind, N, K;
    unsigned long long q, d, m, out;
    if (!PyArg_ParseTuple(args, "iKKKKii", &kind, &q, &d, &m, &out, &N, &K)) return NULL;
    if (kind < 0 || kind > LAST_KIND || K % QK || N < 1) return PyErr_Format(PyExc_ValueError, "bad kind %d, N %d or K %d", kind, N, K);
    job_t j = {kind, 1, N, K, N, (const uint8_t *)(uintptr_t)q, NULL, (float *)(uintptr_t)out,
               (const uint16_t *)(uintptr_t)d, (const uint16_t *)(uintptr_t)m, NULL, dequant_packed_rows};
#ifdef HAVE_AVX512
    j.rows = dequant_packed_rows_avx512;
#endif
    Py_BEGIN_ALLOW_THREADS matmul(&j); /* the pool splits rows; nothing here is a product */
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

#ifdef HAVE_AVX512
static PyObject *py_dequantize_packed_bf16(PyObject *self, PyObject *args) {
    int kind, N, K;
    unsigned long long q, d, m, out;
    if (!PyArg_ParseTuple(args, "iKKKKii", &kind, &q, &d, &m, &out, &N, &K)) return NULL;
    if (kind < 0 || kind > LAST_KIND || IS_FLOAT(kind) || K % QK || N < 1) return PyErr_Format(PyExc_ValueError, "bad kind %d, N %d or K %d", kind, N, K);
    job_t j = {kind, 1, N, K, N, (const uint8_t *)(uintptr_t)q, NULL, (float *)(uintptr_t)out,
               (const uint16_t *)(uintptr_t)d, (const uint16_t *)(uintptr_t)m, NULL, dequant_packed_rows_bf16_avx512};
    Py_BEGIN_ALLOW_THREADS matmul(&j);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}
#endif


/* ---- decode attention over an f16 or q8_0 KV cache -------------------------------------------
 * One query position, all heads: out = softmax(scale * q k^T) v, with keys/values stored as f16,
 * or as q8_0 (llama.cpp's -ctk/-ctv q8_0: int8 values, one f16 scale per 32 along the head,
 * 1.06 bytes a value instead of 2). H query heads share Hkv key/value heads in groups.
 * Positions are split over the pool; each part keeps its own running max, sum and weighted
 * values, merged at the end (split-K). Decode at long context is a stream over the cache, so
 * the loops are arranged to keep that stream at memory speed.
 * f16: keys are converted 16 positions at a time into an L1 tile, and the 16 scores of each head
 * come out of one transposing reduction rather than 16 horizontal sums.
 * q8_0: integer dot products, as llama.cpp's q8_0 key dot: the query is quantized to q8_0 too
 * (scale applied after), and the keys are laid out for them (see KVCache): per head, tiles of 16
 * positions, byte t*16*hd + j*64 + r*4 + e holding value 4j + e of position 16t + r as u8 = q + 128.
 * One vpdpbusd of a tile row with 4 query bytes gives 16 positions' partial dots, so a tile's
 * scores need no horizontal sums and no conversion of keys to float (the conversions made the
 * float kernel compute-bound at half the f16 kernel's bytes). Key and value scales are tiled the
 * same way (element t*16*nb + b*16 + r: block b of position 16t + r); values stay a row per
 * position, converted to float once for every head of the group. */
#ifdef HAVE_AVX512
#define ATT_MAX_HEADS 128
#define ATT_MAX_HD 256
#define ATT_TILE 16

typedef struct {
    const float *q;
    const uint8_t *k, *v;     /* f16: position `first` of head 0; q8_0: position 0 (tiles) */
    const uint16_t *ks, *vs;  /* q8_0: f16 scales, one per 32 values (NULL for f16) */
    long stride_h;            /* values between heads in the cache (scales: stride_h / 32) */
    int H, Hkv, S, hd;        /* S: positions attended, first .. first + S - 1 */
    int first, per, units;    /* units (f16: positions, q8_0: tiles) attended, per part */
    float scale;
    float *part_m, *part_l, *part_o; /* this row's: [parts][ATT_MAX_HEADS] (m, l), [parts][ATT_MAX_HEADS][hd] (o) */
    /* q8_0: the query as q8_0 (int8 per head; per block d * scale and -128 * sum(q), which takes
     * the keys' +128 back out of the integer dots) */
    const int8_t *qq;
    const float *qd;
    const int32_t *qc;
} att_t;

static inline __m512 exp512(__m512 x) {
    /* Cephes expf: n = round(x log2 e), r = x - n ln 2 (two-part), e^r by its degree-6
     * polynomial, then scale by 2^n. About 1 ulp, like the libm expf torch uses. */
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.33654f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}

/* Lane i of the result = the sum of v[i]'s 16 lanes: a transpose folded into the additions
 * (30 shuffles for 16 sums instead of 16 x 4). */
static inline __m512 hsum16(const __m512 *v) {
    __m512 t[8], u[4];
    for (int p = 0; p < 8; p++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        t[p] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]), _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]));
    for (int p = 0; p < 4; p++) /* per 128-bit lane: rows 4p..4p+3, each summed over that lane */
        u[p] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * p], t[2 * p + 1], 0x44),
                             _mm512_shuffle_ps(t[2 * p], t[2 * p + 1], 0xEE));
    __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xDD));
    __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD));
}

/* Position s of one f16 head as float32 into out (NV vectors of 16). */
static inline __attribute__((always_inline)) void att_load(const uint8_t *base, long s, float *out, const int NV) {
    const uint16_t *row = (const uint16_t *)base + (size_t)s * NV * 16;
    for (int c = 0; c < NV; c++)
        _mm512_store_ps(out + c * 16, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + c * 16))));
}

static inline void att_prefetch(const uint8_t *base, long s, int hd) {
    const char *row = (const char *)base + (size_t)s * 2 * hd;
    for (size_t c = 0; c < 2 * (size_t)hd; c += 64) __builtin_prefetch(row + c, 0, 3);
}

/* Part `part` as one that saw no positions: weight 0 when the parts are merged (the call then
 * raises MemoryError). */
static void att_part_empty(const att_t *a, int part, int hd) {
    atomic_store(&g_nomem, 1);
    for (int h = 0; h < a->H; h++) {
        a->part_m[part * ATT_MAX_HEADS + h] = -INFINITY;
        a->part_l[part * ATT_MAX_HEADS + h] = 0.0f;
        memset(a->part_o + ((size_t)part * ATT_MAX_HEADS + h) * hd, 0, sizeof(float) * hd);
    }
}

/* f16: rows s0..s1 of every head group, with the head size NV * 16 a compile-time constant where it is
 * common (64, 128, 256), so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void att_rows_nv(const att_t *a, int s0, int s1, const int NV) {
    const int part = s0 / a->per, hd = NV * 16, group = a->H / a->Hkv;
    const int len = s1 - s0, ld = len + ATT_TILE;
    const size_t n_scores = ((size_t)group * ld + 15) & ~(size_t)15, n_out = (size_t)group * hd;
    float *scores = thread_scratch(1, n_scores + n_out + (size_t)ATT_TILE * hd);
    if (!scores) { /* no memory: this part contributes nothing (weight 0 in the merge) */
        att_part_empty(a, part, hd);
        return;
    }
    float *o = scores + n_scores, *tile = o + n_out; /* 64-byte aligned: ATT_TILE positions as float32 */
    for (int g = 0; g < a->Hkv; g++) {
        const uint8_t *kg = a->k + (size_t)g * a->stride_h * 2, *vg = a->v + (size_t)g * a->stride_h * 2;
        float mx[8];
        __m512 mxv[8];
        int s = s0;
        for (int i = 0; i < group; i++) mxv[i] = _mm512_set1_ps(-INFINITY);
        for (; s + ATT_TILE <= s1; s += ATT_TILE) { /* scores, 16 positions at a time */
            for (int r = 0; r < ATT_TILE; r++) {
                if (ATT_PREFETCH && s + r + ATT_PREFETCH < s1) att_prefetch(kg, s + r + ATT_PREFETCH, hd);
                att_load(kg, s + r, tile + (size_t)r * hd, NV);
            }
            for (int i = 0; i < group; i++) {
                const float *qi = a->q + (size_t)(g * group + i) * hd;
                __m512 qv[NV], acc[ATT_TILE];
                for (int c = 0; c < NV; c++) qv[c] = _mm512_mul_ps(_mm512_loadu_ps(qi + c * 16), _mm512_set1_ps(a->scale));
                for (int r = 0; r < ATT_TILE; r++) {
                    __m512 x = _mm512_mul_ps(qv[0], _mm512_load_ps(tile + (size_t)r * hd));
                    for (int c = 1; c < NV; c++) x = _mm512_fmadd_ps(qv[c], _mm512_load_ps(tile + (size_t)r * hd + c * 16), x);
                    acc[r] = x;
                }
                const __m512 sc = hsum16(acc);
                _mm512_storeu_ps(scores + (size_t)i * ld + (s - s0), sc);
                mxv[i] = _mm512_max_ps(mxv[i], sc);
            }
        }
        for (int i = 0; i < group; i++) mx[i] = _mm512_reduce_max_ps(mxv[i]);
        for (; s < s1; s++) { /* the last few positions, one at a time */
            att_load(kg, s, tile, NV);
            for (int i = 0; i < group; i++) {
                const float *qi = a->q + (size_t)(g * group + i) * hd;
                __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qi), _mm512_load_ps(tile));
                for (int c = 1; c < NV; c++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qi + c * 16), _mm512_load_ps(tile + c * 16), acc);
                const float sc = _mm512_reduce_add_ps(acc) * a->scale;
                scores[(size_t)i * ld + (s - s0)] = sc;
                mx[i] = fmaxf(mx[i], sc);
            }
        }
        for (int i = 0; i < group; i++) { /* exp(score - max) in place, and its sum */
            float *sc = scores + (size_t)i * ld;
            __m512 sum = _mm512_setzero_ps(), m = _mm512_set1_ps(mx[i]);
            int t = 0;
            for (; t + 16 <= len; t += 16) {
                __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + t), m));
                _mm512_storeu_ps(sc + t, e);
                sum = _mm512_add_ps(sum, e);
            }
            if (t < len) {
                __mmask16 k = (__mmask16)((1u << (len - t)) - 1);
                __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sc + t), m));
                _mm512_mask_storeu_ps(sc + t, k, e);
                sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
            }
            const int h = g * group + i;
            a->part_m[part * ATT_MAX_HEADS + h] = mx[i];
            a->part_l[part * ATT_MAX_HEADS + h] = _mm512_reduce_add_ps(sum);
        }
        memset(o, 0, sizeof(float) * n_out);
        for (int t = s0; t < s1; t += ATT_TILE) { /* weighted values, 16 positions at a time */
            const int n = s1 - t < ATT_TILE ? s1 - t : ATT_TILE;
            for (int r = 0; r < n; r++) {
                if (ATT_PREFETCH && t + r + ATT_PREFETCH < s1) att_prefetch(vg, t + r + ATT_PREFETCH, hd);
                att_load(vg, t + r, tile + (size_t)r * hd, NV);
            }
            for (int i = 0; i < group; i++) {
                const float *p = scores + (size_t)i * ld + (t - s0);
                float *oi = o + (size_t)i * hd;
                /* two accumulator sets (even and odd positions) when the head is short, so enough
                 * independent FMA chains are in flight */
                __m512 acc0[NV], acc1[NV];
                for (int c = 0; c < NV; c++) acc0[c] = _mm512_load_ps(oi + c * 16), acc1[c] = _mm512_setzero_ps();
                int r = 0;
                if (NV <= 4)
                    for (; r + 2 <= n; r += 2) {
                        const __m512 p0 = _mm512_set1_ps(p[r]), p1 = _mm512_set1_ps(p[r + 1]);
                        for (int c = 0; c < NV; c++) {
                            acc0[c] = _mm512_fmadd_ps(p0, _mm512_load_ps(tile + (size_t)r * hd + c * 16), acc0[c]);
                            acc1[c] = _mm512_fmadd_ps(p1, _mm512_load_ps(tile + (size_t)(r + 1) * hd + c * 16), acc1[c]);
                        }
                    }
                for (; r < n; r++) {
                    const __m512 p0 = _mm512_set1_ps(p[r]);
                    for (int c = 0; c < NV; c++)
                        acc0[c] = _mm512_fmadd_ps(p0, _mm512_load_ps(tile + (size_t)r * hd + c * 16), acc0[c]);
                }
                for (int c = 0; c < NV; c++) _mm512_store_ps(oi + c * 16, _mm512_add_ps(acc0[c], acc1[c]));
            }
        }
        for (int i = 0; i < group; i++)
            memcpy(a->part_o + ((size_t)part * ATT_MAX_HEADS + g * group + i) * hd, o + (size_t)i * hd,
                   sizeof(float) * hd);
    }
}


/* The lanes (positions 16t + r) of tile t inside first .. end - 1. */
static inline __mmask16 tile_valid(long t, long first, long end) {
    unsigned m = 0xFFFFu;
    const long base = t * ATT_TILE;
    if (base < first) m &= ~((1u << (first - base)) - 1);
    if (base + ATT_TILE > end) m &= (1u << (end - base)) - 1;
    return (__mmask16)m;
}

/* q8_0: tiles u0..u1 (counted from the tile holding `first`) of every head group, with NB blocks
 * of 32 in a head. Lanes outside the attended positions (the first and last tiles' edges) get
 * score -inf and weight exactly 0, and their scales are never read into a product (the cache
 * past its last position is uninitialised). */
static inline __attribute__((always_inline)) void att_q8_nb(const att_t *a, int u0, int u1, const int NB) {
    const int hd = NB * QK, NV = hd / 16, group = a->H / a->Hkv, part = u0 / a->per;
    const long first = a->first, end = a->first + a->S, t0 = first / ATT_TILE + u0, t1 = first / ATT_TILE + u1;
    const int len = (int)(t1 - t0) * ATT_TILE;
    const size_t tile_bytes = (size_t)ATT_TILE * hd;
    float *scores = thread_scratch(1, (size_t)group * (len + hd + NB * ATT_TILE) + tile_bytes);
    if (!scores) { /* no memory: this part contributes nothing (weight 0 in the merge) */
        att_part_empty(a, part, hd);
        return;
    }
    float *o = scores + (size_t)group * len, *pv = o + (size_t)group * hd, *vt = pv + (size_t)group * NB * ATT_TILE;
    for (int g = 0; g < a->Hkv; g++) {
        const uint8_t *kg = a->k + (size_t)g * a->stride_h;
        const int8_t *vg = (const int8_t *)a->v + (size_t)g * a->stride_h;
        const uint16_t *ksg = a->ks + (size_t)g * (a->stride_h / QK), *vsg = a->vs + (size_t)g * (a->stride_h / QK);
        const int h0 = g * group;
        __m512 mxv[8];
        for (int i = 0; i < group; i++) mxv[i] = _mm512_set1_ps(-INFINITY);
        for (long t = t0; t < t1; t++) { /* scores, a tile of 16 positions at a time */
            const uint8_t *kt = kg + (size_t)t * tile_bytes;
            const uint16_t *kst = ksg + (size_t)t * ATT_TILE * NB;
            if (t + 2 < t1)
                for (size_t c = 0; c < tile_bytes; c += 64) __builtin_prefetch(kt + 2 * tile_bytes + c, 0, 3);
            const __mmask16 valid = tile_valid(t, first, end);
            __m512 sc[8];
            for (int i = 0; i < group; i++) sc[i] = _mm512_setzero_ps();
            for (int b = 0; b < NB; b++) {
                /* two chains per head over the block's 8 rows of the tile (dpbusd latency) */
                __m512i a0[8], a1[8];
                for (int i = 0; i < group; i++) {
                    a0[i] = _mm512_set1_epi32(a->qc[(h0 + i) * 8 + b]);
                    a1[i] = _mm512_setzero_si512();
                }
                for (int jj = 0; jj < 8; jj += 2) {
                    const __m512i k0 = _mm512_loadu_si512(kt + (size_t)(8 * b + jj) * 64);
                    const __m512i k1 = _mm512_loadu_si512(kt + (size_t)(8 * b + jj + 1) * 64);
                    for (int i = 0; i < group; i++) {
                        const int32_t *qi = (const int32_t *)(a->qq + (size_t)(h0 + i) * hd) + 8 * b + jj;
                        a0[i] = DPBUSD(a0[i], k0, _mm512_set1_epi32(qi[0]));
                        a1[i] = DPBUSD(a1[i], k1, _mm512_set1_epi32(qi[1]));
                    }
                }
                const __m512 dk = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, kst + b * ATT_TILE));
                for (int i = 0; i < group; i++)
                    sc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0[i], a1[i])),
                                            _mm512_mul_ps(dk, _mm512_set1_ps(a->qd[(h0 + i) * 8 + b])), sc[i]);
            }
            for (int i = 0; i < group; i++) {
                sc[i] = _mm512_mask_blend_ps(valid, _mm512_set1_ps(-INFINITY), sc[i]);
                _mm512_store_ps(scores + (size_t)i * len + (t - t0) * ATT_TILE, sc[i]);
                mxv[i] = _mm512_max_ps(mxv[i], sc[i]);
            }
        }
        for (int i = 0; i < group; i++) { /* exp(score - max) in place (0 outside), and its sum */
            float *sc = scores + (size_t)i * len;
            const float mx = _mm512_reduce_max_ps(mxv[i]);
            const __m512 m = _mm512_set1_ps(mx), ninf = _mm512_set1_ps(-INFINITY);
            __m512 sum = _mm512_setzero_ps();
            for (int t = 0; t < len; t += 16) {
                const __m512 x = _mm512_load_ps(sc + t);
                const __mmask16 in = _mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ);
                const __m512 e = _mm512_maskz_mov_ps(in, exp512(_mm512_sub_ps(x, m)));
                _mm512_store_ps(sc + t, e);
                sum = _mm512_add_ps(sum, e);
            }
            a->part_m[part * ATT_MAX_HEADS + h0 + i] = mx;
            a->part_l[part * ATT_MAX_HEADS + h0 + i] = _mm512_reduce_add_ps(sum);
        }
        memset(o, 0, sizeof(float) * group * hd);
        for (long t = t0; t < t1; t++) { /* weighted values, a tile at a time */
            const int8_t *vrow = vg + (size_t)t * tile_bytes;
            const uint16_t *vst = vsg + (size_t)t * ATT_TILE * NB;
            if (t + 2 < t1)
                for (size_t c = 0; c < tile_bytes; c += 64) __builtin_prefetch(vrow + 2 * tile_bytes + c, 0, 3);
            const __mmask16 valid = tile_valid(t, first, end);
            for (int b = 0; b < NB; b++) { /* each weight times its block's scale */
                const __m512 dv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, vst + b * ATT_TILE));
                for (int i = 0; i < group; i++)
                    _mm512_store_ps(pv + (size_t)(i * NB + b) * ATT_TILE,
                                    _mm512_mul_ps(dv, _mm512_load_ps(scores + (size_t)i * len + (t - t0) * ATT_TILE)));
            }
            for (int r = 0; r < ATT_TILE; r++)
                for (int c = 0; c < NV; c++) {
                    const __m128i x = _mm_loadu_si128((const __m128i *)(vrow + (size_t)r * hd + c * 16));
                    _mm512_store_ps(vt + (size_t)r * hd + c * 16, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(x)));
                }
            for (int i = 0; i < group; i++) {
                const float *w = pv + (size_t)i * NB * ATT_TILE;
                float *oi = o + (size_t)i * hd;
                __m512 acc0[16], acc1[16]; /* even and odd positions: independent FMA chains */
                for (int c = 0; c < NV; c++) acc0[c] = _mm512_load_ps(oi + c * 16), acc1[c] = _mm512_setzero_ps();
                for (int r = 0; r < ATT_TILE; r += 2)
                    for (int c = 0; c < NV; c++) {
                        const float *wr = w + (c / 2) * ATT_TILE + r;
                        const float *x = vt + (size_t)r * hd + c * 16;
                        acc0[c] = _mm512_fmadd_ps(_mm512_set1_ps(wr[0]), _mm512_load_ps(x), acc0[c]);
                        acc1[c] = _mm512_fmadd_ps(_mm512_set1_ps(wr[1]), _mm512_load_ps(x + hd), acc1[c]);
                    }
                for (int c = 0; c < NV; c++) _mm512_store_ps(oi + c * 16, _mm512_add_ps(acc0[c], acc1[c]));
            }
        }
        for (int i = 0; i < group; i++)
            memcpy(a->part_o + ((size_t)part * ATT_MAX_HEADS + h0 + i) * hd, o + (size_t)i * hd, sizeof(float) * hd);
    }
}

/* Units u0..u1 of one row's attention: one part of it, with the head size a constant where common. */
static void att_run(const att_t *a, int u0, int u1) {
    if (a->ks) {
        switch (a->hd / QK) {
        case 2: att_q8_nb(a, u0, u1, 2); break;
        case 4: att_q8_nb(a, u0, u1, 4); break;
        case 8: att_q8_nb(a, u0, u1, 8); break;
        default: att_q8_nb(a, u0, u1, a->hd / QK);
        }
        return;
    }
    switch (a->hd / 16) {
    case 4: att_rows_nv(a, u0, u1, 4); break;
    case 8: att_rows_nv(a, u0, u1, 8); break;
    case 16: att_rows_nv(a, u0, u1, 16); break;
    default: att_rows_nv(a, u0, u1, a->hd / 16); /* other head sizes: the same code, bounds at run time */
    }
}

/* One query row of a decode step: its cache (k, v: position 0 of head 0; ks, vs: its scales,
 * q8_0 tiled as above, or NULL for f16) and the positions first .. end - 1 it attends. */
typedef struct {
    const float *q;
    const uint8_t *k, *v;
    const uint16_t *ks, *vs;
    float *out;
    long stride_h;
    int first, end;
} att_req_t;

/* The pool's work in a step: (row, part) units, so a batch's rows attend side by side (at
 * short contexts a row is one part, and one thread would otherwise do all of them). */
static att_t g_atts[MAX_ROWS];
static int g_unit_row[MAX_ROWS * MAX_THREADS], g_unit_part[MAX_ROWS * MAX_THREADS];

static void att_units(const job_t *j, int u0, int u1) {
    (void)j;
    for (int u = u0; u < u1; u++) {
        const att_t *a = &g_atts[g_unit_row[u]];
        const int s0 = g_unit_part[u] * a->per, s1 = s0 + a->per < a->units ? s0 + a->per : a->units;
        att_run(a, s0, s1);
    }
}

/* Part buffers for M rows: running max and sum [row][part][head], weighted values
 * [row][part][head][hd]. One row fits the static ones; a batch's grow on the heap once. */
static int att_buffers(int M, int hd, float **pm, float **pl, float **po) {
    static float spm[MAX_THREADS * ATT_MAX_HEADS], spl[MAX_THREADS * ATT_MAX_HEADS];
    static float spo[MAX_THREADS * ATT_MAX_HEADS * ATT_MAX_HD];
    static float *heap;
    static size_t cap;
    const size_t per_row = (size_t)g_threads * ATT_MAX_HEADS, need = (size_t)M * per_row * (2 + hd);
    if (M == 1) {
        *pm = spm, *pl = spl, *po = spo;
        return 1;
    }
    if (need > cap) {
        float *grown = aligned_alloc(64, (need * sizeof(float) + 63) & ~(size_t)63);
        if (!grown) return 0;
        free(heap);
        heap = grown, cap = need;
    }
    *pm = heap, *pl = heap + (size_t)M * per_row, *po = heap + 2 * (size_t)M * per_row;
    return 1;
}

/* Attention of M query rows, each over its own positions. A row's split into parts depends on
 * its length alone, never on the other rows, so a row's result is the same bits alone or in a
 * batch. The caller holds g_call. */
static void attend_rows(const att_req_t *rq, int M, int H, int Hkv, int hd, float scale) {
    static int8_t qq[MAX_ROWS][ATT_MAX_HEADS * ATT_MAX_HD] __attribute__((aligned(64)));
    static float qd[MAX_ROWS][ATT_MAX_HEADS * 8];
    static int32_t qc[MAX_ROWS][ATT_MAX_HEADS * 8];
    float *pm, *pl, *po;
    if (!att_buffers(M, hd, &pm, &pl, &po)) { /* no memory for a batch's buffers: a row at a time */
        for (int r = 0; r < M; r++) attend_rows(rq + r, 1, H, Hkv, hd, scale);
        return;
    }
    const int threads = g_threads; /* fixed while g_call is held (set_threads takes it too) */
    const size_t per_row = (size_t)threads * ATT_MAX_HEADS;
    int n_units = 0;
    for (int r = 0; r < M; r++) {
        const att_req_t *x = rq + r;
        const int S = x->end - x->first, q8 = x->ks != NULL;
        if (q8) /* the query as llama.cpp quantizes it for its q8_0 key dot */
            for (int h = 0; h < H; h++) {
                uint16_t d16[8];
                quantize_q8_0(x->q + (size_t)h * hd, qq[r] + (size_t)h * hd, d16, hd);
                for (int b = 0; b < hd / QK; b++) {
                    int32_t sum = 0;
                    for (int i = 0; i < QK; i++) sum += qq[r][(size_t)h * hd + b * QK + i];
                    qd[r][h * 8 + b] = f16_to_f32(d16[b]) * scale;
                    qc[r][h * 8 + b] = -128 * sum;
                }
            }
        const int units = q8 ? (x->end + ATT_TILE - 1) / ATT_TILE - x->first / ATT_TILE : S;
        const int parts = S >= ATT_SPLIT_MIN ? threads : 1, per = (units + parts - 1) / parts;
        const size_t at = q8 ? 0 : (size_t)x->first * hd * 2; /* f16 rows are addressed from `first` */
        g_atts[r] = (att_t){x->q, x->k + at, x->v + at, x->ks, x->vs, x->stride_h, H, Hkv, S, hd, x->first, per,
                            units, scale, pm + r * per_row, pl + r * per_row, po + r * per_row * hd,
                            qq[r], qd[r], qc[r]};
        for (int p = 0; p * per < units; p++) g_unit_row[n_units] = r, g_unit_part[n_units++] = p;
    }
    if (n_units == 1 || threads <= 1) {
        att_units(NULL, 0, n_units);
    } else {
        job_t j = {0};
        j.N = n_units;
        j.rows = att_units;
        j.chunk = 1;
        dispatch(&j);
    }
    for (int r = 0; r < M; r++) { /* merge each row's parts: rescale each by exp(its max - overall max) */
        const att_t *a = &g_atts[r];
        const int used = (a->units + a->per - 1) / a->per;
        float *o = rq[r].out;
        for (int h = 0; h < H; h++) {
            float mx = -INFINITY, L = 0.0f;
            for (int p = 0; p < used; p++)
                if (a->part_m[p * ATT_MAX_HEADS + h] > mx) mx = a->part_m[p * ATT_MAX_HEADS + h];
            for (int d = 0; d < hd; d++) o[(size_t)h * hd + d] = 0.0f;
            for (int p = 0; p < used; p++) {
                const float w = expf(a->part_m[p * ATT_MAX_HEADS + h] - mx);
                L += w * a->part_l[p * ATT_MAX_HEADS + h];
                for (int d = 0; d < hd; d++)
                    o[(size_t)h * hd + d] += w * a->part_o[((size_t)p * ATT_MAX_HEADS + h) * hd + d];
            }
            for (int d = 0; d < hd; d++) o[(size_t)h * hd + d] /= L;
        }
    }
}

/* One position's key and value (one head) into a q8_0 cache in the tiled layout above; kg, vg,
 * ks, vs: the head's position 0. */
static void store_q8_0(const float *kr, const float *vr, uint8_t *kg, int8_t *vg, uint16_t *ks, uint16_t *vs, long pos,
                       int hd) {
    int8_t q[ATT_MAX_HD];
    uint16_t d[8];
    const int nb = hd / QK, r = (int)(pos % ATT_TILE);
    const size_t t = (size_t)(pos / ATT_TILE);
    quantize_q8_0(kr, q, d, hd);
    uint8_t *kt = kg + t * ATT_TILE * hd;
    for (int i = 0; i < hd; i++) kt[(i / 4) * 64 + r * 4 + i % 4] = (uint8_t)(q[i] + 128);
    for (int b = 0; b < nb; b++) ks[(t * nb + b) * ATT_TILE + r] = d[b];
    quantize_q8_0(vr, vg + (size_t)pos * hd, d, hd);
    for (int b = 0; b < nb; b++) vs[(t * nb + b) * ATT_TILE + r] = d[b];
}

/* attend(q, k, v, ks, vs, out, stride_h, H, Hkv, S, hd, scale[, first]): positions first .. S - 1
 * (a sliding window starts past 0); k, v, ks, vs at position 0; ks = vs = 0 for an f16 cache. */
static PyObject *py_attend(PyObject *self, PyObject *args) {
    unsigned long long q, k, v, ks, vs, out;
    long long stride_h;
    int H, Hkv, S, hd, first = 0;
    float scale;
    if (!PyArg_ParseTuple(args, "KKKKKKLiiiif|i", &q, &k, &v, &ks, &vs, &out, &stride_h, &H, &Hkv, &S, &hd, &scale,
                          &first))
        return NULL;
    if (H > ATT_MAX_HEADS || Hkv < 1 || H % Hkv || H / Hkv > 8 || hd % (ks ? QK : 16) || hd > ATT_MAX_HD || S < 1 ||
        first < 0 || first >= S || (!ks) != (!vs))
        return PyErr_Format(PyExc_ValueError, "unsupported attention shape H=%d Hkv=%d hd=%d S=%d first=%d", H, Hkv, hd,
                            S, first);
    const att_req_t rq = {(const float *)(uintptr_t)q, (const uint8_t *)(uintptr_t)k, (const uint8_t *)(uintptr_t)v,
                          (const uint16_t *)(uintptr_t)ks, (const uint16_t *)(uintptr_t)vs, (float *)(uintptr_t)out,
                          (long)stride_h, first, S};
    Py_BEGIN_ALLOW_THREADS;
    pthread_mutex_lock(&g_call);
    attend_rows(&rq, 1, H, Hkv, hd, scale);
    pthread_mutex_unlock(&g_call);
    Py_END_ALLOW_THREADS;
    return kernel_result();
}

/* act(gate) * up for one row of [gate | up] (2 I values) into h (I values; h may be the row's
 * own start): SiLU, or GELU with the tanh approximation (Gemma). I is a multiple of 16. */
static inline __m512 act512(__m512 g, int gelu) {
    const __m512 one = _mm512_set1_ps(1.0f);
    if (gelu) { /* 0.5 g (1 + tanh(u)), u = sqrt(2/pi) (g + 0.044715 g^3), written as g / (1 + e^-2u):
                 * the same function without the cancellation in 1 + tanh(u) where u < 0 */
        const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                       _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), g),
                                                       _mm512_mul_ps(g, g), g));
        const __m512 e = exp512(_mm512_min_ps(_mm512_mul_ps(_mm512_set1_ps(-2.0f), u), _mm512_set1_ps(88.0f)));
        return _mm512_div_ps(g, _mm512_add_ps(one, e));
    }
    return _mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

static inline void act_mul(const float *gu, float *h, int I, int gelu) {
    for (int i = 0; i < I; i += 16)
        _mm512_storeu_ps(h + i, _mm512_mul_ps(act512(_mm512_loadu_ps(gu + i), gelu), _mm512_loadu_ps(gu + I + i)));
}

static inline __m512 load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* The same on bf16 rows (a bf16 prefill product's output, widened exactly), the result rounded
 * to bf16 as the next bf16 product would round it. */
static inline void act_mul_bf16(const uint16_t *gu, uint16_t *h, int I, int gelu) {
    for (int i = 0; i < I; i += 16)
        _mm256_storeu_si256((__m256i *)(h + i),
                            to_bf16_avx512(_mm512_mul_ps(act512(load_bf16(gu + i), gelu), load_bf16(gu + I + i))));
}

/* ---- prefill helpers: RMSNorm and the gated activation over many rows, split over the pool.
 * torch's own elementwise kernels in this build are AVX2 and run ~10x below memory speed on
 * (512, 640) tensors; these are the decode step's loops, row-parallel. job: N rows of K values,
 * x in, y out, w the norm weight (or NULL), xsum points at eps, qtype the GELU flag. */
static void rmsnorm_rows_job(const job_t *j, int n0, int n1) {
    const int n = j->K;
    const float *w = (const float *)j->w, eps = *j->xsum;
    for (long r = n0; r < n1; r++) {
        const float *x = j->x + (size_t)r * n;
        float *y = j->y + (size_t)r * n;
        __m512 acc = _mm512_setzero_ps();
        int i = 0;
        for (; i + 16 <= n; i += 16) {
            const __m512 v = _mm512_loadu_ps(x + i);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        float ss = _mm512_reduce_add_ps(acc);
        for (; i < n; i++) ss += x[i] * x[i];
        const float inv = 1.0f / sqrtf(ss / (float)n + eps);
        const __m512 iv = _mm512_set1_ps(inv);
        for (i = 0; i + 16 <= n; i += 16)
            _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), iv), _mm512_loadu_ps(w + i)));
        for (; i < n; i++) y[i] = x[i] * inv * w[i];
    }
}

static void gated_rows_job(const job_t *j, int n0, int n1) {
    const int gelu = j->qtype & 1, bf16 = j->qtype & 2;
    for (long r = n0; r < n1; r++) {
        if (bf16)
            act_mul_bf16((const uint16_t *)j->x + (size_t)r * 2 * j->K, (uint16_t *)j->y + (size_t)r * j->K, j->K, gelu);
        else
            act_mul(j->x + (size_t)r * 2 * j->K, j->y + (size_t)r * j->K, j->K, gelu);
    }
}

/* rmsnorm_rows(x, w, out, rows, n, eps) */
static PyObject *py_rmsnorm_rows(PyObject *self, PyObject *args) {
    unsigned long long x, w, out;
    int rows, n;
    float eps;
    if (!PyArg_ParseTuple(args, "KKKiif", &x, &w, &out, &rows, &n, &eps)) return NULL;
    if (rows < 1 || n < 1) return PyErr_Format(PyExc_ValueError, "bad shape rows=%d n=%d", rows, n);
    job_t j = {0, 1, rows, n, n, (const uint8_t *)(uintptr_t)w, (const float *)(uintptr_t)x, (float *)(uintptr_t)out,
               NULL, NULL, &eps, rmsnorm_rows_job};
    Py_BEGIN_ALLOW_THREADS matmul(&j);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

/* gated_act(gate_up, out, rows, I, flags): out = act(gate) * up, gate_up rows [gate | up];
 * flags bit 0: GELU (else SiLU), bit 1: bf16 rows in and out (else float32) */
static PyObject *py_gated_act(PyObject *self, PyObject *args) {
    unsigned long long x, out;
    int rows, I, gelu; /* the flags */
    if (!PyArg_ParseTuple(args, "KKiii", &x, &out, &rows, &I, &gelu)) return NULL;
    if (rows < 1 || I < 16 || I % 16) return PyErr_Format(PyExc_ValueError, "bad shape rows=%d I=%d", rows, I);
    job_t j = {gelu, 1, rows, I, I, NULL, (const float *)(uintptr_t)x, (float *)(uintptr_t)out, NULL, NULL, NULL,
               gated_rows_job};
    Py_BEGIN_ALLOW_THREADS matmul(&j);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

/* ---- one whole decoder layer for one token -----------------------------------------------
 * The llama block with every step in C: RMSNorm, fused q/k/v product, RoPE, cache write (f16 or q8_0),
 * attention, output product, residual, RMSNorm, fused gate/up product, SiLU, down product,
 * residual. Decode spends most of its time between products otherwise (dozens of tiny torch
 * ops per layer); here the layer is one call. */
typedef struct {
    int kind, N;
    const uint8_t *q;
    const uint16_t *d, *m;
} prod_t;

typedef struct {
    int D, H, Hkv, hd, I, n_qkv, n_gu;
    float eps, scale;
    const float *w_in, *w_post;
    /* Gemma-style extras, NULL/0 when absent: RMSNorm on each q and k head, RMSNorm on the
     * attention and MLP outputs, GELU (tanh) instead of SiLU, a sliding attention window */
    const float *w_qn, *w_kn, *w_post_attn, *w_post_ffn;
    int gelu, window;
    prod_t qkv[3], o, gu[2], down; /* q/k/v (fused or not), output, gate/up (fused or not), down */
    float *xn, *qkv_out, *att, *gu_out, *tmp, *xs;
    xq_t i8; /* x as int8 for the products (int8 activations) */
} layer_t;

static void layer_free(PyObject *cap) {
    layer_t *L = PyCapsule_GetPointer(cap, "garagelm.layer");
    if (!L) return;
    free(L->xn);
    free(L->i8.q);
    free(L);
}

static void rmsnorm(const float *x, const float *w, float *out, int n, float eps) {
    float s = 0.0f;
    for (int i = 0; i < n; i++) s += x[i] * x[i];
    float r = 1.0f / sqrtf(s * (1.0f / (float)n) + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

static int parse_prods(PyObject *seq, prod_t *out, int max) {
    if (!PyTuple_Check(seq) || PyTuple_GET_SIZE(seq) < 1 || PyTuple_GET_SIZE(seq) > max) {
        PyErr_SetString(PyExc_ValueError, "products must be a tuple of (kind, N, q, d, m)");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(seq); i++) {
        unsigned long long q, d, m;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(seq, i), "iiKKK", &out[i].kind, &out[i].N, &q, &d, &m)) return -1;
        if (out[i].kind < 0 || out[i].kind > LAST_KIND) {
            PyErr_Format(PyExc_ValueError, "unknown packed kind %d", out[i].kind);
            return -1;
        }
        out[i].q = (const uint8_t *)(uintptr_t)q;
        out[i].d = (const uint16_t *)(uintptr_t)d;
        out[i].m = (const uint16_t *)(uintptr_t)m;
    }
    return (int)PyTuple_GET_SIZE(seq);
}

static PyObject *py_make_layer(PyObject *self, PyObject *args) {
    layer_t *L = calloc(1, sizeof(layer_t));
    if (!L) return PyErr_NoMemory();
    unsigned long long w_in, w_post, w_qn = 0, w_kn = 0, w_pa = 0, w_pf = 0;
    PyObject *qkv, *o, *gu, *down;
    if (!PyArg_ParseTuple(args, "iiiiiffKKOOOO|KKKKii", &L->D, &L->H, &L->Hkv, &L->hd, &L->I, &L->eps, &L->scale,
                          &w_in, &w_post, &qkv, &o, &gu, &down, &w_qn, &w_kn, &w_pa, &w_pf, &L->gelu, &L->window) ||
        (L->n_qkv = parse_prods(qkv, L->qkv, 3)) < 0 || parse_prods(o, &L->o, 1) < 0 ||
        (L->n_gu = parse_prods(gu, L->gu, 2)) < 0 || parse_prods(down, &L->down, 1) < 0) {
        free(L);
        return NULL;
    }
    if (L->H % L->Hkv || L->H / L->Hkv > 8 || L->hd % 16 || L->hd > ATT_MAX_HD || L->H > ATT_MAX_HEADS ||
        L->D % QK || L->I % QK || (L->H * L->hd) % QK) {
        free(L);
        return PyErr_Format(PyExc_ValueError, "layer shape not supported by the fused decode kernel");
    }
    L->w_in = (const float *)(uintptr_t)w_in;
    L->w_post = (const float *)(uintptr_t)w_post;
    L->w_qn = (const float *)(uintptr_t)w_qn;
    L->w_kn = (const float *)(uintptr_t)w_kn;
    L->w_post_attn = (const float *)(uintptr_t)w_pa;
    L->w_post_ffn = (const float *)(uintptr_t)w_pf;
    int big = L->D > L->I ? L->D : L->I;
    if (L->H * L->hd > big) big = L->H * L->hd;
    /* scratch for MAX_ROWS sequences stepped together */
    size_t n_qkv = (size_t)(L->H + 2 * L->Hkv) * L->hd, n_xs = (size_t)big / QK + 16;
    size_t total = MAX_ROWS * ((size_t)L->D + n_qkv + (size_t)L->H * L->hd + 2 * (size_t)L->I + (size_t)big + n_xs);
    float *buf = calloc(total, sizeof(float));
    if (!buf) {
        free(L);
        return PyErr_NoMemory();
    }
    L->xn = buf;
    L->qkv_out = L->xn + MAX_ROWS * (size_t)L->D;
    L->att = L->qkv_out + MAX_ROWS * n_qkv;
    L->gu_out = L->att + MAX_ROWS * (size_t)L->H * L->hd;
    L->tmp = L->gu_out + MAX_ROWS * 2 * (size_t)L->I;
    L->xs = L->tmp + MAX_ROWS * (size_t)big;
    /* int8 activations: MAX_ROWS rows of up to `big` values, their scales and sums */
    L->i8.q = malloc(XQ_BYTES(MAX_ROWS, big));
    if (!L->i8.q) {
        free(buf);
        free(L);
        return PyErr_NoMemory();
    }
    L->i8.d = (float *)(L->i8.q + MAX_ROWS * (size_t)big);
    L->i8.s = (int32_t *)(L->i8.d + MAX_ROWS * ((size_t)big / QK));
    L->i8.ds = (float *)(L->i8.s + MAX_ROWS * ((size_t)big / QK));
    return PyCapsule_New(L, "garagelm.layer", layer_free);
}

/* Products of M input rows; each row's outputs side by side (a fused product is one of them). */
static void products(const prod_t *p, int n, const float *x, float *y, int M, int K, float *xs, const xq_t *i8) {
    int ldy = 0;
    for (int i = 0; i < n; i++) ldy += p[i].N;
    for (int i = 0; i < n; i++) {
        packed_product(p[i].kind, p[i].q, p[i].d, p[i].m, x, y, M, p[i].N, K, ldy, xs, i8);
        y += p[i].N;
    }
}

/* One layer for M rows (the GIL released by the caller). */
static void layer_step(const layer_t *L, int index, float *x, int M, const int64_t *table, const float *cs,
                       const float *sn, int exact) {
    const int D = L->D, H = L->H, Hkv = L->Hkv, hd = L->hd, I = L->I, half = hd / 2;
    const size_t n_qkv = (size_t)(H + 2 * Hkv) * hd;
    const xq_t *i8 = exact ? NULL : &L->i8; /* exact: float32 products */
    att_req_t rq[MAX_ROWS];
    for (int r = 0; r < M; r++) rmsnorm(x + (size_t)r * D, L->w_in, L->xn + (size_t)r * D, D, L->eps);
    products(L->qkv, L->n_qkv, L->xn, L->qkv_out, M, D, L->xs, i8);
    for (int r = 0; r < M; r++) {
        float *row = L->qkv_out + r * n_qkv;
        const float *c = cs + (size_t)r * hd, *sg = sn + (size_t)r * hd;
        /* rotate-half RoPE on the q and k heads: x*cos + roll(x, hd/2)*sin_signed */
        float rot[ATT_MAX_HD];
        for (int h = 0; h < H + Hkv; h++) {
            float *v = row + (size_t)h * hd;
            const float *wn = h < H ? L->w_qn : L->w_kn;
            if (wn) rmsnorm(v, wn, v, hd, L->eps); /* QK-norm (in place: the sum is taken first) */
            /* the two halves apart (no modulo), so the loops vectorize; the same operations */
            for (int i = 0; i < half; i++) rot[i] = v[i] * c[i] + v[i + half] * sg[i];
            for (int i = half; i < hd; i++) rot[i] = v[i] * c[i] + v[i - half] * sg[i];
            memcpy(v, rot, sizeof(float) * hd);
        }
        const long capacity = (long)table[2 * M + r], pos = (long)table[3 * M + r], stride_h = capacity * hd;
        const size_t layer_at = (size_t)index * Hkv * stride_h;
        uint16_t *ks = table[4 * M + r] ? (uint16_t *)(uintptr_t)table[4 * M + r] + layer_at / QK : NULL;
        uint16_t *vs = table[5 * M + r] ? (uint16_t *)(uintptr_t)table[5 * M + r] + layer_at / QK : NULL;
        const size_t esz = ks ? 1 : 2;
        uint8_t *kc = (uint8_t *)(uintptr_t)table[r] + layer_at * esz;
        uint8_t *vc = (uint8_t *)(uintptr_t)table[M + r] + layer_at * esz;
        for (int g = 0; g < Hkv; g++) { /* keys and values into the cache at pos */
            const size_t at = (size_t)g * stride_h;
            const float *kr = row + (size_t)(H + g) * hd, *vr = row + (size_t)(H + Hkv + g) * hd;
            if (ks) {
                store_q8_0(kr, vr, kc + at, (int8_t *)vc + at, ks + at / QK, vs + at / QK, pos, hd);
            } else {
                uint16_t *kd = (uint16_t *)kc + at + pos * hd, *vd = (uint16_t *)vc + at + pos * hd;
                for (int i = 0; i < hd; i += 16) { /* f16, rounded to nearest even, 16 at a time */
                    _mm256_storeu_si256((__m256i *)(kd + i), _mm512_cvtps_ph(_mm512_loadu_ps(kr + i), _MM_FROUND_TO_NEAREST_INT));
                    _mm256_storeu_si256((__m256i *)(vd + i), _mm512_cvtps_ph(_mm512_loadu_ps(vr + i), _MM_FROUND_TO_NEAREST_INT));
                }
            }
        }
        /* a sliding layer attends to the last `window` positions only */
        const long first = L->window && pos + 1 > L->window ? pos + 1 - L->window : 0;
        rq[r] = (att_req_t){row, kc, vc, ks, vs, L->att + (size_t)r * H * hd, stride_h, (int)first, (int)(pos + 1)};
    }
    /* Every row's keys and values are stored before any row attends: a row of a later position of
     * the same sequence (a prompt taken through the step) reads them, and a row never reads a
     * position past its own. */
    pthread_mutex_lock(&g_call);
    attend_rows(rq, M, H, Hkv, hd, L->scale);
    pthread_mutex_unlock(&g_call);
    products(&L->o, 1, L->att, L->tmp, M, H * hd, L->xs, i8);
    if (L->w_post_attn)
        for (int r = 0; r < M; r++) rmsnorm(L->tmp + (size_t)r * D, L->w_post_attn, L->tmp + (size_t)r * D, D, L->eps);
    for (size_t i = 0; i < (size_t)M * D; i++) x[i] += L->tmp[i];
    for (int r = 0; r < M; r++) rmsnorm(x + (size_t)r * D, L->w_post, L->xn + (size_t)r * D, D, L->eps);
    products(L->gu, L->n_gu, L->xn, L->gu_out, M, D, L->xs, i8);
    for (int r = 0; r < M; r++) /* packed to rows of I in place (row r's write lands only on rows
                                 * already read) for the down product */
        act_mul(L->gu_out + (size_t)r * 2 * I, L->gu_out + (size_t)r * I, I, L->gelu);
    products(&L->down, 1, L->gu_out, L->tmp, M, I, L->xs, i8);
    if (L->w_post_ffn)
        for (int r = 0; r < M; r++) rmsnorm(L->tmp + (size_t)r * D, L->w_post_ffn, L->tmp + (size_t)r * D, D, L->eps);
    for (size_t i = 0; i < (size_t)M * D; i++) x[i] += L->tmp[i];
}

/* decode_layers(layers, x, M, table, ropes[, exact]): one token for each of M sequences through
 * every layer (capsules from make_layer), layer i with ropes[i] = (cos, sin_signed), each (M, hd).
 * x is (M, D) float32, updated in place; table is int64 [6][M]: each sequence's key and value
 * cache base pointers ((layers, Hkv, capacity, hd), f16 or int8), its capacity, its position,
 * and its key and value scale pointers (q8_0: f16, one per 32 values; 0 for an f16 cache). The
 * weights are read once for all M rows. One call a step: the GIL is let go once, not once a
 * layer (a server's event loop holding it made each layer wait to return). */
#define MAX_LAYERS 512
static PyObject *py_decode_layers(PyObject *self, PyObject *args) {
    PyObject *layers, *ropes;
    unsigned long long xp, tp;
    int M, exact = 0;
    if (!PyArg_ParseTuple(args, "O!KiKO!|p", &PyTuple_Type, &layers, &xp, &M, &tp, &PyTuple_Type, &ropes, &exact))
        return NULL;
    const Py_ssize_t n = PyTuple_GET_SIZE(layers);
    if (n > MAX_LAYERS || PyTuple_GET_SIZE(ropes) != n)
        return PyErr_Format(PyExc_ValueError, "need one (cos, sin) per layer and at most %d layers", MAX_LAYERS);
    if (M < 1 || M > MAX_ROWS) return PyErr_Format(PyExc_ValueError, "rows must be 1..%d, got %d", MAX_ROWS, M);
    const layer_t *Ls[MAX_LAYERS];
    const float *cs[MAX_LAYERS], *sn[MAX_LAYERS];
    for (Py_ssize_t i = 0; i < n; i++) {
        Ls[i] = PyCapsule_GetPointer(PyTuple_GET_ITEM(layers, i), "garagelm.layer");
        if (!Ls[i]) return NULL;
        unsigned long long cp, sp;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(ropes, i), "KK", &cp, &sp)) return NULL;
        cs[i] = (const float *)(uintptr_t)cp, sn[i] = (const float *)(uintptr_t)sp;
    }
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t i = 0; i < n; i++)
        layer_step(Ls[i], (int)i, (float *)(uintptr_t)xp, M, (const int64_t *)(uintptr_t)tp, cs[i], sn[i], exact);
    Py_END_ALLOW_THREADS;
    return kernel_result();
}
#endif

static PyObject *py_set_threads(PyObject *self, PyObject *args) {
    int n;
    if (!PyArg_ParseTuple(args, "i", &n)) return NULL;
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    /* never while a call runs (another Python thread's decode step has let go of the GIL): the
     * pool's split and attention's part buffers are sized from g_threads */
    Py_BEGIN_ALLOW_THREADS;
    pthread_mutex_lock(&g_call);
    ensure_pool(n);
    g_threads = n <= g_started + 1 ? n : g_started + 1;
    pthread_mutex_unlock(&g_call);
    Py_END_ALLOW_THREADS;
    return PyLong_FromLong(g_threads);
}

/* split_blocks(src, n_blocks, block_bytes, head_bytes, q, d, m): GGML blocks that start with an
 * f16 scale (and, head_bytes 4, an f16 min) then their values (Q4_0, Q4_1, Q8_0) into the packed
 * arrays in one pass: values to q, scales to d, mins to m (0: none). Loading a model does this to
 * every such weight (a 262k-row embedding is 178 MB), at memory speed rather than through three
 * strided tensor copies. */
static PyObject *py_split_blocks(PyObject *self, PyObject *args) {
    unsigned long long src, q, d, m;
    long long n;
    int bb, head;
    if (!PyArg_ParseTuple(args, "KLiiKKK", &src, &n, &bb, &head, &q, &d, &m)) return NULL;
    if (n < 0 || (head != 2 && head != 4) || bb <= head || (head == 4 && !m))
        return PyErr_Format(PyExc_ValueError, "bad block split: n=%lld block=%d head=%d", n, bb, head);
    const uint8_t *s = (const uint8_t *)(uintptr_t)src;
    uint8_t *qv = (uint8_t *)(uintptr_t)q;
    uint16_t *dv = (uint16_t *)(uintptr_t)d, *mv = (uint16_t *)(uintptr_t)m;
    const size_t vb = (size_t)(bb - head);
    Py_BEGIN_ALLOW_THREADS;
    for (long long i = 0; i < n; i++, s += bb) {
        memcpy(dv + i, s, 2);
        if (head == 4) memcpy(mv + i, s + 2, 2);
        memcpy(qv + (size_t)i * vb, s + head, vb);
    }
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

/* The 6-bit scale and min of sub-block i (0..7) of a Q4_K/Q5_K block's 12 scale bytes. */
static inline void k_scale_min(const uint8_t *sc, int i, int *scale, int *min) {
    if (i < 4) {
        *scale = sc[i] & 63;
        *min = sc[i + 4] & 63;
    } else {
        *scale = (sc[i + 4] & 0x0F) | ((sc[i - 4] >> 2) & 0x30);
        *min = (sc[i + 4] >> 4) | ((sc[i] >> 2) & 0x30);
    }
}

/* split_kquant(kind, src, n_blocks, q, scale, added): Q4_K (kind 0), Q5_K (1) or Q6_K (2) blocks
 * into the packed arrays, as ggml_linear._pack made them through torch (the same bits): per
 * 32 values (Q6_K: 16) a float32 scale = d * sub-scale and, for Q4_K/Q5_K, added = -(dmin *
 * sub-min); Q4_K's values two to a byte (values i and i + 16 of each 32), Q5_K's (0..31) and
 * Q6_K's (-32..31) one int8 each. One pass instead of a dozen tensor ops per weight. */
static PyObject *py_split_kquant(PyObject *self, PyObject *args) {
    unsigned long long src, q, sc, ad;
    long long n;
    int kind;
    if (!PyArg_ParseTuple(args, "iKLKKK", &kind, &src, &n, &q, &sc, &ad)) return NULL;
    if (kind < 0 || kind > 2 || n < 0 || (kind < 2 && !ad))
        return PyErr_Format(PyExc_ValueError, "bad K-quant split: kind=%d n=%lld", kind, n);
    static const int block_bytes[3] = {144, 176, 210};
    const uint8_t *b = (const uint8_t *)(uintptr_t)src;
    uint8_t *qo = (uint8_t *)(uintptr_t)q;
    float *so = (float *)(uintptr_t)sc, *ao = (float *)(uintptr_t)ad;
    Py_BEGIN_ALLOW_THREADS;
    for (long long i = 0; i < n; i++, b += block_bytes[kind]) {
        if (kind == 2) { /* Q6_K: ql[128] qh[64] scales[16] (int8) d */
            const uint8_t *ql = b, *qh = b + 128;
            uint16_t dh;
            memcpy(&dh, b + 208, 2);
            const float d = f16_to_f32(dh);
            for (int j = 0; j < 16; j++) so[i * 16 + j] = d * (float)(int8_t)b[192 + j];
            int8_t *out = (int8_t *)qo + i * 256;
            for (int v = 0; v < 256; v++) {
                const int g = v / 128, r = v % 128, t = r % 32, plane = r / 32;
                const int low = r < 64 ? ql[64 * g + r] & 0x0F : ql[64 * g + r - 64] >> 4;
                const int high = (qh[32 * g + t] >> (2 * plane)) & 3;
                out[v] = (int8_t)((low | (high << 4)) - 32);
            }
            continue;
        }
        uint16_t dh, mh;
        memcpy(&dh, b, 2);
        memcpy(&mh, b + 2, 2);
        const float d = f16_to_f32(dh), dmin = f16_to_f32(mh);
        for (int j = 0; j < 8; j++) {
            int scale, min;
            k_scale_min(b + 4, j, &scale, &min);
            so[i * 8 + j] = d * (float)scale;
            ao[i * 8 + j] = -(dmin * (float)min);
        }
        if (kind == 0) { /* Q4_K: qs[128], 32 bytes per 64 values: low nibbles then high */
            const uint8_t *qs = b + 16;
            uint8_t *out = qo + i * 128;
            for (int g = 0; g < 4; g++)
                for (int k = 0; k < 16; k++) {
                    const uint8_t a = qs[32 * g + k], c = qs[32 * g + k + 16];
                    out[32 * g + k] = (uint8_t)((a & 0x0F) | (c << 4));     /* sub-block 2g */
                    out[32 * g + 16 + k] = (uint8_t)((a >> 4) | (c & 0xF0)); /* sub-block 2g + 1 */
                }
        } else { /* Q5_K: qh[32] (bit j: sub-block j's fifth bits), qs[128] as Q4_K's */
            const uint8_t *qh = b + 16, *qs = b + 48;
            int8_t *out = (int8_t *)qo + i * 256;
            for (int v = 0; v < 256; v++) {
                const int g = v / 64, r = v % 64, t = r % 32, sub = v / 32;
                const int low = r < 32 ? qs[32 * g + t] & 0x0F : qs[32 * g + t] >> 4;
                out[v] = (int8_t)(low | (((qh[t] >> sub) & 1) << 4));
            }
        }
    }
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

/* split_q5(src, n_blocks, has_min, q, d, m): Q5_0 (d, qh[4], qs[16]) or Q5_1 (d, m, qh, qs)
 * blocks into q (per block the 16 nibble bytes, then the 4 bytes of fifth bits), d and m (f16). */
static PyObject *py_split_q5(PyObject *self, PyObject *args) {
    unsigned long long src, q, d, m;
    long long n;
    int has_min;
    if (!PyArg_ParseTuple(args, "KLpKKK", &src, &n, &has_min, &q, &d, &m)) return NULL;
    if (n < 0 || (has_min && !m)) return PyErr_Format(PyExc_ValueError, "bad Q5 split: n=%lld", n);
    const int head = has_min ? 4 : 2, bb = head + 20;
    const uint8_t *b = (const uint8_t *)(uintptr_t)src;
    uint8_t *qo = (uint8_t *)(uintptr_t)q;
    uint16_t *dv = (uint16_t *)(uintptr_t)d, *mv = (uint16_t *)(uintptr_t)m;
    Py_BEGIN_ALLOW_THREADS;
    for (long long i = 0; i < n; i++, b += bb) {
        memcpy(dv + i, b, 2);
        if (has_min) memcpy(mv + i, b + 2, 2);
        memcpy(qo + i * 20, b + head + 4, 16);
        memcpy(qo + i * 20 + 16, b + head, 4);
    }
    Py_END_ALLOW_THREADS;
    Py_RETURN_NONE;
}

/* gguf_strings(buffer, pos, count) -> (list of str, end) or None: a GGUF string array (each a
 * u64 length then UTF-8 bytes, undecodable bytes replaced), None if it runs past the buffer.
 * Vocabularies hold up to 262k of them: a Python loop took 0.3 s of a model's load. */
static PyObject *py_gguf_strings(PyObject *self, PyObject *args) {
    PyObject *obj;
    Py_ssize_t pos, count;
    if (!PyArg_ParseTuple(args, "Onn", &obj, &pos, &count)) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) return NULL;
    const uint8_t *buf = view.buf;
    const Py_ssize_t end = view.len;
    PyObject *out = pos >= 0 && count >= 0 && count <= end ? PyList_New(count) : NULL;
    if (!out) {
        PyBuffer_Release(&view);
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        uint64_t n;
        if (pos > end - 8) goto truncated;
        memcpy(&n, buf + pos, 8);
        pos += 8;
        if (n > (uint64_t)(end - pos)) goto truncated;
        PyObject *str = PyUnicode_DecodeUTF8((const char *)buf + pos, (Py_ssize_t)n, "replace");
        if (!str) {
            Py_DECREF(out);
            PyBuffer_Release(&view);
            return NULL;
        }
        PyList_SET_ITEM(out, i, str);
        pos += (Py_ssize_t)n;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("(Nn)", out, pos);
truncated:
    Py_DECREF(out);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"matmul_packed", py_matmul_packed, METH_VARARGS, "matmul_packed(kind, q, d, m, x, y, M, N, K)"},
    {"dequantize_packed", py_dequantize_packed, METH_VARARGS, "dequantize_packed(kind, q, d, m, out, N, K)"},
#ifdef HAVE_AVX512
    {"dequantize_packed_bf16", py_dequantize_packed_bf16, METH_VARARGS, "dequantize_packed_bf16(kind, q, d, m, out, N, K)"},
    {"attend", py_attend, METH_VARARGS, "attend(q, k, v, ks, vs, out, stride_h, H, Hkv, S, hd, scale[, first])"},
    {"make_layer", py_make_layer, METH_VARARGS, "make_layer(D, H, Hkv, hd, I, eps, scale, w_in, w_post, qkv, o, gu, down[, w_qn, w_kn, w_post_attn, w_post_ffn, gelu, window])"},
    {"decode_layers", py_decode_layers, METH_VARARGS, "decode_layers(layers, x, M, table, ropes[, exact])"},
    {"rmsnorm_rows", py_rmsnorm_rows, METH_VARARGS, "rmsnorm_rows(x, w, out, rows, n, eps)"},
    {"gated_act", py_gated_act, METH_VARARGS, "gated_act(gate_up, out, rows, I, gelu)"},
#endif
    {"set_threads", py_set_threads, METH_VARARGS, "set_threads(n) -> threads used"},
    {"gguf_strings", py_gguf_strings, METH_VARARGS, "gguf_strings(buffer, pos, count) -> (strings, end) or None"},
    {"split_blocks", py_split_blocks, METH_VARARGS, "split_blocks(src, n_blocks, block_bytes, head_bytes, q, d, m)"},
    {"split_kquant", py_split_kquant, METH_VARARGS, "split_kquant(kind, src, n_blocks, q, scale, added)"},
    {"split_q5", py_split_q5, METH_VARARGS, "split_q5(src, n_blocks, has_min, q, d, m)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
    PyObject *m = PyModule_Create(&module);
#if defined(HAVE_AVX512) && defined(__AVX512BITALG__)
    const int q5 = 1;
#else
    const int q5 = 0;
#endif
    /* whether Q5_0/Q5_1 products take int8 activations in this build */
    if (m && PyModule_AddIntConstant(m, "INT8_Q5", q5) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
