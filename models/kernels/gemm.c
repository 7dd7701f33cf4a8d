/* Matrix products for decoding: y = x @ W^T (* scale) (+ bias), W int8 or float32.
 *
 * W is (out, in), row-major: int8 with one float32 scale per output row, or float32; x is
 * float32 (m, in) with m small (a decode step, or a speculative draft being verified).
 * Each weight row is read once and multiplied against every row of x, so a decode step
 * streams W from memory once: one byte per weight for int8, four for float32.
 *
 * Int8 with AVX-512 VNNI: x is first quantized to int8 in blocks of 64 (one float scale
 * per block, absmax / 127); each block's dot product is one VPDPBUSD of the weights made
 * unsigned (see rows_vnni) against x. Elsewhere the weights are widened to float in
 * registers (AVX-512 or AVX2) and x stays float32. Float32 weights use AVX-512 or AVX2
 * FMAs. Built by codevista.models.native with the machine's compiler (-O3 -march=native);
 * a plain loop otherwise.
 *
 * Every row of x is summed in one fixed order whatever m is, so a row's result does not
 * depend on the rows beside it: verifying a draft gives each row the bits a decode step
 * would (the build turns off FMA contraction outside the explicit intrinsics).
 *
 * Threads: a decode step is ~100 products of well under a millisecond each, with small
 * operations between them. The rows of W are shared with our own worker threads, which
 * spin for a short while after each product (so the next one starts at once) and then
 * sleep (an idle server burns no CPU). OpenMP was measured slower here: its workers,
 * counted against the cores of every thread that ever ran a parallel region, fall asleep
 * between products when the caller is not the main thread, and each product paid a wake-up.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAX_M 16
#define QB 64

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define CV_VNNI 1

/* x (m, n_in) -> int8 blocks (m, nb * QB, zero padded), their scales (m, nb), and per row
 * the correction 128 * sum_b scale_b * sum(block b) (see rows_vnni) */
static void quantize_rows(const float *x, int m, int n_in, int8_t *xq, float *xs,
                          float *corr)
{
    int nb = (n_in + QB - 1) / QB;
    memset(xq, 0, (size_t)m * nb * QB);
    for (int r = 0; r < m; r++) {
        const float *xr = x + (int64_t)r * n_in;
        double c = 0.0;
        for (int b = 0; b < nb; b++) {
            int i0 = b * QB, i1 = i0 + QB < n_in ? i0 + QB : n_in;
            float amax = 0.0f;
            for (int i = i0; i < i1; i++) amax = fmaxf(amax, fabsf(xr[i]));
            float sc = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            xs[r * nb + b] = sc;
            int8_t *q = xq + ((int64_t)r * nb + b) * QB;
            int sum = 0;
            for (int i = i0; i < i1; i++) {
                q[i - i0] = (int8_t)nearbyintf(xr[i] * inv);
                sum += q[i - i0];
            }
            c += 128.0 * (double)sc * sum;
        }
        corr[r] = (float)c;
    }
}

/* VPDPBUSD multiplies unsigned bytes by signed ones. The weights are made unsigned by
 * flipping their sign bit (w + 128), so each block's product is sum(w x) + 128 sum(x); the
 * second term depends on x alone and is taken off once per row of x (corr). Per 64
 * weights and row of x: a load, an XOR, VPDPBUSD, a conversion and an FMA. */
/* Sums of one row of W against G rows of x (G <= 4, a constant where inlined): block b
 * goes to chain b % 2, then the two chains are added. Each row of x sees exactly this
 * order whatever G is, so verifying a draft (m > 1) gives each row the bits a decode step
 * (m = 1) gives. */
