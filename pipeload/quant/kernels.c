/* pipeload's compiled CPU kernels (loaded by pipeload/quant/ckernels.py with ctypes).
 *
 * 1. Prompt processing: a prompt multiplies many token rows by each weight; PyTorch's blocked
 *    bf16 GEMM does that far faster than any packed kernel, but needs the weight unpacked. These
 *    loops unpack the int4 layout of `_convert_weight_to_int4pack_for_cpu` (tiles of 64 rows; for
 *    each input column k of a tile, 32 bytes whose low nibbles are rows 0-31 and high nibbles rows
 *    32-63) straight into W^T (K, N), whose rows are contiguous runs of the output, so every store
 *    is sequential; and int8 rows times their scale into bf16. Values follow PyTorch's bf16
 *    arithmetic exactly (round to nearest even after each operation), so they equal the torch ops.
 * 2. Decode (one or a few token rows): int4 / int8 products with 8-bit activations in blocks of
 *    32, integer dot products (AVX512-VNNI where the CPU has it), as llama.cpp computes them; and
 *    attention of one query token over the KV cache in float32.
 * 3. A thread pool that keeps its workers spinning (with sched_yield) between the products of a
 *    step, and hands out work in chunks so a descheduled worker delays nothing.
 * Plain C where the compiler vectorises; intrinsics only where it does not (x86 AVX2 / AVX512).
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float bf16_round(float f) {  /* finite inputs only */
    uint32_t u = f32_bits(f);
    u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    float r;
    memcpy(&r, &u, 4);
    return r;
}

/* scales_zeros: bf16 (K/group, N, 2); out: bf16 W^T (K, N); rows k0..k1-1 of out are written. */
void unpack_int4_t_bf16(const uint8_t *packed, const uint16_t *scales_zeros, uint16_t *out,
                        int64_t n, int64_t k, int64_t group, int64_t k0, int64_t k1) {
    float *s = (float *)malloc(sizeof(float) * n);
    float *z = (float *)malloc(sizeof(float) * n);
    int64_t loaded = -1;
    for (int64_t kk = k0; kk < k1; kk++) {
        int64_t g = kk / group;
        if (g != loaded) {
            const uint16_t *sz = scales_zeros + g * n * 2;
            for (int64_t i = 0; i < n; i++) {
                s[i] = bf16_to_f32(sz[2 * i]);
                z[i] = bf16_to_f32(sz[2 * i + 1]);
            }
            loaded = g;
        }
        uint16_t *row = out + kk * n;
        for (int64_t t = 0; t < n / 64; t++) {
            const uint8_t *src = packed + (t * k + kk) * 32;
            const float *st = s + t * 64, *zt = z + t * 64;
            uint16_t *dst = row + t * 64;
            for (int j = 0; j < 32; j++) {
                float v = bf16_round((float)((int)(src[j] & 15) - 8) * st[j]) + zt[j];
                dst[j] = (uint16_t)(f32_bits(bf16_round(v)) >> 16);
            }
            for (int j = 0; j < 32; j++) {
                float v = bf16_round((float)((int)(src[j] >> 4) - 8) * st[32 + j]) + zt[32 + j];
                dst[32 + j] = (uint16_t)(f32_bits(bf16_round(v)) >> 16);
            }
        }
    }
    free(s);
    free(z);
}

/* int8 weight (n, k) with bf16 row scales -> bf16 (n, k), rows r0..r1-1: w * scale rounded to bf16
 * (PyTorch's qweight.to(bf16) * scale) */
