/* The small operations of a decode step, for float32 models: RMSNorm, and attention of a
 * few query rows (a decode step, or a draft being verified) with rotary embeddings and the
 * KV cache write folded in.
 *
 * In a decode step these operations move a few kilobytes each, and the time torch spends
 * dispatching its dozen or so operators per layer (~150 us per layer for attention at a
 * 512-token context, ~15 us per norm) is most of what a step costs beside reading the
 * weights. One call each does the same work. Built with gemm.c into one library by
 * codevista.models.native.
 *
 * Every query row is computed on its own, in one fixed order, so a row's result does not
 * depend on the rows beside it (draft verification equals decode steps bit for bit).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static float dot(const float *a, const float *b, int n)
{
    int i = 0;
    float s;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    s = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__)
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    s = _mm_cvtss_f32(h);
#else
    s = 0.0f;
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y += a * x over n floats */
static void axpy(float a, const float *x, float *y, int n)
{
    int i = 0;
#if defined(__AVX512F__)
    __m512 av = _mm512_set1_ps(a);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
#elif defined(__AVX2__)
    __m256 av = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * x[i];
}

#if defined(__AVX512F__)
/* e^x for x <= 0 (softmax after the max is taken off), 16 at a time: x = n ln2 + r with
 * |r| <= ln2 / 2, e^r by its Taylor polynomial to degree 7 (relative error < 2e-7 there),
 * times 2^n. Below -87 the result is 0, as in float32. */
static inline __m512 exp_neg(__m512 x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* The sums of the 16 lanes of each of v[0..15], in one vector (lane j: v[j]'s sum): a
 * transposing tree instead of 16 horizontal sums. Every v[j] is summed in the same order. */
static inline __m512 sum16(const __m512 *v)
{
    __m512 a[8], b[4];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: v0 (0+2), v1 (0+2), v0 (1+3), v1 (1+3) */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* per 128-bit lane: the lane's sum of v0, v1, v2, v3 */
        __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], 0x88),
                              _mm512_shuffle_f32x4(b[0], b[1], 0xDD));
    __m512 c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], 0x88),
                              _mm512_shuffle_f32x4(b[2], b[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, 0x88), _mm512_shuffle_f32x4(c0, c1, 0xDD));
}

/* Q query heads (at most heads_at_once) that share one KV head, against their keys and values (query i
 * sees keys 0..ns[i]-1 of K and V; D = 16 NV): K and V are read once for all of them (the
 * heads of a GQA group, and the rows of a draft), scores are taken and exponentiated 16 at
 * a time, the outputs stay in registers. Each query is computed in the same order as it
 * would be alone, so a draft's rows get a decode step's bits. */
