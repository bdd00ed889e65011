// Fast CPU requantization kernels for qerl_rollout.quant (built by cpu.py with g++ -O3).
//
// Each kernel reproduces compressed-tensors 0.17's dtype flow bit for bit (see the Python
// reference twin in reference.py): the weight is bf16 or fp16 (`W`), every division is done in
// fp32 and rounded where torch rounds, and the zero zero-point that the compressor adds before
// rounding turns -0 into +0. The work is tiled so a tile stays in L1/L2 (a 128x128 block for
// fp8_block, one row for fp8_channel, int8 and nvfp4) and written as branch-free loops that g++
// vectorizes. Inputs must be finite: each kernel reports the largest |x| bit pattern it saw, and
// the caller raises on NaN/Inf. Left out: strided inputs (the caller makes them contiguous).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define QR_AVX512 1
#endif

namespace {

inline float f_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t u_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

struct BF16 {
  static inline float to_f(uint16_t h) { return f_of(uint32_t(h) << 16); }
  // round to nearest even; inputs are finite or inf (never NaN)
  static inline uint16_t from_f(float f) {
    uint32_t u = u_of(f);
    return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
};

struct F16 {
  static inline float to_f(uint16_t h) { _Float16 x; std::memcpy(&x, &h, 2); return float(x); }
  static inline uint16_t from_f(float f) {
    _Float16 x = _Float16(f);
    uint16_t h; std::memcpy(&h, &x, 2); return h;
  }
};

// fp32 -> float8_e4m3fn, round to nearest even, for |f| <= 448 (c10's algorithm, branch-free).
inline uint8_t e4m3_from_f(float f) {
  uint32_t u = u_of(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  const uint32_t denorm_magic = 141u << 23;
  const uint32_t sub = u_of(f_of(u) + f_of(denorm_magic)) - denorm_magic;
  const uint32_t nor = (u + (uint32_t(7 - 127) << 23) + 0x7FFFFu + ((u >> 20) & 1u)) >> 20;
  const uint32_t r = (u < (121u << 23)) ? sub : nor;
  return uint8_t(r | (sign >> 24));
}

#ifdef QR_AVX512
// ---- AVX-512 versions of the scalar code, 16 lanes at a time, identical arithmetic ----
template <class W> inline __m512 load16_f(const uint16_t* x);
template <> inline __m512 load16_f<BF16>(const uint16_t* x) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
template <> inline __m512 load16_f<F16>(const uint16_t* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}

// 16 values of one group -> 8 packed bytes (as e2m1_code + packing).
template <class W>
inline void nvfp4_group_avx512(const uint16_t* x, float scale_eff, uint8_t* packed8) {
  __m512 v = _mm512_add_ps(_mm512_div_ps(load16_f<W>(x), _mm512_set1_ps(scale_eff)),
                           _mm512_setzero_ps());  // + zero point: -0 -> +0
  v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-6.0f)), _mm512_set1_ps(6.0f));
  const __m512 a = _mm512_abs_ps(v);
  const __m512i one = _mm512_set1_epi32(1);
  __m512i idx = _mm512_setzero_si512();
  idx = _mm512_mask_add_epi32(idx, _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.25f), _CMP_GT_OQ), idx, one);
  idx = _mm512_mask_add_epi32(idx, _mm512_cmp_ps_mask(a, _mm512_set1_ps(0.75f), _CMP_GE_OQ), idx, one);
  idx = _mm512_mask_add_epi32(idx, _mm512_cmp_ps_mask(a, _mm512_set1_ps(1.25f), _CMP_GT_OQ), idx, one);
  idx = _mm512_mask_add_epi32(idx, _mm512_cmp_ps_mask(a, _mm512_set1_ps(1.75f), _CMP_GE_OQ), idx, one);
  idx = _mm512_mask_add_epi32(idx, _mm512_cmp_ps_mask(a, _mm512_set1_ps(2.5f), _CMP_GT_OQ), idx, one);
  idx = _mm512_mask_add_epi32(idx, _mm512_cmp_ps_mask(a, _mm512_set1_ps(3.5f), _CMP_GE_OQ), idx, one);
  idx = _mm512_mask_add_epi32(idx, _mm512_cmp_ps_mask(a, _mm512_set1_ps(5.0f), _CMP_GT_OQ), idx, one);
  const __mmask16 neg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
  idx = _mm512_mask_or_epi32(idx, neg, idx, _mm512_set1_epi32(8));
  const __m128i codes = _mm512_cvtepi32_epi8(idx);  // 16 bytes, one code each
  const __m128i lo = _mm_and_si128(codes, _mm_set1_epi16(0x000F));
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(codes, 4), _mm_set1_epi16(0x00F0));
  const __m128i pairs = _mm_packus_epi16(_mm_or_si128(lo, hi), _mm_setzero_si128());
  _mm_storel_epi64(reinterpret_cast<__m128i*>(packed8), pairs);
}