static inline __attribute__((always_inline)) void
vnni_dot(const int8_t *row, const int8_t *xq, const float *xs, int nb, __mmask64 last, int G,
         float *sums)
{
    const __m512i zero = _mm512_setzero_si512();
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512 a0[4], a1[4];
    for (int r = 0; r < G; r++) a0[r] = a1[r] = _mm512_setzero_ps();
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        /* masked-off lanes read as 0 and become 128: x is zero there */
        __m512i w0 = _mm512_xor_si512(_mm512_loadu_si512((const void *)(row + b * QB)), flip);
        __m512i w1 = _mm512_xor_si512(
            _mm512_maskz_loadu_epi8(b + 2 == nb ? last : ~(__mmask64)0, row + (b + 1) * QB), flip);
        for (int r = 0; r < G; r++) {
            const int8_t *xr = xq + ((int64_t)r * nb + b) * QB;
            __m512i d0 = _mm512_dpbusd_epi32(zero, w0, _mm512_loadu_si512((const void *)xr));
            __m512i d1 = _mm512_dpbusd_epi32(zero, w1, _mm512_loadu_si512((const void *)(xr + QB)));
            a0[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(xs[r * nb + b]), a0[r]);
            a1[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_set1_ps(xs[r * nb + b + 1]), a1[r]);
        }
    }
    if (b < nb) {
        __m512i w0 = _mm512_xor_si512(_mm512_maskz_loadu_epi8(last, row + b * QB), flip);
        for (int r = 0; r < G; r++) {
            const int8_t *xr = xq + ((int64_t)r * nb + b) * QB;
            __m512i d0 = _mm512_dpbusd_epi32(zero, w0, _mm512_loadu_si512((const void *)xr));
            a0[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_set1_ps(xs[r * nb + b]), a0[r]);
        }
    }
    for (int r = 0; r < G; r++) sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
}

static void rows_vnni(const int8_t *xq, const float *xs, const float *corr, int m, int n_in,
                      const int8_t *w, const float *scale, const float *bias, float *y,
                      int n_out, int o0, int o1)
{
    int nb = (n_in + QB - 1) / QB;
    int tail = n_in - (nb - 1) * QB;
    __mmask64 last = tail == QB ? ~(__mmask64)0 : (((__mmask64)1 << tail) - 1);
    for (int o = o0; o < o1; o++) {
        const int8_t *row = w + (int64_t)o * n_in;
        float bo = bias ? bias[o] : 0.0f;
        for (int r0 = 0; r0 < m; r0 += 4) {  /* up to four rows of x per read of the row */
            const int8_t *xr = xq + (int64_t)r0 * nb * QB;
            const float *sr = xs + (int64_t)r0 * nb;
            float sums[4];
            int g = m - r0 < 4 ? m - r0 : 4;
            switch (g) {  /* a constant G for each: the sums stay in registers */
            case 1: vnni_dot(row, xr, sr, nb, last, 1, sums); break;
            case 2: vnni_dot(row, xr, sr, nb, last, 2, sums); break;
            case 3: vnni_dot(row, xr, sr, nb, last, 3, sums); break;
            default: vnni_dot(row, xr, sr, nb, last, 4, sums); break;
            }
            for (int r = 0; r < g; r++)
                y[(int64_t)(r0 + r) * n_out + o] = fmaf(sums[r] - corr[r0 + r], scale[o], bo);
        }
    }
}
#endif

/* Float32 weights (out, in), row-major: the same row-at-a-time products, reading four
 * bytes per weight. Sums of one row of W against G rows of x (G <= 4, a constant where
 * inlined): chunk c of the row's SIMD-width chunks goes to chain c % 4; the chains are
 * added as (s0 + s1) + (s2 + s3), then the remaining weights one by one. Each row of x
 * sees exactly this order whatever G is (see vnni_dot). */
#if defined(__AVX512F__)
#define VW 16
#define VEC __m512
#define VZERO _mm512_setzero_ps
#define VLOAD _mm512_loadu_ps
#define VFMA _mm512_fmadd_ps
#define VADD _mm512_add_ps
static inline float vsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__)
#define VW 8
#define VEC __m256
#define VZERO _mm256_setzero_ps
#define VLOAD _mm256_loadu_ps
#define VFMA _mm256_fmadd_ps
#define VADD _mm256_add_ps
static inline float vsum(__m256 v)
{
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}
#endif

