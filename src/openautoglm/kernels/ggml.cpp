// GGML block-quantized weights, computed on as the GGUF file stores them (no conversion, no float copy), as torch
// operators (so that torch.export traces them) with C shims (so that AOTInductor's compiled decode step calls them
// directly; see the end of this file).
//
// openautoglm::ggml_gemv(x (M, K) fp32 or bf16, raw (N, row_bytes) uint8, int qtype, int K, int path=-1)
//     -> (M, N) in x's dtype.  Decode's few rows.  x is quantized to int8 per block of 32 (d = max|x| / 127,
//     q = round_half_even(x * (127 / max|x|))), as llama.cpp quantizes activations for its own dot products, and
//     each weight block is decoded into 32 signed 8-bit codes c with a scale and an offset per half (16 weights),
//     w = d * c + m, so that   y = sum_half (d_w * d_x) * sum(c * q)  +  m * d_x * sum(q)   with exact integer dot
//     products and fp32 accumulation.  Paths: 2 = AVX-512 (BW + VNNI: two 32-weight sub-blocks an instruction,
//     vpdpbusd for the 32-blocks, vpmaddubsw + vpmaddwd with the K-quants' integer scales), 1 = AVX2 (vpmaddubsw,
//     32 weights an instruction), 0 = scalar: the same arithmetic, the tests' reference.
// openautoglm::ggml_dequant(raw (N, row_bytes) uint8, int qtype, int K, int bf16) -> (N, K) fp32 (bit for bit
//     gguf-py's dequantization: the same fp32 operations in the same order) or bf16 (that, rounded to nearest
//     even): for prefill's GEMM, one dequantization a call.
//
// qtype is the ggml type id: Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q4_K 12, Q5_K 13, Q6_K 14.  A row is whole
// blocks (K a multiple of the block size), so rows are independent and split over torch's intra-op threads.
// Compiled as ISO C++ (-std=c++20): no floating-point contraction, which the bit-exact dequantization relies on.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define OAG_X86 1
#endif

namespace {

enum QT : int64_t { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

struct Layout {
    int64_t block, bytes;  // weights and bytes a block
};

constexpr Layout layout(int64_t qt) {
    switch (qt) {
        case Q4_0: return {32, 18};
        case Q4_1: return {32, 20};
        case Q5_0: return {32, 22};
        case Q5_1: return {32, 24};
        case Q8_0: return {32, 34};
        case Q4_K: return {256, 144};
        case Q5_K: return {256, 176};
        case Q6_K: return {256, 210};
        default: return {0, 0};
    }
}

inline float h2f(const uint8_t *p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return c10::detail::fp16_ieee_to_fp32_value(h);
}

inline uint32_t u32(const uint8_t *p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// the 6-bit scale and min of sub-block j of a Q4_K / Q5_K block (ggml's get_scale_min_k4)
inline void scale_min_k4(int j, const uint8_t *q, int &sc, int &mn) {
    if (j < 4) {
        sc = q[j] & 63;
        mn = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// all 8 scales (bytes 0-7) and mins (bytes 8-15) of a Q4_K / Q5_K block from its 12 packed bytes, in 32-bit words
// (llama.cpp's unpacking; the same values as scale_min_k4)
inline void k4_scales_mins(const uint8_t *q, uint8_t out[16]) {
    constexpr uint32_t m6 = 0x3f3f3f3f, lo4 = 0x0f0f0f0f, top2 = 0x03030303;
    uint32_t u[3], o[4];
    std::memcpy(u, q, 12);
    o[0] = u[0] & m6;                                         // scales 0-3
    o[1] = (u[2] & lo4) | (((u[0] >> 6) & top2) << 4);        // scales 4-7
    o[2] = u[1] & m6;                                         // mins 0-3
    o[3] = ((u[2] >> 4) & lo4) | (((u[1] >> 6) & top2) << 4); // mins 4-7
    std::memcpy(out, o, 16);
}

// one sub-block of 32 weights: w[i] = d[i / 16] * c[i] + m[i / 16]
struct Sub {
    int8_t c[32];
    float d[2], m[2];
};

// the scales and offsets of sub-block s of block b (the part of a decode that is not the codes)
template <int64_t T>
inline void params(const uint8_t *b, int s, float d[2], float m[2]) {
    if constexpr (T == Q4_0 || T == Q5_0 || T == Q8_0) {
        d[0] = d[1] = h2f(b);
        m[0] = m[1] = 0.0f;
    } else if constexpr (T == Q4_1 || T == Q5_1) {
        d[0] = d[1] = h2f(b);
        m[0] = m[1] = h2f(b + 2);
    } else if constexpr (T == Q4_K || T == Q5_K) {
        int sc, mn;
        scale_min_k4(s, b + 4, sc, mn);
        d[0] = d[1] = h2f(b) * (float)sc;
        m[0] = m[1] = -(h2f(b + 2) * (float)mn);
    } else {  // Q6_K: a scale per 16
        const float D = h2f(b + 208);
        const auto *sc = reinterpret_cast<const int8_t *>(b + 192);
        d[0] = D * (float)sc[2 * s];
        d[1] = D * (float)sc[2 * s + 1];
        m[0] = m[1] = 0.0f;
    }
}

#ifdef OAG_X86
// as params(), the fp16 fields converted by F16C (the same values: fp16 -> fp32 is exact)
__attribute__((target("avx2,fma,f16c"), always_inline)) inline float h2f_fast(const uint8_t *p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

template <int64_t T>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void params_fast(const uint8_t *b, int s, float d[2],
                                                                              float m[2]) {
    if constexpr (T == Q4_0 || T == Q5_0 || T == Q8_0) {
        d[0] = d[1] = h2f_fast(b);
        m[0] = m[1] = 0.0f;
    } else if constexpr (T == Q4_1 || T == Q5_1) {
        d[0] = d[1] = h2f_fast(b);
        m[0] = m[1] = h2f_fast(b + 2);
    } else if constexpr (T == Q4_K || T == Q5_K) {
        int sc, mn;
        scale_min_k4(s, b + 4, sc, mn);
        d[0] = d[1] = h2f_fast(b) * (float)sc;
        m[0] = m[1] = -(h2f_fast(b + 2) * (float)mn);
    } else {
        const float D = h2f_fast(b + 208);
        const auto *sc = reinterpret_cast<const int8_t *>(b + 192);
        d[0] = D * (float)sc[2 * s];
        d[1] = D * (float)sc[2 * s + 1];
        m[0] = m[1] = 0.0f;
    }
}
#endif

template <int64_t T>
constexpr bool has_offset() {
    return T == Q4_1 || T == Q5_1 || T == Q4_K || T == Q5_K;
}

template <int64_t T>
constexpr int subs() {
    return (T == Q4_K || T == Q5_K || T == Q6_K) ? 8 : 1;
}

// the codes of sub-block s, portable
template <int64_t T>
inline void codes_scalar(const uint8_t *b, int s, int8_t *c) {
    if constexpr (T == Q4_0 || T == Q4_1) {
        const uint8_t *qs = b + (T == Q4_0 ? 2 : 4);
        const int off = T == Q4_0 ? 8 : 0;
        for (int j = 0; j < 16; j++) {
            c[j] = (int8_t)((qs[j] & 15) - off);
            c[j + 16] = (int8_t)((qs[j] >> 4) - off);
        }
    } else if constexpr (T == Q5_0 || T == Q5_1) {
        const uint32_t qh = u32(b + (T == Q5_0 ? 2 : 4));
        const uint8_t *qs = b + (T == Q5_0 ? 6 : 8);
        const int off = T == Q5_0 ? 16 : 0;
        for (int j = 0; j < 16; j++) {
            c[j] = (int8_t)(((qs[j] & 15) | (((qh >> j) & 1) << 4)) - off);
            c[j + 16] = (int8_t)(((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - off);
        }
    } else if constexpr (T == Q8_0) {
        std::memcpy(c, b + 2, 32);
    } else if constexpr (T == Q4_K) {
        const uint8_t *q = b + 16 + 32 * (s / 2);
        const int sh = 4 * (s & 1);
        for (int l = 0; l < 32; l++) c[l] = (int8_t)((q[l] >> sh) & 15);
    } else if constexpr (T == Q5_K) {
        const uint8_t *qh = b + 16, *q = b + 48 + 32 * (s / 2);
        const int sh = 4 * (s & 1);
        for (int l = 0; l < 32; l++) c[l] = (int8_t)(((q[l] >> sh) & 15) | (((qh[l] >> s) & 1) << 4));
    } else {  // Q6_K
        const int h = s / 4, u = s % 4;
        const uint8_t *ql = b + h * 64 + (u & 1) * 32, *qh = b + 128 + h * 32;
        const int sh = 4 * (u >> 1);
        for (int l = 0; l < 32; l++) c[l] = (int8_t)((((ql[l] >> sh) & 15) | (((qh[l] >> (2 * u)) & 3) << 4)) - 32);
    }
}

// ---- activations: int8 per block of 32 (256 for the K-quants: llama.cpp's Q8_K) ----
template <int64_t T>
constexpr int64_t xblock() {
    return (T == Q4_K || T == Q5_K || T == Q6_K) ? 256 : 32;
}

struct XQ {
    std::vector<int8_t> q;    // (M, K)
    std::vector<float> d;     // (M, K / qb): one scale a block of qb activations
    std::vector<int32_t> s;   // (M, K / 16): sums of q per 16
    std::vector<float> fs;    // (M, K / 32): d * sum of q per 32 (the offset term of the 32-block SIMD paths)
    std::vector<int16_t> s16, s32;  // (M, K / 16), (M, K / 32): sums of q per 16 and per 32, as int16 (|sum| <= 4064)
};

bool has(const char *f);

#ifdef OAG_X86
// 32 activations times id, rounded to nearest even (cvtps2dq under the default MXCSR: what nearbyint does) into
// int8, and their two sums per 16: the scalar loop's values exactly
__attribute__((target("avx2,fma,f16c"))) void quantize32_avx2(const float *x, float id, int8_t *q, int32_t *sums) {
    const __m256 vid = _mm256_set1_ps(id), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    __m256i v[4];
    for (int i = 0; i < 4; i++)
        v[i] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(x + 8 * i), vid))));
    for (int h = 0; h < 2; h++) {
        const __m256i t = _mm256_add_epi32(v[2 * h], v[2 * h + 1]);
        __m128i u = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
        u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0x4E));
        u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0xB1));
        sums[h] = _mm_cvtsi128_si32(u);
    }
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(q),
                        _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

__attribute__((target("avx2,fma,f16c"))) float absmax_avx2(const float *x, int64_t n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    __m128 r = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    r = _mm_max_ps(r, _mm_movehl_ps(r, r));
    r = _mm_max_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}
#endif

XQ quantize_x(const float *x, int64_t M, int64_t K, int64_t qb) {
    XQ a;
    a.q.resize(M * K);
    a.d.resize(M * K / qb);
    a.s.resize(M * K / 16);
    a.fs.resize(M * K / 32);
    a.s16.resize(M * K / 16);
    a.s32.resize(M * K / 32);
#ifdef OAG_X86
    static const bool simd = has("avx2");
#else
    constexpr bool simd = false;
#endif
    for (int64_t i = 0; i < M * K / qb; i++) {
        const float *xb = x + i * qb;
        float amax = 0.0f;
#ifdef OAG_X86
        if (simd) amax = absmax_avx2(xb, qb);
        else
#endif
            for (int64_t j = 0; j < qb; j++) amax = std::max(amax, std::fabs(xb[j]));
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        a.d[i] = amax / 127.0f;
        for (int64_t h = 0; h < qb / 16; h++) {
#ifdef OAG_X86
            if (simd) {
                if (h % 2 == 0) quantize32_avx2(xb + h * 16, id, a.q.data() + i * qb + h * 16, a.s.data() + i * (qb / 16) + h);
                continue;
            }
#endif
            int32_t sum = 0;
            for (int j = 0; j < 16; j++) {
                const int v = (int)std::nearbyint(std::min(127.0f, std::max(-127.0f, xb[h * 16 + j] * id)));
                a.q[i * qb + h * 16 + j] = (int8_t)v;
                sum += v;
            }
            a.s[i * (qb / 16) + h] = sum;
        }
        for (int64_t h = 0; h < qb / 16; h++) a.s16[i * (qb / 16) + h] = (int16_t)a.s[i * (qb / 16) + h];
        for (int64_t h = 0; h < qb / 32; h++) {
            const int32_t s32 = a.s[i * (qb / 16) + 2 * h] + a.s[i * (qb / 16) + 2 * h + 1];
            a.fs[i * (qb / 32) + h] = a.d[i] * (float)s32;
            a.s32[i * (qb / 32) + h] = (int16_t)s32;
        }
    }
    return a;
}

// The activations of the interleaved kernels, block-major: every activation row's chunk c (activations 32c..32c+31)
// side by side, so a tile of rows reads one block from one place with constant offsets (llama.cpp's repacked
// q8_0x4 for the same reason: a row pointer each does not fit the registers), and each block's integer terms
// precomputed in the form the kernel adds them.
struct XT {
    std::vector<int8_t> q;    // (K / 32, M, 32)
    std::vector<float> d;     // (K / qb, M): one scale a block of qb activations
    std::vector<int32_t> z;   // 32-blocks: (K / 32, M), -Z * sum q; Q6_K: (K / 16, M), -32 * sum q per 16
    std::vector<float> fs;    // Q4_1/Q5_1: (K / 32, M), d * sum q
    std::vector<int16_t> s2;  // Q4_K: (K / 256, M, 8), sum q per 32 (read in pairs: the mins' vpdpwssd)
};

struct Args {
    const uint8_t *raw;
    int64_t rb;  // bytes a row
    const XQ *a;
    int64_t M, N, K;
    float *y;  // (M, N) fp32
    const XT *t = nullptr;  // the interleaved kernels' activations
};

constexpr int X16_ROWS = 16;
constexpr int64_t X16 = 256;  // a type id's flag: the rows are interleaved in groups of 16

// The 16-row interleaved layout of the 32-block types (type id qt | X16), repacked once at load where the
// AVX-512 VNNI path runs: one vpdpbusd multiplies 4 weights of each of 16 rows by 4 broadcast activations, so a
// block of 16 rows is 8 dot instructions, one conversion and one fma per activation row, with no horizontal sums
// (llama.cpp's CPU "repack" layouts, for the same reason). The codes are the stored bytes, moved, never re-encoded:
// a group block (16 rows x one block, as many bytes as the 16 stored blocks) is
//   [d: 16 fp16] [m: 16 fp16, Q4_1/Q5_1] [Q5 fifth bits: 8 x 64-bit lane masks] [codes: 64-byte vectors]
// code vector v holds row r's quant bytes 4v..4v+3 at bytes 4r..4r+3: Q8_0's eight vectors are weights 4v..4v+3;
// Q4/Q5's four hold weights 4v..4v+3 in their low nibbles and 16+4v.. in their high ones (the stored packing),
// so weight group j (weights 4j..4j+3) is vector j % 4's low (j < 4) or high nibbles; Q5 mask j has bit 4r+i set
// where row r's weight 4j+i has its fifth bit.
template <int64_t T> constexpr int raw_m() { return T == Q4_1 || T == Q5_1 ? 2 : -1; }
template <int64_t T> constexpr int raw_qh() { return T == Q5_0 ? 2 : T == Q5_1 ? 4 : -1; }
template <int64_t T> constexpr int raw_qs() { return T == Q4_0 ? 2 : T == Q4_1 ? 4 : T == Q5_0 ? 6 : T == Q5_1 ? 8 : 2; }
template <int64_t T> constexpr int x_qh() { return raw_m<T>() >= 0 ? 64 : 32; }
template <int64_t T> constexpr int x_codes() { return x_qh<T>() + (raw_qh<T>() >= 0 ? 64 : 0); }
template <int64_t T> constexpr int code_vectors() { return T == Q8_0 ? 8 : 4; }

// The K-quants' group block. Q4_K (16 x 144 bytes): [d: 16 fp16] [dmin: 16 fp16] [scales: 12 planes of 16
// bytes, plane p holding each row's packed scale byte p] [codes: 32 vectors; vector 8j + i holds row r's quant
// bytes 32j + 4i .. +3, so its low nibbles are sub-block 2j's weights 4i.., its high nibbles sub-block 2j + 1's].
// Q6_K (16 x 210 bytes): [d: 16 fp16] [scales: 16 planes, plane p each row's int8 scale of weights 16p..16p+15]
// [low nibbles: 32 vectors; vector v holds weight group v (weights 4v..4v+3) in its low nibbles, group v + 32 in
// its high] [fifth and sixth bits: 16 vectors; vector u holds groups u, u + 16, u + 32, u + 48 in bit pairs 0-1,
// 2-3, 4-5, 6-7]. The 6-bit codes are the stored ones (decoded from ql/qh and encoded back: a bijection).
// a Q6_K block's 256 stored 6-bit codes (0..63) out of ql/qh, and back (llama.cpp's packing: weight
// 128h + 32u + l has its low nibble in ql[64h + l + 32(u & 1)] (the high nibble for u >= 2), its top bits in
// qh[32h + l] at bits 2u..2u+1)
inline void q6_codes(const uint8_t *blk, uint8_t q[256]) {
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            const uint8_t a = blk[64 * h + l], b = blk[64 * h + 32 + l], c = blk[128 + 32 * h + l];
            q[128 * h + l] = (uint8_t)((a & 15) | ((c & 3) << 4));
            q[128 * h + 32 + l] = (uint8_t)((b & 15) | (((c >> 2) & 3) << 4));
            q[128 * h + 64 + l] = (uint8_t)((a >> 4) | (((c >> 4) & 3) << 4));
            q[128 * h + 96 + l] = (uint8_t)((b >> 4) | (((c >> 6) & 3) << 4));
        }
}

