/* Decode attention for every variant but AVX-512: attention_avx512.h's arithmetic, operation for
 * operation, on 16-float vectors (vec16.h), so the bits are the same. f16 and q8_0 caches, the
 * layouts described in _kernels.c's attention section. Included by _kernels.c after att_t; the
 * split over parts and their merge are there. */

/* vectors of a head's values accumulated at a time (the head is 4, 8 or 16 of them) */
#define CB (VL == 8 ? 2 : 1)

/* f16: positions s0..s1 of every head group: scores 16 positions at a time (hsum16's tree), the
 * last few one at a time, exp in place, then the weighted values in two chains when the head is
 * short (NV <= 4), as att_rows_nv. */
static inline __attribute__((always_inline)) void att_rows_v16_nv(const att_t *a, int s0, int s1, const int NV) {
    const int part = s0 / a->per, hd = NV * 16, group = a->H / a->Hkv;
    const int len = s1 - s0, ld = len + ATT_TILE;
    const size_t n_scores = ((size_t)group * ld + 15) & ~(size_t)15, n_out = (size_t)group * hd;
    float *scores = thread_scratch(1, n_scores + n_out + (size_t)ATT_TILE * hd);
    if (!scores) {
        att_part_empty(a, part, hd);
        return;
    }
    float *o = scores + n_scores, *tile = o + n_out;
    for (int g = 0; g < a->Hkv; g++) {
        const uint16_t *kg = (const uint16_t *)a->k + (size_t)g * a->stride_h;
        const uint16_t *vg = (const uint16_t *)a->v + (size_t)g * a->stride_h;
        float mx[8];
        v16f mxv[8];
        int s = s0;
        for (int i = 0; i < group; i++) mxv[i] = v16_set1(-INFINITY);
        for (; s + ATT_TILE <= s1; s += ATT_TILE) {
            for (int r = 0; r < ATT_TILE; r++)
                for (int c = 0; c < NV; c++)
                    v16_store(tile + (size_t)r * hd + c * 16, v16_from_f16(kg + (size_t)(s + r) * hd + c * 16));
            for (int i = 0; i < group; i++) {
                const float *qi = a->q + (size_t)(g * group + i) * hd;
                v16f acc[ATT_TILE], qv[16];
                for (int c = 0; c < NV; c++) qv[c] = v16_muls(v16_load(qi + c * 16), a->scale);
                for (int r = 0; r < ATT_TILE; r++) {
                    v16f x = v16_mul(qv[0], v16_load(tile + (size_t)r * hd));
                    for (int c = 1; c < NV; c++) x = v16_fma(qv[c], v16_load(tile + (size_t)r * hd + c * 16), x);
                    acc[r] = x;
                }
                const v16f sc = v16_hsum16(acc);
                v16_store(scores + (size_t)i * ld + (s - s0), sc);
                mxv[i] = v16_max(mxv[i], sc);
            }
        }
        for (int i = 0; i < group; i++) mx[i] = v16_hmax(mxv[i]);
        for (; s < s1; s++) { /* the last few positions, one at a time */
            for (int c = 0; c < NV; c++) v16_store(tile + c * 16, v16_from_f16(kg + (size_t)s * hd + c * 16));
            for (int i = 0; i < group; i++) {
                const float *qi = a->q + (size_t)(g * group + i) * hd;
                v16f acc = v16_mul(v16_load(qi), v16_load(tile));
                for (int c = 1; c < NV; c++) acc = v16_fma(v16_load(qi + c * 16), v16_load(tile + c * 16), acc);
                const float sc = v16_sum(acc) * a->scale;
                scores[(size_t)i * ld + (s - s0)] = sc;
                mx[i] = fmaxf(mx[i], sc);
            }
        }
        for (int i = 0; i < group; i++) { /* exp(score - max) in place, and its sum */
            float *sc = scores + (size_t)i * ld;
            v16f sum = v16_set1(0.0f);
            int t = 0;
            for (; t + 16 <= len; t += 16) {
                const v16f e = v16_exp(v16_subs(v16_load(sc + t), mx[i]));
                v16_store(sc + t, e);
                sum = v16_add(sum, e);
            }
            if (t < len) { /* a masked tail: lanes past len load 0 and add 0 */
                float x[16] = {0};
                memcpy(x, sc + t, sizeof(float) * (len - t));
                v16f e = v16_exp(v16_subs(v16_load(x), mx[i]));
                for (int l = 0; l < 16; l++) {
                    if (l < len - t)
                        sc[t + l] = v16_lane(e, l);
                    else
                        v16_set_lane(&e, l, 0.0f);
                }
                sum = v16_add(sum, e);
            }
            a->part_m[part * ATT_MAX_HEADS + g * group + i] = mx[i];
            a->part_l[part * ATT_MAX_HEADS + g * group + i] = v16_sum(sum);
        }
        memset(o, 0, sizeof(float) * n_out);
        for (int t = s0; t < s1; t += ATT_TILE) { /* weighted values, 16 positions at a time */
            const int n = s1 - t < ATT_TILE ? s1 - t : ATT_TILE;
            for (int r = 0; r < n; r++)
                for (int c = 0; c < NV; c++)
                    v16_store(tile + (size_t)r * hd + c * 16, v16_from_f16(vg + (size_t)(t + r) * hd + c * 16));
            for (int i = 0; i < group; i++) {
                const float *p = scores + (size_t)i * ld + (t - s0);
                float *oi = o + (size_t)i * hd;
                /* per element the same chains as att_rows_nv's; CB vectors of the head at a time
                 * so the accumulators fit the registers (16 on AVX2, not 32) */
                for (int c0 = 0; c0 < NV; c0 += CB) {
                    const int cb = NV - c0 < CB ? NV - c0 : CB; /* an odd head size ends with one */
                    v16f acc0[CB], acc1[CB];
                    for (int c = 0; c < cb; c++) acc0[c] = v16_load(oi + (c0 + c) * 16), acc1[c] = v16_set1(0.0f);
                    const float *x = tile + c0 * 16;
                    int r = 0;
                    if (NV <= 4)
                        for (; r + 2 <= n; r += 2) {
                            const v16f p0 = v16_set1(p[r]), p1 = v16_set1(p[r + 1]);
                            for (int c = 0; c < cb; c++) {
                                acc0[c] = v16_fma(p0, v16_load(x + (size_t)r * hd + c * 16), acc0[c]);
                                acc1[c] = v16_fma(p1, v16_load(x + (size_t)(r + 1) * hd + c * 16), acc1[c]);
                            }
                        }
                    for (; r < n; r++) {
                        const v16f p0 = v16_set1(p[r]);
                        for (int c = 0; c < cb; c++) acc0[c] = v16_fma(p0, v16_load(x + (size_t)r * hd + c * 16), acc0[c]);
                    }
                    for (int c = 0; c < cb; c++) v16_store(oi + (c0 + c) * 16, v16_add(acc0[c], acc1[c]));
                }
            }
        }
        for (int i = 0; i < group; i++)
            memcpy(a->part_o + ((size_t)part * ATT_MAX_HEADS + g * group + i) * hd, o + (size_t)i * hd,
                   sizeof(float) * hd);
    }
}

