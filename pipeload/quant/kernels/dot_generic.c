/* Decode products in plain C: one weight row against R activation rows (R <= TILE_ROWS).
 *
 * These define the arithmetic: every SIMD version (dot_x86.c, dot_neon.c) computes the same
 * integers and the same float operations in the same order, so all give the same bits (the
 * tests check it), whatever the machine. Per row:
 * - legacy blocks of 32: isum = exact integer dot of the block; t = (float)isum * (dw * dx)
 *   (then + mw * s for Q4_1/Q5_1); block b is added to partial sum b % 4, in block order;
 *   y = (P0 + P1) + (P2 + P3).
 * - K-quant super-blocks of 256: sumi = sum over sub-blocks of scale * (integer dot), summ =
 *   sum of min * (activation block sums), both exact integers; y += (d * dx) * (float)sumi -
 *   (dmin * dx) * (float)summ, super-block by super-block.
 * - float rows: value i goes to partial sum i % 64 by a fused multiply-add, in order; the 64
 *   partials are added by the fixed tree of float_tree64.
 */
#include "pl.h"

/* ---- legacy 32-value blocks ---- */

/* w[32] signed weights of one block against row r's block b: sum of w * q */
PL_INLINE int32_t isum32(const int8_t *w, const int8_t *x) {
    int32_t s = 0;
    for (int j = 0; j < QK; j++) s += (int32_t)w[j] * (int32_t)x[j];
    return s;
}

#define LEGACY_DOT(NAME, BYTES, UNPACK, HAS_MIN)                                                   \
    void dot_##NAME##_generic(const uint8_t *w, int64_t k, const pl_act *a, int64_t r0, int R, float *out) { \
        float acc[TILE_ROWS][4] = {{0}};                                                           \
        int8_t q[QK];                                                                              \
        for (int64_t b = 0; b < k / QK; b++) {                                                     \
            const uint8_t *blk = w + b * (BYTES);                                                  \
            float dw = load_fp16(blk), mw = HAS_MIN ? load_fp16(blk + 2) : 0.f;                     \
            UNPACK;                                                                                \
            for (int t = 0; t < R; t++) {                                                          \
                int32_t s = isum32(q, act_q(a, r0 + t) + b * QK);                                  \
                float v = (float)s * (dw * act_d32(a, r0 + t)[b]);                                 \
                if (HAS_MIN) v = v + mw * act_s32(a, r0 + t)[b];                                   \
                acc[t][b % 4] = acc[t][b % 4] + v;                                                 \
            }                                                                                      \
        }                                                                                          \
        for (int t = 0; t < R; t++) out[t] = (acc[t][0] + acc[t][1]) + (acc[t][2] + acc[t][3]);    \
    }

LEGACY_DOT(q8_0, 34, for (int j = 0; j < QK; j++) q[j] = (int8_t)blk[2 + j], 0)
LEGACY_DOT(q4_0, 18,
           for (int j = 0; j < 16; j++) { q[j] = (int8_t)((blk[2 + j] & 15) - 8); q[16 + j] = (int8_t)((blk[2 + j] >> 4) - 8); },
           0)
LEGACY_DOT(q4_1, 20,
           for (int j = 0; j < 16; j++) { q[j] = (int8_t)(blk[4 + j] & 15); q[16 + j] = (int8_t)(blk[4 + j] >> 4); },
           1)

PL_INLINE void unpack_q5(const uint8_t *qh4, const uint8_t *qs, int off, int8_t *q) {
    uint32_t qh;
    memcpy(&qh, qh4, 4);
    for (int j = 0; j < 16; j++) {
        q[j] = (int8_t)(((qs[j] & 15) | (((qh >> j) & 1) << 4)) - off);
        q[16 + j] = (int8_t)(((qs[j] >> 4) | (((qh >> (16 + j)) & 1) << 4)) - off);
    }
}
LEGACY_DOT(q5_0, 22, unpack_q5(blk + 2, blk + 6, 16, q), 0)
LEGACY_DOT(q5_1, 24, unpack_q5(blk + 4, blk + 8, 0, q), 1)