void int8_to_bf16(const int8_t *w, const uint16_t *scales, uint16_t *out, int64_t k, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        float sc = bf16_to_f32(scales[r]);
        const int8_t *src = w + r * k;
        uint16_t *dst = out + r * k;
        for (int64_t i = 0; i < k; i++) dst[i] = (uint16_t)(f32_bits(bf16_round((float)src[i] * sc)) >> 16);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Decode products (one or a few token rows) with 8-bit activations, as llama.cpp computes them:
 * each activation row is quantized in blocks of 32 (int8 values, one float scale per block), so
 * the inner products are integer dot products of 32 values (AVX512-VNNI / AVX2 where available).
 */
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define QB 32

/* x: float (m, k) -> xq int8 (m, k), xd float (m, k/32): x ~ xd[b] * xq; xs (m, k/32): exact block sums */
void quantize_act_q8(const float *x, int8_t *xq, float *xd, float *xs, int64_t m, int64_t k) {
    for (int64_t r = 0; r < m; r++) {
        for (int64_t b = 0; b < k / QB; b++) {
            const float *src = x + r * k + b * QB;
            float amax = 0.f, sum = 0.f;
            for (int i = 0; i < QB; i++) {
                float a = fabsf(src[i]);
                amax = a > amax ? a : amax;
                sum += src[i];
            }
            xs[r * (k / QB) + b] = sum;
            float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
            xd[r * (k / QB) + b] = d;
            for (int i = 0; i < QB; i++) xq[r * k + b * QB + i] = (int8_t)nearbyintf(src[i] * id);
        }
    }
}

static inline uint16_t f32_to_bf16(float f) { return (uint16_t)(f32_bits(bf16_round(f)) >> 16); }

#ifdef __AVX2__
static inline float hsum8(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

/* sum over 32 lanes of signed w * signed x as 8 int32 partial sums */
static inline __m256i dot32_i8(__m256i w, __m256i x) {
    __m256i ax = _mm256_sign_epi8(x, x), sw = _mm256_sign_epi8(w, x);
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sw);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sw), _mm256_set1_epi16(1));
#endif
}
#endif

/* y (m, n) bf16 = (x (m, k) @ W^T) * row_scale, W int8 (n, k) row-major, row_scale bf16 (n);
 * x given as xq/xd from quantize_act_q8. Rows n0..n1-1 are computed. m <= 16. */
void gemv_int8(const int8_t *w, const uint16_t *row_scale, const int8_t *xq, const float *xd, uint16_t *y,
               int64_t m, int64_t n, int64_t k, int64_t n0, int64_t n1) {
    int64_t nb = k / QB;
    for (int64_t r = n0; r < n1; r++) {
        const int8_t *wr = w + r * k;
        float sc = bf16_to_f32(row_scale[r]);
        for (int64_t t = 0; t < m; t++) {
            const int8_t *xr = xq + t * k;
            const float *dr = xd + t * nb;
#ifdef __AVX2__
            __m256 acc = _mm256_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                __m256i dp = dot32_i8(_mm256_loadu_si256((const __m256i *)(wr + b * QB)),
                                      _mm256_loadu_si256((const __m256i *)(xr + b * QB)));
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp), _mm256_set1_ps(dr[b]), acc);
            }
            float s = hsum8(acc);
#else
            float s = 0.f;
            for (int64_t b = 0; b < nb; b++) {
                int32_t d = 0;
                for (int i = 0; i < QB; i++) d += (int32_t)wr[b * QB + i] * (int32_t)xr[b * QB + i];
                s += (float)d * dr[b];
            }
#endif
            y[t * n + r] = f32_to_bf16(s * sc);
        }
    }
}

/* y (m, n) bf16 = x (m, k) @ W^T for the 4-bit CPU int4pack layout (see the top of this file) with
 * bf16 (k/32, n, 2) scales and zeros, weight = (q - 8) * scale + zero, group 32 (the activation
 * block). Per group: sum_k w x = s * d * sum(q * xq) + (z - 8 s) * sum(x), with exact block sums
 * xs of the activations. Tiles t0..t1-1 (64 rows each) are computed. m <= 16. */