static inline __attribute__((always_inline)) void
heads_avx512(const float *const *qs, const int *ns, int Q, int NV, const float *K,
             const float *V, float scale, float *const *scores, float *const *outs)
{
    int D = 16 * NV, nmax = 0, nmin = ns[0];
    for (int i = 0; i < Q; i++) {
        nmax = ns[i] > nmax ? ns[i] : nmax;
        nmin = ns[i] < nmin ? ns[i] : nmin;
    }
    __m512 mxs[4], scv = _mm512_set1_ps(scale);
    for (int i = 0; i < Q; i++) mxs[i] = _mm512_set1_ps(-INFINITY);
    for (int j0 = 0; j0 < nmax; j0 += 16) {
        for (int i = 0; i < Q; i++) {
            int cnt = ns[i] - j0 < 16 ? ns[i] - j0 : 16;
            if (cnt <= 0) continue;
            const float *q = qs[i];
            __m512 acc[16];
            for (int j = 0; j < 16; j++) {
                if (j >= cnt) {  /* past the query's last key: zeros, masked off below */
                    acc[j] = _mm512_setzero_ps();
                    continue;
                }
                const float *k = K + (int64_t)(j0 + j) * D;
                __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k));
                for (int v = 1; v < NV; v++)
                    a = _mm512_fmadd_ps(_mm512_loadu_ps(q + 16 * v), _mm512_loadu_ps(k + 16 * v), a);
                acc[j] = a;
            }
            __mmask16 mk = cnt == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cnt) - 1);
            __m512 sc = _mm512_mul_ps(sum16(acc), scv);
            _mm512_mask_storeu_ps(scores[i] + j0, mk, sc);
            mxs[i] = _mm512_mask_max_ps(mxs[i], mk, mxs[i], sc);
        }
    }
    __m512 inv[4];
    for (int i = 0; i < Q; i++) {
        int n = ns[i];
        float *sc = scores[i];
        __m512 mxv = _mm512_set1_ps(_mm512_reduce_max_ps(mxs[i])), sum = _mm512_setzero_ps();
        int j = 0;
        for (; j + 16 <= n; j += 16) {
            __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(sc + j), mxv));
            _mm512_storeu_ps(sc + j, e);
            sum = _mm512_add_ps(sum, e);
        }
        if (j < n) {
            __mmask16 k = (__mmask16)((1u << (n - j)) - 1);
            __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sc + j), mxv));
            e = _mm512_maskz_mov_ps(k, e);
            _mm512_mask_storeu_ps(sc + j, k, e);
            sum = _mm512_add_ps(sum, e);
        }
        inv[i] = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    }
    /* key j goes to chain j % CH (CH a function of NV alone: the same for a query
     * whatever is beside it); the chains hide the FMA latency of short heads */
    const int CH = NV <= 2 ? 2 : 1;
    __m512 ov[2][16];
    for (int c = 0; c < CH; c++)
        for (int i = 0; i < Q * NV; i++) ov[c][i] = _mm512_setzero_ps();
    int j = 0;
    for (; j + CH <= nmin; j += CH) {  /* keys every query sees */
        for (int c = 0; c < CH; c++) {
            const float *vr = V + (int64_t)(j + c) * D;
            for (int v = 0; v < NV; v++) {
                __m512 vv = _mm512_loadu_ps(vr + 16 * v);
                for (int i = 0; i < Q; i++)
                    ov[c][i * NV + v] = _mm512_fmadd_ps(_mm512_set1_ps(scores[i][j + c]), vv,
                                                        ov[c][i * NV + v]);
            }
        }
    }
    for (; j < nmax; j++) {  /* the rest: the later rows of a draft see a few more keys */
        const float *vr = V + (int64_t)j * D;
        int c = j % CH;
        for (int v = 0; v < NV; v++) {
            __m512 vv = _mm512_loadu_ps(vr + 16 * v);
            for (int i = 0; i < Q; i++)
                if (j < ns[i])
                    ov[c][i * NV + v] = _mm512_fmadd_ps(_mm512_set1_ps(scores[i][j]), vv,
                                                        ov[c][i * NV + v]);
        }
    }
    for (int i = 0; i < Q; i++)
        for (int v = 0; v < NV; v++) {
            int k = i * NV + v;
            __m512 o = CH == 2 ? _mm512_add_ps(ov[0][k], ov[1][k]) : ov[0][k];
            _mm512_storeu_ps(outs[i] + 16 * v, _mm512_mul_ps(o, inv[i]));
        }
}

/* heads_avx512 with Q and NV constants (the accumulators stay in registers) where they
 * are common, else one query at a time */
static void heads_dispatch(const float *const *qs, const int *ns, int Q, int nv,
                           const float *K, const float *V, float scale, float *const *scores,
                           float *const *outs)
{
#define CV_HEADS(Q_, NV_) heads_avx512(qs, ns, Q_, NV_, K, V, scale, scores, outs)
    if (nv == 2 || nv == 4) {  /* up to four queries */
        switch (Q * 8 + nv) {
        case 10: CV_HEADS(1, 2); return;
        case 18: CV_HEADS(2, 2); return;
        case 26: CV_HEADS(3, 2); return;
        case 34: CV_HEADS(4, 2); return;
        case 12: CV_HEADS(1, 4); return;
        case 20: CV_HEADS(2, 4); return;
        case 28: CV_HEADS(3, 4); return;
        default: CV_HEADS(4, 4); return;
        }
    }
    if (nv == 8) {
        if (Q == 1) CV_HEADS(1, 8); else CV_HEADS(2, 8);
        return;
    }
#undef CV_HEADS
    for (int i = 0; i < Q; i++)
        heads_avx512(qs + i, ns + i, 1, nv, K, V, scale, scores + i, outs + i);
}

/* the most queries heads_dispatch takes at once for D = 16 nv */
static int heads_at_once(int nv) { return nv <= 4 ? 4 : nv == 8 ? 2 : 1; }
#endif

