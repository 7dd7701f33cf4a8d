/* Matrix products for decoding: y = x @ W^T (* scale) (+ bias), W int8 or float32.
 *
 * W is (out, in): int8 with one float32 scale per output row, or float32; x is float32
 * (m, in) with m small (a decode step, or a speculative draft being verified). Each part
 * of W is read once and multiplied against every row of x (up to four at a time), so a
 * decode step streams W from memory once: one byte per weight for int8, four for float32.
 *
 * Int8 with AVX-512 VNNI: W is kept in tiles of 16 output rows (see vnni_tiles; the
 * caller packs it, codevista.models.quant), x is quantized to int8 in blocks of 64 (one
 * float scale per block, absmax / 127), and each VPDPBUSD adds four inputs' products to
 * 16 output rows at once. Elsewhere W is row-major, the weights are widened to float in
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

/* x (m, n_in) -> int8 blocks (m, nb * QB, zero padded), their scales (m, nb), and each
 * block's 128 * sum(q) (see vnni_tiles); q = round(x * 127 / absmax) per block */
static void quantize_rows(const float *x, int m, int n_in, int8_t *xq, float *xs,
                          int32_t *xsum)
{
    int nb = (n_in + QB - 1) / QB;
    for (int r = 0; r < m; r++) {
        const float *xr = x + (int64_t)r * n_in;
        for (int b = 0; b < nb; b++) {
            int i0 = b * QB, len = i0 + QB < n_in ? QB : n_in - i0;
            int8_t *q = xq + ((int64_t)r * nb + b) * QB;
            __m512 v[QB / 16];
            __m512 amax = _mm512_setzero_ps();
            for (int k = 0; k < QB / 16; k++) {
                int n = len - 16 * k;
                __mmask16 mk = n >= 16 ? (__mmask16)0xFFFF : n > 0 ? (__mmask16)((1u << n) - 1) : 0;
                v[k] = _mm512_maskz_loadu_ps(mk, xr + i0 + 16 * k);
                amax = _mm512_max_ps(amax, _mm512_abs_ps(v[k]));
            }
            float am = _mm512_reduce_max_ps(amax);
            float sc = am / 127.0f, inv = am > 0.0f ? 127.0f / am : 0.0f;
            xs[r * nb + b] = sc;
            __m512 iv = _mm512_set1_ps(inv);
            __m512i sum = _mm512_setzero_si512();
            for (int k = 0; k < QB / 16; k++) {
                /* round half to even, as nearbyintf in the default rounding mode */
                __m512i qi = _mm512_cvtps_epi32(_mm512_mul_ps(v[k], iv));
                sum = _mm512_add_epi32(sum, qi);
                _mm_storeu_si128((__m128i *)(q + 16 * k), _mm512_cvtepi32_epi8(qi));
            }
            xsum[r * nb + b] = 128 * _mm512_reduce_add_epi32(sum);
        }
    }
}

/* The weights are kept in tiles for VPDPBUSD (packed by codevista.models.quant.pack_tiles): tile t holds output rows
 * 16t..16t+15; for each group of four inputs it has 64 bytes, the four weights of each of
 * its 16 rows, each plus 128 (VPDPBUSD multiplies unsigned bytes by signed ones). One
 * VPDPBUSD of a tile's 64 bytes against four inputs of x broadcast to every lane adds
 * those inputs' products to 16 output rows at once: no horizontal sums.
 *
 * Per block of 64 inputs and row of x, the 16 integer sums (exact) less 128 * sum(q) of
 * the block are converted and added times the block's scale: one float chain per output
 * row, block after block, whatever G (rows of x) and TT (tiles at a time) are. So a row
 * of x gets the same bits in a decode step (m = 1) as in a draft's verification. */
