/* y = x @ W^T for float32 activations x [M, in] and int4 weights W [out, in]
 * in GGUF Q4_1's form: groups of 32 inputs per output row, each with a scale
 * and a minimum, w = code * scale + minimum, all in float32 arithmetic.
 *
 * Why our own: torch's int4 CPU kernel takes bfloat16 activations, scales and
 * zero points only (float32 activations ran 10-30x slower), and those
 * roundings changed the quantized engine's greedy replies against float32's;
 * here nothing is rounded but the float32 sums (tuneloop/engine/quant.py).
 *
 *   y[m, o] = sum_g scale[o, g] * sum_{i in g} code[o, i] * x[m, i]
 *           + minimum[o, g] * sum_{i in g} x[m, i]
 *
 * Layout (written by quant.py): outputs in blocks of 16, one per vector lane,
 * so no horizontal sums are needed and x is read as broadcast scalars.
 *   codes:  [blocks][in / 2][16] bytes, byte k of pair p holds
 *           code[16 b + k][2 p] in its low and code[16 b + k][2 p + 1] in its
 *           high nibble (rows past ``out`` are zero);
 *   sm:     [blocks][in / 32][2][16] scale then minimum, float32 or, when
 *           ``half`` (weights from a GGUF, whose scales are float16 and so
 *           exact in it), float16: a quarter less memory traffic at one row.
 * Instruction sets: AVX-512 (one 16-lane vector a block) or, compiled with
 * -mavx2 where the CPU lacks AVX-512, AVX2 + FMA + F16C: the same layout, each
 * block of 16 outputs taken as two halves of 8 lanes (16 ymm registers hold
 * half of AVX-512's accumulators, hence fewer rows a pass).
 * Threads: an OpenMP team takes chunks of output blocks in turn; linked
 * against the libgomp.so.1 that torch has already loaded (the same soname:
 * /proc/self/maps shows torch's copy only), so torch's threads run it and no
 * second team competes for the cores.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define GROUP 32
#define LANES 16
/* Software prefetch distance in bytes of codes (8 groups), scales and minimums
   as many groups ahead: with the weights coming from memory, prefetching made
   the whole SmolLM2 layer mix at one row 1.3x faster (11.8 -> 9.0 ms a token,
   one thread; 1024 bytes ahead gained less, 3072-4096 no more) */
#ifndef PF
#define PF 2048
#endif
#ifndef PFSM
#define PFSM 1
#endif
/* Chunks per thread handed out in turn (0: an even split, one part a thread). */
#ifndef DYN
#define DYN 4
#endif

/* ROWS: rows multiplied per pass over a block; more rows pass again over the
   block, which is then in L1 (16 outputs x 1536 inputs = 12 KB of codes) */
#if defined(__AVX512F__)
#define ROWS 8

static inline __attribute__((always_inline)) void load_sm(const void *sm, int half, long at, __m512 *s, __m512 *mn) {
    if (half) {
        const uint16_t *p = (const uint16_t *)sm + at;
        *s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
        *mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + LANES)));
    } else {
        const float *p = (const float *)sm + at;
        *s = _mm512_loadu_ps(p);
        *mn = _mm512_loadu_ps(p + LANES);
    }
}

/* One block of 16 outputs for MC rows. NC independent partial sums per row
 * and group: one row's single chain of FMAs would wait on their latency
 * (4 cycles, 2 ports: 8 in flight keep them busy). */
static inline __attribute__((always_inline)) void block(const int MC, const int NC, const uint8_t *codes,
                                                        const void *sm, int half, int ng, const float *x,
                                                        long ldx, const float *xs, float *y, long ldy,
                                                        int valid) {
    const __mmask16 mask = valid >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << valid) - 1);
    /* code -> float by table lookup: vpermps reads the low 4 bits of each
       index, so the low nibble needs no mask */
    const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 acc[ROWS];
