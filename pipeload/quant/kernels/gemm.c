/* Prompt products (many activation rows): an int8 GEMM with AVX512-VNNI on the file's blocks.
 *
 * The weight is used in panels of 32 rows. Each thread unpacks a panel once into its own scratch
 * (the same bytes' quants as u8, rows interleaved so that a 512-bit register holds four
 * consecutive values of each of 16 rows), then multiplies it with every activation row: a
 * vpdpbusd of one panel register with four broadcast activation bytes adds 64 products into 16
 * output lanes (one per weight row). Register tiles of MR activation rows by 32 weight rows.
 *
 * The integers are those of the decode products, and so are the float operations and their
 * order, lane by lane: K-quant super-blocks add (d dx) sumi - (dmin dx) summ in turn; legacy
 * blocks go to partial sums by block % 4, added as (P0 + P1) + (P2 + P3). So a prompt's rows
 * get the bits the decode kernels give them (the tests check it).
 *
 * u8 operands: K-quant and unsigned legacy quants are unsigned already; signed legacy weights are
 * stored with an offset (Q8_0: w + 128, Q4_0: q = w + 8, Q5_0: q = w + 16) and the offset times
 * the activation block's sum is subtracted from the integer sum (exact).
 */
#include "pl.h"

#if defined(PL_AVX512VNNI)

#define PANEL 32            /* weight rows per panel: two registers of 16 lanes */
#define MR_K 4              /* activation rows per register tile (K-quants) */
#define MR_L 2              /* activation rows per register tile (legacy blocks: 4 partial sums each) */

/* ---- packing: 16 rows of 4-byte groups -> [group][16 rows][4 bytes] ---- */

/* Transpose a 16 x 16 matrix of dwords (row i at src + i * ld) into dst[j * 16 + i]. */
static void transpose16x16(const uint8_t *src, int64_t ld, uint32_t *dst) {
    __m512i r[16], t[16], u[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512(src + i * ld);
    for (int i = 0; i < 16; i += 2) {  /* per 128-bit lane: [a0 b0 a1 b1], [a2 b2 a3 b3] */
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  /* u[i + c] lane g: column 4 g + c of rows i .. i + 3 */
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int c = 0; c < 4; c++) {  /* gather lane g of u[c], u[4 + c], u[8 + c], u[12 + c] */
        __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
        __m512i w0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44), w1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
        _mm512_storeu_si512(dst + (0 + c) * 16, _mm512_shuffle_i32x4(v0, w0, 0x88));
        _mm512_storeu_si512(dst + (4 + c) * 16, _mm512_shuffle_i32x4(v0, w0, 0xDD));
        _mm512_storeu_si512(dst + (8 + c) * 16, _mm512_shuffle_i32x4(v1, w1, 0x88));
        _mm512_storeu_si512(dst + (12 + c) * 16, _mm512_shuffle_i32x4(v1, w1, 0xDD));
    }
}

/* ---- per-type unpacking of one row's block into u8 quants and integer scales ---- */

typedef struct {
    int sub;                 /* values per scaled sub-block (K-quants: 16 or 32; legacy: 32) */
    int offset;              /* legacy signed types: the offset added to make the quants unsigned */
} gemm_kind;

/* K-quants: the 256 quants of super-block b of a row as u8, the sub-block scales, the mins per 16
 * values, d and dmin, exactly as the decode kernels take them apart */