/* ---- K-quant super-blocks of 256 ---- */

/* q[256] unsigned quants with per-16 scales sc16[16] and mins mn16[16] (multiples of dmin):
 * add (d dx) sumi - (dmin dx) summ for each row, summ = sum mn16 * bsums. */
PL_INLINE void kquant_rows(const uint8_t *q, const int *sc16, const int *mn16, float d, float dmin, const pl_act *a,
                           int64_t r0, int R, int64_t b, float *acc) {
    for (int t = 0; t < R; t++) {
        const int8_t *x = act_q(a, r0 + t) + b * QKK;
        const int16_t *bs = act_bsums(a, r0 + t) + b * 16;
        int32_t sumi = 0, summ = 0;
        for (int g = 0; g < 16; g++) {
            int32_t s = 0;
            for (int j = 0; j < 16; j++) s += (int32_t)q[16 * g + j] * x[16 * g + j];
            sumi += sc16[g] * s;
            summ += mn16[g] * bs[g];
        }
        float dx = act_dK(a, r0 + t)[b];
        acc[t] = acc[t] + ((d * dx) * (float)sumi - (dmin * dx) * (float)summ);
    }
}

void dot_q2_K_generic(const uint8_t *w, int64_t k, const pl_act *a, int64_t r0, int R, float *out) {
    float acc[TILE_ROWS] = {0};
    uint8_t q[QKK];
    int sc[16], mn[16];
    for (int64_t b = 0; b < k / QKK; b++, w += 84) {
        for (int i = 0; i < QKK; i++) q[i] = (w[16 + 32 * (i / 128) + i % 32] >> (2 * ((i / 32) % 4))) & 3;
        for (int g = 0; g < 16; g++) { sc[g] = w[g] & 15; mn[g] = w[g] >> 4; }
        kquant_rows(q, sc, mn, load_fp16(w + 80), load_fp16(w + 82), a, r0, R, b, acc);
    }
    for (int t = 0; t < R; t++) out[t] = acc[t];
}

/* Q3_K: value (q - 4) sc, written as sc q - 4 sc: a "min" of 4 sc per sub-block with dmin = d */
void dot_q3_K_generic(const uint8_t *w, int64_t k, const pl_act *a, int64_t r0, int R, float *out) {
    float acc[TILE_ROWS] = {0};
    uint8_t q[QKK];
    int8_t s8[16];
    int sc[16], mn[16];
    for (int64_t b = 0; b < k / QKK; b++, w += 110) {
        for (int i = 0; i < QKK; i++)
            q[i] = ((w[32 + 32 * (i / 128) + i % 32] >> (2 * ((i / 32) % 4))) & 3) | (((w[i % 32] >> (i / 32)) & 1) << 2);
        q3k_scales(w + 96, s8);
        for (int g = 0; g < 16; g++) { sc[g] = s8[g]; mn[g] = 4 * s8[g]; }
        float d = load_fp16(w + 108);
        kquant_rows(q, sc, mn, d, d, a, r0, R, b, acc);
    }
    for (int t = 0; t < R; t++) out[t] = acc[t];
}

void dot_q4_K_generic(const uint8_t *w, int64_t k, const pl_act *a, int64_t r0, int R, float *out) {
    float acc[TILE_ROWS] = {0};
    uint8_t q[QKK], sc8[8], mn8[8];
    int sc[16], mn[16];
    for (int64_t b = 0; b < k / QKK; b++, w += 144) {
        for (int i = 0; i < QKK; i++) {
            uint8_t byte = w[16 + 32 * (i / 64) + i % 32];
            q[i] = (i % 64) < 32 ? (byte & 15) : (byte >> 4);
        }
        kquant_scale_min(w + 4, sc8, mn8);
        for (int g = 0; g < 16; g++) { sc[g] = sc8[g / 2]; mn[g] = mn8[g / 2]; }
        kquant_rows(q, sc, mn, load_fp16(w), load_fp16(w + 2), a, r0, R, b, acc);
    }
    for (int t = 0; t < R; t++) out[t] = acc[t];
}

