/* Persistent pool of pinned worker threads for the expert kernels.
 *
 * Created once per process (per ISA extension) and grown, never torn down per
 * call: spawning threads per MoE call would cost more than a decode-time call
 * itself (~1 ms per layer). The calling thread is worker 0 and runs its share;
 * workers 1..n-1 are pinned one per CPU of the process affinity set.
 *
 * One job at a time: `call_lock` serialises callers, so two Python threads
 * calling into different layers at once (dual-batch overlap) are safe; they
 * take turns on the same cores instead of oversubscribing them.
 *
 * Waking: a worker spins on `generation` for `spin_ns` (decode calls arrive
 * back to back, a futex wake-up costs tens of microseconds), then sleeps on
 * the condition variable so an idle daemon burns no CPU.
 */
#ifndef MOED_THREAD_POOL_H
#define MOED_THREAD_POOL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#define POOL_MAX_THREADS 256

typedef void (*pool_fn)(void *arg, int tid, int nthreads);

typedef struct {
    pthread_mutex_t call_lock;      /* one job at a time */
    pthread_mutex_t mu;             /* guards sleeping on cv */
    pthread_cond_t cv;
    int size;                       /* threads including the caller slot 0 */
    int pin;                        /* pin workers to CPUs */
    int64_t spin_ns;                /* busy-wait before sleeping */
    atomic_uint generation;         /* bumped once per job */
    atomic_int pending;             /* workers still inside the current job */
    pool_fn fn;
    void *arg;
    int nthreads;                   /* workers taking part in the current job */
    unsigned start_gen[POOL_MAX_THREADS]; /* generation when worker i was created */
    int cpus[POOL_MAX_THREADS];     /* affinity set, in order */
    int ncpus;
} thread_pool;

static thread_pool g_pool = {
    .call_lock = PTHREAD_MUTEX_INITIALIZER, .mu = PTHREAD_MUTEX_INITIALIZER,
    .cv = PTHREAD_COND_INITIALIZER, .size = 1, .pin = 1, .spin_ns = 100000,
};

static inline void cpu_relax(void) {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
}

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Wait until *v == want; spins first, then yields (the owner is running). */
static inline void spin_until_eq(atomic_int *v, int want) {
    int spins = 0;
    while (atomic_load_explicit(v, memory_order_acquire) != want) {
        if (++spins < 4096) cpu_relax(); else sched_yield();
    }
}

static void pool_wait_job(unsigned seen) {
    int64_t deadline = now_ns() + g_pool.spin_ns;
    int n = 0;
    while (atomic_load_explicit(&g_pool.generation, memory_order_acquire) == seen) {
        cpu_relax();
        if ((++n & 255) == 0 && now_ns() > deadline) {
            pthread_mutex_lock(&g_pool.mu);
            while (atomic_load_explicit(&g_pool.generation, memory_order_acquire) == seen)
                pthread_cond_wait(&g_pool.cv, &g_pool.mu);
            pthread_mutex_unlock(&g_pool.mu);
        }
    }
}

static void *pool_worker(void *p) {
    int tid = (int)(intptr_t)p;
    /* the generation at creation, not at start-up: a worker scheduled late
     * must still see the job published right after it was created */
    unsigned seen = g_pool.start_gen[tid];
    for (;;) {
        pool_wait_job(seen);
        seen = atomic_load_explicit(&g_pool.generation, memory_order_acquire);
        if (tid < g_pool.nthreads) g_pool.fn(g_pool.arg, tid, g_pool.nthreads);
        atomic_fetch_sub_explicit(&g_pool.pending, 1, memory_order_release);
    }
    return NULL;
}

static void pool_read_affinity(void) {
    cpu_set_t set;
    g_pool.ncpus = 0;
    if (sched_getaffinity(0, sizeof(set), &set) == 0)
        for (int c = 0; c < CPU_SETSIZE && g_pool.ncpus < POOL_MAX_THREADS; c++)
            if (CPU_ISSET(c, &set)) g_pool.cpus[g_pool.ncpus++] = c;
}

/* Grow the pool to n threads (caller included). Call with call_lock held.
 * Returns the size reached (smaller than n if thread creation failed). */
static int pool_grow(int n) {
    if (n > POOL_MAX_THREADS) n = POOL_MAX_THREADS;
    if (g_pool.ncpus == 0) pool_read_affinity();
    while (g_pool.size < n) {
        pthread_t th;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        if (g_pool.pin && g_pool.ncpus > 1) {
            /* worker i on the i-th allowed CPU; the caller keeps its own placement */
            cpu_set_t one;
            CPU_ZERO(&one);
            CPU_SET(g_pool.cpus[g_pool.size % g_pool.ncpus], &one);
            pthread_attr_setaffinity_np(&attr, sizeof(one), &one);
        }
        g_pool.start_gen[g_pool.size] = atomic_load(&g_pool.generation);
        int rc = pthread_create(&th, &attr, pool_worker, (void *)(intptr_t)g_pool.size);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        pthread_detach(th);
        g_pool.size++;
    }
    return g_pool.size;
}