inline void q6_store(const uint8_t q[256], uint8_t *blk) {
    for (int h = 0; h < 2; h++)
        for (int l = 0; l < 32; l++) {
            const uint8_t q1 = q[128 * h + l], q2 = q[128 * h + 32 + l], q3 = q[128 * h + 64 + l], q4 = q[128 * h + 96 + l];
            blk[64 * h + l] = (uint8_t)((q1 & 15) | ((q3 & 15) << 4));
            blk[64 * h + 32 + l] = (uint8_t)((q2 & 15) | ((q4 & 15) << 4));
            blk[128 + 32 * h + l] = (uint8_t)((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
        }
}

template <int64_t T>
void x16_pack_kblock(const uint8_t *const src[X16_ROWS], uint8_t *dst) {
    if constexpr (T == Q4_K) {
        for (int r = 0; r < X16_ROWS; r++) {
            std::memcpy(dst + 2 * r, src[r], 2);
            std::memcpy(dst + 32 + 2 * r, src[r] + 2, 2);
            for (int p = 0; p < 12; p++) dst[64 + 16 * p + r] = src[r][4 + p];
            for (int v = 0; v < 32; v++) std::memcpy(dst + 256 + 64 * v + 4 * r, src[r] + 16 + 4 * v, 4);
        }
    } else {  // Q6_K
        for (int r = 0; r < X16_ROWS; r++) {
            std::memcpy(dst + 2 * r, src[r] + 208, 2);
            for (int p = 0; p < 16; p++) dst[32 + 16 * p + r] = src[r][192 + p];
            uint8_t q[256];
            q6_codes(src[r], q);
            for (int v = 0; v < 32; v++)  // weight groups v (low nibbles) and v + 32 (high)
                for (int i = 0; i < 4; i++)
                    dst[288 + 64 * v + 4 * r + i] = (uint8_t)((q[4 * v + i] & 15) | ((q[4 * (v + 32) + i] & 15) << 4));
            for (int u = 0; u < 16; u++)  // weight groups u, u + 16, u + 32, u + 48: bit pairs 0-1 .. 6-7
                for (int i = 0; i < 4; i++)
                    dst[2336 + 64 * u + 4 * r + i] = (uint8_t)((q[4 * u + i] >> 4) | ((q[4 * (u + 16) + i] >> 4) << 2) |
                                                               ((q[4 * (u + 32) + i] >> 4) << 4) |
                                                               ((q[4 * (u + 48) + i] >> 4) << 6));
        }
    }
}

template <int64_t T>
void x16_unpack_kblock(const uint8_t *g, int r, uint8_t *blk) {
    if constexpr (T == Q4_K) {
        std::memcpy(blk, g + 2 * r, 2);
        std::memcpy(blk + 2, g + 32 + 2 * r, 2);
        for (int p = 0; p < 12; p++) blk[4 + p] = g[64 + 16 * p + r];
        for (int v = 0; v < 32; v++) std::memcpy(blk + 16 + 4 * v, g + 256 + 64 * v + 4 * r, 4);
    } else {  // Q6_K
        std::memcpy(blk + 208, g + 2 * r, 2);
        for (int p = 0; p < 16; p++) blk[192 + p] = g[32 + 16 * p + r];
        uint8_t q[256];
        for (int v = 0; v < 32; v++)
            for (int i = 0; i < 4; i++) {
                const uint8_t lo = g[288 + 64 * v + 4 * r + i];
                q[4 * v + i] = lo & 15;
                q[4 * (v + 32) + i] = lo >> 4;
            }
        for (int u = 0; u < 16; u++)
            for (int i = 0; i < 4; i++) {
                const uint8_t hi = g[2336 + 64 * u + 4 * r + i];
                for (int p = 0; p < 4; p++) q[4 * (u + 16 * p) + i] |= (uint8_t)(((hi >> (2 * p)) & 3) << 4);
            }
        q6_store(q, blk);
    }
}

template <int64_t T>
void x16_pack_block(const uint8_t *const src[X16_ROWS], uint8_t *dst) {
    if constexpr (T == Q4_K || T == Q6_K) return x16_pack_kblock<T>(src, dst);
    for (int r = 0; r < X16_ROWS; r++) {
        std::memcpy(dst + 2 * r, src[r], 2);
        if constexpr (raw_m<T>() >= 0) std::memcpy(dst + 32 + 2 * r, src[r] + raw_m<T>(), 2);
        for (int v = 0; v < code_vectors<T>(); v++)
            std::memcpy(dst + x_codes<T>() + 64 * v + 4 * r, src[r] + raw_qs<T>() + 4 * v, 4);
    }
    if constexpr (raw_qh<T>() >= 0)
        for (int j = 0; j < 8; j++) {
            uint64_t mask = 0;
            for (int r = 0; r < X16_ROWS; r++) mask |= (uint64_t)((u32(src[r] + raw_qh<T>()) >> (4 * j)) & 15u) << (4 * r);
            std::memcpy(dst + x_qh<T>() + 8 * j, &mask, 8);
        }
}

template <int64_t T>
void x16_unpack_block(const uint8_t *g, int r, uint8_t *blk) {
    if constexpr (T == Q4_K || T == Q6_K) return x16_unpack_kblock<T>(g, r, blk);
    std::memcpy(blk, g + 2 * r, 2);
    if constexpr (raw_m<T>() >= 0) std::memcpy(blk + raw_m<T>(), g + 32 + 2 * r, 2);
    for (int v = 0; v < code_vectors<T>(); v++) std::memcpy(blk + raw_qs<T>() + 4 * v, g + x_codes<T>() + 64 * v + 4 * r, 4);
    if constexpr (raw_qh<T>() >= 0) {
        uint32_t qh = 0;
        for (int j = 0; j < 8; j++) {
            uint64_t mask;
            std::memcpy(&mask, g + x_qh<T>() + 8 * j, 8);
            qh |= (uint32_t)((mask >> (4 * r)) & 15u) << (4 * j);
        }
        std::memcpy(blk + raw_qh<T>(), &qh, 4);
    }
}

// rows g0 * 16 .. g1 * 16 of (N, rb) stored blocks, interleaved in place (tmp: 16 rows' bytes)
template <int64_t T>
void x16_pack_groups(uint8_t *raw, int64_t rb, int64_t nb, int64_t g0, int64_t g1) {
    constexpr int64_t bytes = layout(T).bytes;
    std::vector<uint8_t> tmp(X16_ROWS * rb);
    for (int64_t gi = g0; gi < g1; gi++) {
        uint8_t *grp = raw + gi * X16_ROWS * rb;
        std::memcpy(tmp.data(), grp, tmp.size());
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *src[X16_ROWS];
            for (int r = 0; r < X16_ROWS; r++) src[r] = tmp.data() + r * rb + b * bytes;
            x16_pack_block<T>(src, grp + b * X16_ROWS * bytes);
        }
    }
}

// stored row n (as the GGUF file has it) out of the interleaved (N, rb)
template <int64_t T>
void x16_unpack_row(const uint8_t *raw, int64_t rb, int64_t nb, int64_t n, uint8_t *row) {
    constexpr int64_t bytes = layout(T).bytes;
    const uint8_t *grp = raw + (n / X16_ROWS) * X16_ROWS * rb;
    for (int64_t b = 0; b < nb; b++) x16_unpack_block<T>(grp + b * X16_ROWS * bytes, (int)(n % X16_ROWS), row + b * bytes);
}

template <int64_t T>
void rows_scalar(const Args &g, int64_t n0, int64_t n1) {
    const Layout L = layout(T);
    const int64_t nb = g.K / L.block;
    Sub sb;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = g.raw + n * g.rb;
        for (int64_t mi = 0; mi < g.M; mi++) {
            const int8_t *xq = g.a->q.data() + mi * g.K;
            const float *xd = g.a->d.data() + mi * (g.K / xblock<T>());
            const int32_t *xs = g.a->s.data() + mi * (g.K / 16);
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = row + b * L.bytes;
                for (int s = 0; s < subs<T>(); s++) {
                    const int64_t k0 = b * L.block + s * 32, i32 = k0 / 32, ix = k0 / xblock<T>();
                    codes_scalar<T>(blk, s, sb.c);
                    params<T>(blk, s, sb.d, sb.m);
                    for (int h = 0; h < 2; h++) {
                        int32_t dot = 0;
                        for (int l = 0; l < 16; l++) dot += (int32_t)sb.c[h * 16 + l] * xq[k0 + h * 16 + l];
                        acc += (sb.d[h] * xd[ix]) * (float)dot;
                        if (has_offset<T>()) acc += (sb.m[h] * xd[ix]) * (float)xs[2 * i32 + h];
                    }
                }
            }
            g.y[mi * g.N + n] = acc;
        }
    }
}

