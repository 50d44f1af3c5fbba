/* The entry points pipeload calls (through ctypes, pipeload/quant/kernels/__init__.py).
 *
 * pl_linear: y_j = x @ W_j^T for one or several weights (fused q/k/v, gate/up), activations
 * quantized once per format the weights need, one thread-pool job over all weights' rows.
 * Each output element is computed by one thread (rows are split between threads, never the
 * sum), by the per-type kernel in its fixed order, in tiles of TILE_ROWS activation rows whose
 * per-row arithmetic does not depend on the tile: so every output row has the same bits whatever
 * m, the other rows or the thread count.
 *
 * Every entry checks its arguments before touching memory and returns PL_EARG / PL_ETYPE (the
 * loader raises ValueError naming the tensor) or PL_ENOMEM (MemoryError).
 */
#include "pl.h"

#if defined(PL_X86) || defined(PL_NEON)
#define DOT(F) dot_##F
#else
#define DOT(F) dot_##F##_generic
#endif
#if defined(PL_X86)
#define ROWS4(F) rows4_##F
#else
#define ROWS4(F) NULL
#endif
#define ENTRY(QT, NAME, BLOCK, BYTES, ACT, F) {QT, NAME, BLOCK, BYTES, ACT, DOT(F), NULL, dequant_##F}
#define ENTRY4(QT, NAME, BLOCK, BYTES, ACT, F) {QT, NAME, BLOCK, BYTES, ACT, DOT(F), ROWS4(F), dequant_##F}

static const pl_type TYPES[] = {
    ENTRY(T_F32, "F32", 1, 4, ACT_F32, f32),
    ENTRY(T_F16, "F16", 1, 2, ACT_F32, f16),
    ENTRY(T_BF16, "BF16", 1, 2, ACT_F32, bf16),
    ENTRY4(T_Q4_0, "Q4_0", 32, 18, ACT_Q8_0, q4_0),
    ENTRY4(T_Q4_1, "Q4_1", 32, 20, ACT_Q8_1, q4_1),
    ENTRY4(T_Q5_0, "Q5_0", 32, 22, ACT_Q8_0, q5_0),
    ENTRY4(T_Q5_1, "Q5_1", 32, 24, ACT_Q8_1, q5_1),
    ENTRY4(T_Q8_0, "Q8_0", 32, 34, ACT_Q8_0, q8_0),
    ENTRY4(T_Q2_K, "Q2_K", 256, 84, ACT_Q8_K, q2_K),
    ENTRY4(T_Q3_K, "Q3_K", 256, 110, ACT_Q8_K, q3_K),
    ENTRY4(T_Q4_K, "Q4_K", 256, 144, ACT_Q8_K, q4_K),
    ENTRY4(T_Q5_K, "Q5_K", 256, 176, ACT_Q8_K, q5_K),
    ENTRY4(T_Q6_K, "Q6_K", 256, 210, ACT_Q8_K, q6_K),
};

const pl_type *pl_type_of(int qtype) {
    for (size_t i = 0; i < sizeof TYPES / sizeof TYPES[0]; i++)
        if (TYPES[i].qtype == qtype) return &TYPES[i];
    return NULL;
}

/* what the kernels were built for */
const char *pl_backend(void) {
#if defined(PL_AVX512VNNI)
    return "avx512-vnni";
#elif defined(PL_X86)
    return "avx2";
#elif defined(PL_NEON_DOT)
    return "neon-dotprod";
#elif defined(PL_NEON)
    return "neon";
#else
    return "generic-c";
#endif
}

/* 1 if qtype has kernels, with its block size and bytes per block */
int pl_type_info(int qtype, int64_t *block, int64_t *type_size) {
    const pl_type *t = pl_type_of(qtype);
    if (!t) return 0;
    *block = t->block;
    *type_size = t->type_size;
    return 1;
}

/* ---- the product ---- */

#define DESC_LEN 6  /* per weight: qtype, weight address, row stride (bytes), rows, output address, output row stride */
#define UNIT_ROWS 16
#define MAX_WEIGHTS 16

typedef struct {
    const pl_type *type;
    const uint8_t *w;
    int64_t stride, n;
    void *y;
    int64_t ldy;
    int64_t unit0;  /* first work unit of this weight */
    int64_t r0, rm; /* the activation rows it multiplies: [r0, r0 + rm) (output row t is row r0 + t) */
} weight_job;