static inline __attribute__((always_inline)) void
f32_dot(const float *row, const float *x, int n_in, int G, float *sums)
{
    int i = 0;
#ifdef VW
    VEC a[4][4];
    for (int r = 0; r < G; r++) a[r][0] = a[r][1] = a[r][2] = a[r][3] = VZERO();
    for (; i + 4 * VW <= n_in; i += 4 * VW) {
        VEC w0 = VLOAD(row + i), w1 = VLOAD(row + i + VW);
        VEC w2 = VLOAD(row + i + 2 * VW), w3 = VLOAD(row + i + 3 * VW);
        for (int r = 0; r < G; r++) {
            const float *xr = x + (int64_t)r * n_in + i;
            a[r][0] = VFMA(w0, VLOAD(xr), a[r][0]);
            a[r][1] = VFMA(w1, VLOAD(xr + VW), a[r][1]);
            a[r][2] = VFMA(w2, VLOAD(xr + 2 * VW), a[r][2]);
            a[r][3] = VFMA(w3, VLOAD(xr + 3 * VW), a[r][3]);
        }
    }
    /* up to three more whole chunks: chains 0, 1, 2 */
    if (i + VW <= n_in) {
        VEC w0 = VLOAD(row + i);
        for (int r = 0; r < G; r++) a[r][0] = VFMA(w0, VLOAD(x + (int64_t)r * n_in + i), a[r][0]);
        i += VW;
        if (i + VW <= n_in) {
            VEC w1 = VLOAD(row + i);
            for (int r = 0; r < G; r++) a[r][1] = VFMA(w1, VLOAD(x + (int64_t)r * n_in + i), a[r][1]);
            i += VW;
            if (i + VW <= n_in) {
                VEC w2 = VLOAD(row + i);
                for (int r = 0; r < G; r++)
                    a[r][2] = VFMA(w2, VLOAD(x + (int64_t)r * n_in + i), a[r][2]);
                i += VW;
            }
        }
    }
    for (int r = 0; r < G; r++) sums[r] = vsum(VADD(VADD(a[r][0], a[r][1]), VADD(a[r][2], a[r][3])));
#else
    for (int r = 0; r < G; r++) sums[r] = 0.0f;
#endif
    for (; i < n_in; i++)  /* the tail, or everything without SIMD */
        for (int r = 0; r < G; r++) sums[r] += row[i] * x[(int64_t)r * n_in + i];
}

static void rows_f32(const float *x, int m, int n_in, const float *w, const float *bias,
                     float *y, int n_out, int o0, int o1)
{
    for (int o = o0; o < o1; o++) {
        const float *row = w + (int64_t)o * n_in;
        float b = bias ? bias[o] : 0.0f;
        for (int r0 = 0; r0 < m; r0 += 4) {  /* up to four rows of x per read of the row */
            const float *xr = x + (int64_t)r0 * n_in;
            float sums[4];
            int g = m - r0 < 4 ? m - r0 : 4;
            switch (g) {  /* a constant G for each: the sums stay in registers */
            case 1: f32_dot(row, xr, n_in, 1, sums); break;
            case 2: f32_dot(row, xr, n_in, 2, sums); break;
            case 3: f32_dot(row, xr, n_in, 3, sums); break;
            default: f32_dot(row, xr, n_in, 4, sums); break;
            }
            for (int r = 0; r < g; r++) y[(int64_t)(r0 + r) * n_out + o] = sums[r] + b;
        }
    }
}

static void rows_gemm(const float *x, int m, int n_in, const int8_t *w,
                      const float *scale, const float *bias, float *y, int n_out,
                      int o0, int o1)
{
    for (int o = o0; o < o1; o++) {
        const int8_t *row = w + (int64_t)o * n_in;
        float sums[MAX_M];
        int i = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
        __m512 acc[MAX_M];
        for (int r = 0; r < m; r++) acc[r] = _mm512_setzero_ps();
        for (; i + 16 <= n_in; i += 16) {
            __m128i b = _mm_loadu_si128((const __m128i *)(row + i));
            __m512 wf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
            for (int r = 0; r < m; r++)
                acc[r] = _mm512_fmadd_ps(wf, _mm512_loadu_ps(x + (int64_t)r * n_in + i), acc[r]);
        }
        for (int r = 0; r < m; r++) sums[r] = vsum(acc[r]);
#elif defined(__AVX2__)
        __m256 acc[MAX_M];
        for (int r = 0; r < m; r++) acc[r] = _mm256_setzero_ps();
        for (; i + 8 <= n_in; i += 8) {
            __m128i b = _mm_loadl_epi64((const __m128i *)(row + i));
            __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
            for (int r = 0; r < m; r++)
                acc[r] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + (int64_t)r * n_in + i), acc[r]);
        }
        for (int r = 0; r < m; r++) sums[r] = vsum(acc[r]);