template <class W> inline __m512 round_to_w(__m512 f);  // fp32 -> W (nearest even) -> fp32
template <> inline __m512 round_to_w<BF16>(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(int(0xFFFF0000u))));
}
template <> inline __m512 round_to_w<F16>(__m512 f) {
  return _mm512_cvtph_ps(_mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

inline __m512i e4m3_from_pos_avx512(__m512 f) {  // e4m3_from_f for 0 <= f <= 448
  const __m512i u = _mm512_castps_si512(f);
  const __m512i magic = _mm512_set1_epi32(141 << 23);
  const __m512i sub = _mm512_sub_epi32(
      _mm512_castps_si512(_mm512_add_ps(f, _mm512_castsi512_ps(magic))), magic);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 20), _mm512_set1_epi32(1));
  __m512i nor = _mm512_add_epi32(u, _mm512_set1_epi32(int((uint32_t(7 - 127) << 23) + 0x7FFFFu)));
  nor = _mm512_srli_epi32(_mm512_add_epi32(nor, odd), 20);
  const __mmask16 small = _mm512_cmplt_epu32_mask(u, _mm512_set1_epi32(121 << 23));
  return _mm512_mask_blend_epi32(small, nor, sub);
}

inline __m512 e4m3_pos_to_f_avx512(__m512i b) {
  const __m512i exp = _mm512_srli_epi32(b, 3), man = _mm512_and_si512(b, _mm512_set1_epi32(7));
  const __m512i normal = _mm512_or_si512(
      _mm512_slli_epi32(_mm512_add_epi32(exp, _mm512_set1_epi32(120)), 23), _mm512_slli_epi32(man, 20));
  const __m512 subnormal = _mm512_mul_ps(_mm512_cvtepi32_ps(man), _mm512_set1_ps(0.001953125f));
  const __mmask16 is_sub = _mm512_cmpeq_epi32_mask(exp, _mm512_setzero_si512());
  return _mm512_mask_blend_ps(is_sub, _mm512_castsi512_ps(normal), subnormal);
}

// Scales of 16 groups at once (same arithmetic as the scalar loop in nvfp4_row).
template <class W>
inline void nvfp4_scales16_avx512(const uint16_t* amax, float global_scale, uint8_t* scale_out,
                                  float* scale_eff) {
  const __m512 gs = _mm512_set1_ps(global_scale);
  const __m512 scale_w = round_to_w<W>(_mm512_div_ps(load16_f<W>(amax), _mm512_set1_ps(6.0f)));
  const __m512 scaled = _mm512_min_ps(_mm512_mul_ps(gs, scale_w), _mm512_set1_ps(448.0f));
  __m512i b = e4m3_from_pos_avx512(scaled);
  b = _mm512_mask_mov_epi32(b, _mm512_cmpeq_epi32_mask(b, _mm512_setzero_si512()),
                            _mm512_set1_epi32(0x20));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(scale_out), _mm512_cvtepi32_epi8(b));
  _mm512_storeu_ps(scale_eff, _mm512_div_ps(e4m3_pos_to_f_avx512(b), gs));
}

inline uint16_t absmax16_avx512(const uint16_t* x) {  // max |x| bits of 16 values
  const __m256i v = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)),
                                     _mm256_set1_epi16(0x7FFF));
  const __m128i m = _mm_max_epu16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i inv = _mm_xor_si128(m, _mm_set1_epi16(-1));  // max(m) = ~min(~m)
  return uint16_t(~_mm_extract_epi16(_mm_minpos_epu16(inv), 0));
}

// 16 values -> 16 e4m3 bytes (as the scalar loop in fp8_tile).
template <class W>
inline void fp8_16_avx512(const uint16_t* x, __m512 scale, uint8_t* q16) {
  __m512 v = _mm512_add_ps(round_to_w<W>(_mm512_div_ps(load16_f<W>(x), scale)), _mm512_setzero_ps());
  v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-448.0f)), _mm512_set1_ps(448.0f));
  const __m512i u = _mm512_castps_si512(v);
  const __m512i sign = _mm512_srli_epi32(_mm512_and_si512(u, _mm512_set1_epi32(int(0x80000000u))), 24);
  const __m512i b = _mm512_or_si512(e4m3_from_pos_avx512(_mm512_abs_ps(v)), sign);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q16), _mm512_cvtepi32_epi8(b));
}
#endif