#ifdef OAG_X86
#define OAG_AVX2 __attribute__((target("avx2,fma,f16c"), always_inline)) inline

OAG_AVX2 __m256i nibbles(const uint8_t *qs) {  // 16 bytes -> low nibbles (weights 0-15), then high (16-31)
    // a broadcast load and a blend: no cross-lane shuffle (port 5 is what these loops run out of)
    const __m256i b = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i *>(qs)));
    return _mm256_and_si256(_mm256_blend_epi32(b, _mm256_srli_epi16(b, 4), 0xF0), _mm256_set1_epi8(15));
}

OAG_AVX2 __m256i bits32(uint32_t v, char bit) {  // byte i = `bit` where bit i of v is set, else 0
    const __m256i sel = _mm256_set_epi64x(0x0303030303030303LL, 0x0202020202020202LL, 0x0101010101010101LL, 0);
    const __m256i mask = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    const __m256i t = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)v), sel), mask);
    return _mm256_and_si256(_mm256_cmpeq_epi8(t, mask), _mm256_set1_epi8(bit));
}

OAG_AVX2 __m256i ld32(const uint8_t *p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)); }

template <int64_t T>
OAG_AVX2 __m256i codes_avx2(const uint8_t *b, int s) {
    if constexpr (T == Q4_0) {
        return _mm256_sub_epi8(nibbles(b + 2), _mm256_set1_epi8(8));
    } else if constexpr (T == Q4_1) {
        return nibbles(b + 4);
    } else if constexpr (T == Q5_0) {
        return _mm256_sub_epi8(_mm256_or_si256(nibbles(b + 6), bits32(u32(b + 2), 16)), _mm256_set1_epi8(16));
    } else if constexpr (T == Q5_1) {
        return _mm256_or_si256(nibbles(b + 8), bits32(u32(b + 4), 16));
    } else if constexpr (T == Q8_0) {
        return ld32(b + 2);
    } else if constexpr (T == Q4_K || T == Q5_K) {
        const __m256i q = ld32(b + (T == Q4_K ? 16 : 48) + 32 * (s / 2));
        __m256i c = _mm256_and_si256(s & 1 ? _mm256_srli_epi16(q, 4) : q, _mm256_set1_epi8(15));
        if constexpr (T == Q5_K) {
            const __m256i bit = _mm256_set1_epi8((char)(1 << s));
            const __m256i hb = _mm256_cmpeq_epi8(_mm256_and_si256(ld32(b + 16), bit), bit);
            c = _mm256_or_si256(c, _mm256_and_si256(hb, _mm256_set1_epi8(16)));
        }
        return c;
    } else {  // Q6_K
        const int h = s / 4, u = s % 4;
        __m256i ql = ld32(b + h * 64 + (u & 1) * 32);
        if (u >> 1) ql = _mm256_srli_epi16(ql, 4);
        ql = _mm256_and_si256(ql, _mm256_set1_epi8(15));
        __m256i qh = _mm256_and_si256(_mm256_srli_epi16(ld32(b + 128 + h * 32), 2 * u), _mm256_set1_epi8(3));
        qh = _mm256_slli_epi16(qh, 4);
        return _mm256_sub_epi8(_mm256_or_si256(ql, qh), _mm256_set1_epi8(32));
    }
}

OAG_AVX2 float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// sum of c * q in 8 int32 lanes (lane i: weights 4i..4i+3): |c| as unsigned times q with c's sign
#define OAG_DOT_BODY                                                                      \
    const __m256i ac = _mm256_sign_epi8(c, c), sq = _mm256_sign_epi8(q, c);

__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256i dot_avx2(__m256i c, __m256i q) {
    OAG_DOT_BODY
    return _mm256_madd_epi16(_mm256_maddubs_epi16(ac, sq), _mm256_set1_epi16(1));
}

__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni"), always_inline)) inline __m256i dot_vnni(
    __m256i c, __m256i q) {
    OAG_DOT_BODY
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), ac, sq);
}

// software prefetch distance on the weight stream (a thread's rows are one contiguous stream): the hardware
// prefetchers alone gave 8-11 GB/s on 2 Xeon cores, 8 KB ahead 13-17 (DRAM: ~20 for a plain sum)
constexpr int64_t PF_AHEAD = 8192;

// R rows at a time (2: 4 was slower, 1 slower on the K-quants): each sub-block of activations is loaded once for R
// rows, and the R accumulation chains are independent. A macro, once per target: a
// function compiled for AVX512-VNNI cannot be inlined into an AVX2 one.
#define OAG_ROWS_R(DOT) \
    const Layout L = layout(T);                                                                                    \
    const int64_t nb = g.K / L.block;                                                                              \
    const uint8_t *row[R];                                                                                         \
    for (int r = 0; r < R; r++) row[r] = g.raw + (n + r) * g.rb;                                                   \
    for (int64_t mi = 0; mi < g.M; mi++) {                                                                         \
        const int8_t *xq = g.a->q.data() + mi * g.K;                                                               \
        const float *xd = g.a->d.data() + mi * (g.K / 32);                                                         \
        const float *xs = g.a->fs.data() + mi * (g.K / 32);                                                        \
        __m256 acc[R];                                                                                             \
        float macc[R];                                                                                             \
        for (int r = 0; r < R; r++) {                                                                              \
            acc[r] = _mm256_setzero_ps();                                                                          \
            macc[r] = 0.0f;                                                                                        \
        }                                                                                                          \
        for (int64_t b = 0; b < nb; b++) {                                                                         \
            _mm_prefetch(reinterpret_cast<const char *>(row[0] + b * L.bytes + PF_AHEAD), _MM_HINT_T0);           \
_Pragma("GCC unroll 8")                                                                                            \
            for (int s = 0; s < subs<T>(); s++) {                                                                  \
                const int64_t i32 = b * (L.block / 32) + s;                                                        \
                const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xq + i32 * 32));            \
                const float dx = xd[i32];                                                                          \
_Pragma("GCC unroll 4")                                                                                            \
                for (int r = 0; r < R; r++) {                                                                      \
                    const uint8_t *blk = row[r] + b * L.bytes;                                                     \
                    float d[2], m[2];                                                                              \
                    params_fast<T>(blk, s, d, m);                                                                  \
                    const __m256i c = codes_avx2<T>(blk, s);                                                       \
                    const __m256i p = DOT(c, q);                                                                   \
                    const __m256 dd = T == Q6_K ? _mm256_set_m128(_mm_set1_ps(d[1] * dx), _mm_set1_ps(d[0] * dx))  \
                                                : _mm256_set1_ps(d[0] * dx);                                       \
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), dd, acc[r]);                                   \
                    if constexpr (has_offset<T>()) macc[r] += m[0] * xs[i32]; /* one offset a sub-block */         \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
        for (int r = 0; r < R; r++) g.y[mi * g.N + n + r] = hsum(acc[r]) + macc[r];                                \
    }                                                                                                              \

template <int64_t T, int R>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void rows_r_avx2(const Args &g, int64_t n) {
    OAG_ROWS_R(dot_avx2)
}

template <int64_t T, int R>
__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni"), always_inline)) inline void rows_r_vnni(
    const Args &g, int64_t n) {
    OAG_ROWS_R(dot_vnni)
}

// K-quants, llama.cpp's way: unsigned codes (Q6_K's without its -32) times the activations in vpmaddubsw pairs,
// the pairs summed with the sub-block's integer scale in vpmaddwd, so that a whole 256-block accumulates in
// int32 and takes one fp32 multiply-add (D * d_x); the offsets (Q4_K/Q5_K mins, Q6_K's -32) come from the
// activations' sums per 32 (per 16 for Q6_K) in one integer dot a block. Exact in int32: a pair is at most
// 2 * 63 * 127, a block's lane sum at most 8 * 2 * 16002 * 127.
template <int64_t T>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256i codes_k_unsigned(const uint8_t *b, int s) {
    if constexpr (T == Q6_K) return _mm256_add_epi8(codes_avx2<T>(b, s), _mm256_set1_epi8(32));
    else return codes_avx2<T>(b, s);
}

