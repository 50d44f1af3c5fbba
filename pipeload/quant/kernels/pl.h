/* pipeload's compute kernels on GGUF blocks as stored (loaded by pipeload/quant/kernels/__init__.py).
 *
 * Every weight is used in the file's own bytes: N rows of K values of one GGML type, each row a
 * run of blocks. Activations are quantized once per product to the 8-bit block format llama.cpp
 * pairs with each type (its "vec_dot_type"): Q8_0 blocks of 32 for Q4_0/Q5_0/Q8_0, Q8_1 (with the
 * block's sum) for Q4_1/Q5_1, Q8_K (256 values, one float scale, int16 sums of 16) for the K-quants;
 * float rows for F32/F16/BF16 weights. Inner products are integer dot products of those blocks.
 *
 * Row exactness: an output y[r][n] is computed by one thread, by code whose operations on row r do
 * not depend on how many other rows are computed with it (tiles of up to TILE_ROWS rows run the
 * same instructions per row), nor on the thread count. See api.c.
 *
 * Built with -ffp-contract=off: a float expression is rounded exactly as written (no fused
 * multiply-add unless an intrinsic asks for one), so the same code gives the same bits wherever
 * the compiler inlines it.
 */
#ifndef PIPELOAD_KERNELS_H
#define PIPELOAD_KERNELS_H

#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(PL_GENERIC)
/* the plain C kernels only (a build for checking them on any machine) */
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PL_X86 1
#include <immintrin.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define PL_AVX512VNNI 1
#endif
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define PL_NEON 1
#include <arm_neon.h>
#if defined(__ARM_FEATURE_DOTPROD)
#define PL_NEON_DOT 1
#endif
#endif

#define PL_INLINE static inline __attribute__((always_inline))

/* GGML type numbers (gguf GGMLQuantizationType) */
enum {
    T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
    T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_BF16 = 30,
};

/* activation formats */
enum { ACT_F32 = 0, ACT_Q8_0 = 1, ACT_Q8_1 = 2, ACT_Q8_K = 3, ACT_COUNT = 4 };

#define QK 32     /* values per legacy block */
#define QKK 256   /* values per K-quant super-block */
#define TILE_ROWS 4  /* activation rows computed together against one weight row */
#define PL_MAX_K 65536  /* longest row the kernels take (a bf16 row is converted on the stack) */

/* error codes returned by the entry points (mapped to Python exceptions by the loader) */
enum { PL_OK = 0, PL_ENOMEM = -1, PL_EARG = -2, PL_ETYPE = -3 };

/* Quantized activations of m rows of k values: row r of each array at r * (its per-row length).
 * F32: f (k floats). Q8_0: q (k int8), d (k/32 floats, fp16-rounded scales).
 * Q8_1: as Q8_0 plus s (k/32 floats: d * sum of the block's q, fp16-rounded).
 * Q8_K: q, d (k/256 floats), bsums (k/16 int16: sums of 16 consecutive q). */
typedef struct {
    int64_t m, k;
    const float *f;
    const int8_t *q;
    const float *d;
    const float *s;
    const int16_t *bsums;
} pl_act;

PL_INLINE const int8_t *act_q(const pl_act *a, int64_t r) { return a->q + r * a->k; }
PL_INLINE const float *act_d32(const pl_act *a, int64_t r) { return a->d + r * (a->k / QK); }
PL_INLINE const float *act_s32(const pl_act *a, int64_t r) { return a->s + r * (a->k / QK); }
PL_INLINE const float *act_dK(const pl_act *a, int64_t r) { return a->d + r * (a->k / QKK); }
PL_INLINE const int16_t *act_bsums(const pl_act *a, int64_t r) { return a->bsums + r * (a->k / 16); }
PL_INLINE const float *act_f(const pl_act *a, int64_t r) { return a->f + r * a->k; }

/* A decode product on one weight row: out[t] = dot(row w, activation row r0 + t) for t < R,
 * R <= TILE_ROWS. The per-row arithmetic must not depend on R. */
typedef void (*pl_dot_fn)(const uint8_t *w, int64_t k, const pl_act *a, int64_t r0, int R, float *out);
/* A decode product on four weight rows stride bytes apart against activation rows r0 .. r0 + R - 1
 * (R <= TILE_ROWS): out[t * 4 + i] = dot(row w + i * stride, row r0 + t), with the bits `pl_dot_fn`
 * gives each row (an optional, faster path: the four weight rows' blocks are unpacked once). */
typedef void (*pl_rows4_fn)(const uint8_t *w, int64_t stride, int64_t k, const pl_act *a, int64_t r0, int R, float *out);
/* Dequantize one row of k values to float32 (bit-exact with gguf-py's float32 dequantization). */
typedef void (*pl_dequant_fn)(const uint8_t *w, int64_t k, float *out);

typedef struct {
    int qtype;
    const char *name;
    int block, type_size, act;
    pl_dot_fn dot;
    pl_rows4_fn rows4;  /* NULL where this build has none */
    pl_dequant_fn dequant;
} pl_type;

