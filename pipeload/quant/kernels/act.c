/* Activation quantization: float32 or bfloat16 rows to the 8-bit formats the products use.
 *
 * The definitions (what llama.cpp computes, so that pipeload's logits stay close to its):
 * - Q8_0, per block of 32: amax = max |x|, d = amax / 127, q = round_half_even(x * (127 / amax))
 *   (0 when amax is 0); the stored scale is d rounded to fp16.
 * - Q8_1: Q8_0 plus s = d * sum(q), rounded to fp16 (d unrounded, as llama.cpp).
 * - Q8_K, per block of 256: v = the first value of largest |x|, iscale = -127 / v,
 *   q = min(127, round_half_even(iscale * x)), d = 1 / iscale (float32), bsums = sums of 16 q.
 * Every step is one float operation as written, so the SIMD versions give the same bits as the
 * scalar ones (checked by the tests against a torch transcription of these lines).
 */
#include "pl.h"

PL_INLINE float load_x(const void *x, int x_bf16, int64_t i) {
    return x_bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

/* one row's values as float32 into buf (k floats); returns a pointer to them */
static const float *row_f32(const void *x, int x_bf16, int64_t k, float *buf) {
    if (!x_bf16) return (const float *)x;
    const uint16_t *h = x;
#if defined(PL_AVX512VNNI)
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
        __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(h + i)));
        _mm512_storeu_ps(buf + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    }
    for (; i < k; i++) buf[i] = bf16_to_f32(h[i]);
#else
    for (int64_t i = 0; i < k; i++) buf[i] = bf16_to_f32(h[i]);
#endif
    return buf;
}

static void q8_0_row(const float *x, int64_t k, int8_t *q, float *d, float *s) {
    for (int64_t b = 0; b < k / QK; b++) {
        const float *xb = x + b * QK;
        int8_t *qb = q + b * QK;
#if defined(PL_X86)
        __m256 v[4], mx = _mm256_setzero_ps();
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(xb + 8 * j);
            mx = _mm256_max_ps(mx, _mm256_and_ps(v[j], absmask));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        float id = amax != 0.f ? 127.f / amax : 0.f;
        __m256 vid = _mm256_set1_ps(id);
        __m256i iv[4];
        for (int j = 0; j < 4; j++)
            iv[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        if (s) {
            __m256i t = _mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3]));
            __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
            t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4E));
            t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xB1));
            s[b] = fp16_round((amax / 127.f) * (float)_mm_cvtsi128_si32(t4));
        }
        __m256i p01 = _mm256_packs_epi32(iv[0], iv[1]), p23 = _mm256_packs_epi32(iv[2], iv[3]);
        __m256i p = _mm256_packs_epi16(p01, p23);
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)qb, p);
#else
        float amax = 0.f;
        for (int j = 0; j < QK; j++) {
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        float id = amax != 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            qb[j] = (int8_t)nearest_even(xb[j] * id);
            sum += qb[j];
        }
        if (s) s[b] = fp16_round((amax / 127.f) * (float)sum);
#endif
        d[b] = fp16_round(amax / 127.f);
    }
}

static void q8_K_row(const float *x, int64_t k, int8_t *q, float *d, int16_t *bsums) {
    for (int64_t b = 0; b < k / QKK; b++) {
        const float *xb = x + b * QKK;
        int8_t *qb = q + b * QKK;
        /* the first value of largest magnitude */
        float amax = 0.f, vmax = 0.f;
#if defined(PL_X86)
        __m256 hi = _mm256_loadu_ps(xb), lo = hi;
        for (int j = 8; j < QKK; j += 8) {
            __m256 v = _mm256_loadu_ps(xb + j);
            hi = _mm256_max_ps(hi, v);
            lo = _mm256_min_ps(lo, v);
        }
        float his[8], los[8], top = -INFINITY, bot = INFINITY;
        _mm256_storeu_ps(his, hi);
        _mm256_storeu_ps(los, lo);
        for (int j = 0; j < 8; j++) {
            top = his[j] > top ? his[j] : top;
            bot = los[j] < bot ? los[j] : bot;
        }
        if (top != -bot) {  /* one sign holds the largest magnitude: no tie to break */
            vmax = top > -bot ? top : bot;
            amax = fabsf(vmax);
        } else
#endif
        {
            for (int j = 0; j < QKK; j++) {
                float a = fabsf(xb[j]);
                if (a > amax) { amax = a; vmax = xb[j]; }
            }
        }
        if (amax == 0.f) {  /* also when the block holds NaNs only */
            d[b] = 0.f;
            memset(qb, 0, QKK);
            memset(bsums + b * 16, 0, 16 * sizeof(int16_t));
            continue;
        }
        float iscale = -127.f / vmax;
#if defined(PL_X86)
        __m256 vis = _mm256_set1_ps(iscale);
        const __m256i cap = _mm256_set1_epi32(127);
        for (int j = 0; j < QKK; j += 32) {
            __m256i iv[4];
            for (int t = 0; t < 4; t++) {
                __m256 v = _mm256_mul_ps(_mm256_loadu_ps(xb + j + 8 * t), vis);
                iv[t] = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)), cap);
            }
            __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
            p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256((__m256i *)(qb + j), p);
        }
