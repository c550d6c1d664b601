/* Float products of packed and float weights with AVX-512 (two output rows at a time). Included by
 * _kernels.c in its AVX-512 build. */
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

static void rows_packed_avx512(const job_t *j, int n0, int n1) {
    /* one row's scales and mins as float32, shared by the copies (not one 130 KB frame each) */
    row_scales_t d __attribute__((aligned(64))), m __attribute__((aligned(64)));
#define CALL(rows) rows_packed_avx512_m(j, n0, n1, rows, d, m)
    BY_ROWS(j->M, CALL)
#undef CALL
}

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
