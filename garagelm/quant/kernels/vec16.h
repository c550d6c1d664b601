/* The kernels of every variant but AVX-512 in one source: RMSNorm, the gated activations and
 * float products here, decode attention in attention_v16.h.
 *
 * They compute what the AVX-512 kernels compute, to the bit: the same float32 operations on the
 * same values in the same order. A GCC vector of 16 floats stands for one AVX-512 register (the
 * compiler maps it to two AVX2 registers, four SSE2 or four NEON ones); lane i accumulates what
 * lane i accumulates there, multiply-adds are fused (one rounding) on every CPU, and horizontal
 * sums follow the AVX-512 code's trees (v16_sum, v16_sum4x4). Why it matters: decode quantizes
 * activations to int8, so a 1-ulp difference anywhere upstream can move a value across a
 * rounding boundary and change the text. Equal bits keep greedy output the same on every CPU.
 * Included by _kernels.c.
 */
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));

static inline v16f v16_load(const float *p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void v16_store(float *p, v16f v) { memcpy(p, &v, sizeof v); }
static inline v16f v16_set1(float x) { return (v16f){0} + x; }

/* a * b + c rounded once, as vfmadd does */
static inline v16f v16_fma(v16f a, v16f b, v16f c) {
#if defined(HAVE_AVX2)
    __m256 A[2], B[2], C[2];
    memcpy(A, &a, 64), memcpy(B, &b, 64), memcpy(C, &c, 64);
    C[0] = _mm256_fmadd_ps(A[0], B[0], C[0]);
    C[1] = _mm256_fmadd_ps(A[1], B[1], C[1]);
    memcpy(&c, C, 64);
    return c;
#elif defined(HAVE_NEON)
    float32x4_t A[4], B[4], C[4];
    memcpy(A, &a, 64), memcpy(B, &b, 64), memcpy(C, &c, 64);
    for (int h = 0; h < 4; h++) C[h] = vfmaq_f32(C[h], A[h], B[h]);
    memcpy(&c, C, 64);
    return c;
#else
    for (int i = 0; i < 16; i++) c[i] = fmaf(a[i], b[i], c[i]);
    return c;
#endif
}
static inline v16f v16_max(v16f a, v16f b) {
    const v16i m = a > b;
    return (v16f)((m & (v16i)a) | (~m & (v16i)b));
}
static inline v16f v16_min(v16f a, v16f b) {
    const v16i m = a < b;
    return (v16f)((m & (v16i)a) | (~m & (v16i)b));
}
static inline float v16_hmax(v16f v) {
    float m = v[0];
    for (int i = 1; i < 16; i++) m = fmaxf(m, v[i]);
    return m;
}
/* _mm512_reduce_add_ps's tree: halves, then quarters, then pairs */
static inline float v16_sum(v16f v) {
    float t3[8], t6[4];
    for (int i = 0; i < 8; i++) t3[i] = v[i + 8] + v[i];
    for (int i = 0; i < 4; i++) t6[i] = t3[i + 4] + t3[i];
    return (t6[0] + t6[2]) + (t6[1] + t6[3]);
}
/* hsum16's tree for one vector (attention_avx512.h): per 128-bit lane L, S_L = (v[4L] + v[4L+2]) +
 * (v[4L+1] + v[4L+3]); then (S_0 + S_1) + (S_2 + S_3) */
static inline float v16_sum4x4(v16f v) {
    float s[4];
    for (int L = 0; L < 4; L++) s[L] = (v[4 * L] + v[4 * L + 2]) + (v[4 * L + 1] + v[4 * L + 3]);
    return (s[0] + s[1]) + (s[2] + s[3]);
}

/* 16 f16 values as float32 (exact), and back rounded to nearest even */
static inline v16f v16_from_f16(const uint16_t *p) {
#if defined(HAVE_AVX2)
    __m256 h[2] = {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)),
                   _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8)))};
    v16f v;
    memcpy(&v, h, 64);
    return v;
#elif defined(HAVE_NEON)
    float32x4_t h[4];
    for (int i = 0; i < 4; i++) h[i] = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p + 4 * i)));
    v16f v;
    memcpy(&v, h, 64);
    return v;
#else
    v16f v;
    for (int i = 0; i < 16; i++) v[i] = f16_to_f32(p[i]);
    return v;
#endif
}
/* lanes past n are 0 (a masked load) */
static inline v16f v16_from_f16_n(const uint16_t *p, int n) {
    uint16_t h[16] = {0};
    memcpy(h, p, sizeof(uint16_t) * n);
    return v16_from_f16(h);
}
static inline void v16_to_f16(uint16_t *p, v16f v) {
#if defined(HAVE_AVX2)
    __m256 h[2];
    memcpy(h, &v, 64);
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(h[0], _MM_FROUND_TO_NEAREST_INT));
    _mm_storeu_si128((__m128i *)(p + 8), _mm256_cvtps_ph(h[1], _MM_FROUND_TO_NEAREST_INT));
#else
    for (int i = 0; i < 16; i++) p[i] = f32_to_f16(v[i]);