template <int64_t T, int R>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void rows_k_r(const Args &g, int64_t n) {
    const int64_t nb = g.K / 256, bytes = layout(T).bytes;
    const uint8_t *row[R];
    for (int r = 0; r < R; r++) row[r] = g.raw + (n + r) * g.rb;
    for (int64_t mi = 0; mi < g.M; mi++) {
        const int8_t *xq = g.a->q.data() + mi * g.K;
        const float *xd = g.a->d.data() + mi * nb;
        const int16_t *x16 = g.a->s16.data() + mi * (g.K / 16), *x32 = g.a->s32.data() + mi * (g.K / 32);
        __m256 acc[R];
        __m128 macc[R];
        for (int r = 0; r < R; r++) {
            acc[r] = _mm256_setzero_ps();
            macc[r] = _mm_setzero_ps();
        }
        for (int64_t b = 0; b < nb; b++) {
            _mm_prefetch(reinterpret_cast<const char *>(row[0] + b * bytes + PF_AHEAD), _MM_HINT_T0);
            const float dx = xd[b];
            for (int r = 0; r < R; r++) {
                const uint8_t *blk = row[r] + b * bytes;
                alignas(16) uint8_t sm[16];
                float D, Dm = 0.0f;
                __m128i off;  // the block's offset term in 4 int32 lanes
                if constexpr (T == Q6_K) {
                    const __m256i s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(blk + 192)));
                    const __m256i p = _mm256_madd_epi16(s16, _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x16 + b * 16)));
                    off = _mm_add_epi32(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
                    std::memcpy(sm, blk + 192, 16);
                    D = h2f_fast(blk + 208);
                } else {
                    k4_scales_mins(blk + 4, sm);
                    const __m128i mins = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(sm + 8)));
                    off = _mm_madd_epi16(mins, _mm_loadu_si128(reinterpret_cast<const __m128i *>(x32 + b * 8)));
                    D = h2f_fast(blk);
                    Dm = h2f_fast(blk + 2);
                }
                __m256i ai = _mm256_setzero_si256();
#pragma GCC unroll 8
                for (int s = 0; s < 8; s++) {
                    const __m256i c = codes_k_unsigned<T>(blk, s);
                    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xq + b * 256 + s * 32));
                    const __m256i sv = T == Q6_K ? _mm256_set_m128i(_mm_set1_epi16((int8_t)sm[2 * s + 1]),
                                                                    _mm_set1_epi16((int8_t)sm[2 * s]))
                                                 : _mm256_set1_epi16(sm[s]);  // one scale a sub-block
                    ai = _mm256_add_epi32(ai, _mm256_madd_epi16(_mm256_maddubs_epi16(c, q), sv));
                }
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ai), _mm256_set1_ps(D * dx), acc[r]);
                // the offsets: Q4_K/Q5_K -Dmin * m_s per sub-block; Q6_K -32 * D * sc per 16
                macc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(off), _mm_set1_ps(T == Q6_K ? -32.0f * D * dx : -(Dm * dx)),
                                       macc[r]);
            }
        }
        for (int r = 0; r < R; r++) {
            __m128 m = _mm_add_ps(macc[r], _mm_movehl_ps(macc[r], macc[r]));
            m = _mm_add_ss(m, _mm_movehdup_ps(m));
            g.y[mi * g.N + n + r] = hsum(acc[r]) + _mm_cvtss_f32(m);
        }
    }
}

template <int64_t T>
__attribute__((target("avx2,fma,f16c"))) void rows_k(const Args &g, int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) rows_k_r<T, 2>(g, n);
    for (; n < n1; n++) rows_k_r<T, 1>(g, n);
}

// AVX-512BW: the K-quant dot two sub-blocks (64 weights) an instruction, the block's scales spread over the lanes
// by one vpermw a pair.  Same integer arithmetic as rows_k_r; Q6_K's offset (-32 * sum sc * bsum) folds into the
// block's int32 sum (at most 16 * 63 * 127 * 4064 * 32 / 16 < 2^31 in a lane).
#define OAG_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"), always_inline)) inline

// the codes of sub-blocks 2j (low 256 bits) and 2j + 1 (high), unsigned (Q6_K's without its -32)
template <int64_t T>
OAG_AVX512 __m512i codes_k_pair(const uint8_t *b, int j) {
    const __m512i m4 = _mm512_set1_epi8(15);
    if constexpr (T == Q4_K || T == Q5_K) {
        const __m512i q = _mm512_broadcast_i64x4(ld32(b + (T == Q4_K ? 16 : 48) + 32 * j));
        __m512i c = _mm512_and_si512(_mm512_mask_blend_epi64(0xF0, q, _mm512_srli_epi16(q, 4)), m4);
        if constexpr (T == Q5_K) {  // bit 2j (low half) or 2j + 1 (high) of each qh byte, moved to bit 4
            const __m512i h = _mm512_broadcast_i64x4(ld32(b + 16));
            const __m512i hs = _mm512_mask_blend_epi64(0xF0, _mm512_srli_epi16(h, 2 * j), _mm512_srli_epi16(h, 2 * j + 1));
            c = _mm512_or_si512(c, _mm512_slli_epi16(_mm512_and_si512(hs, _mm512_set1_epi8(1)), 4));
        }
        return c;
    } else {  // Q6_K, sub-block s = 2j + t: h = j / 2, u = s % 4 = 2 (j & 1) + t
        const int h = j >> 1, u0 = 2 * (j & 1);
        __m512i ql = _mm512_loadu_si512(b + h * 64);  // the 32 low-nibble bytes of t = 0, then of t = 1
        if (j & 1) ql = _mm512_srli_epi16(ql, 4);
        const __m512i qh0 = _mm512_broadcast_i64x4(ld32(b + 128 + h * 32));
        const __m512i qh = _mm512_mask_blend_epi64(0xF0, _mm512_srli_epi16(qh0, 2 * u0), _mm512_srli_epi16(qh0, 2 * u0 + 2));
        return _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_slli_epi16(_mm512_and_si512(qh, _mm512_set1_epi8(3)), 4));
    }
}

// vpermw indices: lane l of pair j takes scale 2j + l / 16 (Q4_K/Q5_K: one a sub-block) or 4j + l / 8 (Q6_K: one a 16)
struct KIdx {
    alignas(64) int16_t k4[4][32], k6[4][32];
    constexpr KIdx() : k4{}, k6{} {
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 32; l++) {
                k4[j][l] = (int16_t)(2 * j + l / 16);
                k6[j][l] = (int16_t)(4 * j + l / 8);
            }
    }
};
constexpr KIdx KIDX{};

template <int64_t T, int R>
OAG_AVX512 void rows_k512_r(const Args &g, int64_t n) {
    const int64_t nb = g.K / 256, bytes = layout(T).bytes;
    const uint8_t *row[R];
    for (int r = 0; r < R; r++) row[r] = g.raw + (n + r) * g.rb;
    __m512i idx[4];
    for (int j = 0; j < 4; j++)
        idx[j] = _mm512_load_si512(T == Q6_K ? KIDX.k6[j] : KIDX.k4[j]);
    for (int64_t mi = 0; mi < g.M; mi++) {
        const int8_t *xq = g.a->q.data() + mi * g.K;
        const float *xd = g.a->d.data() + mi * nb;
        const int16_t *x16 = g.a->s16.data() + mi * (g.K / 16), *x32 = g.a->s32.data() + mi * (g.K / 32);
        __m512 acc[R];
        __m128 macc[R];
        for (int r = 0; r < R; r++) {
            acc[r] = _mm512_setzero_ps();
            macc[r] = _mm_setzero_ps();
        }
        for (int64_t b = 0; b < nb; b++) {
            _mm_prefetch(reinterpret_cast<const char *>(row[0] + b * bytes + PF_AHEAD), _MM_HINT_T0);
            if (R > 1) _mm_prefetch(reinterpret_cast<const char *>(row[0] + b * bytes + PF_AHEAD + 64), _MM_HINT_T0);
            const float dx = xd[b];
            __m512i qx[4];
            for (int j = 0; j < 4; j++) qx[j] = _mm512_loadu_si512(xq + b * 256 + 64 * j);
            for (int r = 0; r < R; r++) {
                const uint8_t *blk = row[r] + b * bytes;
                __m512i sc;
                __m512i ai = _mm512_setzero_si512();
                float D;
                if constexpr (T == Q6_K) {
                    const __m256i s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(blk + 192)));
                    sc = _mm512_castsi256_si512(s16);
                    const __m256i off = _mm256_madd_epi16(s16, _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x16 + b * 16)));
                    ai = _mm512_zextsi256_si512(_mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(off, 5)));
                    D = h2f_fast(blk + 208);
                } else {
                    alignas(16) uint8_t sm[16];
                    k4_scales_mins(blk + 4, sm);
                    const __m256i s16 = _mm256_cvtepu8_epi16(_mm_load_si128(reinterpret_cast<const __m128i *>(sm)));
                    sc = _mm512_castsi256_si512(s16);
                    const __m128i off = _mm_madd_epi16(_mm256_extracti128_si256(s16, 1),
                                                       _mm_loadu_si128(reinterpret_cast<const __m128i *>(x32 + b * 8)));
                    D = h2f_fast(blk);
                    macc[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(off), _mm_set1_ps(-(h2f_fast(blk + 2) * dx)), macc[r]);
                }
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++) {
                    const __m512i p = _mm512_maddubs_epi16(codes_k_pair<T>(blk, j), qx[j]);
                    ai = _mm512_add_epi32(ai, _mm512_madd_epi16(p, _mm512_permutexvar_epi16(idx[j], sc)));
                }
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai), _mm512_set1_ps(D * dx), acc[r]);
            }
        }
        for (int r = 0; r < R; r++) {
            __m128 m = _mm_add_ps(macc[r], _mm_movehl_ps(macc[r], macc[r]));
            m = _mm_add_ss(m, _mm_movehdup_ps(m));
            g.y[mi * g.N + n + r] = _mm512_reduce_add_ps(acc[r]) + _mm_cvtss_f32(m);
        }
    }
}

// Several activation rows (a batched decode step): the same arithmetic as rows_k512_r, in the same order for
// each (activation row, weight row), so the output is bit-identical, but a weight block's codes and scales are
// unpacked once for a tile of MT activation rows instead of once a row (Qwen2.5-0.5B, 16 rows: the unpacking
// was most of a step's GEMV time).
template <int64_t T, int MT>
OAG_AVX512 void rows_k512_tile(const Args &g, int64_t n, int64_t m0) {
    const int64_t nb = g.K / 256, bytes = layout(T).bytes;
    const uint8_t *row = g.raw + n * g.rb;
    __m512i idx[4];
    for (int j = 0; j < 4; j++)
        idx[j] = _mm512_load_si512(T == Q6_K ? KIDX.k6[j] : KIDX.k4[j]);
    __m512 acc[MT];
    __m128 macc[MT];
    for (int t = 0; t < MT; t++) {
        acc[t] = _mm512_setzero_ps();
        macc[t] = _mm_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * bytes;
        _mm_prefetch(reinterpret_cast<const char *>(blk + PF_AHEAD), _MM_HINT_T0);
        __m256i s16;
        float D, Dm = 0.0f;
        if constexpr (T == Q6_K) {
            s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(blk + 192)));
            D = h2f_fast(blk + 208);
        } else {
            alignas(16) uint8_t sm[16];
            k4_scales_mins(blk + 4, sm);
            s16 = _mm256_cvtepu8_epi16(_mm_load_si128(reinterpret_cast<const __m128i *>(sm)));
            D = h2f_fast(blk);
            Dm = h2f_fast(blk + 2);
        }
        const __m512i sc = _mm512_castsi256_si512(s16);
        __m512i cs[4], sp[4];
        for (int j = 0; j < 4; j++) {
            cs[j] = codes_k_pair<T>(blk, j);
            sp[j] = _mm512_permutexvar_epi16(idx[j], sc);
        }
        for (int t = 0; t < MT; t++) {
            const int64_t mi = m0 + t;
            const int8_t *xq = g.a->q.data() + mi * g.K + b * 256;
            const float dx = g.a->d[mi * nb + b];
            __m512i ai;
            if constexpr (T == Q6_K) {
                const int16_t *x16 = g.a->s16.data() + mi * (g.K / 16) + b * 16;
                const __m256i off = _mm256_madd_epi16(s16, _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x16)));
                ai = _mm512_zextsi256_si512(_mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(off, 5)));
            } else {
                const int16_t *x32 = g.a->s32.data() + mi * (g.K / 32) + b * 8;
                const __m128i off = _mm_madd_epi16(_mm256_extracti128_si256(s16, 1),
                                                   _mm_loadu_si128(reinterpret_cast<const __m128i *>(x32)));
                macc[t] = _mm_fmadd_ps(_mm_cvtepi32_ps(off), _mm_set1_ps(-(Dm * dx)), macc[t]);
                ai = _mm512_setzero_si512();
            }
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                const __m512i p = _mm512_maddubs_epi16(cs[j], _mm512_loadu_si512(xq + 64 * j));
                ai = _mm512_add_epi32(ai, _mm512_madd_epi16(p, sp[j]));
            }
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai), _mm512_set1_ps(D * dx), acc[t]);
        }
    }
    for (int t = 0; t < MT; t++) {
        __m128 m = _mm_add_ps(macc[t], _mm_movehl_ps(macc[t], macc[t]));
        m = _mm_add_ss(m, _mm_movehdup_ps(m));
        g.y[(m0 + t) * g.N + n] = _mm512_reduce_add_ps(acc[t]) + _mm_cvtss_f32(m);
    }
}