/* y (T, n) = x / sqrt(mean(x^2) + eps) * w, row by row */
void cv_rmsnorm(const float *x, const float *w, float *y, int T, int n, float eps)
{
    for (int t = 0; t < T; t++) {
        const float *xr = x + (int64_t)t * n;
        float *yr = y + (int64_t)t * n;
        float inv = 1.0f / sqrtf(dot(xr, xr, n) / (float)n + eps);
        for (int i = 0; i < n; i++) yr[i] = w[i] * (xr[i] * inv);
    }
}

/* Rotary embedding of one head vector (rotate-half convention): for i < D/2,
 * out[i] = v[i] cos[i] - v[i + D/2] sin[i], out[i + D/2] = v[i + D/2] cos[i + D/2] + v[i] sin[i + D/2] */
static void rope(const float *v, const float *cs, const float *sn, float *out, int D)
{
    int h = D / 2;
    for (int i = 0; i < h; i++) {
        out[i] = v[i] * cs[i] - v[i + h] * sn[i];
        out[i + h] = v[i + h] * cs[i + h] + v[i] * sn[i + h];
    }
}

void cv_parallel_for(void (*fn)(void *, int, int), void *ctx, int units, int threads);

#if defined(__AVX512F__)
/* One unit of a step's attention: a few queries of one KV head (see cv_attend_rows) */
typedef struct {
    int g, first, count, start;  /* KV head, its first query, how many, first key */
} att_unit;

typedef struct {
    const att_unit *units;
    const float *qbuf;  /* rotated queries, (KV, T * group, D) */
    float *kc, *vc, *out;
    int T, H, KV, D, group, cap, pos, span;
    float scale;
    int failed;  /* set (never cleared) by a thread that could not get its buffer */
} att_job;

