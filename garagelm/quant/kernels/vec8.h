/* The kernels of every variant but AVX-512 in one source: RMSNorm, the gated activations and
 * float products here, decode attention in attention_v8.h. Written on 8-float vectors (GCC's
 * vector extensions), which the compiler maps to one AVX2 register, two SSE2 or two NEON ones;
 * the few operations that differ per instruction set (fused multiply-add, f16 conversions, the
 * int8 dot) are the helpers at the top. Included by _kernels.c.
 */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

static inline v8f v8_load(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void v8_store(float *p, v8f v) { memcpy(p, &v, sizeof v); }
static inline v8f v8_set1(float x) { return (v8f){x, x, x, x, x, x, x, x}; }
static inline v8f v8_fma(v8f a, v8f b, v8f c) {
#if defined(HAVE_AVX2)
    return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c; /* two roundings where there is no FMA (built with -ffp-contract=off) */
#endif
}
static inline v8f v8_max(v8f a, v8f b) {
    const v8i m = a > b;
    return (v8f)((m & (v8i)a) | (~m & (v8i)b));
}
static inline v8f v8_min(v8f a, v8f b) {
    const v8i m = a < b;
    return (v8f)((m & (v8i)a) | (~m & (v8i)b));
}
static inline float v8_sum(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }
static inline float v8_hmax(v8f v) {
    float m = v[0];
    for (int i = 1; i < 8; i++) m = fmaxf(m, v[i]);
    return m;
}

/* 8 f16 values as float32 (exact), and back rounded to nearest even. */
static inline v8f v8_from_f16(const uint16_t *p) {
#if defined(HAVE_AVX2)
    return (v8f)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#elif defined(HAVE_NEON)
    float out[8];
    vst1q_f32(out, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))));
    vst1q_f32(out + 4, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p + 4))));
    return v8_load(out);
#else
    return (v8f){f16_to_f32(p[0]), f16_to_f32(p[1]), f16_to_f32(p[2]), f16_to_f32(p[3]),
                 f16_to_f32(p[4]), f16_to_f32(p[5]), f16_to_f32(p[6]), f16_to_f32(p[7])};
#endif
}
static inline void v8_to_f16(uint16_t *p, v8f v) {
#if defined(HAVE_AVX2)
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
    for (int i = 0; i < 8; i++) p[i] = f32_to_f16(v[i]);
#endif
}
static inline v8f v8_from_bf16(const uint16_t *p) {
    v8u u = {p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]};
    return (v8f)(u << 16);
}
static inline void v8_to_bf16(uint16_t *p, v8f v) {
    const v8u u = (v8u)v, r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16; /* nearest even, as to_bf16 */
    for (int i = 0; i < 8; i++) p[i] = (uint16_t)r[i];
}

/* e^x, Cephes' expf as exp512 computes it: n = round(x log2 e), r = x - n ln 2 in two parts, e^r
 * by its degree-6 polynomial, times 2^n. Inputs clamped to where 2^n is a normal float. */
static inline v8f v8_exp(v8f x) {
    x = v8_min(v8_max(x, v8_set1(-87.33654f)), v8_set1(88.0f));
    const v8f t = x * 1.44269504088896341f;
    const v8f n = (t + 12582912.0f) - 12582912.0f; /* rounded to nearest: 1.5 * 2^23 */
    v8f r = v8_fma(n, v8_set1(-0.693359375f), x);
    r = v8_fma(n, v8_set1(2.12194440e-4f), r);
    v8f p = v8_set1(1.9875691500E-4f);
    p = v8_fma(p, r, v8_set1(1.3981999507E-3f));
    p = v8_fma(p, r, v8_set1(8.3334519073E-3f));
    p = v8_fma(p, r, v8_set1(4.1665795894E-2f));
    p = v8_fma(p, r, v8_set1(1.6666665459E-1f));
    p = v8_fma(p, r, v8_set1(5.0000001201E-1f));
    const v8f y = v8_fma(p * r, r, r + 1.0f);
    const v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
    return y * (v8f)e;
}

/* acc + per lane the dot of its 4 unsigned bytes of w with the 4 signed bytes of x (vpdpbusd). */
static inline v8i dpbusd8(v8i acc, v8i w, int32_t x) {
#if defined(HAVE_AVXVNNI)
    return (v8i)_mm256_dpbusd_avx_epi32((__m256i)acc, (__m256i)w, _mm256_set1_epi32(x));
#elif defined(HAVE_AVX2) /* bytes widened to 16 bits, two exact madds */
    const __m256i u = (__m256i)w, s = _mm256_set1_epi32(x);
    const __m256i ue = _mm256_and_si256(u, _mm256_set1_epi16(0x00FF)), uo = _mm256_srli_epi16(u, 8);
    const __m256i se = _mm256_srai_epi16(_mm256_slli_epi16(s, 8), 8), so = _mm256_srai_epi16(s, 8);
    return (v8i)_mm256_add_epi32((__m256i)acc, _mm256_add_epi32(_mm256_madd_epi16(ue, se), _mm256_madd_epi16(uo, so)));
#else
    for (int e = 0; e < 4; e++) acc += (v8i)(((v8u)w >> (8 * e)) & 0xFFu) * (int32_t)(int8_t)(x >> (8 * e));
    return acc;
#endif
}

/* ---- RMSNorm and the gated activations ---------------------------------------------------- */
static inline v8f act8(v8f g, int gelu) {
    if (gelu) { /* g / (1 + e^-2u), u = sqrt(2/pi) (g + 0.044715 g^3): act512's GELU (tanh) */
        const v8f u = v8_fma(g * 0.044715f, g * g, g) * 0.7978845608028654f;
        return g / (1.0f + v8_exp(u * -2.0f));
    }
    return g / (1.0f + v8_exp(-g));
}

