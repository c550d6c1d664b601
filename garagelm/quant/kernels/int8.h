/* Products with int8 activations for the CPUs without AVX-512: plain C, AVX2 (with or without
 * AVX-VNNI) and AArch64 NEON with dot products. Pure C (no Python), so the ARM test driver
 * includes it as it is.
 *
 * The arithmetic is the AVX-512 kernel's (int8_avx512.h), output row by output row: x quantized
 * to q8_0 by quantize_x, each block's integer dot taken exactly, then per block, in block order,
 *     acc = fma((float)isum, dw * dx, acc)            and, for kinds with mins,
 *     acc = fma(mw, dx * sum(xq), acc)
 * so every variant gives the same bits. They differ in how many weight rows share one register:
 * 16 (AVX-512), 8 (AVX2: a 32-bit lane per row), 4 (NEON), 1 (plain C). Each block's values of
 * those rows are transposed in registers so one dot instruction with 4 bytes of x gives every
 * row's partial dot (see load_t8, load_t4).
 */
#ifndef GARAGE_INT8_H
#define GARAGE_INT8_H
#include "core.h"

/* Q6_K (P_I8_16): a scale per 16 values, so two integer dots a block, each folded in with its own
 * scale: acc = fma(lo, d_lo dx, acc), then acc = fma(hi, d_hi dx, acc). Its values are -32..31;
 * where the dot instruction wants unsigned bytes, x is made unsigned instead (x + 128) and 128
 * times the weights' sum comes back out. Q5_K (P_I8): values 0..31, float32 scales and mins. */

/* x (M, K) -> xq (M, K) as q8_0, xd (M, nb) its f16 scales as float32, xs (M, nb) the sums of
 * each block's int8 values, xds (M, nb) xd * xs: the same values as quantize_x (AVX-512). */
static void quantize_x_portable(const float *x, int M, int K, int8_t *xq, float *xd, int32_t *xs, float *xds) {
    const int nb = K / QK;
    for (int r = 0; r < M; r++)
        for (int b = 0; b < nb; b++) {
            int8_t *q = xq + (size_t)r * K + (size_t)b * QK;
            uint16_t d16;
            quantize_q8_0(x + (size_t)r * K + (size_t)b * QK, q, &d16, QK);
            int32_t s = 0;
            for (int i = 0; i < QK; i++) s += q[i];
            xd[r * nb + b] = f16_to_f32(d16);
            xs[r * nb + b] = s;
            xds[r * nb + b] = xd[r * nb + b] * (float)s;
        }
}

#if defined(HAVE_AVX2)
/* quantize_x_portable's values 32 at a time (prefill quantizes every row of x): the same max,
 * scale and rounding (vcvtps2dq rounds to nearest even, as nearbyintf) */
static void quantize_x_avx2(const float *x, int M, int K, int8_t *xq, float *xd, int32_t *xs, float *xds) {
    const int nb = K / QK;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    for (int r = 0; r < M; r++)
        for (int b = 0; b < nb; b++) {
            const float *src = x + (size_t)r * K + (size_t)b * QK;
            __m256 v[4], m = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(src + 8 * i), m = _mm256_max_ps(m, _mm256_and_ps(v[i], absmask));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float amax = _mm_cvtss_f32(h), s = amax / 127.0f, inv = s ? 1.0f / s : 0.0f;
            __m256i q[4], sum = _mm256_setzero_si256();
            for (int i = 0; i < 4; i++) {
                q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)));
                sum = _mm256_add_epi32(sum, q[i]);
            }
            /* int32 -> int8 (in range): packs work per 128-bit lane, a permute puts them in order */
            const __m256i p16 = _mm256_packs_epi32(q[0], q[1]), p16b = _mm256_packs_epi32(q[2], q[3]);
            const __m256i p8 = _mm256_packs_epi16(p16, p16b);
            _mm256_storeu_si256((__m256i *)(xq + (size_t)r * K + (size_t)b * QK),
                                _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
            const int32_t si = _mm_cvtsi128_si32(s4);
            xd[r * nb + b] = f16_to_f32(f32_to_f16(s));
            xs[r * nb + b] = si;
            xds[r * nb + b] = xd[r * nb + b] * (float)si;
        }
}
#endif

/* Block b of row n's scale and min (0 where the kind has none) as float32; for Q6_K the scales
 * of its two halves. */
