/* Decode attention's shared pieces in plain C (the ARM test driver includes them too): the
 * per-part state att_t, the q8_0 cache's tiled writes and the query's quantization. The layouts
 * are described in _kernels.c's attention section. */
#ifndef GARAGE_ATTENTION_H
#define GARAGE_ATTENTION_H
#include "core.h"

#define ATT_MAX_HEADS 128
#define ATT_MAX_HD 256
#define ATT_TILE 16

typedef struct {
    const float *q;
    const uint8_t *k, *v;     /* f16: position `first` of head 0; q8_0: position 0 (tiles) */
    const uint16_t *ks, *vs;  /* q8_0: f16 scales, one per 32 values (NULL for f16) */
    long stride_h;            /* values between heads in the cache (scales: stride_h / 32) */
    int H, Hkv, S, hd;        /* S: positions attended, first .. first + S - 1 */
    int first, per, units;    /* units (f16: positions, q8_0: tiles) attended, per part */
    float scale;
    float *part_m, *part_l, *part_o; /* this row's: [parts][ATT_MAX_HEADS] (m, l), [parts][ATT_MAX_HEADS][hd] (o) */
    /* q8_0: the query as q8_0 (int8 per head; per block d * scale and -128 * sum(q), which takes
     * the keys' +128 back out of the integer dots) */
    const int8_t *qq;
    const float *qd;
    const int32_t *qc;
} att_t;

/* Part `part` as one that saw no positions: weight 0 when the parts are merged (the call then
 * raises MemoryError). */
static void att_part_empty(const att_t *a, int part, int hd) {
    atomic_store(&g_nomem, 1);
    for (int h = 0; h < a->H; h++) {
        a->part_m[part * ATT_MAX_HEADS + h] = -INFINITY;
        a->part_l[part * ATT_MAX_HEADS + h] = 0.0f;
        memset(a->part_o + ((size_t)part * ATT_MAX_HEADS + h) * hd, 0, sizeof(float) * hd);
    }
}

/* The query as llama.cpp quantizes it for its q8_0 key dot: per head q8_0 values qq, and per
 * block of 32 qd = d * scale and qc = -128 * sum(q) (takes the keys' +128 back out). */
static void att_quantize_query(const float *q, int H, int hd, float scale, int8_t *qq, float *qd, int32_t *qc) {
    for (int h = 0; h < H; h++) {
        uint16_t d16[8];
        quantize_q8_0(q + (size_t)h * hd, qq + (size_t)h * hd, d16, hd);
        for (int b = 0; b < hd / QK; b++) {
            int32_t sum = 0;
            for (int i = 0; i < QK; i++) sum += qq[(size_t)h * hd + b * QK + i];
            qd[h * 8 + b] = f16_to_f32(d16[b]) * scale;
            qc[h * 8 + b] = -128 * sum;
        }
    }
}

/* One position's key and value (one head) into a q8_0 cache in the tiled layout above; kg, vg,
 * ks, vs: the head's position 0. */
static void store_q8_0(const float *kr, const float *vr, uint8_t *kg, int8_t *vg, uint16_t *ks, uint16_t *vs, long pos,
                       int hd) {
    int8_t q[ATT_MAX_HD];
    uint16_t d[8];
    const int nb = hd / QK, r = (int)(pos % ATT_TILE);
    const size_t t = (size_t)(pos / ATT_TILE);
    quantize_q8_0(kr, q, d, hd);
    uint8_t *kt = kg + t * ATT_TILE * hd;
    for (int i = 0; i < hd; i++) kt[(i / 4) * 64 + r * 4 + i % 4] = (uint8_t)(q[i] + 128);
    for (int b = 0; b < nb; b++) ks[(t * nb + b) * ATT_TILE + r] = d[b];
    quantize_q8_0(vr, vg + (size_t)pos * hd, d, hd);
    for (int b = 0; b < nb; b++) vs[(t * nb + b) * ATT_TILE + r] = d[b];
}

#endif /* GARAGE_ATTENTION_H */