// ---- fp8: one tile of `rows` full rows, scales per column block of width bw ----
// Rows are streamed in order (first column maxima, then the quantization), because walking
// a 128x128 block column-wise strides by K and thrashes L1 sets for power-of-two K.
template <class W>
uint16_t fp8_tile(const uint16_t* __restrict w, uint8_t* __restrict q, int64_t rows, int64_t K,
                  int64_t bw, uint16_t* __restrict scale_out, float eps, float* __restrict scale,
                  uint16_t* __restrict col_amax) {
  const int64_t ncb = (K + bw - 1) / bw;
  uint16_t seen = 0;
  for (int64_t c = 0; c < K; ++c) col_amax[c] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* row = w + r * K;
    for (int64_t c = 0; c < K; ++c) col_amax[c] = std::max<uint16_t>(col_amax[c], row[c] & 0x7FFF);
  }
  for (int64_t cb = 0; cb < ncb; ++cb) {
    uint16_t amax = 0;
    for (int64_t c = cb * bw; c < std::min(K, cb * bw + bw); ++c) amax = std::max(amax, col_amax[c]);
    seen = std::max(seen, amax);
    float s = W::to_f(W::from_f(W::to_f(amax) / 448.0f));
    if (s == 0.0f) s = eps;
    scale_out[cb] = W::from_f(s);
    scale[cb] = s;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* row = w + r * K;
    uint8_t* qrow = q + r * K;
    for (int64_t cb = 0; cb < ncb; ++cb) {
      const int64_t c1 = std::min(K, cb * bw + bw);
      int64_t c = cb * bw;
#ifdef QR_AVX512
      const __m512 scale16 = _mm512_set1_ps(scale[cb]);
      for (; c + 16 <= c1; c += 16) fp8_16_avx512<W>(row + c, scale16, qrow + c);
#endif
      for (; c < c1; ++c) {
        float v = W::to_f(W::from_f(W::to_f(row[c]) / scale[cb])) + 0.0f;  // + zero point
        v = std::min(std::max(v, -448.0f), 448.0f);
        qrow[c] = e4m3_from_f(v);
      }
    }
  }
  return seen;
}

template <class W>
uint16_t fp8_quant(const uint16_t* w, int64_t E, int64_t N, int64_t K, int64_t bh, int64_t bw,
                   uint8_t* q, uint16_t* scale, float eps, int nthreads) {
  const int64_t nrb = (N + bh - 1) / bh, ncb = (K + bw - 1) / bw, tiles = E * nrb;
  uint16_t seen = 0;
#pragma omp parallel num_threads(nthreads) reduction(max : seen)
  {
    std::vector<float> scale_f(ncb);
    std::vector<uint16_t> col_amax(K);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t e = t / nrb, rb = t % nrb, r0 = rb * bh;
      const int64_t rows = std::min(bh, N - r0);
      const int64_t off = (e * N + r0) * K;
      const uint16_t s =
          fp8_tile<W>(w + off, q + off, rows, K, bw, scale + t * ncb, eps, scale_f.data(),
                      col_amax.data());
      seen = std::max(seen, s);
    }
  }
  return seen;
}

// ---- int8: one scale per row, scale = W(amax / 127.5), q = rne(clamp(W(x / scale) + 0)) ----
#ifdef QR_AVX512
// 16 values -> 16 int8 codes (as the scalar loop in int8_row).
template <class W>
inline void int8_16_avx512(const uint16_t* x, __m512 scale, int8_t* q16) {
  __m512 v = round_to_w<W>(_mm512_div_ps(load16_f<W>(x), scale));
  v = _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-128.0f)), _mm512_set1_ps(127.0f));
  const __m512i i = _mm512_cvtps_epi32(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q16), _mm512_cvtepi32_epi8(i));
}
#endif

