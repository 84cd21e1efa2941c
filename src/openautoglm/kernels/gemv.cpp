// Decode kernels, registered as torch operators (so that torch.export traces them) and exported as C shims (so
// that AOTInductor's compiled decode step calls them directly, see the end of this file): weight-only GEMVs (a few rows of activations against int4 / int8 weights) and the attention of one
// query position over the KV cache.
//
// openautoglm::int4_gemv(x (M, K) bf16, qweight (N, K/2) uint8, scales (N, K/g) bf16, zeros (N, K/g) bf16, g)
//     -> (M, N) bf16.  Portable int4 layout (quant/primitives.py): code k of a row in the low nibble of byte k/2 when
//     k is even, the high nibble when odd; w = (q - 8) * s + z.  Computed as
//     y = sum_j s_j * sum_{k in j} (q_k - 8) x_k  +  sum_j z_j * sum_{k in j} x_k  with fp32 accumulation.
// openautoglm::int8_gemv(x (M, K) bf16, qweight (N, K) int8, scales (N,) bf16) -> (M, N) bf16: y = s * (q . x);
//     on AVX512-VNNI (K % 32 == 0) with x quantized to int16, one scale a row (see int8_rows_vnni).
//
// Decode is memory bound: the point is to stream the codes once at the bandwidth the cores can pull, with no
// per-call allocation beyond the output.  AVX-512 paths (int4 with AVX512-BF16 dot products: the codes are
// expanded to bf16 (q - 8) by a 32-entry table lookup and multiplied in pairs with the bf16 activations, which
// lie in memory in exactly the pairs the nibbles of a byte hold), a scalar path elsewhere.  AVX2 paths (AMD Zen 1-3,
// Intel before Ice Lake: laptops and cheap servers) for the W4A8 GEMV, the int8 GEMV and the attention.  Rows are
// split over torch's intra-op threads.
//
// openautoglm::decode_attention(q (B, H, 1, D), k, v (B, KV, S, D), mask (B, 1, 1, S) bool, scale?) -> (B, H, 1, D):
//     SDPA with enable_gqa for one query position (see the section below).  At decode, torch's flash attention costs
//     ~90 us a call here for ~0.5 M multiply-adds (fixed per-call work, every kv head re-read per query head, all S
//     slots); this reads each kv head once per group of query heads, and only up to the last allowed slot.
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
#include <optional>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define OAG_X86 1
#endif

namespace {

inline float bf(uint16_t b) {
    uint32_t u = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline uint16_t to_bf16(float f) {  // round to nearest even, as torch's conversion
    return c10::BFloat16(f).x;
}

// group sums of x in fp32: xs[m * G + j]
std::vector<float> group_sums(const uint16_t *x, int64_t M, int64_t K, int64_t g) {
    const int64_t G = K / g;
    std::vector<float> xs(M * G);
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < G; j++) {
            float s = 0.f;
            for (int64_t i = 0; i < g; i++) s += bf(x[m * K + j * g + i]);
            xs[m * G + j] = s;
        }
    return xs;
}

void int4_rows_scalar(const uint16_t *x, const float *xs, const uint8_t *q, const uint16_t *s, const uint16_t *z,
                      uint16_t *y, int64_t M, int64_t N, int64_t K, int64_t g, int64_t n0, int64_t n1) {
    const int64_t G = K / g, hb = g / 2;
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *xm = x + m * K;
        for (int64_t n = n0; n < n1; n++) {
            float acc = 0.f;
            for (int64_t j = 0; j < G; j++) {
                const uint8_t *qb = q + n * (K / 2) + j * hb;
                float d = 0.f;
                for (int64_t i = 0; i < hb; i++) {
                    const int lo = (qb[i] & 15) - 8, hi = (qb[i] >> 4) - 8;
                    d += lo * bf(xm[j * g + 2 * i]) + hi * bf(xm[j * g + 2 * i + 1]);
                }
                acc += bf(s[n * G + j]) * d + bf(z[n * G + j]) * xs[m * G + j];
            }
            y[m * N + n] = to_bf16(acc);
        }
    }
}

void int8_rows_scalar(const uint16_t *x, const int8_t *q, const uint16_t *s, uint16_t *y, int64_t M, int64_t N,
                      int64_t K, int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = n0; n < n1; n++) {
            float acc = 0.f;
            for (int64_t k = 0; k < K; k++) acc += q[n * K + k] * bf(x[m * K + k]);
            y[m * N + n] = to_bf16(acc * bf(s[n]));
        }
}

#ifdef OAG_X86
#define OAG_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) inline

// 16 bytes (32 codes) -> 32 bf16 (q - 8) in code order: each byte goes to a 32-bit lane holding the byte in the
// low half and its high nibble in the high half; vpermw reads 5 index bits a half and the table repeats every
// 16 entries, so no masking is needed
OAG_AVX512 __m512bh expand(const uint8_t *p, __m512i tab) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
    return (__m512bh)_mm512_permutexvar_epi16(_mm512_or_si512(v, _mm512_slli_epi32(v, 12)), tab);
}

OAG_AVX512 __m512 bcast(uint16_t b) {
    return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(b) << 16)));
}

// acc + (z_j * xs_j summed over a row's G groups, spread over lanes)
OAG_AVX512 __m512 zterm(__m512 a, const uint16_t *zr, const float *xr, int64_t G) {
    for (int64_t j = 0; j < G; j += 16) {
        const __mmask16 k = G - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (G - j)) - 1);
        const __m512i zb = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, zr + j));
        a = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(zb, 16)), _mm512_maskz_loadu_ps(k, xr + j), a);
    }
    return a;
}

// the lane sums of four vectors, in order
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    const __m512 t0 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
    const __m512 t1 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
    // 128-bit blocks: a0 (2 halves summed), a1, a2, a3
    const __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(t0, t1, 0x88), _mm512_shuffle_f32x4(t0, t1, 0xDD));
    const __m512 v = _mm512_add_ps(u, _mm512_permute_ps(u, 0x4E));
    const __m512 w = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1));  // lane 4b = sum of vector b
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), w));
}

// four fp32 -> bf16 as to_bf16 (round to nearest even, NaN -> 0x7FC0) without its per-value branch
__attribute__((target("avx512f,avx512vl,sse4.1"), always_inline)) inline void store4_bf16(uint16_t *dst, __m128 v) {
    const __m128i u = _mm_castps_si128(v);
    const __m128i lsb = _mm_and_si128(_mm_srli_epi32(u, 16), _mm_set1_epi32(1));
    __m128i r = _mm_srli_epi32(_mm_add_epi32(_mm_add_epi32(u, _mm_set1_epi32(0x7FFF)), lsb), 16);
    r = _mm_mask_mov_epi32(r, _mm_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm_set1_epi32(0x7FC0));
    _mm_storel_epi64(reinterpret_cast<__m128i *>(dst), _mm_packus_epi32(r, r));
}

// 16 bytes (32 codes) per step: g % 32 == 0.  Four rows at a time share the activation loads.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void int4_rows_avx512bf16(
    const uint16_t *x, const float *xs, const uint8_t *q, const uint16_t *s, const uint16_t *z, uint16_t *y,
    int64_t M, int64_t N, int64_t K, int64_t g, int64_t n0, int64_t n1) {
    const int64_t G = K / g, hb = g / 2, KB = K / 2;
    alignas(64) uint16_t table[32];
    for (int e = 0; e < 32; e++) table[e] = to_bf16(static_cast<float>((e & 15) - 8));
    const __m512i tab = _mm512_load_si512(table);
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *xm = x + m * K;
        const float *xsm = xs + m * G;
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) {
            __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(),
                   acc3 = _mm512_setzero_ps();
            const uint8_t *q0 = q + n * KB, *q1 = q0 + KB, *q2 = q1 + KB, *q3 = q2 + KB;
            const uint16_t *s0 = s + n * G;
            for (int64_t j = 0; j < G; j++) {
                __m512 d0 = _mm512_setzero_ps(), d1 = _mm512_setzero_ps(), d2 = _mm512_setzero_ps(),
                       d3 = _mm512_setzero_ps();
                for (int64_t i = 0; i < hb; i += 16) {
                    const int64_t b = j * hb + i;
                    const __m512bh xv = (__m512bh)_mm512_loadu_si512(xm + 2 * b);
                    d0 = _mm512_dpbf16_ps(d0, expand(q0 + b, tab), xv);
                    d1 = _mm512_dpbf16_ps(d1, expand(q1 + b, tab), xv);
                    d2 = _mm512_dpbf16_ps(d2, expand(q2 + b, tab), xv);
                    d3 = _mm512_dpbf16_ps(d3, expand(q3 + b, tab), xv);
                }
                acc0 = _mm512_fmadd_ps(d0, bcast(s0[j]), acc0);
                acc1 = _mm512_fmadd_ps(d1, bcast(s0[G + j]), acc1);
                acc2 = _mm512_fmadd_ps(d2, bcast(s0[2 * G + j]), acc2);
                acc3 = _mm512_fmadd_ps(d3, bcast(s0[3 * G + j]), acc3);
            }
            alignas(16) float r[4];
            _mm_store_ps(r, reduce4(zterm(acc0, z + n * G, xsm, G), zterm(acc1, z + (n + 1) * G, xsm, G),
                                    zterm(acc2, z + (n + 2) * G, xsm, G), zterm(acc3, z + (n + 3) * G, xsm, G)));
            for (int i = 0; i < 4; i++) y[m * N + n + i] = to_bf16(r[i]);
        }
        for (; n < n1; n++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t j = 0; j < G; j++) {
                __m512 d = _mm512_setzero_ps();
                for (int64_t i = 0; i < hb; i += 16) {
                    const int64_t b = j * hb + i;
                    d = _mm512_dpbf16_ps(d, expand(q + n * KB + b, tab), (__m512bh)_mm512_loadu_si512(xm + 2 * b));
                }
                acc = _mm512_fmadd_ps(d, bcast(s[n * G + j]), acc);
            }
            y[m * N + n] = to_bf16(_mm512_reduce_add_ps(zterm(acc, z + n * G, xsm, G)));
        }
    }
}