#pragma GCC unroll 8
    for (int m = 0; m < MC; m++) acc[m] = _mm512_setzero_ps();
    for (int g = 0; g < ng; g++) {
        __m512 part[ROWS][8];
#pragma GCC unroll 8
        for (int m = 0; m < MC; m++)
#pragma GCC unroll 8
            for (int c = 0; c < NC; c++) part[m][c] = _mm512_setzero_ps();
        const uint8_t *cg = codes + (long)g * (GROUP / 2) * LANES;
        const float *xg = x + (long)g * GROUP;
#if PF
        /* the codes a few groups ahead (the next block's, near a block's end: the blocks a thread
           walks are contiguous) */
        for (int l = 0; l < GROUP / 2 * LANES; l += 64) _mm_prefetch((const char *)cg + PF + l, _MM_HINT_T0);
#if PFSM
        /* and their scales and minimums, as many groups ahead */
        {
            const char *ps = (const char *)sm + ((long)g + PF / (GROUP / 2 * LANES)) * 2 * LANES * (half ? 2 : 4);
            _mm_prefetch(ps, _MM_HINT_T0);
            if (!half) _mm_prefetch(ps + 64, _MM_HINT_T0);
        }
#endif
#endif
#pragma GCC unroll 16
        for (int k = 0; k < GROUP / 2; k++) {
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(cg + k * LANES)));
            __m512 lo = _mm512_permutexvar_ps(v, table);
            __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
#pragma GCC unroll 8
            for (int m = 0; m < MC; m++) {
                const int a = (2 * k) % NC, b = (2 * k + 1) % NC;
                part[m][a] = _mm512_fmadd_ps(lo, _mm512_set1_ps(xg[m * ldx + 2 * k]), part[m][a]);
                part[m][b] = _mm512_fmadd_ps(hi, _mm512_set1_ps(xg[m * ldx + 2 * k + 1]), part[m][b]);
            }
        }
        __m512 s, mn;
        load_sm(sm, half, (long)g * 2 * LANES, &s, &mn);
#pragma GCC unroll 8
        for (int m = 0; m < MC; m++) {
#pragma GCC unroll 8
            for (int w = NC / 2; w >= 1; w /= 2)
#pragma GCC unroll 8
                for (int c = 0; c < w; c++) part[m][c] = _mm512_add_ps(part[m][c], part[m][c + w]);
            acc[m] = _mm512_fmadd_ps(part[m][0], s, acc[m]);
            acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xs[m * ng + g]), acc[m]);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MC; m++) _mm512_mask_storeu_ps(y + m * ldy, mask, acc[m]);
}

#define CASE(MC, NC) \
    case MC: block(MC, NC, codes, sm, half, ng, x, ldx, xs, y, ldy, valid); break;

static void rows_block(int mc, const uint8_t *codes, const void *sm, int half, int ng, const float *x, long ldx,
                       const float *xs, float *y, long ldy, int valid) {
    switch (mc) {
        CASE(1, 8) CASE(2, 4) CASE(3, 2) CASE(4, 2) CASE(5, 1) CASE(6, 1) CASE(7, 1) CASE(8, 1)
    }
}

/* the sum of 32 floats: a row's group sum, for the minimums */
static inline float group_sum(const float *p) {
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(p), _mm512_loadu_ps(p + LANES)));
}

#else /* AVX2 + FMA + F16C */
/* 8 partial sums, 4 accumulators and 3 temporaries fill the 16 ymm registers */
#define ROWS 4

#define HL 8 /* lanes of a ymm register: half a block */

/* 8 scales at ``at`` and their minimums ``gap`` further (a block's width: 16 here, 8 in int4_mm_q's) */
static inline __attribute__((always_inline)) void load_sm(const void *sm, int half, long at, int gap, __m256 *s,
                                                          __m256 *mn) {
    if (half) {
        const uint16_t *p = (const uint16_t *)sm + at;
        *s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
        *mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + gap)));
    } else {
        const float *p = (const float *)sm + at;
        *s = _mm256_loadu_ps(p);
        *mn = _mm256_loadu_ps(p + gap);
    }
}

/* Outputs h*8 .. h*8+7 of one block for MC rows, each half in turn; as the
 * AVX-512 block, NC partial sums per row and group. A code becomes a float by
 * a mask or shift and a conversion (AVX2 has no 16-entry permute of floats). */
