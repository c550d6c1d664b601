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
#include "kernels/core.h"

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
    const long groups = j->M > MAX_ROWS ? (j->M + MAX_ROWS - 1) / MAX_ROWS : 1;
    if (g_threads <= 1 || (long)j->N * j->K * groups < 65536) { /* too small to be worth a handoff */
        j->rows(j, 0, j->N);
        return;
    }
    pthread_mutex_lock(&g_call);
    dispatch(j);
    pthread_mutex_unlock(&g_call);
}

/* ---- products ------------------------------------------------------------------------------
 * The packed layout is in kernels/core.h. Each variant brings its float products (rows_packed_*,
 * rows_float_*) and its int8-activation products (rows_int8, quantize_x). */
#if defined(HAVE_AVX512)
#include "kernels/rows_avx512.h"
#include "kernels/int8_avx512.h"
#include "kernels/int8.h" /* rows_int8_generic, for int8_reference */
#define rows_packed rows_packed_avx512
#define rows_float rows_float_avx512
#else
#include "kernels/vec16.h"
#include "kernels/int8.h"
#define rows_packed rows_packed_v16
#define rows_float rows_float_v16
#if defined(HAVE_AVX2)
#define quantize_x quantize_x_avx2
#else
#define quantize_x quantize_x_portable
#endif
#endif


/* Set by int8_reference(True): int8 products take the one-row-at-a-time plain C loop, which
 * every variant's vector kernel must equal bit for bit (the tests compare them). */
static int g_int8_reference;

/* Any number of rows of x (prefill), 8 at a time through the int8 kernel, every group over the
 * same weight rows n0..n1 while they are in cache: the same bits per row as a decode step's. */
static void rows_int8_many(const job_t *j, int n0, int n1) {
    const int nb = j->K / QK;
    float *sct = j->inner == rows_int8_generic ? NULL : int8_scales_all(j, n0, n1);
    for (int r0 = 0; r0 < j->M; r0 += MAX_ROWS) {
        job_t g = *j;
        g.rows = j->inner;
        g.sct = sct;
        g.M = j->M - r0 < MAX_ROWS ? j->M - r0 : MAX_ROWS;
        g.xq += (size_t)r0 * j->K, g.xd += (size_t)r0 * nb, g.xqs += (size_t)r0 * nb, g.xds += (size_t)r0 * nb;
        g.y += (size_t)r0 * j->ldy;
        j->inner(&g, n0, n1);
    }
    free(sct);
}

/* y = x @ W.T for packed W; xs: scratch of M * (K/32 rounded up to 16) floats; i8: scratch for
 * int8 activations (NULL: float32 products, `exact`). */
static void packed_product(int kind, const uint8_t *q, const uint16_t *d, const uint16_t *m, const float *x, float *y,
                           int M, int N, int K, int ldy, float *xs, const xq_t *i8) {
    const int nb = K / QK, nb16 = (nb + 15) & ~15;
    if (i8 && !IS_FLOAT(kind)) { /* every quantized kind has integer products */
        quantize_x(x, M, K, i8->q, i8->d, i8->s, i8->ds);
        job_t j = {kind, M, N, K, ldy, q, x, y, d, m, NULL, rows_int8, i8->q, i8->d, i8->s};
        j.xds = i8->ds;
        if (g_int8_reference) j.rows = rows_int8_generic;
        if (M > MAX_ROWS) { /* prefill: the pool splits weight rows, each thread takes every group */
            j.inner = j.rows;
            j.rows = rows_int8_many;
        }
        matmul(&j);
        return;
    }
    if (IS_FLOAT(kind)) {
        job_t j = {kind, M, N, K, ldy, q, x, y, NULL, NULL, NULL, rows_float};
        matmul(&j);
        return;
    }
    for (int r = 0; r < M; r++)
        for (int b = 0; b < nb16; b++) {
            float s = 0.0f;
            for (int i = 0; b < nb && i < QK; i++) s += x[(size_t)r * K + b * QK + i];
            xs[r * nb16 + b] = s; /* rows padded to a multiple of 16 blocks with zeros */
        }
    job_t j = {kind, M, N, K, ldy, q, x, y, d, m, xs, rows_packed};
    matmul(&j);
}

/* matmul_packed(kind, q, d, m, x, y, M, N, K[, int8_x]): int8_x quantizes x to q8_0 (any number
 * of rows then: prefill on CPUs without bf16 dot products) for the
 * kinds that have integer products (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K), as decode does outside `exact`. */