// --- W4A8: int8 activations (per block of 8; llama.cpp's Q4 x Q8 uses 32) and VNNI integer dot products ---
//
// The activations of each block of 8 are quantized to int8 (d = max|x| / 127, xq = round(x * (127 / max|x|))); the
// 32 of a group are split into the 16 even and 16 odd positions (the low and high nibbles of its 16 code bytes) and
// laid out four groups to a 64-byte vector.  A 32-bit lane of the dot product then covers exactly one block of 8
// (4 even and 4 odd positions), so the block scale costs nothing in the loop: one chunk of 64 code bytes (128 weights) costs: and, shift+and, two vpdpbusd (u8 codes x s8
// activations, 4 products a 32-bit lane, 4 lanes a group), an int->float conversion and one FMA against the lane
// scales s_group * d_block.  Blocks of 8 rather than llama.cpp's 32: an outlier channel coarsens 7 neighbours,
// not 31 (per-layer error on inputs with outlier channels ~1e-2 -> ~4e-3, see autotune's quality budget).  The zero points: sum_j (z_j - 8 s_j) * sum_{k in j} d_k xq_k, 16 groups at a time.
// The result is the exact dot product of the dequantized weights with the quantized activations, in fp32.

struct A8 {  // one call's quantized activations
    int64_t C, Gp;          // chunks of 4 blocks; groups rounded up to 32
    std::vector<int8_t> xb;  // (M, C, 2, 64): even then odd positions of 4 blocks
    std::vector<float> dl;   // (M, C, 16): lane l -> d of the block of 8 it covers (0 past the end)
    std::vector<float> sg;   // (M, Gp): sum over a group's blocks of d_b * sum(xq_b) (0 past the end); in each
                             // 32 groups the 16 even ones, then the 16 odd ones (the fp32 halves of 32 bf16 words)
    std::vector<float> ds;   // AVX2 path, instead of sg: (M, C, 16) as dl, d_b * sum(xq_b) of the block of 8
};

__attribute__((target("avx512f,avx512bw,avx512vl"))) A8 quantize_a8(const uint16_t *x, int64_t M, int64_t K,
                                                                    int64_t g) {
    const int64_t B = K / 32, G = K / g, bpg = g / 32;
    A8 a;
    a.C = (B + 3) / 4;
    a.Gp = (G + 31) / 32 * 32;
    a.xb.assign(M * a.C * 128, 0);
    a.dl.assign(M * a.C * 16, 0.f);
    a.sg.assign(M * a.Gp, 0.f);
    const __m512i hi16 = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < B; b++) {
            // 32 bf16 = 16 lanes of (even, odd) pairs -> the two halves as fp32; lanes 4t..4t+3 of each hold the
            // block of 8 elements 8t..8t+7, which the kernel's 32-bit lane t of this group multiplies
            const __m512i v = _mm512_loadu_si512(x + m * K + b * 32);
            const __m512 e = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            const __m512 o = _mm512_castsi512_ps(_mm512_and_si512(v, hi16));
            __m512 amax = _mm512_max_ps(_mm512_abs_ps(e), _mm512_abs_ps(o));
            amax = _mm512_max_ps(amax, _mm512_permute_ps(amax, 0x4E));
            amax = _mm512_max_ps(amax, _mm512_permute_ps(amax, 0xB1));  // each lane: its block's max
            const __m512 d = _mm512_div_ps(amax, _mm512_set1_ps(127.f));
            const __m512 id = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_GT_OQ),
                                                  _mm512_set1_ps(127.f), amax);
            const __m512i ei = _mm512_cvtps_epi32(_mm512_mul_ps(e, id));  // nearest even
            const __m512i oi = _mm512_cvtps_epi32(_mm512_mul_ps(o, id));
            int8_t *dst = a.xb.data() + (m * a.C + b / 4) * 128 + (b % 4) * 16;
            _mm_storeu_si128(reinterpret_cast<__m128i *>(dst), _mm512_cvtsepi32_epi8(ei));
            _mm_storeu_si128(reinterpret_cast<__m128i *>(dst + 64), _mm512_cvtsepi32_epi8(oi));
            _mm_storeu_ps(a.dl.data() + (m * a.C + b / 4) * 16 + (b % 4) * 4,
                          _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                                                                        0, 0, 12, 8, 4, 0), d)));
            const int64_t j = b / bpg;
            a.sg[m * a.Gp + j / 32 * 32 + (j % 2) * 16 + (j % 32) / 2] +=
                _mm512_reduce_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_add_epi32(ei, oi))));
        }
    return a;
}

// sum_j (z_j - 8 s_j) * sg_j over a row's groups, spread over lanes (sg is zero past G; s, z are read masked): 32
// groups a step, their bf16 words split into the even and odd ones by a shift and a mask (sg is laid out to match)
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline __m512 zterm_a8(
    __m512 acc, const uint16_t *sr, const uint16_t *zr, const float *sg, int64_t G) {
    const __m512i hi16 = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    const __m512 m8 = _mm512_set1_ps(-8.f);
    for (int64_t j = 0; j < G; j += 32) {
        const __mmask32 k = G - j >= 32 ? 0xFFFFFFFFu : static_cast<__mmask32>((1u << (G - j)) - 1);
        const __m512i sv = _mm512_maskz_loadu_epi16(k, sr + j), zv = _mm512_maskz_loadu_epi16(k, zr + j);
        const __m512 se = _mm512_castsi512_ps(_mm512_slli_epi32(sv, 16)), ze = _mm512_castsi512_ps(_mm512_slli_epi32(zv, 16));
        const __m512 so = _mm512_castsi512_ps(_mm512_and_si512(sv, hi16)), zo = _mm512_castsi512_ps(_mm512_and_si512(zv, hi16));
        acc = _mm512_fmadd_ps(_mm512_fmadd_ps(se, m8, ze), _mm512_loadu_ps(sg + j), acc);
        acc = _mm512_fmadd_ps(_mm512_fmadd_ps(so, m8, zo), _mm512_loadu_ps(sg + j + 16), acc);
    }
    return acc;
}

#define OAG_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline)) inline

// one row's contribution of one chunk: codes c (64 bytes, 4 blocks), the row's scales for the chunk (bf16, read
// masked), activations xe/xo, lane d's
OAG_VNNI __m512 chunk_a8(__m512 acc, __m512i c, const uint16_t *sp, __mmask8 sk, __m512i idx, __m512i xe, __m512i xo,
                         __m512 dv) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(c, m4), xe);
    a = _mm512_dpbusd_epi32(a, _mm512_and_si512(_mm512_srli_epi16(c, 4), m4), xo);
    // bf16 scales -> fp32 lanes: word 2l+1 of lane l takes scale idx[l], word 2l is zeroed
    const __m512i sv = _mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, idx,
                                                      _mm512_castsi128_si512(_mm_maskz_loadu_epi16(sk, sp)));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_mul_ps(_mm512_castsi512_ps(sv), dv), acc);
}

// the same for a tail chunk of 1 or 2 blocks in 256-bit registers (lanes 0-7; a 512-bit masked chunk costs as much
// as a full one: K=576 took as long as K=640)
OAG_VNNI __m256 half_chunk_a8(__m256i c, const uint16_t *sp, __mmask8 sk, __m256i idx, __m256i xe, __m256i xo,
                              __m256 dv) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256i a = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_and_si256(c, m4), xe);
    a = _mm256_dpbusd_epi32(a, _mm256_and_si256(_mm256_srli_epi16(c, 4), m4), xo);
    const __m256i sv = _mm256_maskz_permutexvar_epi16(0xAAAAu, idx, _mm256_castsi128_si256(_mm_maskz_loadu_epi16(sk, sp)));
    return _mm256_mul_ps(_mm256_cvtepi32_ps(a), _mm256_mul_ps(_mm256_castsi256_ps(sv), dv));
}

// rows ahead whose codes a pass prefetches (decode streams the weights from DRAM once; the hardware prefetcher
// alone keeps too few lines in flight: ~5 GB/s a core here against ~8 streaming).  8-16 measured alike.
constexpr int64_t PF_ROWS = 8;
// rows a pass: they share the activation loads, and their epilogues (zero-point term, horizontal sums, bf16 stores)
// overlap.  8 rather than 4: 8-12% faster per call on the Xeon VM (gate/up 3072x576 in L2: 55 -> 48-53 us on one core)
constexpr int RR = 8;
// g % 32 == 0.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void int4_rows_vnni(
    const A8 &a, const uint8_t *q, const uint16_t *s, const uint16_t *z, uint16_t *y, int64_t M, int64_t N,
    int64_t K, int64_t g, int64_t n0, int64_t n1) {
    const int64_t G = K / g, KB = K / 2, B = K / 32, bpg = g / 32, C = a.C, Cf = B / 4;
    // bpg is a power of two (int4_a8_path), so a chunk of 4 blocks starts at a group boundary or inside one group:
    // lane l of a chunk reads the scale of group (4c + l/4) / bpg, i.e. word (l/4)/bpg from the chunk's first group,
    // 4c >> lg (a shift, not a 64-bit division in the chunk loop)
    const int lg = __builtin_ctzll(static_cast<unsigned long long>(bpg));
    alignas(64) uint16_t ix[32];
    for (int l = 0; l < 16; l++) ix[2 * l] = 0, ix[2 * l + 1] = static_cast<uint16_t>((l / 4) / bpg);
    const __m512i idx = _mm512_load_si512(ix);
    const __m256i idx256 = _mm512_castsi512_si256(idx);
    const __mmask8 sk_full = static_cast<__mmask8>((1u << std::max<int64_t>(1, 4 / bpg)) - 1);
    const int64_t tb = B - Cf * 4;  // blocks in the tail chunk
    const __mmask64 ck_tail = tb ? ((~0ull) >> (64 - 16 * tb)) : 0;
    const __mmask8 sk_tail = static_cast<__mmask8>((1u << std::max<int64_t>(1, (tb + bpg - 1) / bpg)) - 1);
    for (int64_t m = 0; m < M; m++) {
        const int8_t *xb = a.xb.data() + m * C * 128;
        const float *dl = a.dl.data() + m * C * 16, *sg = a.sg.data() + m * a.Gp;
        int64_t n = n0;
        for (; n + RR <= n1; n += RR) {
            __m512 acc[RR];
#pragma GCC unroll 16
            for (int r = 0; r < RR; r++) acc[r] = _mm512_setzero_ps();
            const uint8_t *q0 = q + n * KB;
            const uint16_t *s0 = s + n * G;
            for (int64_t c = 0; c < Cf; c++) {
                const __m512i xe = _mm512_loadu_si512(xb + c * 128), xo = _mm512_loadu_si512(xb + c * 128 + 64);
                const __m512 dv = _mm512_loadu_ps(dl + c * 16);
                const int64_t off = c * 64, so = (4 * c) >> lg;
                const uint8_t *pf = q0 + PF_ROWS * KB + off;
#pragma GCC unroll 16
                for (int r = 0; r < RR; r++) _mm_prefetch(reinterpret_cast<const char *>(pf + r * KB), _MM_HINT_T0);
#pragma GCC unroll 16
                for (int r = 0; r < RR; r++)
                    acc[r] = chunk_a8(acc[r], _mm512_loadu_si512(q0 + r * KB + off), s0 + r * G + so, sk_full, idx, xe,
                                      xo, dv);
            }
            if (tb > 2) {  // a tail of 3 blocks: masked 512-bit
                const __m512i xe = _mm512_loadu_si512(xb + Cf * 128), xo = _mm512_loadu_si512(xb + Cf * 128 + 64);
                const __m512 dv = _mm512_loadu_ps(dl + Cf * 16);
#pragma GCC unroll 16
                for (int r = 0; r < RR; r++)
                    acc[r] = chunk_a8(acc[r], _mm512_maskz_loadu_epi8(ck_tail, q0 + r * KB + Cf * 64),
                                      s0 + r * G + ((4 * Cf) >> lg), sk_tail, idx, xe, xo, dv);
            } else if (tb) {  // 1 or 2 blocks: 256-bit
                const __m256i xe = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xb + Cf * 128)),
                              xo = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(xb + Cf * 128 + 64));
                const __m256 dv = _mm256_loadu_ps(dl + Cf * 16);
#pragma GCC unroll 16
                for (int r = 0; r < RR; r++)
                    acc[r] = _mm512_add_ps(acc[r], _mm512_zextps256_ps512(half_chunk_a8(
                        _mm256_maskz_loadu_epi8(static_cast<__mmask32>(ck_tail), q0 + r * KB + Cf * 64),
                        s0 + r * G + ((4 * Cf) >> lg), sk_tail, idx256, xe, xo, dv)));
            }
            for (int64_t i = 0; i < RR * G * 2; i += 64) {  // the next rows' scales and zeros
                _mm_prefetch(reinterpret_cast<const char *>(s0 + PF_ROWS * G) + i, _MM_HINT_T0);
                _mm_prefetch(reinterpret_cast<const char *>(z + (n + PF_ROWS) * G) + i, _MM_HINT_T0);
            }