static inline __attribute__((always_inline)) void block(const int MC, const int NC, const uint8_t *codes,
                                                        const void *sm, int half, int ng, const float *x,
                                                        long ldx, const float *xs, float *y, long ldy,
                                                        int valid) {
    const __m256i low = _mm256_set1_epi32(0x0F);
    for (int h = 0; h < LANES / HL; h++) {
        const int n = valid - h * HL;
        if (n <= 0) break;
        __m256 acc[ROWS];
#pragma GCC unroll 8
        for (int m = 0; m < MC; m++) acc[m] = _mm256_setzero_ps();
        for (int g = 0; g < ng; g++) {
            __m256 part[ROWS][8];
#pragma GCC unroll 8
            for (int m = 0; m < MC; m++)
#pragma GCC unroll 8
                for (int c = 0; c < NC; c++) part[m][c] = _mm256_setzero_ps();
            const uint8_t *cg = codes + (long)g * (GROUP / 2) * LANES;
            const float *xg = x + (long)g * GROUP;
#if PF
            if (h == 0) /* the second half reads what the first brought in */
                for (int l = 0; l < GROUP / 2 * LANES; l += 64) _mm_prefetch((const char *)cg + PF + l, _MM_HINT_T0);
#endif
#pragma GCC unroll 16
            for (int k = 0; k < GROUP / 2; k++) {
                const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(cg + k * LANES + h * HL)));
                const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, low));
                const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
#pragma GCC unroll 8
                for (int m = 0; m < MC; m++) {
                    const int a = (2 * k) % NC, b = (2 * k + 1) % NC;
                    part[m][a] = _mm256_fmadd_ps(lo, _mm256_set1_ps(xg[m * ldx + 2 * k]), part[m][a]);
                    part[m][b] = _mm256_fmadd_ps(hi, _mm256_set1_ps(xg[m * ldx + 2 * k + 1]), part[m][b]);
                }
            }
            __m256 s, mn;
            load_sm(sm, half, (long)g * 2 * LANES + h * HL, LANES, &s, &mn);
#pragma GCC unroll 8
            for (int m = 0; m < MC; m++) {
#pragma GCC unroll 8
                for (int w = NC / 2; w >= 1; w /= 2)
#pragma GCC unroll 8
                    for (int c = 0; c < w; c++) part[m][c] = _mm256_add_ps(part[m][c], part[m][c + w]);
                acc[m] = _mm256_fmadd_ps(part[m][0], s, acc[m]);
                acc[m] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xs[m * ng + g]), acc[m]);
            }
        }
#pragma GCC unroll 8
        for (int m = 0; m < MC; m++) {
            if (n >= HL) {
                _mm256_storeu_ps(y + m * ldy + h * HL, acc[m]);
            } else {
                float tmp[HL];
                _mm256_storeu_ps(tmp, acc[m]);
                for (int i = 0; i < n; i++) y[m * ldy + h * HL + i] = tmp[i];
            }
        }
    }
}

#define CASE(MC, NC) \
    case MC: block(MC, NC, codes, sm, half, ng, x, ldx, xs, y, ldy, valid); break;

static void rows_block(int mc, const uint8_t *codes, const void *sm, int half, int ng, const float *x, long ldx,
                       const float *xs, float *y, long ldy, int valid) {
    switch (mc) {
        CASE(1, 8) CASE(2, 4) CASE(3, 2) CASE(4, 2)
    }
}

/* the sum of 32 floats: a row's group sum, for the minimums */
static inline float group_sum(const float *p) {
    __m256 a = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)),
                             _mm256_add_ps(_mm256_loadu_ps(p + 16), _mm256_loadu_ps(p + 24)));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    b = _mm_add_ss(b, _mm_movehdup_ps(b));
    return _mm_cvtss_f32(b);
}

#endif

