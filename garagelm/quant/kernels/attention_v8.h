/* Decode attention on 8-float vectors (vec8.h) for every variant but AVX-512: f16 and q8_0
 * caches, the layouts described in _kernels.c's attention section. Included by _kernels.c, after
 * att_t; the split over parts and their merge are there. */
/* f16: positions s0..s1 of every head group. */
static void att_rows_v8(const att_t *a, int s0, int s1) {
    const int part = s0 / a->per, hd = a->hd, group = a->H / a->Hkv, len = s1 - s0;
    float *scores = thread_scratch(1, (size_t)group * len + (size_t)group * hd + 2 * (size_t)hd + 16);
    if (!scores) {
        att_part_empty(a, part, hd);
        return;
    }
    float *o = scores + (size_t)group * len, *row = o + (size_t)group * hd, *qs = row + hd;
    for (int g = 0; g < a->Hkv; g++) {
        const uint16_t *kg = (const uint16_t *)a->k + (size_t)g * a->stride_h;
        const uint16_t *vg = (const uint16_t *)a->v + (size_t)g * a->stride_h;
        for (int i = 0; i < group; i++) {
            const float *qi = a->q + (size_t)(g * group + i) * hd;
            for (int c = 0; c < hd; c++) qs[c] = qi[c] * a->scale;
            float mx = -INFINITY, *sc = scores + (size_t)i * len;
            for (int s = s0; s < s1; s++) {
                const uint16_t *k = kg + (size_t)s * hd;
                v8f acc = v8_set1(0.0f);
                for (int c = 0; c < hd; c += 8) acc = v8_fma(v8_load(qs + c), v8_from_f16(k + c), acc);
                sc[s - s0] = v8_sum(acc);
                mx = fmaxf(mx, sc[s - s0]);
            }
            float sum = 0.0f;
            int t = 0;
            for (; t + 8 <= len; t += 8) {
                const v8f e = v8_exp(v8_load(sc + t) - mx);
                v8_store(sc + t, e);
                sum += v8_sum(e);
            }
            for (; t < len; t++) {
                float tmp[8] = {sc[t] - mx};
                sc[t] = v8_exp(v8_load(tmp))[0];
                sum += sc[t];
            }
            a->part_m[part * ATT_MAX_HEADS + g * group + i] = mx;
            a->part_l[part * ATT_MAX_HEADS + g * group + i] = sum;
        }
        memset(o, 0, sizeof(float) * group * hd);
        for (int s = s0; s < s1; s++) { /* each value row converted once for the group's heads */
            const uint16_t *v = vg + (size_t)s * hd;
            for (int c = 0; c < hd; c += 8) v8_store(row + c, v8_from_f16(v + c));
            for (int i = 0; i < group; i++) {
                const v8f p = v8_set1(scores[(size_t)i * len + (s - s0)]);
                float *oi = o + (size_t)i * hd;
                for (int c = 0; c < hd; c += 8) v8_store(oi + c, v8_fma(p, v8_load(row + c), v8_load(oi + c)));
            }
        }
        for (int i = 0; i < group; i++)
            memcpy(a->part_o + ((size_t)part * ATT_MAX_HEADS + g * group + i) * hd, o + (size_t)i * hd,
                   sizeof(float) * hd);
    }
}

/* q8_0: tiles u0..u1 (from the tile holding `first`); integer key dots as the AVX-512 kernel's,
 * 8 positions of a tile per vector. Positions outside first .. end - 1 are skipped. */
