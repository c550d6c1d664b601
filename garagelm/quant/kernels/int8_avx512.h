/* Int8-activation products with AVX-512 VNNI and BITALG. Included by _kernels.c in its AVX-512 build. */
/* ---- products with int8 activations (llama.cpp's arithmetic for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0;
 * Q4_K too, with x in q8_0 blocks where llama.cpp takes q8_K's 256) ---------------------------
 * Each 32 values of x are quantized to q8_0 (int8, d = max|x| / 127 kept in f16: llama.cpp's
 * quantize_row_q8_0 / q8_1), each block's dot with the weights' integer values is taken exactly
 * with vpdpbusd, then scaled: y = sum_b dw_b dx_b sum(q xq) [+ m_b dx_b sum(xq)], Q4_0, Q5_0 and
 * Q8_0's offsets (8, 16, and the 128 that makes int8 weights unsigned) taken out of the integer
 * sums. Q5's fifth bits are added to the nibbles after the transpose, 64 at a time, by a bit
 * shuffle (vpshufbitqmb) that picks each byte's bit out of its row's 32 high bits.
 * Sixteen weight rows go together: their blocks are transposed in registers so that one
 * vpdpbusd with 4 bytes of x gives 16 rows' partial dots, with no horizontal sums, for every
 * row of x. Float32 FMAs did a fifth of that work per instruction, so 8 rows of x (a batched
 * decode step) cost four 1-row steps; here the weights' stream stays the limit. */
/* (the AVX-512 variant requires VNNI and BITALG, see core.h) */
#define DPBUSD(acc, u, s) _mm512_dpbusd_epi32(acc, u, s)

/* x (M, K) -> xq (M, K) int8 (vectorised quantize_q8_0: the same values), xd (M, nb) its f16 d as
 * float32, xs (M, nb) the sum of each block's int8 values, xds (M, nb) xd * xs (the min term's). */
static void quantize_x(const float *x, int M, int K, int8_t *xq, float *xd, int32_t *xs, float *xds) {
    const int nb = K / QK;
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
    for (int r = 0; r < M; r++)
        for (int b = 0; b < nb; b++) {
            const float *src = x + (size_t)r * K + (size_t)b * QK;
            const __m512 a = _mm512_loadu_ps(src), c = _mm512_loadu_ps(src + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(a, absmask), _mm512_and_ps(c, absmask)));
            const float s = amax / 127.0f, inv = s ? 1.0f / s : 0.0f;
            const uint16_t d16 = _cvtss_sh(s, _MM_FROUND_TO_NEAREST_INT);
            /* x * inv rounded to nearest even, as nearbyintf (MXCSR's default rounding) */
            const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(inv)));
            const __m512i qc = _mm512_cvtps_epi32(_mm512_mul_ps(c, _mm512_set1_ps(inv)));
            int8_t *dst = xq + (size_t)r * K + (size_t)b * QK;
            _mm_storeu_si128((__m128i *)dst, _mm512_cvtepi32_epi8(qa));
            _mm_storeu_si128((__m128i *)(dst + 16), _mm512_cvtepi32_epi8(qc));
            xd[r * nb + b] = f16_to_f32(d16);
            xs[r * nb + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qc));
            xds[r * nb + b] = xd[r * nb + b] * (float)xs[r * nb + b];
        }
}

/* Rows' 16-byte pieces at offset `at` of 16 consecutive rows (row p at rows[p]), transposed to
 * T[c]: lane 4L + g holds dword c of row 4g + L. */
