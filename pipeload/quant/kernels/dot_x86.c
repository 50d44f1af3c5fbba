/* Decode products for x86: AVX2 + FMA + F16C, with AVX512-VNNI (on 256-bit registers, AVX512VL)
 * where the CPU has it. The integers and the float operations are those of dot_generic.c, in
 * its order (see there), so the bits equal the generic C version's.
 *
 * Integer dot products of blocks: u8 x s8 products summed in fours (vpdpbusd; on AVX2 vpmaddubsw
 * then vpmaddwd, whose int16 pair sums cannot overflow here: every u8 operand is at most 128 and
 * every s8 at most 127 in magnitude). Signed weights use the sign trick: |w| as the u8 operand and
 * x with w's sign as the s8 one (exact for w = -128 too, since activations are never -128).
 * Tiles of R activation rows share one weight row's unpacking; the code per row is the same for
 * every R.
 */
#include "pl.h"

#if defined(PL_X86)

#define PL_PREFETCH_GROUPS 4  /* how far ahead the four-row kernels prefetch (1-16 measured alike) */

PL_INLINE __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
#if defined(PL_AVX512VNNI)
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

PL_INLINE __m256i dpwssd(__m256i acc, __m256i a, __m256i b) {
#if defined(PL_AVX512VNNI)
    return _mm256_dpwssd_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
}

/* [sum p0, sum p1, sum p2, sum p3] of four int32x8 vectors (exact) */
PL_INLINE __m128i hsum4_i32(__m256i p0, __m256i p1, __m256i p2, __m256i p3) {
    __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(p0, p1), _mm256_hadd_epi32(p2, p3));
    return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* (sum a, sum b) of two int32x8 vectors (exact) */
PL_INLINE void hsum2_i32(__m256i a, __m256i b, int32_t *sa, int32_t *sb) {
    __m256i h = _mm256_hadd_epi32(a, b);  /* a01 a23 b01 b23 | a45 a67 b45 b67 */
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    t = _mm_hadd_epi32(t, t);
    *sa = _mm_cvtsi128_si32(t);
    *sb = _mm_extract_epi32(t, 1);
}

PL_INLINE __m256i nibbles_lo_hi(const uint8_t *qs16) {  /* 16 bytes -> 32 quants: low nibbles, then high */
    __m128i q = _mm_loadu_si128((const __m128i *)qs16);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), _mm256_set1_epi8(0x0F));
}

PL_INLINE __m256i bits_to_bytes16(const uint8_t *qh4) {  /* bit j of the 32-bit word -> 16 in byte j */
    uint32_t qh;
    memcpy(&qh, qh4, 4);
#if defined(PL_AVX512VNNI)
    return _mm256_maskz_mov_epi8((__mmask32)qh, _mm256_set1_epi8(0x10));
#else
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), spread), bit);
    return _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), _mm256_set1_epi8(0x10));
#endif
}

PL_INLINE __m128 fp16x4(const uint8_t *p, int64_t stride) {  /* four fp16 scales `stride` bytes apart */
    uint16_t h[4];
    for (int j = 0; j < 4; j++) memcpy(h + j, p + j * stride, 2);
    uint64_t v = (uint64_t)h[0] | (uint64_t)h[1] << 16 | (uint64_t)h[2] << 32 | (uint64_t)h[3] << 48;
    return _mm_cvtph_ps(_mm_cvtsi64_si128((long long)v));
}

/* ---- legacy blocks of 32 ---- */

/* block j of a group of 4: the weight quants as the u8 operand and the sign source */
typedef struct { __m256i u, sgn; } wblock;

#define SIGNED_W(vec) ((wblock){_mm256_sign_epi8(vec, vec), vec})
#define UNSIGNED_W(vec) ((wblock){vec, _mm256_setzero_si256()})

PL_INLINE __m256i block_dot(wblock w, __m256i x, int is_signed) {
    return dpbusd(_mm256_setzero_si256(), w.u, is_signed ? _mm256_sign_epi8(x, w.sgn) : x);
}