// AVX-512 VNNI, 32-blocks two at a time: one vpdpbusd on 64 weights, the codes unsigned (see dot_init).
// codes_u2: the unsigned codes (stored values: 0-15, 0-31) of two 32-blocks in one zmm: the 16 quant bytes of each
// broadcast to both halves of a 256-bit lane, the high halves shifted down a nibble; Q5's fifth bits straight from
// the 32-bit qh as a byte mask
template <int64_t T>
OAG_AVX512 __m512i codes_u2(const uint8_t *b0, const uint8_t *b1) {
    constexpr int qs = T == Q4_0 ? 2 : T == Q4_1 ? 4 : T == Q5_0 ? 6 : 8;
    const __m256i a0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i *>(b0 + qs)));
    const __m256i a1 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i *>(b1 + qs)));
    const __m512i t = _mm512_inserti64x4(_mm512_castsi256_si512(a0), a1, 1);
    __m512i c = _mm512_and_si512(_mm512_mask_blend_epi64(0xCC, t, _mm512_srli_epi16(t, 4)), _mm512_set1_epi8(15));
    if constexpr (T == Q5_0 || T == Q5_1) {
        constexpr int qh = T == Q5_0 ? 2 : 4;
        const __mmask64 hb = (__mmask64)u32(b0 + qh) | ((__mmask64)u32(b1 + qh) << 32);
        c = _mm512_mask_add_epi8(c, hb, c, _mm512_set1_epi8(16));
    }
    return c;
}

// Q4_0 / Q5_0 / Q8_0: w = d (u - Z), with u the unsigned code (Q4_0/Q5_0: as stored; Q8_0: the signed code + 128),
// so a block's dot is exact in int32 as vpdpbusd(u, q) - Z * sum(q): the dot starts from -Z * sum(q) (lane 0 of
// each block's half) instead of from zero, and no float term is left for the zero point. Q4_1 / Q5_1 (w = d u + m,
// m a float of its own) keep m * d_x * sum(q) in a float accumulator.
template <int64_t T>
constexpr int zero_point() { return T == Q4_0 ? 8 : T == Q5_0 ? 16 : T == Q8_0 ? 128 : 0; }

template <int64_t T>
constexpr bool float_offset() { return T == Q4_1 || T == Q5_1; }

// the dot's starting value for activation blocks b and b + 1 (their int sums in s32)
template <int64_t T>
OAG_AVX512 __m512i dot_init(const int16_t *s32, int64_t b, bool two) {
    constexpr int Z = zero_point<T>();
    if constexpr (Z == 0) return _mm512_setzero_si512();
    else return _mm512_mask_set1_epi32(_mm512_maskz_set1_epi32(0x0001, -Z * s32[b]), 0x0100, two ? -Z * s32[b + 1] : 0);
}

// the unsigned codes u of two blocks, in one zmm
template <int64_t T>
OAG_AVX512 __m512i codes_w2(const uint8_t *b0, const uint8_t *b1) {
    if constexpr (T == Q8_0)
        return _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(ld32(b0 + 2)), ld32(b1 + 2), 1),
                                _mm512_set1_epi8((char)0x80));
    else return codes_u2<T>(b0, b1);
}

// the int8 activations of blocks b and b + 1 in one zmm (an odd tail block pairs with zeros)
OAG_AVX512 __m512i x_pair(const int8_t *xq, bool two) {
    const __m256i q0 = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xq));
    const __m256i q1 = two ? _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xq + 32)) : _mm256_setzero_si256();
    return _mm512_inserti64x4(_mm512_castsi256_si512(q0), q1, 1);
}

template <int64_t T, int R>
OAG_AVX512 void rows_b512_r(const Args &g, int64_t n) {
    constexpr int64_t bytes = layout(T).bytes;
    const int64_t nb = g.K / 32;
    const uint8_t *row[R];
    for (int r = 0; r < R; r++) row[r] = g.raw + (n + r) * g.rb;
    for (int64_t mi = 0; mi < g.M; mi++) {
        const int8_t *xq = g.a->q.data() + mi * g.K;
        const float *xd = g.a->d.data() + mi * nb;
        const float *xs = g.a->fs.data() + mi * nb;
        const int16_t *x32 = g.a->s32.data() + mi * nb;
        __m512 acc[R];
        float macc[R];
        for (int r = 0; r < R; r++) {
            acc[r] = _mm512_setzero_ps();
            macc[r] = 0.0f;
        }
        for (int64_t b = 0; b < nb; b += 2) {
            const bool two = b + 1 < nb;  // an odd tail block pairs with zero activations
            _mm_prefetch(reinterpret_cast<const char *>(row[0] + b * bytes + PF_AHEAD), _MM_HINT_T0);
            const float dx0 = xd[b], dx1 = two ? xd[b + 1] : 0.0f;
            const __m512i q = x_pair(xq + b * 32, two);
            const __m512i init = dot_init<T>(x32, b, two);
            for (int r = 0; r < R; r++) {
                const uint8_t *b0 = row[r] + b * bytes, *b1 = two ? b0 + bytes : b0;
                const float d0 = h2f_fast(b0), d1 = h2f_fast(b1);
                const __m512i p = _mm512_dpbusd_epi32(init, codes_w2<T>(b0, b1), q);
                if constexpr (float_offset<T>())  // an explicit fma: the tiled kernels compute the same sum, bit for bit
                    macc[r] += std::fma(h2f_fast(b0 + 2), xs[b], two ? h2f_fast(b1 + 2) * xs[b + 1] : 0.0f);
                const __m512 dd = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d0 * dx0), _mm512_set1_ps(d1 * dx1));
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), dd, acc[r]);
            }
        }
        for (int r = 0; r < R; r++) g.y[mi * g.N + n + r] = _mm512_reduce_add_ps(acc[r]) + macc[r];
    }
}

// rows_b512_r for a tile of NT weight rows x MT activation rows: each block pair's codes unpacked once for the MT
// activation rows, each activation pair (and its dot's starting value) loaded once for the NT weight rows, and the
// per-pair scale vectors built once a row instead of once a product. Per (activation row, weight row) the same
// operations in the same order as rows_b512_r (d * dx is the same product as a scalar or in a lane): the output is
// bit-identical. A 64-weight product is a vpdpbusd, a conversion, a multiply and an fma.
template <int64_t T, int NT, int MT>
OAG_AVX512 void rows_b512_tile2(const Args &g, int64_t n0, int64_t m0) {
    constexpr int64_t bytes = layout(T).bytes;
    const int64_t nb = g.K / 32;
    const uint8_t *row[NT];
    for (int u = 0; u < NT; u++) row[u] = g.raw + (n0 + u) * g.rb;
    __m512 acc[NT][MT];
    float macc[NT][MT];
    for (int u = 0; u < NT; u++)
        for (int t = 0; t < MT; t++) {
            acc[u][t] = _mm512_setzero_ps();
            macc[u][t] = 0.0f;
        }
    for (int64_t b = 0; b < nb; b += 2) {
        const bool two = b + 1 < nb;
        __m512i cw[NT];  // the weight rows' unsigned codes
        __m512 dw[NT];  // d0 in the low 8 lanes, d1 in the high 8
        float o0[NT], o1[NT];
        for (int u = 0; u < NT; u++) {
            const uint8_t *b0 = row[u] + b * bytes, *b1 = two ? b0 + bytes : b0;
            _mm_prefetch(reinterpret_cast<const char *>(b0 + PF_AHEAD), _MM_HINT_T0);
            dw[u] = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(h2f_fast(b0)), _mm512_set1_ps(h2f_fast(b1)));
            cw[u] = codes_w2<T>(b0, b1);
            if constexpr (float_offset<T>()) {
                o0[u] = h2f_fast(b0 + 2);
                o1[u] = two ? h2f_fast(b1 + 2) : 0.0f;
            }
        }
        for (int t = 0; t < MT; t++) {
            const int64_t mi = m0 + t;
            const int8_t *xq = g.a->q.data() + mi * g.K + b * 32;
            const float *xd = g.a->d.data() + mi * nb, *xs = g.a->fs.data() + mi * nb;
            const __m512 dx = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(xd[b]), _mm512_set1_ps(two ? xd[b + 1] : 0.0f));
            const __m512i q = x_pair(xq, two);
            const __m512i init = dot_init<T>(g.a->s32.data() + mi * nb, b, two);
            for (int u = 0; u < NT; u++) {
                const __m512i p = _mm512_dpbusd_epi32(init, cw[u], q);
                if constexpr (float_offset<T>()) macc[u][t] += std::fma(o0[u], xs[b], two ? o1[u] * xs[b + 1] : 0.0f);
                acc[u][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dw[u], dx), acc[u][t]);
            }
        }
    }
    for (int u = 0; u < NT; u++)
        for (int t = 0; t < MT; t++) g.y[(m0 + t) * g.N + n0 + u] = _mm512_reduce_add_ps(acc[u][t]) + macc[u][t];
}

// one activation row: rows_*_r, two weight rows at a time; several: tiles of 4 activation rows a weight row
// (32-blocks: of 4 weight rows x 4 activation rows)
constexpr int64_t TILE_M = 4, TILE_N = 4;

template <int64_t T>
__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"))) void rows_b512(const Args &g, int64_t n0,
                                                                                             int64_t n1) {
    if (g.M > 1) {
        int64_t n = n0;
        for (; n + TILE_N <= n1; n += TILE_N) {
            int64_t m = 0;
            for (; m + TILE_M <= g.M; m += TILE_M) rows_b512_tile2<T, TILE_N, TILE_M>(g, n, m);
            for (; m < g.M; m++) rows_b512_tile2<T, TILE_N, 1>(g, n, m);
        }
        for (; n < n1; n++) {
            int64_t m = 0;
            for (; m + TILE_M <= g.M; m += TILE_M) rows_b512_tile2<T, 1, TILE_M>(g, n, m);
            for (; m < g.M; m++) rows_b512_tile2<T, 1, 1>(g, n, m);
        }
        return;
    }
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) rows_b512_r<T, 2>(g, n);
    for (; n < n1; n++) rows_b512_r<T, 1>(g, n);
}

template <int64_t T>
__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"))) void rows_k512(const Args &g, int64_t n0,
                                                                                             int64_t n1) {
    if (g.M > 1) {
        for (int64_t n = n0; n < n1; n++) {
            int64_t m = 0;
            for (; m + TILE_M <= g.M; m += TILE_M) rows_k512_tile<T, TILE_M>(g, n, m);
            for (; m < g.M; m++) rows_k512_tile<T, 1>(g, n, m);
        }
        return;
    }
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) rows_k512_r<T, 2>(g, n);
    for (; n < n1; n++) rows_k512_r<T, 1>(g, n);
}

template <int64_t T>
__attribute__((target("avx2,fma,f16c"))) void rows_avx2(const Args &g, int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) rows_r_avx2<T, 2>(g, n);
    for (; n < n1; n++) rows_r_avx2<T, 1>(g, n);
}

