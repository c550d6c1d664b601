/* RMSNorm rows, the gated activations and f16 rows with AVX-512. Included by _kernels.c in its
 * AVX-512 build (vec16.h has the other variants', the same arithmetic). */
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

static inline void rmsnorm_row(const float *x, const float *w, float *y, int n, float eps) {
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

/* f16, rounded to nearest even, 16 at a time (n a multiple of 16) */
static inline void store_f16_row(uint16_t *dst, const float *src, int n) {
    for (int i = 0; i < n; i += 16)
        _mm256_storeu_si256((__m256i *)(dst + i), _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
}