template <class W>
uint16_t int8_row(const uint16_t* __restrict x, int8_t* __restrict q, int64_t K,
                  uint16_t* __restrict scale_out, float eps) {
  uint16_t amax = 0;
  for (int64_t c = 0; c < K; ++c) amax = std::max<uint16_t>(amax, x[c] & 0x7FFF);
  float s = W::to_f(W::from_f(W::to_f(amax) / 127.5f));
  if (s == 0.0f) s = eps;
  *scale_out = W::from_f(s);
  int64_t c = 0;
#ifdef QR_AVX512
  const __m512 s16 = _mm512_set1_ps(s);
  for (; c + 16 <= K; c += 16) int8_16_avx512<W>(x + c, s16, q + c);
#endif
  for (; c < K; ++c) {
    float v = W::to_f(W::from_f(W::to_f(x[c]) / s));  // the zero zero-point changes no integer
    v = std::min(std::max(v, -128.0f), 127.0f);
    q[c] = int8_t(std::nearbyint(v));                  // round half to even (default FE mode)
  }
  return amax;
}

template <class W>
uint16_t int8_quant(const uint16_t* w, int64_t E, int64_t N, int64_t K, int8_t* q,
                    uint16_t* scale, float eps, int nthreads) {
  uint16_t seen = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(max : seen)
  for (int64_t r = 0; r < E * N; ++r)
    seen = std::max(seen, int8_row<W>(w + r * K, q + r * K, K, scale + r, eps));
  return seen;
}

// ---- nvfp4: E2M1 codes, fp8 group scales, per-expert fp32 global scale ----
inline uint32_t e2m1_code(float v) {  // v already divided by the scale, + zero point
  v = std::min(std::max(v, -6.0f), 6.0f);
  const float a = std::fabs(v);
  const uint32_t idx = uint32_t(a > 0.25f) + uint32_t(a >= 0.75f) + uint32_t(a > 1.25f) +
                       uint32_t(a >= 1.75f) + uint32_t(a > 2.5f) + uint32_t(a >= 3.5f) +
                       uint32_t(a > 5.0f);
  return idx | (uint32_t(v < 0.0f) << 3);
}

// e4m3 byte of a value in [0, 448] back to float, branch-free (normal or subnormal).
inline float e4m3_pos_to_f(uint32_t b) {
  const uint32_t exp = b >> 3, man = b & 7u;
  const float normal = f_of(((exp + 120u) << 23) | (man << 20));
  const float subnormal = float(man) * 0.001953125f;  // man * 2^-9, exact
  return exp ? normal : subnormal;
}

// Phases per row, each a simple loop g++ vectorizes: group amax, group scales, codes, packing.
template <class W>
uint16_t nvfp4_row(const uint16_t* __restrict x, uint8_t* __restrict packed,
                   uint8_t* __restrict scale_out, int64_t K, float global_scale,
                   uint16_t* __restrict amax, float* __restrict scale_eff,
                   uint8_t* __restrict code) {
  const int64_t G = K / 16;
  uint16_t seen = 0;
  int64_t g0 = 0;
#ifdef QR_AVX512
  for (int64_t g = 0; g < G; ++g) amax[g] = absmax16_avx512(x + g * 16);
  for (; g0 + 16 <= G; g0 += 16)
    nvfp4_scales16_avx512<W>(amax + g0, global_scale, scale_out + g0, scale_eff + g0);
#else
  for (int64_t g = 0; g < G; ++g) {
    uint16_t m = 0;
    for (int i = 0; i < 16; ++i) m = std::max<uint16_t>(m, x[g * 16 + i] & 0x7FFF);
    amax[g] = m;
  }
#endif
  for (int64_t g = 0; g < G; ++g) seen = std::max(seen, amax[g]);
  for (int64_t g = g0; g < G; ++g) {
    const float scale_w = W::to_f(W::from_f(W::to_f(amax[g]) / 6.0f));
    const uint32_t b0 = e4m3_from_f(std::min(global_scale * scale_w, 448.0f));
    const uint32_t b = b0 ? b0 : 0x20u;  // a zero scale becomes 0.125 (0x20 in e4m3)
    scale_out[g] = uint8_t(b);
    scale_eff[g] = e4m3_pos_to_f(b) / global_scale;
  }
#ifdef QR_AVX512
  for (int64_t g = 0; g < G; ++g) nvfp4_group_avx512<W>(x + g * 16, scale_eff[g], packed + g * 8);
#else
  for (int64_t g = 0; g < G; ++g) {
    const float se = scale_eff[g];
    for (int i = 0; i < 16; ++i)
      code[g * 16 + i] = uint8_t(e2m1_code(W::to_f(x[g * 16 + i]) / se + 0.0f));
  }
  for (int64_t j = 0; j < K / 2; ++j) {
    uint16_t pair;  // little endian: low byte = code[2j], high byte = code[2j+1]
    std::memcpy(&pair, code + 2 * j, 2);
    packed[j] = uint8_t((pair & 0xFu) | ((pair >> 4) & 0xF0u));
  }
#endif
  return seen;
}