PL_INLINE wblock load_legacy(int qtype, const uint8_t *blk) {
    switch (qtype) {
        case T_Q8_0: return SIGNED_W(_mm256_loadu_si256((const __m256i *)(blk + 2)));
        case T_Q4_0: return SIGNED_W(_mm256_sub_epi8(nibbles_lo_hi(blk + 2), _mm256_set1_epi8(8)));
        case T_Q5_0:
            return SIGNED_W(_mm256_sub_epi8(_mm256_or_si256(nibbles_lo_hi(blk + 6), bits_to_bytes16(blk + 2)),
                                            _mm256_set1_epi8(16)));
        case T_Q4_1: return UNSIGNED_W(nibbles_lo_hi(blk + 4));
        default:     return UNSIGNED_W(_mm256_or_si256(nibbles_lo_hi(blk + 8), bits_to_bytes16(blk + 4)));
    }
}

PL_INLINE void legacy_tile(int qtype, int bytes, const uint8_t *w, int64_t k, const pl_act *a, int64_t r0,
                           const int R, float *out) {
    const int is_signed = qtype == T_Q8_0 || qtype == T_Q4_0 || qtype == T_Q5_0;
    const int has_min = qtype == T_Q4_1 || qtype == T_Q5_1;
    const int64_t nb = k / QK;
    __m128 acc[TILE_ROWS];
    for (int t = 0; t < R; t++) acc[t] = _mm_setzero_ps();
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
        const uint8_t *blk = w + b * bytes;
        wblock wb[4];
        for (int j = 0; j < 4; j++) wb[j] = load_legacy(qtype, blk + j * bytes);
        __m128 dw = fp16x4(blk, bytes);
        __m128 mw = has_min ? fp16x4(blk + 2, bytes) : _mm_setzero_ps();
        for (int t = 0; t < R; t++) {
            const int8_t *x = act_q(a, r0 + t) + b * QK;
            __m256i p[4];
            for (int j = 0; j < 4; j++) p[j] = block_dot(wb[j], _mm256_loadu_si256((const __m256i *)(x + j * QK)), is_signed);
            __m128 isum = _mm_cvtepi32_ps(hsum4_i32(p[0], p[1], p[2], p[3]));
            __m128 v = _mm_mul_ps(isum, _mm_mul_ps(dw, _mm_loadu_ps(act_d32(a, r0 + t) + b)));
            if (has_min) v = _mm_add_ps(v, _mm_mul_ps(mw, _mm_loadu_ps(act_s32(a, r0 + t) + b)));
            acc[t] = _mm_add_ps(acc[t], v);
        }
    }
    for (int t = 0; t < R; t++) {
        float P[4];
        _mm_storeu_ps(P, acc[t]);
        for (int64_t bb = b; bb < nb; bb++) {  /* the last nb % 4 blocks */
            const uint8_t *blk = w + bb * bytes;
            wblock wb = load_legacy(qtype, blk);
            __m256i p = block_dot(wb, _mm256_loadu_si256((const __m256i *)(act_q(a, r0 + t) + bb * QK)), is_signed);
            int32_t isum = _mm_cvtsi128_si32(hsum4_i32(p, p, p, p));
            float v = (float)isum * (load_fp16(blk) * act_d32(a, r0 + t)[bb]);
            if (has_min) v = v + load_fp16(blk + 2) * act_s32(a, r0 + t)[bb];
            P[bb % 4] = P[bb % 4] + v;
        }
        out[t] = (P[0] + P[1]) + (P[2] + P[3]);
    }
}

/* Prefetch this call's share of the weight bytes PL_PREFETCH_GROUPS groups of four rows ahead:
 * step `i` of `steps` covers bytes [i, i + 1) * bytes / steps of that region. The hardware
 * prefetcher alone leaves a decode product at a quarter to a third of the memory's bandwidth. */