void gemv_int4(const uint8_t *packed, const uint16_t *scales_zeros, const int8_t *xq, const float *xd,
               const float *xs, uint16_t *y, int64_t m, int64_t n, int64_t k, int64_t t0, int64_t t1) {
    int64_t nb = k / QB;
    float out[64];
    for (int64_t t = t0; t < t1; t++) {
        for (int64_t r = 0; r < m; r++) {
            const int8_t *xr = xq + r * k;
            const float *dr = xd + r * nb, *sr = xs + r * nb;
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
            float S[64], Z[64];
            __m256 facc[8];
            for (int i = 0; i < 8; i++) facc[i] = _mm256_setzero_ps();
            const __m256i mask = _mm256_set1_epi8(0x0F);
            for (int64_t g = 0; g < nb; g++) {
                const uint16_t *sz = scales_zeros + (g * n + t * 64) * 2;
                for (int i = 0; i < 64; i++) {
                    S[i] = bf16_to_f32(sz[2 * i]);
                    Z[i] = bf16_to_f32(sz[2 * i + 1]);
                }
                __m256i acc[8];
                for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_si256();
                const uint8_t *src = packed + (t * k + g * QB) * 32;
                for (int s = 0; s < QB / 4; s++) {
                    const uint8_t *p = src + s * 4 * 32;
                    __m256i b0 = _mm256_loadu_si256((const __m256i *)(p));
                    __m256i b1 = _mm256_loadu_si256((const __m256i *)(p + 32));
                    __m256i b2 = _mm256_loadu_si256((const __m256i *)(p + 64));
                    __m256i b3 = _mm256_loadu_si256((const __m256i *)(p + 96));
                    __m256i ab_lo = _mm256_unpacklo_epi8(b0, b1), ab_hi = _mm256_unpackhi_epi8(b0, b1);
                    __m256i cd_lo = _mm256_unpacklo_epi8(b2, b3), cd_hi = _mm256_unpackhi_epi8(b2, b3);
                    __m256i v[4] = {_mm256_unpacklo_epi16(ab_lo, cd_lo), _mm256_unpackhi_epi16(ab_lo, cd_lo),
                                    _mm256_unpacklo_epi16(ab_hi, cd_hi), _mm256_unpackhi_epi16(ab_hi, cd_hi)};
                    int32_t x4;
                    memcpy(&x4, xr + g * QB + s * 4, 4);
                    __m256i xv = _mm256_set1_epi32(x4);
                    for (int i = 0; i < 4; i++) {
                        acc[i] = _mm256_dpbusd_epi32(acc[i], _mm256_and_si256(v[i], mask), xv);
                        acc[4 + i] = _mm256_dpbusd_epi32(acc[4 + i], _mm256_and_si256(_mm256_srli_epi16(v[i], 4), mask), xv);
                    }
                }
                /* register i (lo nibbles: i < 4, rows 0-31; hi: rows 32-63) lane l holds row
                 * base + (l / 4) * 16 + (i % 4) * 4 + l % 4, base = 32 * (i / 4) */
                __m256 d = _mm256_set1_ps(dr[g]), xsum = _mm256_set1_ps(sr[g]);
                for (int i = 0; i < 8; i++) {
                    int r0 = 32 * (i / 4) + (i % 4) * 4;
                    __m256 s8 = _mm256_setr_m128(_mm_loadu_ps(S + r0), _mm_loadu_ps(S + r0 + 16));
                    __m256 z8 = _mm256_setr_m128(_mm_loadu_ps(Z + r0), _mm_loadu_ps(Z + r0 + 16));
                    __m256 zz = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), s8, z8);  /* z - 8 s */
                    facc[i] = _mm256_fmadd_ps(_mm256_mul_ps(s8, d), _mm256_cvtepi32_ps(acc[i]), facc[i]);
                    facc[i] = _mm256_fmadd_ps(zz, xsum, facc[i]);
                }
            }
            for (int i = 0; i < 8; i++) {
                float lanes[8];
                _mm256_storeu_ps(lanes, facc[i]);
                int r0 = 32 * (i / 4) + (i % 4) * 4;
                for (int l = 0; l < 8; l++) out[r0 + (l / 4) * 16 + l % 4] = lanes[l];
            }
#else
            for (int i = 0; i < 64; i++) out[i] = 0.f;
            for (int64_t g = 0; g < nb; g++) {
                const uint16_t *sz = scales_zeros + (g * n + t * 64) * 2;
                int32_t acc[64] = {0};
                for (int kk = 0; kk < QB; kk++) {
                    const uint8_t *p = packed + (t * k + g * QB + kk) * 32;
                    int32_t xv = xr[g * QB + kk];
                    for (int j = 0; j < 32; j++) {
                        acc[j] += (p[j] & 15) * xv;
                        acc[32 + j] += (p[j] >> 4) * xv;
                    }
                }
                for (int i = 0; i < 64; i++) {
                    float s = bf16_to_f32(sz[2 * i]), z = bf16_to_f32(sz[2 * i + 1]);
                    out[i] += s * dr[g] * (float)acc[i] + (z - 8.f * s) * sr[g];
                }
            }
#endif
            uint16_t *yr = y + r * n + t * 64;
            for (int i = 0; i < 64; i++) yr[i] = f32_to_bf16(out[i]);
        }
    }
}