static void unpack_kquant(int qtype, const uint8_t *blk, uint8_t q[256], int32_t *sc, int16_t mn16[16], float *d,
                          float *dmin) {
    switch (qtype) {
        case T_Q4_K:
        case T_Q5_K: {
            int five = qtype == T_Q5_K;
            uint8_t s8[8], m8[8];
            kquant_scale_min(blk + 4, s8, m8);
            for (int s = 0; s < 8; s++) { sc[s] = s8[s]; mn16[2 * s] = mn16[2 * s + 1] = m8[s]; }
            const uint8_t *qs = blk + (five ? 48 : 16);
            const __m256i m4 = _mm256_set1_epi8(0x0F);
            const __m256i qh = five ? _mm256_loadu_si256((const __m256i *)(blk + 16)) : _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
                __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                if (five) {
                    lo = _mm256_mask_add_epi8(lo, _mm256_test_epi8_mask(qh, _mm256_set1_epi8((char)(1 << (2 * c)))), lo, _mm256_set1_epi8(16));
                    hi = _mm256_mask_add_epi8(hi, _mm256_test_epi8_mask(qh, _mm256_set1_epi8((char)(1 << (2 * c + 1)))), hi, _mm256_set1_epi8(16));
                }
                _mm256_storeu_si256((__m256i *)(q + 64 * c), lo);
                _mm256_storeu_si256((__m256i *)(q + 64 * c + 32), hi);
            }
            *d = load_fp16(blk);
            *dmin = load_fp16(blk + 2);
            return;
        }
        case T_Q6_K: {
            const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(3);
            for (int h = 0; h < 2; h++) {
                __m256i l0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h));
                __m256i l1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32));
                __m256i hv = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
                __m256i lo[4] = {_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
                                 _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4)};
                for (int j = 0; j < 4; j++)
                    _mm256_storeu_si256((__m256i *)(q + 128 * h + 32 * j),
                                        _mm256_or_si256(lo[j], _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hv, 2 * j), m2), 4)));
            }
            for (int g = 0; g < 16; g++) { sc[g] = (int8_t)blk[192 + g]; mn16[g] = (int16_t)(32 * sc[g]); }
            *d = *dmin = load_fp16(blk + 208);
            return;
        }
        case T_Q3_K: {
            int8_t s8[16];
            q3k_scales(blk + 96, s8);
            for (int g = 0; g < 16; g++) { sc[g] = s8[g]; mn16[g] = (int16_t)(4 * s8[g]); }
            const __m256i m2 = _mm256_set1_epi8(3), hm = _mm256_loadu_si256((const __m256i *)blk);
            for (int h = 0; h < 2; h++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 32 + 32 * h));
                for (int j = 0; j < 4; j++) {
                    __m256i lo = _mm256_and_si256(_mm256_srli_epi16(v, 2 * j), m2);
                    __mmask32 set = _mm256_test_epi8_mask(hm, _mm256_set1_epi8((char)(1 << (4 * h + j))));
                    _mm256_storeu_si256((__m256i *)(q + 128 * h + 32 * j), _mm256_mask_add_epi8(lo, set, lo, _mm256_set1_epi8(4)));
                }
            }
            *d = *dmin = load_fp16(blk + 108);
            return;
        }
        default: {  /* Q2_K */
            for (int g = 0; g < 16; g++) { sc[g] = blk[g] & 15; mn16[g] = blk[g] >> 4; }
            const __m256i m2 = _mm256_set1_epi8(3);
            for (int h = 0; h < 2; h++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * h));
                for (int j = 0; j < 4; j++)
                    _mm256_storeu_si256((__m256i *)(q + 128 * h + 32 * j), _mm256_and_si256(_mm256_srli_epi16(v, 2 * j), m2));
            }
            *d = load_fp16(blk + 80);
            *dmin = load_fp16(blk + 82);
        }
    }
}

/* legacy: the 32 quants of a block as u8 (signed types plus their offset), d and m */
static void unpack_legacy(int qtype, const uint8_t *blk, uint8_t q[32], float *d, float *m) {
    *d = load_fp16(blk);
    *m = (qtype == T_Q4_1 || qtype == T_Q5_1) ? load_fp16(blk + 2) : 0.f;
    if (qtype == T_Q8_0) {
        _mm256_storeu_si256((__m256i *)q, _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(blk + 2)), _mm256_set1_epi8((char)0x80)));
        return;
    }
    const uint8_t *qs = blk + (qtype == T_Q4_0 ? 2 : qtype == T_Q4_1 ? 4 : qtype == T_Q5_0 ? 6 : 8);
    __m128i v = _mm_loadu_si128((const __m128i *)qs);
    __m256i n = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
    if (qtype == T_Q5_0 || qtype == T_Q5_1) {
        uint32_t qh;
        memcpy(&qh, blk + (qtype == T_Q5_0 ? 2 : 4), 4);
        n = _mm256_mask_add_epi8(n, (__mmask32)qh, n, _mm256_set1_epi8(16));
    }
    _mm256_storeu_si256((__m256i *)q, n);
}