/* y [M, out] = x [M, in] @ W^T; threads: the OpenMP team size (torch's count). */
void int4_mm(const float *x, long M, long in, const uint8_t *codes, const void *sm, int half, long out, float *y,
             int threads) {
    const int ng = (int)(in / GROUP);
    const long blocks = (out + LANES - 1) / LANES;
    const long code_stride = in / 2 * LANES, sm_stride = (long)ng * 2 * LANES;
    /* each row's group sums, for the minimums */
    float *xs = (float *)malloc(sizeof(float) * (size_t)(M * ng));
    for (long m = 0; m < M; m++)
        for (int g = 0; g < ng; g++) xs[m * ng + g] = group_sum(x + m * in + g * GROUP);
    const size_t sm_size = half ? 2 : 4;
    if (threads < 1) threads = 1;
    if (threads > blocks) threads = (int)blocks;
#if DYN
    /* chunks of blocks handed out in turn: on a shared machine a thread the
       scheduler set aside would otherwise hold up the whole multiply */
    const long chunk = blocks / ((long)threads * DYN) > 0 ? blocks / ((long)threads * DYN) : 1;
    long next = 0;
#endif
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#if DYN
        for (;;) {
            const long b0 = __atomic_fetch_add(&next, chunk, __ATOMIC_RELAXED);
            if (b0 >= blocks) break;
            const long b1 = b0 + chunk < blocks ? b0 + chunk : blocks;
#else
        {
#ifdef _OPENMP
            extern int omp_get_thread_num(void);
            extern int omp_get_num_threads(void);
            const long t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
            const long t = 0, nt = 1;
#endif
            const long b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
#endif
            for (long b = b0; b < b1; b++) {
                const long left = out - b * LANES;
                const int valid = left >= LANES ? LANES : (int)left;
                const uint8_t *cb = codes + b * code_stride;
                const void *sb = (const char *)sm + b * sm_stride * sm_size;
                for (long m0 = 0; m0 < M; m0 += ROWS) {
                    const int mc = (int)(M - m0 < ROWS ? M - m0 : ROWS);
                    rows_block(mc, cb, sb, half, ng, x + m0 * in, in, xs + m0 * ng, y + m0 * out + b * LANES,
                               out, valid);
                }
            }
        }
    }
    free(xs);
}

#if !defined(__AVX512F__)
/* int4_mm_q: the same product with the activations rounded to integers, for
 * AVX2 CPUs, where the float32 kernel above spends its time converting codes
 * to floats (two conversions and two FMAs per 16 products) and llama.cpp's
 * integer dot products ran 1.4x faster a token (docs/benchmarks.md).
 *
 * Each row's group of 32 inputs is rounded to an integer q = round(x / d),
 * |q| <= QMAX, with its own d = max|x| / QMAX:
 *   fine (QMAX 32639, 16 bits): q = 256 * hi + lo, hi = round(q / 256)
 *        and lo in [-128, 127] (so QMAX 32767 - 128), two byte products per code (relative rounding 2^-16 of
 *        the group's largest input: far finer than the weights'; 15 bits,
 *        lo in [0, 127], cost the same and left one more of the bench's 16
 *        replies off float32's one at a time);
 *   coarse (QMAX 127, as llama.cpp's Q8_1): one byte, one product per code.
 * The minimums' term uses each group's exact float32 sum, so only the
 * code * input products are rounded.
 *
 * vpmaddubsw multiplies 32 unsigned codes by 32 signed bytes and adds
 * neighbours into 16-bit lanes; vpmaddwd then adds neighbouring lanes into
 * 32 bits. The layout keeps one output per 32-bit lane through both, so no
 * horizontal sums: a block of 8 outputs, a chunk of 8 inputs, 32 bytes,
 *   byte 4 j + t = code[8 b + j][8 c + t] | code[8 b + j][8 c + 4 + t] << 4
 * (j: output in block, t = 0..3), the low nibbles meeting inputs 8c..8c+3 and
 * the high ones 8c+4..8c+7, each as one broadcast 32-bit word of bytes.
 *   sm: [blocks][in / 32][2][8] scale then minimum (float16 when ``half``).
 * Bounds: a vpmaddubsw lane is at most 2 * 15 * 128 = 3840, a group's eight
 * of them 30720 < 2^15: a group is summed in 16 bits without saturating. */
