/* int4 (per-group asymmetric) -> bf16 or fp32 weight dequantization, for prefill GEMMs on int4 layers (bf16 where
 * the CPU multiplies bf16 natively; fp32 on AVX2-only CPUs, where a bf16 GEMM runs 5-8x slower than an fp32 one).
 *
 * Layout (quant/primitives.py): qweight (N, K/2) bytes, code k of a row in the low nibble of byte k/2 when k is
 * even, the high nibble when odd; scales and zeros (N, K/g) bf16; w = (q - 8) * s + z computed in fp32 (a multiply
 * then an add, never fused) and rounded to bf16 to nearest even: bit for bit what the torch reference gives.
 * Rows [r0, r1) only, so that callers split a matrix over threads.
 */
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define OAG_X86 1
#endif

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t f32_to_bf16(float f) { /* round to nearest even (no NaN inputs here) */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

/* the fp32 weights themselves (what the bf16 variants round), in code order */
static void rows_scalar_f32(const uint8_t *qw, const uint16_t *s, const uint16_t *z, float *out, int64_t r0,
                            int64_t r1, int64_t K, int64_t g) {
    const int64_t G = K / g, hb = g / 2;
    for (int64_t n = r0; n < r1; n++) {
        for (int64_t j = 0; j < G; j++) {
            const float sc = bf16_to_f32(s[n * G + j]), ze = bf16_to_f32(z[n * G + j]);
            const uint8_t *q = qw + n * (K / 2) + j * hb;
            float *o = out + n * K + j * g;
            for (int64_t i = 0; i < hb; i++) {
                const uint32_t b = q[i];
                o[2 * i] = ((float)(b & 15u) - 8.0f) * sc + ze;
                o[2 * i + 1] = ((float)(b >> 4) - 8.0f) * sc + ze;
            }
        }
    }
}

/* out is written as 32-bit words: the bf16 of the low nibble in the low half, the high nibble's in the high half
   (little endian: the two weights in order) */
static void rows_scalar(const uint8_t *qw, const uint16_t *s, const uint16_t *z, uint32_t *out, int64_t r0,
                        int64_t r1, int64_t K, int64_t g) {
    const int64_t G = K / g, hb = g / 2;
    for (int64_t n = r0; n < r1; n++) {
        for (int64_t j = 0; j < G; j++) {
            const float sc = bf16_to_f32(s[n * G + j]), ze = bf16_to_f32(z[n * G + j]);
            const uint8_t *q = qw + n * (K / 2) + j * hb;
            uint32_t *o = out + n * (K / 2) + j * hb;
            for (int64_t i = 0; i < hb; i++) {
                const uint32_t b = q[i];
                const float lo = ((float)(b & 15u) - 8.0f) * sc + ze;
                const float hi = ((float)(b >> 4) - 8.0f) * sc + ze;
                o[i] = f32_to_bf16(lo) | (f32_to_bf16(hi) << 16);
            }
        }
    }
}

#ifdef OAG_X86
__attribute__((target("avx512f,avx512bw"))) static inline __m512i rne512(__m512 f) {
    const __m512i u = _mm512_castps_si512(f);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
}

/* 16 bytes (32 weights) per step: needs g % 32 == 0 */
__attribute__((target("avx512f,avx512bw"))) static void rows_avx512(const uint8_t *qw, const uint16_t *s,
                                                                   const uint16_t *z, uint32_t *out, int64_t r0,
                                                                   int64_t r1, int64_t K, int64_t g) {
    const int64_t G = K / g, hb = g / 2;
    const __m512i m15 = _mm512_set1_epi32(15);
    const __m512 eight = _mm512_set1_ps(8.0f);
    for (int64_t n = r0; n < r1; n++) {
        for (int64_t j = 0; j < G; j++) {
            const __m512 sc = _mm512_set1_ps(bf16_to_f32(s[n * G + j]));
            const __m512 ze = _mm512_set1_ps(bf16_to_f32(z[n * G + j]));
            const uint8_t *q = qw + n * (K / 2) + j * hb;
            uint32_t *o = out + n * (K / 2) + j * hb;
            for (int64_t i = 0; i < hb; i += 16) {
                const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + i)));
                __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, m15));
                __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
                lo = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(lo, eight), sc), ze);
                hi = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(hi, eight), sc), ze);
                _mm512_storeu_si512((void *)(o + i), _mm512_or_si512(rne512(lo), _mm512_slli_epi32(rne512(hi), 16)));
            }
        }
    }
}

__attribute__((target("avx2"))) static inline __m256i rne256(__m256 f) {
    const __m256i u = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
}