static inline void int8_scale_min(const job_t *j, int n, int nb, int b, float *dw, float *mw) {
    const int kind = j->qtype;
    if (F32_SCALES(kind)) {
        kscales_block(kind, j->d, (size_t)n, nb, b, dw, mw);
    } else {
        *dw = f16_to_f32(j->d[(size_t)n * nb + b]);
        *mw = INT8_MINS(kind) ? f16_to_f32(j->m[(size_t)n * nb + b]) : 0.0f;
    }
}

/* One weight row at a time: the reference every vector variant equals bit for bit. */
static void rows_int8_generic(const job_t *j, int n0, int n1) {
    const int K = j->K, nb = K / QK, kind = j->qtype, M = j->M, off = INT8_OFFSET(kind);
    const size_t row_bytes = ROW_BYTES(kind, K), bb = BLOCK_BYTES(kind);
    for (int n = n0; n < n1; n++) {
        const uint8_t *row = j->w + (size_t)n * row_bytes;
        float acc[MAX_ROWS] = {0};
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = row + (size_t)b * bb;
            int8_t v[QK]; /* the block's integer values, before the offset */
            if (BYTE_VALUES(kind)) {
                memcpy(v, blk, QK);
            } else {
                uint32_t qh = 0;
                if (IS_Q5(kind)) memcpy(&qh, blk + 16, 4);
                for (int i = 0; i < 16; i++) {
                    v[i] = (int8_t)((blk[i] & 0x0F) | (((qh >> i) & 1) << 4));
                    v[i + 16] = (int8_t)((blk[i] >> 4) | (((qh >> (i + 16)) & 1) << 4));
                }
            }
            float dw, mw;
            int8_scale_min(j, n, nb, b, &dw, &mw);
            for (int r = 0; r < M; r++) {
                const int8_t *xq = j->xq + (size_t)r * K + (size_t)b * QK;
                if (kind == P_I8_16) { /* two halves, two scales (mw holds the second) */
                    int32_t lo = 0, hi = 0;
                    for (int i = 0; i < 16; i++) lo += v[i] * xq[i], hi += v[16 + i] * xq[16 + i];
                    acc[r] = fmaf((float)lo, dw * j->xd[r * nb + b], acc[r]);
                    acc[r] = fmaf((float)hi, mw * j->xd[r * nb + b], acc[r]);
                    continue;
                }
                int32_t s = -off * j->xqs[r * nb + b];
                for (int i = 0; i < QK; i++) s += v[i] * xq[i];
                acc[r] = fmaf((float)s, dw * j->xd[r * nb + b], acc[r]);
                if (INT8_MINS(kind)) acc[r] = fmaf(mw, j->xds[r * nb + b], acc[r]);
            }
        }
        for (int r = 0; r < M; r++) j->y[(size_t)r * j->ldy + n] = acc[r];
    }
}

/* n f16 values as float32 (exact), 8 or 4 at a time where the CPU converts them */
static inline void f16_row(const uint16_t *src, float *dst, int n) {
    int i = 0;
#if defined(HAVE_AVX2)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#elif defined(HAVE_NEON)
    for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(src + i))));
#endif
    for (; i < n; i++) dst[i] = f16_to_f32(src[i]);
}

/* Rows per group of the vector int8 kernel (0: no vector kernel here). */
#if defined(HAVE_AVX2)
#define INT8_GROUP 8
#elif defined(HAVE_NEON)
#define INT8_GROUP 4
#else
#define INT8_GROUP 0
#endif

/* Scales (and mins, 0 where the kind has none) of rows row[0..R) for every block, transposed:
 * sc[b * R + p] is row p's block b, the layout one vector load of R lanes takes (Q6_K: its
 * halves' scales in sc and mc). tmp: 2 nb floats. */
static inline void int8_scales_t(const job_t *j, const int *row, int R, int nb, float *sc, float *mc, float *tmp) {
    const int kind = j->qtype;
    if (F32_SCALES(kind)) { /* tmp: 2 nb floats */
        for (int p = 0; p < R; p++) {
            kscales_pair(kind, j->d, (size_t)row[p], nb, tmp, tmp + nb);
            for (int b = 0; b < nb; b++) sc[b * R + p] = tmp[b], mc[b * R + p] = tmp[nb + b];
        }
        return;
    }
    for (int p = 0; p < R; p++) {
        const size_t at = (size_t)row[p] * nb;
        f16_row(j->d + at, tmp, nb);
        for (int b = 0; b < nb; b++) sc[b * R + p] = tmp[b];
        if (!INT8_MINS(kind)) {
            for (int b = 0; b < nb; b++) mc[b * R + p] = 0.0f;
            continue;
        }
        f16_row(j->m + at, tmp, nb);
        for (int b = 0; b < nb; b++) mc[b * R + p] = tmp[b];
    }
}