typedef struct {
    weight_job wj[MAX_WEIGHTS];
    int nw;
    int y_bf16;
    int64_t m, k;
    pl_act act[ACT_COUNT];
} linear_job;

PL_INLINE void store(void *y, int y_bf16, int64_t idx, float v) {
    if (y_bf16) ((uint16_t *)y)[idx] = f32_to_bf16(v);
    else ((float *)y)[idx] = v;
}

/* Rows this far ahead are prefetched (every other 64-byte line: the CPU fetches lines in pairs):
 * a decode product streams its weights from memory once, and the hardware prefetcher alone
 * leaves it at a quarter to a third of the memory's bandwidth. */
#define PREFETCH_ROWS 8

PL_INLINE void prefetch_row(const uint8_t *row, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 128) __builtin_prefetch(row + o, 0, 3);
}

/* activation rows in the tile that starts at row r of m */
PL_INLINE int tile_rows(int64_t m, int64_t r) { return m - r < TILE_ROWS ? (int)(m - r) : TILE_ROWS; }

static void linear_task(const void *p, int64_t u0, int64_t u1) {
    const linear_job *j = p;
    for (int i = 0; i < j->nw; i++) {
        const weight_job *wj = &j->wj[i];
        int64_t units = (wj->n + UNIT_ROWS - 1) / UNIT_ROWS;
        int64_t a0 = u0 > wj->unit0 ? u0 : wj->unit0, a1 = u1 < wj->unit0 + units ? u1 : wj->unit0 + units;
        if (a0 >= a1) continue;
        int64_t n0 = (a0 - wj->unit0) * UNIT_ROWS, n1 = (a1 - wj->unit0) * UNIT_ROWS;
        if (n1 > wj->n) n1 = wj->n;
        const pl_act *act = &j->act[wj->type->act];
        int64_t n = n0;
        /* measured on x86 (2 threads, weights from memory) before the four-row kernels existed,
         * when every row came through here: block types gained 1.3-2x from software prefetch,
         * float rows lost (their hardware-prefetched stream is already fast). On x86 it now
         * serves the last rows of a chunk; on ARM every row (not measured there). */
        const int prefetch = wj->type->block > 1;
        if (wj->type->rows4) {  /* four weight rows at a time, tiles of TILE_ROWS activation rows */
            float out[4 * TILE_ROWS];
            for (; n + 4 <= n1; n += 4)
                for (int64_t r = wj->r0; r < wj->r0 + wj->rm; r += TILE_ROWS) {
                    int R = tile_rows(wj->r0 + wj->rm, r);
                    wj->type->rows4(wj->w + n * wj->stride, wj->stride, j->k, act, r, R, out);
                    for (int t = 0; t < R; t++)
                        for (int i = 0; i < 4; i++)
                            store(wj->y, j->y_bf16, (r - wj->r0 + t) * wj->ldy + n + i, out[4 * t + i]);
                }
        }
        for (; n < n1; n++) {
            const uint8_t *row = wj->w + n * wj->stride;
            if (prefetch) prefetch_row(row + PREFETCH_ROWS * wj->stride, wj->stride);
            for (int64_t r = wj->r0; r < wj->r0 + wj->rm; r += TILE_ROWS) {
                int R = tile_rows(wj->r0 + wj->rm, r);
                float out[TILE_ROWS];
                wj->type->dot(row, j->k, act, r, R, out);
                for (int t = 0; t < R; t++) store(wj->y, j->y_bf16, (r - wj->r0 + t) * wj->ldy + n, out[t]);
            }
        }
    }
}

int pl_gemm_available(void);
int pl_gemm_offset(int qtype);
int pl_gemm_run(const pl_type *t, const uint8_t *w, int64_t stride, int64_t n, int64_t k, const pl_act *a,
                const int32_t *xs, void *y, int y_bf16, int64_t ldy, int nthreads);
int64_t pl_gemm_panel_bytes(const pl_type *t, int64_t k);

/* offset * (sum of the quants) of every 32-block of every row (the legacy GEMM's correction) */
static void block_sums(const pl_act *a, int offset, int32_t *xs) {
    int64_t nb = a->k / QK;
    for (int64_t r = 0; r < a->m; r++)
        for (int64_t b = 0; b < nb; b++) {
            const int8_t *q = act_q(a, r) + b * QK;
            int32_t s = 0;
            for (int i = 0; i < QK; i++) s += q[i];
            xs[r * nb + b] = offset * s;
        }
}