static inline __attribute__((always_inline)) void
vnni_tiles(const uint8_t *tile, int64_t tile_bytes, const int8_t *xq, const float *xs,
           const int32_t *xsum, int nb, int G, int TT, __m512 *acc /* [TT * 4 + r] */)
{
    for (int t = 0; t < TT; t++)
        for (int r = 0; r < G; r++) acc[t * 4 + r] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m512i s0[8], s1[8];  /* [t * 4 + r]: two integer chains each */
        for (int t = 0; t < TT; t++)
            for (int r = 0; r < G; r++) s0[t * 4 + r] = s1[t * 4 + r] = _mm512_setzero_si512();
        const uint8_t *wb = tile + (int64_t)b * QB * 16;
        if (TT * G <= 4) {  /* few chains: two per output vector hide VPDPBUSD's latency */
            for (int k = 0; k < QB / 4; k += 2) {
                __m512i w0[2], w1[2];
                for (int t = 0; t < TT; t++) {
                    w0[t] = _mm512_loadu_si512((const void *)(wb + t * tile_bytes + k * 64));
                    w1[t] = _mm512_loadu_si512((const void *)(wb + t * tile_bytes + k * 64 + 64));
                }
                for (int r = 0; r < G; r++) {
                    const int8_t *xr = xq + ((int64_t)r * nb + b) * QB + 4 * k;
                    int32_t q0, q1;
                    memcpy(&q0, xr, 4);
                    memcpy(&q1, xr + 4, 4);
                    __m512i x0 = _mm512_set1_epi32(q0), x1 = _mm512_set1_epi32(q1);
                    for (int t = 0; t < TT; t++) {
                        s0[t * 4 + r] = _mm512_dpbusd_epi32(s0[t * 4 + r], w0[t], x0);
                        s1[t * 4 + r] = _mm512_dpbusd_epi32(s1[t * 4 + r], w1[t], x1);
                    }
                }
            }
        } else {  /* many: one each, so that everything stays in registers */
            for (int k = 0; k < QB / 4; k++) {
                __m512i w0[2];
                for (int t = 0; t < TT; t++)
                    w0[t] = _mm512_loadu_si512((const void *)(wb + t * tile_bytes + k * 64));
                for (int r = 0; r < G; r++) {
                    int32_t q0;
                    memcpy(&q0, xq + ((int64_t)r * nb + b) * QB + 4 * k, 4);
                    __m512i x0 = _mm512_set1_epi32(q0);
                    for (int t = 0; t < TT; t++)
                        s0[t * 4 + r] = _mm512_dpbusd_epi32(s0[t * 4 + r], w0[t], x0);
                }
            }
        }
        for (int r = 0; r < G; r++) {
            __m512i c = _mm512_set1_epi32(xsum[r * nb + b]);
            __m512 sc = _mm512_set1_ps(xs[r * nb + b]);
            for (int t = 0; t < TT; t++) {
                __m512i d = _mm512_sub_epi32(_mm512_add_epi32(s0[t * 4 + r], s1[t * 4 + r]), c);
                acc[t * 4 + r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, acc[t * 4 + r]);
            }
        }
    }
}

