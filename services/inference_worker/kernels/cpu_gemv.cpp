// Decode-sized products on CPU: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]) for 1 to 8 rows of x,
// with w bf16 or int8 (times a scale per row n). Built and loaded by cpu_gemv.py, which holds the
// torch reference and the reasons; plain C ABI, so no torch headers are compiled.
//
// A decode step streams every weight from memory once, so these loops are written for the memory:
// R weight rows in flight at a time (more streams than the hardware prefetcher keeps up with alone)
// plus a software prefetch PREFETCH_ROWS ahead, each weight row loaded once for all M rows of x.
// x, w and y are contiguous and row-major; accumulation is fp32; y is bf16, rounded to nearest even.
//
// On CPUs with AMX (Sapphire Rapids on) bf16 takes another loop: the weights are the A tiles as they lie
// (16 rows of n by 32 k, a row stride apart), x the B tile (its k in VNNI pairs, rearranged once a
// call), so one TDPBF16PS multiplies 16 weight rows with every row of x. vdpbf16ps runs out of compute
// at 4 or more rows of x (each weight used M times); AMX does not, and streams the weights at the same
// speed at 1 to 16 rows.
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <vector>

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


// -- AMX -----------------------------------------------------------------------------------------------
constexpr int AMX_ROWS = 16;     // x rows a B tile holds
constexpr int AMX_BLOCKS = 3;    // 16-row weight blocks in flight: 3 C + 3 A + 1 B of the 8 tiles

struct TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

void load_tile_config(int M) {
    TileConfig cfg;
    for (int t = 0; t < 7; t++) cfg.rows[t] = 16;
    for (int t = 0; t < AMX_BLOCKS; t++) cfg.colsb[t] = (uint16_t)(M * 4);  // C: 16 n x M fp32
    for (int t = 3; t < 3 + AMX_BLOCKS; t++) cfg.colsb[t] = 64;           // A: 16 n x 32 k bf16
    cfg.colsb[6] = (uint16_t)(M * 4);                                      // B: 16 k pairs x M
    cfg.rows[6] = 16;
    _tile_loadconfig(&cfg);
}

// One block of 16 * AMX_BLOCKS weight rows: C += A (weights) . B (x), over K in steps of 32. ``w`` rows
// are ``ld`` elements apart; ``kfull`` is K rounded down to 32; the rest of K comes from ``tail``, the
// same rows zero-padded to 32 columns (prepared by the caller).
void amx_block(const uint16_t* w, int64_t ld, const uint32_t* xv, int M, int64_t kfull, const uint16_t* tail,
               float* c) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    for (int64_t k = 0; k < kfull; k += 32) {
        _tile_loadd(6, xv + (k / 2) * M, M * 4);
        _tile_loadd(3, w + k, ld * 2);
        _tile_dpbf16ps(0, 3, 6);
        _tile_loadd(4, w + 16 * ld + k, ld * 2);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(5, w + 32 * ld + k, ld * 2);
        _tile_dpbf16ps(2, 5, 6);
    }
    if (tail) {
        _tile_loadd(6, xv + (kfull / 2) * M, M * 4);
        _tile_loadd(3, tail, 64);
        _tile_dpbf16ps(0, 3, 6);
        _tile_loadd(4, tail + 16 * 32, 64);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(5, tail + 32 * 32, 64);
        _tile_dpbf16ps(2, 5, 6);
    }
    _tile_stored(0, c, M * 4);
    _tile_stored(1, c + 16 * M, M * 4);
    _tile_stored(2, c + 32 * M, M * 4);
}

// C (rows x M, fp32) into y (M x N, bf16): times the row's scale (int8) and plus its bias, where given.
void store_rows(const float* c, int rows, int M, const uint16_t* scales, const uint16_t* bias, uint16_t* y,
                int64_t N, int64_t n0) {
    for (int i = 0; i < rows; i++)
        for (int m = 0; m < M; m++) {
            float sum = c[i * M + m];
            if (scales) sum *= from_bf16(scales[n0 + i]);
            if (bias) sum += from_bf16(bias[n0 + i]);
            y[m * N + n0 + i] = to_bf16(sum);
        }
}

// Rows [n0, n0 + rows) of w, rows <= 48. A last block shorter than 48 rows is computed as the 48 rows
// ending at row N (its first rows are the previous block's, computed again and not stored), so that no
// tile reads past row N without copying the weights; only a matrix of fewer than 48 rows is copied,
// zero-padded. The K tail comes from a zero-padded copy of the block's last K % 32 columns.
void amx_rows(const uint16_t* w, const uint16_t* bias, uint16_t* y, int64_t K, int64_t N, int M,
              const uint32_t* xv, int64_t n0, int rows) {
    constexpr int step = 16 * AMX_BLOCKS;
    const int64_t kfull = K / 32 * 32;
    const int64_t start = rows < step && N >= step ? N - step : n0;
    const int held = (int)(N - start < step ? N - start : step);  // rows of w the block covers
    alignas(64) uint16_t tail[step * 32];
    alignas(64) float c[step * AMX_ROWS];
    const uint16_t* tail_ptr = nullptr;
    if (K > kfull) {
        memset(tail, 0, sizeof tail);
        for (int r = 0; r < held; r++) memcpy(tail + r * 32, w + (start + r) * K + kfull, (K - kfull) * 2);
        tail_ptr = tail;
    }
    if (held == step) {
        amx_block(w + start * K, K, xv, M, kfull, tail_ptr, c);
    } else {  // N < 48
        std::vector<uint16_t> block((size_t)step * (kfull > 0 ? kfull : 32), 0);
        for (int r = 0; r < held; r++) memcpy(block.data() + r * kfull, w + (start + r) * K, kfull * 2);
        amx_block(block.data(), kfull > 0 ? kfull : 32, xv, M, kfull, tail_ptr, c);
    }
    store_rows(c + (n0 - start) * M, rows, M, nullptr, bias, y, N, n0);
}