void dot_q5_K_generic(const uint8_t *w, int64_t k, const pl_act *a, int64_t r0, int R, float *out) {
    float acc[TILE_ROWS] = {0};
    uint8_t q[QKK], sc8[8], mn8[8];
    int sc[16], mn[16];
    for (int64_t b = 0; b < k / QKK; b++, w += 176) {
        for (int i = 0; i < QKK; i++) {
            uint8_t byte = w[48 + 32 * (i / 64) + i % 32];
            q[i] = ((i % 64) < 32 ? (byte & 15) : (byte >> 4)) | (((w[16 + i % 32] >> (i / 32)) & 1) << 4);
        }
        kquant_scale_min(w + 4, sc8, mn8);
        for (int g = 0; g < 16; g++) { sc[g] = sc8[g / 2]; mn[g] = mn8[g / 2]; }
        kquant_rows(q, sc, mn, load_fp16(w), load_fp16(w + 2), a, r0, R, b, acc);
    }
    for (int t = 0; t < R; t++) out[t] = acc[t];
}

/* Q6_K: value (q - 32) sc: a "min" of 32 sc with dmin = d */
void dot_q6_K_generic(const uint8_t *w, int64_t k, const pl_act *a, int64_t r0, int R, float *out) {
    float acc[TILE_ROWS] = {0};
    uint8_t q[QKK];
    int sc[16], mn[16];
    for (int64_t b = 0; b < k / QKK; b++, w += 210) {
        for (int i = 0; i < QKK; i++) {
            int h = i / 128, j = (i / 32) % 4, l = i % 32;
            int lo = (w[64 * h + 32 * (j % 2) + l] >> (4 * (j / 2))) & 15;
            q[i] = (uint8_t)(lo | (((w[128 + 32 * h + l] >> (2 * j)) & 3) << 4));
        }
        for (int g = 0; g < 16; g++) { sc[g] = (int8_t)w[192 + g]; mn[g] = 32 * sc[g]; }
        float d = load_fp16(w + 208);
        kquant_rows(q, sc, mn, d, d, a, r0, R, b, acc);
    }
    for (int t = 0; t < R; t++) out[t] = acc[t];
}

/* ---- float rows: 64 partial sums, then a fixed tree ---- */

#define FLOAT_DOT(NAME, LOAD)                                                                      \
    void dot_##NAME##_generic(const uint8_t *w, int64_t k, const pl_act *a, int64_t r0, int R, float *out) { \
        for (int t = 0; t < R; t++) {                                                              \
            const float *x = act_f(a, r0 + t);                                                     \
            float p[64] = {0};                                                                     \
            for (int64_t i = 0; i < k; i++) p[i % 64] = fmaf(LOAD(i), x[i], p[i % 64]);            \
            out[t] = float_tree64(p);                                                              \
        }                                                                                          \
    }

PL_INLINE float w_f32(const uint8_t *w, int64_t i) { float f; memcpy(&f, w + 4 * i, 4); return f; }
PL_INLINE float w_bf16(const uint8_t *w, int64_t i) { uint16_t h; memcpy(&h, w + 2 * i, 2); return bf16_to_f32(h); }
#define LOAD_F32(i) w_f32(w, i)
#define LOAD_F16(i) load_fp16(w + 2 * (i))
#define LOAD_BF16(i) w_bf16(w, i)
FLOAT_DOT(f32, LOAD_F32)
FLOAT_DOT(f16, LOAD_F16)
FLOAT_DOT(bf16, LOAD_BF16)
