/* One decoding step of a Llama-family model on int4 weights, every layer in
 * one call: the same arithmetic as ``_decode._Layer.__call__`` (float32
 * throughout, the weights' products through int4_kernel.c).
 *
 * Why our own: at one row a step of SmolLM2 is ~750 small torch operations
 * beside its 121 matrix multiplies, each a few microseconds of dispatch for
 * a few hundred floats of work; on a 2-core CPU those took a third of a
 * token's time (docs/benchmarks.md, "Weight formats"). Here a layer's norms,
 * rotation, cache write, attention, activation and residuals are plain loops
 * between the multiplies. Python keeps everything else: the embedding, the
 * output projection, adapters (a step with LoRA rows takes the torch path),
 * prefill, and every model or cache this does not describe
 * (``tuneloop/engine/_native.py`` decides).
 *
 * Layout: h [M, hidden] updated in place; cos and signed sin [M, head_dim];
 * per layer a key and a value buffer [B, kv_heads, cap, head_dim] whose
 * column ``col`` is written and columns 0..col attended where
 * mask[m * mask_stride + j] is non-zero.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void int4_mm(const float *x, long M, long in, const uint8_t *codes, const void *sm, int half, long out, float *y,
             int threads);
void int4_mm_q(const float *x, long M, long in, const uint8_t *codes, const void *sm, int half, long out, float *y,
               int threads, int fine);

/* One quantized weight as ``_int4`` packed it; ``act``: 0 float32 activations, 1 int16, 2 int8. */
typedef struct {
    const uint8_t *codes;
    const void *sm;
    const float *bias; /* or NULL */
    long in, out;
    int half, act;
} qweight;

typedef struct {
    qweight qkv, o, gate_up, down;
    const float *in_norm, *post_norm;
} qlayer;

typedef struct {
    const qlayer *layer;
    int layers, heads, kv_heads, head_dim, hidden, inter;
    float eps, scaling;
} qmodel;

static void mm(const qweight *w, const float *x, long M, float *y, int threads) {
    if (w->act == 0) {
        int4_mm(x, M, w->in, w->codes, w->sm, w->half, w->out, y, threads);
    } else {
#if defined(__AVX512F__)
        abort(); /* no integer kernel in this build: _native.py never asks for one */
#else
        int4_mm_q(x, M, w->in, w->codes, w->sm, w->half, w->out, y, threads, w->act == 1);
#endif
    }
    if (w->bias)
        for (long m = 0; m < M; m++)
            for (long o = 0; o < w->out; o++) y[m * w->out + o] += w->bias[o];
}

/* torch's F.rms_norm in float32: x / sqrt(mean(x^2) + eps) * weight */
static void rms_norm(const float *h, long M, int n, const float *weight, float eps, float *x) {
    for (long m = 0; m < M; m++) {
        const float *r = h + m * n;
        float ss = 0;
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < n; i++) ss += r[i] * r[i];
        const float k = 1.0f / sqrtf(ss / n + eps);
#pragma omp simd
        for (int i = 0; i < n; i++) x[m * n + i] = r[i] * k * weight[i];
    }
}

/* x * cos + rotate_half(x) * sin, with sin's first half negated (``_decode._rotate``) */
static void rotate(float *x, const float *cos, const float *ssin, int d) {
    const int half = d / 2;
    float t[512];
    memcpy(t, x, sizeof(float) * d);
    /* two plain loops (an index taken modulo d kept the compiler from vectorising) */
#pragma omp simd
    for (int i = 0; i < half; i++) x[i] = t[i] * cos[i] + t[i + half] * ssin[i];
#pragma omp simd
    for (int i = half; i < d; i++) x[i] = t[i] * cos[i] + t[i - half] * ssin[i];
}

/* e^x for 8 floats (Cephes' expf: a degree-5 polynomial on the reduced argument, 1-2 ulp; torch's
 * silu uses SLEEF's, as close). libm's scalar expf took 7 ms of a 16-row step of SmolLM2 in the
 * activation alone (46,080 calls a row), a sixth of the step. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

/* a = silu(g) * u = g / (1 + e^-g) * u */
static void silu_mul(const float *g, const float *u, float *a, int n) {
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e)),
                                              _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* the sums of four vectors' lanes, as one 4-lane vector */
static inline __m128 hsum4x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* The G query heads of one row that share a key/value head, against its cache columns 0..L-1 where
 * mask[j] != 0 (others are never read: a padding column may hold anything): q and out G x d, scores
 * G x L, at [L] the kept columns. Keys are taken four at a time and each head's output stays in
 * registers over the values (summing one key at a time and adding into ``out`` in memory took twice
 * the instructions). */