PL_INLINE void prefetch_ahead(const uint8_t *w, int64_t stride, int64_t i, int64_t steps) {
    const int64_t group = 4 * stride, per = (group + steps - 1) / steps;
    const uint8_t *ahead = w + PL_PREFETCH_GROUPS * group;
    for (int64_t o = i * per; o < (i + 1) * per; o += 64) _mm_prefetch((const char *)ahead + o, _MM_HINT_T0);
}

/* Four weight rows (stride bytes apart) against R activation rows, each row's arithmetic that of
 * legacy_tile (so the same bits), the weight blocks unpacked once for the R rows.
 * out[t * 4 + i] = dot(weight row i, activation row r0 + t). Q4_0 and Q5_0 take their quants
 * unsigned and subtract offset * (the block's sum of x) from the integer sum, which is the same
 * integer as the signed product, in fewer instructions. */
PL_INLINE void legacy_rows4(int qtype, int bytes, const uint8_t *w, int64_t stride, int64_t k, const pl_act *a,
                            int64_t r0, const int R, float *out) {
    const int offset = qtype == T_Q4_0 ? 8 : qtype == T_Q5_0 ? 16 : 0;
    const int is_signed = qtype == T_Q8_0;
    const int has_min = qtype == T_Q4_1 || qtype == T_Q5_1;
    const int64_t nb = k / QK, groups = nb / 4;
    __m128 acc[TILE_ROWS][4];
    for (int t = 0; t < R; t++)
        for (int i = 0; i < 4; i++) acc[t][i] = _mm_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const int64_t b = 4 * g;
        prefetch_ahead(w, stride, g, groups);
        __m128i xsum[TILE_ROWS];
        if (offset)
            for (int t = 0; t < R; t++) {
                const int8_t *x = act_q(a, r0 + t) + b * QK;
                const __m256i ones = _mm256_set1_epi8(1), z = _mm256_setzero_si256();
                xsum[t] = _mm_slli_epi32(
                    hsum4_i32(dpbusd(z, ones, _mm256_loadu_si256((const __m256i *)x)),
                              dpbusd(z, ones, _mm256_loadu_si256((const __m256i *)(x + QK))),
                              dpbusd(z, ones, _mm256_loadu_si256((const __m256i *)(x + 2 * QK))),
                              dpbusd(z, ones, _mm256_loadu_si256((const __m256i *)(x + 3 * QK)))),
                    offset == 8 ? 3 : 4);
            }
        for (int i = 0; i < 4; i++) {
            const uint8_t *blk = w + i * stride + b * bytes;
            wblock wb[4];
            for (int j = 0; j < 4; j++) {
                const uint8_t *bj = blk + j * bytes;
                if (qtype == T_Q4_0) wb[j] = UNSIGNED_W(nibbles_lo_hi(bj + 2));
                else if (qtype == T_Q5_0) wb[j] = UNSIGNED_W(_mm256_or_si256(nibbles_lo_hi(bj + 6), bits_to_bytes16(bj + 2)));
                else wb[j] = load_legacy(qtype, bj);
            }
            const __m128 dw = fp16x4(blk, bytes), mw = has_min ? fp16x4(blk + 2, bytes) : _mm_setzero_ps();
            for (int t = 0; t < R; t++) {
                const int8_t *x = act_q(a, r0 + t) + b * QK;
                __m256i p[4];
                for (int j = 0; j < 4; j++) p[j] = block_dot(wb[j], _mm256_loadu_si256((const __m256i *)(x + j * QK)), is_signed);
                __m128i isum = hsum4_i32(p[0], p[1], p[2], p[3]);
                if (offset) isum = _mm_sub_epi32(isum, xsum[t]);
                __m128 v = _mm_mul_ps(_mm_cvtepi32_ps(isum), _mm_mul_ps(dw, _mm_loadu_ps(act_d32(a, r0 + t) + b)));
                if (has_min) v = _mm_add_ps(v, _mm_mul_ps(mw, _mm_loadu_ps(act_s32(a, r0 + t) + b)));
                acc[t][i] = _mm_add_ps(acc[t][i], v);
            }
        }
    }
    for (int t = 0; t < R; t++)
        for (int i = 0; i < 4; i++) {
            float P[4];
            _mm_storeu_ps(P, acc[t][i]);
            for (int64_t bb = 4 * groups; bb < nb; bb++) {  /* the last nb % 4 blocks, as legacy_tile */
                const uint8_t *blk = w + i * stride + bb * bytes;
                __m256i p = block_dot(load_legacy(qtype, blk), _mm256_loadu_si256((const __m256i *)(act_q(a, r0 + t) + bb * QK)),
                                      qtype == T_Q8_0 || offset);
                int32_t isum = _mm_cvtsi128_si32(hsum4_i32(p, p, p, p));
                float v = (float)isum * (load_fp16(blk) * act_d32(a, r0 + t)[bb]);
                if (has_min) v = v + load_fp16(blk + 2) * act_s32(a, r0 + t)[bb];
                P[bb % 4] = P[bb % 4] + v;
            }
            out[4 * t + i] = (P[0] + P[1]) + (P[2] + P[3]);
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

#define LEGACY_ROWS4_CALL(R) legacy_rows4(qt, bytes, w, stride, k, a, r0, R, out)
#define LEGACY_ROWS4(NAME, QT, BYTES)                                                                           \
    void rows4_##NAME(const uint8_t *w, int64_t stride, int64_t k, const pl_act *a, int64_t r0, int R, float *out) { \
        const int qt = QT, bytes = BYTES;                                                                       \
        PL_SWITCH_R(LEGACY_ROWS4_CALL)                                                                          \
    }