#pragma GCC unroll 16
            for (int r = 0; r < RR; r += 4)
                store4_bf16(y + m * N + n + r, reduce4(zterm_a8(acc[r], s0 + r * G, z + (n + r) * G, sg, G),
                                                       zterm_a8(acc[r + 1], s0 + (r + 1) * G, z + (n + r + 1) * G, sg, G),
                                                       zterm_a8(acc[r + 2], s0 + (r + 2) * G, z + (n + r + 2) * G, sg, G),
                                                       zterm_a8(acc[r + 3], s0 + (r + 3) * G, z + (n + r + 3) * G, sg, G)));
        }
        for (; n < n1; n++) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t c = 0; c < C; c++) {
                const bool tail = c == Cf;
                acc = chunk_a8(acc, _mm512_maskz_loadu_epi8(tail ? ck_tail : ~0ull, q + n * KB + c * 64),
                               s + n * G + ((4 * c) >> lg), tail ? sk_tail : sk_full, idx, _mm512_loadu_si512(xb + c * 128),
                               _mm512_loadu_si512(xb + c * 128 + 64), _mm512_loadu_ps(dl + c * 16));
            }
            y[m * N + n] = to_bf16(_mm512_reduce_add_ps(zterm_a8(acc, s + n * G, z + n * G, sg, G)));
        }
    }
}

// ---- the same W4A8 product on AVX2 (no VNNI, 256-bit: AMD Zen 1-3, Intel before Ice Lake) ----
// Same activation layout (A8), same lanes: a 32-byte half of a chunk holds 2 blocks of 32 codes, its 32-bit lane l
// the block of 8 l (lanes 0-3 the first block of 32, 4-7 the second).  u8 x s8 products by vpmaddubsw (pairs to
// int16: 2 * 15 * 127 at most, and the even + odd sum 4 * 15 * 127 < 2^15) and vpmaddwd against ones (int16 pairs to
// the 32-bit lane), as llama.cpp's Q4 x Q8 on AVX2.
#define OAG_AVX2 __attribute__((target("avx2,fma"), always_inline)) inline

// 2 x 8 int32 (|v| <= 127) -> 16 bytes in lane order: packs interleaves the 128-bit halves, the permute undoes it
OAG_AVX2 __m128i bytes16(__m256i lo, __m256i hi) {
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
    return _mm_packs_epi16(_mm256_castsi256_si128(p), _mm256_extracti128_si256(p, 1));
}

__attribute__((target("avx2,fma"))) A8 quantize_a8_avx2(const uint16_t *x, int64_t M, int64_t K, int64_t g) {
    const int64_t B = K / 32;
    (void)g;
    A8 a;
    a.C = (B + 3) / 4;
    a.Gp = 0;
    a.xb.assign(M * a.C * 128, 0);
    a.dl.assign(M * a.C * 16, 0.f);
    a.ds.assign(M * a.C * 16, 0.f);
    const __m256i hi16 = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    const __m256 c127 = _mm256_set1_ps(127.f), zero = _mm256_setzero_ps(), sign = _mm256_set1_ps(-0.f);
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < B; b++) {
            __m256i ei[2], oi[2];
            alignas(32) float dd[2][8], ss[2][8];
            for (int h = 0; h < 2; h++) {  // 16 bf16 = 8 (even, odd) pairs: two blocks of 8 (lanes 0-3, 4-7)
                const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(x + m * K + b * 32 + 16 * h));
                const __m256 e = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
                const __m256 o = _mm256_castsi256_ps(_mm256_and_si256(v, hi16));
                __m256 amax = _mm256_max_ps(_mm256_andnot_ps(sign, e), _mm256_andnot_ps(sign, o));
                amax = _mm256_max_ps(amax, _mm256_permute_ps(amax, 0x4E));
                amax = _mm256_max_ps(amax, _mm256_permute_ps(amax, 0xB1));  // each lane: its block's max
                const __m256 d = _mm256_div_ps(amax, c127);
                const __m256 id = _mm256_and_ps(_mm256_cmp_ps(amax, zero, _CMP_GT_OQ), _mm256_div_ps(c127, amax));
                ei[h] = _mm256_cvtps_epi32(_mm256_mul_ps(e, id));  // nearest even
                oi[h] = _mm256_cvtps_epi32(_mm256_mul_ps(o, id));
                __m256 t = _mm256_cvtepi32_ps(_mm256_add_epi32(ei[h], oi[h]));  // exact: |sum| <= 8 * 127
                t = _mm256_add_ps(t, _mm256_permute_ps(t, 0x4E));
                t = _mm256_add_ps(t, _mm256_permute_ps(t, 0xB1));  // each lane: its block's sum of codes
                _mm256_store_ps(dd[h], d);
                _mm256_store_ps(ss[h], _mm256_mul_ps(d, t));
            }
            int8_t *dst = a.xb.data() + (m * a.C + b / 4) * 128 + (b % 4) * 16;
            _mm_storeu_si128(reinterpret_cast<__m128i *>(dst), bytes16(ei[0], ei[1]));
            _mm_storeu_si128(reinterpret_cast<__m128i *>(dst + 64), bytes16(oi[0], oi[1]));
            const int64_t o = (m * a.C + b / 4) * 16 + (b % 4) * 4;
            for (int i = 0; i < 4; i++) a.dl[o + i] = dd[i / 2][4 * (i % 2)], a.ds[o + i] = ss[i / 2][4 * (i % 2)];
        }
    return a;
}

// one row's 32-byte half chunk (2 blocks of 32 codes, or 1: the upper 16 bytes not read) against its activations
OAG_AVX2 __m256i half_a8(const uint8_t *p, bool two, __m256i xe, __m256i xo) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i c = two ? _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p))
                          : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p)));
    const __m256i lo = _mm256_and_si256(c, m4), hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), m4);
    const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo));
    return _mm256_madd_epi16(s16, _mm256_set1_epi16(1));
}

// the half's lane values of a per-group bf16 array (scales or zeros) as fp32: lanes 0-3 block b0's group, 4-7
// block b0 + 1's (0 if absent).  With groups of 32 and both blocks present: one 32-bit broadcast load, a shift
// per half (16 for the low bf16, 0 for the high) and a mask.
OAG_AVX2 __m256 half_groups(const uint16_t *r, int64_t b0, int64_t bpg, bool two) {
    if (bpg == 1 && two) {
        int32_t pair;
        std::memcpy(&pair, r + b0, 4);
        const __m256i v = _mm256_sllv_epi32(_mm256_set1_epi32(pair), _mm256_setr_epi32(16, 16, 16, 16, 0, 0, 0, 0));
        return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
    }
    const uint32_t s0 = static_cast<uint32_t>(r[b0 / bpg]) << 16;
    if (two && (b0 + 1) / bpg == b0 / bpg) return _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(s0)));
    const uint32_t s1 = two ? static_cast<uint32_t>(r[(b0 + 1) / bpg]) << 16 : 0u;
    return _mm256_castsi256_ps(_mm256_setr_epi32(s0, s0, s0, s0, s1, s1, s1, s1));
}

// acc + one half of one row: s q . (d xq) per lane, plus (z - 8 s) times the lane's d * sum(xq): the zero points
// folded in, lane by lane
OAG_AVX2 __m256 half_row(__m256 acc, const uint8_t *codes, const uint16_t *sr, const uint16_t *zr, int64_t b0,
                         int64_t bpg, bool two, __m256i xe, __m256i xo, __m256 dv, __m256 sv8) {
    const __m256 sv = half_groups(sr, b0, bpg, two), zv = half_groups(zr, b0, bpg, two);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(half_a8(codes, two, xe, xo)), _mm256_mul_ps(sv, dv), acc);
    return _mm256_fmadd_ps(_mm256_fnmadd_ps(sv, _mm256_set1_ps(8.f), zv), sv8, acc);
}

OAG_AVX2 __m256i ld256(const int8_t *p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)); }