/* 8 bytes (16 weights) per step: needs g % 16 == 0 */
__attribute__((target("avx2"))) static void rows_avx2(const uint8_t *qw, const uint16_t *s, const uint16_t *z,
                                                     uint32_t *out, int64_t r0, int64_t r1, int64_t K, int64_t g) {
    const int64_t G = K / g, hb = g / 2;
    const __m256i m15 = _mm256_set1_epi32(15);
    const __m256 eight = _mm256_set1_ps(8.0f);
    for (int64_t n = r0; n < r1; n++) {
        for (int64_t j = 0; j < G; j++) {
            const __m256 sc = _mm256_set1_ps(bf16_to_f32(s[n * G + j]));
            const __m256 ze = _mm256_set1_ps(bf16_to_f32(z[n * G + j]));
            const uint8_t *q = qw + n * (K / 2) + j * hb;
            uint32_t *o = out + n * (K / 2) + j * hb;
            for (int64_t i = 0; i < hb; i += 8) {
                const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + i)));
                __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, m15));
                __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
                lo = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(lo, eight), sc), ze);
                hi = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(hi, eight), sc), ze);
                _mm256_storeu_si256((__m256i *)(o + i), _mm256_or_si256(rne256(lo), _mm256_slli_epi32(rne256(hi), 16)));
            }
        }
    }
}

/* 8 bytes (16 weights) per step, interleaved back to code order: needs g % 16 == 0 */
__attribute__((target("avx2"))) static void rows_avx2_f32(const uint8_t *qw, const uint16_t *s, const uint16_t *z,
                                                         float *out, int64_t r0, int64_t r1, int64_t K, int64_t g) {
    const int64_t G = K / g, hb = g / 2;
    const __m256i m15 = _mm256_set1_epi32(15);
    const __m256 eight = _mm256_set1_ps(8.0f);
    for (int64_t n = r0; n < r1; n++) {
        for (int64_t j = 0; j < G; j++) {
            const __m256 sc = _mm256_set1_ps(bf16_to_f32(s[n * G + j]));
            const __m256 ze = _mm256_set1_ps(bf16_to_f32(z[n * G + j]));
            const uint8_t *q = qw + n * (K / 2) + j * hb;
            float *o = out + n * K + j * g;
            for (int64_t i = 0; i < hb; i += 8) {
                const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + i)));
                __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, m15));
                __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
                lo = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(lo, eight), sc), ze);
                hi = _mm256_add_ps(_mm256_mul_ps(_mm256_sub_ps(hi, eight), sc), ze);
                const __m256 u0 = _mm256_unpacklo_ps(lo, hi), u1 = _mm256_unpackhi_ps(lo, hi);
                _mm256_storeu_ps(o + 2 * i, _mm256_permute2f128_ps(u0, u1, 0x20));
                _mm256_storeu_ps(o + 2 * i + 8, _mm256_permute2f128_ps(u0, u1, 0x31));
            }
        }
    }
}
#endif

/* which path this CPU takes for group size g: 2 = AVX-512, 1 = AVX2, 0 = scalar */
int oag_dequant_int4_path(int64_t g) {
#ifdef OAG_X86
    __builtin_cpu_init();
    if (g % 32 == 0 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return 2;
    if (g % 16 == 0 && __builtin_cpu_supports("avx2")) return 1;
#endif
    (void)g;
    return 0;
}

void oag_dequant_int4_bf16(const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros, uint16_t *out,
                           int64_t r0, int64_t r1, int64_t K, int64_t g, int path) {
    uint32_t *o = (uint32_t *)out;
#ifdef OAG_X86
    if (path == 2) { rows_avx512(qweight, scales, zeros, o, r0, r1, K, g); return; }
    if (path == 1) { rows_avx2(qweight, scales, zeros, o, r0, r1, K, g); return; }
#endif
    (void)path;
    rows_scalar(qweight, scales, zeros, o, r0, r1, K, g);
}

/* fp32 output, (N, K) floats; path 2 (AVX-512) takes the AVX2 code */
void oag_dequant_int4_f32(const uint8_t *qweight, const uint16_t *scales, const uint16_t *zeros, float *out,
                          int64_t r0, int64_t r1, int64_t K, int64_t g, int path) {
#ifdef OAG_X86
    if (path >= 1) { rows_avx2_f32(qweight, scales, zeros, out, r0, r1, K, g); return; }
#endif
    (void)path;
    rows_scalar_f32(qweight, scales, zeros, out, r0, r1, K, g);
}
