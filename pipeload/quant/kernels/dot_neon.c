/* Decode products for ARM NEON (aarch64), with the dot-product extension where the CPU has it
 * (Cortex-A76, Raspberry Pi 5: sdot) and without (Cortex-A72, Raspberry Pi 4: widening multiplies
 * and pairwise adds). The integers and the float operations are those of dot_generic.c, in its
 * order, so the bits equal the generic C version's (and the x86 ones').
 *
 * NEON's integer dot product is signed x signed, so no sign trick is needed: weights and
 * activations are int8 as they are (weights -128..127, quants of unsigned types at most 63).
 */
#include "pl.h"

#if defined(PL_NEON)

/* acc + the products of 16 int8 pairs, summed in fours (lane i: bytes 4i .. 4i + 3) */
PL_INLINE int32x4_t dot16(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(PL_NEON_DOT)
    return vdotq_s32(acc, a, b);
#else
    int16x8_t lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));   /* |w x| <= 128 * 127: fits int16 */
    int16x8_t hi = vmull_high_s8(a, b);
    return vpadalq_s16(vpadalq_s16(acc, lo), hi);
#endif
}

PL_INLINE int32x4_t dot32(const int8_t *w, const int8_t *x) {
    int32x4_t z = vdupq_n_s32(0);
    return dot16(dot16(z, vld1q_s8(w), vld1q_s8(x)), vld1q_s8(w + 16), vld1q_s8(x + 16));
}

PL_INLINE float32x4_t fp16x4(const uint8_t *p, int64_t stride) {  /* four fp16 scales `stride` bytes apart */
    uint16_t h[4];
    for (int j = 0; j < 4; j++) memcpy(h + j, p + j * stride, 2);
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(h)));
}

/* ---- legacy blocks of 32 ---- */

/* the block's 32 weights as signed int8 (unsigned types: their quants, 0..31) */
PL_INLINE void load_legacy(int qtype, const uint8_t *blk, int8_t q[32]) {
    if (qtype == T_Q8_0) {
        memcpy(q, blk + 2, 32);
        return;
    }
    const uint8_t *qs = blk + (qtype == T_Q4_0 || qtype == T_Q5_0 ? 2 : 4) + (qtype == T_Q5_0 || qtype == T_Q5_1 ? 4 : 0);
    uint8x16_t v = vld1q_u8(qs), m4 = vdupq_n_u8(0x0F);
    uint8x16_t lo = vandq_u8(v, m4), hi = vshrq_n_u8(v, 4);
    if (qtype == T_Q5_0 || qtype == T_Q5_1) {
        uint32_t qh;
        memcpy(&qh, blk + (qtype == T_Q5_0 ? 2 : 4), 4);
        static const uint8_t bit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
        const uint8x16_t bits = vld1q_u8(bit);
        uint8x16_t h0 = vcombine_u8(vdup_n_u8((uint8_t)qh), vdup_n_u8((uint8_t)(qh >> 8)));
        uint8x16_t h1 = vcombine_u8(vdup_n_u8((uint8_t)(qh >> 16)), vdup_n_u8((uint8_t)(qh >> 24)));
        lo = vorrq_u8(lo, vandq_u8(vtstq_u8(h0, bits), vdupq_n_u8(16)));
        hi = vorrq_u8(hi, vandq_u8(vtstq_u8(h1, bits), vdupq_n_u8(16)));
    }
    int8x16_t l = vreinterpretq_s8_u8(lo), h = vreinterpretq_s8_u8(hi);
    if (qtype == T_Q4_0) { l = vsubq_s8(l, vdupq_n_s8(8)); h = vsubq_s8(h, vdupq_n_s8(8)); }
    if (qtype == T_Q5_0) { l = vsubq_s8(l, vdupq_n_s8(16)); h = vsubq_s8(h, vdupq_n_s8(16)); }
    vst1q_s8(q, l);
    vst1q_s8(q + 16, h);
}