static int legacy_offset(int qtype) { return qtype == T_Q8_0 ? 128 : qtype == T_Q4_0 ? 8 : qtype == T_Q5_0 ? 16 : 0; }

/* ---- the packed panel ---- */

/* Per K-quant super-block: quants [64 groups][2 halves][16 rows][4] (8192 bytes), scales int32
 * [nsub][2][16], min pairs int16 [8][2][16][2], d and dmin [2][16]. Per legacy block: quants
 * [8][2][16][4] (1024 bytes), d and m [2][16]. */
typedef struct {
    int kquant, nsub, group_bytes;
    int64_t nblocks, block_bytes;  /* packed bytes per (super-)block */
} panel_layout;

static panel_layout layout_of(const pl_type *t, int64_t k) {
    panel_layout L = {0};
    L.kquant = t->block == QKK;
    if (L.kquant) {
        L.nsub = (t->qtype == T_Q4_K || t->qtype == T_Q5_K) ? 8 : 16;
        L.nblocks = k / QKK;
        L.block_bytes = 8192 + (int64_t)L.nsub * 128 + 8 * 128 + 256;
    } else {
        L.nblocks = k / QK;
        L.block_bytes = 1024 + 256;
    }
    return L;
}

/* unpack rows n0 .. n0 + 31 of the weight (missing rows: zeros) into the panel */
static void pack_panel(const pl_type *t, const panel_layout *L, const uint8_t *w, int64_t stride, int64_t rows,
                       int64_t k, uint8_t *panel, uint8_t *tmp /* 16 * k bytes */) {
    for (int half = 0; half < 2; half++) {
        float d[16] = {0}, dm[16] = {0};
        int32_t sc[16][16];
        int16_t mn[16][16];
        for (int64_t b = 0; b < L->nblocks; b++) {
            uint8_t *P = panel + b * L->block_bytes;
            for (int i = 0; i < 16; i++) {
                int64_t r = half * 16 + i;
                uint8_t *q = tmp + i * k + b * t->block;
                if (r >= rows) {
                    memset(q, 0, (size_t)t->block);
                    d[i] = dm[i] = 0.f;
                    memset(sc[i], 0, sizeof sc[i]);
                    memset(mn[i], 0, sizeof mn[i]);
                    continue;
                }
                const uint8_t *blk = w + r * stride + b * t->type_size;
                if (L->kquant) unpack_kquant(t->qtype, blk, q, sc[i], mn[i], &d[i], &dm[i]);
                else unpack_legacy(t->qtype, blk, q, &d[i], &dm[i]);
            }
            if (L->kquant) {
                int32_t *S = (int32_t *)(P + 8192);
                int16_t *M = (int16_t *)(P + 8192 + L->nsub * 128);
                float *D = (float *)(P + 8192 + L->nsub * 128 + 8 * 128);
                for (int s = 0; s < L->nsub; s++)
                    for (int i = 0; i < 16; i++) S[(s * 2 + half) * 16 + i] = sc[i][s];
                for (int j = 0; j < 8; j++)
                    for (int i = 0; i < 16; i++) {
                        M[((j * 2 + half) * 16 + i) * 2] = mn[i][2 * j];
                        M[((j * 2 + half) * 16 + i) * 2 + 1] = mn[i][2 * j + 1];
                    }
                for (int i = 0; i < 16; i++) { D[half * 16 + i] = d[i]; D[32 + half * 16 + i] = dm[i]; }
            } else {
                float *D = (float *)(P + 1024);
                for (int i = 0; i < 16; i++) { D[half * 16 + i] = d[i]; D[32 + half * 16 + i] = dm[i]; }
            }
        }
        /* interleave: group g of block b (4 values) of the 16 rows -> P + group offset + half */
        uint32_t grid[16 * 16];
        int64_t groups_per_block = t->block / 4;
        for (int64_t g0 = 0; g0 < k / 4; g0 += 16) {  /* 16 groups = 64 values at a time */
            transpose16x16(tmp + 4 * g0, k, grid);
            for (int j = 0; j < 16; j++) {
                int64_t g = g0 + j, b = g / groups_per_block, gi = g % groups_per_block;
                memcpy(panel + b * L->block_bytes + (gi * 2 + half) * 64, grid + j * 16, 64);
            }
        }
    }
}