LEGACY_ROWS4(q8_0, T_Q8_0, 34)
LEGACY_ROWS4(q4_0, T_Q4_0, 18)
LEGACY_ROWS4(q4_1, T_Q4_1, 20)
LEGACY_ROWS4(q5_0, T_Q5_0, 22)
LEGACY_ROWS4(q5_1, T_Q5_1, 24)

/* ---- K-quants: super-blocks of 256 ---- */

/* the canonical float step of a super-block (see dot_generic.c) */
PL_INLINE float kquant_step(float acc, float d, float dmin, float dx, int32_t sumi, int32_t summ) {
    return acc + ((d * dx) * (float)sumi - (dmin * dx) * (float)summ);
}

/* value 16 (Q5_K) or 4 (Q3_K) added to the quants q whose bit `bit` of hbits is set */
PL_INLINE __m256i add_high_bit(__m256i q, __m256i hbits, int bit, int value) {
#if defined(PL_AVX512VNNI)
    __mmask32 set = _mm256_test_epi8_mask(hbits, _mm256_set1_epi8((char)(1 << bit)));
    return _mm256_mask_add_epi8(q, set, q, _mm256_set1_epi8((char)value));
#else
    __m256i b = _mm256_and_si256(_mm256_srli_epi16(hbits, bit), _mm256_set1_epi8(1));
    return _mm256_or_si256(q, value == 16 ? _mm256_slli_epi16(b, 4) : _mm256_slli_epi16(b, 2));
#endif
}

/* A K-quant super-block unpacked for the integer products: q[c] holds values 32 c .. 32 c + 31 as
 * u8 (0..63), scv[c] their int16 scales (one per 16-value pair of lanes of maddubs' output), and
 * mn16 the int16 factors of the 16 bsums whose products give the "mins" sum. */
typedef struct { __m256i q[8], scv[8], mn16; float d, dmin; } ksuper;