OAG_AVX2 float hsum8(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// rows ahead the AVX2 W4A8 pass prefetches: 16 streamed ~20% faster than 8 on the AMD EPYC VM (8, 16, 32 interleaved)
constexpr int64_t PF_ROWS_AVX2 = 16;

// g % 32 == 0.  Four rows at a time share the activation loads.
__attribute__((target("avx2,fma"))) void int4_rows_avx2(const A8 &a, const uint8_t *q, const uint16_t *s,
                                                        const uint16_t *z, uint16_t *y, int64_t M, int64_t N,
                                                        int64_t K, int64_t g, int64_t n0, int64_t n1) {
    const int64_t G = K / g, KB = K / 2, B = K / 32, bpg = g / 32, C = a.C, Cf = B / 4;
    for (int64_t m = 0; m < M; m++) {
        const int8_t *xb = a.xb.data() + m * C * 128;
        const float *dl = a.dl.data() + m * C * 16, *ds = a.ds.data() + m * C * 16;
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) {
            __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
            const uint8_t *q0 = q + n * KB;
            const uint16_t *s0 = s + n * G, *z0 = z + n * G;
            for (int64_t c = 0; c < C; c++) {
                const uint8_t *pf = q0 + PF_ROWS_AVX2 * KB + c * 64;
                for (int r = 0; r < 4; r++) _mm_prefetch(reinterpret_cast<const char *>(pf + r * KB), _MM_HINT_T0);
                for (int h = 0; h < 2; h++) {
                    const int64_t b0 = 4 * c + 2 * h;
                    if (c >= Cf && b0 >= B) break;
                    const bool two = c < Cf || b0 + 1 < B;
                    const __m256i e = ld256(xb + c * 128 + 32 * h), o = ld256(xb + c * 128 + 64 + 32 * h);
                    const __m256 dv = _mm256_loadu_ps(dl + c * 16 + 8 * h), sv8 = _mm256_loadu_ps(ds + c * 16 + 8 * h);
                    const uint8_t *p = q0 + c * 64 + 32 * h;
                    acc0 = half_row(acc0, p, s0, z0, b0, bpg, two, e, o, dv, sv8);
                    acc1 = half_row(acc1, p + KB, s0 + G, z0 + G, b0, bpg, two, e, o, dv, sv8);
                    acc2 = half_row(acc2, p + 2 * KB, s0 + 2 * G, z0 + 2 * G, b0, bpg, two, e, o, dv, sv8);
                    acc3 = half_row(acc3, p + 3 * KB, s0 + 3 * G, z0 + 3 * G, b0, bpg, two, e, o, dv, sv8);
                }
            }
            y[m * N + n] = to_bf16(hsum8(acc0));
            y[m * N + n + 1] = to_bf16(hsum8(acc1));
            y[m * N + n + 2] = to_bf16(hsum8(acc2));
            y[m * N + n + 3] = to_bf16(hsum8(acc3));
        }
        for (; n < n1; n++) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t b0 = 0; b0 < B; b0 += 2) {
                const int64_t c = b0 / 4;
                const int h = static_cast<int>((b0 % 4) / 2);
                acc = half_row(acc, q + n * KB + b0 * 16, s + n * G, z + n * G, b0, bpg, b0 + 1 < B,
                               ld256(xb + c * 128 + 32 * h), ld256(xb + c * 128 + 64 + 32 * h), _mm256_loadu_ps(dl + c * 16 + 8 * h), _mm256_loadu_ps(ds + c * 16 + 8 * h));
            }
            y[m * N + n] = to_bf16(hsum8(acc));
        }
    }
}

// 16 int8 weights -> fp32
__attribute__((target("avx512f,avx512bw"), always_inline)) inline __m512 widen8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))));
}

// 16 weights per step: K % 16 == 0.  x converted to fp32 once per call.
__attribute__((target("avx512f,avx512bw"))) void int8_rows_avx512(const float *xf, const int8_t *q,
                                                                  const uint16_t *s, uint16_t *y, int64_t M,
                                                                  int64_t N, int64_t K, int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = xf + m * K;
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) {
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
                   a3 = _mm512_setzero_ps();
            const int8_t *r = q + n * K;
            for (int64_t k = 0; k < K; k += 16) {
                if (k % 64 == 0)
                    for (int i = 0; i < 4; i++)
                        _mm_prefetch(reinterpret_cast<const char *>(r + (PF_ROWS + i) * K + k), _MM_HINT_T0);
                const __m512 xv = _mm512_loadu_ps(xm + k);
                a0 = _mm512_fmadd_ps(widen8(r + k), xv, a0);
                a1 = _mm512_fmadd_ps(widen8(r + K + k), xv, a1);
                a2 = _mm512_fmadd_ps(widen8(r + 2 * K + k), xv, a2);
                a3 = _mm512_fmadd_ps(widen8(r + 3 * K + k), xv, a3);
            }
            y[m * N + n] = to_bf16(_mm512_reduce_add_ps(a0) * bf(s[n]));
            y[m * N + n + 1] = to_bf16(_mm512_reduce_add_ps(a1) * bf(s[n + 1]));
            y[m * N + n + 2] = to_bf16(_mm512_reduce_add_ps(a2) * bf(s[n + 2]));
            y[m * N + n + 3] = to_bf16(_mm512_reduce_add_ps(a3) * bf(s[n + 3]));
        }
        for (; n < n1; n++) {
            __m512 a = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k += 16)
                a = _mm512_fmadd_ps(widen8(q + n * K + k), _mm512_loadu_ps(xm + k), a);
            y[m * N + n] = to_bf16(_mm512_reduce_add_ps(a) * bf(s[n]));
        }
    }
}

// ---- int8 weights x int16 activations (AVX512-VNNI vpdpwssd) ----
// Each activation row is quantized to int16 with one scale, d = max|x| / A16 and xq = round(x / d) (|xq| <= A16,
// 15 bits: at least bf16's 8 significant bits for every element within 2^7 of the row's largest).  32 products a
// vpdpwssd (widened codes x xq, pairs summed into 32-bit lanes), exact in int32 over segments of K16_SEG, then
// y = s * d * sum in fp32.  Against the fp32 path: ~3x fewer vector operations per weight (a sign-extension and a
// dot product per 32 weights instead of a widening, a conversion and an FMA per 16): the head (49152 x 576)
// is compute-bound on one core there (~26 GB/s a core, in cache or not).
constexpr int A16 = 16383;
constexpr int64_t K16_SEG = 4096;  // a lane sums K16_SEG / 16 = 256 products of at most A16 * 128 each: < 2^30

struct X16 {
    std::vector<int16_t> q;  // (M, K)
    std::vector<float> d;    // (M,)
};

X16 quantize_x16(const uint16_t *x, int64_t M, int64_t K) {
    X16 a;
    a.q.resize(M * K);
    a.d.resize(M);
    for (int64_t m = 0; m < M; m++) {
        float amax = 0.f;
        for (int64_t k = 0; k < K; k++) amax = std::max(amax, std::fabs(bf(x[m * K + k])));
        const float inv = amax > 0.f ? static_cast<float>(A16) / amax : 0.f;
        a.d[m] = amax / static_cast<float>(A16);
        for (int64_t k = 0; k < K; k++)
            a.q[m * K + k] = static_cast<int16_t>(std::nearbyint(bf(x[m * K + k]) * inv));  // nearest even
    }
    return a;
}

OAG_VNNI __m512i dot32_i8i16(__m512i acc, const int8_t *w, __m512i xv) {
    return _mm512_dpwssd_epi32(acc, _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(w))), xv);
}

// 32 weights a step: K % 32 == 0.  Four rows at a time share the activation loads.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void int8_rows_vnni(
    const X16 &a, const int8_t *q, const uint16_t *s, uint16_t *y, int64_t M, int64_t N, int64_t K, int64_t n0,
    int64_t n1) {
    for (int64_t m = 0; m < M; m++) {
        const int16_t *xm = a.q.data() + m * K;
        const float dm = a.d[m];
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) {
            __m512 f0 = _mm512_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
            const int8_t *r = q + n * K;
            for (int64_t k0 = 0; k0 < K; k0 += K16_SEG) {
                __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
                for (int64_t k = k0; k < std::min(K, k0 + K16_SEG); k += 32) {
                    if (k % 64 == 0)
                        for (int i = 0; i < 4; i++)
                            _mm_prefetch(reinterpret_cast<const char *>(r + (PF_ROWS + i) * K + k), _MM_HINT_T0);
                    const __m512i xv = _mm512_loadu_si512(xm + k);
                    a0 = dot32_i8i16(a0, r + k, xv);
                    a1 = dot32_i8i16(a1, r + K + k, xv);
                    a2 = dot32_i8i16(a2, r + 2 * K + k, xv);
                    a3 = dot32_i8i16(a3, r + 3 * K + k, xv);
                }
                f0 = _mm512_add_ps(f0, _mm512_cvtepi32_ps(a0));
                f1 = _mm512_add_ps(f1, _mm512_cvtepi32_ps(a1));
                f2 = _mm512_add_ps(f2, _mm512_cvtepi32_ps(a2));
                f3 = _mm512_add_ps(f3, _mm512_cvtepi32_ps(a3));
            }
            const __m128 sv = _mm_castsi128_ps(_mm_slli_epi32(
                _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(s + n))), 16));
            store4_bf16(y + m * N + n, _mm_mul_ps(_mm_mul_ps(reduce4(f0, f1, f2, f3), sv), _mm_set1_ps(dm)));
        }
        for (; n < n1; n++) {
            __m512 f = _mm512_setzero_ps();
            for (int64_t k0 = 0; k0 < K; k0 += K16_SEG) {
                __m512i acc = _mm512_setzero_si512();
                for (int64_t k = k0; k < std::min(K, k0 + K16_SEG); k += 32)
                    acc = dot32_i8i16(acc, q + n * K + k, _mm512_loadu_si512(xm + k));
                f = _mm512_add_ps(f, _mm512_cvtepi32_ps(acc));
            }
            y[m * N + n] = to_bf16(_mm512_reduce_add_ps(f) * bf(s[n]) * dm);
        }
    }
}

// 8 int8 weights -> fp32
OAG_AVX2 __m256 widen8_avx2(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(p))));
}

// as int8_rows_avx512, 8 weights a step (two steps an iteration: K % 16 == 0)
__attribute__((target("avx2,fma"))) void int8_rows_avx2(const float *xf, const int8_t *q, const uint16_t *s,
                                                        uint16_t *y, int64_t M, int64_t N, int64_t K, int64_t n0,
                                                        int64_t n1) {
    for (int64_t m = 0; m < M; m++) {
        const float *xm = xf + m * K;
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) {
            __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            const int8_t *r = q + n * K;
            for (int64_t k = 0; k < K; k += 16) {
                if (k % 64 == 0)
                    for (int i = 0; i < 4; i++)
                        _mm_prefetch(reinterpret_cast<const char *>(r + (PF_ROWS + i) * K + k), _MM_HINT_T0);
                const __m256 x0 = _mm256_loadu_ps(xm + k), x1 = _mm256_loadu_ps(xm + k + 8);
                for (int i = 0; i < 4; i++) {
                    a[i] = _mm256_fmadd_ps(widen8_avx2(r + i * K + k), x0, a[i]);
                    a[i] = _mm256_fmadd_ps(widen8_avx2(r + i * K + k + 8), x1, a[i]);
                }
            }
            for (int i = 0; i < 4; i++) y[m * N + n + i] = to_bf16(hsum8(a[i]) * bf(s[n + i]));
        }
        for (; n < n1; n++) {
            __m256 a = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k += 8) a = _mm256_fmadd_ps(widen8_avx2(q + n * K + k), _mm256_loadu_ps(xm + k), a);
            y[m * N + n] = to_bf16(hsum8(a) * bf(s[n]));
        }
    }
}
#endif