/* ---------------------------------------------------------------------------------------------
 * A small thread pool for the kernels above. A job is split into small chunks that the calling
 * thread and the workers take from a shared counter, so a worker the OS has descheduled (another
 * process wants the core) delays nothing: the caller takes its chunks. Between jobs the workers
 * spin for a while calling sched_yield (on an idle machine they start the next product at once,
 * where waking a sleeping thread costs tens of microseconds, far more in a virtual machine; when
 * other threads want the core each yield hands it over), then sleep on a condition variable.
 * One job at a time: a caller finding the pool busy (another thread's job) runs its job alone.
 */
#define MAX_THREADS 64
#define SPIN_NS 3000000L
#define CHUNKS_PER_THREAD 4

typedef void (*task_fn)(const void *args, int64_t i0, int64_t i1);

static struct {
    int started;                 /* workers running */
    int base_gen;                /* generation before the job that started a new worker */
    atomic_int gen;              /* job generation */
    atomic_int open;             /* a job is posted and not finished */
    atomic_int active;           /* workers inside the current job */
    atomic_llong next, done;     /* units handed out / finished */
    atomic_int sleepers;
    task_fn fn;
    const void *args;
    int64_t units, chunk, align, n;
    pthread_mutex_t mu, run_mu;
    pthread_cond_t cv;
} P = {.mu = PTHREAD_MUTEX_INITIALIZER, .run_mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void take_chunks(void) {
    for (;;) {
        int64_t u = atomic_fetch_add(&P.next, P.chunk);
        if (u >= P.units) return;
        int64_t u1 = u + P.chunk < P.units ? u + P.chunk : P.units;
        int64_t i0 = u * P.align, i1 = u1 * P.align < P.n ? u1 * P.align : P.n;
        P.fn(P.args, i0, i1);
        atomic_fetch_add(&P.done, u1 - u);
    }
}

static void *worker(void *arg) {
    (void)arg;
    int seen = P.base_gen;
    for (;;) {
        int64_t t0 = now_ns();
        for (int spins = 0; atomic_load(&P.gen) == seen; spins++) {
            if ((spins & 15) == 15 && now_ns() - t0 > SPIN_NS) {
                pthread_mutex_lock(&P.mu);
                atomic_fetch_add(&P.sleepers, 1);
                while (atomic_load(&P.gen) == seen) pthread_cond_wait(&P.cv, &P.mu);
                atomic_fetch_sub(&P.sleepers, 1);
                pthread_mutex_unlock(&P.mu);
                break;
            }
            sched_yield();
        }
        seen = atomic_load(&P.gen);
        atomic_fetch_add(&P.active, 1);
        if (atomic_load(&P.open) && atomic_load(&P.gen) == seen) take_chunks();
        atomic_fetch_sub(&P.active, 1);
    }
    return NULL;
}

static void pool_after_fork(void) { P.started = 0; atomic_store(&P.active, 0); atomic_store(&P.open, 0); }

/* run fn over [0, n) in chunks of whole multiples of `align`, on up to nthreads threads */
static void pool_run(task_fn fn, const void *args, int64_t n, int64_t align, int nthreads) {
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    int64_t units = (n + align - 1) / align;
    if (nthreads > units) nthreads = (int)units;
    if (nthreads <= 1 || pthread_mutex_trylock(&P.run_mu) != 0) {
        fn(args, 0, n);
        return;
    }
    if (P.started == 0) pthread_atfork(NULL, NULL, pool_after_fork);
    P.base_gen = atomic_load(&P.gen);
    while (P.started < nthreads - 1) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&th, &attr, worker, NULL) != 0) break;
        P.started++;
    }
    if (P.started < 1) {
        pthread_mutex_unlock(&P.run_mu);
        fn(args, 0, n);
        return;
    }
    P.fn = fn;
    P.args = args;
    P.n = n;
    P.align = align;
    P.units = units;
    P.chunk = units / ((int64_t)nthreads * CHUNKS_PER_THREAD);
    if (P.chunk < 1) P.chunk = 1;
    atomic_store(&P.next, 0);
    atomic_store(&P.done, 0);
    atomic_store(&P.open, 1);
    atomic_fetch_add(&P.gen, 1);
    if (atomic_load(&P.sleepers) > 0) {
        pthread_mutex_lock(&P.mu);
        pthread_cond_broadcast(&P.cv);
        pthread_mutex_unlock(&P.mu);
    }
    take_chunks();
    while (atomic_load(&P.done) < units) sched_yield();
    atomic_store(&P.open, 0);
    while (atomic_load(&P.active) > 0) sched_yield();  /* no worker touches this job after we return */
    pthread_mutex_unlock(&P.run_mu);
}