/* Q4_K and Q5_K: 8 sub-blocks of 32 with six-bit scales and mins */
PL_INLINE void unpack_q45k(int five, const uint8_t *blk, ksuper *u) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    u->d = load_fp16(blk);
    u->dmin = load_fp16(blk + 2);
    uint32_t o[4];
    kquant_scale_min_words(blk + 4, o);  /* built in registers, not loaded from bytes just stored */
    const __m128i packed = _mm_set_epi32((int)o[3], (int)o[2], (int)o[1], (int)o[0]);
    const __m256i sm = _mm256_cvtepu8_epi16(packed);  /* sc 0-7 | mn 0-7 */
    const __m256i sc = _mm256_permute2x128_si256(sm, sm, 0x00), mn = _mm256_permute2x128_si256(sm, sm, 0x11);
    /* mins: lane pair (2 s, 2 s + 1) of the 16 bsums gets mn[s] */
    u->mn16 = _mm256_shuffle_epi8(mn, _mm256_setr_epi8(0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5, 6, 7, 6, 7,
                                                        8, 9, 8, 9, 10, 11, 10, 11, 12, 13, 12, 13, 14, 15, 14, 15));
    for (int s = 0; s < 8; s++)
        u->scv[s] = _mm256_shuffle_epi8(sc, _mm256_set1_epi16((short)(0x0100 + 0x0202 * s)));  /* sc[s] in every lane */
    const uint8_t *qs = blk + (five ? 48 : 16);
    const __m256i qh = five ? _mm256_loadu_si256((const __m256i *)(blk + 16)) : _mm256_setzero_si256();
    for (int c = 0; c < 4; c++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
        u->q[2 * c] = _mm256_and_si256(v, m4);
        u->q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        if (five) {
            u->q[2 * c] = add_high_bit(u->q[2 * c], qh, 2 * c, 16);
            u->q[2 * c + 1] = add_high_bit(u->q[2 * c + 1], qh, 2 * c + 1, 16);
        }
    }
}

/* the int16 scale vectors of 16-value sub-blocks: chunk c (32 values) holds sub-blocks 2c, 2c+1 */
PL_INLINE void chunk_scales(__m256i sc16, __m256i scv[8]) {
    const __m256i pick = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                          2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
    for (int c = 0; c < 8; c++) scv[c] = _mm256_shuffle_epi8(_mm256_permutevar8x32_epi32(sc16, _mm256_set1_epi32(c)), pick);
}

/* Q2_K, Q3_K, Q6_K: 16 sub-blocks of 16; q[4 h + j] is chunk j of half h (values 128 h + 32 j ..),
 * holding sub-blocks 8 h + 2 j and 8 h + 2 j + 1. The "mins" summ = sum mn16[g] * bsums[g]
 * (Q3_K: 4 sc, Q6_K: 32 sc, Q2_K: the four-bit mins). */
PL_INLINE void unpack_q2k(const uint8_t *blk, ksuper *u) {
    const __m256i m2 = _mm256_set1_epi8(3);
    __m256i v16 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)blk));
    chunk_scales(_mm256_and_si256(v16, _mm256_set1_epi16(15)), u->scv);
    u->mn16 = _mm256_srli_epi16(v16, 4);
    for (int h = 0; h < 2; h++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * h));
        for (int j = 0; j < 4; j++) u->q[4 * h + j] = _mm256_and_si256(_mm256_srli_epi16(v, 2 * j), m2);
    }
    u->d = load_fp16(blk + 80);
    u->dmin = load_fp16(blk + 82);
}

PL_INLINE void unpack_q3k(const uint8_t *blk, ksuper *u) {
    const __m256i m2 = _mm256_set1_epi8(3);
    int8_t s8[16];
    q3k_scales(blk + 96, s8);
    __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)s8));
    chunk_scales(sc16, u->scv);
    u->mn16 = _mm256_slli_epi16(sc16, 2);
    const __m256i hm = _mm256_loadu_si256((const __m256i *)blk);
    for (int h = 0; h < 2; h++) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 32 + 32 * h));
        for (int j = 0; j < 4; j++)
            u->q[4 * h + j] = add_high_bit(_mm256_and_si256(_mm256_srli_epi16(v, 2 * j), m2), hm, 4 * h + j, 4);
    }
    u->d = u->dmin = load_fp16(blk + 108);
}

