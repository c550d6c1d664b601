/* The kernels of every variant but AVX-512 in one source: RMSNorm, the gated activations and
 * float products here, decode attention in attention_v16.h.
 *
 * They compute what the AVX-512 kernels compute, to the bit: the same float32 operations on the
 * same values in the same order. A GCC vector of 16 floats stands for one AVX-512 register (the
 * compiler maps it to two AVX2 registers, four SSE2 or four NEON ones); lane i accumulates what
 * lane i accumulates there, multiply-adds are fused (one rounding) on every CPU, and horizontal
 * sums follow the AVX-512 code's trees (v16_sum, v16_hsum16). Why it matters: decode quantizes
 * activations to int8, so a 1-ulp difference anywhere upstream can move a value across a
 * rounding boundary and change the text. Equal bits keep greedy output the same on every CPU.
 * Included by _kernels.c.
 */
/* A 16-float "register" is NP native vectors of VL floats: a struct, not one 64-byte GCC vector,
 * which GCC lowers on AVX2 lane by lane through the stack. */
#if defined(HAVE_AVX2)
#define VL 8
#else
#define VL 4
#endif
#define NP (16 / VL)
typedef float vf __attribute__((vector_size(4 * VL)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));
typedef uint32_t vu __attribute__((vector_size(4 * VL)));
typedef float vf_u __attribute__((vector_size(4 * VL), aligned(4))); /* unaligned loads and stores */
typedef int32_t vi_u __attribute__((vector_size(4 * VL), aligned(4)));
typedef struct {
    vf p[NP];
} v16f;
typedef struct {
    vi p[NP];
} v16i;
#define EACH(i) for (int i = 0; i < NP; i++)

/* ---- one native vector ---- */
static inline vf vf_fma(vf a, vf b, vf c) { /* a * b + c rounded once, as vfmadd does */
#if defined(HAVE_AVX2)
    return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#elif defined(HAVE_NEON)
    return (vf)vfmaq_f32((float32x4_t)c, (float32x4_t)a, (float32x4_t)b);
#else
    for (int l = 0; l < VL; l++) c[l] = fmaf(a[l], b[l], c[l]);
    return c;
#endif
}
static inline vf vf_max(vf a, vf b) {
    const vi m = a > b;
    return (vf)((m & (vi)a) | (~m & (vi)b));
}
static inline vf vf_min(vf a, vf b) {
    const vi m = a < b;
    return (vf)((m & (vi)a) | (~m & (vi)b));
}
/* exp512's e^x: n = round(x log2 e), r = x - n ln 2 in two fused parts, e^r by its polynomial,
 * times 2^n, here in two exact halves (2^a 2^b) where exp512 has vscalefps. */
static inline vf vf_exp(vf x) {
    x = vf_min(vf_max(x, (vf){0} - 87.33654f), (vf){0} + 176.0f); /* above 176 both give inf */
    const vf t = x * 1.44269504088896341f;
    const vf n = (t + 12582912.0f) - 12582912.0f; /* to nearest, ties to even: 1.5 * 2^23 */
    vf r = vf_fma(n, (vf){0} - 0.693359375f, x);
    r = vf_fma(n, (vf){0} + 2.12194440e-4f, r);
    vf p = (vf){0} + 1.9875691500E-4f;
    p = vf_fma(p, r, (vf){0} + 1.3981999507E-3f);
    p = vf_fma(p, r, (vf){0} + 8.3334519073E-3f);
    p = vf_fma(p, r, (vf){0} + 4.1665795894E-2f);
    p = vf_fma(p, r, (vf){0} + 1.6666665459E-1f);
    p = vf_fma(p, r, (vf){0} + 5.0000001201E-1f);
    const vf y = vf_fma(p * r, r, r + 1.0f);
    const vi ni = __builtin_convertvector(n, vi), a = ni / 2, b = ni - a;
    return y * (vf)((a + 127) << 23) * (vf)((b + 127) << 23);
}