/* desc: nw weights of DESC_LEN int64 each (see above); x: m rows of k float32 (x_bf16 = 0) or
 * bfloat16 values, row stride ldx; outputs float32 or bfloat16 (y_bf16). method 1 runs block
 * types through the GEMM (gemm.c) where this build has one: the same bits, faster for many rows.
 * method 2 pairs weights with rows: weight i multiplies activation row i % m only, into its
 * output's row 0 (the routed experts of a decode step, one row each: one call for all of them). */
int pl_linear(const int64_t *desc, int nw, const void *x, int x_bf16, int64_t ldx, int64_t m, int64_t k, int y_bf16,
              int nthreads, int method) {
    if (!desc || !x || nw < 1 || nw > MAX_WEIGHTS || m < 1 || k < 1 || k > PL_MAX_K || ldx < k || method < 0 || method > 2)
        return PL_EARG;
    static linear_job zero;
    linear_job j = zero;
    j.nw = nw;
    j.y_bf16 = y_bf16;
    j.m = m;
    j.k = k;
    int need[ACT_COUNT] = {0};
    int64_t units = 0;
    for (int i = 0; i < nw; i++) {
        const int64_t *d = desc + DESC_LEN * i;
        const pl_type *t = pl_type_of((int)d[0]);
        if (!t) return PL_ETYPE;
        int64_t n = d[3], ldy = d[5];
        if (k % t->block || !d[1] || !d[4] || n < 1 || ldy < n || d[2] < k / t->block * t->type_size) return PL_EARG;
        if (t->block == 1 && (d[1] % t->type_size || d[2] % t->type_size)) return PL_EARG;  /* float rows aligned */
        int64_t r0 = method == 2 ? i % m : 0, rm = method == 2 ? 1 : m;
        j.wj[i] = (weight_job){t, (const uint8_t *)(intptr_t)d[1], d[2], n, (void *)(intptr_t)d[4], ldy, units, r0, rm};
        units += (n + UNIT_ROWS - 1) / UNIT_ROWS;
        need[t->act] = 1;
    }
    int64_t off[ACT_COUNT], total = 0;
    for (int f = 0; f < ACT_COUNT; f++) {
        off[f] = total;
        if (need[f]) total += pl_act_bytes(f, m, k);
    }
    int gemm = method == 1 && pl_gemm_available();
    int64_t xs_off = total;
    if (gemm) total += m * (k / QK) * 4;
    uint8_t *buf = pl_thread_scratch(PL_SCRATCH_ACT, total);
    if (!buf) return PL_ENOMEM;
    for (int f = 0; f < ACT_COUNT; f++) {
        if (!need[f]) continue;
        pl_act_layout(f, m, k, buf + off[f], &j.act[f]);
        pl_quantize_act(f, x, x_bf16, ldx, buf + off[f], &j.act[f], nthreads);
    }
    if (!gemm) {
        pl_pool_run(linear_task, &j, units, 1, nthreads);
        return PL_OK;
    }
    int32_t *xs = (int32_t *)(buf + xs_off);
    int xs_for = -1;
    for (int i = 0; i < nw; i++) {
        const weight_job *wj = &j.wj[i];
        if (wj->type->block == 1) {  /* float rows: the decode products */
            linear_job one = j;
            one.nw = 1;
            one.wj[0] = *wj;
            one.wj[0].unit0 = 0;
            pl_pool_run(linear_task, &one, (wj->n + UNIT_ROWS - 1) / UNIT_ROWS, 1, nthreads);
            continue;
        }
        int offset = pl_gemm_offset(wj->type->qtype);
        if (wj->type->block == QK && offset != xs_for) {
            block_sums(&j.act[wj->type->act], offset, xs);
            xs_for = offset;
        }
        int code = pl_gemm_run(wj->type, wj->w, wj->stride, wj->n, k, &j.act[wj->type->act], xs, wj->y, y_bf16, wj->ldy,
                               nthreads);
        if (code) return code;
    }
    return PL_OK;
}

/* ---- dequantization (prompt products through a float GEMM, and the tests) ---- */

typedef struct { const pl_type *t; const uint8_t *w; int64_t stride, k; void *out; int out_bf16; int64_t ldo; } dq_job;