#define QB 8 /* outputs a block */
#define QROWS 4

static inline __attribute__((always_inline)) void qblock(const int MC, const int FINE, const uint8_t *codes,
                                                         const void *sm, int half, int ng, const int8_t *xh,
                                                         const int8_t *xl, long ldx, const float *xd,
                                                         const float *xs, float *y, long ldy, int valid) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1), hi_w = _mm256_set1_epi16(256);
    __m256 acc[QROWS];
#pragma GCC unroll 4
    for (int m = 0; m < MC; m++) acc[m] = _mm256_setzero_ps();
    for (int g = 0; g < ng; g++) {
        const uint8_t *cg = codes + (long)g * GROUP / 8 * 32;
#if PF
        _mm_prefetch((const char *)cg + PF, _MM_HINT_T0);
        _mm_prefetch((const char *)cg + PF + 64, _MM_HINT_T0);
#endif
        __m256i ah[QROWS], al[QROWS];
#pragma GCC unroll 4
        for (int m = 0; m < MC; m++) ah[m] = al[m] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int c = 0; c < GROUP / 8; c++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(cg + c * 32));
            const __m256i lo = _mm256_and_si256(v, low);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            const long at = (long)g * GROUP + c * 8;
#pragma GCC unroll 4
            for (int m = 0; m < MC; m++) {
                const int32_t *ph = (const int32_t *)(xh + m * ldx + at);
                ah[m] = _mm256_add_epi16(ah[m], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(ph[0])));
                ah[m] = _mm256_add_epi16(ah[m], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(ph[1])));
                if (FINE) {
                    const int32_t *pl = (const int32_t *)(xl + m * ldx + at);
                    al[m] = _mm256_add_epi16(al[m], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(pl[0])));
                    al[m] = _mm256_add_epi16(al[m], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(pl[1])));
                    __asm__("" : "+x"(al[m]));
                }
                /* One running sum per row, added to in turn. Integer adds being associative, GCC
                   otherwise regroups them into a tree over the unrolled chunks, keeps every product
                   live and spills them to the stack (58 stores a group at 4 rows): these empty asm
                   statements pin each sum to a register. 16 rows of SmolLM2's MLP 1.2-1.4x faster. */
                __asm__("" : "+x"(ah[m]));
            }
        }
        __m256 s, mn;
        load_sm(sm, half, (long)g * 2 * QB, QB, &s, &mn);
#pragma GCC unroll 4
        for (int m = 0; m < MC; m++) {
            __m256i sum = _mm256_madd_epi16(ah[m], FINE ? hi_w : ones);
            if (FINE) sum = _mm256_add_epi32(sum, _mm256_madd_epi16(al[m], ones));
            const __m256 sd = _mm256_mul_ps(s, _mm256_set1_ps(xd[m * ng + g]));
            acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), sd, acc[m]);
            acc[m] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xs[m * ng + g]), acc[m]);
        }
    }
#pragma GCC unroll 4
    for (int m = 0; m < MC; m++) {
        if (valid >= QB) {
            _mm256_storeu_ps(y + m * ldy, acc[m]);
        } else {
            float tmp[QB];
            _mm256_storeu_ps(tmp, acc[m]);
            for (int i = 0; i < valid; i++) y[m * ldy + i] = tmp[i];
        }
    }
}

#define QCASE(MC) \
    case MC: \
        if (fine) qblock(MC, 1, codes, sm, half, ng, xh, xl, ldx, xd, xs, y, ldy, valid); \
        else qblock(MC, 0, codes, sm, half, ng, xh, xl, ldx, xd, xs, y, ldy, valid); \
        break;

static void rows_qblock(int mc, int fine, const uint8_t *codes, const void *sm, int half, int ng, const int8_t *xh,
                        const int8_t *xl, long ldx, const float *xd, const float *xs, float *y, long ldy, int valid) {
    switch (mc) {
        QCASE(1) QCASE(2) QCASE(3) QCASE(4)
    }
}