/* Keep the caller off the CPUs of workers 1..n-1 for one job: the caller is
 * not pinned (it is the application's thread, and threads it creates later
 * inherit its mask), so the OS may have left it on a worker's CPU, where the
 * two would share one core for the call while another core idles until the
 * load balancer moves it. sched_getcpu is a vDSO read; the mask is changed
 * only on a clash and restored after. Returns whether `saved` must be restored. */
static int pool_claim_caller_cpu(int n, cpu_set_t *saved) {
    if (!g_pool.pin || g_pool.ncpus <= 1) return 0;
    int cur = sched_getcpu(), clash = 0;
    for (int t = 1; t < n && !clash; t++) clash = g_pool.cpus[t % g_pool.ncpus] == cur;
    if (!clash || n > g_pool.ncpus) return 0;
    if (pthread_getaffinity_np(pthread_self(), sizeof(*saved), saved) != 0) return 0;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(g_pool.cpus[0], &one);
    return pthread_setaffinity_np(pthread_self(), sizeof(one), &one) == 0;
}

/* Run fn(arg, tid, n) on n threads (the caller is tid 0) and wait for all. */
static void pool_run(pool_fn fn, void *arg, int n) {
    pthread_mutex_lock(&g_pool.call_lock);
    if (n < 1) n = 1;
    if (n > g_pool.size) n = pool_grow(n);
    if (n == 1) {
        fn(arg, 0, 1);
        pthread_mutex_unlock(&g_pool.call_lock);
        return;
    }
    cpu_set_t saved;
    int restore = pool_claim_caller_cpu(n, &saved);
    g_pool.fn = fn;
    g_pool.arg = arg;
    g_pool.nthreads = n;
    atomic_store(&g_pool.pending, g_pool.size - 1);
    pthread_mutex_lock(&g_pool.mu);
    atomic_fetch_add_explicit(&g_pool.generation, 1, memory_order_release);
    pthread_cond_broadcast(&g_pool.cv);
    pthread_mutex_unlock(&g_pool.mu);
    fn(arg, 0, n);
    spin_until_eq(&g_pool.pending, 0);
    if (restore) pthread_setaffinity_np(pthread_self(), sizeof(saved), &saved);
    pthread_mutex_unlock(&g_pool.call_lock);
}

static int pool_size(void) { return g_pool.size; }

/* Work shares: thread i streams its own contiguous range of a job's tasks
 * front to back, and takes what is left of the others' once done. A share is
 * [lo, hi) in one atomic word, (lo << 32) | hi, a cache line apart from the
 * next (SHARE_STRIDE words). Memory-bound decode kernels use them: two cores
 * each reading their own contiguous stream get more of the machine's read
 * bandwidth than two reading tiles dealt alternately (measured at ~80 GB/s:
 * 88-92% against 80-87% for the LM head, see dense_kernels.c). */
#define SHARE_STRIDE 8

static inline uint64_t share_range(int64_t lo, int64_t hi) {
    return ((uint64_t)lo << 32) | (uint64_t)hi;
}

/* Takes up to `want` positions from the front of the share (back: one, from
 * the back); -> how many (0: empty), the first in *first. */
static int share_take(_Atomic uint64_t *s, int want, int back, int *first) {
    uint64_t v = atomic_load_explicit(s, memory_order_relaxed);
    for (;;) {
        uint32_t lo = (uint32_t)(v >> 32), hi = (uint32_t)v;
        if (lo >= hi) return 0;
        int got = back ? 1 : (hi - lo < (uint32_t)want ? (int)(hi - lo) : want);
        uint64_t w = back ? share_range(lo, hi - 1) : share_range(lo + got, hi);
        if (atomic_compare_exchange_weak_explicit(s, &v, w, memory_order_relaxed,
                                                  memory_order_relaxed)) {
            *first = back ? (int)hi - 1 : (int)lo;
            return got;
        }
    }
}

static void pool_configure(int pin, int64_t spin_ns) {
    pthread_mutex_lock(&g_pool.call_lock);
    g_pool.pin = pin;
    if (spin_ns >= 0) g_pool.spin_ns = spin_ns;
    pthread_mutex_unlock(&g_pool.call_lock);
}

#endif