static PyObject *py_matmul_packed(PyObject *self, PyObject *args) {
    int kind, M, N, K, int8_x = 0;
    unsigned long long q, d, m, x, y;
    if (!PyArg_ParseTuple(args, "iKKKKKiii|p", &kind, &q, &d, &m, &x, &y, &M, &N, &K, &int8_x)) return NULL;
    if (kind < 0 || kind > LAST_KIND) return PyErr_Format(PyExc_ValueError, "unknown packed kind %d", kind);
    if (M < 1 || (M > MAX_ROWS && !(int8_x && !IS_FLOAT(kind))))
        return PyErr_Format(PyExc_ValueError, "rows must be 1..%d (more with int8_x, for quantized kinds), got %d", MAX_ROWS, M);
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

static void dequant_row(const job_t *j, long n, float *out);

/* Packed -> float32 with the dequantizer's exact arithmetic (bit-equal to gguf-py). */
static void dequant_packed_rows(const job_t *j, int n0, int n1) {
    const int K = j->K, kind = j->qtype;
    if (IS_FLOAT(kind)) {
        for (size_t i = (size_t)n0 * K; i < (size_t)n1 * K; i++) j->y[i] = float_at(j->w, kind, i);
        return;
    }
    for (long n = n0; n < n1; n++) dequant_row(j, n, j->y + (size_t)n * K);
}

/* Row n of a packed weight, dequantized into out (K values). */
static void dequant_row(const job_t *j, long n, float *out) {
    const int K = j->K, nb = K / QK, kind = j->qtype;
    for (int b = 0; b < nb; b++) {
            float *o = out + (size_t)b * QK;
            float db, mb;
            if (kind == P_I8 || kind == P_I8_16) { /* scale * q + (-min), the dequantizer's scale * q - min */
                const int8_t *qq = (const int8_t *)j->w + (size_t)n * K + (size_t)b * QK;
                kscales_block(kind, j->d, (size_t)n, nb, b, &db, &mb); /* Q6_K: mb the 2nd half's scale */
                for (int i = 0; i < QK; i++) {
                    float v = (kind == P_I8_16 && i >= 16 ? mb : db) * (float)qq[i];
                    o[i] = kind == P_I8 ? v + mb : v;
                }
                continue;
            }
            if (kind == P_Q4_F32) { /* scale * q + (-min) */
                kscales_block(kind, j->d, (size_t)n, nb, b, &db, &mb);
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
        float s0, s1; /* the block's scale and added min; Q6_K: its two halves' scales */
        kscales_block(kind, j->d, (size_t)n, nb, b, &s0, &s1);
        v0 = _mm512_mul_ps(_mm512_set1_ps(s0), v0);
        v1 = _mm512_mul_ps(_mm512_set1_ps(kind == P_I8_16 ? s1 : s0), v1);
        if (kind == P_I8 || kind == P_Q4_F32) {
            const __m512 mn = _mm512_set1_ps(s1);
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
#define dequant_packed_rows_fast dequant_packed_rows_avx512
#define dequant_packed_rows_bf16 dequant_packed_rows_bf16_avx512
#else
/* Each row dequantized to float32 in scratch, then rounded to bf16 (the same values). */
static void dequant_packed_rows_bf16_v16(const job_t *j, int n0, int n1) {
    float *row = thread_scratch(0, (size_t)j->K);
    if (!row) {
        atomic_store(&g_nomem, 1);
        return;
    }
    for (long n = n0; n < n1; n++) {
        dequant_row(j, n, row);
        for (int k = 0; k < j->K; k += 16) v16_to_bf16((uint16_t *)j->y + (size_t)n * j->K + k, v16_load(row + k));
    }
}
#define dequant_packed_rows_fast dequant_packed_rows
#define dequant_packed_rows_bf16 dequant_packed_rows_bf16_v16
#endif

static PyObject *py_dequantize_packed(PyObject *self, PyObject *args) {
    int kind, N, K;
    unsigned long long q, d, m, out;
    if (!PyArg_ParseTuple(args, "iKKKKii", &kind, &q, &d, &m, &out, &N, &K)) return NULL;
    if (kind < 0 || kind > LAST_KIND || K % QK || N < 1) return PyErr_Format(PyExc_ValueError, "bad kind %d, N %d or K %d", kind, N, K);
    job_t j = {kind, 1, N, K, N, (const uint8_t *)(uintptr_t)q, NULL, (float *)(uintptr_t)out,
               (const uint16_t *)(uintptr_t)d, (const uint16_t *)(uintptr_t)m, NULL, dequant_packed_rows_fast};
    Py_BEGIN_ALLOW_THREADS matmul(&j); /* the pool splits rows; nothing here is a product */
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *py_dequantize_packed_bf16(PyObject *self, PyObject *args) {
    int kind, N, K;
    unsigned long long q, d, m, out;
    if (!PyArg_ParseTuple(args, "iKKKKii", &kind, &q, &d, &m, &out, &N, &K)) return NULL;
    if (kind < 0 || kind > LAST_KIND || IS_FLOAT(kind) || K % QK || N < 1) return PyErr_Format(PyExc_ValueError, "bad kind %d, N %d or K %d", kind, N, K);
    job_t j = {kind, 1, N, K, N, (const uint8_t *)(uintptr_t)q, NULL, (float *)(uintptr_t)out,
               (const uint16_t *)(uintptr_t)d, (const uint16_t *)(uintptr_t)m, NULL, dequant_packed_rows_bf16};
    Py_BEGIN_ALLOW_THREADS matmul(&j);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}



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
#include "kernels/attention.h"

#if defined(HAVE_AVX512)
#include "kernels/attention_avx512.h"

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
#else
#include "kernels/attention_v16.h"

static void att_run(const att_t *a, int u0, int u1) {
    if (a->ks)
        att_q8_v16(a, u0, u1);
    else
        att_rows_v16(a, u0, u1);
}
#endif

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
        if (q8) att_quantize_query(x->q, H, hd, scale, qq[r], qd[r], qc[r]);
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

#if defined(HAVE_AVX512)
#include "kernels/elementwise_avx512.h"
#endif

/* ---- prefill helpers: RMSNorm and the gated activation over many rows, split over the pool.
 * torch's own elementwise kernels in this build are AVX2 and run ~10x below memory speed on
 * (512, 640) tensors; these are the decode step's loops, row-parallel. job: N rows of K values,
 * x in, y out, w the norm weight (or NULL), xsum points at eps, qtype the GELU flag. */
static void rmsnorm_rows_job(const job_t *j, int n0, int n1) {
    const float eps = *j->xsum;
    for (long r = n0; r < n1; r++)
        rmsnorm_row(j->x + (size_t)r * j->K, (const float *)j->w, j->y + (size_t)r * j->K, j->K, eps);
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
    const float *b_qkv; /* Qwen2's q/k/v biases, (H + 2 Hkv) hd, added to the products; NULL: none */
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
    unsigned long long w_in, w_post, w_qn = 0, w_kn = 0, w_pa = 0, w_pf = 0, b_qkv = 0;
    PyObject *qkv, *o, *gu, *down;
    if (!PyArg_ParseTuple(args, "iiiiiffKKOOOO|KKKKiiK", &L->D, &L->H, &L->Hkv, &L->hd, &L->I, &L->eps, &L->scale,
                          &w_in, &w_post, &qkv, &o, &gu, &down, &w_qn, &w_kn, &w_pa, &w_pf, &L->gelu, &L->window,
                          &b_qkv) ||
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
    L->b_qkv = (const float *)(uintptr_t)b_qkv;
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
        if (L->b_qkv) /* one float32 add a value, as the layer's torch path adds its bias */
            for (size_t i = 0; i < n_qkv; i++) row[i] += L->b_qkv[i];
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
                store_f16_row((uint16_t *)kc + at + pos * hd, kr, hd);
                store_f16_row((uint16_t *)vc + at + pos * hd, vr, hd);
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

/* split_kquant(kind, src, n_rows, per_row, q, scales): Q4_K (kind 0), Q5_K (1) or Q6_K (2)
 * blocks, per_row super-blocks a row, into the packed arrays: Q4_K's values two to a byte
 * (values i and i + 16 of each 32), Q5_K's (0..31) and Q6_K's (-32..31) one int8 each, and each
 * row's scales as KSCALES (core.h) lays them out: d (and dmin) as float32, the 6-bit (Q6_K 8-bit)
 * sub-block scales (and mins) as bytes. One pass instead of a dozen tensor ops per weight. */
static PyObject *py_split_kquant(PyObject *self, PyObject *args) {
    unsigned long long src, q, sc;
    long long rows;
    int kind, per_row;
    if (!PyArg_ParseTuple(args, "iKLiKK", &kind, &src, &rows, &per_row, &q, &sc)) return NULL;
    if (kind < 0 || kind > 2 || rows < 0 || per_row < 1 || per_row > MAX_BLOCKS / 8)
        return PyErr_Format(PyExc_ValueError, "bad K-quant split: kind=%d rows=%lld per_row=%d", kind, rows, per_row);
    static const int block_bytes[3] = {144, 176, 210};
    const int pk = kind == 0 ? P_Q4_F32 : kind == 1 ? P_I8 : P_I8_16, nb = 8 * per_row;
    const size_t srow = KROW_BYTES(pk, nb);
    const uint8_t *b = (const uint8_t *)(uintptr_t)src;
    uint8_t *qo = (uint8_t *)(uintptr_t)q;
    const long long n = rows * per_row;
    Py_BEGIN_ALLOW_THREADS;
    for (long long i = 0; i < n; i++, b += block_bytes[kind]) {
        uint8_t *row = (uint8_t *)(uintptr_t)sc + (size_t)(i / per_row) * srow;
        const int s = (int)(i % per_row); /* the super-block within its row */
        if (kind == 2) { /* Q6_K: ql[128] qh[64] scales[16] (int8) d */
            const uint8_t *ql = b, *qh = b + 128;
            uint16_t dh;
            memcpy(&dh, b + 208, 2);
            const float d = f16_to_f32(dh);
            memcpy(row + 4 * s, &d, 4);
            memcpy(row + 4 * per_row + 16 * s, b + 192, 16);
            int8_t *out = (int8_t *)qo + i * 256;
            for (int g = 0; g < 2; g++) /* per 128 values: 64 bytes of ql, 32 of qh, 4 planes of 32 */
                for (int t = 0; t < 32; t++) {
                    const int a = ql[64 * g + t], c = ql[64 * g + t + 32], h = qh[32 * g + t];
                    int8_t *o = out + 128 * g + t;
                    o[0] = (int8_t)(((a & 0x0F) | ((h & 3) << 4)) - 32);
                    o[32] = (int8_t)(((c & 0x0F) | (((h >> 2) & 3) << 4)) - 32);
                    o[64] = (int8_t)(((a >> 4) | (((h >> 4) & 3) << 4)) - 32);
                    o[96] = (int8_t)(((c >> 4) | (((h >> 6) & 3) << 4)) - 32);
                }
            continue;
        }
        uint16_t dh, mh;
        memcpy(&dh, b, 2);
        memcpy(&mh, b + 2, 2);
        const float d = f16_to_f32(dh), dmin = f16_to_f32(mh);
        memcpy(row + 4 * s, &d, 4);
        memcpy(row + 4 * per_row + 4 * s, &dmin, 4);
        for (int j = 0; j < 8; j++) {
            int scale, min;
            k_scale_min(b + 4, j, &scale, &min);
            row[8 * per_row + 8 * s + j] = (uint8_t)scale;
            row[8 * per_row + nb + 8 * s + j] = (uint8_t)min;
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
            for (int g = 0; g < 4; g++) /* per 64 values: sub-blocks 2g (low nibbles), 2g + 1 (high) */
                for (int t = 0; t < 32; t++) {
                    const int a = qs[32 * g + t], h = qh[t];
                    out[64 * g + t] = (int8_t)((a & 0x0F) | (((h >> (2 * g)) & 1) << 4));
                    out[64 * g + 32 + t] = (int8_t)((a >> 4) | (((h >> (2 * g + 1)) & 1) << 4));
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

/* ---- which instruction sets this CPU runs (the OS saving their registers included) ------------ */
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
static PyObject *py_cpu_features(PyObject *self, PyObject *noargs) {
    unsigned a, b, c, d, lo = 0, hi = 0;
    const char *names[16];
    int n = 0;
    if (__get_cpuid(1, &a, &b, &c, &d)) {
        if ((c >> 27) & 1) __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0)); /* OSXSAVE */
        const int ymm = (lo & 6) == 6, zmm = ymm && (lo & 0xE0) == 0xE0;
        if (ymm && ((c >> 28) & 1)) names[n++] = "avx";
        if (ymm && ((c >> 12) & 1)) names[n++] = "fma";
        if (ymm && ((c >> 29) & 1)) names[n++] = "f16c";
        if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
            if (ymm && ((b >> 5) & 1)) names[n++] = "avx2";
            if (zmm && ((b >> 16) & 1)) names[n++] = "avx512f";
            if (zmm && ((b >> 17) & 1)) names[n++] = "avx512dq";
            if (zmm && ((b >> 30) & 1)) names[n++] = "avx512bw";
            if (zmm && ((b >> 31) & 1)) names[n++] = "avx512vl";
            if (zmm && ((c >> 11) & 1)) names[n++] = "avx512vnni";
            if (zmm && ((c >> 12) & 1)) names[n++] = "avx512bitalg";
        }
        if (__get_cpuid_count(7, 1, &a, &b, &c, &d) && ymm && ((a >> 4) & 1)) names[n++] = "avxvnni";
    }
    (void)hi;
#elif defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
static PyObject *py_cpu_features(PyObject *self, PyObject *noargs) {
    const char *names[4];
    int n = 0;
    const unsigned long hw = getauxval(AT_HWCAP);
    if (hw & (1UL << 1)) names[n++] = "neon";    /* HWCAP_ASIMD */
    if (hw & (1UL << 20)) names[n++] = "dotprod"; /* HWCAP_ASIMDDP */
#elif defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
static PyObject *py_cpu_features(PyObject *self, PyObject *noargs) {
    const char *names[4];
    int n = 0, v = 0;
    size_t len = sizeof v;
    names[n++] = "neon";
    if (sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &len, NULL, 0) == 0 && v) names[n++] = "dotprod";
#else
static PyObject *py_cpu_features(PyObject *self, PyObject *noargs) {
    const char *names[1];
    int n = 0;
#endif
    (void)self, (void)noargs;
    PyObject *out = PyTuple_New(n);
    for (int i = 0; out && i < n; i++) PyTuple_SET_ITEM(out, i, PyUnicode_FromString(names[i]));
    return out;
}

static PyObject *py_int8_reference(PyObject *self, PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    g_int8_reference = on;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"matmul_packed", py_matmul_packed, METH_VARARGS, "matmul_packed(kind, q, d, m, x, y, M, N, K)"},
    {"dequantize_packed", py_dequantize_packed, METH_VARARGS, "dequantize_packed(kind, q, d, m, out, N, K)"},
    {"dequantize_packed_bf16", py_dequantize_packed_bf16, METH_VARARGS, "dequantize_packed_bf16(kind, q, d, m, out, N, K)"},
    {"attend", py_attend, METH_VARARGS, "attend(q, k, v, ks, vs, out, stride_h, H, Hkv, S, hd, scale[, first])"},
    {"make_layer", py_make_layer, METH_VARARGS, "make_layer(D, H, Hkv, hd, I, eps, scale, w_in, w_post, qkv, o, gu, down[, w_qn, w_kn, w_post_attn, w_post_ffn, gelu, window, b_qkv])"},
    {"decode_layers", py_decode_layers, METH_VARARGS, "decode_layers(layers, x, M, table, ropes[, exact])"},
    {"rmsnorm_rows", py_rmsnorm_rows, METH_VARARGS, "rmsnorm_rows(x, w, out, rows, n, eps)"},
    {"gated_act", py_gated_act, METH_VARARGS, "gated_act(gate_up, out, rows, I, gelu)"},
    {"cpu_features", py_cpu_features, METH_NOARGS, "cpu_features() -> names of the instruction sets this CPU and OS run"},
    {"int8_reference", py_int8_reference, METH_VARARGS, "int8_reference(on): int8 products by the plain C loop"},
    {"set_threads", py_set_threads, METH_VARARGS, "set_threads(n) -> threads used"},
    {"gguf_strings", py_gguf_strings, METH_VARARGS, "gguf_strings(buffer, pos, count) -> (strings, end) or None"},
    {"split_blocks", py_split_blocks, METH_VARARGS, "split_blocks(src, n_blocks, block_bytes, head_bytes, q, d, m)"},
    {"split_kquant", py_split_kquant, METH_VARARGS, "split_kquant(kind, src, n_rows, per_row, q, scales)"},
    {"split_q5", py_split_q5, METH_VARARGS, "split_q5(src, n_blocks, has_min, q, d, m)"},
    {NULL, NULL, 0, NULL},
};

#ifndef GARAGE_MODULE /* setup.py names each variant's module: _kernels_avx2, ... */
#define GARAGE_MODULE _kernels_generic
#endif
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define STR_(a) #a
#define STR(a) STR_(a)

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, STR(GARAGE_MODULE), NULL, -1, methods};

PyMODINIT_FUNC CAT(PyInit_, GARAGE_MODULE)(void) {
    PyObject *m = PyModule_Create(&module);
    /* INT8_Q5: Q5_0/Q5_1 products take int8 activations (every variant now); VARIANT: the
     * instruction sets this build was compiled for (see kernels/core.h) */
    if (m && (PyModule_AddIntConstant(m, "INT8_Q5", 1) < 0 || PyModule_AddStringConstant(m, "VARIANT", VARIANT_NAME) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