static void att_q8_v8(const att_t *a, int u0, int u1) {
    const int hd = a->hd, NB = hd / QK, group = a->H / a->Hkv, part = u0 / a->per;
    const long first = a->first, end = a->first + a->S, t0 = first / ATT_TILE + u0, t1 = first / ATT_TILE + u1;
    const int len = (int)(t1 - t0) * ATT_TILE;
    const size_t tile_bytes = (size_t)ATT_TILE * hd;
    float *scores = thread_scratch(1, (size_t)group * len + (size_t)group * hd + 16);
    if (!scores) {
        att_part_empty(a, part, hd);
        return;
    }
    float *o = scores + (size_t)group * len;
    for (int g = 0; g < a->Hkv; g++) {
        const uint8_t *kg = a->k + (size_t)g * a->stride_h;
        const int8_t *vg = (const int8_t *)a->v + (size_t)g * a->stride_h;
        const uint16_t *ksg = a->ks + (size_t)g * (a->stride_h / QK), *vsg = a->vs + (size_t)g * (a->stride_h / QK);
        const int h0 = g * group;
        for (long t = t0; t < t1; t++) { /* scores, 8 positions at a time */
            const uint8_t *kt = kg + (size_t)t * tile_bytes;
            const uint16_t *kst = ksg + (size_t)t * ATT_TILE * NB;
            for (int half = 0; half < 2; half++)
                for (int i = 0; i < group; i++) {
                    v8f sc = v8_set1(0.0f);
                    for (int b = 0; b < NB; b++) {
                        v8i acc = (v8i){0} + a->qc[(h0 + i) * 8 + b];
                        const int32_t *qi = (const int32_t *)(a->qq + (size_t)(h0 + i) * hd) + 8 * b;
                        for (int jj = 0; jj < 8; jj++) {
                            v8i w;
                            memcpy(&w, kt + (size_t)(8 * b + jj) * 64 + 32 * half, sizeof w);
                            acc = dpbusd8(acc, w, qi[jj]);
                        }
                        const v8f dk = v8_from_f16(kst + b * ATT_TILE + 8 * half) * a->qd[(h0 + i) * 8 + b];
                        sc = v8_fma(__builtin_convertvector(acc, v8f), dk, sc);
                    }
                    v8_store(scores + (size_t)i * len + (t - t0) * ATT_TILE + 8 * half, sc);
                }
        }
        for (int i = 0; i < group; i++) { /* exp(score - max) over the attended positions, 0 elsewhere */
            float *sc = scores + (size_t)i * len, mx = -INFINITY, sum = 0.0f;
            for (int u = 0; u < len; u++) {
                const long pos = t0 * ATT_TILE + u;
                if (pos >= first && pos < end) mx = fmaxf(mx, sc[u]);
            }
            for (int u = 0; u < len; u += 8) {
                v8f e = v8_exp(v8_load(sc + u) - mx);
                for (int l = 0; l < 8; l++) {
                    const long pos = t0 * ATT_TILE + u + l;
                    if (pos < first || pos >= end) e[l] = 0.0f;
                }
                v8_store(sc + u, e);
                sum += v8_sum(e);
            }
            a->part_m[part * ATT_MAX_HEADS + h0 + i] = mx;
            a->part_l[part * ATT_MAX_HEADS + h0 + i] = sum;
        }
        memset(o, 0, sizeof(float) * group * hd);
        for (long t = t0; t < t1; t++) { /* weighted values: each weight times its block's scale */
            const uint16_t *vst = vsg + (size_t)t * ATT_TILE * NB;
            for (int r = 0; r < ATT_TILE; r++) {
                const long pos = t * ATT_TILE + r;
                if (pos < first || pos >= end) continue;
                const int8_t *vrow = vg + (size_t)pos * hd;
                for (int b = 0; b < NB; b++) {
                    float vf[QK];
                    for (int c = 0; c < QK; c++) vf[c] = (float)vrow[b * QK + c];
                    const float dv = f16_to_f32(vst[b * ATT_TILE + r]);
                    for (int i = 0; i < group; i++) {
                        const v8f p = v8_set1(dv * scores[(size_t)i * len + (t - t0) * ATT_TILE + r]);
                        float *oi = o + (size_t)i * hd + b * QK;
                        for (int c = 0; c < QK; c += 8) v8_store(oi + c, v8_fma(p, v8_load(vf + c), v8_load(oi + c)));
                    }
                }
            }
        }
        for (int i = 0; i < group; i++)
            memcpy(a->part_o + ((size_t)part * ATT_MAX_HEADS + h0 + i) * hd, o + (size_t)i * hd, sizeof(float) * hd);
    }
}