/* The weight rows of the group starting at n, R of them, the last one repeated past n1 (its
 * outputs are computed, never stored); returns how many are real. */
static inline int int8_group_rows(int n, int n1, int R, int *row) {
    const int have = n1 - n < R ? n1 - n : R;
    for (int p = 0; p < R; p++) row[p] = n + (p < have ? p : have - 1);
    return have;
}

/* The group's transposed scales, its mins R * nb floats further on: prefill's, transposed once for
 * every group of x rows (j->sct, rows_int8_many, from the call's first row n0), or transposed now
 * into sc (mins into mc = sc + R * nb). */
static inline const float *int8_group_scales(const job_t *j, int n, int n0, const int *row, int R, int nb, float *sc,
                                             float *tmp) {
    if (j->sct) return j->sct + (size_t)(n - n0) * 2 * nb;
    int8_scales_t(j, row, R, nb, sc, sc + (size_t)R * nb, tmp);
    return sc;
}

#if defined(HAVE_AVX2)
/* Rows' 16-byte pieces at offset `at` of 8 consecutive rows transposed: lane p of T[c] holds
 * dword c of row p. */
static inline __attribute__((always_inline)) void load_t8(const uint8_t *const *rows, size_t at, __m256i T[4]) {
    __m256i A[4];
    for (int g = 0; g < 4; g++)
        A[g] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(rows[g] + at))),
                                       _mm_loadu_si128((const __m128i *)(rows[g + 4] + at)), 1);
    const __m256i t0 = _mm256_unpacklo_epi32(A[0], A[1]), t1 = _mm256_unpackhi_epi32(A[0], A[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(A[2], A[3]), t3 = _mm256_unpackhi_epi32(A[2], A[3]);
    T[0] = _mm256_unpacklo_epi64(t0, t2);
    T[1] = _mm256_unpackhi_epi64(t0, t2);
    T[2] = _mm256_unpacklo_epi64(t1, t3);
    T[3] = _mm256_unpackhi_epi64(t1, t3);
}

/* The block's 32 values of 8 rows as 8 vectors (w[c]: values 4c..4c+3, w[4 + c]: 16 + 4c..) dotted
 * with x's 32 int8: per lane the exact integer sum. Without VNNI, vpmaddubsw's int16 pair sums
 * would overflow on Q8_0's bytes, so Q8_0 goes signed (|w| times x with w's sign, llama.cpp's
 * trick: at most 2 * 128 * 127 a pair), and 4-bit/5-bit values (at most 31) add four pair sums
 * in int16 (at most 31496) before widening. */
static inline __attribute__((always_inline)) __m256i dot8_avx2(const __m256i *w, const int32_t *x, int q8, int q4) {
#if defined(HAVE_AVXVNNI)
    (void)q8, (void)q4; /* Q8_0's values arrive as u8 = q + 128: the caller takes 128 * sum(x) back out */
    __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
    for (int c = 0; c < 8; c += 2) {
        a0 = _mm256_dpbusd_avx_epi32(a0, w[c], _mm256_set1_epi32(x[c]));
        a1 = _mm256_dpbusd_avx_epi32(a1, w[c + 1], _mm256_set1_epi32(x[c + 1]));
    }
    return _mm256_add_epi32(a0, a1);
#else
    const __m256i ones = _mm256_set1_epi16(1);
    if (q8) {
        __m256i a = _mm256_setzero_si256();
        for (int c = 0; c < 8; c++) {
            const __m256i xv = _mm256_set1_epi32(x[c]);
            const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w[c], w[c]), _mm256_sign_epi8(xv, w[c]));
            a = _mm256_add_epi32(a, _mm256_madd_epi16(p, ones));
        }
        return a;
    }
    __m256i p0 = _mm256_setzero_si256(), p1 = _mm256_setzero_si256();
    for (int c = 0; c < 4; c++) {
        p0 = _mm256_add_epi16(p0, _mm256_maddubs_epi16(w[c], _mm256_set1_epi32(x[c])));
        p1 = _mm256_add_epi16(p1, _mm256_maddubs_epi16(w[4 + c], _mm256_set1_epi32(x[4 + c])));
    }
    if (q4) /* 4-bit values: all eight pair sums fit int16 (at most 30480), one widening */
        return _mm256_madd_epi16(_mm256_add_epi16(p0, p1), ones);
    return _mm256_add_epi32(_mm256_madd_epi16(p0, ones), _mm256_madd_epi16(p1, ones));