/* multi-threaded entry points: the same arguments as the kernels above plus a thread count */
typedef struct { const void *a[7]; int64_t i[4]; } Args;

static void t_gemv_int4(const void *p, int64_t i0, int64_t i1) {
    const Args *a = p;
    gemv_int4(a->a[0], a->a[1], a->a[2], a->a[3], a->a[4], (uint16_t *)a->a[5], a->i[0], a->i[1], a->i[2],
              i0, i1);
}
void gemv_int4_mt(const uint8_t *packed, const uint16_t *sz, const int8_t *xq, const float *xd, const float *xs,
                  uint16_t *y, int64_t m, int64_t n, int64_t k, int nthreads) {
    Args a = {{packed, sz, xq, xd, xs, y}, {m, n, k}};
    pool_run(t_gemv_int4, &a, n / 64, 1, nthreads);
}

static void t_gemv_int8(const void *p, int64_t i0, int64_t i1) {
    const Args *a = p;
    gemv_int8(a->a[0], a->a[1], a->a[2], a->a[3], (uint16_t *)a->a[4], a->i[0], a->i[1], a->i[2], i0, i1);
}
void gemv_int8_mt(const int8_t *w, const uint16_t *row_scale, const int8_t *xq, const float *xd, uint16_t *y,
                  int64_t m, int64_t n, int64_t k, int nthreads) {
    Args a = {{w, row_scale, xq, xd, y}, {m, n, k}};
    pool_run(t_gemv_int8, &a, n, 16, nthreads);
}

static void t_unpack_bf16(const void *p, int64_t i0, int64_t i1) {
    const Args *a = p;
    unpack_int4_t_bf16(a->a[0], a->a[1], (uint16_t *)a->a[2], a->i[0], a->i[1], a->i[2], i0, i1);
}
void unpack_int4_t_bf16_mt(const uint8_t *packed, const uint16_t *sz, uint16_t *out, int64_t n, int64_t k,
                           int64_t group, int nthreads) {
    Args a = {{packed, sz, out}, {n, k, group}};
    pool_run(t_unpack_bf16, &a, k, group, nthreads);
}

static void t_int8_bf16(const void *p, int64_t i0, int64_t i1) {
    const Args *a = p;
    int8_to_bf16(a->a[0], a->a[1], (uint16_t *)a->a[2], a->i[0], i0, i1);
}
void int8_to_bf16_mt(const int8_t *w, const uint16_t *scales, uint16_t *out, int64_t n, int64_t k, int nthreads) {
    Args a = {{w, scales, out}, {k}};
    pool_run(t_int8_bf16, &a, n, 16, nthreads);
}

/* the decode entry points pipeload calls: bf16 activations in, quantized here, bf16 out */
static int quantize_bf16_act(const uint16_t *x, int64_t m, int64_t k, int8_t **xq, float **xd, float **xs) {
    float *xf = malloc(sizeof(float) * m * k);
    *xq = malloc(m * k);
    *xd = malloc(sizeof(float) * m * (k / QB));
    *xs = malloc(sizeof(float) * m * (k / QB));
    if (!xf || !*xq || !*xd || !*xs) {
        free(xf); free(*xq); free(*xd); free(*xs);
        return -1;
    }
    for (int64_t i = 0; i < m * k; i++) xf[i] = bf16_to_f32(x[i]);
    quantize_act_q8(xf, *xq, *xd, *xs, m, k);
    free(xf);
    return 0;
}