#endif
}
static inline v16f v16_from_bf16(const uint16_t *p) {
    v16u u;
    for (int i = 0; i < 16; i++) u[i] = (uint32_t)p[i] << 16;
    return (v16f)u;
}
static inline void v16_to_bf16(uint16_t *p, v16f v) {
    const v16u u = (v16u)v, r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16; /* nearest even, as to_bf16 */
    for (int i = 0; i < 16; i++) p[i] = (uint16_t)r[i];
}

/* exp512's e^x: n = round(x log2 e), r = x - n ln 2 in two fused parts, e^r by its polynomial,
 * times 2^n, here in two exact halves (2^a 2^b) where exp512 has vscalefps. */
static inline v16f v16_exp(v16f x) {
    x = v16_min(v16_max(x, v16_set1(-87.33654f)), v16_set1(176.0f)); /* above 176 both give inf */
    const v16f t = x * 1.44269504088896341f;
    const v16f n = (t + 12582912.0f) - 12582912.0f; /* to nearest, ties to even: 1.5 * 2^23 */
    v16f r = v16_fma(n, v16_set1(-0.693359375f), x);
    r = v16_fma(n, v16_set1(2.12194440e-4f), r);
    v16f p = v16_set1(1.9875691500E-4f);
    p = v16_fma(p, r, v16_set1(1.3981999507E-3f));
    p = v16_fma(p, r, v16_set1(8.3334519073E-3f));
    p = v16_fma(p, r, v16_set1(4.1665795894E-2f));
    p = v16_fma(p, r, v16_set1(1.6666665459E-1f));
    p = v16_fma(p, r, v16_set1(5.0000001201E-1f));
    const v16f y = v16_fma(p * r, r, r + 1.0f);
    const v16i ni = __builtin_convertvector(n, v16i), a = ni / 2, b = ni - a;
    return y * (v16f)((a + 127) << 23) * (v16f)((b + 127) << 23);
}

/* acc + per lane the dot of its 4 unsigned bytes of w with the 4 signed bytes of x (vpdpbusd) */
static inline v16i dpbusd16(v16i acc, v16i w, int32_t x) {
#if defined(HAVE_AVXVNNI)
    __m256i A[2], W[2];
    memcpy(A, &acc, 64), memcpy(W, &w, 64);
    for (int h = 0; h < 2; h++) A[h] = _mm256_dpbusd_avx_epi32(A[h], W[h], _mm256_set1_epi32(x));
    memcpy(&acc, A, 64);
    return acc;
#elif defined(HAVE_AVX2) /* bytes widened to 16 bits, two exact madds */
    __m256i A[2], W[2];
    memcpy(A, &acc, 64), memcpy(W, &w, 64);
    const __m256i s = _mm256_set1_epi32(x), se = _mm256_srai_epi16(_mm256_slli_epi16(s, 8), 8);
    const __m256i so = _mm256_srai_epi16(s, 8);
    for (int h = 0; h < 2; h++) {
        const __m256i ue = _mm256_and_si256(W[h], _mm256_set1_epi16(0x00FF)), uo = _mm256_srli_epi16(W[h], 8);
        A[h] = _mm256_add_epi32(A[h], _mm256_add_epi32(_mm256_madd_epi16(ue, se), _mm256_madd_epi16(uo, so)));
    }
    memcpy(&acc, A, 64);
    return acc;
#elif defined(HAVE_NEON) /* sdot of the signed bytes (w - 128), then 128 * sum(x) back */
    int32_t xsum = 0;
    for (int e = 0; e < 4; e++) xsum += (int8_t)(x >> (8 * e));
    const int8x16_t xv = vreinterpretq_s8_s32(vdupq_n_s32(x));
    int32x4_t A[4], W[4];
    memcpy(A, &acc, 64), memcpy(W, &w, 64);
    for (int h = 0; h < 4; h++) {
        const int8x16_t ws = vreinterpretq_s8_u8(veorq_u8(vreinterpretq_u8_s32(W[h]), vdupq_n_u8(0x80)));
        A[h] = vaddq_s32(vdotq_s32(A[h], ws, xv), vdupq_n_s32(128 * xsum));
    }
    memcpy(&acc, A, 64);
    return acc;
#else
    for (int e = 0; e < 4; e++) acc += (v16i)(((v16u)w >> (8 * e)) & 0xFFu) * (int32_t)(int8_t)(x >> (8 * e));
    return acc;
#endif
}

/* ---- RMSNorm and the gated activations (elementwise_avx512.h's) ----------------------------- */
static inline v16f act16(v16f g, int gelu) {
    if (gelu) {
        const v16f u = v16_set1(0.7978845608028654f) * v16_fma(v16_set1(0.044715f) * g, g * g, g);
        return g / (1.0f + v16_exp(v16_min(v16_set1(-2.0f) * u, v16_set1(88.0f))));
    }
    return g / (1.0f + v16_exp(v16_set1(0.0f) - g));
}

static inline void act_mul(const float *gu, float *h, int I, int gelu) {
    for (int i = 0; i < I; i += 16) v16_store(h + i, act16(v16_load(gu + i), gelu) * v16_load(gu + I + i));
}

