/* Decode attention's inner loops with AVX-512 (f16 and q8_0 caches). Included by _kernels.c in its
 * AVX-512 build; the split over parts and their merge are in _kernels.c. */
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
