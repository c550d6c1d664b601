/* The kernels of one variant against plain C on the same inputs, without Python: how the NEON
 * kernels are checked on x86 machines (cross-compiled for aarch64, run under qemu-user by
 * tests/test_arm_kernels.py). Built for x86 it checks the AVX2 and generic builds the same way.
 *
 *   int8 products: the variant's rows_int8 equals rows_int8_generic bit for bit, every kind,
 *                  1, 3 and 8 rows of x, a partial last group of weight rows, and with the
 *                  scales transposed beforehand as prefill does;
 *   attention:     f16 and q8_0 caches, grouped heads, a window, against float64 attention over
 *                  the values the cache holds (and the query as the q8_0 key dot takes it).
 * Prints one line per check and exits 1 if any fails.
 */
#include <stdio.h>

#include "../../garagelm/quant/kernels/core.h"
#include "../../garagelm/quant/kernels/int8.h"
#include "../../garagelm/quant/kernels/vec16.h"
#include "../../garagelm/quant/kernels/attention.h"
#include "../../garagelm/quant/kernels/attention_v16.h"

static uint32_t seed = 12345;
static uint32_t next_u32(void) {
    seed = seed * 1664525u + 1013904223u;
    return seed >> 8;
}
static float uniform(void) { return (float)next_u32() / (float)(1u << 24) * 2.0f - 1.0f; }

static int check_products(void) {
    const int kinds[] = {P_Q4_MIN, P_Q4_0, P_Q8, P_Q4_F32, P_Q5_1, P_Q5_0, P_I8, P_I8_16};
    const char *names[] = {"Q4_1", "Q4_0", "Q8_0", "Q4_K", "Q5_1", "Q5_0", "Q5_K", "Q6_K"};
    const int N = 37, K = 256, nb = K / QK;
    int failed = 0;
    for (int t = 0; t < 8; t++) {
        const int kind = kinds[t];
        const size_t bytes = ROW_BYTES(kind, K) * N;
        uint8_t *w = malloc(bytes);
        for (size_t i = 0; i < bytes; i++) /* Q5_K's values are 0..31, Q6_K's -32..31 */
            w[i] = kind == P_I8 ? (uint8_t)(next_u32() % 32) : kind == P_I8_16 ? (uint8_t)(next_u32() % 64 - 32) : (uint8_t)next_u32();
        float *d32 = malloc(sizeof(float) * N * nb), *m32 = malloc(sizeof(float) * N * nb);
        uint16_t *d16 = malloc(2 * N * nb), *m16 = malloc(2 * N * nb);
        for (int i = 0; i < N * nb; i++) {
            d32[i] = uniform() * 0.02f, m32[i] = uniform() * 0.1f;
            d16[i] = f32_to_f16(d32[i]), m16[i] = f32_to_f16(m32[i]);
        }
        const int f32 = F32_SCALES(kind);
        /* K-quant kinds: each row's scales as KSCALES (core.h) lays them out */
        uint8_t *ks = malloc(KROW_BYTES(kind, nb) * N);
        for (int n = 0; n < N; n++) {
            uint8_t *row = ks + KROW_BYTES(kind, nb) * n;
            const int sb = KSB(nb), floats = kind == P_I8_16 ? sb : 2 * sb;
            for (int i = 0; i < floats; i++) {
                const float v = (uniform() + 1.5f) * 0.002f;
                memcpy(row + 4 * i, &v, 4);
            }
            for (size_t i = 4 * (size_t)floats; i < KROW_BYTES(kind, nb); i++)
                row[i] = kind == P_I8_16 ? (uint8_t)(next_u32() % 128 - 64) : (uint8_t)(next_u32() % 64);
        }
        for (int M = 1; M <= 8; M += M == 1 ? 2 : 5) { /* 1, 3, 8 */
            float *x = malloc(sizeof(float) * M * K), *y = malloc(sizeof(float) * M * N), *y0 = malloc(sizeof(float) * M * N);
            for (int i = 0; i < M * K; i++) x[i] = uniform() * (i % 7 == 0 ? 30.0f : 2.0f);
            int8_t *xq = malloc((size_t)M * K);
            float *xd = malloc(sizeof(float) * M * nb), *xds = malloc(sizeof(float) * M * nb);
            int32_t *xs = malloc(sizeof(int32_t) * M * nb);
            quantize_x_portable(x, M, K, xq, xd, xs, xds);
            job_t j = {kind, M, N, K, N, w, x, y, f32 ? (const uint16_t *)ks : d16, f32 ? NULL : m16,
                       NULL, NULL, xq, xd, xs, xds, 0};
            rows_int8(&j, 0, N);
            j.y = y0;
            rows_int8_generic(&j, 0, N);
            int same = memcmp(y, y0, sizeof(float) * M * N) == 0;
            float *sct = int8_scales_all(&j, 0, N); /* prefill's scales, transposed once */
            if (sct) {
                j.sct = sct, j.y = y;
                memset(y, 0, sizeof(float) * M * N);
                rows_int8(&j, 0, N);
                same &= memcmp(y, y0, sizeof(float) * M * N) == 0;
                free(sct);
            }
            printf("%s int8 product %s, %d rows: %s\n", VARIANT_NAME, names[t], M, same ? "same bits" : "DIFFERENT");
            failed |= !same;
            free(x), free(y), free(y0), free(xq), free(xd), free(xds), free(xs);
        }
        free(w), free(d32), free(m32), free(d16), free(m16), free(ks);
    }
    return failed;
}