PL_INLINE void legacy_tile(int qtype, int bytes, const uint8_t *w, int64_t k, const pl_act *a, int64_t r0,
                           const int R, float *out) {
    const int has_min = qtype == T_Q4_1 || qtype == T_Q5_1;
    const int64_t nb = k / QK;
    float32x4_t acc[TILE_ROWS];
    for (int t = 0; t < R; t++) acc[t] = vdupq_n_f32(0.f);
    int64_t b = 0;
    int8_t q[4][32];
    for (; b + 4 <= nb; b += 4) {
        const uint8_t *blk = w + b * bytes;
        for (int j = 0; j < 4; j++) load_legacy(qtype, blk + j * bytes, q[j]);
        float32x4_t dw = fp16x4(blk, bytes), mw = has_min ? fp16x4(blk + 2, bytes) : vdupq_n_f32(0.f);
        for (int t = 0; t < R; t++) {
            const int8_t *x = act_q(a, r0 + t) + b * QK;
            int32x4_t p0 = dot32(q[0], x), p1 = dot32(q[1], x + 32), p2 = dot32(q[2], x + 64), p3 = dot32(q[3], x + 96);
            int32x4_t isum = vpaddq_s32(vpaddq_s32(p0, p1), vpaddq_s32(p2, p3));  /* block sums, exact */
            float32x4_t v = vmulq_f32(vcvtq_f32_s32(isum), vmulq_f32(dw, vld1q_f32(act_d32(a, r0 + t) + b)));
            if (has_min) v = vaddq_f32(v, vmulq_f32(mw, vld1q_f32(act_s32(a, r0 + t) + b)));
            acc[t] = vaddq_f32(acc[t], v);
        }
    }
    for (int t = 0; t < R; t++) {
        float P[4];
        vst1q_f32(P, acc[t]);
        for (int64_t bb = b; bb < nb; bb++) {  /* the last nb % 4 blocks */
            const uint8_t *blk = w + bb * bytes;
            load_legacy(qtype, blk, q[0]);
            int32_t isum = vaddvq_s32(dot32(q[0], act_q(a, r0 + t) + bb * QK));
            float v = (float)isum * (load_fp16(blk) * act_d32(a, r0 + t)[bb]);
            if (has_min) v = v + load_fp16(blk + 2) * act_s32(a, r0 + t)[bb];
            P[bb % 4] = P[bb % 4] + v;
        }
        out[t] = (P[0] + P[1]) + (P[2] + P[3]);
    }
}

#define TILED(NAME, CALL) \
    void dot_##NAME(const uint8_t *w, int64_t k, const pl_act *a, int64_t r0, int R, float *out) { PL_SWITCH_R(CALL) }

#define Q8_0_CALL(R) legacy_tile(T_Q8_0, 34, w, k, a, r0, R, out)
#define Q4_0_CALL(R) legacy_tile(T_Q4_0, 18, w, k, a, r0, R, out)
#define Q4_1_CALL(R) legacy_tile(T_Q4_1, 20, w, k, a, r0, R, out)
#define Q5_0_CALL(R) legacy_tile(T_Q5_0, 22, w, k, a, r0, R, out)
#define Q5_1_CALL(R) legacy_tile(T_Q5_1, 24, w, k, a, r0, R, out)
TILED(q8_0, Q8_0_CALL)
TILED(q4_0, Q4_0_CALL)
TILED(q4_1, Q4_1_CALL)
TILED(q5_0, Q5_0_CALL)
TILED(q5_1, Q5_1_CALL)

/* ---- K-quants: super-blocks of 256, quants unpacked to int8 q[256] ---- */

PL_INLINE float kquant_step(float acc, float d, float dmin, float dx, int32_t sumi, int32_t summ) {
    return acc + ((d * dx) * (float)sumi - (dmin * dx) * (float)summ);
}

/* rows of one super-block whose values are q (0..63) in sub-blocks of `sub` (16 or 32) values with
 * scales sc[256 / sub], and summ = sum mn16[g] * bsums[g] over the 16 sums of 16 */
