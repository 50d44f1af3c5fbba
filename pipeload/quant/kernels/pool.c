/* The kernels' thread pool: pl_pool_run splits a job into chunks that the calling thread and the
 * workers take from a shared counter.
 *
 * A worker the OS has descheduled (another process wants the core) delays nothing: the caller
 * takes its chunks. Between jobs the workers spin for a while calling sched_yield (on an idle
 * machine they start the next product at once, where waking a sleeping thread costs tens of
 * microseconds, far more in a virtual machine; when other threads want the core each yield hands
 * it over), then sleep on a condition variable. One job at a time: a caller finding the pool busy
 * (another thread's job) runs its job alone. Which thread computes a chunk never changes a result:
 * the kernels compute every output on one thread in a fixed order.
 */
#include "pl.h"
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>

#define MAX_THREADS 64
#define SPIN_NS 3000000L
#define CHUNKS_PER_THREAD 4

static struct {
    int started;                 /* workers running */
    int base_gen;                /* generation before the job that started a new worker */
    atomic_int gen;              /* job generation */
    atomic_int open;             /* a job is posted and not finished */
    atomic_int active;           /* workers inside the current job */
    atomic_llong next, done;     /* units handed out / finished */
    atomic_int sleepers;
    pl_task_fn fn;
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
void pl_pool_run(pl_task_fn fn, const void *args, int64_t n, int64_t align, int nthreads) {
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

/* ---- per-thread scratch buffers ---- */

typedef struct { uint8_t *p[PL_SCRATCH_SLOTS]; int64_t n[PL_SCRATCH_SLOTS]; } scratch_set;
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;

static void scratch_free(void *v) {
    scratch_set *s = v;
    if (!s) return;
    for (int i = 0; i < PL_SCRATCH_SLOTS; i++) free(s->p[i]);
    free(s);
}
static void scratch_init(void) { pthread_key_create(&scratch_key, scratch_free); }

uint8_t *pl_thread_scratch(int slot, int64_t n) {
    pthread_once(&scratch_once, scratch_init);
    scratch_set *s = pthread_getspecific(scratch_key);
    if (!s) {
        s = calloc(1, sizeof *s);
        if (!s || pthread_setspecific(scratch_key, s)) { free(s); return NULL; }
    }
    if (s->n[slot] < n) {
        void *p = NULL;
        if (posix_memalign(&p, 64, (size_t)n)) return NULL;
        free(s->p[slot]);
        s->p[slot] = p;
        s->n[slot] = n;
    }
    return s->p[slot];
}