template <int64_t T>
__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni"))) void rows_vnni(const Args &g, int64_t n0,
                                                                                   int64_t n1) {
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) rows_r_vnni<T, 2>(g, n);
    for (; n < n1; n++) rows_r_vnni<T, 1>(g, n);
}

// p + the dot of N code vectors with the activation words at x (4 bytes each, broadcast). For one activation row
// in two chains (even and odd words) summed at the end: a decode row has no other row's products to overlap with
// vpdpbusd's latency. The integer sum is the same either way (exact), so a batch stays bit for bit its rows.
template <int N, int MT>
OAG_AVX512 __m512i dot_codes(__m512i p, const __m512i *c, const uint8_t *x) {
    if constexpr (MT == 1) {
        __m512i q = _mm512_setzero_si512();
#pragma GCC unroll 8
        for (int i = 0; i < N; i += 2) {
            p = _mm512_dpbusd_epi32(p, c[i], _mm512_set1_epi32((int)u32(x + 4 * i)));
            q = _mm512_dpbusd_epi32(q, c[i + 1], _mm512_set1_epi32((int)u32(x + 4 * i + 4)));
        }
        return _mm512_add_epi32(p, q);
    } else {
#pragma GCC unroll 8
        for (int i = 0; i < N; i++) p = _mm512_dpbusd_epi32(p, c[i], _mm512_set1_epi32((int)u32(x + 4 * i)));
        return p;
    }
}

// The interleaved kernels' activations (XT): quantize_x's values (the same blocks, scales and rounding), block-major
template <int64_t T>
__attribute__((target("avx2,fma,f16c"))) XT quantize_xt(const float *x, int64_t M, int64_t K) {
    constexpr int64_t qb = xblock<T>();
    constexpr int Z = zero_point<T>();
    const int64_t nc = K / 32, nb = K / qb;
    XT a;
    a.q.resize(M * K);
    a.d.resize(M * nb);
    if constexpr (T == Q6_K) a.z.resize(M * K / 16);
    else if constexpr (Z != 0) a.z.resize(M * nc);
    if constexpr (float_offset<T>()) a.fs.resize(M * nc);
    if constexpr (T == Q4_K) a.s2.resize(M * nc);
    auto rows = [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; m++)
            for (int64_t i = 0; i < nb; i++) {
                const float *xb = x + m * K + i * qb;
                const float amax = absmax_avx2(xb, qb);
                const float id = amax > 0.0f ? 127.0f / amax : 0.0f, d = amax / 127.0f;
                a.d[i * M + m] = d;
                for (int64_t h = 0; h < qb / 32; h++) {
                    const int64_t c = i * (qb / 32) + h;
                    int32_t s[2];
                    quantize32_avx2(xb + 32 * h, id, a.q.data() + (c * M + m) * 32, s);
                    const int32_t sum = s[0] + s[1];
                    if constexpr (T == Q6_K) {
                        a.z[2 * c * M + m] = -32 * s[0];
                        a.z[(2 * c + 1) * M + m] = -32 * s[1];
                    } else if constexpr (Z != 0) {
                        a.z[c * M + m] = -Z * sum;
                    }
                    if constexpr (float_offset<T>()) a.fs[c * M + m] = d * (float)sum;
                    if constexpr (T == Q4_K) a.s2[(i * M + m) * 8 + h] = (int16_t)sum;
                }
            }
    };
    if (M * K < 65536) rows(0, M);
    else at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), rows);
    return a;
}

// The GEMV on the interleaved layout: MT activation rows, each 16 weight rows' block unpacked once for all of
// them. Per (activation row, weight row) the block's integer dot starts from -Z * sum(q) and is exact, then
// acc += float(dot) * (d_w * d_x) (Q4_1/Q5_1: then acc += m_w * (d_x * sum(q))), block after block: the same
// operations in the same order whatever MT is, so a batch is bit for bit its rows one by one.
template <int64_t T, int MT>
OAG_AVX512 void rows_x16_tile(const Args &g, int64_t n, int64_t m0) {
    constexpr int64_t gb = X16_ROWS * layout(T).bytes;
    constexpr int Z = zero_point<T>();
    const int64_t nb = g.K / 32, M = g.M;
    const XT &x = *g.t;
    const uint8_t *grp = g.raw + n * g.rb;
    __m512 acc[MT];
    for (int t = 0; t < MT; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gk = grp + b * gb;
        // (no software prefetch: the groups stream in order and the hardware prefetchers keep up; prefetching 8 KiB
        // ahead into L1 cost Zen 4 decode steps 5-14%, measured in one process alternating with and without)
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(gk)));
        __m512i c[8];
        if constexpr (T == Q8_0) {
            for (int j = 0; j < 8; j++)
                c[j] = _mm512_xor_si512(_mm512_loadu_si512(gk + x_codes<T>() + 64 * j), _mm512_set1_epi8((char)0x80));
        } else {
            const __m512i m4 = _mm512_set1_epi8(15);
            for (int v = 0; v < 4; v++) {
                const __m512i w = _mm512_loadu_si512(gk + x_codes<T>() + 64 * v);
                c[v] = _mm512_and_si512(w, m4);
                c[v + 4] = _mm512_and_si512(_mm512_srli_epi16(w, 4), m4);
            }
            if constexpr (raw_qh<T>() >= 0)
                for (int j = 0; j < 8; j++) {
                    uint64_t mk;
                    std::memcpy(&mk, gk + x_qh<T>() + 8 * j, 8);
                    c[j] = _mm512_mask_add_epi8(c[j], (__mmask64)mk, c[j], _mm512_set1_epi8(16));
                }
        }
        __m512 mw;
        if constexpr (float_offset<T>()) mw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(gk + 32)));
        const uint8_t *xq = reinterpret_cast<const uint8_t *>(x.q.data()) + (b * M + m0) * 32;
        const float *xd = x.d.data() + b * M + m0;
#pragma GCC unroll 16
        for (int t = 0; t < MT; t++) {
            __m512i p = _mm512_setzero_si512();
            if constexpr (Z != 0) p = _mm512_set1_epi32(x.z[b * M + m0 + t]);
            p = dot_codes<8, MT>(p, c, xq + 32 * t);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(dw, _mm512_set1_ps(xd[t])), acc[t]);
            if constexpr (float_offset<T>()) acc[t] = _mm512_fmadd_ps(mw, _mm512_set1_ps(x.fs[b * M + m0 + t]), acc[t]);
        }
    }
    for (int t = 0; t < MT; t++) _mm512_storeu_ps(g.y + (m0 + t) * g.N + n, acc[t]);
}

// Q6_K's weight group g (weights 4g .. 4g + 3) of 16 rows as unsigned 6-bit codes: its low nibbles from vector
// g % 32 (the high nibbles past 32), its bit pair from vector g % 16 at bits 2h .. 2h + 1 (h = g / 16), moved to 4-5
OAG_AVX512 __m512i q6k_group(const uint8_t *gk, int grp4) {
    const __m512i lo = _mm512_loadu_si512(gk + 288 + 64 * (grp4 % 32));
    const __m512i hi = _mm512_loadu_si512(gk + 2336 + 64 * (grp4 % 16));
    const int hs = grp4 / 16;
    const __m512i h = hs == 0 ? _mm512_slli_epi16(hi, 4) : hs == 1 ? _mm512_slli_epi16(hi, 2)
                    : hs == 2 ? hi : _mm512_srli_epi16(hi, 2);
    return _mm512_or_si512(_mm512_and_si512(grp4 < 32 ? lo : _mm512_srli_epi16(lo, 4), _mm512_set1_epi8(15)),
                           _mm512_and_si512(h, _mm512_set1_epi8(0x30)));
}

// Q6_K's sub-block sb (16 weights) of one group block into tot, for MT activation rows (rows_x16k_tile)
template <int MT>
OAG_AVX512 void q6k_sub(const uint8_t *gk, int sb, const uint8_t *xq, const int32_t *xz, int64_t M, __m512i *tot) {
    const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(gk + 32 + 16 * sb)));
    __m512i c[4];
    for (int i = 0; i < 4; i++) c[i] = q6k_group(gk, 4 * sb + i);
    const uint8_t *xs = xq + (sb / 2) * M * 32 + 16 * (sb % 2);
    const int32_t *zs = xz + sb * M;
#pragma GCC unroll 16
    for (int t = 0; t < MT; t++) {
        __m512i p = _mm512_set1_epi32(zs[t]);
        p = dot_codes<4, MT>(p, c, xs + 32 * t);
        tot[t] = _mm512_add_epi32(tot[t], _mm512_mullo_epi32(p, sc));
    }
}

template <int64_t T, int MT>
OAG_AVX512 void rows_x16k_tile(const Args &g, int64_t n, int64_t m0) {
    constexpr int64_t gb = X16_ROWS * layout(T).bytes;
    constexpr bool regs = MT <= 8;
    const int64_t nb = g.K / 256, M = g.M, N = g.N;
    const XT &x = *g.t;
    const uint8_t *grp = g.raw + n * g.rb;
    const uint8_t *xq0 = reinterpret_cast<const uint8_t *>(x.q.data());
    const __m512i m4 = _mm512_set1_epi8(15);
    float *yt = g.y + m0 * N + n;  // activation row t's outputs at yt + t * N
    __m512 acc[regs ? MT : 1];
    for (int t = 0; t < MT; t++) {
        if constexpr (regs) acc[t] = _mm512_setzero_ps();
        else _mm512_storeu_ps(yt + t * N, _mm512_setzero_ps());
    }
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *gk = grp + b * gb;
        // (no software prefetch, as in rows_x16_tile)
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(gk)));
        const float *xd = x.d.data() + b * M + m0;
        __m512i tot[MT];
        for (int t = 0; t < MT; t++) tot[t] = _mm512_setzero_si512();
        if constexpr (T == Q4_K) {
            // the 6-bit scales and mins of the 16 rows, from the 12 byte planes (llama.cpp's get_scale_min_k4)
            __m128i P[12];
            for (int p = 0; p < 12; p++) P[p] = _mm_loadu_si128(reinterpret_cast<const __m128i *>(gk + 64 + 16 * p));
            const __m128i m63 = _mm_set1_epi8(63), m15 = _mm_set1_epi8(15), m3 = _mm_set1_epi8(3);
            auto top2 = [&](__m128i v) { return _mm_and_si128(_mm_srli_epi16(v, 6), m3); };
            __m512i mp[4];  // the mins of sub-blocks 2k and 2k + 1 as int16 pairs, a pair a row
            for (int sb = 0; sb < 8; sb++) {
                __m128i sc8, mn8;
                if (sb < 4) {
                    sc8 = _mm_and_si128(P[sb], m63);
                    mn8 = _mm_and_si128(P[sb + 4], m63);
                } else {
                    sc8 = _mm_or_si128(_mm_and_si128(P[sb + 4], m15), _mm_slli_epi16(top2(P[sb - 4]), 4));
                    mn8 = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(P[sb + 4], 4), m15), _mm_slli_epi16(top2(P[sb]), 4));
                }
                const __m512i mn = _mm512_cvtepu8_epi32(mn8);
                mp[sb / 2] = sb & 1 ? _mm512_or_si512(mp[sb / 2], _mm512_slli_epi32(mn, 16)) : mn;
                const __m512i sc = _mm512_cvtepu8_epi32(sc8);
                const int j = sb / 2;
                __m512i c[8];
                for (int i = 0; i < 8; i++) {
                    const __m512i w = _mm512_loadu_si512(gk + 256 + 64 * (8 * j + i));
                    c[i] = _mm512_and_si512(sb & 1 ? _mm512_srli_epi16(w, 4) : w, m4);
                }
                const uint8_t *xq = xq0 + ((b * 8 + sb) * M + m0) * 32;