// ---- decode attention: one query position per row against the cache ----
// A work item is (row b, kv head, group of up to 4 of its query heads, chunk of slots): K and V are read once for
// all the heads of a group (grouped-query attention, as SDPA's enable_gqa: query head h reads kv head h / (H/KV)).
// Each item leaves, per head, its chunk's running max m, sum of exp l and unnormalized output o; the chunks of a
// row are merged afterwards (flash-decoding), so a row of few kv heads still spreads over the threads. Slots past
// the last one the mask allows are not read; masked ones before it are excluded. Scores, softmax and sums in fp32;
// K and V fp32, bf16 or fp16 (a strided view of the cache: only the last dimension must be contiguous), or int8 with
// an fp16 scale per (row, kv head, slot) each (the int8 KV cache): a score is the dot with the codes times the key's
// scale, and a value's weight is its probability times the value's scale.
enum Dt : int { F32 = 0, BF16 = 1, F16 = 2, I8 = 3 };

struct AttnArgs {
    const void *q, *k, *v;
    const bool *mask;
    Dt qt, kvt;
    int64_t B, H, KV, S, D;
    int64_t qs0, qs1;       // q strides (elements) over b, h
    int64_t ks0, ks1, ks2;  // k strides over b, kv head, slot
    int64_t vs0, vs1, vs2;
    int64_t ms0, ms3;       // mask strides over b, slot (0 where broadcast)
    float scale;
    const c10::Half *ksc = nullptr, *vsc = nullptr;  // I8: the scales, contiguous over slots
    int64_t kss0 = 0, kss1 = 0, vss0 = 0, vss1 = 0;  // their strides over b, kv head
};

// I8: the scores of slots [j0, j0 + n) of one head times their keys' scales
inline void scale_scores(const AttnArgs &a, int64_t b, int64_t kvh, int64_t j0, int64_t n, float *sg) {
    const c10::Half *s = a.ksc + b * a.kss0 + kvh * a.kss1 + j0;
    for (int64_t j = 0; j < n; j++) sg[j] *= static_cast<float>(s[j]);
}
// I8: the probabilities (already summed) times their values' scales: the weights of the codes
inline void scale_probs(const AttnArgs &a, int64_t b, int64_t kvh, int64_t j0, int64_t n, float *sg) {
    const c10::Half *s = a.vsc + b * a.vss0 + kvh * a.vss1 + j0;
    for (int64_t j = 0; j < n; j++) sg[j] *= static_cast<float>(s[j]);
}
// (args, b, first query head, its count, slots [j0, j1), scratch for scores, partials: per head o[D], m, l)
using AttnItem = void (*)(const AttnArgs &, int64_t, int64_t, int64_t, int64_t, int64_t, float *, float *);

inline float ld(const void *p, int64_t i, Dt t) {
    if (t == I8) return static_cast<float>(static_cast<const int8_t *>(p)[i]);
    if (t == BF16) return bf(static_cast<const uint16_t *>(p)[i]);
    if (t == F16) return static_cast<float>(static_cast<const c10::Half *>(p)[i]);
    return static_cast<const float *>(p)[i];
}

// the slots a row reads are [0, last allowed + 1)
int64_t attn_extent(const AttnArgs &a, int64_t b) {
    const bool *m = a.mask + b * a.ms0;
    for (int64_t j = a.S - 1; j >= 0; j--)
        if (m[j * a.ms3]) return j + 1;
    return 0;
}

void attn_scalar(const AttnArgs &a, int64_t b, int64_t h0, int64_t gb, int64_t j0, int64_t j1, float *sc,
                 float *part) {
    const int64_t kvh = h0 / (a.H / a.KV), D = a.D;
    const bool *m = a.mask + b * a.ms0;
    const int64_t ko = b * a.ks0 + kvh * a.ks1, vo = b * a.vs0 + kvh * a.vs1;
    for (int64_t g = 0; g < gb; g++) {
        const int64_t qo = b * a.qs0 + (h0 + g) * a.qs1;
        float *o = part + g * (D + 2), mx = -INFINITY, l = 0.f;
        for (int64_t j = j0; j < j1; j++) {
            if (!m[j * a.ms3]) continue;
            float s = 0.f;
            for (int64_t d = 0; d < D; d++) s += ld(a.q, qo + d, a.qt) * ld(a.k, ko + j * a.ks2 + d, a.kvt);
            sc[j - j0] = s * a.scale;
            if (a.kvt == I8) sc[j - j0] *= static_cast<float>(a.ksc[b * a.kss0 + kvh * a.kss1 + j]);
            mx = std::max(mx, sc[j - j0]);
        }
        for (int64_t d = 0; d < D; d++) o[d] = 0.f;
        for (int64_t j = j0; j < j1; j++) {
            if (!m[j * a.ms3]) continue;
            const float p = std::exp(sc[j - j0] - mx);
            l += p;
            const float w = a.kvt == I8 ? p * static_cast<float>(a.vsc[b * a.vss0 + kvh * a.vss1 + j]) : p;
            for (int64_t d = 0; d < D; d++) o[d] += w * ld(a.v, vo + j * a.vs2 + d, a.kvt);
        }
        o[D] = mx, o[D + 1] = l;
    }
}

#ifdef OAG_X86
#define OAG_F512 __attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline

OAG_F512 __m512 ld16(const void *p, int64_t i, Dt t) {
    if (t == F32) return _mm512_loadu_ps(static_cast<const float *>(p) + i);
    if (t == I8)
        return _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(static_cast<const int8_t *>(p) + i))));
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(static_cast<const uint16_t *>(p) + i));
    if (t == F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// e^x for x <= 0 (lanes below -87 give 0): 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p of degree 6 (~1e-7)
OAG_F512 __m512 exp_neg(__m512 x) {
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_LT_OQ);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~tiny), p, n);
}

constexpr int64_t ATTN_PF = 8;  // slots ahead

// C = D / 16 chunks of a head, GB query heads h0.. of one kv head: the queries and outputs stay in registers.
// sc: GB * (j1 - j0 + 16) floats of scratch
template <int C, int GB>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void attn_avx512(const AttnArgs &a, int64_t b, int64_t h0,
                                                                     int64_t, int64_t j0, int64_t j1, float *sc,
                                                                     float *part) {
    const int64_t kvh = h0 / (a.H / a.KV), n = j1 - j0, SS = n + 16, D = a.D;
    const bool *m = a.mask + b * a.ms0 + j0 * a.ms3;
    const int64_t ko = b * a.ks0 + kvh * a.ks1 + j0 * a.ks2, vo = b * a.vs0 + kvh * a.vs1 + j0 * a.vs2;
    __m512 q[GB][C];
    for (int g = 0; g < GB; g++)
        for (int c = 0; c < C; c++)
            q[g][c] = _mm512_mul_ps(ld16(a.q, b * a.qs0 + (h0 + g) * a.qs1 + 16 * c, a.qt), _mm512_set1_ps(a.scale));
    // scores, four slots at a time. The cache comes from memory (it is larger than L2 over all layers) in short
    // per-head runs the hardware prefetcher barely ramps up on: K rows are prefetched ATTN_PF slots ahead, and the V
    // rows too, into L2, for the weighted sum that follows
    const int64_t esz = a.kvt == F32 ? 4 : a.kvt == I8 ? 1 : 2, row = D * esz;
    const char *kb = static_cast<const char *>(a.k) + ko * esz, *vb = static_cast<const char *>(a.v) + vo * esz;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const int64_t k0 = ko + j * a.ks2;
        for (int64_t r = j + ATTN_PF; r < std::min(j + ATTN_PF + 4, n); r++)
            for (int64_t off = 0; off < row; off += 64) {
                _mm_prefetch(kb + r * a.ks2 * esz + off, _MM_HINT_T0);
                _mm_prefetch(vb + r * a.vs2 * esz + off, _MM_HINT_T1);
            }
        for (int g = 0; g < GB; g++) {
            __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
            for (int c = 0; c < C; c++) {
                s0 = _mm512_fmadd_ps(q[g][c], ld16(a.k, k0 + 16 * c, a.kvt), s0);
                s1 = _mm512_fmadd_ps(q[g][c], ld16(a.k, k0 + a.ks2 + 16 * c, a.kvt), s1);
                s2 = _mm512_fmadd_ps(q[g][c], ld16(a.k, k0 + 2 * a.ks2 + 16 * c, a.kvt), s2);
                s3 = _mm512_fmadd_ps(q[g][c], ld16(a.k, k0 + 3 * a.ks2 + 16 * c, a.kvt), s3);
            }
            _mm_storeu_ps(sc + g * SS + j, reduce4(s0, s1, s2, s3));
        }
    }
    for (; j < n; j++)
        for (int g = 0; g < GB; g++) {
            __m512 s = _mm512_setzero_ps();
            for (int c = 0; c < C; c++) s = _mm512_fmadd_ps(q[g][c], ld16(a.k, ko + j * a.ks2 + 16 * c, a.kvt), s);
            sc[g * SS + j] = _mm512_reduce_add_ps(s);
        }
    if (a.kvt == I8)
        for (int g = 0; g < GB; g++) scale_scores(a, b, kvh, j0, n, sc + g * SS);
    // exp(s - max) over the allowed slots (the others get weight 0)
    for (int g = 0; g < GB; g++) {
        float *sg = sc + g * SS, mx = -INFINITY;
        if (a.ms3 == 1) {  // the mask's bytes 16 at a time
            __m512 mv = _mm512_set1_ps(-INFINITY);
            for (j = 0; j < n; j += 16) {
                const __mmask16 t = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
                const __m128i mb = _mm_maskz_loadu_epi8(t, m + j);
                const __mmask16 ok = _mm_test_epi8_mask(mb, mb);
                mv = _mm512_mask_max_ps(mv, ok, mv, _mm512_maskz_loadu_ps(ok, sg + j));
                _mm512_mask_storeu_ps(sg + j, t & ~ok, _mm512_set1_ps(-INFINITY));
            }
            mx = _mm512_reduce_max_ps(mv);
        } else {
            for (j = 0; j < n; j++)
                if (m[j * a.ms3]) mx = std::max(mx, sg[j]);
                else sg[j] = -INFINITY;
        }
        __m512 sum = _mm512_setzero_ps();
        const __m512 mxv = _mm512_set1_ps(mx);
        for (j = 0; j < n; j += 16) {
            const __mmask16 t = n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
            const __m512 s = _mm512_maskz_loadu_ps(t, sg + j);
            const __mmask16 valid = _mm512_mask_cmp_ps_mask(t, s, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
            const __m512 p = _mm512_maskz_mov_ps(valid, exp_neg(_mm512_sub_ps(s, mxv)));
            _mm512_mask_storeu_ps(sg + j, t, p);
            sum = _mm512_add_ps(sum, p);
        }
        part[g * (D + 2) + D] = mx;
        part[g * (D + 2) + D + 1] = _mm512_reduce_add_ps(sum);
        if (a.kvt == I8) scale_probs(a, b, kvh, j0, n, sg);
    }
    __m512 o[GB][C];
    for (int g = 0; g < GB; g++)
        for (int c = 0; c < C; c++) o[g][c] = _mm512_setzero_ps();
    for (j = 0; j < n; j++) {
        if (j + ATTN_PF < n)
            for (int64_t off = 0; off < row; off += 64) _mm_prefetch(vb + (j + ATTN_PF) * a.vs2 * esz + off, _MM_HINT_T0);
        if (!m[j * a.ms3]) continue;
        const int64_t v0 = vo + j * a.vs2;
        for (int c = 0; c < C; c++) {
            const __m512 vv = ld16(a.v, v0 + 16 * c, a.kvt);
            for (int g = 0; g < GB; g++) o[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(sc[g * SS + j]), vv, o[g][c]);
        }
    }
    for (int g = 0; g < GB; g++)
        for (int c = 0; c < C; c++) _mm512_storeu_ps(part + g * (D + 2) + 16 * c, o[g][c]);
}