// int8 weights on AMX: each 16 x 32 block widened to bf16 (exact for -127..127) in a scratch tile, so
// the product is x . (w as bf16), scaled per row n afterwards.
void int8_amx_rows(const int8_t* w, const uint16_t* scales, const uint16_t* bias, uint16_t* y, int64_t K,
                   int64_t N, int M, const uint32_t* xv, int64_t n0, int rows) {
    alignas(64) uint16_t a[AMX_BLOCKS][16 * 32];
    alignas(64) float c[16 * AMX_BLOCKS * AMX_ROWS];
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    for (int64_t k = 0; k < K; k += 32) {
        const __mmask32 mask = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (K - k)) - 1);
        for (int b = 0; b < AMX_BLOCKS; b++)
            for (int r = 0; r < 16; r++) {
                const int row = b * 16 + r;
                __m512i wide = _mm512_setzero_si512();
                if (row < rows) {
                    const int8_t* src = w + (n0 + row) * K + k;
                    if (k + 32 + 64 <= K && n0 + row + 16 < N) _mm_prefetch((const char*)(src + 16 * K), _MM_HINT_T0);
                    __m256i q = _mm256_maskz_loadu_epi8(mask, src);
                    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
                    __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
                    wide = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
                }
                _mm512_store_si512(a[b] + r * 32, wide);
            }
        _tile_loadd(6, xv + (k / 2) * M, M * 4);
        _tile_loadd(3, a[0], 64);
        _tile_dpbf16ps(0, 3, 6);
        _tile_loadd(4, a[1], 64);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(5, a[2], 64);
        _tile_dpbf16ps(2, 5, 6);
    }
    _tile_stored(0, c, M * 4);
    _tile_stored(1, c + 16 * M, M * 4);
    _tile_stored(2, c + 32 * M, M * 4);
    store_rows(c, rows, M, scales, bias, y, N, n0);
}

// x in VNNI pairs: xv[kp][m] = (x[m][2kp], x[m][2kp + 1]), zero past K, K padded to 32
std::vector<uint32_t> vnni_pairs(const uint16_t* x, int64_t K, int M) {
    const int64_t kpad = (K + 31) / 32 * 32;
    std::vector<uint32_t> xv((size_t)(kpad / 2) * M, 0);
    for (int m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) {
            uint16_t* pair = (uint16_t*)&xv[(k / 2) * M + m];
            pair[k & 1] = x[m * K + k];
        }
    return xv;
}

// Blocks of 16 * AMX_BLOCKS weight rows over torch's threads; ``rows_fn(n0, rows)`` does one.
template <typename RowsFn>
void amx_over_blocks(int64_t N, int M, int threads, RowsFn rows_fn) {
    const int64_t step = 16 * AMX_BLOCKS, blocks = (N + step - 1) / step;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        load_tile_config(M);  // tile state is per thread
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t n0 = b * step;
            rows_fn(n0, (int)(N - n0 < step ? N - n0 : step));
        }
        _tile_release();
    }
}

}  // namespace

extern "C" {

// AMX needs the kernel's permission once per process (Linux 5.16 on); 0 when granted.
int strata_amx_init() { return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */); }

// x [M, K] with 1 <= M <= 16, bf16 weights on AMX; 0, or -1 for M outside 1..16.
int strata_gemv_bf16_amx(const uint16_t* x, const uint16_t* w, const uint16_t* bias, uint16_t* y,
                         int64_t M, int64_t K, int64_t N, int threads) {
    if (M < 1 || M > AMX_ROWS) return -1;
    const std::vector<uint32_t> xv = vnni_pairs(x, K, (int)M);
    amx_over_blocks(N, (int)M, threads, [&](int64_t n0, int rows) {
        amx_rows(w, bias, y, K, N, (int)M, xv.data(), n0, rows);
    });
    return 0;
}

// As strata_gemv_int8, on AMX.
int strata_gemv_int8_amx(const uint16_t* x, const int8_t* w, const uint16_t* scales, const uint16_t* bias,
                         uint16_t* y, int64_t M, int64_t K, int64_t N, int threads) {
    if (M < 1 || M > AMX_ROWS) return -1;
    const std::vector<uint32_t> xv = vnni_pairs(x, K, (int)M);
    amx_over_blocks(N, (int)M, threads, [&](int64_t n0, int rows) {
        int8_amx_rows(w, scales, bias, y, K, N, (int)M, xv.data(), n0, rows);
    });
    return 0;
}

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