#else
        for (int r = 0; r < m; r++) sums[r] = 0.0f;
#endif
        for (; i < n_in; i++) {  /* the tail, or everything without SIMD */
            float wv = (float)row[i];
            for (int r = 0; r < m; r++) sums[r] += wv * x[(int64_t)r * n_in + i];
        }
        float b = bias ? bias[o] : 0.0f;
        for (int r = 0; r < m; r++) y[(int64_t)r * n_out + o] = sums[r] * scale[o] + b;
    }
}

/* -- the worker pool ------------------------------------------------------------------ */

#define MAX_THREADS 64
#define SPIN_NS 2000000LL /* a worker spins this long after its last job, then sleeps */

typedef struct {
    const float *x; const int8_t *xq; const float *xs; const float *corr;
    int m, n_in, n_out, blocks, vnni;
    const int8_t *w; const float *scale; const float *bias; float *y;
    const float *wf; /* float32 weights (cv_f32_gemm), else NULL */
} job_t;

static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER; /* one product at a time */
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake_cond = PTHREAD_COND_INITIALIZER;
static int n_workers;                 /* started so far (they live as long as the process) */
static atomic_uint generation;        /* bumped once per job */
static atomic_int pending;            /* workers still busy with the current job */
static atomic_int next_block;         /* blocks of 16 rows are handed out from here */
static int job_workers;               /* how many workers take part in the current job */
static int job_chunk;                 /* blocks taken at a time */
static job_t job;
static unsigned start_generation[MAX_THREADS];

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline void cpu_relax(void)
{
#ifdef __AVX2__
    _mm_pause();
#endif
}

/* Rows of blocks [first, last) of job `j`. */
static void run_range(const job_t *j, int first, int last)
{
    int o0 = first * 16, o1 = last * 16 < j->n_out ? last * 16 : j->n_out;
    if (j->wf) {
        rows_f32(j->x, j->m, j->n_in, j->wf, j->bias, j->y, j->n_out, o0, o1);
        return;
    }
#ifdef CV_VNNI
    if (j->vnni) {
        rows_vnni(j->xq, j->xs, j->corr, j->m, j->n_in, j->w, j->scale, j->bias, j->y, j->n_out, o0, o1);
        return;
    }
#endif
    rows_gemm(j->x, j->m, j->n_in, j->w, j->scale, j->bias, j->y, j->n_out, o0, o1);
}

/* Grabs runs of `chunk` consecutive blocks until none are left: long runs keep each
 * thread's reads sequential (the hardware prefetcher follows them), several runs per
 * thread keep a preempted thread from holding the others up. */
static void run_blocks(const job_t *j, int chunk)
{
    int first;
    while ((first = atomic_fetch_add_explicit(&next_block, chunk, memory_order_relaxed))
           < j->blocks)
        run_range(j, first, first + chunk < j->blocks ? first + chunk : j->blocks);
}

static void *worker_main(void *arg)
{
    int id = (int)(intptr_t)arg; /* 1, 2, ... (the caller is 0) */
    unsigned seen = start_generation[id]; /* the job current when it was started is done */
    for (;;) {
        int64_t idle_since = now_ns();
        unsigned g;
        int spins = 0;
        while ((g = atomic_load_explicit(&generation, memory_order_acquire)) == seen) {
            if (++spins % 256 == 0 && now_ns() - idle_since > SPIN_NS) {
                pthread_mutex_lock(&wake_lock);
                while (atomic_load(&generation) == seen)
                    pthread_cond_wait(&wake_cond, &wake_lock);
                pthread_mutex_unlock(&wake_lock);
            } else {
                cpu_relax();
            }
        }
        seen = g;
        if (id <= job_workers) {
            job_t j = job;
            run_blocks(&j, job_chunk);
            atomic_fetch_sub_explicit(&pending, 1, memory_order_release);
        }
    }
    return NULL;
}