/* ---- 16 lanes ---- */
/* one vector load or store per part (a memcpy of the struct went through 16-byte pieces on the
 * stack, and each wide reload then waited on them) */
static inline v16f v16_load(const float *x) {
    v16f v;
    EACH(i) v.p[i] = *(const vf_u *)(x + VL * i);
    return v;
}
static inline void v16_store(float *x, v16f v) { EACH(i) *(vf_u *)(x + VL * i) = v.p[i]; }
static inline v16f v16_set1(float a) {
    v16f v;
    EACH(i) v.p[i] = (vf){0} + a;
    return v;
}
static inline float v16_lane(v16f v, int l) { return v.p[l / VL][l % VL]; }
static inline void v16_set_lane(v16f *v, int l, float x) { v->p[l / VL][l % VL] = x; }
static inline v16f v16_add(v16f a, v16f b) {
    EACH(i) a.p[i] += b.p[i];
    return a;
}
static inline v16f v16_mul(v16f a, v16f b) {
    EACH(i) a.p[i] *= b.p[i];
    return a;
}
static inline v16f v16_div(v16f a, v16f b) {
    EACH(i) a.p[i] /= b.p[i];
    return a;
}
static inline v16f v16_muls(v16f a, float s) {
    EACH(i) a.p[i] *= s;
    return a;
}
static inline v16f v16_subs(v16f a, float s) { /* a - s */
    EACH(i) a.p[i] -= s;
    return a;
}
static inline v16f v16_fma(v16f a, v16f b, v16f c) {
    EACH(i) c.p[i] = vf_fma(a.p[i], b.p[i], c.p[i]);
    return c;
}
static inline v16f v16_max(v16f a, v16f b) {
    EACH(i) a.p[i] = vf_max(a.p[i], b.p[i]);
    return a;
}
static inline v16f v16_min(v16f a, v16f b) {
    EACH(i) a.p[i] = vf_min(a.p[i], b.p[i]);
    return a;
}
static inline v16f v16_exp(v16f x) {
    EACH(i) x.p[i] = vf_exp(x.p[i]);
    return x;
}
static inline float v16_hmax(v16f v) {
    float m = v16_lane(v, 0);
    for (int l = 1; l < 16; l++) m = fmaxf(m, v16_lane(v, l));
    return m;
}
/* _mm512_reduce_add_ps's tree (GCC's): t3 = halves added, t6 = quarters, then pairs */
static inline float v16_sum(v16f v) {
#if VL == 8
    const vf t3 = v.p[1] + v.p[0];
#else
    const vf t3lo = v.p[2] + v.p[0], t3hi = v.p[3] + v.p[1];
#endif
    float t6[4];
    for (int i = 0; i < 4; i++)
#if VL == 8
        t6[i] = t3[i + 4] + t3[i];
#else
        t6[i] = t3hi[i] + t3lo[i];
#endif
    return (t6[0] + t6[2]) + (t6[1] + t6[3]);
}

/* hsum16 (attention_avx512.h): lane r of the result sums v[r] by the tree S_L = (v[4L] + v[4L+2])
 * + (v[4L+1] + v[4L+3]) per 128-bit lane L, then (S_0 + S_1) + (S_2 + S_3), by the same shuffles */