template <class W>
uint16_t nvfp4_quant(const uint16_t* w, int64_t E, int64_t N, int64_t K,
                     const float* global_scale, uint8_t* packed, uint8_t* scale, int nthreads) {
  const int64_t rows = E * N;
  uint16_t seen = 0;
#pragma omp parallel num_threads(nthreads) reduction(max : seen)
  {
    std::vector<uint16_t> amax(K / 16);
    std::vector<float> scale_eff(K / 16);
    std::vector<uint8_t> code(K);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const uint16_t s = nvfp4_row<W>(w + r * K, packed + r * (K / 2), scale + r * (K / 16), K,
                                      global_scale[r / N], amax.data(), scale_eff.data(),
                                      code.data());
      seen = std::max(seen, s);
    }
  }
  return seen;
}


// ---- dequantize: what an emulate-mode engine does with every pushed layer ----
// fp8: out = W(float(e4m3) * float(scale)), torch's bf16/fp16 multiply (fp32 product, one
// rounding). nvfp4: out = W(e2m1 * (float(e4m3 scale) / global_scale)), the twin's fp32 flow.
// The e4m3 NaN codes (0x7F, 0xFF) decode to NaN like torch.
inline float e4m3_to_f(uint8_t b) {
  const uint32_t mag = b & 0x7Fu, exp = mag >> 3, man = mag & 7u;
  if (mag == 0x7Fu) return f_of(0x7FC00000u);
  const float v = exp ? f_of(((exp + 120u) << 23) | (man << 20)) : float(man) * 0.001953125f;
  return (b & 0x80u) ? -v : v;
}

#ifdef QR_AVX512
template <class W> inline void store16_w(__m512 f, uint16_t* out);  // round to W, store 16
template <> inline void store16_w<BF16>(__m512 f, uint16_t* out) {
  const __m512i r = _mm512_srli_epi32(_mm512_castps_si512(round_to_w<BF16>(f)), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(r));
}
template <> inline void store16_w<F16>(__m512 f, uint16_t* out) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// 16 e4m3 bytes -> 16 fp32 values (NaN codes -> NaN), as e4m3_to_f.
inline __m512 e4m3_16_to_f(const uint8_t* q) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  const __m512i mag = _mm512_and_si512(b, _mm512_set1_epi32(0x7F));
  __m512 v = e4m3_pos_to_f_avx512(mag);
  const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
  v = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign));
  const __mmask16 nan = _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7F));
  return _mm512_mask_blend_ps(nan, v, _mm512_castsi512_ps(_mm512_set1_epi32(0x7FC00000)));
}
#endif

template <class W>
void fp8_dequant(const uint8_t* q, const uint16_t* scale, int64_t E, int64_t N, int64_t K,
                 int64_t bh, int64_t bw, uint16_t* out, int nthreads) {
  const int64_t nrb = (N + bh - 1) / bh, ncb = (K + bw - 1) / bw;
  float lut[256];
  for (int i = 0; i < 256; ++i) lut[i] = e4m3_to_f(uint8_t(i));
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t er = 0; er < E * N; ++er) {
    const int64_t e = er / N, r = er % N;
    const uint16_t* srow = scale + (e * nrb + r / bh) * ncb;
    const uint8_t* qrow = q + er * K;
    uint16_t* orow = out + er * K;
    for (int64_t cb = 0; cb < ncb; ++cb) {
      const float s = W::to_f(srow[cb]);
      const int64_t c1 = std::min(K, cb * bw + bw);
      int64_t c = cb * bw;
#ifdef QR_AVX512
      const __m512 s16 = _mm512_set1_ps(s);
      for (; c + 16 <= c1; c += 16) store16_w<W>(_mm512_mul_ps(e4m3_16_to_f(qrow + c), s16), orow + c);
#endif
      for (; c < c1; ++c) orow[c] = W::from_f(lut[qrow[c]] * s);
    }
  }
}

template <class W>
void int8_dequant(const int8_t* q, const uint16_t* scale, int64_t rows, int64_t K, uint16_t* out,
                  int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float s = W::to_f(scale[r]);
    const int8_t* qrow = q + r * K;
    uint16_t* orow = out + r * K;
    int64_t c = 0;
#ifdef QR_AVX512
    const __m512 s16 = _mm512_set1_ps(s);
    for (; c + 16 <= K; c += 16) {
      const __m512i i = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + c)));
      store16_w<W>(_mm512_mul_ps(_mm512_cvtepi32_ps(i), s16), orow + c);
    }