PL_INLINE void unpack_q6k(const uint8_t *blk, ksuper *u) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);
    __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
    chunk_scales(sc16, u->scv);
    u->mn16 = _mm256_slli_epi16(sc16, 5);
    for (int h = 0; h < 2; h++) {
        __m256i l0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h));
        __m256i l1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32));
        __m256i hv = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
        __m256i lo[4] = {_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
                         _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4)};
        for (int j = 0; j < 4; j++)
            u->q[4 * h + j] = _mm256_or_si256(lo[j], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 2 * j), m2), 4));
    }
    u->d = u->dmin = load_fp16(blk + 208);
}

enum { KQ_BYTES_Q2 = 84, KQ_BYTES_Q3 = 110, KQ_BYTES_Q4 = 144, KQ_BYTES_Q5 = 176, KQ_BYTES_Q6 = 210 };

PL_INLINE int kq_bytes(int qtype) {
    return qtype == T_Q2_K ? KQ_BYTES_Q2 : qtype == T_Q3_K ? KQ_BYTES_Q3 : qtype == T_Q4_K ? KQ_BYTES_Q4
         : qtype == T_Q5_K ? KQ_BYTES_Q5 : KQ_BYTES_Q6;
}

PL_INLINE void kq_unpack(int qtype, const uint8_t *blk, ksuper *u) {
    switch (qtype) {
        case T_Q2_K: unpack_q2k(blk, u); break;
        case T_Q3_K: unpack_q3k(blk, u); break;
        case T_Q4_K: unpack_q45k(0, blk, u); break;
        case T_Q5_K: unpack_q45k(1, blk, u); break;
        default:     unpack_q6k(blk, u); break;
    }
}

/* A super-block's integer sums against activation row x (int8 values X, int16 bsums bs) as
 * int32x8 vectors: sumi = sum of scale * q * x, summ = sum of mn16 * bsums. The products go to four
 * accumulators (any order gives the same integers) so the multiply-adds do not wait on each other. */
PL_INLINE void kq_sums(const ksuper *u, const __m256i X[8], __m256i bs, __m256i *sumi, __m256i *summ) {
    __m256i si[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int c = 0; c < 8; c++) si[c % 4] = dpwssd(si[c % 4], _mm256_maddubs_epi16(u->q[c], X[c]), u->scv[c]);
    *sumi = _mm256_add_epi32(_mm256_add_epi32(si[0], si[1]), _mm256_add_epi32(si[2], si[3]));
    *summ = _mm256_madd_epi16(bs, u->mn16);
}

PL_INLINE void load_x256(const int8_t *x, __m256i X[8]) {
    for (int c = 0; c < 8; c++) X[c] = _mm256_loadu_si256((const __m256i *)(x + 32 * c));
}

/* One weight row against R activation rows (the unpacking shared by the R rows). */
PL_INLINE void kq_tile(int qtype, const uint8_t *w, int64_t k, const pl_act *a, int64_t r0, const int R, float *out) {
    const int bytes = kq_bytes(qtype);
    float acc[TILE_ROWS] = {0};
    for (int64_t b = 0; b < k / QKK; b++) {
        ksuper u;
        kq_unpack(qtype, w + b * bytes, &u);
        for (int t = 0; t < R; t++) {
            __m256i X[8], sumi, summ;
            load_x256(act_q(a, r0 + t) + b * QKK, X);
            kq_sums(&u, X, _mm256_loadu_si256((const __m256i *)(act_bsums(a, r0 + t) + b * 16)), &sumi, &summ);
            int32_t isum, msum;
            hsum2_i32(sumi, summ, &isum, &msum);
            acc[t] = kquant_step(acc[t], u.d, u.dmin, act_dK(a, r0 + t)[b], isum, msum);
        }
    }
    for (int t = 0; t < R; t++) out[t] = acc[t];
}