/* float64 attention over what the cache holds; q8: keys, values and query dequantized */
static int check_attention(int q8) {
    const int H = 6, Hkv = 2, hd = 64, cap = 64, first = 3, end = 41, S = end - first, nb = hd / QK;
    const float scale = 0.125f;
    float q[6 * 64], kf[2][64][64], vf[2][64][64];
    for (int i = 0; i < H * hd; i++) q[i] = uniform() * 2.0f;
    uint16_t *k16 = calloc((size_t)Hkv * cap * hd, 2), *v16 = calloc((size_t)Hkv * cap * hd, 2);
    uint8_t *kq = calloc((size_t)Hkv * cap * hd, 1);
    int8_t *vq = calloc((size_t)Hkv * cap * hd, 1);
    uint16_t *ks = calloc((size_t)Hkv * cap * nb, 2), *vs = calloc((size_t)Hkv * cap * nb, 2);
    for (int g = 0; g < Hkv; g++)
        for (int p = 0; p < end; p++) {
            float kr[64], vr[64];
            for (int c = 0; c < hd; c++) kr[c] = uniform() * 3.0f + (c == 5 ? 6.0f : 0.0f), vr[c] = uniform();
            const size_t at = (size_t)g * cap * hd;
            for (int c = 0; c < hd; c++) k16[at + p * hd + c] = f32_to_f16(kr[c]), v16[at + p * hd + c] = f32_to_f16(vr[c]);
            store_q8_0(kr, vr, kq + at, vq + at, ks + at / QK, vs + at / QK, p, hd);
            /* what the cache holds, for the reference */
            int8_t qk[64];
            uint16_t dk[2];
            quantize_q8_0(kr, qk, dk, hd);
            for (int c = 0; c < hd; c++) {
                kf[g][p][c] = q8 ? (float)qk[c] * f16_to_f32(dk[c / QK]) : f16_to_f32(k16[at + p * hd + c]);
                vf[g][p][c] = q8 ? (float)vq[at + p * hd + c] * f16_to_f32(vs[(at / QK) + (p / ATT_TILE * nb + c / QK) * ATT_TILE + p % ATT_TILE])
                                 : f16_to_f32(v16[at + p * hd + c]);
            }
        }
    int8_t qq[6 * 64];
    float qd[6 * 8], pm[ATT_MAX_HEADS], pl[ATT_MAX_HEADS], po[ATT_MAX_HEADS * 64];
    int32_t qc[6 * 8];
    att_quantize_query(q, H, hd, scale, qq, qd, qc);
    const int units = q8 ? (end + ATT_TILE - 1) / ATT_TILE - first / ATT_TILE : S;
    const size_t at = q8 ? 0 : (size_t)first * hd * 2;
    const att_t a = {q, (q8 ? kq : (uint8_t *)k16) + at, (q8 ? (uint8_t *)vq : (uint8_t *)v16) + at, q8 ? ks : NULL,
                     q8 ? vs : NULL, (long)cap * hd, H, Hkv, S, hd, first, units, units, scale, pm, pl, po, qq, qd, qc};
    if (q8)
        att_q8_v16(&a, 0, units);
    else
        att_rows_v16(&a, 0, units);
    double worst = 0.0;
    for (int h = 0; h < H; h++) {
        const int g = h / (H / Hkv);
        double qh[64], sc[64], mx = -1e300, sum = 0.0;
        for (int c = 0; c < hd; c++)
            qh[c] = q8 ? (double)qq[h * hd + c] * (double)qd[h * 8 + c / QK] / scale : (double)q[h * hd + c];
        for (int p = first; p < end; p++) {
            double s = 0.0;
            for (int c = 0; c < hd; c++) s += qh[c] * kf[g][p][c];
            sc[p] = s * scale, mx = sc[p] > mx ? sc[p] : mx;
        }
        for (int p = first; p < end; p++) sc[p] = exp(sc[p] - mx), sum += sc[p];
        for (int c = 0; c < hd; c++) {
            double want = 0.0;
            for (int p = first; p < end; p++) want += sc[p] / sum * vf[g][p][c];
            const double got = po[h * hd + c] / pl[h], err = fabs(got - want);
            worst = err > worst ? err : worst;
        }
    }
    const int ok = worst < 2e-5;
    printf("%s attention, %s cache: max error %.2e against float64: %s\n", VARIANT_NAME, q8 ? "q8_0" : "f16", worst,
           ok ? "ok" : "TOO LARGE");
    free(k16), free(v16), free(kq), free(vq), free(ks), free(vs);
    return !ok;
}

int main(void) {
    int failed = check_products();
    failed |= check_attention(0);
    failed |= check_attention(1);
    return failed;
}