PL_INLINE void kquant_rows(const int8_t *q, int sub, const int16_t *sc, const int16_t mn16[16], float d, float dmin,
                           const pl_act *a, int64_t r0, const int R, int64_t b, float *acc) {
    const int16x8_t m0 = vld1q_s16(mn16), m1 = vld1q_s16(mn16 + 8);
    for (int t = 0; t < R; t++) {
        const int8_t *x = act_q(a, r0 + t) + b * QKK;
        int32x4_t s0 = vdupq_n_s32(0), s1 = vdupq_n_s32(0);
        for (int g = 0; g < QKK / sub; g += 2) {
            int32x4_t p0 = vdupq_n_s32(0), p1 = vdupq_n_s32(0);
            for (int i = 0; i < sub; i += 16) {
                p0 = dot16(p0, vld1q_s8(q + g * sub + i), vld1q_s8(x + g * sub + i));
                p1 = dot16(p1, vld1q_s8(q + (g + 1) * sub + i), vld1q_s8(x + (g + 1) * sub + i));
            }
            s0 = vmlaq_n_s32(s0, p0, sc[g]);
            s1 = vmlaq_n_s32(s1, p1, sc[g + 1]);
        }
        const int16_t *bs = act_bsums(a, r0 + t) + b * 16;
        int32x4_t mm = vmull_s16(vget_low_s16(m0), vld1_s16(bs));
        mm = vmlal_s16(mm, vget_high_s16(m0), vld1_s16(bs + 4));
        mm = vmlal_s16(mm, vget_low_s16(m1), vld1_s16(bs + 8));
        mm = vmlal_s16(mm, vget_high_s16(m1), vld1_s16(bs + 12));
        acc[t] = kquant_step(acc[t], d, dmin, act_dK(a, r0 + t)[b], vaddvq_s32(vaddq_s32(s0, s1)), vaddvq_s32(mm));
    }
}

PL_INLINE void unpack_q45k(int five, const uint8_t *blk, int8_t q[256]) {
    const uint8_t *qs = blk + (five ? 48 : 16);
    const uint8x16_t m4 = vdupq_n_u8(0x0F), one = vdupq_n_u8(1);
    uint8x16_t h[2] = {vdupq_n_u8(0), vdupq_n_u8(0)};
    if (five) { h[0] = vld1q_u8(blk + 16); h[1] = vld1q_u8(blk + 32); }
    for (int c = 0; c < 4; c++)
        for (int i = 0; i < 2; i++) {  /* 16 bytes of chunk c: values 64 c + 16 i .. (low), + 32 (high) */
            uint8x16_t v = vld1q_u8(qs + 32 * c + 16 * i);
            uint8x16_t lo = vandq_u8(v, m4), hi = vshrq_n_u8(v, 4);
            if (five) {
                lo = vorrq_u8(lo, vshlq_n_u8(vandq_u8(vshlq_u8(h[i], vdupq_n_s8((int8_t)-(2 * c))), one), 4));
                hi = vorrq_u8(hi, vshlq_n_u8(vandq_u8(vshlq_u8(h[i], vdupq_n_s8((int8_t)-(2 * c + 1))), one), 4));
            }
            vst1q_u8((uint8_t *)q + 64 * c + 16 * i, lo);
            vst1q_u8((uint8_t *)q + 64 * c + 32 + 16 * i, hi);
        }
}

PL_INLINE void q45k_tile(int five, const uint8_t *w, int64_t k, const pl_act *a, int64_t r0, const int R, float *out) {
    const int bytes = five ? 176 : 144;
    float acc[TILE_ROWS] = {0};
    int8_t q[QKK];
    for (int64_t b = 0; b < k / QKK; b++) {
        const uint8_t *blk = w + b * bytes;
        uint8_t sc8[8], mn8[8];
        kquant_scale_min(blk + 4, sc8, mn8);
        int16_t sc[8], mn16[16];
        for (int s = 0; s < 8; s++) { sc[s] = sc8[s]; mn16[2 * s] = mn16[2 * s + 1] = mn8[s]; }
        unpack_q45k(five, blk, q);
        kquant_rows(q, 32, sc, mn16, load_fp16(blk), load_fp16(blk + 2), a, r0, R, b, acc);
    }
    for (int t = 0; t < R; t++) out[t] = acc[t];
}