#pragma GCC unroll 16
                for (int t = 0; t < MT; t++) {
                    __m512i p = _mm512_setzero_si512();
                    p = dot_codes<8, MT>(p, c, xq + 32 * t);
                    tot[t] = _mm512_add_epi32(tot[t], _mm512_mullo_epi32(p, sc));
                }
            }
            const __m512 dmw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(gk + 32)));
            const uint8_t *xs = reinterpret_cast<const uint8_t *>(x.s2.data() + (b * M + m0) * 8);
#pragma GCC unroll 16
            for (int t = 0; t < MT; t++) {
                __m512i mt = _mm512_setzero_si512();
                for (int k = 0; k < 4; k++) mt = _mm512_dpwssd_epi32(mt, mp[k], _mm512_set1_epi32((int)u32(xs + 16 * t + 4 * k)));
                const __m512 dx = _mm512_set1_ps(xd[t]);
                __m512 a;
                if constexpr (regs) a = acc[t];
                else a = _mm512_loadu_ps(yt + t * N);
                a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(tot[t]), _mm512_mul_ps(dw, dx), a);
                a = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(mt), _mm512_mul_ps(dmw, dx), a);
                if constexpr (regs) acc[t] = a;
                else _mm512_storeu_ps(yt + t * N, a);
            }
        } else {  // Q6_K: 16 sub-blocks of 16 weights (4 weight groups each)
            const int32_t *xz = x.z.data() + b * 16 * M + m0;
            const uint8_t *xq = xq0 + (b * 8 * M + m0) * 32;
            // up to 8 rows the sub-block loop unrolls (each code vector's place and shifts constants: a decode row
            // is otherwise bound by that arithmetic); past 8 the unrolled code spills
            if constexpr (MT <= 8) {
#pragma GCC unroll 16
                for (int sb = 0; sb < 16; sb++) q6k_sub<MT>(gk, sb, xq, xz, M, tot);
            } else {
                for (int sb = 0; sb < 16; sb++) q6k_sub<MT>(gk, sb, xq, xz, M, tot);
            }
#pragma GCC unroll 16
            for (int t = 0; t < MT; t++) {
                const __m512 dx = _mm512_set1_ps(xd[t]);
                __m512 a;
                if constexpr (regs) a = acc[t];
                else a = _mm512_loadu_ps(yt + t * N);
                a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(tot[t]), _mm512_mul_ps(dw, dx), a);
                if constexpr (regs) acc[t] = a;
                else _mm512_storeu_ps(yt + t * N, a);
            }
        }
    }
    if constexpr (regs)
        for (int t = 0; t < MT; t++) _mm512_storeu_ps(yt + t * N, acc[t]);
}

template <int64_t T, int MT>
OAG_AVX512 void x16_tile(const Args &g, int64_t n, int64_t m) {
    if constexpr (xblock<T>() == 256) rows_x16k_tile<T, MT>(g, n, m);
    else rows_x16_tile<T, MT>(g, n, m);
}

// rows n0..n1 (whole groups of 16): the activation rows in tiles of 16, 8, 4, 2 and 1
template <int64_t T>
__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"))) void rows_x16(const Args &g, int64_t n0,
                                                                                            int64_t n1) {
    // a prefill's activation rows in chunks that stay in L2 (~384 KiB of int8) while the thread's weight groups
    // pass: the whole (M, K) streamed from L3 once a group cost a third of the GEMM at K = 4864
    const int64_t mc = std::max<int64_t>(16, (384 * 1024 / g.K) / 16 * 16);
    for (int64_t c0 = 0; c0 < g.M; c0 += mc) {
        const int64_t c1 = std::min(g.M, c0 + mc);
        for (int64_t n = n0; n < n1; n += X16_ROWS) {
            int64_t m = c0;
            for (; m + 16 <= c1; m += 16) x16_tile<T, 16>(g, n, m);
            if (c1 - m >= 8) x16_tile<T, 8>(g, n, m), m += 8;
            if (c1 - m >= 4) x16_tile<T, 4>(g, n, m), m += 4;
            if (c1 - m >= 2) x16_tile<T, 2>(g, n, m), m += 2;
            if (c1 - m >= 1) x16_tile<T, 1>(g, n, m);
        }
    }
}
#endif

bool has(const char *f) {
#ifdef OAG_X86
    __builtin_cpu_init();
    if (!std::strcmp(f, "avx512vnni"))
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx2") &&
               __builtin_cpu_supports("fma");
    if (!std::strcmp(f, "avx512"))
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (!std::strcmp(f, "avx2")) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    (void)f;
    return false;
}

int64_t gemv_path() { return has("avx512vnni") ? 2 : has("avx2") ? 1 : 0; }

using RowsFn = void (*)(const Args &, int64_t, int64_t);

template <int64_t T>
RowsFn rows_for(int64_t path) {
#ifdef OAG_X86
    if constexpr (xblock<T>() == 256) {
        if (path == 2) return &rows_k512<T>;
        if (path >= 1) return &rows_k<T>;  // (vpmaddwd applies the scales: VNNI's dot gains nothing here)
    }
    if (path == 2) return &rows_b512<T>;
    if (path == 1) return &rows_avx2<T>;
#endif
    (void)path;
    return &rows_scalar<T>;
}

RowsFn rows_fn(int64_t qt, int64_t path) {
    switch (qt) {
        case Q4_0: return rows_for<Q4_0>(path);
        case Q4_1: return rows_for<Q4_1>(path);
        case Q5_0: return rows_for<Q5_0>(path);
        case Q5_1: return rows_for<Q5_1>(path);
        case Q8_0: return rows_for<Q8_0>(path);
        case Q4_K: return rows_for<Q4_K>(path);
        case Q5_K: return rows_for<Q5_K>(path);
        case Q6_K: return rows_for<Q6_K>(path);
        default: return nullptr;
    }
}

// the interleaved layout's per-type functions: F<T>::fn for the type qt (nullptr for any other)
template <template <int64_t> class F>
auto x16_fn(int64_t qt) -> decltype(F<Q4_0>::fn) {
    switch (qt) {
        case Q4_0: return F<Q4_0>::fn;
        case Q4_1: return F<Q4_1>::fn;
        case Q5_0: return F<Q5_0>::fn;
        case Q5_1: return F<Q5_1>::fn;
        case Q8_0: return F<Q8_0>::fn;
        case Q4_K: return F<Q4_K>::fn;
        case Q6_K: return F<Q6_K>::fn;
        default: return nullptr;
    }
}

#ifdef OAG_X86
using XtFn = XT (*)(const float *, int64_t, int64_t);
template <int64_t T> struct RowsOf { static constexpr RowsFn fn = &rows_x16<T>; };
template <int64_t T> struct XtOf { static constexpr XtFn fn = &quantize_xt<T>; };
#endif

RowsFn rows_x16_fn(int64_t qt) {
#ifdef OAG_X86
    return x16_fn<RowsOf>(qt);
#else
    (void)qt;
    return nullptr;
#endif
}

XT quantize_xt_for(int64_t qt, const float *x, int64_t M, int64_t K) {
#ifdef OAG_X86
    if (const XtFn fn = x16_fn<XtOf>(qt)) return fn(x, M, K);
#endif
    (void)x, (void)M, (void)K;
    TORCH_CHECK(false, "ggml type ", qt, " has no interleaved kernel here");
}

// the (un)interleaving, per type
using PackFn = void (*)(uint8_t *, int64_t, int64_t, int64_t, int64_t);
using UnpackFn = void (*)(const uint8_t *, int64_t, int64_t, int64_t, uint8_t *);

template <int64_t T> struct PackOf { static constexpr PackFn fn = &x16_pack_groups<T>; };
template <int64_t T> struct UnpackOf { static constexpr UnpackFn fn = &x16_unpack_row<T>; };

PackFn pack_fn(int64_t qt) { return x16_fn<PackOf>(qt); }
UnpackFn unpack_fn(int64_t qt) { return x16_fn<UnpackOf>(qt); }

constexpr bool x16_type(int64_t qt) {
    return qt == Q4_0 || qt == Q4_1 || qt == Q5_0 || qt == Q5_1 || qt == Q8_0 || qt == Q4_K || qt == Q6_K;
}

void check_raw(const at::Tensor &raw, int64_t qt_, int64_t K) {
    const bool x16 = qt_ & X16;
    const int64_t qt = qt_ & ~X16;
    const Layout L = layout(qt);
    TORCH_CHECK(L.block > 0 && (!x16 || x16_type(qt)), "ggml type ", qt_, " has no kernel here");
    TORCH_CHECK(!x16 || (raw.dim() == 2 && raw.size(0) % X16_ROWS == 0), "interleaved rows come in groups of ",
                X16_ROWS, ", got ", raw.sizes());
    TORCH_CHECK(K > 0 && K % L.block == 0, "K=", K, " is not a multiple of the block size ", L.block);
    TORCH_CHECK(raw.dim() == 2 && raw.scalar_type() == at::kByte && raw.size(1) == K / L.block * L.bytes,
                "raw must be (N, ", K / L.block * L.bytes, ") uint8, got ", raw.sizes());
}

constexpr int64_t GRAIN = 32;  // rows a thread takes at least

at::Tensor ggml_gemv(const at::Tensor &x_, const at::Tensor &raw_, int64_t qt, int64_t K, int64_t path) {
    check_raw(raw_, qt, K);
    TORCH_CHECK(x_.dim() == 2 && x_.size(1) == K, "x must be (M, ", K, "), got ", x_.sizes());
    TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kBFloat16, "x must be fp32 or bf16");
    const int64_t best = gemv_path(), use = path < 0 ? best : path;
    TORCH_CHECK(use >= 0 && use <= best, "ggml_gemv: code path ", path, " is not available here");
    TORCH_CHECK(!(qt & X16) || use == 2, "ggml_gemv: the interleaved layout runs on the AVX-512 VNNI path only");
    const at::Tensor xf = x_.to(at::kFloat).contiguous(), raw = raw_.contiguous();
    const int64_t M = xf.size(0), N = raw.size(0);
    at::Tensor y = at::empty({M, N}, xf.options());
    if (qt & X16) {
        const XT t = quantize_xt_for(qt & ~X16, xf.data_ptr<float>(), M, K);
        const Args g{raw.data_ptr<uint8_t>(), raw.size(1), nullptr, M, N, K, y.data_ptr<float>(), &t};
        const RowsFn fn = rows_x16_fn(qt & ~X16);
        at::parallel_for(0, N / X16_ROWS, GRAIN / X16_ROWS,
                         [&](int64_t g0, int64_t g1) { fn(g, g0 * X16_ROWS, g1 * X16_ROWS); });
    } else {
        const XQ a = quantize_x(xf.data_ptr<float>(), M, K, layout(qt).block == 256 ? 256 : 32);
        const Args g{raw.data_ptr<uint8_t>(), raw.size(1), &a, M, N, K, y.data_ptr<float>()};
        const RowsFn fn = rows_fn(qt, use);
        at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) { fn(g, n0, n1); });
    }
    return x_.scalar_type() == at::kFloat ? y : y.to(x_.scalar_type());
}

inline uint16_t to_bf16(float f) {  // round to nearest even, as torch's conversion
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <int64_t T>
void dequant_rows(const uint8_t *raw, int64_t rb, int64_t K, void *out, bool bf, int64_t n0, int64_t n1) {
    const Layout L = layout(T);
    const int64_t nb = K / L.block;
    Sub sb;
    float w[32];
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = raw + n * rb + b * L.bytes;
            for (int s = 0; s < subs<T>(); s++) {
                codes_scalar<T>(blk, s, sb.c);
                params<T>(blk, s, sb.d, sb.m);
                // gguf-py's order: d * c, then + m (a product, then a sum: no contraction in ISO C++)
                for (int l = 0; l < 32; l++) {
                    const float p = sb.d[l >> 4] * (float)sb.c[l];
                    w[l] = has_offset<T>() ? p + sb.m[l >> 4] : p;
                }
                const int64_t k0 = n * K + b * L.block + s * 32;
                if (bf) {
                    auto *o = static_cast<uint16_t *>(out) + k0;
                    for (int l = 0; l < 32; l++) o[l] = to_bf16(w[l]);
                } else {
                    std::memcpy(static_cast<float *>(out) + k0, w, sizeof w);
                }
            }
        }
    }
}