#endif
}

#if defined(HAVE_AVXVNNI)
/* acc + per lane the sum of its 4 signed bytes of w */
static inline __m256i dpbusd_ones_avx2(__m256i acc, __m256i w) {
    return _mm256_dpbusd_avx_epi32(acc, _mm256_set1_epi8(1), w);
}
#else
#define dpbusd_ones_avx2(acc, w) (acc) /* unused without VNNI */
#endif

/* Q6_K: the dots of the block's two halves (values 0-15: w[0..3], 16-31: w[4..7], signed bytes)
 * with x; wsum: per lane 128 * the weights' sum over each half (VNNI takes x + 128 unsigned). */
static inline __attribute__((always_inline)) void dot8_halves_avx2(const __m256i *w, const int32_t *x, const __m256i *wsum,
                                                                    __m256i *lo, __m256i *hi) {
    __m256i h[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
#if defined(HAVE_AVXVNNI)
    for (int c = 0; c < 8; c++)
        h[c / 4] = _mm256_dpbusd_avx_epi32(h[c / 4], _mm256_set1_epi32((int)((uint32_t)x[c] ^ 0x80808080u)), w[c]);
    *lo = _mm256_sub_epi32(h[0], wsum[0]), *hi = _mm256_sub_epi32(h[1], wsum[1]);
#else
    (void)wsum;
    for (int c = 0; c < 8; c++) {
        const __m256i xv = _mm256_set1_epi32(x[c]);
        const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w[c], w[c]), _mm256_sign_epi8(xv, w[c]));
        h[c / 4] = _mm256_add_epi32(h[c / 4], _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
    }
    *lo = h[0], *hi = h[1];
#endif
}