template <int C>
AttnItem attn_avx512_gb(int64_t gb) {
    switch (gb) {
        case 1: return attn_avx512<C, 1>;
        case 2: return attn_avx512<C, 2>;
        case 3: return attn_avx512<C, 3>;
        default: return attn_avx512<C, 4>;
    }
}

// the vectorized kernel for this head size and group of query heads (1-4), or nullptr (the scalar path)
AttnItem attn_avx512_for(int64_t D, int64_t gb) {
    switch (D) {
        case 16: return attn_avx512_gb<1>(gb);
        case 32: return attn_avx512_gb<2>(gb);
        case 64: return attn_avx512_gb<4>(gb);
        case 80: return attn_avx512_gb<5>(gb);
        case 96: return attn_avx512_gb<6>(gb);
        case 128: return attn_avx512_gb<8>(gb);
        case 256: return attn_avx512_gb<16>(gb);
        default: return nullptr;
    }
}
// ---- the same attention on AVX2 + FMA + F16C (8 lanes; the queries and outputs of a group spill to L1 when
// they outgrow the 16 registers) ----
#define OAG_F256 __attribute__((target("avx2,fma,f16c"), always_inline)) inline

OAG_F256 __m256 ld8(const void *p, int64_t i, Dt t) {
    if (t == F32) return _mm256_loadu_ps(static_cast<const float *>(p) + i);
    if (t == I8)
        return _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i *>(static_cast<const int8_t *>(p) + i))));
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i *>(static_cast<const uint16_t *>(p) + i));
    if (t == F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// exp_neg's polynomial on 8 lanes; 2^n built in the exponent field (n in [-126, 0] for x >= -87)
OAG_F256 __m256 exp_neg8(__m256 x) {
    const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
    __m256 p = _mm256_set1_ps(1.f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(_mm256_max_ps(n, _mm256_set1_ps(-126.f))),
                                                         _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

OAG_F256 __m128 reduce4_256(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// as attn_avx512 with C = D / 8 chunks of a head
template <int C, int GB>
__attribute__((target("avx2,fma,f16c"))) void attn_avx2(const AttnArgs &a, int64_t b, int64_t h0, int64_t,
                                                        int64_t j0, int64_t j1, float *sc, float *part) {
    const int64_t kvh = h0 / (a.H / a.KV), n = j1 - j0, SS = n + 16, D = a.D;
    const bool *m = a.mask + b * a.ms0 + j0 * a.ms3;
    const int64_t ko = b * a.ks0 + kvh * a.ks1 + j0 * a.ks2, vo = b * a.vs0 + kvh * a.vs1 + j0 * a.vs2;
    __m256 q[GB][C];
    for (int g = 0; g < GB; g++)
        for (int c = 0; c < C; c++)
            q[g][c] = _mm256_mul_ps(ld8(a.q, b * a.qs0 + (h0 + g) * a.qs1 + 8 * c, a.qt), _mm256_set1_ps(a.scale));
    const int64_t esz = a.kvt == F32 ? 4 : a.kvt == I8 ? 1 : 2, row = D * esz;
    const char *kb = static_cast<const char *>(a.k) + ko * esz, *vb = static_cast<const char *>(a.v) + vo * esz;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const int64_t k0 = ko + j * a.ks2;
        for (int64_t r = j + ATTN_PF; r < std::min(j + ATTN_PF + 4, n); r++)
            for (int64_t off = 0; off < row; off += 64) {
                _mm_prefetch(kb + r * a.ks2 * esz + off, _MM_HINT_T0);
                _mm_prefetch(vb + r * a.vs2 * esz + off, _MM_HINT_T1);
            }
        for (int g = 0; g < GB; g++) {
            __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
            for (int c = 0; c < C; c++) {
                s0 = _mm256_fmadd_ps(q[g][c], ld8(a.k, k0 + 8 * c, a.kvt), s0);
                s1 = _mm256_fmadd_ps(q[g][c], ld8(a.k, k0 + a.ks2 + 8 * c, a.kvt), s1);
                s2 = _mm256_fmadd_ps(q[g][c], ld8(a.k, k0 + 2 * a.ks2 + 8 * c, a.kvt), s2);
                s3 = _mm256_fmadd_ps(q[g][c], ld8(a.k, k0 + 3 * a.ks2 + 8 * c, a.kvt), s3);
            }
            _mm_storeu_ps(sc + g * SS + j, reduce4_256(s0, s1, s2, s3));
        }
    }
    for (; j < n; j++)
        for (int g = 0; g < GB; g++) {
            __m256 s = _mm256_setzero_ps();
            for (int c = 0; c < C; c++) s = _mm256_fmadd_ps(q[g][c], ld8(a.k, ko + j * a.ks2 + 8 * c, a.kvt), s);
            sc[g * SS + j] = hsum8(s);
        }
    if (a.kvt == I8)
        for (int g = 0; g < GB; g++) scale_scores(a, b, kvh, j0, n, sc + g * SS);
    // exp(s - max) over the allowed slots (the others get weight 0)
    for (int g = 0; g < GB; g++) {
        float *sg = sc + g * SS, mx = -INFINITY;
        for (j = 0; j < n; j++)
            if (m[j * a.ms3]) mx = std::max(mx, sg[j]);
            else sg[j] = -INFINITY;
        __m256 sum = _mm256_setzero_ps();
        const __m256 mxv = _mm256_set1_ps(mx), ninf = _mm256_set1_ps(-INFINITY);
        for (j = 0; j + 8 <= n; j += 8) {
            const __m256 s = _mm256_loadu_ps(sg + j);
            const __m256 p = _mm256_and_ps(_mm256_cmp_ps(s, ninf, _CMP_NEQ_OQ), exp_neg8(_mm256_sub_ps(s, mxv)));
            _mm256_storeu_ps(sg + j, p);
            sum = _mm256_add_ps(sum, p);
        }
        float l = hsum8(sum);
        for (; j < n; j++) {
            sg[j] = sg[j] == -INFINITY ? 0.f : std::exp(sg[j] - mx);
            l += sg[j];
        }
        part[g * (D + 2) + D] = mx;
        part[g * (D + 2) + D + 1] = l;
        if (a.kvt == I8) scale_probs(a, b, kvh, j0, n, sg);
    }
    __m256 o[GB][C];
    for (int g = 0; g < GB; g++)
        for (int c = 0; c < C; c++) o[g][c] = _mm256_setzero_ps();
    for (j = 0; j < n; j++) {
        if (j + ATTN_PF < n)
            for (int64_t off = 0; off < row; off += 64) _mm_prefetch(vb + (j + ATTN_PF) * a.vs2 * esz + off, _MM_HINT_T0);
        if (!m[j * a.ms3]) continue;
        const int64_t v0 = vo + j * a.vs2;
        for (int c = 0; c < C; c++) {
            const __m256 vv = ld8(a.v, v0 + 8 * c, a.kvt);
            for (int g = 0; g < GB; g++) o[g][c] = _mm256_fmadd_ps(_mm256_set1_ps(sc[g * SS + j]), vv, o[g][c]);
        }
    }
    for (int g = 0; g < GB; g++)
        for (int c = 0; c < C; c++) _mm256_storeu_ps(part + g * (D + 2) + 8 * c, o[g][c]);
}

template <int C>
AttnItem attn_avx2_gb(int64_t gb) {
    switch (gb) {
        case 1: return attn_avx2<C, 1>;
        case 2: return attn_avx2<C, 2>;
        case 3: return attn_avx2<C, 3>;
        default: return attn_avx2<C, 4>;
    }
}

AttnItem attn_avx2_for(int64_t D, int64_t gb) {
    switch (D) {
        case 16: return attn_avx2_gb<2>(gb);
        case 32: return attn_avx2_gb<4>(gb);
        case 64: return attn_avx2_gb<8>(gb);
        case 80: return attn_avx2_gb<10>(gb);
        case 96: return attn_avx2_gb<12>(gb);
        case 128: return attn_avx2_gb<16>(gb);
        default: return nullptr;  // 256: the queries and outputs of a group would not fit in L1's share
    }
}
#endif

bool has(const char *feature) {
#ifdef OAG_X86
    __builtin_cpu_init();
    if (!std::strcmp(feature, "avx512bf16"))
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
    if (!std::strcmp(feature, "avx512vnni"))
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    if (!std::strcmp(feature, "avx512")) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    if (!std::strcmp(feature, "avx2")) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    (void)feature;
    return false;
}

// the path a call takes: 1 = vectorized, 0 = scalar (forced to 0 with path=0, for the tests)
int64_t int4_path(int64_t g) { return (g % 32 == 0 && has("avx512bf16")) ? 1 : 0; }
// int4_gemv_a8 has no scalar path: 2 = AVX512-VNNI (groups of 32 x a power of two: see int4_rows_vnni), 1 = AVX2,
// 0 = not available
int64_t int4_a8_path(int64_t g) {
    if (g <= 0 || g % 32) return 0;
    const int64_t bpg = g / 32;
    return (bpg & (bpg - 1)) == 0 && has("avx512vnni") ? 2 : has("avx2") ? 1 : 0;
}
// 1 = AVX2, 2 = AVX-512 (fp32 activations), 3 = AVX512-VNNI (int16 activations, K % 32 == 0)
int64_t int8_path(int64_t K) {
    if (K % 16) return 0;
    return K % 32 == 0 && has("avx512vnni") ? 3 : has("avx512") ? 2 : has("avx2") ? 1 : 0;
}
int64_t attn_path(int64_t D) {
#ifdef OAG_X86
    if (has("avx512") && attn_avx512_for(D, 1) != nullptr) return 2;
    if (has("avx2") && __builtin_cpu_supports("f16c") && attn_avx2_for(D, 1) != nullptr) return 1;
#endif
    (void)D;
    return 0;
}

constexpr int64_t GRAIN = 64;  // rows a thread takes at least
constexpr int64_t ATTN_GRAIN = 16384;
constexpr int64_t ATTN_MIN_SLOTS = 64;

void check_x(const at::Tensor &x, int64_t K) {
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be (M, ", K, "), got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "x must be bf16");
}

at::Tensor int4_gemv(const at::Tensor &x_, const at::Tensor &qweight_, const at::Tensor &scales_,
                     const at::Tensor &zeros_, int64_t g, int64_t path) {
    const int64_t N = qweight_.size(0), K = qweight_.size(1) * 2;
    TORCH_CHECK(g > 0 && K % g == 0 && g % 2 == 0, "group size ", g, " does not divide K=", K);
    check_x(x_, K);
    TORCH_CHECK(qweight_.scalar_type() == at::kByte, "qweight must be uint8");
    TORCH_CHECK(scales_.sizes() == zeros_.sizes() && scales_.size(0) == N && scales_.size(1) == K / g,
                "scales/zeros must be (N, K/g)");
    TORCH_CHECK(scales_.scalar_type() == at::kBFloat16 && zeros_.scalar_type() == at::kBFloat16,
                "scales/zeros must be bf16");
    const at::Tensor x = x_.contiguous(), qw = qweight_.contiguous(), sc = scales_.contiguous(),
                     ze = zeros_.contiguous();
    const int64_t M = x.size(0);
    at::Tensor y = at::empty({M, N}, x.options());
    const auto *xp = reinterpret_cast<const uint16_t *>(x.data_ptr());
    const auto *qp = qw.data_ptr<uint8_t>();
    const auto *sp = reinterpret_cast<const uint16_t *>(sc.data_ptr());
    const auto *zp = reinterpret_cast<const uint16_t *>(ze.data_ptr());
    auto *yp = reinterpret_cast<uint16_t *>(y.data_ptr());
    const std::vector<float> xs = group_sums(xp, M, K, g);
    const int64_t use = path < 0 ? int4_path(g) : std::min(path, int4_path(g));
    at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
#ifdef OAG_X86
        if (use == 1) return int4_rows_avx512bf16(xp, xs.data(), qp, sp, zp, yp, M, N, K, g, n0, n1);
#endif
        int4_rows_scalar(xp, xs.data(), qp, sp, zp, yp, M, N, K, g, n0, n1);
    });
    return y;
}