/* A child process of fork() has none of its parent's workers: start afresh. */
static void reset_after_fork(void)
{
    n_workers = 0;
    pthread_mutex_init(&pool_lock, NULL);
    pthread_mutex_init(&wake_lock, NULL);
    pthread_cond_init(&wake_cond, NULL);
}

static void register_fork_handler(void) { pthread_atfork(NULL, NULL, reset_after_fork); }
static pthread_once_t fork_handler_once = PTHREAD_ONCE_INIT;

/* Runs `j` on the caller and up to threads - 1 workers (fewer if they cannot be started;
 * the caller alone when another thread's product holds the pool). */
static void run_job(const job_t *j, int threads)
{
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > j->blocks) threads = j->blocks;
    if (threads <= 1 || pthread_mutex_trylock(&pool_lock) != 0) {
        /* single-threaded, or another thread's product holds the pool: do it alone */
        run_range(j, 0, j->blocks);
        return;
    }
    pthread_once(&fork_handler_once, register_fork_handler);
    while (n_workers < threads - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        start_generation[n_workers + 1] = atomic_load(&generation);
        int rc = pthread_create(&t, &attr, worker_main, (void *)(intptr_t)(n_workers + 1));
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        n_workers++;
    }
    int helpers = threads - 1 < n_workers ? threads - 1 : n_workers;
    job = *j;
    job_workers = helpers;
    job_chunk = j->blocks / ((helpers + 1) * 4);
    if (job_chunk < 1) job_chunk = 1;
    atomic_store_explicit(&next_block, 0, memory_order_relaxed);
    atomic_store_explicit(&pending, helpers, memory_order_relaxed);
    pthread_mutex_lock(&wake_lock);
    atomic_fetch_add_explicit(&generation, 1, memory_order_release);
    pthread_cond_broadcast(&wake_cond);
    pthread_mutex_unlock(&wake_lock);
    run_blocks(j, job_chunk);
    while (atomic_load_explicit(&pending, memory_order_acquire) > 0) cpu_relax();
    pthread_mutex_unlock(&pool_lock);
}

/* y (m, n_out) = x (m, n_in) @ w^T * scale + bias; m <= 16. Returns 0, or -1 if m is too
 * large. Rows of W are shared among `threads` threads in blocks of 16, handed out
 * dynamically (a thread the OS preempts does not hold the others up). */
int cv_int8_gemm(const float *x, int m, int n_in, const int8_t *w, const float *scale,
                 const float *bias, float *y, int n_out, int threads)
{
    if (m < 1 || m > MAX_M) return -1;
    job_t j = {x, NULL, NULL, NULL, m, n_in, n_out, (n_out + 15) / 16, 0, w, scale, bias, y, NULL};
#ifdef CV_VNNI
    int nb = (n_in + QB - 1) / QB;
    int8_t *xq = malloc((size_t)m * nb * QB);
    float *xs = malloc((size_t)(m * nb + m) * sizeof(float));
    if (!xq || !xs) { free(xq); free(xs); return -2; }
    quantize_rows(x, m, n_in, xq, xs, xs + m * nb);
    j.xq = xq;
    j.xs = xs;
    j.corr = xs + m * nb;
    j.vnni = 1;
    run_job(&j, threads);
    free(xq);
    free(xs);
    return 0;
#endif
    run_job(&j, threads);
    return 0;
}

/* y (m, n_out) = x (m, n_in) @ w^T + bias for float32 w (out, in); m <= 16. */
int cv_f32_gemm(const float *x, int m, int n_in, const float *w, const float *bias, float *y,
                int n_out, int threads)
{
    if (m < 1 || m > MAX_M) return -1;
    job_t j = {x, NULL, NULL, NULL, m, n_in, n_out, (n_out + 15) / 16, 0, NULL, NULL, bias, y, w};
    run_job(&j, threads);
    return 0;
}

int cv_int8_max_rows(void) { return MAX_M; }

/* 1 when the float32 product has SIMD code for this CPU (else torch's matmul is faster) */
int cv_f32_simd(void)
{
#if defined(__AVX512F__) || defined(__AVX2__)
    return 1;
#else
    return 0;
#endif
}

/* 64 when activations are quantized in blocks of that many (VNNI path), 0 when not */
int cv_int8_act_block(void)
{
#ifdef CV_VNNI
    return QB;
#else
    return 0;
#endif
}