static void dequant_task(const void *p, int64_t r0, int64_t r1) {
    const dq_job *j = p;
    float row[j->out_bf16 ? j->k : 1];
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *w = j->w + r * j->stride;
        if (!j->out_bf16) {
            j->t->dequant(w, j->k, (float *)j->out + r * j->ldo);
            continue;
        }
        j->t->dequant(w, j->k, row);
        uint16_t *o = (uint16_t *)j->out + r * j->ldo;
        for (int64_t i = 0; i < j->k; i++) o[i] = f32_to_bf16(row[i]);
    }
}

/* rows 0..n-1 of a weight to float32 (or bfloat16) rows of out, row stride ldo values */
int pl_dequantize(int qtype, const uint8_t *w, int64_t stride, int64_t n, int64_t k, void *out, int out_bf16,
                  int64_t ldo, int nthreads) {
    const pl_type *t = pl_type_of(qtype);
    if (!t) return PL_ETYPE;
    if (!w || !out || n < 1 || k < 1 || k > PL_MAX_K || k % t->block || stride < k / t->block * t->type_size || ldo < k)
        return PL_EARG;
    if (t->block == 1 && ((intptr_t)w % t->type_size || stride % t->type_size)) return PL_EARG;  /* float rows aligned */
    dq_job j = {t, w, stride, k, out, out_bf16, ldo};
    pl_pool_run(dequant_task, &j, n, 8, nthreads);
    return PL_OK;
}

/* The quantized activations of x (m rows of k float32) in format fmt, copied out for the tests:
 * q (m k int8), d (per block), s (Q8_1), bsums (Q8_K); pointers not used by fmt may be NULL. */
int pl_quantize_activations(int fmt, const float *x, int64_t m, int64_t k, int8_t *q, float *d, float *s,
                            int16_t *bsums) {
    int64_t block = fmt == ACT_Q8_K ? QKK : QK;
    if (fmt < ACT_Q8_0 || fmt > ACT_Q8_K || !x || !q || !d || m < 1 || k < 1 || k > PL_MAX_K || k % block) return PL_EARG;
    if ((fmt == ACT_Q8_1 && !s) || (fmt == ACT_Q8_K && !bsums)) return PL_EARG;
    uint8_t *buf = malloc((size_t)pl_act_bytes(fmt, m, k));
    if (!buf) return PL_ENOMEM;
    pl_act a;
    pl_act_layout(fmt, m, k, buf, &a);
    pl_quantize_act(fmt, x, 0, k, buf, &a, 1);
    memcpy(q, a.q, (size_t)(m * k));
    memcpy(d, a.d, (size_t)(m * (k / block)) * 4);
    if (fmt == ACT_Q8_1) memcpy(s, a.s, (size_t)(m * (k / QK)) * 4);
    if (fmt == ACT_Q8_K) memcpy(bsums, a.bsums, (size_t)(m * (k / 16)) * 2);
    free(buf);
    return PL_OK;
}

/* ---- the memory bound: read n bytes as fast as this machine can (the benchmarks' ceiling) ---- */

typedef struct { const uint8_t *p; uint64_t *sum; } read_job;

static void read_task(const void *arg, int64_t i0, int64_t i1) {
    const read_job *j = arg;
    uint64_t acc = 0;
#if defined(PL_X86)
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = i0; i < i1; i += 128) {
        a0 = _mm256_xor_si256(a0, _mm256_loadu_si256((const __m256i *)(j->p + i)));
        a1 = _mm256_xor_si256(a1, _mm256_loadu_si256((const __m256i *)(j->p + i + 32)));
        a2 = _mm256_xor_si256(a2, _mm256_loadu_si256((const __m256i *)(j->p + i + 64)));
        a3 = _mm256_xor_si256(a3, _mm256_loadu_si256((const __m256i *)(j->p + i + 96)));
    }
    __m256i a = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
    acc = (uint64_t)_mm256_extract_epi64(a, 0) ^ (uint64_t)_mm256_extract_epi64(a, 3);
#else
    for (int64_t i = i0; i < i1; i += 8) {
        uint64_t v;
        memcpy(&v, j->p + i, 8);
        acc ^= v;
    }
#endif
    __atomic_fetch_xor(j->sum, acc, __ATOMIC_RELAXED);  /* keeps the loads alive */
}

/* XOR of n bytes (n a multiple of 128), read by nthreads threads; returns a value that depends on them */
uint64_t pl_read_bytes(const uint8_t *p, int64_t n, int nthreads) {
    if (!p || n < 128 || n % 128) return 0;
    uint64_t sum = 0;
    read_job j = {p, &sum};
    pl_pool_run(read_task, &j, n, 1 << 16, nthreads);
    return sum;
}