static void att_run(void *ctx, int first, int last)
{
    att_job *a = ctx;
    int D = a->D, nv = D / 16, nq = a->T * a->group;
    float *sbuf = malloc(sizeof(float) * (size_t)4 * a->span);
    if (!sbuf) {
        __atomic_store_n(&a->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    for (int u = first; u < last; u++) {
        const att_unit *un = a->units + u;
        const float *qs[4];
        float *scs[4], *outs[4];
        int ns[4];
        for (int i = 0; i < un->count; i++) {
            int qi = un->first + i, t = qi / a->group, h = un->g * a->group + qi % a->group;
            qs[i] = a->qbuf + ((int64_t)un->g * nq + qi) * D;
            ns[i] = a->pos + t + 1 - un->start;
            scs[i] = sbuf + (int64_t)i * a->span;
            outs[i] = a->out + (int64_t)t * a->H * D + h * D;
        }
        heads_dispatch(qs, ns, un->count, nv, a->kc + ((int64_t)un->g * a->cap + un->start) * D,
                       a->vc + ((int64_t)un->g * a->cap + un->start) * D, a->scale, scs, outs);
    }
    free(sbuf);
}
#endif

/* Attention for T query rows of one sequence at positions pos..pos+T-1.
 *
 * qkv (T, (H + 2 KV) D): each row's q, k and v before rotary embedding; cs, sn (T, D): the
 * rotary tables at those positions; kc, vc: this layer's cache, (KV, cap, D). Each row
 * writes its rotated k and its v at its position, then attends to the keys of positions
 * [max(0, p + 1 - window), p] (window 0: all), head h using KV head h / (H / KV).
 * out (T, H D). The heads' work is shared among `threads` threads (the product workers).
 * Returns 0, -1 for bad sizes, -2 when out of memory. */
int cv_attend_rows(const float *qkv, int T, int H, int KV, int D, const float *cs,
                   const float *sn, float *kc, float *vc, int cap, int pos, int window,
                   float scale, float *out, int threads)
{
    if (T < 1 || H < 1 || KV < 1 || H % KV || D < 2 || D % 2 || pos < 0 || pos + T > cap)
        return -1;
    int group = H / KV, stride = (H + 2 * KV) * D;
    /* every row's key and value first: row t sees positions up to pos + t only */
    for (int t = 0; t < T; t++) {
        const float *row = qkv + (int64_t)t * stride;
        const float *c = cs + (int64_t)t * D, *s = sn + (int64_t)t * D;
        for (int g = 0; g < KV; g++) {
            rope(row + (H + g) * D, c, s, kc + ((int64_t)g * cap + pos + t) * D, D);
            memcpy(vc + ((int64_t)g * cap + pos + t) * D, row + (H + KV + g) * D, sizeof(float) * D);
        }
    }
#if defined(__AVX512F__)
    if (D % 16 == 0 && D <= 256) {
        /* units: the queries of one KV head (its group's heads, every row), a few at a
         * time, each run whose rows start at the same key (all, without a sliding window) */
        int at_once = heads_at_once(D / 16), nq = T * group;
        float *qbuf = malloc(sizeof(float) * (size_t)KV * nq * D);
        att_unit *units = malloc(sizeof(att_unit) * (size_t)KV * nq);
        if (!qbuf || !units) { free(qbuf); free(units); return -2; }
        int n_units = 0;
        for (int g = 0; g < KV; g++) {
            for (int t = 0; t < T; t++)
                for (int h = g * group; h < (g + 1) * group; h++)
                    rope(qkv + (int64_t)t * stride + h * D, cs + (int64_t)t * D,
                         sn + (int64_t)t * D,
                         qbuf + ((int64_t)g * nq + t * group + h - g * group) * D, D);
            for (int i0 = 0; i0 < nq;) {
                int p0 = pos + i0 / group;
                int start = window > 0 && p0 + 1 > window ? p0 + 1 - window : 0, Q = 0;
                while (Q < at_once && i0 + Q < nq) {
                    int p = pos + (i0 + Q) / group;
                    if ((window > 0 && p + 1 > window ? p + 1 - window : 0) != start) break;
                    Q++;
                }
                units[n_units++] = (att_unit){g, i0, Q, start};
                i0 += Q;
            }
        }
        att_job job = {units, qbuf, kc, vc, out, T, H, KV, D, group, cap, pos, pos + T, scale, 0};
        cv_parallel_for(att_run, &job, n_units, threads);
        free(qbuf);
        free(units);
        return job.failed ? -2 : 0;
    }
#endif
    float *scores = malloc(sizeof(float) * (size_t)(pos + T));
    float *q = malloc(sizeof(float) * (size_t)D);
    if (!scores || !q) { free(scores); free(q); return -2; }
    for (int t = 0; t < T; t++) {
        const float *row = qkv + (int64_t)t * stride;
        const float *c = cs + (int64_t)t * D, *s = sn + (int64_t)t * D;
        int p = pos + t;
        int start = window > 0 && p + 1 > window ? p + 1 - window : 0, n = p + 1 - start;
        for (int h = 0; h < H; h++) {
            const float *K = kc + ((int64_t)(h / group) * cap + start) * D;
            const float *V = vc + ((int64_t)(h / group) * cap + start) * D;
            rope(row + h * D, c, s, q, D);
            float mx = -INFINITY;
            for (int j = 0; j < n; j++) {
                scores[j] = dot(q, K + (int64_t)j * D, D) * scale;
                mx = scores[j] > mx ? scores[j] : mx;
            }
            float sum = 0.0f;
            for (int j = 0; j < n; j++) {
                scores[j] = expf(scores[j] - mx);
                sum += scores[j];
            }
            float *o = out + (int64_t)t * H * D + h * D;
            memset(o, 0, sizeof(float) * D);
            for (int j = 0; j < n; j++) axpy(scores[j], V + (int64_t)j * D, o, D);
            float inv = 1.0f / sum;
            for (int i = 0; i < D; i++) o[i] *= inv;
        }
    }
    free(scores);
    free(q);
    return 0;
}

/* -- a whole decode step --------------------------------------------------------------- */

/* The products of gemm.c (one library) */
int cv_int8_gemm(const float *x, int m, int n_in, const int8_t *w, const float *scale,
                 const float *bias, float *y, int n_out, int threads);
int cv_f32_gemm(const float *x, int m, int n_in, const float *w, const float *bias, float *y,
                int n_out, int threads);

/* y (T, inter) = silu(g) * u for gu (T, 2 inter) = [g | u] row by row; silu(g) = g / (1 + e^-g),
 * with e^-|g| so that the exponent is never positive */
void cv_silu_mul(const float *gu, int T, int inter, float *y)
{
    for (int t = 0; t < T; t++) {
        const float *g = gu + (int64_t)t * 2 * inter, *u = g + inter;
        float *yr = y + (int64_t)t * inter;
        int i = 0;
#if defined(__AVX512F__)
        const __m512 one = _mm512_set1_ps(1.0f);
        for (; i + 16 <= inter; i += 16) {
            __m512 gv = _mm512_loadu_ps(g + i);
            __m512 e = exp_neg(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(gv)));
            __m512 d = _mm512_add_ps(one, e);
            /* g >= 0: g / (1 + e); g < 0: g e / (1 + e) */
            __m512 num = _mm512_mask_mul_ps(gv, _mm512_cmp_ps_mask(gv, _mm512_setzero_ps(), _CMP_LT_OQ), gv, e);
            _mm512_storeu_ps(yr + i, _mm512_mul_ps(_mm512_div_ps(num, d), _mm512_loadu_ps(u + i)));
        }
#endif
        for (; i < inter; i++) {
            float e = expf(-fabsf(g[i]));
            float num = g[i] < 0.0f ? g[i] * e : g[i];
            yr[i] = (num / (1.0f + e)) * u[i];
        }
    }
}

typedef struct {
    const void *w;       /* (out, in): float32, or int8 when scale is set */
    const float *scale;  /* int8 row scales, or NULL */
    const float *bias;   /* or NULL */
    int n_in, n_out;
} cv_linear;

typedef struct {
    const float *attn_norm, *mlp_norm;
    cv_linear qkv, o, gate_up, down;
    int window;          /* 0: full attention */
} cv_layer;

static int linear(const cv_linear *l, const float *x, int T, float *y, int threads)
{
    if (l->scale)
        return cv_int8_gemm(x, T, l->n_in, (const int8_t *)l->w, l->scale, l->bias, y,
                            l->n_out, threads);
    return cv_f32_gemm(x, T, l->n_in, (const float *)l->w, l->bias, y, l->n_out, threads);
}

/* T rows (a decode step, or a draft being verified) of a Llama / Qwen2 decoder with
 * RMSNorm and a gated SiLU MLP, through every layer, with the same operations in the same
 * order as the model's Python forward for such rows: the results are identical bit for
 * bit. x (T, hidden): the rows' input vectors, overwritten. kc, vc: the whole cache,
 * (layers, KV, cap, D). logits: (T or 1, vocab), every row's or the last one's. Returns 0,
 * or the first failing call's code. */
int cv_decode_rows(const cv_layer *layers, int n_layers, const float *final_norm,
                   const cv_linear *head, float eps, int hidden, int H, int KV, int D,
                   int inter, float *x, int T, const float *cs, const float *sn, float *kc,
                   float *vc, int cap, int pos, float scale, int all_logits, float *logits,
                   int threads)
{
    int qkv_n = (H + 2 * KV) * D;
    size_t need = (size_t)T * (2 * hidden + qkv_n + H * D + 3 * inter);
    float *buf = malloc(sizeof(float) * need);
    if (!buf) return -2;
    float *h = buf, *tmp = h + (size_t)T * hidden, *qkv = tmp + (size_t)T * hidden;
    float *att = qkv + (size_t)T * qkv_n, *gu = att + (size_t)T * H * D;
    float *act = gu + (size_t)T * 2 * inter;
    int rc = 0;
    int64_t layer_kv = (int64_t)KV * cap * D;
    for (int l = 0; l < n_layers && !rc; l++) {
        const cv_layer *L = layers + l;
        cv_rmsnorm(x, L->attn_norm, h, T, hidden, eps);
        if ((rc = linear(&L->qkv, h, T, qkv, threads))) break;
        if ((rc = cv_attend_rows(qkv, T, H, KV, D, cs, sn, kc + l * layer_kv, vc + l * layer_kv,
                                 cap, pos, L->window, scale, att, threads))) break;
        if ((rc = linear(&L->o, att, T, tmp, threads))) break;
        for (int64_t i = 0; i < (int64_t)T * hidden; i++) x[i] = x[i] + tmp[i];
        cv_rmsnorm(x, L->mlp_norm, h, T, hidden, eps);
        if ((rc = linear(&L->gate_up, h, T, gu, threads))) break;
        cv_silu_mul(gu, T, inter, act);
        if ((rc = linear(&L->down, act, T, tmp, threads))) break;
        for (int64_t i = 0; i < (int64_t)T * hidden; i++) x[i] = x[i] + tmp[i];
    }
    if (!rc) {
        int first = all_logits ? 0 : T - 1, rows = T - first;
        cv_rmsnorm(x + (int64_t)first * hidden, final_norm, h, rows, hidden, eps);
        rc = linear(head, h, rows, logits, threads);
    }
    free(buf);
    return rc;
}