int linear_int4(const uint16_t *x, const uint8_t *packed, const uint16_t *sz, uint16_t *y, int64_t m, int64_t n,
                int64_t k, int nthreads) {
    int8_t *xq; float *xd, *xs;
    if (quantize_bf16_act(x, m, k, &xq, &xd, &xs)) return -1;
    gemv_int4_mt(packed, sz, xq, xd, xs, y, m, n, k, nthreads);
    free(xq); free(xd); free(xs);
    return 0;
}

int linear_int8(const uint16_t *x, const int8_t *w, const uint16_t *row_scale, uint16_t *y, int64_t m, int64_t n,
                int64_t k, int nthreads) {
    int8_t *xq; float *xd, *xs;
    if (quantize_bf16_act(x, m, k, &xq, &xd, &xs)) return -1;
    gemv_int8_mt(w, row_scale, xq, xd, y, m, n, k, nthreads);
    free(xq); free(xd); free(xs);
    return 0;
}

/* Attention of one query token over S cached positions, bf16 in and out, float32 inside (as
 * PyTorch's SDPA computes it): q (H, hd), k/v rows of hd values, head h of k/v at k + h*head_stride,
 * query head j uses key/value head j / (H / Hkv). Key/value heads kh0..kh1-1 are computed. */
void attend_one(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t head_stride, int64_t H,
                int64_t Hkv, int64_t S, int64_t hd, float scale, uint16_t *out, int64_t kh0, int64_t kh1) {
    int64_t G = H / Hkv;
    float *p = malloc(sizeof(float) * S), *acc = malloc(sizeof(float) * hd), *qf = malloc(sizeof(float) * hd);
    for (int64_t kh = kh0; kh < kh1; kh++) {
        const uint16_t *K = k + kh * head_stride, *V = v + kh * head_stride;
        for (int64_t g = 0; g < G; g++) {
            int64_t j = kh * G + g;
            for (int64_t i = 0; i < hd; i++) qf[i] = bf16_to_f32(q[j * hd + i]);
            float mx = -INFINITY;
            for (int64_t s = 0; s < S; s++) {
                const uint16_t *kr = K + s * hd;
                float lanes[16] = {0.f};
                int64_t i = 0;
                for (; i + 16 <= hd; i += 16)
                    for (int l = 0; l < 16; l++) lanes[l] += qf[i + l] * bf16_to_f32(kr[i + l]);
                float d = 0.f;
                for (; i < hd; i++) d += qf[i] * bf16_to_f32(kr[i]);
                for (int l = 0; l < 16; l++) d += lanes[l];
                p[s] = d * scale;
                mx = p[s] > mx ? p[s] : mx;
            }
            float sum = 0.f;
            for (int64_t s = 0; s < S; s++) {
                p[s] = expf(p[s] - mx);
                sum += p[s];
            }
            for (int64_t i = 0; i < hd; i++) acc[i] = 0.f;
            for (int64_t s = 0; s < S; s++) {
                const uint16_t *vr = V + s * hd;
                float w = p[s];
                for (int64_t i = 0; i < hd; i++) acc[i] += w * bf16_to_f32(vr[i]);
            }
            float inv = 1.f / sum;
            for (int64_t i = 0; i < hd; i++) out[j * hd + i] = f32_to_bf16(acc[i] * inv);
        }
    }
    free(p); free(acc); free(qf);
}

static void t_attend(const void *p, int64_t i0, int64_t i1) {
    const Args *a = p;
    float scale;
    memcpy(&scale, &a->i[3], sizeof(float));
    attend_one(a->a[0], a->a[1], a->a[2], a->i[0], a->i[1], a->i[2], (int64_t)a->a[4], (int64_t)a->a[5], scale,
               (uint16_t *)a->a[3], i0, i1);
}
void attend_one_mt(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t head_stride, int64_t H,
                   int64_t Hkv, int64_t S, int64_t hd, float scale, uint16_t *out, int nthreads) {
    Args a = {{q, k, v, out, (const void *)(intptr_t)S, (const void *)(intptr_t)hd}, {head_stride, H, Hkv, 0}};
    memcpy(&a.i[3], &scale, sizeof(float));
    pool_run(t_attend, &a, Hkv, 1, nthreads);
}