/* Q2_K, Q3_K and Q6_K store value 128 h + 32 j + l in fields j of byte l of 32-byte groups h */
PL_INLINE void q2k_tile(const uint8_t *w, int64_t k, const pl_act *a, int64_t r0, const int R, float *out) {
    float acc[TILE_ROWS] = {0};
    int8_t q[QKK];
    for (int64_t b = 0; b < k / QKK; b++) {
        const uint8_t *blk = w + b * 84;
        int16_t sc[16], mn[16];
        for (int g = 0; g < 16; g++) { sc[g] = blk[g] & 15; mn[g] = blk[g] >> 4; }
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 2; i++) {
                uint8x16_t v = vld1q_u8(blk + 16 + 32 * h + 16 * i);
                for (int j = 0; j < 4; j++)
                    vst1q_u8((uint8_t *)q + 128 * h + 32 * j + 16 * i, vandq_u8(vshlq_u8(v, vdupq_n_s8((int8_t)(-2 * j))), vdupq_n_u8(3)));
            }
        kquant_rows(q, 16, sc, mn, load_fp16(blk + 80), load_fp16(blk + 82), a, r0, R, b, acc);
    }
    for (int t = 0; t < R; t++) out[t] = acc[t];
}

PL_INLINE void q3k_tile(const uint8_t *w, int64_t k, const pl_act *a, int64_t r0, const int R, float *out) {
    float acc[TILE_ROWS] = {0};
    int8_t q[QKK];
    for (int64_t b = 0; b < k / QKK; b++) {
        const uint8_t *blk = w + b * 110;
        int8_t s8[16];
        int16_t sc[16], mn[16];
        q3k_scales(blk + 96, s8);
        for (int g = 0; g < 16; g++) { sc[g] = s8[g]; mn[g] = (int16_t)(4 * s8[g]); }
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 2; i++) {
                uint8x16_t v = vld1q_u8(blk + 32 + 32 * h + 16 * i), hm = vld1q_u8(blk + 16 * i);
                for (int j = 0; j < 4; j++) {
                    uint8x16_t lo = vandq_u8(vshlq_u8(v, vdupq_n_s8((int8_t)(-2 * j))), vdupq_n_u8(3));
                    uint8x16_t hb = vandq_u8(vshlq_u8(hm, vdupq_n_s8((int8_t)-(4 * h + j))), vdupq_n_u8(1));
                    vst1q_u8((uint8_t *)q + 128 * h + 32 * j + 16 * i, vorrq_u8(lo, vshlq_n_u8(hb, 2)));
                }
            }
        float d = load_fp16(blk + 108);
        kquant_rows(q, 16, sc, mn, d, d, a, r0, R, b, acc);
    }
    for (int t = 0; t < R; t++) out[t] = acc[t];
}

PL_INLINE void q6k_tile(const uint8_t *w, int64_t k, const pl_act *a, int64_t r0, const int R, float *out) {
    float acc[TILE_ROWS] = {0};
    int8_t q[QKK];
    const uint8x16_t m4 = vdupq_n_u8(0x0F), m2 = vdupq_n_u8(3);
    for (int64_t b = 0; b < k / QKK; b++) {
        const uint8_t *blk = w + b * 210;
        int16_t sc[16], mn[16];
        for (int g = 0; g < 16; g++) { sc[g] = (int8_t)blk[192 + g]; mn[g] = (int16_t)(32 * sc[g]); }
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 2; i++) {
                uint8x16_t l0 = vld1q_u8(blk + 64 * h + 16 * i), l1 = vld1q_u8(blk + 64 * h + 32 + 16 * i);
                uint8x16_t hv = vld1q_u8(blk + 128 + 32 * h + 16 * i);
                uint8x16_t lo[4] = {vandq_u8(l0, m4), vandq_u8(l1, m4), vshrq_n_u8(l0, 4), vshrq_n_u8(l1, 4)};
                for (int j = 0; j < 4; j++) {
                    uint8x16_t hb = vandq_u8(vshlq_u8(hv, vdupq_n_s8((int8_t)(-2 * j))), m2);
                    vst1q_u8((uint8_t *)q + 128 * h + 32 * j + 16 * i, vorrq_u8(lo[j], vshlq_n_u8(hb, 4)));
                }
            }
        float d = load_fp16(blk + 208);
        kquant_rows(q, 16, sc, mn, d, d, a, r0, R, b, acc);
    }
    for (int t = 0; t < R; t++) out[t] = acc[t];
}