static void rows_vnni(const int8_t *xq, const float *xs, const int32_t *xsum, int m,
                      int n_in, const uint8_t *w, const float *scale, const float *bias,
                      float *y, int n_out, int t0, int t1)
{
    int nb = (n_in + QB - 1) / QB;
    int64_t tile_bytes = (int64_t)nb * QB * 16;
    for (int t = t0; t < t1;) {
        int TT = t + 1 < t1 ? 2 : 1;  /* two tiles at a time where there are two */
        const uint8_t *tile = w + t * tile_bytes;
        for (int r0 = 0; r0 < m; r0 += 4) {  /* up to four rows of x per read of a tile */
            const int8_t *xr = xq + (int64_t)r0 * nb * QB;
            const float *sr = xs + (int64_t)r0 * nb;
            const int32_t *cr = xsum + (int64_t)r0 * nb;
            __m512 acc[8];
            int g = m - r0 < 4 ? m - r0 : 4;
#define CV_TILES(G_, TT_) vnni_tiles(tile, tile_bytes, xr, sr, cr, nb, G_, TT_, acc)
            switch (g * 2 + TT - 1) {  /* constants: the sums stay in registers */
            case 2: CV_TILES(1, 1); break;
            case 3: CV_TILES(1, 2); break;
            case 4: CV_TILES(2, 1); break;
            case 5: CV_TILES(2, 2); break;
            case 6: CV_TILES(3, 1); break;
            case 7: CV_TILES(3, 2); break;
            case 8: CV_TILES(4, 1); break;
            default: CV_TILES(4, 2); break;
            }
#undef CV_TILES
            for (int k = 0; k < TT; k++) {
                int o = (t + k) * 16, n = n_out - o < 16 ? n_out - o : 16;
                __mmask16 mk = n == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
                __m512 sv = _mm512_maskz_loadu_ps(mk, scale + o);
                __m512 bv = bias ? _mm512_maskz_loadu_ps(mk, bias + o) : _mm512_setzero_ps();
                for (int r = 0; r < g; r++)
                    _mm512_mask_storeu_ps(y + (int64_t)(r0 + r) * n_out + o, mk,
                                          _mm512_fmadd_ps(acc[k * 4 + r], sv, bv));
            }
        }
        t += TT;
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
    const float *x; const int8_t *xq; const float *xs; const int32_t *xsum;
    int m, n_in, n_out, blocks, vnni;
    const int8_t *w; const float *scale; const float *bias; float *y;
    const float *wf; /* float32 weights (cv_f32_gemm), else NULL */
    void (*fn)(void *ctx, int first, int last); /* any other work (cv_parallel_for) */
    void *ctx;
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
    if (j->fn) {
        j->fn(j->ctx, first, last);
        return;
    }
    int o0 = first * 16, o1 = last * 16 < j->n_out ? last * 16 : j->n_out;
    if (j->wf) {
        rows_f32(j->x, j->m, j->n_in, j->wf, j->bias, j->y, j->n_out, o0, o1);
        return;
    }
#ifdef CV_VNNI
    if (j->vnni) {
        rows_vnni(j->xq, j->xs, j->xsum, j->m, j->n_in, (const uint8_t *)j->w, j->scale, j->bias,
                  j->y, j->n_out, first, last);
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
    job_t j = {x, NULL, NULL, NULL, m, n_in, n_out, (n_out + 15) / 16, 0, w, scale, bias, y, NULL,
               NULL, NULL};
#ifdef CV_VNNI
    int nb = (n_in + QB - 1) / QB;
    int8_t *xq = malloc((size_t)m * nb * QB);
    float *xs = malloc((size_t)m * nb * sizeof(float));
    int32_t *xsum = malloc((size_t)m * nb * sizeof(int32_t));
    if (!xq || !xs || !xsum) { free(xq); free(xs); free(xsum); return -2; }
    quantize_rows(x, m, n_in, xq, xs, xsum);
    j.xq = xq;
    j.xs = xs;
    j.xsum = xsum;
    j.vnni = 1;
    run_job(&j, threads);
    free(xq);
    free(xs);
    free(xsum);
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
    job_t j = {x, NULL, NULL, NULL, m, n_in, n_out, (n_out + 15) / 16, 0, NULL, NULL, bias, y, w,
               NULL, NULL};
    run_job(&j, threads);
    return 0;
}

/* fn(ctx, first, last) over units [0, units), in runs handed out to `threads` threads
 * (the caller and the product workers above); for the attention of a step's heads. */
void cv_parallel_for(void (*fn)(void *, int, int), void *ctx, int units, int threads)
{
    if (units < 1) return;
    job_t j;
    memset(&j, 0, sizeof j);
    j.blocks = units;
    j.fn = fn;
    j.ctx = ctx;
    run_job(&j, threads);
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

/* Weight j (0..15) of a tile's rows, input i, as the int8 it stands for */
static inline int tile_weight(const uint8_t *tile, int j, int i)
{
    return (int)tile[(i / 4) * 64 + j * 4 + i % 4] - 128;
}

/* Rows o0..o1-1 of int8 weights kept in tiles (see vnni_tiles), dequantized: out
 * (o1 - o0, n_in) = q * scale, for the float32 matmul of long inputs (prefill). Returns 0,
 * or -1 for a bad range. */
int cv_int8_dequant(const uint8_t *tiles, const float *scale, int n_out, int n_in, int o0,
                    int o1, float *out)
{
    if (o0 < 0 || o1 > n_out || o0 > o1) return -1;
    int64_t tile_bytes = (int64_t)((n_in + QB - 1) / QB) * QB * 16;
    for (int t = o0 / 16; t * 16 < o1; t++) {
        const uint8_t *tile = tiles + t * tile_bytes;
        int r0 = t * 16, done = 0;  /* inputs converted 4 at a time below */
#if defined(__AVX512F__) && defined(__AVX512BW__)
        /* a group's 64 bytes in quarters: rows 4q..4q+3, four inputs each */
        __m512 sq[4];  /* those rows' scales, each four times */
        for (int q = 0; q < 4; q++) {
            float sc[16];
            for (int i = 0; i < 16; i++) {
                int o = r0 + 4 * q + i / 4;
                sc[i] = o < n_out ? scale[o] : 0.0f;
            }
            sq[q] = _mm512_loadu_ps(sc);
        }
        const __m128i flip = _mm_set1_epi8((char)0x80);
        for (done = 0; done + 4 <= n_in; done += 4) {
            for (int q = 0; q < 4; q++) {
                __m128i b = _mm_xor_si128(
                    _mm_loadu_si128((const __m128i *)(tile + done * 16 + 16 * q)), flip);
                __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), sq[q]);
                int o = r0 + 4 * q;  /* its four rows: the four quarters of f */
#define CV_ROW(I) if (o + I >= o0 && o + I < o1) \
                    _mm_storeu_ps(out + (int64_t)(o + I - o0) * n_in + done, _mm512_extractf32x4_ps(f, I))
                CV_ROW(0); CV_ROW(1); CV_ROW(2); CV_ROW(3);
#undef CV_ROW
            }
        }
#endif
        for (int j = 0; j < 16; j++) {  /* the rest (everything without AVX-512) */
            int o = r0 + j;
            if (o < o0 || o >= o1) continue;
            for (int i = done; i < n_in; i++)
                out[(int64_t)(o - o0) * n_in + i] = (float)tile_weight(tile, j, i) * scale[o];
        }
    }
    return 0;
}

/* Rows ids[0..T-1] of int8 weights kept in tiles (see vnni_tiles), dequantized: out
 * (T, n_in) = q * scale (the embedding vectors of a model whose input embedding is its
 * int8 LM head). Returns 0, or -1 for an id outside [0, n_out). */
int cv_int8_embed(const uint8_t *tiles, const float *scale, int n_out, int n_in,
                  const int64_t *ids, int T, float *out)
{
    int64_t tile_bytes = (int64_t)((n_in + QB - 1) / QB) * QB * 16;
    for (int t = 0; t < T; t++) {
        int64_t id = ids[t];
        if (id < 0 || id >= n_out) return -1;
        const uint8_t *tile = tiles + (id / 16) * tile_bytes;
        float *o = out + (int64_t)t * n_in;
        for (int i = 0; i < n_in; i++) o[i] = (float)tile_weight(tile, (int)(id % 16), i) * scale[id];
    }
    return 0;
}

/* 1 when int8 weights are kept in VPDPBUSD tiles (see vnni_tiles), 0 for plain rows */
int cv_int8_packed(void)
{
#ifdef CV_VNNI
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