static inline __attribute__((always_inline)) void load_t16(const uint8_t *const *rows, size_t at, __m512i T[4]) {
    __m512i A[4];
    for (int g = 0; g < 4; g++) {
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(rows[4 * g] + at)));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(rows[4 * g + 1] + at)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(rows[4 * g + 2] + at)), 2);
        A[g] = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(rows[4 * g + 3] + at)), 3);
    }
    const __m512i t0 = _mm512_unpacklo_epi32(A[0], A[1]), t1 = _mm512_unpackhi_epi32(A[0], A[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(A[2], A[3]), t3 = _mm512_unpackhi_epi32(A[2], A[3]);
    T[0] = _mm512_unpacklo_epi64(t0, t2);
    T[1] = _mm512_unpackhi_epi64(t0, t2);
    T[2] = _mm512_unpacklo_epi64(t1, t3);
    T[3] = _mm512_unpackhi_epi64(t1, t3);
}

static inline __attribute__((always_inline)) void rows_int8_m(const job_t *j, int n0, int n1, const int M,
                                                               const int kind) {
    const int K = j->K, nb = K / QK, nb16 = (nb + 15) & ~15;
    const size_t row_bytes = ROW_BYTES(kind, K), bb = BLOCK_BYTES(kind);
    /* lane k of a transposed vector holds row pi(k) = 4 (k % 4) + k / 4 (its own inverse) */
    const __m512i pi = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512i at_row = _mm512_mullo_epi32(pi, _mm512_set1_epi32(nb16));
    const int mins = INT8_MINS(kind);
    const int f32 = kind == P_Q4_F32 || kind == P_I8, halves = kind == P_I8_16; /* Q6_K: mc its 2nd scales */
    /* Q5: byte e of lane k of w[c] is value 4c + e (w[4 + c]: 16 + 4c + e) of lane k's row, whose
     * fifth bit is that bit of the row's 32 high bits; a lane pair shares a qword of H. */
    __m512i fifth[8];
    for (int c = 0; c < 8; c++) {
        const long long base = (c < 4 ? 4 * c : 16 + 4 * (c - 4)) * 0x0101010101010101LL;
        fifth[c] = _mm512_add_epi8(_mm512_set1_epi64(base), _mm512_set1_epi64(0x2322212003020100LL));
    }
    float *sc = thread_scratch(0, (size_t)(mins || halves ? 2 : 1) * 16 * nb16);
    if (!sc) { /* no scratch: nothing computed, and the call raises MemoryError */
        atomic_store(&g_nomem, 1);
        return;
    }
    float *mc = sc + 16 * nb16;
    for (int n = n0; n < n1; n += 16) {
        const int have = n1 - n < 16 ? n1 - n : 16; /* rows past n1 repeat the last one, unstored */
        const uint8_t *rows[16];
        for (int p = 0; p < 16; p++) {
            const int row = n + (p < have ? p : have - 1);
            rows[p] = j->w + (size_t)row * row_bytes;
            if (f32 || halves) { /* Q4_K, Q5_K: scales and mins; Q6_K: the two halves' scales, apart */
                kscales_pair(kind, j->d, (size_t)row, nb, sc + p * nb16, mc + p * nb16);
                continue;
            }
            row_scales512(j->d + (size_t)row * nb, sc + p * nb16, nb);
            if (mins) row_scales512(j->m + (size_t)row * nb, mc + p * nb16, nb);
        }
        const uint8_t *next = j->w + (size_t)(n + 16) * row_bytes;
        const int more = n + 16 < n1;
        /* Q5: where each lane's row keeps its high bits, from rows[0] (the last rows may repeat) */
        __m512i hi_at = _mm512_setzero_si512();
        if (IS_Q5(kind)) {
            int at_lane[16];
            for (int k = 0; k < 16; k++) at_lane[k] = (int)(rows[4 * (k % 4) + k / 4] - rows[0]);
            hi_at = _mm512_loadu_si512(at_lane);
        }
        __m512 acc[MAX_ROWS];
        for (int r = 0; r < M; r++) acc[r] = _mm512_setzero_ps();
        for (int b = 0; b < nb; b++) {
            if (INT8_PREFETCH && more) /* the next 16 rows, a block's share of them at a time */
                for (size_t o = 0; o < 16 * bb; o += 64) __builtin_prefetch(next + (size_t)b * 16 * bb + o, 0, 3);
            __m512i w[8], T[4], wsum[2];
            if (BYTE_VALUES(kind)) { /* Q8_0's int8 values as u8 = q + 128; Q5_K's (0..31), Q6_K's as they are */
                const __m512i flip = _mm512_set1_epi8(kind == P_Q8 ? (char)0x80 : 0);
                load_t16(rows, (size_t)b * QK, T);
                for (int c = 0; c < 4; c++) w[c] = _mm512_xor_si512(T[c], flip);
                load_t16(rows, (size_t)b * QK + 16, T);
                for (int c = 0; c < 4; c++) w[4 + c] = _mm512_xor_si512(T[c], flip);
            } else { /* nibbles: byte i holds values i and i + 16 */
                const __m512i nib = _mm512_set1_epi8(0x0F);
                load_t16(rows, (size_t)b * bb, T);
                for (int c = 0; c < 4; c++) {
                    w[c] = _mm512_and_si512(T[c], nib);
                    w[4 + c] = _mm512_and_si512(_mm512_srli_epi16(T[c], 4), nib);
                }
                if (IS_Q5(kind)) { /* values 0..31: add 16 where the fifth bit is set */
                    const __m512i H = _mm512_i32gather_epi32(hi_at, rows[0] + (size_t)b * bb + 16, 1);
                    for (int c = 0; c < 8; c++)
                        w[c] = _mm512_mask_add_epi8(w[c], _mm512_bitshuffle_epi64_mask(H, fifth[c]), w[c],
                                                    _mm512_set1_epi8(16));
                }
            }
            if (halves) /* Q6_K: x goes in as u8 = x + 128, so 128 * each half's weight sum comes out */
                for (int h = 0; h < 2; h++) {
                    wsum[h] = _mm512_setzero_si512();
                    for (int c = 4 * h; c < 4 * h + 4; c++) wsum[h] = DPBUSD(wsum[h], _mm512_set1_epi8(1), w[c]);
                    wsum[h] = _mm512_slli_epi32(wsum[h], 7);
                }
            const __m512 dw = _mm512_i32gather_ps(at_row, sc + b, 4);
            const __m512 mw = mins || halves ? _mm512_i32gather_ps(at_row, mc + b, 4) : _mm512_setzero_ps();
            /* the weights' offset: Q4_0's 8, Q5_0's 16, Q8_0's 128 (int8 stored unsigned) */
            const int off = kind == P_Q8 ? 128 : INT8_OFFSET(kind);
#pragma GCC unroll 8 /* accumulators in registers, not on the stack */
            for (int r = 0; r < M; r++) {
                const int32_t *xr = (const int32_t *)(j->xq + (size_t)r * K + (size_t)b * QK);
                const int32_t xs = j->xqs[r * nb + b];
                const float xd = j->xd[r * nb + b];
                if (halves) { /* two halves, two scales (mw: the second half's) */
                    __m512i h[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
                    for (int c = 0; c < 8; c++)
                        h[c / 4] = DPBUSD(h[c / 4], _mm512_set1_epi32((int)((uint32_t)xr[c] ^ 0x80808080u)), w[c]);
                    const __m512 xv = _mm512_set1_ps(xd);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(h[0], wsum[0])), _mm512_mul_ps(dw, xv), acc[r]);
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(h[1], wsum[1])), _mm512_mul_ps(mw, xv), acc[r]);
                    continue;
                }
                __m512i a0 = _mm512_set1_epi32(-off * xs), a1 = _mm512_setzero_si512();
                for (int c = 0; c < 8; c += 2) {
                    a0 = DPBUSD(a0, w[c], _mm512_set1_epi32(xr[c]));
                    a1 = DPBUSD(a1, w[c + 1], _mm512_set1_epi32(xr[c + 1]));
                }
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(a0, a1)),
                                         _mm512_mul_ps(dw, _mm512_set1_ps(xd)), acc[r]);
                if (mins) acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(j->xds[r * nb + b]), acc[r]);
            }
        }
        const __mmask16 keep = (__mmask16)((1u << have) - 1);
        for (int r = 0; r < M; r++)
            _mm512_mask_storeu_ps(j->y + (size_t)r * j->ldy + n, keep, _mm512_permutexvar_ps(pi, acc[r]));
    }
}

/* One copy per kind and row count (INT8_DISPATCH, core.h). */
static void rows_int8(const job_t *j, int n0, int n1) { INT8_DISPATCH(rows_int8_m, j, n0, n1) }