#define Q2_K_CALL(R) q2k_tile(w, k, a, r0, R, out)
#define Q3_K_CALL(R) q3k_tile(w, k, a, r0, R, out)
#define Q4_K_CALL(R) q45k_tile(0, w, k, a, r0, R, out)
#define Q5_K_CALL(R) q45k_tile(1, w, k, a, r0, R, out)
#define Q6_K_CALL(R) q6k_tile(w, k, a, r0, R, out)
TILED(q2_K, Q2_K_CALL)
TILED(q3_K, Q3_K_CALL)
TILED(q4_K, Q4_K_CALL)
TILED(q5_K, Q5_K_CALL)
TILED(q6_K, Q6_K_CALL)

/* ---- float rows: 16 accumulators of 4 lanes, A_a lane l = partial 4 a + l ---- */

enum { W_F32, W_F16, W_BF16 };

PL_INLINE float32x4_t load4(int kind, const uint8_t *w, int64_t i) {
    if (kind == W_F32) return vld1q_f32((const float *)w + i);
    uint16x4_t h = vld1_u16((const uint16_t *)w + i);
    if (kind == W_F16) return vcvt_f32_f16(vreinterpret_f16_u16(h));
    return vreinterpretq_f32_u32(vshll_n_u16(h, 16));
}

PL_INLINE float tree_neon(const float32x4_t A[16]) {
    float32x4_t Q[4];
    for (int c = 0; c < 4; c++) Q[c] = vaddq_f32(vaddq_f32(A[c], A[4 + c]), vaddq_f32(A[8 + c], A[12 + c]));
    float32x4_t S = vaddq_f32(vaddq_f32(Q[0], Q[2]), vaddq_f32(Q[1], Q[3]));
    float32x2_t t = vadd_f32(vget_low_f32(S), vget_high_f32(S));
    return vget_lane_f32(t, 0) + vget_lane_f32(t, 1);
}

/* one row at a time: 16 accumulators and 16 weight registers fill the 32 vector registers */
PL_INLINE void float_tile(int kind, const uint8_t *w, int64_t k, const pl_act *a, int64_t r0, const int R, float *out) {
    for (int t = 0; t < R; t++) {
        const float *x = act_f(a, r0 + t);
        float32x4_t A[16];
        for (int j = 0; j < 16; j++) A[j] = vdupq_n_f32(0.f);
        int64_t i = 0;
        for (; i + 64 <= k; i += 64)
            for (int j = 0; j < 16; j++) A[j] = vfmaq_f32(A[j], load4(kind, w, i + 4 * j), vld1q_f32(x + i + 4 * j));
        if (i == k) {
            out[t] = tree_neon(A);
            continue;
        }
        float p[64];
        for (int j = 0; j < 16; j++) vst1q_f32(p + 4 * j, A[j]);
        for (int64_t ii = i; ii < k; ii++) {
            float wi;
            if (kind == W_F32) memcpy(&wi, w + 4 * ii, 4);
            else if (kind == W_F16) wi = load_fp16(w + 2 * ii);
            else { uint16_t h; memcpy(&h, w + 2 * ii, 2); wi = bf16_to_f32(h); }
            p[ii % 64] = fmaf(wi, x[ii], p[ii % 64]);
        }
        out[t] = float_tree64(p);
    }
}

#define F32_CALL(R) float_tile(W_F32, w, k, a, r0, R, out)
#define F16_CALL(R) float_tile(W_F16, w, k, a, r0, R, out)
#define BF16_CALL(R) float_tile(W_BF16, w, k, a, r0, R, out)
TILED(f32, F32_CALL)
TILED(f16, F16_CALL)
TILED(bf16, BF16_CALL)

#endif