#else
        for (int j = 0; j < QKK; j++) {
            int v = nearest_even(iscale * xb[j]);
            qb[j] = (int8_t)(v < 127 ? v : 127);
        }
#endif
        for (int g = 0; g < 16; g++) {
            int sum = 0;
            for (int j = 0; j < 16; j++) sum += qb[g * 16 + j];
            bsums[b * 16 + g] = (int16_t)sum;
        }
        d[b] = 1.f / iscale;
    }
}

/* Bytes of scratch for m rows of k values in format fmt (each array 64-byte aligned). */
#define ALIGN64(n) (((n) + 63) & ~(int64_t)63)
int64_t pl_act_bytes(int fmt, int64_t m, int64_t k) {
    int64_t q = ALIGN64(m * k), f = ALIGN64(m * k * 4) + ALIGN64(k * 4);
    switch (fmt) {
        case ACT_F32: return f;
        case ACT_Q8_0: return q + ALIGN64(m * (k / QK) * 4) + ALIGN64(k * 4);
        case ACT_Q8_1: return q + 2 * ALIGN64(m * (k / QK) * 4) + ALIGN64(k * 4);
        case ACT_Q8_K: return q + ALIGN64(m * (k / QKK) * 4) + ALIGN64(m * (k / 16) * 2) + ALIGN64(k * 4);
    }
    return -1;
}

/* Lay out the arrays of `a` in buf (pl_act_bytes(fmt, m, k) bytes, 64-byte aligned). */
void pl_act_layout(int fmt, int64_t m, int64_t k, uint8_t *buf, pl_act *a) {
    memset(a, 0, sizeof *a);
    a->m = m;
    a->k = k;
    if (fmt == ACT_F32) {
        a->f = (const float *)buf;
        return;
    }
    a->q = (const int8_t *)buf;
    buf += ALIGN64(m * k);
    if (fmt == ACT_Q8_K) {
        a->d = (const float *)buf;
        buf += ALIGN64(m * (k / QKK) * 4);
        a->bsums = (const int16_t *)buf;
        return;
    }
    a->d = (const float *)buf;
    buf += ALIGN64(m * (k / QK) * 4);
    if (fmt == ACT_Q8_1) a->s = (const float *)buf;
}

/* Quantize rows r0..r1-1 of x (row stride ldx values) into the arrays of `a`; bf16 rows are
 * converted to float32 in rowbuf (k floats) first. */
void pl_quantize_rows(int fmt, const void *x, int x_bf16, int64_t ldx, const pl_act *a, int64_t r0, int64_t r1,
                      float *rowbuf) {
    int64_t k = a->k;
    for (int64_t r = r0; r < r1; r++) {
        const void *xr = x_bf16 ? (const void *)((const uint16_t *)x + r * ldx) : (const void *)((const float *)x + r * ldx);
        if (fmt == ACT_F32) {
            float *dst = (float *)a->f + r * k;
            if (x_bf16) row_f32(xr, 1, k, dst);
            else memcpy(dst, xr, (size_t)k * 4);
            continue;
        }
        const float *xf = row_f32(xr, x_bf16, k, rowbuf);
        int8_t *q = (int8_t *)a->q + r * k;
        if (fmt == ACT_Q8_K)
            q8_K_row(xf, k, q, (float *)a->d + r * (k / QKK), (int16_t *)a->bsums + r * (k / 16));
        else
            q8_0_row(xf, k, q, (float *)a->d + r * (k / QK), fmt == ACT_Q8_1 ? (float *)a->s + r * (k / QK) : NULL);
    }
}

typedef struct { int fmt; const void *x; int x_bf16; int64_t ldx; const pl_act *a; } quant_job;

static void quantize_rows_task(const void *p, int64_t i0, int64_t i1) {
    const quant_job *j = p;
    float rowbuf[j->a->k];  /* k <= PL_MAX_K (checked by the entry points): at most 256 KB of stack */
    pl_quantize_rows(j->fmt, j->x, j->x_bf16, j->ldx, j->a, i0, i1, rowbuf);
}

/* Quantize all rows of `a` (laid out in buf by pl_act_layout), in parallel when there are many;
 * the last k floats of buf hold a converted bf16 row on the calling thread. */
void pl_quantize_act(int fmt, const void *x, int x_bf16, int64_t ldx, uint8_t *buf, const pl_act *a, int nthreads) {
    if (a->m < 16) {
        float *rowbuf = (float *)(buf + pl_act_bytes(fmt, a->m, a->k) - ALIGN64(a->k * 4));
        pl_quantize_rows(fmt, x, x_bf16, ldx, a, 0, a->m, rowbuf);
        return;
    }
    quant_job j = {fmt, x, x_bf16, ldx, a};
    pl_pool_run(quantize_rows_task, &j, a->m, 4, nthreads);
}