static inline v16f v16_hsum16(const v16f *v) {
    v16f out;
#if VL == 8
    __m128 res[4];
    for (int g = 0; g < 4; g++) { /* vectors 4g..4g+3 */
        __m256 u[2];
        for (int k = 0; k < 2; k++) { /* part k: 128-bit lanes 2k and 2k + 1 */
            __m256 t[2];
            for (int h = 0; h < 2; h++) {
                const __m256 a = (__m256)v[4 * g + 2 * h].p[k], b = (__m256)v[4 * g + 2 * h + 1].p[k];
                t[h] = _mm256_add_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
            }
            u[k] = _mm256_add_ps(_mm256_shuffle_ps(t[0], t[1], 0x44), _mm256_shuffle_ps(t[0], t[1], 0xEE));
        }
        const __m128 s01 = _mm_add_ps(_mm256_castps256_ps128(u[0]), _mm256_extractf128_ps(u[0], 1));
        const __m128 s23 = _mm_add_ps(_mm256_castps256_ps128(u[1]), _mm256_extractf128_ps(u[1], 1));
        res[g] = _mm_add_ps(s01, s23);
    }
    out.p[0] = (vf)_mm256_set_m128(res[1], res[0]);
    out.p[1] = (vf)_mm256_set_m128(res[3], res[2]);
#else
    for (int g = 0; g < 4; g++) {
        vf u[4];
        for (int L = 0; L < 4; L++) {
            vf t[2];
            for (int h = 0; h < 2; h++) {
                const vf a = v[4 * g + 2 * h].p[L], b = v[4 * g + 2 * h + 1].p[L];
                t[h] = __builtin_shufflevector(a, b, 0, 4, 1, 5) + __builtin_shufflevector(a, b, 2, 6, 3, 7);
            }
            u[L] = __builtin_shufflevector(t[0], t[1], 0, 1, 4, 5) + __builtin_shufflevector(t[0], t[1], 2, 3, 6, 7);
        }
        out.p[g] = (u[0] + u[1]) + (u[2] + u[3]);
    }
#endif
    return out;
}

/* 16 f16 values as float32 (exact), and back rounded to nearest even */
static inline v16f v16_from_f16(const uint16_t *h) {
    v16f v;
#if defined(HAVE_AVX2)
    EACH(i) v.p[i] = (vf)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + 8 * i)));
#elif defined(HAVE_NEON)
    EACH(i) v.p[i] = (vf)vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h + 4 * i)));
#else
    for (int l = 0; l < 16; l++) v16_set_lane(&v, l, f16_to_f32(h[l]));
#endif
    return v;
}
/* lanes lo..hi-1 of h, 0 elsewhere (a masked load: the others are never read) */
static inline v16f v16_from_f16_lanes(const uint16_t *h, int lo, int hi) {
    uint16_t in[16] = {0};
    memcpy(in + lo, h + lo, sizeof(uint16_t) * (size_t)(hi - lo));
    return v16_from_f16(in);
}
static inline void v16_to_f16(uint16_t *h, v16f v) {
#if defined(HAVE_AVX2)
    EACH(i) _mm_storeu_si128((__m128i *)(h + 8 * i), _mm256_cvtps_ph((__m256)v.p[i], _MM_FROUND_TO_NEAREST_INT));
#else
    for (int l = 0; l < 16; l++) h[l] = f32_to_f16(v16_lane(v, l));
#endif
}
static inline v16f v16_from_bf16(const uint16_t *h) {
    v16f v;
    EACH(i) {
        vu u;
        for (int l = 0; l < VL; l++) u[l] = (uint32_t)h[VL * i + l] << 16;
        v.p[i] = (vf)u;
    }
    return v;
}
static inline void v16_to_bf16(uint16_t *h, v16f v) {
    EACH(i) {
        const vu u = (vu)v.p[i], r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16; /* nearest even, as to_bf16 */
        for (int l = 0; l < VL; l++) h[VL * i + l] = (uint16_t)r[l];
    }
}