#ifdef OAG_X86
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void store8(void *out, int64_t k, __m256 w, bool bf) {
    if (!bf) return _mm256_storeu_ps(static_cast<float *>(out) + k, w);
    // bf16, round to nearest even (what to_bf16 does; a weight here is never NaN: its fp16 scale would be)
    const __m256i u = _mm256_castps_si256(w);
    const __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)),
                         _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))), 16);
    const __m128i p = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i *>(static_cast<uint16_t *>(out) + k), p);
}

// as dequant_rows, 8 weights at a time: the same fp32 products and sums, so the same bits
template <int64_t T>
__attribute__((target("avx2,fma,f16c"))) void dequant_rows_avx2(const uint8_t *raw, int64_t rb, int64_t K, void *out,
                                                                bool bf, int64_t n0, int64_t n1) {
    const Layout L = layout(T);
    const int64_t nb = K / L.block;
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = raw + n * rb + b * L.bytes;
            for (int s = 0; s < subs<T>(); s++) {
                float d[2], m[2];
                params_fast<T>(blk, s, d, m);
                const __m256i c = codes_avx2<T>(blk, s);
                const __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
                const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
                const int64_t k0 = n * K + b * L.block + s * 32;
                for (int j = 0; j < 4; j++) {
                    const __m256 cf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[j]));
                    __m256 w = _mm256_mul_ps(_mm256_set1_ps(d[j >> 1]), cf);
                    if constexpr (has_offset<T>()) w = _mm256_add_ps(w, _mm256_set1_ps(m[j >> 1]));
                    store8(out, k0 + 8 * j, w, bf);
                }
            }
        }
    }
}

// as dequant_rows_avx2, 16 weights at a time (the same fp32 products and sums: the same bits). A prefill's
// dequantization writes every weight of the matrix once; at 8 lanes it ran at ~2 G weights/s on 2 threads
#define OAG_DQ512 __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw"), always_inline)) inline
OAG_DQ512 void store16(void *out, int64_t k, __m512 w, bool bf) {
    if (!bf) return _mm512_storeu_ps(static_cast<float *>(out) + k, w);
    const __m512i u = _mm512_castps_si512(w);  // round to nearest even, as store8
    const __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                         _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i *>(static_cast<uint16_t *>(out) + k), _mm512_cvtepi32_epi16(r));
}

template <int64_t T>
__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw"))) void dequant_rows_512(
    const uint8_t *raw, int64_t rb, int64_t K, void *out, bool bf, int64_t n0, int64_t n1) {
    const Layout L = layout(T);
    const int64_t nb = K / L.block;
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = raw + n * rb + b * L.bytes;
            for (int s = 0; s < subs<T>(); s++) {
                float d[2], m[2];
                params_fast<T>(blk, s, d, m);
                const __m256i c = codes_avx2<T>(blk, s);
                const int64_t k0 = n * K + b * L.block + s * 32;
                for (int j = 0; j < 2; j++) {
                    const __m128i h = j ? _mm256_extracti128_si256(c, 1) : _mm256_castsi256_si128(c);
                    __m512 w = _mm512_mul_ps(_mm512_set1_ps(d[j]), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(h)));
                    if constexpr (has_offset<T>()) w = _mm512_add_ps(w, _mm512_set1_ps(m[j]));
                    store16(out, k0 + 16 * j, w, bf);
                }
            }
        }
    }
}
#endif

using DqFn = void (*)(const uint8_t *, int64_t, int64_t, void *, bool, int64_t, int64_t);

template <int64_t T>
DqFn dq_for(int64_t path) {
#ifdef OAG_X86
    if (path >= 2) return &dequant_rows_512<T>;
    if (path >= 1) return &dequant_rows_avx2<T>;
#endif
    (void)path;
    return &dequant_rows<T>;
}

DqFn dq_fn(int64_t qt, int64_t path) {
    switch (qt) {
        case Q4_0: return dq_for<Q4_0>(path);
        case Q4_1: return dq_for<Q4_1>(path);
        case Q5_0: return dq_for<Q5_0>(path);
        case Q5_1: return dq_for<Q5_1>(path);
        case Q8_0: return dq_for<Q8_0>(path);
        case Q4_K: return dq_for<Q4_K>(path);
        case Q5_K: return dq_for<Q5_K>(path);
        case Q6_K: return dq_for<Q6_K>(path);
        default: return nullptr;
    }
}

int64_t dequant_path() { return has("avx512") ? 2 : has("avx2") ? 1 : 0; }

void dequant_into(const at::Tensor &raw_, int64_t qt, int64_t K, at::Tensor &out, int64_t path) {
    check_raw(raw_, qt, K);
    const int64_t best = dequant_path(), use = path < 0 ? best : path;
    TORCH_CHECK(use >= 0 && use <= best, "ggml_dequant: code path ", path, " is not available here");
    const at::Tensor raw = raw_.contiguous();
    const int64_t N = raw.size(0);
    TORCH_CHECK(out.is_contiguous() && out.dim() == 2 && out.size(0) == N && out.size(1) == K &&
                    (out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kFloat),
                "out must be a contiguous (", N, ", ", K, ") fp32 or bf16 tensor, got ", out.sizes(), " ",
                out.scalar_type());
    const bool bf = out.scalar_type() == at::kBFloat16;
    const DqFn fn = dq_fn(qt & ~X16, use);
    const uint8_t *rp = raw.data_ptr<uint8_t>();
    const int64_t rb = raw.size(1);
    if (qt & X16) {  // a group's stored rows back in a buffer, then dequantized as the stored rows are
        const UnpackFn un = unpack_fn(qt & ~X16);
        const int64_t nb = K / layout(qt & ~X16).block, es = bf ? 2 : 4;
        at::parallel_for(0, N / X16_ROWS, GRAIN / X16_ROWS, [&](int64_t g0, int64_t g1) {
            std::vector<uint8_t> rows(X16_ROWS * rb);
            for (int64_t gi = g0; gi < g1; gi++) {
                for (int r = 0; r < X16_ROWS; r++) un(rp, rb, nb, gi * X16_ROWS + r, rows.data() + r * rb);
                fn(rows.data(), rb, K, static_cast<uint8_t *>(out.data_ptr()) + gi * X16_ROWS * K * es, bf, 0, X16_ROWS);
            }
        });
        return;
    }
    void *op = out.data_ptr();
    at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) { fn(rp, rb, K, op, bf, n0, n1); });
}

// the 32-block rows of raw (N a multiple of 16) interleaved in place, for ggml_gemv's qtype | X16
void ggml_interleave_(at::Tensor raw, int64_t qt, int64_t K) {
    TORCH_CHECK(x16_type(qt), "ggml type ", qt, " has no interleaved layout");
    check_raw(raw, qt | X16, K);
    TORCH_CHECK(raw.is_contiguous(), "raw must be contiguous");
    const PackFn fn = pack_fn(qt);
    uint8_t *rp = raw.data_ptr<uint8_t>();
    at::parallel_for(0, raw.size(0) / X16_ROWS, 1,
                     [&](int64_t g0, int64_t g1) { fn(rp, raw.size(1), K / layout(qt).block, g0, g1); });
}

// rows idx of raw, as the GGUF file stores them (qt | X16: taken out of the interleaved groups)
at::Tensor ggml_rows(const at::Tensor &raw_, int64_t qt, int64_t K, const at::Tensor &idx_) {
    check_raw(raw_, qt, K);
    const at::Tensor idx = idx_.to(at::kLong).contiguous().reshape({-1});
    if (!(qt & X16)) return raw_.index_select(0, idx);
    const at::Tensor raw = raw_.contiguous();
    const int64_t N = raw.size(0), rb = raw.size(1), L = idx.numel();
    at::Tensor out = at::empty({L, rb}, raw.options());
    const int64_t *ip = idx.data_ptr<int64_t>();
    for (int64_t i = 0; i < L; i++) TORCH_CHECK(ip[i] >= 0 && ip[i] < N, "row ", ip[i], " is out of range for ", N, " rows");
    const UnpackFn un = unpack_fn(qt & ~X16);
    const uint8_t *rp = raw.data_ptr<uint8_t>();
    uint8_t *op = out.data_ptr<uint8_t>();
    at::parallel_for(0, L, 8, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; i++) un(rp, rb, K / layout(qt & ~X16).block, ip[i], op + i * rb);
    });
    return out;
}

at::Tensor ggml_dequant(const at::Tensor &raw, int64_t qt, int64_t K, int64_t bf16, int64_t path) {
    at::Tensor out = at::empty({raw.size(0), K}, raw.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
    dequant_into(raw, qt, K, out, path);
    return out;
}

// into a caller's buffer: prefill reuses one (a fresh allocation of a large matrix is mapped, faulted in and
// zeroed page by page at every call: Qwen 1.5B's gate-up, 55 MB of bf16, took longer than its dequantization)
void ggml_dequant_out(const at::Tensor &raw, int64_t qt, int64_t K, at::Tensor out, int64_t path) {
    dequant_into(raw, qt, K, out, path);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(openautoglm, m) {
    m.def("ggml_gemv(Tensor x, Tensor raw, int qtype, int K, int path=-1) -> Tensor");
    m.def("ggml_dequant(Tensor raw, int qtype, int K, int bf16=0, int path=-1) -> Tensor");
    m.def("ggml_dequant_out(Tensor raw, int qtype, int K, Tensor(a!) out, int path=-1) -> ()");
    m.def("ggml_interleave_(Tensor(a!) raw, int qtype, int K) -> ()");
    m.def("ggml_rows(Tensor raw, int qtype, int K, Tensor idx) -> Tensor");
    m.def("ggml_gemv_path() -> int", []() { return gemv_path(); });
    m.def("ggml_dequant_path() -> int", []() { return dequant_path(); });
}

TORCH_LIBRARY_IMPL(openautoglm, CPU, m) {
    m.impl("ggml_gemv", &ggml_gemv);
    m.impl("ggml_dequant", &ggml_dequant);
    m.impl("ggml_dequant_out", &ggml_dequant_out);
    m.impl("ggml_interleave_", &ggml_interleave_);
    m.impl("ggml_rows", &ggml_rows);
}

namespace {
using torch::aot_inductor::new_tensor_handle;
using torch::aot_inductor::tensor_handle_to_tensor_pointer;
const at::Tensor &T(AtenTensorHandle h) { return *tensor_handle_to_tensor_pointer(h); }
}  // namespace

extern "C" {
AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_ggml_gemv(AtenTensorHandle x, AtenTensorHandle raw, int64_t qtype,
                                                          int64_t K, int64_t path, AtenTensorHandle *ret0) {
    AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({ *ret0 = new_tensor_handle(ggml_gemv(T(x), T(raw), qtype, K, path)); });
}

AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_ggml_rows(AtenTensorHandle raw, int64_t qtype, int64_t K,
                                                          AtenTensorHandle idx, AtenTensorHandle *ret0) {
    AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({ *ret0 = new_tensor_handle(ggml_rows(T(raw), qtype, K, T(idx))); });
}

AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_ggml_dequant(AtenTensorHandle raw, int64_t qtype, int64_t K,
                                                             int64_t bf16, int64_t path, AtenTensorHandle *ret0) {
    AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE(
        { *ret0 = new_tensor_handle(ggml_dequant(T(raw), qtype, K, bf16, path)); });
}
}