static inline void act_mul(const float *gu, float *h, int I, int gelu) {
    for (int i = 0; i < I; i += 8) v8_store(h + i, act8(v8_load(gu + i), gelu) * v8_load(gu + I + i));
}

static inline void act_mul_bf16(const uint16_t *gu, uint16_t *h, int I, int gelu) {
    for (int i = 0; i < I; i += 8) v8_to_bf16(h + i, act8(v8_from_bf16(gu + i), gelu) * v8_from_bf16(gu + I + i));
}

static inline void rmsnorm_row(const float *x, const float *w, float *y, int n, float eps) {
    v8f acc = v8_set1(0.0f);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const v8f v = v8_load(x + i);
        acc = v8_fma(v, v, acc);
    }
    float ss = v8_sum(acc);
    for (; i < n; i++) ss += x[i] * x[i];
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (i = 0; i + 8 <= n; i += 8) v8_store(y + i, v8_load(x + i) * inv * v8_load(w + i));
    for (; i < n; i++) y[i] = x[i] * inv * w[i];
}

static inline void store_f16_row(uint16_t *dst, const float *src, int n) {
    for (int i = 0; i < n; i += 8) v8_to_f16(dst + i, v8_load(src + i));
}

/* ---- float products: exact mode, Q5_K/Q6_K and float weights -------------------------------- */
/* Packed quantized rows: per block d * sum(q x) (Q6_K: a scale per 16), plus the min term. */
static void rows_packed_v8(const job_t *j, int n0, int n1) {
    const int nb = j->K / QK, kind = j->qtype, nb16 = (nb + 15) & ~15, M = j->M;
    float d[2 * MAX_BLOCKS + 16], m[2 * MAX_BLOCKS + 16];
    for (int n = n0; n < n1; n++) {
        load_row_scales(j, n, d, m, nb);
        v8f acc[MAX_ROWS];
        for (int r = 0; r < M; r++) acc[r] = v8_set1(0.0f);
        for (int b = 0; b < nb; b++) {
            float qf[QK];
            if (BYTE_VALUES(j->qtype)) {
                const int8_t *q = (const int8_t *)j->w + (size_t)n * j->K + (size_t)b * QK;
                for (int i = 0; i < QK; i++) qf[i] = (float)q[i];
            } else {
                const uint8_t *q = j->w + ROW_BYTES(kind, j->K) * n + (size_t)b * BLOCK_BYTES(kind);
                uint32_t qh = 0;
                if (IS_Q5(kind)) memcpy(&qh, q + 16, 4);
                const int c = kind == P_Q5_0 ? 16 : 0; /* Q5_0: centred values */
                for (int i = 0; i < 16; i++) {
                    qf[i] = (float)((int)((q[i] & 0x0F) | (((qh >> i) & 1) << 4)) - c);
                    qf[i + 16] = (float)((int)((q[i] >> 4) | (((qh >> (i + 16)) & 1) << 4)) - c);
                }
            }
            const v8f q0 = v8_load(qf), q1 = v8_load(qf + 8), q2 = v8_load(qf + 16), q3 = v8_load(qf + 24);
            const float da = kind == P_I8_16 ? d[2 * b] : d[b], db = kind == P_I8_16 ? d[2 * b + 1] : d[b];
            for (int r = 0; r < M; r++) {
                const float *x = j->x + (size_t)r * j->K + (size_t)b * QK;
                const v8f ta = v8_fma(q1, v8_load(x + 8), q0 * v8_load(x));
                const v8f tb = v8_fma(q3, v8_load(x + 24), q2 * v8_load(x + 16));
                acc[r] = kind == P_I8_16 ? v8_fma(tb, v8_set1(db), v8_fma(ta, v8_set1(da), acc[r]))
                                         : v8_fma(ta + tb, v8_set1(da), acc[r]);
            }
        }
        for (int r = 0; r < M; r++) {
            float macc = 0.0f;
            if (HAS_MIN(kind)) {
                const float *xs = j->xsum + (size_t)r * nb16;
                for (int b = 0; b < nb; b++) macc += m[b] * xs[b];
            }
            j->y[(size_t)r * j->ldy + n] = v8_sum(acc[r]) + macc;
        }
    }
}

static inline v8f load_float8(const uint8_t *row, int kind, int k) {
    if (kind == P_F32) return v8_load((const float *)row + k);
    if (kind == P_F16) return v8_from_f16((const uint16_t *)row + k);
    return v8_from_bf16((const uint16_t *)row + k);
}

/* Float weights (f32, bf16, f16); K a multiple of 32. */
static void rows_float_v8(const job_t *j, int n0, int n1) {
    const int K = j->K, kind = j->qtype, M = j->M;
    const size_t row_bytes = (size_t)K * FLOAT_BYTES(kind);
    for (int n = n0; n < n1; n++) {
        const uint8_t *w = j->w + (size_t)n * row_bytes;
        v8f acc[MAX_ROWS];
        for (int r = 0; r < M; r++) acc[r] = v8_set1(0.0f);
        for (int k = 0; k < K; k += 8) {
            const v8f a = load_float8(w, kind, k);
            for (int r = 0; r < M; r++) acc[r] = v8_fma(a, v8_load(j->x + (size_t)r * K + k), acc[r]);
        }
        for (int r = 0; r < M; r++) j->y[(size_t)r * j->ldy + n] = v8_sum(acc[r]);
    }
}

