/* Int8 weight-only matrix products for decoding: y = (x @ W^T) * scale (+ bias).
 *
 * W is int8 (out, in), row-major, one float32 scale per output row; x is float32 (m, in)
 * with m small (a decode step, or a speculative draft being verified). Each weight row is
 * read once, widened to float32 in registers, and multiplied against every row of x, so a
 * decode step streams one byte per weight from memory instead of four. The activations
 * stay float32: the only error is the weights' rounding.
 *
 * Built by codevista.models.quant with the machine's compiler (-O3 -march=native
 * -fopenmp); AVX-512 and AVX2 paths, and a plain loop the compiler vectorises elsewhere.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAX_M 16

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
        for (int r = 0; r < m; r++) sums[r] = _mm512_reduce_add_ps(acc[r]);
#elif defined(__AVX2__)
        __m256 acc[MAX_M];
        for (int r = 0; r < m; r++) acc[r] = _mm256_setzero_ps();
        for (; i + 8 <= n_in; i += 8) {
            __m128i b = _mm_loadl_epi64((const __m128i *)(row + i));
            __m256 wf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
            for (int r = 0; r < m; r++)
                acc[r] = _mm256_fmadd_ps(wf, _mm256_loadu_ps(x + (int64_t)r * n_in + i), acc[r]);
        }
        for (int r = 0; r < m; r++) {
            __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
            s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            s = _mm_add_ss(s, _mm_movehdup_ps(s));
            sums[r] = _mm_cvtss_f32(s);
        }
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

/* y (m, n_out) = x (m, n_in) @ w^T * scale + bias; m <= 16. Returns 0, or -1 if m is too
 * large. Rows of W are shared among `threads` OpenMP threads in blocks of 16, handed out
 * dynamically (a thread the OS preempts does not hold the others up). */
int cv_int8_gemm(const float *x, int m, int n_in, const int8_t *w, const float *scale,
                 const float *bias, float *y, int n_out, int threads)
{
    if (m < 1 || m > MAX_M) return -1;
    int blocks = (n_out + 15) / 16;
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads) if(threads > 1)
    for (int blk = 0; blk < blocks; blk++) {
        int o0 = blk * 16, o1 = o0 + 16 < n_out ? o0 + 16 : n_out;
        rows_gemm(x, m, n_in, w, scale, bias, y, n_out, o0, o1);
    }
    return 0;
}

int cv_int8_max_rows(void) { return MAX_M; }