// int8 activations per block of 8 (see quantize_a8): only where the CPU has AVX2 (or AVX512-VNNI) and g % 32 == 0
at::Tensor int4_gemv_a8(const at::Tensor &x_, const at::Tensor &qweight_, const at::Tensor &scales_,
                        const at::Tensor &zeros_, int64_t g, int64_t path) {
    const int64_t N = qweight_.size(0), K = qweight_.size(1) * 2;
    TORCH_CHECK(g > 0 && K % g == 0 && g % 2 == 0, "group size ", g, " does not divide K=", K);
    const int64_t best = int4_a8_path(g), use = path < 0 ? best : path;
    TORCH_CHECK(best > 0, "int4_gemv_a8 needs AVX2 or AVX512-VNNI and a group size that is a multiple of 32");
    TORCH_CHECK(use >= 1 && use <= best, "int4_gemv_a8: code path ", path, " is not available here");
    check_x(x_, K);
    TORCH_CHECK(qweight_.scalar_type() == at::kByte, "qweight must be uint8");
    TORCH_CHECK(scales_.sizes() == zeros_.sizes() && scales_.size(0) == N && scales_.size(1) == K / g,
                "scales/zeros must be (N, K/g)");
    TORCH_CHECK(scales_.scalar_type() == at::kBFloat16 && zeros_.scalar_type() == at::kBFloat16,
                "scales/zeros must be bf16");
    const at::Tensor x = x_.contiguous(), qw = qweight_.contiguous(), sc = scales_.contiguous(),
                     ze = zeros_.contiguous();
    const int64_t M = x.size(0);
    at::Tensor y = at::empty({M, N}, x.options());
    const auto *qp = qw.data_ptr<uint8_t>();
    const auto *sp = reinterpret_cast<const uint16_t *>(sc.data_ptr());
    const auto *zp = reinterpret_cast<const uint16_t *>(ze.data_ptr());
    auto *yp = reinterpret_cast<uint16_t *>(y.data_ptr());
#ifdef OAG_X86
    const auto *xp = reinterpret_cast<const uint16_t *>(x.data_ptr());
    const A8 a = use == 2 ? quantize_a8(xp, M, K, g) : quantize_a8_avx2(xp, M, K, g);
    at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
        if (use == 2) int4_rows_vnni(a, qp, sp, zp, yp, M, N, K, g, n0, n1);
        else int4_rows_avx2(a, qp, sp, zp, yp, M, N, K, g, n0, n1);
    });
#endif
    return y;
}

at::Tensor int8_gemv(const at::Tensor &x_, const at::Tensor &qweight_, const at::Tensor &scales_, int64_t path) {
    const int64_t N = qweight_.size(0), K = qweight_.size(1);
    check_x(x_, K);
    TORCH_CHECK(qweight_.scalar_type() == at::kChar, "qweight must be int8");
    TORCH_CHECK(scales_.dim() == 1 && scales_.size(0) == N && scales_.scalar_type() == at::kBFloat16,
                "scales must be (N,) bf16");
    const at::Tensor x = x_.contiguous(), qw = qweight_.contiguous(), sc = scales_.contiguous();
    const int64_t M = x.size(0);
    at::Tensor y = at::empty({M, N}, x.options());
    const auto *xp = reinterpret_cast<const uint16_t *>(x.data_ptr());
    const auto *qp = qw.data_ptr<int8_t>();
    const auto *sp = reinterpret_cast<const uint16_t *>(sc.data_ptr());
    auto *yp = reinterpret_cast<uint16_t *>(y.data_ptr());
    const int64_t use = path < 0 ? int8_path(K) : std::min(path, int8_path(K));
    std::vector<float> xf;
    if (use == 1 || use == 2) {
        xf.resize(M * K);
        for (int64_t i = 0; i < M * K; i++) xf[i] = bf(xp[i]);
    }
    const X16 x16 = use == 3 ? quantize_x16(xp, M, K) : X16{};
    at::parallel_for(0, N, GRAIN, [&](int64_t n0, int64_t n1) {
#ifdef OAG_X86
        if (use == 3) return int8_rows_vnni(x16, qp, sp, yp, M, N, K, n0, n1);
        if (use == 2) return int8_rows_avx512(xf.data(), qp, sp, yp, M, N, K, n0, n1);
        if (use == 1) return int8_rows_avx2(xf.data(), qp, sp, yp, M, N, K, n0, n1);
#endif
        int8_rows_scalar(xp, qp, sp, yp, M, N, K, n0, n1);
    });
    return y;
}

Dt dt_of(const at::Tensor &t) {
    return t.scalar_type() == at::kBFloat16 ? BF16 : t.scalar_type() == at::kHalf ? F16 : F32;
}

bool attn_dtype(const at::Tensor &t) {
    return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

// q (B, H, 1, D), k/v (>= B, KV, S, D) (views of the cache: only the last dimension must be contiguous; row b of
// q reads row b), mask (B or 1, 1, 1, S) bool, True where a query may attend -> (B, H, 1, D) in q's dtype: SDPA
// with a boolean mask and enable_gqa, for one query position. A row whose mask allows nothing gives zeros (SDPA:
// NaN).
at::Tensor attention_impl(const at::Tensor &q_, const at::Tensor &k, const at::Tensor &v, const at::Tensor &mask,
                          std::optional<double> scale, int64_t path, const at::Tensor *ksc, const at::Tensor *vsc) {
    TORCH_CHECK(q_.dim() == 4 && q_.size(2) == 1, "q must be (B, H, 1, D), got ", q_.sizes());
    TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes(), "k and v must both be (B, KV, S, D), got ", k.sizes(), " and ",
                v.sizes());
    const int64_t B = q_.size(0), H = q_.size(1), D = q_.size(3), KV = k.size(1), S = k.size(2);
    // k/v may hold more rows than q: AOTInductor passes a planned cache's rows 0..B-1 as the whole cache when the
    // batch is dynamic
    TORCH_CHECK(k.size(0) >= B && k.size(3) == D && KV > 0 && H % KV == 0, "k/v ", k.sizes(), " do not match q ",
                q_.sizes());
    TORCH_CHECK(attn_dtype(q_), "q must be fp32, bf16 or fp16");
    if (ksc) {
        TORCH_CHECK(k.scalar_type() == at::kChar && v.scalar_type() == at::kChar, "k and v must be int8");
        for (const at::Tensor *t : {ksc, vsc})
            TORCH_CHECK(t->scalar_type() == at::kHalf && t->dim() == 3 && t->size(0) >= B && t->size(1) == KV &&
                            t->size(2) == S && t->stride(2) == 1,
                        "the scales must be (B, KV, S) fp16 and contiguous over slots, got ", t->sizes(), " ",
                        t->scalar_type());
    } else {
        TORCH_CHECK(k.scalar_type() == v.scalar_type() && attn_dtype(k), "k and v must have one dtype: fp32, bf16 or fp16");
    }
    TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "k and v must be contiguous in their last dimension");
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 4 && (mask.size(0) == B || mask.size(0) == 1) &&
                    mask.size(1) == 1 && mask.size(2) == 1 && mask.size(3) == S,
                "mask must be (B, 1, 1, S) bool, got ", mask.sizes());
    const at::Tensor q = q_.contiguous();
    at::Tensor out = at::empty({B, H, 1, D}, q.options());
    AttnArgs a{q.data_ptr(), k.data_ptr(), v.data_ptr(), mask.data_ptr<bool>(), dt_of(q), ksc ? I8 : dt_of(k),
               B, H, KV, S, D, H * D, D, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
               v.stride(2), mask.size(0) == 1 ? 0 : mask.stride(0), mask.stride(3),
               static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D)))};
    if (ksc) {
        a.ksc = ksc->data_ptr<c10::Half>(), a.vsc = vsc->data_ptr<c10::Half>();
        a.kss0 = ksc->stride(0), a.kss1 = ksc->stride(1), a.vss0 = vsc->stride(0), a.vss1 = vsc->stride(1);
    }
    const int64_t use = path < 0 ? attn_path(D) : std::min(path, attn_path(D));
    // items: (row, kv head, group of up to 4 query heads, chunk of slots); groups as even as they can be, and
    // rows cut into chunks of at least ATTN_MIN_SLOTS until a row has two items a thread (not more for more rows).
    // A row's chunks are a function of its own extent alone (not of S, the batch or the other rows), so a query's
    // result is the same in any batch, at any attended length, and as a prefill query (attention_rows)
    const int64_t G = H / KV, NG = (G + 3) / 4, gb = (G + NG - 1) / NG, last = G - (NG - 1) * gb;
    const int64_t T = at::get_num_threads(), per_row = KV * NG;
    const int64_t P = std::max<int64_t>(1, (2 * T + per_row - 1) / per_row);  // chunks a row at most
    AttnItem full = nullptr, tail = nullptr;