static inline __attribute__((always_inline)) void rows_int8_avx2_m(const job_t *j, int n0, int n1, const int M,
                                                                    const int kind) {
    const int K = j->K, nb = K / QK, mins = INT8_MINS(kind);
#if defined(HAVE_AVXVNNI)
    const int vnni = 1;
#else
    const int vnni = 0;
#endif
    /* Q8_0 with VNNI: u8 = q + 128, so 128 * sum(x) comes back out, as in the AVX-512 kernel */
    const int off = kind == P_Q8 && vnni ? 128 : INT8_OFFSET(kind);
    const size_t row_bytes = ROW_BYTES(kind, K), bb = BLOCK_BYTES(kind);
    float *sc = thread_scratch(0, (size_t)18 * nb);
    if (!sc) {
        atomic_store(&g_nomem, 1);
        return;
    }
    float *tmp = sc + 16 * nb; /* sc: the group's scales, then its mins */
    for (int n = n0; n < n1; n += 8) {
        int row[8];
        const int have = int8_group_rows(n, n1, 8, row);
        const uint8_t *rows[8];
        for (int p = 0; p < 8; p++) rows[p] = j->w + (size_t)row[p] * row_bytes;
        const float *sg = int8_group_scales(j, n, n0, row, 8, nb, sc, tmp), *mg = sg + 8 * nb;
        const uint8_t *next = j->w + (size_t)(n + 8) * row_bytes;
        const int more = n + 8 < n1;
        __m256i hi_at = _mm256_setzero_si256(); /* Q5: each row's offset from rows[0] */
        if (IS_Q5(kind)) {
            int at_lane[8];
            for (int p = 0; p < 8; p++) at_lane[p] = (int)(rows[p] - rows[0]);
            hi_at = _mm256_loadu_si256((const __m256i *)at_lane);
        }
        __m256 acc[MAX_ROWS];
        for (int r = 0; r < M; r++) acc[r] = _mm256_setzero_ps();
        for (int b = 0; b < nb; b++) {
            if (INT8_PREFETCH && more)
                for (size_t o = 0; o < 8 * bb; o += 64) __builtin_prefetch(next + (size_t)b * 8 * bb + o, 0, 3);
            __m256i w[8], T[4], wsum[2];
            if (BYTE_VALUES(kind)) { /* Q8_0 (unsigned with VNNI: q + 128), Q5_K, Q6_K */
                const __m256i flip = _mm256_set1_epi8(vnni && kind == P_Q8 ? (char)0x80 : 0);
                load_t8(rows, (size_t)b * QK, T);
                for (int c = 0; c < 4; c++) w[c] = _mm256_xor_si256(T[c], flip);
                load_t8(rows, (size_t)b * QK + 16, T);
                for (int c = 0; c < 4; c++) w[4 + c] = _mm256_xor_si256(T[c], flip);
            } else {
                const __m256i nib = _mm256_set1_epi8(0x0F);
                load_t8(rows, (size_t)b * bb, T);
                for (int c = 0; c < 4; c++) {
                    w[c] = _mm256_and_si256(T[c], nib);
                    w[4 + c] = _mm256_and_si256(_mm256_srli_epi16(T[c], 4), nib);
                }
                if (IS_Q5(kind)) { /* add 16 where the fifth bit is set */
                    const __m256i H = _mm256_i32gather_epi32((const int *)(rows[0] + (size_t)b * bb + 16), hi_at, 1);
                    for (int c = 0; c < 8; c++) {
                        /* values 4c..4c+3 (c < 4) or 16 + 4(c-4)..: byte k of each row's high bits */
                        const char k = (char)(c < 4 ? c / 2 : 2 + (c - 4) / 2), sh = (char)(4 * (c % 2));
                        const __m256i pick = _mm256_setr_epi8(
                            k, k, k, k, 4 + k, 4 + k, 4 + k, 4 + k, 8 + k, 8 + k, 8 + k, 8 + k, 12 + k, 12 + k, 12 + k,
                            12 + k, k, k, k, k, 4 + k, 4 + k, 4 + k, 4 + k, 8 + k, 8 + k, 8 + k, 8 + k, 12 + k, 12 + k,
                            12 + k, 12 + k);
                        const __m256i bit = _mm256_set1_epi32((int)(0x08040201u << sh));
                        const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(H, pick), bit), bit);
                        w[c] = _mm256_add_epi8(w[c], _mm256_and_si256(set, _mm256_set1_epi8(16)));
                    }
                }
            }
            if (kind == P_I8_16 && vnni) /* 128 * each half's weight sum */
                for (int h = 0; h < 2; h++) {
                    wsum[h] = _mm256_setzero_si256();
                    for (int c = 4 * h; c < 4 * h + 4; c++)
                        wsum[h] = dpbusd_ones_avx2(wsum[h], w[c]);
                    wsum[h] = _mm256_slli_epi32(wsum[h], 7);
                }
            const __m256 dw = _mm256_loadu_ps(sg + (size_t)b * 8);
            const __m256 mw = mins || kind == P_I8_16 ? _mm256_loadu_ps(mg + (size_t)b * 8) : _mm256_setzero_ps();
#pragma GCC unroll 8
            for (int r = 0; r < M; r++) {
                const int32_t *xr = (const int32_t *)(j->xq + (size_t)r * K + (size_t)b * QK);
                if (kind == P_I8_16) { /* two halves, two scales (mw: the second half's) */
                    __m256i lo, hi;
                    dot8_halves_avx2(w, xr, wsum, &lo, &hi);
                    const __m256 xd = _mm256_set1_ps(j->xd[r * nb + b]);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_mul_ps(dw, xd), acc[r]);
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), _mm256_mul_ps(mw, xd), acc[r]);
                    continue;
                }
                __m256i s = dot8_avx2(w, xr, kind == P_Q8, kind == P_Q4_0 || kind == P_Q4_MIN || kind == P_Q4_F32);
                if (off) s = _mm256_add_epi32(s, _mm256_set1_epi32(-off * j->xqs[r * nb + b]));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_set1_ps(j->xd[r * nb + b])),
                                         acc[r]);
                if (mins) acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(j->xds[r * nb + b]), acc[r]);
            }
        }
        for (int r = 0; r < M; r++) {
            float out[8];
            _mm256_storeu_ps(out, acc[r]);
            memcpy(j->y + (size_t)r * j->ldy + n, out, sizeof(float) * have);
        }
    }
}

/* One copy per kind and row count (INT8_DISPATCH, core.h). */
static void rows_int8(const job_t *j, int n0, int n1) { INT8_DISPATCH(rows_int8_avx2_m, j, n0, n1) }