const pl_type *pl_type_of(int qtype);  /* NULL for a type without kernels */

/* ---- scalar conversions ---- */
PL_INLINE uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
PL_INLINE float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* IEEE half -> float, exact (including subnormals, inf and NaN payloads) */
PL_INLINE float fp16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    if (exp == 0x1F) return bits_f32(sign | 0x7F800000 | (man << 13));
    if (exp == 0) {
        float v = (float)man * (1.0f / 16777216.0f);  /* man * 2^-24, exact */
        return sign ? -v : v;
    }
    return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

/* float -> IEEE half, round to nearest even (finite inputs; overflow gives inf) */
PL_INLINE uint16_t f32_to_fp16(float f) {
    uint32_t x = f32_bits(f), sign = (x >> 16) & 0x8000;
    uint32_t ax = x & 0x7FFFFFFF;
    if (ax >= 0x7F800000) return (uint16_t)(sign | 0x7C00 | (ax > 0x7F800000 ? 0x200 : 0));
    if (ax >= 0x477FF000) return (uint16_t)(sign | 0x7C00);       /* rounds to >= 65536 */
    if (ax < 0x38800000) {                                         /* subnormal half or zero */
        float v = bits_f32(ax) * 16777216.0f;                      /* exact scaling by 2^24 */
        uint32_t q = (uint32_t)v;                                  /* |v| < 2^10 */
        float rem = v - (float)q;
        if (rem > 0.5f || (rem == 0.5f && (q & 1))) q++;
        return (uint16_t)(sign | q);
    }
    uint32_t r = ax + 0xFFF + ((ax >> 13) & 1);                    /* round mantissa to 10 bits */
    return (uint16_t)(sign | ((r - 0x38000000) >> 13));
}