/* q8_0: tiles u0..u1 (from the tile holding `first`), as att_q8_nb: integer key dots, a lane per
 * position of the tile; lanes outside first .. end - 1 get score -inf and weight exactly 0, and
 * their scales are never read. */
static inline __attribute__((always_inline)) void att_q8_v16_nb(const att_t *a, int u0, int u1, const int NB) {
    const int hd = NB * QK, NV = hd / 16, group = a->H / a->Hkv, part = u0 / a->per;
    const long first = a->first, end = a->first + a->S, t0 = first / ATT_TILE + u0, t1 = first / ATT_TILE + u1;
    const int len = (int)(t1 - t0) * ATT_TILE;
    const size_t tile_bytes = (size_t)ATT_TILE * hd;
    float *scores = thread_scratch(1, (size_t)group * (len + hd + NB * ATT_TILE) + tile_bytes);
    if (!scores) {
        att_part_empty(a, part, hd);
        return;
    }
    float *o = scores + (size_t)group * len, *pv = o + (size_t)group * hd, *vt = pv + (size_t)group * NB * ATT_TILE;
    for (int g = 0; g < a->Hkv; g++) {
        const uint8_t *kg = a->k + (size_t)g * a->stride_h;
        const int8_t *vg = (const int8_t *)a->v + (size_t)g * a->stride_h;
        const uint16_t *ksg = a->ks + (size_t)g * (a->stride_h / QK), *vsg = a->vs + (size_t)g * (a->stride_h / QK);
        const int h0 = g * group;
        v16f mxv[8];
        for (int i = 0; i < group; i++) mxv[i] = v16_set1(-INFINITY);
        for (long t = t0; t < t1; t++) { /* scores, a tile of 16 positions at a time */
            const uint8_t *kt = kg + (size_t)t * tile_bytes;
            const uint16_t *kst = ksg + (size_t)t * ATT_TILE * NB;
            const long base = t * ATT_TILE;
            const int lo = first > base ? (int)(first - base) : 0, hi = end < base + 16 ? (int)(end - base) : 16;
            for (int i = 0; i < group; i++) {
                v16f sc = v16_set1(0.0f);
                for (int b = 0; b < NB; b++) {
                    v16i a0 = v16i_set1(a->qc[(h0 + i) * 8 + b]), a1 = v16i_set1(0);
                    const int32_t *qi = (const int32_t *)(a->qq + (size_t)(h0 + i) * hd) + 8 * b;
                    for (int jj = 0; jj < 8; jj += 2) {
                        a0 = dpbusd16(a0, v16i_load(kt + (size_t)(8 * b + jj) * 64), qi[jj]);
                        a1 = dpbusd16(a1, v16i_load(kt + (size_t)(8 * b + jj + 1) * 64), qi[jj + 1]);
                    }
                    /* the valid lanes' key scales (a masked load) */
                    const v16f dk = lo == 0 && hi == 16 ? v16_from_f16(kst + b * ATT_TILE)
                                                        : v16_from_f16_lanes(kst + b * ATT_TILE, lo, hi);
                    sc = v16_fma(v16i_to_f(a0, a1), v16_muls(dk, a->qd[(h0 + i) * 8 + b]), sc);
                }
                for (int l = 0; l < 16; l++)
                    if (l < lo || l >= hi) v16_set_lane(&sc, l, -INFINITY);
                v16_store(scores + (size_t)i * len + (t - t0) * ATT_TILE, sc);
                mxv[i] = v16_max(mxv[i], sc);
            }
        }
        for (int i = 0; i < group; i++) { /* exp(score - max) in place (0 outside), and its sum */
            float *sc = scores + (size_t)i * len;
            const float mx = v16_hmax(mxv[i]);
            v16f sum = v16_set1(0.0f);
            for (int t = 0; t < len; t += 16) {
                const v16f x = v16_load(sc + t);
                v16f e = v16_exp(v16_subs(x, mx));
                for (int l = 0; l < 16; l++)
                    if (v16_lane(x, l) == -INFINITY) v16_set_lane(&e, l, 0.0f);
                v16_store(sc + t, e);
                sum = v16_add(sum, e);
            }
            a->part_m[part * ATT_MAX_HEADS + h0 + i] = mx;
            a->part_l[part * ATT_MAX_HEADS + h0 + i] = v16_sum(sum);
        }
        memset(o, 0, sizeof(float) * group * hd);
        for (long t = t0; t < t1; t++) { /* weighted values, a tile at a time */
            const int8_t *vrow = vg + (size_t)t * tile_bytes;
            const uint16_t *vst = vsg + (size_t)t * ATT_TILE * NB;
            const long base = t * ATT_TILE;
            const int lo = first > base ? (int)(first - base) : 0, hi = end < base + 16 ? (int)(end - base) : 16;
            for (int b = 0; b < NB; b++) { /* each weight times its block's scale */
                const v16f dv = lo == 0 && hi == 16 ? v16_from_f16(vst + b * ATT_TILE)
                                                    : v16_from_f16_lanes(vst + b * ATT_TILE, lo, hi);
                for (int i = 0; i < group; i++)
                    v16_store(pv + (size_t)(i * NB + b) * ATT_TILE,
                              v16_mul(dv, v16_load(scores + (size_t)i * len + (t - t0) * ATT_TILE)));
            }
            for (int r = 0; r < ATT_TILE; r++)
                for (int c = 0; c < hd; c++) vt[(size_t)r * hd + c] = (float)vrow[(size_t)r * hd + c];
            for (int i = 0; i < group; i++) {
                const float *w = pv + (size_t)i * NB * ATT_TILE;
                float *oi = o + (size_t)i * hd;
                for (int c0 = 0; c0 < NV; c0 += CB) { /* even and odd positions: two chains */
                    const int cb = NV - c0 < CB ? NV - c0 : CB;
                    v16f acc0[CB], acc1[CB];
                    for (int c = 0; c < cb; c++) acc0[c] = v16_load(oi + (c0 + c) * 16), acc1[c] = v16_set1(0.0f);
                    for (int r = 0; r < ATT_TILE; r += 2)
                        for (int c = 0; c < cb; c++) {
                            const float *wr = w + ((c0 + c) / 2) * ATT_TILE + r;
                            const float *x = vt + (size_t)r * hd + (c0 + c) * 16;
                            acc0[c] = v16_fma(v16_set1(wr[0]), v16_load(x), acc0[c]);
                            acc1[c] = v16_fma(v16_set1(wr[1]), v16_load(x + hd), acc1[c]);
                        }
                    for (int c = 0; c < cb; c++) v16_store(oi + (c0 + c) * 16, v16_add(acc0[c], acc1[c]));
                }
            }
        }
        for (int i = 0; i < group; i++)
            memcpy(a->part_o + ((size_t)part * ATT_MAX_HEADS + h0 + i) * hd, o + (size_t)i * hd, sizeof(float) * hd);
    }
}

/* with the head size a compile-time constant where common, as att_run does for AVX-512 */
static void att_rows_v16(const att_t *a, int s0, int s1) {
    switch (a->hd / 16) {
    case 4: att_rows_v16_nv(a, s0, s1, 4); break;
    case 8: att_rows_v16_nv(a, s0, s1, 8); break;
    case 16: att_rows_v16_nv(a, s0, s1, 16); break;
    default: att_rows_v16_nv(a, s0, s1, a->hd / 16);
    }
}

static void att_q8_v16(const att_t *a, int u0, int u1) {
    switch (a->hd / QK) {
    case 2: att_q8_v16_nb(a, u0, u1, 2); break;
    case 4: att_q8_v16_nb(a, u0, u1, 4); break;
    case 8: att_q8_v16_nb(a, u0, u1, 8); break;
    default: att_q8_v16_nb(a, u0, u1, a->hd / QK);
    }
}