/* Four weight rows (stride bytes apart) against R activation rows r0 .. r0 + R - 1: decode steps
 * and small batches. The weight rows are unpacked once for the R activation rows, the horizontal
 * sums of four weight rows are done together, and the float step runs on the four rows' lanes at
 * once; each lane performs exactly the operations kquant_step performs, so every output has the
 * bits of kq_tile's. out[t * 4 + i] = dot(weight row i, activation row r0 + t). */
PL_INLINE void kq_rows4(int qtype, const uint8_t *w, int64_t stride, int64_t k, const pl_act *a, int64_t r0,
                        const int R, float *out) {
    const int bytes = kq_bytes(qtype);
    const int d_off = qtype == T_Q2_K ? 80 : qtype == T_Q3_K ? 108 : qtype == T_Q6_K ? 208 : 0;
    const int dmin_off = qtype == T_Q2_K ? 82 : qtype == T_Q3_K ? 108 : qtype == T_Q6_K ? 208 : 2;
    __m128 acc[TILE_ROWS];
    for (int t = 0; t < R; t++) acc[t] = _mm_setzero_ps();
    const int64_t nb = k / QKK;
    for (int64_t b = 0; b < nb; b++) {
        prefetch_ahead(w, stride, b, nb);
        __m256i sumi[TILE_ROWS][4], summ[TILE_ROWS][4];
        for (int i = 0; i < 4; i++) {
            ksuper u;
            kq_unpack(qtype, w + i * stride + b * bytes, &u);
            for (int t = 0; t < R; t++) {
                __m256i X[8];
                load_x256(act_q(a, r0 + t) + b * QKK, X);
                kq_sums(&u, X, _mm256_loadu_si256((const __m256i *)(act_bsums(a, r0 + t) + b * 16)), &sumi[t][i],
                        &summ[t][i]);
            }
        }
        const __m128 d = fp16x4(w + b * bytes + d_off, stride), dmin = fp16x4(w + b * bytes + dmin_off, stride);
        for (int t = 0; t < R; t++) {
            const __m128 isum = _mm_cvtepi32_ps(hsum4_i32(sumi[t][0], sumi[t][1], sumi[t][2], sumi[t][3]));
            const __m128 msum = _mm_cvtepi32_ps(hsum4_i32(summ[t][0], summ[t][1], summ[t][2], summ[t][3]));
            const __m128 dx = _mm_set1_ps(act_dK(a, r0 + t)[b]);
            acc[t] = _mm_add_ps(acc[t], _mm_sub_ps(_mm_mul_ps(_mm_mul_ps(d, dx), isum), _mm_mul_ps(_mm_mul_ps(dmin, dx), msum)));
        }
    }
    for (int t = 0; t < R; t++) _mm_storeu_ps(out + 4 * t, acc[t]);
}

#define Q2_K_CALL(R) kq_tile(T_Q2_K, w, k, a, r0, R, out)
#define Q3_K_CALL(R) kq_tile(T_Q3_K, w, k, a, r0, R, out)
#define Q4_K_CALL(R) kq_tile(T_Q4_K, w, k, a, r0, R, out)
#define Q5_K_CALL(R) kq_tile(T_Q5_K, w, k, a, r0, R, out)
#define Q6_K_CALL(R) kq_tile(T_Q6_K, w, k, a, r0, R, out)
TILED(q2_K, Q2_K_CALL)
TILED(q3_K, Q3_K_CALL)
TILED(q4_K, Q4_K_CALL)
TILED(q5_K, Q5_K_CALL)
TILED(q6_K, Q6_K_CALL)

#define KQ_ROWS4_CALL(R) kq_rows4(qt, w, stride, k, a, r0, R, out)
#define ROWS4(NAME, QT)                                                                                         \
    void rows4_##NAME(const uint8_t *w, int64_t stride, int64_t k, const pl_act *a, int64_t r0, int R, float *out) { \
        const int qt = QT;                                                                                      \
        PL_SWITCH_R(KQ_ROWS4_CALL)                                                                              \
    }
ROWS4(q2_K, T_Q2_K)
ROWS4(q3_K, T_Q3_K)
ROWS4(q4_K, T_Q4_K)
ROWS4(q5_K, T_Q5_K)
ROWS4(q6_K, T_Q6_K)

