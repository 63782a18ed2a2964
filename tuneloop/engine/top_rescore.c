/* The candidates of a quantized output projection, scored again in float32
 * (``_decode.Decoder._logits``): per row the k largest of its rough logits,
 * each replaced by the exact product of its float32 weight row with the row's
 * hidden state.
 *
 * Why our own: torch's topk (k = 64 of SmolLM2's 49,152 logits) then
 * index_select, bmm and scatter took 2.7-6 ms of a 16-row step on a 2-core
 * AMD EPYC, as long as a third of the layers' products; here one pass a row
 * keeps the k largest seen (a vector compare rejects most logits against the
 * smallest kept, 8 at a time) and the k dot products follow, rows in
 * parallel. Which of equal logits is kept may differ from torch's topk; the
 * exact scores then decide, as they do there.
 */
#include <immintrin.h>
#include <stdint.h>

#define MAXK 256

static void top_row(const float *z, long V, int k, int64_t *top) {
    float kept[MAXK];
    int low = 0;
    for (int i = 0; i < k; i++) {
        kept[i] = z[i];
        top[i] = i;
        if (kept[i] < kept[low]) low = i;
    }
    long j = k;
    for (;;) {
        /* 8 at a time against the smallest kept until one beats it */
        const __m256 floor = _mm256_set1_ps(kept[low]);
        for (; j + 8 <= V; j += 8)
            if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(z + j), floor, _CMP_GT_OQ))) break;
        const long end = j + 8 <= V ? j + 8 : V;
        if (j >= end) break;
        for (; j < end; j++) {
            if (z[j] > kept[low]) {
                kept[low] = z[j];
                top[low] = j;
                for (int i = 0; i < k; i++)
                    if (kept[i] < kept[low]) low = i;
            }
        }
    }
}

/* logits [M, V] (row stride V) rewritten in place; weight [V, C] float32 rows; x [M, C]; top [M, k]. */
void top_rescore(float *logits, long M, long V, int k, const float *weight, const float *x, long C, int64_t *top,
                 int threads) {
    if (k > V) k = (int)V;
    if (k > MAXK) k = MAXK;
#pragma omp parallel for num_threads(threads) if (threads > 1 && M > 1)
    for (long m = 0; m < M; m++) {
        float *z = logits + m * V;
        int64_t *t = top + m * k;
        top_row(z, V, k, t);
        const float *xm = x + m * C;
        for (int i = 0; i < k; i++) {
            const float *w = weight + t[i] * C;
            float s = 0;
#pragma omp simd reduction(+ : s)
            for (long c = 0; c < C; c++) s += w[c] * xm[c];
            z[t[i]] = s;
        }
    }
}