PL_INLINE float fp16_round(float f) { return fp16_to_f32(f32_to_fp16(f)); }
PL_INLINE float load_fp16(const uint8_t *p) {  /* the hardware conversion where there is one (same value) */
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(PL_X86)
    return _cvtsh_ss(h);
#elif defined(PL_NEON)
    __fp16 f;
    memcpy(&f, &h, 2);
    return (float)f;
#else
    return fp16_to_f32(h);
#endif
}
PL_INLINE float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }
PL_INLINE uint16_t f32_to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
    uint32_t u = f32_bits(f);
    if ((u & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* round half to even, as llama.cpp's nearest_int and the SIMD rounding; clamped to [-128, 127]
 * first (the values quantized are within it; NaN becomes -128 as the SIMD conversion gives) */
PL_INLINE int nearest_even(float v) { return (int)nearbyintf(fminf(fmaxf(v, -128.f), 127.f)); }

/* The sum of 64 partial sums p[0..63] of a float row product, in the one order every ISA uses:
 * q_l = (p_l + p_16+l) + (p_32+l + p_48+l), then halving: r_l = q_l + q_8+l, s_l = r_l + r_4+l,
 * t_l = s_l + s_2+l, y = t_0 + t_1 (lanes of 16/8/4-wide vectors map onto it directly). */
PL_INLINE float float_tree64(const float *p) {
    float q[16], r[8], s[4], t[2];
    for (int l = 0; l < 16; l++) q[l] = (p[l] + p[16 + l]) + (p[32 + l] + p[48 + l]);
    for (int l = 0; l < 8; l++) r[l] = q[l] + q[8 + l];
    for (int l = 0; l < 4; l++) s[l] = r[l] + r[4 + l];
    for (int l = 0; l < 2; l++) t[l] = s[l] + s[2 + l];
    return t[0] + t[1];
}

/* CALL(R) with R a compile-time constant 1..TILE_ROWS (the kernels unroll their tiles on it);
 * used inside a function with an int R in scope */
#define PL_SWITCH_R(CALL)                 \
    switch (R) {                          \
        case 1: CALL(1); break;           \
        case 2: CALL(2); break;           \
        case 3: CALL(3); break;           \
        default: CALL(4); break;          \
    }

/* ---- per-format row kernels (dot_*.c, dequant.c) ---- */
#define PL_DECLARE(T) \
    void dot_##T(const uint8_t *w, int64_t k, const pl_act *a, int64_t r0, int R, float *out); \
    void dequant_##T(const uint8_t *w, int64_t k, float *out);
PL_DECLARE(q4_0) PL_DECLARE(q4_1) PL_DECLARE(q5_0) PL_DECLARE(q5_1) PL_DECLARE(q8_0)
PL_DECLARE(q2_K) PL_DECLARE(q3_K) PL_DECLARE(q4_K) PL_DECLARE(q5_K) PL_DECLARE(q6_K)
PL_DECLARE(f32) PL_DECLARE(f16) PL_DECLARE(bf16)
#undef PL_DECLARE

#if defined(PL_X86)
#define PL_DECLARE(T) void rows4_##T(const uint8_t *w, int64_t stride, int64_t k, const pl_act *a, int64_t r0, int R, float *out);
PL_DECLARE(q4_0) PL_DECLARE(q4_1) PL_DECLARE(q5_0) PL_DECLARE(q5_1) PL_DECLARE(q8_0)
PL_DECLARE(q2_K) PL_DECLARE(q3_K) PL_DECLARE(q4_K) PL_DECLARE(q5_K) PL_DECLARE(q6_K)
#undef PL_DECLARE
#endif

/* generic C versions (dot_generic.c), used where no SIMD version exists */
#define PL_DECLARE(T) void dot_##T##_generic(const uint8_t *w, int64_t k, const pl_act *a, int64_t r0, int R, float *out);
PL_DECLARE(q4_0) PL_DECLARE(q4_1) PL_DECLARE(q5_0) PL_DECLARE(q5_1) PL_DECLARE(q8_0)
PL_DECLARE(q2_K) PL_DECLARE(q3_K) PL_DECLARE(q4_K) PL_DECLARE(q5_K) PL_DECLARE(q6_K)
PL_DECLARE(f32) PL_DECLARE(f16) PL_DECLARE(bf16)
#undef PL_DECLARE

/* Q4_K / Q5_K: the 8 six-bit scales and mins of a super-block from its 12 packed bytes */
/* ... as four 32-bit words, one byte per value: sc 0-3, sc 4-7, mn 0-3, mn 4-7 (for building a
 * vector in registers: a vector load of bytes just stored waits for the stores) */
PL_INLINE void kquant_scale_min_words(const uint8_t *p, uint32_t o[4]) {
    uint32_t w0, w1, w2;
    memcpy(&w0, p, 4); memcpy(&w1, p + 4, 4); memcpy(&w2, p + 8, 4);
    o[0] = w0 & 0x3F3F3F3F;                                     /* sc 0-3 */
    o[1] = (w2 & 0x0F0F0F0F) | ((w0 >> 2) & 0x30303030);        /* sc 4-7 */
    o[2] = w1 & 0x3F3F3F3F;                                     /* mn 0-3 */
    o[3] = ((w2 >> 4) & 0x0F0F0F0F) | ((w1 >> 2) & 0x30303030); /* mn 4-7 */
}

PL_INLINE void kquant_scale_min(const uint8_t *p, uint8_t sc[8], uint8_t mn[8]) {
    uint32_t o[4];
    kquant_scale_min_words(p, o);
    memcpy(sc, o, 8);
    memcpy(mn, o + 2, 8);
}

/* Q3_K: the 16 six-bit signed scales (minus 32) of a super-block from its 12 packed bytes:
 * bytes 0-7 hold the low nibbles (scale j: byte j % 8, high nibble when j >= 8), bytes 8-11 the
 * top two bits (scale j: byte 8 + j % 4, bits 2 * (j / 4)). Done on 32-bit words. */
PL_INLINE void q3k_scales(const uint8_t *p, int8_t out[16]) {
    uint32_t a0, a1, t, o[4];
    memcpy(&a0, p, 4); memcpy(&a1, p + 4, 4); memcpy(&t, p + 8, 4);
    o[0] = (a0 & 0x0F0F0F0F) | ((t & 0x03030303) << 4);
    o[1] = (a1 & 0x0F0F0F0F) | (((t >> 2) & 0x03030303) << 4);
    o[2] = ((a0 >> 4) & 0x0F0F0F0F) | (((t >> 4) & 0x03030303) << 4);
    o[3] = ((a1 >> 4) & 0x0F0F0F0F) | (((t >> 6) & 0x03030303) << 4);
    for (int w = 0; w < 4; w++) o[w] = ((o[w] | 0x80808080) - 0x20202020) ^ 0x80808080;  /* bytewise - 32 */
    memcpy(out, o, 16);
}

/* ---- activations (act.c) ---- */
int64_t pl_act_bytes(int fmt, int64_t m, int64_t k);
void pl_act_layout(int fmt, int64_t m, int64_t k, uint8_t *buf, pl_act *a);
void pl_quantize_act(int fmt, const void *x, int x_bf16, int64_t ldx, uint8_t *buf, const pl_act *a, int nthreads);

/* ---- thread pool (pool.c) ---- */
typedef void (*pl_task_fn)(const void *args, int64_t i0, int64_t i1);
/* Run fn over [0, n) in chunks of whole multiples of `align`, on up to nthreads threads; each
 * index is handled by exactly one call. */
void pl_pool_run(pl_task_fn fn, const void *args, int64_t n, int64_t align, int nthreads);

/* A per-thread, 64-byte-aligned buffer of at least n bytes (grown, never shrunk, freed when its
 * thread ends), one per slot so a caller's activations and a worker's GEMM panel never share one.
 * NULL when it cannot be allocated. */
enum { PL_SCRATCH_ACT, PL_SCRATCH_PANEL, PL_SCRATCH_SLOTS };
uint8_t *pl_thread_scratch(int slot, int64_t n);

#endif