/* One row's inputs as integers: per group of 32, d = max|x| / qmax and
 * q = round(x / d) split into hi (and, when fine, lo) bytes; the group's
 * exact sum for the minimums. */
static void round_row(const float *x, long in, int fine, int8_t *xh, int8_t *xl, float *xd, float *xs) {
    const float qmax = fine ? 32639.0f : 127.0f;
    for (long g = 0; g < in / GROUP; g++) {
        const float *p = x + g * GROUP;
        __m256 a = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (int i = 0; i < GROUP; i += 8) a = _mm256_max_ps(a, _mm256_andnot_ps(sign, _mm256_loadu_ps(p + i)));
        __m128 b = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        b = _mm_max_ps(b, _mm_movehl_ps(b, b));
        b = _mm_max_ss(b, _mm_movehdup_ps(b));
        const float amax = _mm_cvtss_f32(b);
        const float d = amax / qmax, id = amax > 0 ? qmax / amax : 0.0f;
        xd[g] = d;
        xs[g] = group_sum(p);
        const __m256 vid = _mm256_set1_ps(id);
        for (int i = 0; i < GROUP; i += 8) {
            /* round half to even (the MXCSR default), as llama.cpp's AVX2 path does */
            const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(p + i), vid));
            int32_t t[8];
            _mm256_storeu_si256((__m256i *)t, q);
            for (int k = 0; k < 8; k++) {
                if (fine) {
                    const int32_t h = (t[k] + 128) >> 8;
                    xh[g * GROUP + i + k] = (int8_t)h;
                    xl[g * GROUP + i + k] = (int8_t)(t[k] - 256 * h);
                } else {
                    xh[g * GROUP + i + k] = (int8_t)t[k];
                }
            }
        }
    }
}

/* y [M, out] = x [M, in] @ W^T with ``fine`` (16-bit) or coarse (8-bit) rounded inputs; codes and sm in
   the layout above. */
void int4_mm_q(const float *x, long M, long in, const uint8_t *codes, const void *sm, int half, long out, float *y,
               int threads, int fine) {
    const int ng = (int)(in / GROUP);
    const long blocks = (out + QB - 1) / QB;
    const long code_stride = in / 2 * QB, sm_stride = (long)ng * 2 * QB;
    int8_t *xh = (int8_t *)malloc((size_t)(M * in) * 2);
    int8_t *xl = xh + M * in;
    float *xd = (float *)malloc(sizeof(float) * (size_t)(M * ng) * 2);
    float *xs = xd + M * ng;
    if (threads < 1) threads = 1;
    const size_t sm_size = half ? 2 : 4;
    if (threads > blocks) threads = (int)blocks;
    const long chunk = blocks / ((long)threads * DYN) > 0 ? blocks / ((long)threads * DYN) : 1;
    long next = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        /* the rows rounded by the team that multiplies them (a barrier, not a second team's start: at
           16 rows, rounding on one thread was a tenth of the product) */
#pragma omp for schedule(static)
        for (long m = 0; m < M; m++)
            round_row(x + m * in, in, fine, xh + m * in, xl + m * in, xd + m * ng, xs + m * ng);
        for (;;) {
            const long b0 = __atomic_fetch_add(&next, chunk, __ATOMIC_RELAXED);
            if (b0 >= blocks) break;
            const long b1 = b0 + chunk < blocks ? b0 + chunk : blocks;
            for (long b = b0; b < b1; b++) {
                const long left = out - b * QB;
                const int valid = left >= QB ? QB : (int)left;
                const uint8_t *cb = codes + b * code_stride;
                const void *sb = (const char *)sm + b * sm_stride * sm_size;
                for (long m0 = 0; m0 < M; m0 += QROWS) {
                    const int mc = (int)(M - m0 < QROWS ? M - m0 : QROWS);
                    rows_qblock(mc, fine, cb, sb, half, ng, xh + m0 * in, xl + m0 * in, in, xd + m0 * ng,
                                xs + m0 * ng, y + m0 * out + b * QB, out, valid);
                }
            }
        }
    }
    free(xh);
    free(xd);
}
#endif