/* ---- float rows: 64 partial sums (value i in partial i % 64), the tree of float_tree64 ---- */

enum { W_F32, W_F16, W_BF16 };

#if defined(PL_AVX512VNNI)
PL_INLINE __m512 load16(int kind, const uint8_t *w, int64_t i) {
    if (kind == W_F32) return _mm512_loadu_ps((const float *)w + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
    if (kind == W_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

PL_INLINE float tree_512(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    __m512 q = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    __m256 r = _mm256_add_ps(_mm512_castps512_ps256(q), _mm512_extractf32x8_ps(q, 1));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
    __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

PL_INLINE void float_tile(int kind, const uint8_t *w, int64_t k, const pl_act *a, int64_t r0, const int R, float *out) {
    __m512 acc[TILE_ROWS][4];
    for (int t = 0; t < R; t++)
        for (int j = 0; j < 4; j++) acc[t][j] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= k; i += 64) {
        __m512 wv[4];
        for (int j = 0; j < 4; j++) wv[j] = load16(kind, w, i + 16 * j);
        for (int t = 0; t < R; t++) {
            const float *x = act_f(a, r0 + t) + i;
            for (int j = 0; j < 4; j++) acc[t][j] = _mm512_fmadd_ps(wv[j], _mm512_loadu_ps(x + 16 * j), acc[t][j]);
        }
    }
    for (int t = 0; t < R; t++) {
        if (i == k) {
            out[t] = tree_512(acc[t][0], acc[t][1], acc[t][2], acc[t][3]);
            continue;
        }
        float p[64];
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(p + 16 * j, acc[t][j]);
        const float *x = act_f(a, r0 + t);
        for (int64_t ii = i; ii < k; ii++) {
            float wi = kind == W_F32 ? ((const float *)w)[ii]
                     : kind == W_F16 ? load_fp16(w + 2 * ii) : bf16_to_f32(((const uint16_t *)w)[ii]);
            p[ii % 64] = fmaf(wi, x[ii], p[ii % 64]);
        }
        out[t] = float_tree64(p);
    }
}
#else
PL_INLINE __m256 load8(int kind, const uint8_t *w, int64_t i) {
    if (kind == W_F32) return _mm256_loadu_ps((const float *)w + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    if (kind == W_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* one row at a time (8 accumulators each fill the 16 registers); B_j lane l is partial 8 j + l */
PL_INLINE void float_tile(int kind, const uint8_t *w, int64_t k, const pl_act *a, int64_t r0, const int R, float *out) {
    for (int t = 0; t < R; t++) {
        const float *x = act_f(a, r0 + t);
        __m256 B[8];
        for (int j = 0; j < 8; j++) B[j] = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 64 <= k; i += 64)
            for (int j = 0; j < 8; j++) B[j] = _mm256_fmadd_ps(load8(kind, w, i + 8 * j), _mm256_loadu_ps(x + i + 8 * j), B[j]);
        float p[64];
        for (int j = 0; j < 8; j++) _mm256_storeu_ps(p + 8 * j, B[j]);
        for (int64_t ii = i; ii < k; ii++) {
            float wi = kind == W_F32 ? ((const float *)w)[ii]
                     : kind == W_F16 ? load_fp16(w + 2 * ii) : bf16_to_f32(((const uint16_t *)w)[ii]);
            p[ii % 64] = fmaf(wi, x[ii], p[ii % 64]);
        }
        out[t] = float_tree64(p);
    }
}
#endif

#define F32_CALL(R) float_tile(W_F32, w, k, a, r0, R, out)
#define F16_CALL(R) float_tile(W_F16, w, k, a, r0, R, out)
#define BF16_CALL(R) float_tile(W_BF16, w, k, a, r0, R, out)
TILED(f32, F32_CALL)
TILED(f16, F16_CALL)
TILED(bf16, BF16_CALL)

#endif