static inline void act_mul_bf16(const uint16_t *gu, uint16_t *h, int I, int gelu) {
    for (int i = 0; i < I; i += 16) v16_to_bf16(h + i, act16(v16_from_bf16(gu + i), gelu) * v16_from_bf16(gu + I + i));
}

static inline void rmsnorm_row(const float *x, const float *w, float *y, int n, float eps) {
    v16f acc = v16_set1(0.0f);
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const v16f v = v16_load(x + i);
        acc = v16_fma(v, v, acc);
    }
    float ss = v16_sum(acc);
    for (; i < n; i++) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (i = 0; i + 16 <= n; i += 16) v16_store(y + i, v16_load(x + i) * inv * v16_load(w + i));
    for (; i < n; i++) y[i] = x[i] * inv * w[i];
}

static inline void store_f16_row(uint16_t *dst, const float *src, int n) {
    for (int i = 0; i < n; i += 16) v16_to_f16(dst + i, v16_load(src + i));
}

/* ---- float products (rows_avx512.h's): exact mode, Q5_K/Q6_K and float weights -------------- */
/* The block's 32 values of row `row` as float32: lanes 0-15 and 16-31 (Q5_0 centred). */
static inline void block_values(const job_t *j, int n, int b, v16f *q0, v16f *q1) {
    const int kind = j->qtype;
    float qf[QK];
    if (BYTE_VALUES(kind)) {
        const int8_t *q = (const int8_t *)j->w + (size_t)n * j->K + (size_t)b * QK;
        for (int i = 0; i < QK; i++) qf[i] = (float)q[i];
    } else {
        const uint8_t *q = j->w + ROW_BYTES(kind, j->K) * n + (size_t)b * BLOCK_BYTES(kind);
        uint32_t qh = 0;
        if (IS_Q5(kind)) memcpy(&qh, q + 16, 4);
        const int c = kind == P_Q5_0 ? 16 : 0;
        for (int i = 0; i < 16; i++) {
            qf[i] = (float)((int)((q[i] & 0x0F) | (((qh >> i) & 1) << 4)) - c);
            qf[i + 16] = (float)((int)((q[i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) - c);
        }
    }
    *q0 = v16_load(qf), *q1 = v16_load(qf + 16);
}

static void rows_packed_v16(const job_t *j, int n0, int n1) {
    const int nb = j->K / QK, kind = j->qtype, nb16 = (nb + 15) & ~15, M = j->M;
    float d[2 * MAX_BLOCKS + 16], m[2 * MAX_BLOCKS + 16];
    for (int n = n0; n < n1; n++) {
        load_row_scales(j, n, d, m, nb);
        v16f acc[MAX_ROWS];
        for (int r = 0; r < M; r++) acc[r] = v16_set1(0.0f);
        for (int b = 0; b < nb; b++) {
            v16f q0, q1;
            block_values(j, n, b, &q0, &q1);
            for (int r = 0; r < M; r++) {
                const float *xr = j->x + (size_t)r * j->K + (size_t)b * QK;
                const v16f xa = v16_load(xr), xb = v16_load(xr + 16);
                if (kind == P_I8_16) { /* a scale per 16 values */
                    acc[r] = v16_fma(q0 * xa, v16_set1(d[2 * b]), acc[r]);
                    acc[r] = v16_fma(q1 * xb, v16_set1(d[2 * b + 1]), acc[r]);
                } else {
                    acc[r] = v16_fma(v16_fma(q1, xb, q0 * xa), v16_set1(d[b]), acc[r]);
                }
            }
        }
        for (int r = 0; r < M; r++) {
            if (HAS_MIN(kind)) { /* the min term, over blocks 16 at a time (padding lanes are zero) */
                const float *xs = j->xsum + (size_t)r * nb16;
                for (int b = 0; b < nb16; b += 16) acc[r] = v16_fma(v16_load(m + b), v16_load(xs + b), acc[r]);
            }
            j->y[(size_t)r * j->ldy + n] = v16_sum(acc[r]);
        }
    }
}

static inline v16f load_float16(const uint8_t *row, int kind, int k) {
    if (kind == P_F32) return v16_load((const float *)row + k);
    if (kind == P_F16) return v16_from_f16((const uint16_t *)row + k);
    return v16_from_bf16((const uint16_t *)row + k);
}

static void rows_float_v16(const job_t *j, int n0, int n1) {
    const int K = j->K, kind = j->qtype, M = j->M;
    const size_t row_bytes = (size_t)K * FLOAT_BYTES(kind);
    for (int n = n0; n < n1; n++) {
        const uint8_t *w = j->w + (size_t)n * row_bytes;
        v16f acc[MAX_ROWS];
        for (int r = 0; r < M; r++) acc[r] = v16_set1(0.0f);
        for (int k = 0; k < K; k += 16) {
            const v16f a = load_float16(w, kind, k);
            for (int r = 0; r < M; r++) acc[r] = v16_fma(a, v16_load(j->x + (size_t)r * K + k), acc[r]);
        }
        for (int r = 0; r < M; r++) j->y[(size_t)r * j->ldy + n] = v16_sum(acc[r]);
    }
}