/* ---- integers (the q8_0 cache's key dots) ---- */
static inline v16i v16i_load(const void *x) {
    v16i v;
    EACH(i) v.p[i] = *(const vi_u *)((const int32_t *)x + VL * i);
    return v;
}
static inline v16i v16i_set1(int32_t a) {
    v16i v;
    EACH(i) v.p[i] = (vi){0} + a;
    return v;
}
static inline v16f v16i_to_f(v16i a, v16i b) { /* (float)(a + b) */
    v16f v;
    EACH(i) v.p[i] = __builtin_convertvector(a.p[i] + b.p[i], vf);
    return v;
}
/* acc + per lane the dot of its 4 unsigned bytes of w with the 4 signed bytes of x (vpdpbusd) */
static inline v16i dpbusd16(v16i acc, v16i w, int32_t x) {
#if defined(HAVE_AVXVNNI)
    EACH(i) acc.p[i] = (vi)_mm256_dpbusd_avx_epi32((__m256i)acc.p[i], (__m256i)w.p[i], _mm256_set1_epi32(x));
#elif defined(HAVE_AVX2) /* bytes widened to 16 bits, two exact madds */
    const __m256i s = _mm256_set1_epi32(x), se = _mm256_srai_epi16(_mm256_slli_epi16(s, 8), 8);
    const __m256i so = _mm256_srai_epi16(s, 8);
    EACH(i) {
        const __m256i u = (__m256i)w.p[i];
        const __m256i ue = _mm256_and_si256(u, _mm256_set1_epi16(0x00FF)), uo = _mm256_srli_epi16(u, 8);
        acc.p[i] = (vi)_mm256_add_epi32((__m256i)acc.p[i],
                                        _mm256_add_epi32(_mm256_madd_epi16(ue, se), _mm256_madd_epi16(uo, so)));
    }
#elif defined(HAVE_NEON) /* sdot of the signed bytes (w - 128), then 128 * sum(x) back */
    int32_t xsum = 0;
    for (int e = 0; e < 4; e++) xsum += (int8_t)(x >> (8 * e));
    const int8x16_t xv = vreinterpretq_s8_s32(vdupq_n_s32(x));
    EACH(i) {
        const int8x16_t ws = vreinterpretq_s8_u8(veorq_u8(vreinterpretq_u8_s32((int32x4_t)w.p[i]), vdupq_n_u8(0x80)));
        acc.p[i] = (vi)vaddq_s32(vdotq_s32((int32x4_t)acc.p[i], ws, xv), vdupq_n_s32(128 * xsum));
    }
#else
    EACH(i) for (int e = 0; e < 4; e++) acc.p[i] += (vi)(((vu)w.p[i] >> (8 * e)) & 0xFFu) * (int32_t)(int8_t)(x >> (8 * e));
#endif
    return acc;
}

/* ---- RMSNorm and the gated activations (elementwise_avx512.h's) ----------------------------- */
static inline vf act_vf(vf g, int gelu) {
    if (gelu) {
        const vf u = 0.7978845608028654f * vf_fma(0.044715f * g, g * g, g);
        return g / (1.0f + vf_exp(vf_min(-2.0f * u, (vf){0} + 88.0f)));
    }
    return g / (1.0f + vf_exp(0.0f - g));
}
static inline v16f act16(v16f g, int gelu) {
    EACH(i) g.p[i] = act_vf(g.p[i], gelu);
    return g;
}

static inline void act_mul(const float *gu, float *h, int I, int gelu) {
    for (int i = 0; i < I; i += 16) v16_store(h + i, v16_mul(act16(v16_load(gu + i), gelu), v16_load(gu + I + i)));
}

static inline void act_mul_bf16(const uint16_t *gu, uint16_t *h, int I, int gelu) {
    for (int i = 0; i < I; i += 16)
        v16_to_bf16(h + i, v16_mul(act16(v16_from_bf16(gu + i), gelu), v16_from_bf16(gu + I + i)));
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
    for (i = 0; i + 16 <= n; i += 16) v16_store(y + i, v16_mul(v16_muls(v16_load(x + i), inv), v16_load(w + i)));
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
                    acc[r] = v16_fma(v16_mul(q0, xa), v16_set1(d[2 * b]), acc[r]);
                    acc[r] = v16_fma(v16_mul(q1, xb), v16_set1(d[2 * b + 1]), acc[r]);
                } else {
                    acc[r] = v16_fma(v16_fma(q1, xb, v16_mul(q0, xa)), v16_set1(d[b]), acc[r]);
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