#define MAXG 16
static void attend(const float *q, int G, const float *keys, const float *values, const int64_t *mask, long L,
                   int d, float scaling, float *scores, int *at, float *out) {
    long n = 0;
    for (long j = 0; j < L; j++)
        if (mask[j]) at[n++] = (int)j;
    for (int h = 0; h < G; h++) {
        const float *qh = q + h * d;
        float *sc = scores + h * L;
        long j = 0;
        if (d % 8 == 0) {
            for (; j + 4 <= n; j += 4) {
                const float *k0 = keys + (long)at[j] * d, *k1 = keys + (long)at[j + 1] * d,
                            *k2 = keys + (long)at[j + 2] * d, *k3 = keys + (long)at[j + 3] * d;
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (int i = 0; i < d; i += 8) {
                    const __m256 x = _mm256_loadu_ps(qh + i);
                    a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k0 + i), a0);
                    a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k1 + i), a1);
                    a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k2 + i), a2);
                    a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k3 + i), a3);
                }
                _mm_storeu_ps(sc + j, _mm_mul_ps(hsum4x8(a0, a1, a2, a3), _mm_set1_ps(scaling)));
            }
        }
        for (; j < n; j++) {
            const float *k = keys + (long)at[j] * d;
            float s = 0;
            for (int i = 0; i < d; i++) s += qh[i] * k[i];
            sc[j] = s * scaling;
        }
        float top = -INFINITY;
        for (j = 0; j < n; j++)
            if (sc[j] > top) top = sc[j];
        for (j = 0; j + 8 <= n; j += 8)
            _mm256_storeu_ps(sc + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + j), _mm256_set1_ps(top))));
        for (; j < n; j++) sc[j] = expf(sc[j] - top);
        float sum = 0;
        for (j = 0; j < n; j++) sum += sc[j];
        const float inv = n ? 1.0f / sum : 0.0f; /* no column at all: zeros, not 0 / 0 */
        float *o = out + h * d;
        int i = 0;
        for (; i + 32 <= d; i += 32) {
            __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
            for (j = 0; j < n; j++) {
                const __m256 p = _mm256_set1_ps(sc[j]);
                const float *v = values + (long)at[j] * d + i;
                o0 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v), o0);
                o1 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8), o1);
                o2 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 16), o2);
                o3 = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 24), o3);
            }
            const __m256 w = _mm256_set1_ps(inv);
            _mm256_storeu_ps(o + i, _mm256_mul_ps(o0, w));
            _mm256_storeu_ps(o + i + 8, _mm256_mul_ps(o1, w));
            _mm256_storeu_ps(o + i + 16, _mm256_mul_ps(o2, w));
            _mm256_storeu_ps(o + i + 24, _mm256_mul_ps(o3, w));
        }
        for (; i < d; i++) {
            float s = 0;
            for (j = 0; j < n; j++) s += sc[j] * values[(long)at[j] * d + i];
            o[i] = s * inv;
        }
    }
}

/* Returns 0, or -1 where a size is outside what this step handles or memory runs out (nothing written
   then). */
int decode_step(const qmodel *md, float *h, long M, const float *cos, const float *ssin, float *const *kbuf,
                float *const *vbuf, long batch_rows, long cap, long col, const int64_t *mask, long mask_stride,
                int threads) {
    const int hq = md->heads, hk = md->kv_heads, d = md->head_dim, n = md->hidden, inter = md->inter;
    const int group = hq / hk, qkv_w = (hq + 2 * hk) * d;
    const long L = col + 1;
    if (d > 512 || group > MAXG || col >= cap || M > batch_rows) return -1;
    float *x = malloc(sizeof(float) * M * n);
    float *qkv = malloc(sizeof(float) * M * qkv_w);
    float *att = malloc(sizeof(float) * M * hq * d);
    float *gu = malloc(sizeof(float) * M * 2 * inter);
    float *act = malloc(sizeof(float) * M * inter);
    float *y = malloc(sizeof(float) * M * n);
    float *scores = malloc(sizeof(float) * (size_t)M * hq * L);
    int *at = malloc(sizeof(int) * (size_t)M * hk * L);
    if (!x || !qkv || !att || !gu || !act || !y || !scores || !at) {
        free(x), free(qkv), free(att), free(gu), free(act), free(y), free(scores), free(at);
        return -1; /* the torch step takes it */
    }
    for (int l = 0; l < md->layers; l++) {
        const qlayer *ly = md->layer + l;
        rms_norm(h, M, n, ly->in_norm, md->eps, x);
        mm(&ly->qkv, x, M, qkv, threads);
        for (long m = 0; m < M; m++) {
            float *r = qkv + m * qkv_w;
            for (int t = 0; t < hq + hk; t++) rotate(r + t * d, cos + m * d, ssin + m * d, d);
            for (int g = 0; g < hk; g++) {
                const long at = ((m * hk + g) * cap + col) * d;
                memcpy(kbuf[l] + at, r + (hq + g) * d, sizeof(float) * d);
                memcpy(vbuf[l] + at, r + (hq + hk + g) * d, sizeof(float) * d);
            }
        }
#pragma omp parallel for num_threads(threads) if (threads > 1 && M * hq * L * d >= 65536)
        for (long mg = 0; mg < M * hk; mg++) {
            const long m = mg / hk;
            const int g = (int)(mg % hk), head = g * group;
            const long base = (m * hk + g) * cap * d;
            attend(qkv + m * qkv_w + head * d, group, kbuf[l] + base, vbuf[l] + base, mask + m * mask_stride, L,
                   d, md->scaling, scores + (m * hq + head) * L, at + mg * L, att + (m * hq + head) * d);
        }
        mm(&ly->o, att, M, y, threads);
        for (long i = 0; i < M * n; i++) h[i] += y[i];
        rms_norm(h, M, n, ly->post_norm, md->eps, x);
        mm(&ly->gate_up, x, M, gu, threads);
        for (long m = 0; m < M; m++) silu_mul(gu + m * 2 * inter, gu + m * 2 * inter + inter, act + m * inter, inter);
        mm(&ly->down, act, M, y, threads);
        for (long i = 0; i < M * n; i++) h[i] += y[i];
    }
    free(x);
    free(qkv);
    free(att);
    free(gu);
    free(act);
    free(y);
    free(scores);
    free(at);
    return 0;
}