#elif defined(HAVE_NEON)
/* 4 rows' 16-byte pieces at offset `at` transposed: lane p of T[c] holds dword c of row p. */
static inline __attribute__((always_inline)) void load_t4(const uint8_t *const *rows, size_t at, uint8x16_t T[4]) {
    const uint32x4x2_t t01 = vtrnq_u32(vreinterpretq_u32_u8(vld1q_u8(rows[0] + at)),
                                       vreinterpretq_u32_u8(vld1q_u8(rows[1] + at)));
    const uint32x4x2_t t23 = vtrnq_u32(vreinterpretq_u32_u8(vld1q_u8(rows[2] + at)),
                                       vreinterpretq_u32_u8(vld1q_u8(rows[3] + at)));
    T[0] = vreinterpretq_u8_u32(vcombine_u32(vget_low_u32(t01.val[0]), vget_low_u32(t23.val[0])));
    T[1] = vreinterpretq_u8_u32(vcombine_u32(vget_low_u32(t01.val[1]), vget_low_u32(t23.val[1])));
    T[2] = vreinterpretq_u8_u32(vcombine_u32(vget_high_u32(t01.val[0]), vget_high_u32(t23.val[0])));
    T[3] = vreinterpretq_u8_u32(vcombine_u32(vget_high_u32(t01.val[1]), vget_high_u32(t23.val[1])));
}