/* ---- micro-kernels ---- */

PL_INLINE __m512i bcast4(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return _mm512_set1_epi32(v); }

/* K-quants: rows r0 .. r0 + R - 1 against one packed panel; out[r][0..31] float32 */
PL_INLINE void kquant_tile(const panel_layout *L, int sub, const uint8_t *panel, const pl_act *a, int64_t r0,
                           const int R, float *out /* R x 32 */) {
    __m512 facc[MR_K][2];
    for (int r = 0; r < R; r++) facc[r][0] = facc[r][1] = _mm512_setzero_ps();
    const int gps = sub / 4;  /* groups of 4 values per sub-block */
    for (int64_t b = 0; b < L->nblocks; b++) {
        const uint8_t *P = panel + b * L->block_bytes;
        const int32_t *S = (const int32_t *)(P + 8192);
        const int16_t *M = (const int16_t *)(P + 8192 + L->nsub * 128);
        const float *D = (const float *)(P + 8192 + L->nsub * 128 + 8 * 128);
        __m512i sumi[MR_K][2];
        for (int r = 0; r < R; r++) sumi[r][0] = sumi[r][1] = _mm512_setzero_si512();
        for (int s = 0; s < L->nsub; s++) {
            __m512i ia[MR_K][2];
            for (int r = 0; r < R; r++) ia[r][0] = ia[r][1] = _mm512_setzero_si512();
            for (int g = s * gps; g < (s + 1) * gps; g++) {
                __m512i b0 = _mm512_loadu_si512(P + g * 128), b1 = _mm512_loadu_si512(P + g * 128 + 64);
                for (int r = 0; r < R; r++) {
                    __m512i x = bcast4(act_q(a, r0 + r) + b * QKK + 4 * g);
                    ia[r][0] = _mm512_dpbusd_epi32(ia[r][0], b0, x);
                    ia[r][1] = _mm512_dpbusd_epi32(ia[r][1], b1, x);
                }
            }
            __m512i s0 = _mm512_loadu_si512(S + s * 32), s1 = _mm512_loadu_si512(S + s * 32 + 16);
            for (int r = 0; r < R; r++) {
                sumi[r][0] = _mm512_add_epi32(sumi[r][0], _mm512_mullo_epi32(ia[r][0], s0));
                sumi[r][1] = _mm512_add_epi32(sumi[r][1], _mm512_mullo_epi32(ia[r][1], s1));
            }
        }
        __m512i summ[MR_K][2];
        for (int r = 0; r < R; r++) summ[r][0] = summ[r][1] = _mm512_setzero_si512();
        for (int j = 0; j < 8; j++) {
            __m512i m0 = _mm512_loadu_si512(M + j * 64), m1 = _mm512_loadu_si512(M + j * 64 + 32);
            for (int r = 0; r < R; r++) {
                int32_t pair;
                memcpy(&pair, act_bsums(a, r0 + r) + b * 16 + 2 * j, 4);
                __m512i bs = _mm512_set1_epi32(pair);
                summ[r][0] = _mm512_dpwssd_epi32(summ[r][0], m0, bs);
                summ[r][1] = _mm512_dpwssd_epi32(summ[r][1], m1, bs);
            }
        }
        for (int h = 0; h < 2; h++) {
            __m512 d = _mm512_loadu_ps(D + 16 * h), dmin = _mm512_loadu_ps(D + 32 + 16 * h);
            for (int r = 0; r < R; r++) {
                __m512 dx = _mm512_set1_ps(act_dK(a, r0 + r)[b]);
                __m512 t = _mm512_sub_ps(_mm512_mul_ps(_mm512_mul_ps(d, dx), _mm512_cvtepi32_ps(sumi[r][h])),
                                         _mm512_mul_ps(_mm512_mul_ps(dmin, dx), _mm512_cvtepi32_ps(summ[r][h])));
                facc[r][h] = _mm512_add_ps(facc[r][h], t);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        _mm512_storeu_ps(out + r * 32, facc[r][0]);
        _mm512_storeu_ps(out + r * 32 + 16, facc[r][1]);
    }
}

/* legacy blocks: xs[r][b] = offset * (sum of the activation block's quants) */
PL_INLINE void legacy_tile(const panel_layout *L, int has_min, const uint8_t *panel, const pl_act *a,
                           const int32_t *xs, int64_t r0, const int R, float *out) {
    __m512 P[MR_L][2][4];
    for (int r = 0; r < R; r++)
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 4; j++) P[r][h][j] = _mm512_setzero_ps();
    const int64_t nb = L->nblocks;
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *Pb = panel + b * L->block_bytes;
        const float *D = (const float *)(Pb + 1024);
        __m512i ia[MR_L][2];
        for (int r = 0; r < R; r++) {
            __m512i c = _mm512_set1_epi32(-xs[(r0 + r) * nb + b]);  /* start from - offset * sum x */
            ia[r][0] = ia[r][1] = c;
        }
        for (int g = 0; g < 8; g++) {
            __m512i b0 = _mm512_loadu_si512(Pb + g * 128), b1 = _mm512_loadu_si512(Pb + g * 128 + 64);
            for (int r = 0; r < R; r++) {
                __m512i x = bcast4(act_q(a, r0 + r) + b * QK + 4 * g);
                ia[r][0] = _mm512_dpbusd_epi32(ia[r][0], b0, x);
                ia[r][1] = _mm512_dpbusd_epi32(ia[r][1], b1, x);
            }
        }
        for (int h = 0; h < 2; h++) {
            __m512 dw = _mm512_loadu_ps(D + 16 * h), mw = _mm512_loadu_ps(D + 32 + 16 * h);
            for (int r = 0; r < R; r++) {
                __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(ia[r][h]), _mm512_mul_ps(dw, _mm512_set1_ps(act_d32(a, r0 + r)[b])));
                if (has_min) v = _mm512_add_ps(v, _mm512_mul_ps(mw, _mm512_set1_ps(act_s32(a, r0 + r)[b])));
                P[r][h][b % 4] = _mm512_add_ps(P[r][h][b % 4], v);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int h = 0; h < 2; h++)
            _mm512_storeu_ps(out + r * 32 + 16 * h,
                             _mm512_add_ps(_mm512_add_ps(P[r][h][0], P[r][h][1]), _mm512_add_ps(P[r][h][2], P[r][h][3])));
}

/* ---- the job ---- */

typedef struct {
    const pl_type *t;
    panel_layout L;
    const uint8_t *w;
    int64_t stride, n, k, m;
    const pl_act *a;
    const int32_t *xs;
    void *y;
    int y_bf16;
    int64_t ldy;
    int *failed;  /* set when a worker cannot allocate its panel (the call then returns PL_ENOMEM) */
} gemm_job;

static void gemm_task(const void *arg, int64_t p0, int64_t p1) {
    const gemm_job *j = arg;
    int64_t panel_bytes = j->L.nblocks * j->L.block_bytes;
    uint8_t *panel = pl_thread_scratch(PL_SCRATCH_PANEL, panel_bytes + 16 * j->k + 64);
    if (!panel) {
        __atomic_store_n(j->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    uint8_t *tmp = panel + panel_bytes;
    const int sub = j->L.kquant ? (j->L.nsub == 8 ? 32 : 16) : 32;
    const int has_min = j->t->qtype == T_Q4_1 || j->t->qtype == T_Q5_1;
    for (int64_t p = p0; p < p1; p++) {
        int64_t n0 = p * PANEL, rows = j->n - n0 < PANEL ? j->n - n0 : PANEL;
        pack_panel(j->t, &j->L, j->w + n0 * j->stride, j->stride, rows, j->k, panel, tmp);
        const int mr = j->L.kquant ? MR_K : MR_L;
        for (int64_t r = 0; r < j->m; r += mr) {
            int R = j->m - r < mr ? (int)(j->m - r) : mr;
            float out[MR_K * 32];
            if (j->L.kquant) {
                switch (R) {
                    case 1: kquant_tile(&j->L, sub, panel, j->a, r, 1, out); break;
                    case 2: kquant_tile(&j->L, sub, panel, j->a, r, 2, out); break;
                    case 3: kquant_tile(&j->L, sub, panel, j->a, r, 3, out); break;
                    default: kquant_tile(&j->L, sub, panel, j->a, r, 4, out); break;
                }
            } else if (R == 1) {
                legacy_tile(&j->L, has_min, panel, j->a, j->xs, r, 1, out);
            } else {
                legacy_tile(&j->L, has_min, panel, j->a, j->xs, r, 2, out);
            }
            for (int t = 0; t < R; t++)
                for (int64_t i = 0; i < rows; i++) {
                    int64_t idx = (r + t) * j->ldy + n0 + i;
                    if (j->y_bf16) ((uint16_t *)j->y)[idx] = f32_to_bf16(out[t * 32 + i]);
                    else ((float *)j->y)[idx] = out[t * 32 + i];
                }
        }
    }
}

int64_t pl_gemm_panel_bytes(const pl_type *t, int64_t k) {
    panel_layout L = layout_of(t, k);
    return L.nblocks * L.block_bytes + 16 * k + 64;
}

/* y = x @ W^T for a block type with a GEMM here (returns PL_ETYPE for others) */
int pl_gemm_run(const pl_type *t, const uint8_t *w, int64_t stride, int64_t n, int64_t k, const pl_act *a,
                const int32_t *xs, void *y, int y_bf16, int64_t ldy, int nthreads) {
    if (t->block == 1) return PL_ETYPE;
    int failed = 0;
    gemm_job j = {t, layout_of(t, k), w, stride, n, k, a->m, a, xs, y, y_bf16, ldy, &failed};
    if (!pl_thread_scratch(PL_SCRATCH_PANEL, pl_gemm_panel_bytes(t, k))) return PL_ENOMEM;  /* this thread's; workers check theirs */
    pl_pool_run(gemm_task, &j, (n + PANEL - 1) / PANEL, 1, nthreads);
    return __atomic_load_n(&failed, __ATOMIC_RELAXED) ? PL_ENOMEM : PL_OK;
}

int pl_gemm_offset(int qtype) { return legacy_offset(qtype); }
int pl_gemm_available(void) { return 1; }
#else
/* no GEMM in this build: pl_linear runs the decode products for every row count */
int pl_gemm_available(void) { return 0; }
int pl_gemm_offset(int qtype) { (void)qtype; return 0; }
int64_t pl_gemm_panel_bytes(const pl_type *t, int64_t k) { (void)t; (void)k; return 0; }
int pl_gemm_run(const pl_type *t, const uint8_t *w, int64_t stride, int64_t n, int64_t k, const pl_act *a,
                const int32_t *xs, void *y, int y_bf16, int64_t ldy, int nthreads) {
    (void)t; (void)w; (void)stride; (void)n; (void)k; (void)a; (void)xs; (void)y; (void)y_bf16; (void)ldy; (void)nthreads;
    return PL_ETYPE;
}
#endif