#ifdef OAG_X86
    if (use == 2) full = attn_avx512_for(D, gb), tail = attn_avx512_for(D, last);
    if (use == 1) full = attn_avx2_for(D, gb), tail = attn_avx2_for(D, last);
#endif
    std::vector<float> part(B * P * H * (D + 2));
    std::vector<int64_t> extent(B);  // once a row, not once an item
    for (int64_t b = 0; b < B; b++) extent[b] = attn_extent(a, b);
    const int64_t items = B * per_row * P;
    // below ATTN_GRAIN products in all, waking the second thread costs more than it saves
    const int64_t grain = B * H * S * D < ATTN_GRAIN ? items : 1;
    at::parallel_for(0, items, grain, [&](int64_t i0, int64_t i1) {
        std::vector<float> sc(4 * (S + 16));
        for (int64_t i = i0; i < i1; i++) {
            const int64_t c = i % P, grp = (i / P) % NG, kvh = (i / (P * NG)) % KV, b = i / (P * per_row);
            const int64_t h0 = kvh * G + grp * gb, n = extent[b], cnt = grp == NG - 1 ? last : gb;
            const int64_t pr = std::max<int64_t>(1, std::min(P, n / ATTN_MIN_SLOTS));  // this row's chunks
            float *pp = part.data() + ((b * P + c) * H + h0) * (D + 2);
            if (c >= pr) {
                for (int64_t h = 0; h < cnt; h++) pp[h * (D + 2) + D + 1] = 0.f;  // (empty: the merge skips it)
                continue;
            }
            const int64_t j0 = n * c / pr, j1 = n * (c + 1) / pr;
            AttnItem f = grp == NG - 1 ? tail : full;
            if (f) f(a, b, h0, cnt, j0, j1, sc.data(), pp);
            else attn_scalar(a, b, h0, cnt, j0, j1, sc.data(), pp);
        }
    });
    // merge the chunks of each (row, head): rescale each by exp(its max - the max), then normalize
    std::vector<float> o(D);
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            float M = -INFINITY, L = 0.f;
            for (int64_t c = 0; c < P; c++) {
                const float *pc = part.data() + ((b * P + c) * H + h) * (D + 2);
                if (pc[D + 1] != 0.f) M = std::max(M, pc[D]);  // (empty chunks hold no max)
            }
            std::fill(o.begin(), o.end(), 0.f);
            for (int64_t c = 0; c < P; c++) {
                const float *pc = part.data() + ((b * P + c) * H + h) * (D + 2);
                if (pc[D + 1] == 0.f) continue;
                const float w = std::exp(pc[D] - M);
                L += w * pc[D + 1];
                for (int64_t d = 0; d < D; d++) o[d] += w * pc[d];
            }
            const float inv = L > 0.f ? 1.f / L : 0.f;
            const int64_t oo = (b * H + h) * D;
            for (int64_t d = 0; d < D; d++) {
                const float r = o[d] * inv;
                if (a.qt == BF16) static_cast<uint16_t *>(out.data_ptr())[oo + d] = to_bf16(r);
                else if (a.qt == F16) static_cast<c10::Half *>(out.data_ptr())[oo + d] = c10::Half(r);
                else static_cast<float *>(out.data_ptr())[oo + d] = r;
            }
        }
    return out;
}

at::Tensor decode_attention(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &mask,
                            std::optional<double> scale, int64_t path) {
    return attention_impl(q, k, v, mask, scale, path, nullptr, nullptr);
}

// the int8 KV cache's: k/v (B, KV, S, D) int8 codes, k_scale/v_scale (B, KV, S) fp16; key j is k[j] * k_scale[j]
at::Tensor decode_attention_q8(const at::Tensor &q, const at::Tensor &k, const at::Tensor &k_scale, const at::Tensor &v,
                               const at::Tensor &v_scale, const at::Tensor &mask, std::optional<double> scale,
                               int64_t path) {
    return attention_impl(q, k, v, mask, scale, path, &k_scale, &v_scale);
}

}  // namespace

TORCH_LIBRARY(openautoglm, m) {
    m.def("int4_gemv(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, int path=-1) -> Tensor");
    m.def("int4_gemv_a8(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, int path=-1) -> Tensor");
    m.def("int4_gemv_a8_path(int group_size) -> int", [](int64_t g) { return int4_a8_path(g); });
    m.def("int8_gemv(Tensor x, Tensor qweight, Tensor scales, int path=-1) -> Tensor");
    m.def("int4_gemv_path(int group_size) -> int", [](int64_t g) { return int4_path(g); });
    m.def("int8_gemv_path(int K) -> int", [](int64_t k) { return int8_path(k); });
    m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float? scale=None, int path=-1) -> Tensor");
    m.def("decode_attention_path(int head_dim) -> int", [](int64_t d) { return attn_path(d); });
    m.def("decode_attention_q8(Tensor q, Tensor k, Tensor k_scale, Tensor v, Tensor v_scale, Tensor mask, "
          "float? scale=None, int path=-1) -> Tensor");
}

TORCH_LIBRARY_IMPL(openautoglm, CPU, m) {
    m.impl("int4_gemv", &int4_gemv);
    m.impl("int4_gemv_a8", &int4_gemv_a8);
    m.impl("int8_gemv", &int8_gemv);
    m.impl("decode_attention", &decode_attention);
    m.impl("decode_attention_q8", &decode_attention_q8);
}

// C shims: AOTInductor packages compiled with these in `aot_inductor.custom_ops_to_c_shims` (kernels.c_shims())
// call the kernels directly, instead of boxing every call's arguments for the dispatcher through the proxy executor
// (~150 calls a decode step).  The names are the ones inductor derives (aoti_torch_<device>_<op name>); the
// arguments are the schema's, in order: tensors as handles, ints as int64_t, an optional float as a pointer
// (nullptr for None), then a handle for the result.  The package resolves them at load time: the library is loaded
// with RTLD_GLOBAL before any package (kernels.load_ops).
namespace {
using torch::aot_inductor::new_tensor_handle;
using torch::aot_inductor::tensor_handle_to_tensor_pointer;
const at::Tensor &T(AtenTensorHandle h) { return *tensor_handle_to_tensor_pointer(h); }
}  // namespace

extern "C" {
AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_int4_gemv(AtenTensorHandle x, AtenTensorHandle qweight,
                                                          AtenTensorHandle scales, AtenTensorHandle zeros,
                                                          int64_t group_size, int64_t path, AtenTensorHandle *ret0) {
    AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE(
        { *ret0 = new_tensor_handle(int4_gemv(T(x), T(qweight), T(scales), T(zeros), group_size, path)); });
}

AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_int4_gemv_a8(AtenTensorHandle x, AtenTensorHandle qweight,
                                                             AtenTensorHandle scales, AtenTensorHandle zeros,
                                                             int64_t group_size, int64_t path,
                                                             AtenTensorHandle *ret0) {
    AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE(
        { *ret0 = new_tensor_handle(int4_gemv_a8(T(x), T(qweight), T(scales), T(zeros), group_size, path)); });
}

AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_int8_gemv(AtenTensorHandle x, AtenTensorHandle qweight,
                                                          AtenTensorHandle scales, int64_t path,
                                                          AtenTensorHandle *ret0) {
    AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE(
        { *ret0 = new_tensor_handle(int8_gemv(T(x), T(qweight), T(scales), path)); });
}

AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_decode_attention(AtenTensorHandle q, AtenTensorHandle k,
                                                                 AtenTensorHandle v, AtenTensorHandle mask,
                                                                 double *scale, int64_t path,
                                                                 AtenTensorHandle *ret0) {
    AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
        const std::optional<double> s = scale ? std::optional<double>(*scale) : std::nullopt;
        *ret0 = new_tensor_handle(decode_attention(T(q), T(k), T(v), T(mask), s, path));
    });
}

AOTI_TORCH_EXPORT AOTITorchError aoti_torch_cpu_decode_attention_q8(AtenTensorHandle q, AtenTensorHandle k,
                                                                    AtenTensorHandle k_scale, AtenTensorHandle v,
                                                                    AtenTensorHandle v_scale, AtenTensorHandle mask,
                                                                    double *scale, int64_t path,
                                                                    AtenTensorHandle *ret0) {
    AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
        const std::optional<double> s = scale ? std::optional<double>(*scale) : std::nullopt;
        *ret0 = new_tensor_handle(
            decode_attention_q8(T(q), T(k), T(k_scale), T(v), T(v_scale), T(mask), s, path));
    });
}
}
