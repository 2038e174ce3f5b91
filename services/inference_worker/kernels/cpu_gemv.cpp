// Decode-sized products on CPU: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for 1 to 8 rows of x,
// with w bf16 or int8 (times a scale per row n). Built and loaded by cpu_gemv.py, which holds the
// torch reference and the reasons; plain C ABI, so no torch headers are compiled.
//
// A decode step streams every weight from memory once, so these loops are written for the memory:
// R weight rows in flight at a time (more streams than the hardware prefetcher keeps up with alone)
// plus a software prefetch PREFETCH_ROWS ahead, each weight row loaded once for all M rows of x.
// x, w and y are contiguous and row-major; accumulation is fp32; y is bf16, rounded to nearest even.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

namespace {

constexpr int PREFETCH_ROWS = 16;

inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays a (quiet) NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

inline float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// bf16 weights: 32 k a step, pairs of (x, w) multiplied and added in fp32 by vdpbf16ps.
template <int M, int R>
void bf16_rows(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y,
               int64_t K, int64_t N, int64_t n0) {
    __m512 acc[M][R];
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) acc[m][r] = _mm512_setzero_ps();
    const uint16_t* wb = w + n0 * K;
    const bool prefetch = n0 + PREFETCH_ROWS + R <= N;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh wv[R];
        for (int r = 0; r < R; r++) {
            if (prefetch) _mm_prefetch((const char*)(wb + (PREFETCH_ROWS + r) * K + k), _MM_HINT_T0);
            wv[r] = (__m512bh)_mm512_loadu_si512(wb + r * K + k);
        }
        for (int m = 0; m < M; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
            for (int r = 0; r < R; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
        }
    }
    if (k < K) {  // the tail: masked loads read zeros past K, which add nothing
        const __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
        __m512bh wv[R];
        for (int r = 0; r < R; r++) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, wb + r * K + k);
        for (int m = 0; m < M; m++) {
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
            for (int r = 0; r < R; r++) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) {
            float sum = _mm512_reduce_add_ps(acc[m][r]);
            if (bias) sum += from_bf16(bias[n0 + r]);
            y[m * N + n0 + r] = to_bf16(sum);
        }
}

// int8 weights: 16 k a step, widened to fp32 (exact) and multiplied with x widened from bf16 (exact).
template <int M, int R>
void int8_rows(const uint16_t* x, const int8_t* w, const uint16_t* scales, const uint16_t* bias,
               uint16_t* y, int64_t K, int64_t N, int64_t n0) {
    __m512 acc[M][R];
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) acc[m][r] = _mm512_setzero_ps();
    const int8_t* wb = w + n0 * K;
    const bool prefetch = n0 + PREFETCH_ROWS + R <= N;
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        __m512 wv[R];
        for (int r = 0; r < R; r++) {
            if (prefetch && (k & 63) == 0) _mm_prefetch((const char*)(wb + (PREFETCH_ROWS + r) * K + k), _MM_HINT_T0);
            __m128i q = _mm_maskz_loadu_epi8(mask, wb + r * K + k);
            wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
        }
        for (int m = 0; m < M; m++) {
            __m256i h = _mm256_maskz_loadu_epi16(mask, x + m * K + k);
            __m512 xv = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
            for (int r = 0; r < R; r++) acc[m][r] = _mm512_fmadd_ps(xv, wv[r], acc[m][r]);
        }
    }
    for (int m = 0; m < M; m++)
        for (int r = 0; r < R; r++) {
            float sum = _mm512_reduce_add_ps(acc[m][r]) * from_bf16(scales[n0 + r]);
            if (bias) sum += from_bf16(bias[n0 + r]);
            y[m * N + n0 + r] = to_bf16(sum);
        }
}

// R weight rows per block, by the number of x rows: fewer as M grows, so that the M * R
// accumulators stay in the 32 vector registers (measured on the 2-core VM of issue #24).
template <int M> constexpr int BF16_R = M == 1 ? 16 : M <= 3 ? 8 : M == 4 ? 6 : M <= 6 ? 4 : 3;
template <int M> constexpr int INT8_R = M <= 2 ? 8 : M <= 4 ? 4 : 3;

template <int M>
void bf16_all(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t K, int64_t N,
              int threads) {
    constexpr int R = BF16_R<M>;
    const int64_t blocks = N / R;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) bf16_rows<M, R>(x, w, bias, y, K, N, b * R);
    for (int64_t n = blocks * R; n < N; n++) bf16_rows<M, 1>(x, w, bias, y, K, N, n);
}

template <int M>
void int8_all(const uint16_t* x, const int8_t* w, const uint16_t* scales, const uint16_t* bias, uint16_t* y,
              int64_t K, int64_t N, int threads) {
    constexpr int R = INT8_R<M>;
    const int64_t blocks = N / R;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t b = 0; b < blocks; b++) int8_rows<M, R>(x, w, scales, bias, y, K, N, b * R);
    for (int64_t n = blocks * R; n < N; n++) int8_rows<M, 1>(x, w, scales, bias, y, K, N, n);
}

}  // namespace

extern "C" {

// Returns 0, or -1 for a row count outside 1..8 (the caller routes those elsewhere).
int strata_gemv_bf16(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y,
                     int64_t M, int64_t K, int64_t N, int threads) {
    switch (M) {
        case 1: bf16_all<1>(x, w, bias, y, K, N, threads); return 0;
        case 2: bf16_all<2>(x, w, bias, y, K, N, threads); return 0;
        case 3: bf16_all<3>(x, w, bias, y, K, N, threads); return 0;
        case 4: bf16_all<4>(x, w, bias, y, K, N, threads); return 0;
        case 5: bf16_all<5>(x, w, bias, y, K, N, threads); return 0;
        case 6: bf16_all<6>(x, w, bias, y, K, N, threads); return 0;
        case 7: bf16_all<7>(x, w, bias, y, K, N, threads); return 0;
        case 8: bf16_all<8>(x, w, bias, y, K, N, threads); return 0;
    }
    return -1;
}

int strata_gemv_int8(const uint16_t* x, const int8_t* w, const uint16_t* scales, const uint16_t* bias,
                     uint16_t* y, int64_t M, int64_t K, int64_t N, int threads) {
    switch (M) {
        case 1: int8_all<1>(x, w, scales, bias, y, K, N, threads); return 0;
        case 2: int8_all<2>(x, w, scales, bias, y, K, N, threads); return 0;
        case 3: int8_all<3>(x, w, scales, bias, y, K, N, threads); return 0;
        case 4: int8_all<4>(x, w, scales, bias, y, K, N, threads); return 0;
        case 5: int8_all<5>(x, w, scales, bias, y, K, N, threads); return 0;
        case 6: int8_all<6>(x, w, scales, bias, y, K, N, threads); return 0;
        case 7: int8_all<7>(x, w, scales, bias, y, K, N, threads); return 0;
        case 8: int8_all<8>(x, w, scales, bias, y, K, N, threads); return 0;
    }
    return -1;
}

}  // extern "C"