#endif
    for (; c < K; ++c) orow[c] = W::from_f(float(qrow[c]) * s);
  }
}

template <class W>
void nvfp4_dequant(const uint8_t* packed, const uint8_t* scale, const float* global_scale,
                   int64_t E, int64_t N, int64_t K, uint16_t* out, int nthreads) {
  static const float kE2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                  -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
  const int64_t G = K / 16;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t er = 0; er < E * N; ++er) {
    const float gs = global_scale[er / N];
    const uint8_t* prow = packed + er * (K / 2);
    const uint8_t* srow = scale + er * G;
    uint16_t* orow = out + er * K;
    for (int64_t g = 0; g < G; ++g) {
      const float s = e4m3_to_f(srow[g]) / gs;
      for (int64_t j = 0; j < 8; ++j) {
        const uint8_t b = prow[g * 8 + j];
        orow[g * 16 + 2 * j] = W::from_f(kE2M1[b & 0xF] * s);
        orow[g * 16 + 2 * j + 1] = W::from_f(kE2M1[b >> 4] * s);
      }
    }
  }
}

}  // namespace

extern "C" {

// Largest |x| bit pattern of each of E contiguous slices of n elements (bf16 and fp16 alike).
void qr_absmax_u16(const uint16_t* w, int64_t E, int64_t n, uint16_t* out, int nthreads) {
  for (int64_t e = 0; e < E; ++e) {
    const uint16_t* p = w + e * n;
    uint16_t m = 0;
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(max : m)
    for (int64_t i = 0; i < n; ++i) m = std::max<uint16_t>(m, p[i] & 0x7FFF);
    out[e] = m;
  }
}

uint16_t qr_fp8(const uint16_t* w, int is_bf16, int64_t E, int64_t N, int64_t K, int64_t bh,
                int64_t bw, uint8_t* q, uint16_t* scale, float eps, int nthreads) {
  return is_bf16 ? fp8_quant<BF16>(w, E, N, K, bh, bw, q, scale, eps, nthreads)
                 : fp8_quant<F16>(w, E, N, K, bh, bw, q, scale, eps, nthreads);
}

uint16_t qr_int8(const uint16_t* w, int is_bf16, int64_t E, int64_t N, int64_t K, int8_t* q,
                 uint16_t* scale, float eps, int nthreads) {
  return is_bf16 ? int8_quant<BF16>(w, E, N, K, q, scale, eps, nthreads)
                 : int8_quant<F16>(w, E, N, K, q, scale, eps, nthreads);
}

void qr_int8_dequant(const int8_t* q, const uint16_t* scale, int is_bf16, int64_t rows, int64_t K,
                     uint16_t* out, int nthreads) {
  if (is_bf16) int8_dequant<BF16>(q, scale, rows, K, out, nthreads);
  else int8_dequant<F16>(q, scale, rows, K, out, nthreads);
}

uint16_t qr_nvfp4(const uint16_t* w, int is_bf16, int64_t E, int64_t N, int64_t K,
                  const float* global_scale, uint8_t* packed, uint8_t* scale, int nthreads) {
  return is_bf16 ? nvfp4_quant<BF16>(w, E, N, K, global_scale, packed, scale, nthreads)
                 : nvfp4_quant<F16>(w, E, N, K, global_scale, packed, scale, nthreads);
}

void qr_fp8_dequant(const uint8_t* q, const uint16_t* scale, int is_bf16, int64_t E, int64_t N,
                    int64_t K, int64_t bh, int64_t bw, uint16_t* out, int nthreads) {
  if (is_bf16) fp8_dequant<BF16>(q, scale, E, N, K, bh, bw, out, nthreads);
  else fp8_dequant<F16>(q, scale, E, N, K, bh, bw, out, nthreads);
}

void qr_nvfp4_dequant(const uint8_t* packed, const uint8_t* scale, const float* global_scale,
                      int is_bf16, int64_t E, int64_t N, int64_t K, uint16_t* out, int nthreads) {
  if (is_bf16) nvfp4_dequant<BF16>(packed, scale, global_scale, E, N, K, out, nthreads);
  else nvfp4_dequant<F16>(packed, scale, global_scale, E, N, K, out, nthreads);
}

}  // extern "C"