static inline __attribute__((always_inline)) void rows_int8_neon_m(const job_t *j, int n0, int n1, const int M,
                                                                    const int kind) {
    const int K = j->K, nb = K / QK, mins = INT8_MINS(kind), off = INT8_OFFSET(kind);
    const size_t row_bytes = ROW_BYTES(kind, K), bb = BLOCK_BYTES(kind);
    float *sc = thread_scratch(0, (size_t)10 * nb);
    if (!sc) {
        atomic_store(&g_nomem, 1);
        return;
    }
    float *tmp = sc + 8 * nb; /* sc: the group's scales, then its mins */
    for (int n = n0; n < n1; n += 4) {
        int row[4];
        const int have = int8_group_rows(n, n1, 4, row);
        const uint8_t *rows[4];
        for (int p = 0; p < 4; p++) rows[p] = j->w + (size_t)row[p] * row_bytes;
        const float *sg = int8_group_scales(j, n, n0, row, 4, nb, sc, tmp), *mg = sg + 4 * nb;
        float32x4_t acc[MAX_ROWS];
        for (int r = 0; r < M; r++) acc[r] = vdupq_n_f32(0.0f);
        for (int b = 0; b < nb; b++) {
            int8x16_t w[8];
            uint8x16_t T[4];
            if (BYTE_VALUES(kind)) { /* Q8_0, Q5_K, Q6_K: signed values (vdot is int8 x int8) */
                load_t4(rows, (size_t)b * QK, T);
                for (int c = 0; c < 4; c++) w[c] = vreinterpretq_s8_u8(T[c]);
                load_t4(rows, (size_t)b * QK + 16, T);
                for (int c = 0; c < 4; c++) w[4 + c] = vreinterpretq_s8_u8(T[c]);
            } else {
                load_t4(rows, (size_t)b * bb, T);
                uint8x16_t u[8];
                for (int c = 0; c < 4; c++) {
                    u[c] = vandq_u8(T[c], vdupq_n_u8(0x0F));
                    u[4 + c] = vshrq_n_u8(T[c], 4);
                }
                if (IS_Q5(kind)) { /* add 16 where the fifth bit is set */
                    uint32_t qh[4];
                    for (int p = 0; p < 4; p++) memcpy(&qh[p], rows[p] + (size_t)b * bb + 16, 4);
                    const uint8x16_t H = vreinterpretq_u8_u32(vld1q_u32(qh));
                    for (int c = 0; c < 8; c++) {
                        const uint8_t k = (uint8_t)(c < 4 ? c / 2 : 2 + (c - 4) / 2), sh = (uint8_t)(4 * (c % 2));
                        const uint8_t pick_b[16] = {k, k, k, k, 4 + k, 4 + k, 4 + k, 4 + k,
                                                    8 + k, 8 + k, 8 + k, 8 + k, 12 + k, 12 + k, 12 + k, 12 + k};
                        const uint32x4_t bit32 = vdupq_n_u32(0x08040201u << sh);
                        const uint8x16_t set = vtstq_u8(vqtbl1q_u8(H, vld1q_u8(pick_b)), vreinterpretq_u8_u32(bit32));
                        u[c] = vaddq_u8(u[c], vandq_u8(set, vdupq_n_u8(16)));
                    }
                }
                for (int c = 0; c < 8; c++) w[c] = vreinterpretq_s8_u8(u[c]);
            }
            const float32x4_t dw = vld1q_f32(sg + (size_t)b * 4), mw = vld1q_f32(mg + (size_t)b * 4);
            for (int r = 0; r < M; r++) {
                const int8_t *xr = j->xq + (size_t)r * K + (size_t)b * QK;
                const int8x16_t x0 = vld1q_s8(xr), x1 = vld1q_s8(xr + 16);
                int32x4_t s0 = vdupq_n_s32(-off * j->xqs[r * nb + b]), s1 = vdupq_n_s32(0);
                if (kind == P_I8_16) { /* two halves, two scales (mw: the second half's) */
                    s0 = vdotq_laneq_s32(s0, w[0], x0, 0);
                    s0 = vdotq_laneq_s32(s0, w[1], x0, 1);
                    s0 = vdotq_laneq_s32(s0, w[2], x0, 2);
                    s0 = vdotq_laneq_s32(s0, w[3], x0, 3);
                    s1 = vdotq_laneq_s32(s1, w[4], x1, 0);
                    s1 = vdotq_laneq_s32(s1, w[5], x1, 1);
                    s1 = vdotq_laneq_s32(s1, w[6], x1, 2);
                    s1 = vdotq_laneq_s32(s1, w[7], x1, 3);
                    acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(s0), vmulq_n_f32(dw, j->xd[r * nb + b]));
                    acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(s1), vmulq_n_f32(mw, j->xd[r * nb + b]));
                    continue;
                }
                s0 = vdotq_laneq_s32(s0, w[0], x0, 0);
                s1 = vdotq_laneq_s32(s1, w[1], x0, 1);
                s0 = vdotq_laneq_s32(s0, w[2], x0, 2);
                s1 = vdotq_laneq_s32(s1, w[3], x0, 3);
                s0 = vdotq_laneq_s32(s0, w[4], x1, 0);
                s1 = vdotq_laneq_s32(s1, w[5], x1, 1);
                s0 = vdotq_laneq_s32(s0, w[6], x1, 2);
                s1 = vdotq_laneq_s32(s1, w[7], x1, 3);
                acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(vaddq_s32(s0, s1)), vmulq_n_f32(dw, j->xd[r * nb + b]));
                if (mins) acc[r] = vfmaq_f32(acc[r], mw, vdupq_n_f32(j->xds[r * nb + b]));
            }
        }
        for (int r = 0; r < M; r++) {
            float out[4];
            vst1q_f32(out, acc[r]);
            memcpy(j->y + (size_t)r * j->ldy + n, out, sizeof(float) * have);
        }
    }
}

static void rows_int8(const job_t *j, int n0, int n1) { INT8_DISPATCH(rows_int8_neon_m, j, n0, n1) }

#elif !defined(HAVE_AVX512)
#define rows_int8 rows_int8_generic
#endif

/* Weight rows n0..n1's scales transposed for the vector kernel, a group of INT8_GROUP rows after
 * another (each its scales then its mins): what rows_int8 reads from j->sct, so that prefill's
 * groups of x rows do not each redo it. NULL where there is no such kernel or no memory. */
static float *int8_scales_all(const job_t *j, int n0, int n1) {
#if INT8_GROUP == 0
    (void)j, (void)n0, (void)n1;
    return NULL;
#else
    const int R = INT8_GROUP, nb = j->K / QK;
    const int groups = (n1 - n0 + R - 1) / R;
    float *out = malloc(sizeof(float) * ((size_t)groups * 2 * R * nb + 2 * nb));
    if (!out) return NULL;
    for (int g = 0; g < groups; g++) {
        int row[8];
        int8_group_rows(n0 + g * R, n1, R, row);
        float *sc = out + (size_t)g * 2 * R * nb;
        int8_scales_t(j, row, R, nb, sc, sc + (size_t)R * nb, out + (size_t)groups * 2 * R * nb);
    }
    return out;
#endif
}

#endif /* GARAGE_INT8_H */
