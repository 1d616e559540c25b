// Native CPU kernels for decode, as XLA FFI custom calls (built by pallas_kernels/native_cpu.py).
//
// JaxchunkQuantGemv: the quantized matrix-vector product.
//
// y[r, :] = x[r, :] @ dequant(W) for a few rows r (decode: one per batch row), reading the 4-bit (or
// 8-bit) weights once and dequantizing in registers. XLA:CPU cannot do this: it fuses no int -> float
// conversion into a dot, and every formulation it can run materialises floats (see
// pallas_kernels/quant_matmul.py and experiments/bench_quant_matmul.py). Same layout and semantics as
// quant_matmul_reference (pallas_kernels/quant_matmul.py):
//
//   x:      f32 [rows, k]
//   qs:     u8 [layers, tiles, k / 2, tile] (4-bit: row b*16+i holds W[b*32+i] low, W[b*32+16+i]
//           high) or s8 [layers, tiles, k, tile] (8-bit)
//   scales: f16 or f32 [layers, tiles, k / group, tile], group 32 or 16;  mins: the same (4-bit
//           always, 8-bit when attr has_mins; otherwise a stand-in that is never read)
//   layer:  s32 scalar: W is that layer of the stack (read in place: inside the model's layer scan
//           a sliced operand would be copied into a new buffer first)
//   y:      f32 [rows, tiles * tile]
//
//   attr quantize_x: false: x as given; true: x rounded to 8 bits per 32-block first (quant_matmul's
//           activations="q8", llama.cpp's Q8_0 / Q8_1 activation format), then integer products
//
// Per group (a 32-block, or each half of it for groups of 16) the products are summed first, then
// scaled (W = d q + m):   y = sum_g d_g * (sum_i x_i q_i) + m_g * (sum_i x_i)   (m: where mins are)
// Float x: the weights are widened to f32 in registers (FloatColumns32 on AVX2: 32 columns in 4
// registers per half block; FloatColumns: the same sums in plain C++). q8 x: sum_i xq_i q_i is
// exact in int32, then y += d_g d_x isum + m_g sum(x'): with AVX-512 VNNI vpdpbusd for the legacy
// layouts (Columns64: 64 byte products per instruction), with AVX2 vpmaddubsw + vpmaddwd for every
// layout (Columns32, llama.cpp's AVX2 formulation), else plain C++ (ColumnsScalar: the same bits).
// Items of ItemColumns columns are shared among XLA's intra-op threads.
//
// The legacy layouts: f16 scales, group 32, mins exactly for 4-bit (GGUF Q4_0 / Q4_1 / Q8_0 / Q5_0).
// The k-quant layouts: f32 scales (d * sc), groups of 16 or 32, 8-bit with or without mins.
//
// JaxchunkDecodeAttention: attention of a few query positions (decode) against the KV cache.
//
// Same semantics as attention_reference (pallas_kernels/attention_reference.py) for a plain f32 or
// bf16 cache: query i of row b, at position p = q_offset[b] + i, sees key j iff j <= p,
// j < kv_len[b] and (with a window) j > p - window; rows that see no key give zeros.
//
//   q:        f32 [batch, q_len, heads, d]
//   k, v:     f32, or u16 holding bf16 bits, [layers, batch, max_seq, kv_heads, d]
//   q_offset, kv_len: s32 [batch];  layer: s32 scalar (read in place, as above)
//   attrs:    sm_scale, soft_cap (0: none), window (0: none)
//   out:      f32 [batch, q_len, heads, d]
//
// XLA's blockwise loop (blockwise_attention.py) spends most of a decode step's attention on
// per-block transposing copies and loop overhead. Here each work item is one (row, KV head, split
// of kSplitLen keys): it reads its keys once for all G query heads of the KV head, softmaxes
// exactly (scores kept), reads its values once, and leaves an unnormalised partial (acc, max, sum);
// the caller merges the splits (flash-decoding's log-sum-exp merge).
//
// JaxchunkPagedDecodeAttention: the same kernel over a page pool and a page table (ragged paged
// attention's layout, pallas_kernels/paged_attention.py), for the rows of sequences with at most
// max_q_len new tokens (a serving step's decode rows); the kernel is written once over a Layout that
// says where a sequence's queries and cached vectors are (ContiguousLayout, PagedLayout).
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kQuantBlock = 32;
constexpr int64_t kColumnBlock = 128;

// A hint to start loading [p, p + bytes) into cache (never faults, even past a buffer's end).
inline void Prefetch(const void* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(static_cast<const char*>(p) + off);
}

struct Problem {
  const float* x;          // [rows, k], f32 activations (float mode)
  // Activations quantized per 32-block as llama.cpp's Q8_0 / Q8_1 (QuantizeActivations); nullptr
  // in float mode.
  const int8_t* xq;        // [rows, k]
  const float* x_scale;    // [rows, k / 32]: d_x
  const float* x_sum;      // [rows, k / 32]: d_x * sum(xq) (the dequantized block's sum)
  const int32_t* xq_sum;   // [rows, k / 32]: sum(xq)
  const uint8_t* qs;       // this layer's weights: 4-bit: u8 nibbles; 8-bit: s8 bytes
  const void* scales;      // f16 or f32 [tiles, k / group, tile], as stored
  const void* mins;        // the same, or nullptr without mins
  float* y;
  int64_t rows, k, tiles, tile;
  bool four_bit;
  bool f32_scales;
  int64_t group;           // weights per scale along k: 16 or 32
  bool legacy;             // f16 scales, group 32, mins exactly for 4-bit (all Columns64 takes)
  int64_t item_cols;       // columns per work item (ItemColumns)
};

// 4 consecutive activation codes as one 32-bit word (broadcast to every lane of a register: the
// 4 codes vpdpbusd / vpmaddubsw multiply each column's 4 weight rows by).
inline int32_t Codes4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Scale (or min) i of a row of them, as f32.
inline float ScaleAt(const void* base, bool f32, int64_t i) {
  return f32 ? static_cast<const float*>(base)[i] : static_cast<float>(static_cast<const _Float16*>(base)[i]);
}

// Columns [0, w) of one scale (or min) row, as f32.
inline void ScaleRow(const void* base, bool f32, int64_t offset, int64_t w, float* out) {
  if (f32) {
    const float* s = static_cast<const float*>(base) + offset;
    for (int64_t j = 0; j < w; ++j) out[j] = s[j];
  } else {
    const _Float16* s = static_cast<const _Float16*>(base) + offset;
    for (int64_t j = 0; j < w; ++j) out[j] = static_cast<float>(s[j]);
  }
}

// x [rows, k] -> 8-bit codes per 32-block: d = max|x| / 127, q = round(x / d) (ties to even), the
// Q8_0 / Q8_1 activation format llama.cpp uses for the same products; the kernels then compute
// exactly x' @ W for the dequantized x' = d * q (integer dot products, float scaling per block).
void QuantizeActivations(const float* x, int64_t rows, int64_t k, int8_t* xq, float* x_scale, float* x_sum,
                         int32_t* xq_sum) {
  for (int64_t blk = 0; blk < rows * k / kQuantBlock; ++blk) {
    const float* xb = x + blk * kQuantBlock;
    float amax = 0.f;
    for (int64_t i = 0; i < kQuantBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float d = amax / 127.f;
    int32_t sum = 0;
    for (int64_t i = 0; i < kQuantBlock; ++i) {
      const int32_t q = d > 0.f ? static_cast<int32_t>(std::nearbyint(xb[i] / d)) : 0;
      xq[blk * kQuantBlock + i] = static_cast<int8_t>(q);
      sum += q;
    }
    x_scale[blk] = d;
    x_sum[blk] = d * static_cast<float>(sum);
    xq_sum[blk] = sum;
  }
}

// Any layout, float activations: columns [j0, j0 + W) of tile t, every row. Per 32-block, the
// products of each half (16 weights: the low / high nibbles, or 8-bit rows 0..15 / 16..31) are
// summed first, then scaled by that half's group (group 16: one each; group 32: one for both).
template <int64_t W>
void FloatColumns(const Problem& p, int64_t t, int64_t j0, int64_t width) {
  constexpr int64_t kHalf = kQuantBlock / 2;
  const int64_t w = W > 0 ? W : width;
  const int64_t nb = p.k / kQuantBlock, ng = p.k / p.group;
  const int64_t n = p.tiles * p.tile;
  const int64_t qrows = p.four_bit ? p.k / 2 : p.k;
  const uint8_t* q_t = p.qs + t * qrows * p.tile + j0;
  const int64_t s_t = t * ng * p.tile + j0;  // this tile's first scale row, at column j0
  const bool two_groups = p.group == kHalf;
  for (int64_t r = 0; r < p.rows; ++r) {
    const float* xr = p.x + r * p.k;
    float acc[kColumnBlock] = {};
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = xr + b * kQuantBlock;
      float part[2][kColumnBlock] = {};
      if (p.four_bit) {
        for (int64_t i = 0; i < kHalf; ++i) {
          const uint8_t* q = q_t + (b * kHalf + i) * p.tile;
          const float x_lo = xb[i], x_hi = xb[kHalf + i];
          for (int64_t j = 0; j < w; ++j) {
            part[0][j] += x_lo * static_cast<float>(q[j] & 15);
            part[1][j] += x_hi * static_cast<float>(q[j] >> 4);
          }
        }
      } else {
        for (int64_t h = 0; h < 2; ++h) {
          for (int64_t i = 0; i < kHalf; ++i) {
            const int8_t* q = reinterpret_cast<const int8_t*>(q_t + (b * kQuantBlock + h * kHalf + i) * p.tile);
            const float xi = xb[h * kHalf + i];
            for (int64_t j = 0; j < w; ++j) part[h][j] += xi * static_cast<float>(q[j]);
          }
        }
      }
      float x_sum[2] = {0.f, 0.f};
      for (int64_t i = 0; i < kHalf; ++i) {
        x_sum[0] += xb[i];
        x_sum[1] += xb[kHalf + i];
      }
      float d[kColumnBlock], m[kColumnBlock];
      for (int64_t h = 0; h < (two_groups ? 2 : 1); ++h) {
        const int64_t g = two_groups ? 2 * b + h : b;
        ScaleRow(p.scales, p.f32_scales, s_t + g * p.tile, w, d);
        if (!two_groups) {  // one group for the block: both halves at once
          for (int64_t j = 0; j < w; ++j) part[0][j] += part[1][j];
          x_sum[0] += x_sum[1];
        }
        if (p.mins != nullptr) {
          ScaleRow(p.mins, p.f32_scales, s_t + g * p.tile, w, m);
          for (int64_t j = 0; j < w; ++j) acc[j] += d[j] * part[h][j] + m[j] * x_sum[h];
        } else {
          for (int64_t j = 0; j < w; ++j) acc[j] += d[j] * part[h][j];
        }
      }
    }
    float* yr = p.y + r * n + t * p.tile + j0;
    for (int64_t j = 0; j < w; ++j) yr[j] = acc[j];
  }
}

// Adds one group's contribution: acc + (d_w d_x) * isum + m_w * sum(x'), fused the same way in the
// vector and the scalar code so that both give the same bits.
inline float BlockTerm(float acc, float d_w, float m_w, float d_x, float x_sum, int32_t isum) {
  return std::fma(d_w * d_x, static_cast<float>(isum), std::fma(m_w, x_sum, acc));
}

// sum(x') per group of 32-block b of row r: the whole block's (QuantizeActivations' x_sum) for
// groups of 32, each half's (d_x * its code sum) for groups of 16; the same floats in every kernel.
inline void GroupSums(const Problem& p, int64_t r, int64_t b, float out[2]) {
  const int64_t nb = p.k / kQuantBlock;
  out[0] = p.x_sum[r * nb + b];
  out[1] = 0.f;
  if (p.group == kQuantBlock) return;
  const int8_t* xb = p.xq + r * p.k + b * kQuantBlock;
  int32_t lo = 0, hi = 0;
  for (int64_t i = 0; i < kQuantBlock / 2; ++i) {
    lo += xb[i];
    hi += xb[kQuantBlock / 2 + i];
  }
  out[0] = p.x_scale[r * nb + b] * static_cast<float>(lo);
  out[1] = p.x_scale[r * nb + b] * static_cast<float>(hi);
}

// q8 activations, any layout: columns [j0, j0 + width) of tile t for every row, in plain C++ (edge
// columns, and CPUs without AVX2). Per 32-block the integer products of each half (16 weights:
// the low / high nibbles, or 8-bit rows 0..15 / 16..31) are summed exactly, then scaled by the
// half's group (groups of 16: one each; of 32: one for the whole block).
void ColumnsScalar(const Problem& p, int64_t t, int64_t j0, int64_t width) {
  constexpr int64_t kHalf = kQuantBlock / 2;
  const int64_t nb = p.k / kQuantBlock, ng = p.k / p.group;
  const int64_t qrows = p.four_bit ? p.k / 2 : p.k;
  const uint8_t* q_t = p.qs + t * qrows * p.tile;
  const int64_t s_t = t * ng * p.tile;  // this tile's first scale row
  const bool two_groups = p.group == kHalf;
  for (int64_t r = 0; r < p.rows; ++r) {
    const int8_t* xr = p.xq + r * p.k;
    for (int64_t j = j0; j < j0 + width; ++j) {
      float acc = 0.f;
      for (int64_t b = 0; b < nb; ++b) {
        const int8_t* xb = xr + b * kQuantBlock;
        int32_t isum[2] = {0, 0};
        if (p.four_bit) {  // byte row i holds W[i] (low nibble) and W[i + 16] (high)
          for (int64_t i = 0; i < kHalf; ++i) {
            const uint8_t q = q_t[(b * kHalf + i) * p.tile + j];
            isum[0] += (q & 15) * xb[i];
            isum[1] += (q >> 4) * xb[kHalf + i];
          }
        } else {
          for (int64_t i = 0; i < kQuantBlock; ++i) {
            isum[i / kHalf] += static_cast<int8_t>(q_t[(b * kQuantBlock + i) * p.tile + j]) * xb[i];
          }
        }
        float x_sum[2];
        GroupSums(p, r, b, x_sum);
        for (int64_t h = 0; h < (two_groups ? 2 : 1); ++h) {
          const int64_t at = s_t + (two_groups ? 2 * b + h : b) * p.tile + j;
          const float m = p.mins != nullptr ? ScaleAt(p.mins, p.f32_scales, at) : 0.f;
          acc = BlockTerm(acc, ScaleAt(p.scales, p.f32_scales, at), m, p.x_scale[r * nb + b], x_sum[h],
                          two_groups ? isum[h] : isum[0] + isum[1]);
        }
      }
      p.y[r * p.tiles * p.tile + t * p.tile + j] = acc;
    }
  }
}

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
// The AVX2 kernels below take a column range [j0, j1) (a multiple of 32 wide) and walk it block by
// block: for each 32-block of k, its weight rows left to right, adding into y (which stays in L1).
// The weights are then read as they lie, a few contiguous rows at a time: 19 GB/s one core can
// stream, where a 32-column strip down all k rows at a time (the AVX-512 kernel's order, rows `tile`
// bytes apart) drew 6.7 GB/s from memory on an AVX2 EPYC.

// 8 scales (or mins) from `offset` on of an f32 or f16 scale array, as f32.
inline __m256 Scale8(const void* base, bool f32, int64_t offset) {
  if (f32) return _mm256_loadu_ps(static_cast<const float*>(base) + offset);
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const _Float16*>(base) + offset)));
}

// Float activations, any layout: columns [j0, j1) of tile t, every row (FloatColumns' arithmetic:
// 8 columns per register, each weight widened by one load-and-extend, converted, multiplied into
// its half block's sum).
void FloatColumns32(const Problem& p, int64_t t, int64_t j0, int64_t j1) {
  constexpr int64_t kHalf = kQuantBlock / 2;
  const int64_t nb = p.k / kQuantBlock, ng = p.k / p.group;
  const int64_t qrows = p.four_bit ? p.k / 2 : p.k;
  const uint8_t* q_t = p.qs + t * qrows * p.tile;
  const int64_t s_t = t * ng * p.tile;  // this tile's first scale row
  const bool two_groups = p.group == kHalf;
  const __m256i low4 = _mm256_set1_epi32(15);
  auto widen_u8 = [](const uint8_t* q) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))); };
  auto widen_s8 = [](const uint8_t* q) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))); };
  for (int64_t r = 0; r < p.rows; ++r) {
    const float* xr = p.x + r * p.k;
    float* yr = p.y + r * p.tiles * p.tile + t * p.tile;
    for (int64_t j = j0; j < j1; ++j) yr[j] = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = xr + b * kQuantBlock;
      float x_sum[2] = {0.f, 0.f};
      for (int64_t i = 0; i < kHalf; ++i) {
        x_sum[0] += xb[i];
        x_sum[1] += xb[kHalf + i];
      }
      if (!two_groups) x_sum[0] += x_sum[1];  // one group for the block: both halves at once
      for (int64_t j = j0; j < j1; j += 32) {
        __m256 part[2][4];
        for (int h = 0; h < 2; ++h) {
          for (int c = 0; c < 4; ++c) part[h][c] = _mm256_setzero_ps();
        }
        // The next block's rows at these columns, a line each (one core waits on memory less: a
        // decode step's q4 matmuls 9.7 -> 7.7 ms on one core; 2+ blocks ahead or the scale rows too
        // measured no better).
        if ((j - j0) % 64 == 0) {
          for (int64_t i = 0; i < qrows / nb; ++i) __builtin_prefetch(q_t + ((b + 1) * (qrows / nb) + i) * p.tile + j);
        }
        if (p.four_bit) {  // byte row i holds W[i] (low nibble) and W[i + 16] (high)
          for (int64_t i = 0; i < kHalf; ++i) {
            const uint8_t* q = q_t + (b * kHalf + i) * p.tile + j;
            const __m256 x_lo = _mm256_set1_ps(xb[i]), x_hi = _mm256_set1_ps(xb[kHalf + i]);
            for (int c = 0; c < 4; ++c) {
              const __m256i w = widen_u8(q + 8 * c);
              part[0][c] = _mm256_fmadd_ps(x_lo, _mm256_cvtepi32_ps(_mm256_and_si256(w, low4)), part[0][c]);
              part[1][c] = _mm256_fmadd_ps(x_hi, _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 4)), part[1][c]);
            }
          }
        } else {
          for (int h = 0; h < 2; ++h) {
            for (int64_t i = 0; i < kHalf; ++i) {
              const uint8_t* q = q_t + (b * kQuantBlock + h * kHalf + i) * p.tile + j;
              const __m256 xi = _mm256_set1_ps(xb[h * kHalf + i]);
              for (int c = 0; c < 4; ++c) part[h][c] = _mm256_fmadd_ps(xi, _mm256_cvtepi32_ps(widen_s8(q + 8 * c)), part[h][c]);
            }
          }
        }
        if (!two_groups) {
          for (int c = 0; c < 4; ++c) part[0][c] = _mm256_add_ps(part[0][c], part[1][c]);
        }
        for (int c = 0; c < 4; ++c) {
          __m256 acc = _mm256_loadu_ps(yr + j + 8 * c);
          for (int h = 0; h < (two_groups ? 2 : 1); ++h) {
            const int64_t row = s_t + (two_groups ? 2 * b + h : b) * p.tile + j + 8 * c;
            if (p.mins != nullptr) acc = _mm256_fmadd_ps(Scale8(p.mins, p.f32_scales, row), _mm256_set1_ps(x_sum[h]), acc);
            acc = _mm256_fmadd_ps(Scale8(p.scales, p.f32_scales, row), part[h][c], acc);
          }
          _mm256_storeu_ps(yr + j + 8 * c, acc);
        }
      }
    }
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)

// Rows r0..r3 of 64 columns (64 bytes each) -> 4 registers of 16 32-bit lanes, each lane the 4
// rows' bytes of one column (what vpdpbusd multiplies by 4 activation codes). The in-lane unpacks
// leave register m, 128-bit chunk c, lane s holding column 16 c + 4 m + s; TransposeChunks undoes it.
inline void Interleave4(const uint8_t* r0, int64_t stride, __m512i out[4]) {
  const __m512i a = _mm512_loadu_si512(r0), b = _mm512_loadu_si512(r0 + stride);
  const __m512i c = _mm512_loadu_si512(r0 + 2 * stride), d = _mm512_loadu_si512(r0 + 3 * stride);
  const __m512i ab_lo = _mm512_unpacklo_epi8(a, b), ab_hi = _mm512_unpackhi_epi8(a, b);
  const __m512i cd_lo = _mm512_unpacklo_epi8(c, d), cd_hi = _mm512_unpackhi_epi8(c, d);
  out[0] = _mm512_unpacklo_epi16(ab_lo, cd_lo);
  out[1] = _mm512_unpackhi_epi16(ab_lo, cd_lo);
  out[2] = _mm512_unpacklo_epi16(ab_hi, cd_hi);
  out[3] = _mm512_unpackhi_epi16(ab_hi, cd_hi);
}

// 4x4 transpose of 128-bit chunks: afterwards register c holds columns 16 c .. 16 c + 15 in order.
inline void TransposeChunks(__m512i v[4]) {
  const __m512i a = _mm512_shuffle_i32x4(v[0], v[1], 0x44), b = _mm512_shuffle_i32x4(v[0], v[1], 0xEE);
  const __m512i c = _mm512_shuffle_i32x4(v[2], v[3], 0x44), d = _mm512_shuffle_i32x4(v[2], v[3], 0xEE);
  v[0] = _mm512_shuffle_i32x4(a, c, 0x88);
  v[1] = _mm512_shuffle_i32x4(a, c, 0xDD);
  v[2] = _mm512_shuffle_i32x4(b, d, 0x88);
  v[3] = _mm512_shuffle_i32x4(b, d, 0xDD);
}

// Columns [j0, j0 + 64) of tile t, every row: integer dot products per 32-block with vpdpbusd
// (u8 weights x s8 activations), scaled per block in f32. 8-bit weights are made unsigned by
// adding 128 (xor 0x80), and 128 * sum(xq) is taken back off.
void Columns64(const Problem& p, int64_t t, int64_t j0) {
  const int64_t nb = p.k / kQuantBlock;
  const int64_t qrows = p.four_bit ? p.k / 2 : p.k;
  const uint8_t* q_t = p.qs + t * qrows * p.tile + j0;
  const _Float16* d_t = static_cast<const _Float16*>(p.scales) + t * nb * p.tile + j0;
  const _Float16* m_t = p.four_bit ? static_cast<const _Float16*>(p.mins) + t * nb * p.tile + j0 : nullptr;
  const __m512i low4 = _mm512_set1_epi8(15), sign = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t r = 0; r < p.rows; ++r) {
    const int8_t* xr = p.xq + r * p.k;
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t b = 0; b < nb; ++b) {
      const int8_t* xb = xr + b * kQuantBlock;
      __m512i isum[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(),
                         _mm512_setzero_si512()};
      __m512i w[4];
      // Weight rows are 64 bytes every `tile`: ask for block b + 2's rows now.
      for (int64_t i = 0; i < qrows / nb; ++i) Prefetch(q_t + ((b + 2) * (qrows / nb) + i) * p.tile, 64);
      if (p.four_bit) {  // byte row i holds W[i] (low nibble) and W[i + 16] (high)
        for (int64_t i = 0; i < kQuantBlock / 2; i += 4) {
          Interleave4(q_t + (b * kQuantBlock / 2 + i) * p.tile, p.tile, w);
          const __m512i x_lo = _mm512_set1_epi32(Codes4(xb + i));
          const __m512i x_hi = _mm512_set1_epi32(Codes4(xb + kQuantBlock / 2 + i));
          for (int m = 0; m < 4; ++m) {
            isum[m] = _mm512_dpbusd_epi32(isum[m], _mm512_and_si512(w[m], low4), x_lo);
            isum[m] = _mm512_dpbusd_epi32(isum[m], _mm512_and_si512(_mm512_srli_epi16(w[m], 4), low4), x_hi);
          }
        }
      } else {
        for (int64_t i = 0; i < kQuantBlock; i += 4) {
          Interleave4(q_t + (b * kQuantBlock + i) * p.tile, p.tile, w);
          const __m512i x4 = _mm512_set1_epi32(Codes4(xb + i));
          for (int m = 0; m < 4; ++m) isum[m] = _mm512_dpbusd_epi32(isum[m], _mm512_xor_si512(w[m], sign), x4);
        }
        const __m512i offset = _mm512_set1_epi32(128 * p.xq_sum[r * nb + b]);
        for (int m = 0; m < 4; ++m) isum[m] = _mm512_sub_epi32(isum[m], offset);
      }
      TransposeChunks(isum);
      const __m512 d_x = _mm512_set1_ps(p.x_scale[r * nb + b]), x_sum = _mm512_set1_ps(p.x_sum[r * nb + b]);
      for (int c = 0; c < 4; ++c) {
        const __m512 d_w = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(d_t + b * p.tile + 16 * c)));
        const __m512 m_w = p.four_bit ? _mm512_cvtph_ps(_mm256_loadu_si256(
                                            reinterpret_cast<const __m256i*>(m_t + b * p.tile + 16 * c)))
                                      : _mm512_setzero_ps();
        // = BlockTerm, lane by lane
        acc[c] = _mm512_fmadd_ps(_mm512_mul_ps(d_w, d_x), _mm512_cvtepi32_ps(isum[c]),
                                 _mm512_fmadd_ps(m_w, x_sum, acc[c]));
      }
    }
    float* yr = p.y + r * p.tiles * p.tile + t * p.tile + j0;
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(yr + 16 * c, acc[c]);
  }
}
#endif

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
// Rows r0..r3 of 32 columns -> 4 registers of 8 32-bit lanes, each lane the 4 rows' bytes of one
// column. The in-lane unpacks leave register m, 128-bit half c, lane s holding column 16 c + 4 m + s.
inline void Interleave4(const uint8_t* r0, int64_t stride, __m256i out[4]) {
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0));
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + stride));
  const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + 2 * stride));
  const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + 3 * stride));
  const __m256i ab_lo = _mm256_unpacklo_epi8(a, b), ab_hi = _mm256_unpackhi_epi8(a, b);
  const __m256i cd_lo = _mm256_unpacklo_epi8(c, d), cd_hi = _mm256_unpackhi_epi8(c, d);
  out[0] = _mm256_unpacklo_epi16(ab_lo, cd_lo);
  out[1] = _mm256_unpackhi_epi16(ab_lo, cd_lo);
  out[2] = _mm256_unpacklo_epi16(ab_hi, cd_hi);
  out[3] = _mm256_unpackhi_epi16(ab_hi, cd_hi);
}

// Undoes Interleave4's order: afterwards register c holds columns 8 c .. 8 c + 7.
inline void TransposeHalves(__m256i v[4]) {
  const __m256i a = _mm256_permute2x128_si256(v[0], v[1], 0x20), b = _mm256_permute2x128_si256(v[2], v[3], 0x20);
  const __m256i c = _mm256_permute2x128_si256(v[0], v[1], 0x31), d = _mm256_permute2x128_si256(v[2], v[3], 0x31);
  v[0] = a;
  v[1] = b;
  v[2] = c;
  v[3] = d;
}

// q8 activations, any layout: columns [j0, j1) of tile t, every row (block by block, as
// FloatColumns32): ColumnsScalar's sums, bit for bit. vpmaddubsw multiplies u8 x s8 byte pairs
// into s16 sums, vpmaddwd by ones adds those pairs into s32 (llama.cpp's AVX2 formulation; Columns64
// is the VNNI one). 4-bit: a half block's pair sums stay in s16 (4 of them, each |.| <= 2 * 15 *
// 127); 8-bit weights are signed, so the product is |w| * (x with w's sign) (vpsignb), each pair
// widened at once (2 * 128 * 127 fits s16 once, not twice).
void Columns32(const Problem& p, int64_t t, int64_t j0, int64_t j1) {
  constexpr int64_t kHalf = kQuantBlock / 2;
  const int64_t nb = p.k / kQuantBlock, ng = p.k / p.group;
  const int64_t qrows = p.four_bit ? p.k / 2 : p.k;
  const uint8_t* q_t = p.qs + t * qrows * p.tile;
  const int64_t s_t = t * ng * p.tile;  // this tile's first scale row
  const bool two_groups = p.group == kHalf;
  const __m256i low4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
  for (int64_t r = 0; r < p.rows; ++r) {
    const int8_t* xr = p.xq + r * p.k;
    float* yr = p.y + r * p.tiles * p.tile + t * p.tile;
    for (int64_t j = j0; j < j1; ++j) yr[j] = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
      const int8_t* xb = xr + b * kQuantBlock;
      float x_sum[2];
      GroupSums(p, r, b, x_sum);
      const __m256 d_x = _mm256_set1_ps(p.x_scale[r * nb + b]);
      for (int64_t j = j0; j < j1; j += 32) {
        __m256i isum[2][4];  // per half block
        for (int h = 0; h < 2; ++h) {
          for (int m = 0; m < 4; ++m) isum[h][m] = _mm256_setzero_si256();
        }
        __m256i w[4];
        // The next block's rows at these columns, a line each (one core waits on memory less: a
        // decode step's q4 matmuls 8.7 -> 6.5 ms on one core; 2+ blocks ahead or the scale rows too
        // measured no better).
        if ((j - j0) % 64 == 0) {
          for (int64_t i = 0; i < qrows / nb; ++i) __builtin_prefetch(q_t + ((b + 1) * (qrows / nb) + i) * p.tile + j);
        }
        if (p.four_bit) {  // byte row i holds W[i] (low nibble) and W[i + 16] (high)
          for (int64_t i = 0; i < kHalf; i += 4) {
            Interleave4(q_t + (b * kHalf + i) * p.tile + j, p.tile, w);
            const __m256i x_lo = _mm256_set1_epi32(Codes4(xb + i));
            const __m256i x_hi = _mm256_set1_epi32(Codes4(xb + kHalf + i));
            for (int m = 0; m < 4; ++m) {
              isum[0][m] = _mm256_add_epi16(isum[0][m], _mm256_maddubs_epi16(_mm256_and_si256(w[m], low4), x_lo));
              isum[1][m] = _mm256_add_epi16(
                  isum[1][m], _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w[m], 4), low4), x_hi));
            }
          }
          for (int h = 0; h < 2; ++h) {
            for (int m = 0; m < 4; ++m) isum[h][m] = _mm256_madd_epi16(isum[h][m], ones);
          }
        } else {
          for (int64_t i = 0; i < kQuantBlock; i += 4) {
            Interleave4(q_t + (b * kQuantBlock + i) * p.tile + j, p.tile, w);
            const __m256i x4 = _mm256_set1_epi32(Codes4(xb + i));
            __m256i* half = isum[i / kHalf];
            for (int m = 0; m < 4; ++m) {
              const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w[m]), _mm256_sign_epi8(x4, w[m]));
              half[m] = _mm256_add_epi32(half[m], _mm256_madd_epi16(pairs, ones));
            }
          }
        }
        if (!two_groups) {  // one group for the block
          for (int m = 0; m < 4; ++m) isum[0][m] = _mm256_add_epi32(isum[0][m], isum[1][m]);
        }
        for (int h = 0; h < (two_groups ? 2 : 1); ++h) TransposeHalves(isum[h]);
        for (int c = 0; c < 4; ++c) {
          __m256 acc = _mm256_loadu_ps(yr + j + 8 * c);
          for (int h = 0; h < (two_groups ? 2 : 1); ++h) {  // = BlockTerm, lane by lane
            const int64_t at = s_t + (two_groups ? 2 * b + h : b) * p.tile + j + 8 * c;
            const __m256 m_w = p.mins != nullptr ? Scale8(p.mins, p.f32_scales, at) : _mm256_setzero_ps();
            acc = _mm256_fmadd_ps(_mm256_mul_ps(Scale8(p.scales, p.f32_scales, at), d_x), _mm256_cvtepi32_ps(isum[h][c]),
                                  _mm256_fmadd_ps(m_w, _mm256_set1_ps(x_sum[h]), acc));
          }
          _mm256_storeu_ps(yr + j + 8 * c, acc);
        }
      }
    }
  }
}
#endif

// Columns per work item for a tile `tile` wide. A narrow tile (<= 128, the loader's 64) is one
// item: its rows are one contiguous run of bytes, which the item streams front to back (a Gemma 3
// head, 640 x 262144 8-bit, on 2 cores: 13.4 ms at tiles of 1024 split 4 ways, 8.9 ms at tiles of
// 64). Wider tiles: about a quarter of the tile (items for two or more threads even in the
// narrowest matrix), a multiple of 32, at least 64, at most 512.
int64_t ItemColumns(int64_t tile) {
  if (tile <= 128) return tile;
  const int64_t quarter = ((tile + 3) / 4 + 31) / 32 * 32;
  return std::clamp<int64_t>(quarter, 64, 512);
}

int64_t ItemCount(const Problem& p) { return p.tiles * ((p.tile + p.item_cols - 1) / p.item_cols); }

// Work item: p.item_cols columns of one tile (the last item of a tile may be narrower). The vector
// kernels take what is a multiple of their width, plain C++ the rest.
void RunItem(const Problem& p, int64_t item) {
  const int64_t per_tile = (p.tile + p.item_cols - 1) / p.item_cols;
  const int64_t t = item / per_tile;
  int64_t j0 = (item % per_tile) * p.item_cols;
  const int64_t j1 = std::min(j0 + p.item_cols, p.tile);
  [[maybe_unused]] const int64_t j_vec = j0 + (j1 - j0) / 32 * 32;  // the AVX2 kernels: [j0, j_vec)
  if (p.xq == nullptr) {  // float x
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
    if (j_vec > j0) FloatColumns32(p, t, j0, j_vec);
    j0 = j_vec;
#endif
    for (; j0 < j1; j0 += kColumnBlock) {
      if (j1 - j0 >= kColumnBlock) {
        FloatColumns<kColumnBlock>(p, t, j0, kColumnBlock);
      } else {
        FloatColumns<0>(p, t, j0, j1 - j0);
      }
    }
    return;
  }
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
  if (p.legacy) {
    for (; j0 + 64 <= j1; j0 += 64) Columns64(p, t, j0);  // one 64-byte register of a weight row
  }
#endif
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
  if (j_vec > j0) Columns32(p, t, j0, j_vec);
  j0 = std::max(j0, j_vec);
#endif
  if (j0 < j1) ColumnsScalar(p, t, j0, j1 - j0);
}

// Work shared by the calling thread and the kernels' helper threads: each participant takes items
// from an atomic counter until none are left; the caller then waits for items still in flight. A
// helper that arrives after the work is gone just returns (the state is shared_ptr-owned, so a
// straggler never touches the next job's).
struct Shared {
  std::function<void(int64_t)> run_item;
  int64_t items = 0;
  int64_t helpers = 0;  // helper threads 0 .. helpers - 1 take part
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void Participate(Shared& s) {
  for (int64_t i = s.next.fetch_add(1); i < s.items; i = s.next.fetch_add(1)) {
    s.run_item(i);
    s.done.fetch_add(1, std::memory_order_release);
  }
}

inline void CpuRelax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

// The kernels' own helper threads, one fewer than XLA's CPU pool has threads (one per core: the
// caller, XLA's executor thread, is the other). Why not XLA's pool (ffi::ThreadPool::Schedule): a
// task scheduled there starts only when a pool thread is free and awake, and in a decode step
// (products of 20-200 us) it often was not: the caller then did every item alone, so whole decode
// runs went at one core's speed, others at two (SmolLM2 q4, 2048 tokens, 5 runs in one process:
// 30-64 tok/s; issue 20). A helper here waits for the next job spinning ~50 us (the gaps between a
// step's products are shorter), then sleeps on a condition variable. Created on first use, never
// destroyed (detached: a process exits with them waiting).
class HelperThreads {
 public:
  static HelperThreads& Get(int64_t threads) {
    static HelperThreads* helpers = new HelperThreads(threads);
    return *helpers;
  }
  int64_t size() const { return count_; }

  // Publishes a job to helpers 0 .. job->helpers - 1.
  void Publish(std::shared_ptr<Shared> job) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = std::move(job);
      generation_.fetch_add(1, std::memory_order_release);
    }
    if (sleeping_.load(std::memory_order_acquire) > 0) wake_.notify_all();
  }

 private:
  explicit HelperThreads(int64_t threads) : count_(std::max<int64_t>(threads, 0)) {
    for (int64_t index = 0; index < count_; ++index) std::thread([this, index] { Loop(index); }).detach();
  }

  void Loop(int64_t index) {
    uint64_t seen = 0;
    for (;;) {
      for (int spins = 0; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        if (spins < kSpins) {
          CpuRelax();
          continue;
        }
        std::unique_lock<std::mutex> lock(mutex_);
        sleeping_.fetch_add(1, std::memory_order_acq_rel);
        wake_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        sleeping_.fetch_sub(1, std::memory_order_acq_rel);
      }
      std::shared_ptr<Shared> job;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        seen = generation_.load(std::memory_order_acquire);
        job = job_;
      }
      if (job != nullptr && index < job->helpers) Participate(*job);
    }
  }

  static constexpr int kSpins = 1500;  // pause instructions, ~50 us on the hosts measured
  const int64_t count_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int64_t> sleeping_{0};
  std::shared_ptr<Shared> job_;
};

// Runs run_item(0 .. items - 1) on the caller and up to `helpers` helper threads (at most one
// fewer than XLA's pool has threads, i.e. one per other core: more would oversubscribe the cores,
// and a descheduled helper holding an item stalls the caller's final wait).
void ParallelFor(ffi::ThreadPool& pool, int64_t items, int64_t helpers,
                 std::function<void(int64_t)> run_item) {
  HelperThreads& threads = HelperThreads::Get(pool.num_threads() - 1);
  auto shared = std::make_shared<Shared>();
  shared->run_item = std::move(run_item);
  shared->items = items;
  shared->helpers = std::min<int64_t>({helpers, threads.size(), items - 1});
  if (shared->helpers > 0) threads.Publish(shared);
  Participate(*shared);
  // Wait for the items still in flight on helpers: spin briefly (an item ends within microseconds
  // when its helper is running), with the pause hint, then give the core away: on 2 vCPUs a waiter
  // that never yields can hold the very core a descheduled helper needs.
  for (int spins = 0; shared->done.load(std::memory_order_acquire) < items; ++spins) {
    if (spins < 2000) {
      CpuRelax();
    } else {
      std::this_thread::yield();
    }
  }
}

// One layer of packed weights qs [layers, tiles, rows_q, tile] with f16 or f32 scales [layers,
// tiles, k / group, tile] (and mins), checked; pointers already at that layer (the index is read
// in place, see above).
struct PackedLayer {
  const uint8_t* qs;       // 4-bit: u8 nibbles; 8-bit: s8 bytes
  const void* scales;      // f16 or f32
  const void* mins;        // nullptr without mins
  int64_t k, tiles, rows_q, tile, group;
  bool four_bit, f32_scales;
  bool legacy;             // f16 scales, group 32, mins exactly for 4-bit: the original kernels
};

ffi::Error ReadPackedLayer(const std::string& op, ffi::AnyBuffer qs, ffi::AnyBuffer scales,
                           ffi::AnyBuffer mins, ffi::Buffer<ffi::S32> layer_buf, bool has_mins, PackedLayer& w) {
  auto q_dims = qs.dimensions();
  auto s_dims = scales.dimensions();
  if (q_dims.size() != 4) return ffi::Error::InvalidArgument(op + ": qs must be [layers, tiles, rows_q, tile]");
  w.four_bit = qs.element_type() == ffi::U8;
  if (!w.four_bit && qs.element_type() != ffi::S8) {
    return ffi::Error::InvalidArgument(op + ": qs must be u8 (4-bit) or s8 (8-bit)");
  }
  if (scales.element_type() != ffi::F16 && scales.element_type() != ffi::F32) {
    return ffi::Error::InvalidArgument(op + ": scales must be f16 or f32");
  }
  w.f32_scales = scales.element_type() == ffi::F32;
  if (w.four_bit && !has_mins) return ffi::Error::InvalidArgument(op + ": 4-bit weights need mins");
  if (has_mins && (mins.element_type() != scales.element_type() || mins.dimensions().size() != 4 ||
                   mins.element_count() != scales.element_count())) {
    return ffi::Error::InvalidArgument(op + ": mins must match the scales' type and shape");
  }
  const int64_t layers = q_dims[0];
  w.tiles = q_dims[1];
  w.rows_q = q_dims[2];
  w.tile = q_dims[3];
  w.k = w.four_bit ? 2 * w.rows_q : w.rows_q;
  if (w.k % kQuantBlock != 0) return ffi::Error::InvalidArgument(op + ": k must be a multiple of 32");
  if (s_dims.size() != 4 || s_dims[0] != layers || s_dims[1] != w.tiles || s_dims[3] != w.tile ||
      s_dims[2] == 0 || w.k % s_dims[2] != 0) {
    return ffi::Error::InvalidArgument(op + ": scales must be [layers, tiles, k / group, tile]");
  }
  w.group = w.k / s_dims[2];
  if (w.group != 16 && w.group != 32) return ffi::Error::InvalidArgument(op + ": group must be 16 or 32");
  const int64_t layer = layer_buf.typed_data()[0];
  if (layer < 0 || layer >= layers) return ffi::Error::InvalidArgument(op + ": layer index out of range");
  const int64_t s_layer = w.tiles * s_dims[2] * w.tile;  // scales per layer
  const int64_t s_bytes = w.f32_scales ? 4 : 2;
  w.qs = static_cast<const uint8_t*>(qs.untyped_data()) + layer * w.tiles * w.rows_q * w.tile;
  w.scales = static_cast<const char*>(scales.untyped_data()) + layer * s_layer * s_bytes;
  w.mins = has_mins ? static_cast<const char*>(mins.untyped_data()) + layer * s_layer * s_bytes : nullptr;
  w.legacy = !w.f32_scales && w.group == kQuantBlock && has_mins == w.four_bit;
  return ffi::Error::Success();
}

ffi::Error QuantGemvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer qs,
                         ffi::AnyBuffer scales, ffi::AnyBuffer mins,
                         ffi::Buffer<ffi::S32> layer_buf, ffi::ResultBuffer<ffi::F32> y, bool quantize_x,
                         bool has_mins) {
  auto x_dims = x.dimensions();
  if (x_dims.size() != 2) return ffi::Error::InvalidArgument("quant_gemv: x must be [rows, k]");
  PackedLayer w;
  if (ffi::Error error = ReadPackedLayer("quant_gemv", qs, scales, mins, layer_buf, has_mins, w);
      error.failure()) {
    return error;
  }
  const int64_t rows = x_dims[0], k = x_dims[1], tiles = w.tiles, tile = w.tile;
  if (k != w.k) return ffi::Error::InvalidArgument("quant_gemv: qs does not match x's k");
  const int64_t nb = k / kQuantBlock;
  std::vector<int8_t> xq(quantize_x ? rows * k : 0);
  std::vector<float> x_scale(quantize_x ? rows * nb : 0), x_sum(quantize_x ? rows * nb : 0);
  std::vector<int32_t> xq_sum(quantize_x ? rows * nb : 0);
  if (quantize_x) {
    QuantizeActivations(x.typed_data(), rows, k, xq.data(), x_scale.data(), x_sum.data(), xq_sum.data());
  }
  const Problem problem{x.typed_data(), quantize_x ? xq.data() : nullptr, x_scale.data(), x_sum.data(), xq_sum.data(),
                        w.qs, w.scales, w.mins, y->typed_data(), rows, k, tiles, tile, w.four_bit, w.f32_scales,
                        w.group, w.legacy, ItemColumns(tile)};
  const int64_t items = ItemCount(problem);
  // Small products (< ~64k weights per helper) are not worth waking another thread for.
  ParallelFor(pool, items, (k * tiles * tile) / (1 << 16),
              [&problem](int64_t item) { RunItem(problem, item); });
  return ffi::Error::Success();
}


// ----------------------------------------------------------------------------- decode attention
constexpr int64_t kSplitLen = 256;

// The CPU's own vector width: kLanes floats, one register (GCC/Clang vector extension). Written
// at 16 floats, the kernels below ran several times slower on an AVX2 machine: GCC lowers a
// 16-float generic vector there to memory round trips in loops like these (the flash kernel's
// Q K^T micro-kernel: 4.9 GFLOP/s with 16-float vectors vs 65 with 8, one core).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kVectorRegisters = 32;
#else
constexpr int kLanes = 8;
constexpr int kVectorRegisters = 16;
#endif
typedef float VecN __attribute__((vector_size(4 * kLanes)));
typedef int32_t IntN __attribute__((vector_size(4 * kLanes)));
typedef uint16_t U16xN __attribute__((vector_size(2 * kLanes)));
typedef uint32_t U32xN __attribute__((vector_size(4 * kLanes)));

// kLanes consecutive values as f32 (memcpy: no alignment assumed).
inline VecN LoadN(const float* p) {
  VecN v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline VecN LoadN(const uint16_t* p) {  // bf16 bits -> f32 (exact: bf16 is f32's top half)
  U16xN bits;
  std::memcpy(&bits, p, sizeof bits);
  const U32xN wide = __builtin_convertvector(bits, U32xN) << 16;
  VecN v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
}
inline void StoreN(float* p, VecN v) { std::memcpy(p, &v, sizeof v); }
inline float Widen(float v) { return v; }
inline float Widen(uint16_t bits) {  // bf16 bits -> f32
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
}
inline VecN SplatN(float x) { return VecN{} + x; }

// Tree sum of the lanes (a chain of scalar adds would dominate a 64-wide dot product).
inline float HorizontalSum(VecN v) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof v);
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
  }
  return lanes[0];
}

// e^x for x <= 0 (softmax weights), in plain arithmetic so loops over it vectorise:
// e^x = 2^n e^r with n = round(x / ln 2), |r| <= ln 2 / 2, e^r by its degree-6 Taylor polynomial
// (relative error < 2e-7, about float epsilon). x < -87 (incl. -inf) gives 0.
inline float ExpNonPositive(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float n = __builtin_floorf(xc * 1.44269504088896341f + 0.5f);
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float poly = 1.0f / 720;
  poly = poly * r + 1.0f / 120;
  poly = poly * r + 1.0f / 24;
  poly = poly * r + 1.0f / 6;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x < -87.0f ? 0.0f : poly * two_n;
}

// Where a sequence's queries and cached vectors are: the kernel below is written once over a Layout,
// which says, for sequence b, its query rows (first row, q_len, position of query 0, kv_len) and the
// element offset of the cached vector (position pos, KV head h). Two layouts:
//   ContiguousLayout: the contiguous cache [layers, batch, max_seq, kv_heads, d], q [batch, q_len, ...]
//   PagedLayout:      the page pool [layers, num_pages, page_size, kv_heads, d] with a page table,
//                     q [tokens, ...] ragged by cu_q_lens (pallas_kernels/paged_attention.py's layout)
struct ContiguousLayout {
  const int32_t* q_offset;
  const int32_t* kv_len;
  int64_t batch, q_len, max_seq, kv_heads, d, layer;

  int64_t Seqs() const { return batch; }
  int64_t MaxQLen() const { return q_len; }
  int64_t QStart(int64_t b) const { return b * q_len; }
  int64_t QLen(int64_t) const { return q_len; }
  int64_t QOffset(int64_t b) const { return q_offset[b]; }
  int64_t KvLen(int64_t b) const { return kv_len[b]; }
  int64_t Vector(int64_t b, int64_t pos, int64_t h) const {
    return (((layer * batch + b) * max_seq + pos) * kv_heads + h) * d;
  }
};

struct PagedLayout {
  const int32_t* cu_q_lens;   // [max_seqs + 1]
  const int32_t* kv_lens;     // [max_seqs]
  const int32_t* page_table;  // [max_seqs, pages_per_seq]
  int64_t num_seqs, pages_per_seq, num_pages, page_size, kv_heads, d, layer;
  int64_t min_q_len;   // sequences with fewer or more new tokens than [min_q_len, max_q_len] are
  int64_t max_q_len;   // another kernel's (or backend's): no rows here
  int page_shift;      // log2(page_size) when a power of two (a shift, not a division, per key), else -1

  int64_t Seqs() const { return num_seqs; }
  int64_t MaxQLen() const { return max_q_len; }
  int64_t QStart(int64_t s) const { return cu_q_lens[s]; }
  int64_t NewTokens(int64_t s) const { return cu_q_lens[s + 1] - cu_q_lens[s]; }
  int64_t QLen(int64_t s) const {
    const int64_t n = NewTokens(s);
    return n >= min_q_len && n <= max_q_len ? n : 0;
  }
  int64_t QOffset(int64_t s) const { return kv_lens[s] - NewTokens(s); }  // bottom-right aligned
  int64_t KvLen(int64_t s) const { return kv_lens[s]; }
  int64_t Vector(int64_t s, int64_t pos, int64_t h) const {
    const int64_t j = page_shift >= 0 ? pos >> page_shift : pos / page_size;
    const int64_t slot = page_shift >= 0 ? pos & (page_size - 1) : pos % page_size;
    const int64_t page = page_table[s * pages_per_seq + j];
    return (((layer * num_pages + page) * page_size + slot) * kv_heads + h) * d;
  }
};

template <typename Layout>
struct AttnProblem {
  Layout layout;
  const float* q;   // [rows of every sequence, heads, d]
  const void* k;
  const void* v;
  float* out;       // as q
  int64_t heads, kv_heads, d, splits;
  float scale, soft_cap;
  int64_t window;
  bool bf16_products;  // flash, bf16 cache: the queries are bf16 values; use bf16 products where the CPU has them
  // Per item: acc [rows, d], then max [rows], sum [rows] (rows: at most MaxQLen() * group()).
  float* partials;
  int64_t partial_size;

  int64_t group() const { return heads / kv_heads; }
  int64_t rows(int64_t b) const { return layout.QLen(b) * group(); }
  // Keys [lo, hi) some query of sequence b sees (empty for a sequence with no rows here).
  int64_t KeyLo(int64_t b) const {
    return window > 0 ? std::max<int64_t>(0, layout.QOffset(b) - window + 1) : 0;
  }
  int64_t KeyHi(int64_t b) const {
    if (layout.QLen(b) == 0) return 0;
    return std::max<int64_t>(0, std::min<int64_t>(layout.KvLen(b), layout.QOffset(b) + layout.QLen(b)));
  }
};

// Cached vectors are d elements every kv_heads * d (and pages anywhere in the pool): a walk the
// hardware prefetchers follow poorly, so each loop asks for the vector kPrefetchKeys positions ahead
// (at 2048 cached tokens: 5.3-6.3 -> 4.2-4.5 ms of attention per decode step).
constexpr int64_t kPrefetchKeys = 8;

// One work item: the keys [t0, t1) of one (sequence, KV head) for all its query rows.
// C = head_dim / kLanes is a compile-time constant so that a key or value vector, and the output rows
// being accumulated, live in registers: the loops read the cache and write scores, nothing else
// (a store-and-reload scratch vector here ran 4x slower inside XLA than in isolation). The split's
// vector offsets come from the layout once (for a page table: one lookup per key, shared by keys
// and values).
template <typename T, int C, typename Layout>
void AttendSplit(const AttnProblem<Layout>& p, int64_t item) {
  constexpr int64_t d = kLanes * C;
  // Rows accumulated together: kRowBlock * C accumulators and C value registers.
  constexpr int64_t kRowBlock = std::max<int64_t>(1, std::min<int64_t>(4, (kVectorRegisters - C) / C));
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int64_t split = item % p.splits;
  const int64_t h = (item / p.splits) % p.kv_heads;
  const int64_t b = item / (p.splits * p.kv_heads);
  const int64_t g = p.group(), rows = p.rows(b);
  float* acc = p.partials + item * p.partial_size;
  float* row_max = acc + rows * d;
  float* row_sum = row_max + rows;
  std::fill(acc, acc + rows * d, 0.f);
  std::fill(row_max, row_max + rows, kNegInf);
  std::fill(row_sum, row_sum + rows, 0.f);
  const int64_t t0 = p.KeyLo(b) + split * kSplitLen;
  const int64_t t1 = std::min(p.KeyHi(b), t0 + kSplitLen);
  if (t0 >= t1) return;
  const int64_t n = t1 - t0;

  // This KV head's query rows r = i * g + j (position i, head h * g + j), pre-scaled, and each
  // row's absolute position.
  std::vector<VecN> q_rows(rows * C);
  std::vector<int64_t> row_pos(rows);
  std::vector<float> scores(rows * n);
  const int64_t q_start = p.layout.QStart(b), q_offset = p.layout.QOffset(b);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = r / g;
    const float* src = p.q + ((q_start + i) * p.heads + h * g + r % g) * d;
    for (int c = 0; c < C; ++c) q_rows[r * C + c] = LoadN(src + kLanes * c) * p.scale;
    row_pos[r] = q_offset + i;
  }
  // Offsets of keys t0 .. t1 - 1, then kPrefetchKeys repeats of the last (what the prefetches read).
  std::vector<int64_t> offset(n + kPrefetchKeys);
  for (int64_t t = 0; t < n; ++t) offset[t] = p.layout.Vector(b, t0 + t, h);
  std::fill(offset.begin() + n, offset.end(), offset[n - 1]);
  const T* keys = static_cast<const T*>(p.k);
  const T* values = static_cast<const T*>(p.v);
  // Every row sees every key of this split (the usual decode case): no per-key mask.
  const bool all_seen = t1 - 1 <= row_pos[0] && (p.window <= 0 || t0 > row_pos[rows - 1] - p.window);

  for (int64_t t = 0; t < n; ++t) {
    Prefetch(keys + offset[t + kPrefetchKeys], d * sizeof(T));
    VecN key[C];
    for (int c = 0; c < C; ++c) key[c] = LoadN(keys + offset[t] + kLanes * c);
    for (int64_t r = 0; r < rows; ++r) {
      VecN prod = q_rows[r * C] * key[0];
      for (int c = 1; c < C; ++c) prod += q_rows[r * C + c] * key[c];
      float s = HorizontalSum(prod);
      if (p.soft_cap > 0.f) s = p.soft_cap * std::tanh(s / p.soft_cap);
      if (!all_seen) {
        const int64_t key_pos = t0 + t;
        const bool seen = key_pos <= row_pos[r] && (p.window <= 0 || key_pos > row_pos[r] - p.window);
        if (!seen) s = kNegInf;
      }
      scores[r * n + t] = s;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* s = &scores[r * n];
    float m = kNegInf;
    for (int64_t t = 0; t < n; ++t) m = std::max(m, s[t]);
    if (m == kNegInf) continue;  // this row sees no key here: its weights stay -inf, skipped below
    for (int64_t t = 0; t < n; ++t) s[t] = ExpNonPositive(s[t] - m);  // masked: exactly 0
    float sum = 0.f;
    for (int64_t t = 0; t < n; ++t) sum += s[t];
    row_max[r] = m;
    row_sum[r] = sum;
  }
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int64_t rb = std::min(kRowBlock, rows - r0);
    const float* w[kRowBlock];
    for (int64_t j = 0; j < kRowBlock; ++j) w[j] = &scores[(r0 + std::min(j, rb - 1)) * n];
    VecN out[kRowBlock][C] = {};
    for (int64_t t = 0; t < n; ++t) {
      if (r0 == 0) Prefetch(values + offset[t + kPrefetchKeys], d * sizeof(T));
      VecN value[C];
      for (int c = 0; c < C; ++c) value[c] = LoadN(values + offset[t] + kLanes * c);
      for (int64_t j = 0; j < kRowBlock; ++j) {
        // A row that sees no key at all kept -inf weights; a masked key has weight exactly 0
        // (and 0 * a finite cached value is 0: keys below kv_len were written).
        const float wt = w[j][t] == kNegInf ? 0.f : w[j][t];
        for (int c = 0; c < C; ++c) out[j][c] += wt * value[c];
      }
    }
    for (int64_t j = 0; j < rb; ++j) {
      for (int c = 0; c < C; ++c) StoreN(acc + (r0 + j) * d + kLanes * c, out[j][c]);
    }
  }
}

// The head sizes AttendSplit is compiled for (native_cpu.py's ATTENTION_HEAD_DIMS mirrors this).
bool SupportedHeadDim(int64_t d) {
  return d == 16 || d == 32 || d == 64 || d == 80 || d == 96 || d == 128 || d == 256;
}

template <typename T, typename Layout>
void AttendSplitFor(const AttnProblem<Layout>& p, int64_t item) {  // p.d is a SupportedHeadDim
  switch (p.d) {
    case 16: AttendSplit<T, 16 / kLanes>(p, item); break;
    case 32: AttendSplit<T, 32 / kLanes>(p, item); break;
    case 64: AttendSplit<T, 64 / kLanes>(p, item); break;
    case 80: AttendSplit<T, 80 / kLanes>(p, item); break;
    case 96: AttendSplit<T, 96 / kLanes>(p, item); break;
    case 128: AttendSplit<T, 128 / kLanes>(p, item); break;
    case 256: AttendSplit<T, 256 / kLanes>(p, item); break;  // Gemma 3
  }
}

// out = sum_s acc_s e^(m_s - M) / sum_s l_s e^(m_s - M), M = max_s m_s; zeros where no key is seen.
template <typename Layout>
void MergeSplits(const AttnProblem<Layout>& p) {
  const int64_t g = p.group(), d = p.d;
  for (int64_t b = 0; b < p.layout.Seqs(); ++b) {
    const int64_t rows = p.rows(b), q_start = p.layout.QStart(b);
    for (int64_t h = 0; h < p.kv_heads; ++h) {
      const float* first = p.partials + (b * p.kv_heads + h) * p.splits * p.partial_size;
      for (int64_t r = 0; r < rows; ++r) {
        float* o = p.out + ((q_start + r / g) * p.heads + h * g + r % g) * d;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < p.splits; ++s) m = std::max(m, first[s * p.partial_size + rows * d + r]);
        std::fill(o, o + d, 0.f);
        if (m == -std::numeric_limits<float>::infinity()) continue;
        float total = 0.f;
        for (int64_t s = 0; s < p.splits; ++s) {
          const float* part = first + s * p.partial_size;
          const float m_s = part[rows * d + r];
          if (m_s == -std::numeric_limits<float>::infinity()) continue;
          const float w = std::exp(m_s - m);
          total += w * part[rows * d + rows + r];
          for (int64_t e = 0; e < d; ++e) o[e] += w * part[r * d + e];
        }
        const float inv = 1.f / total;
        for (int64_t e = 0; e < d; ++e) o[e] *= inv;
      }
    }
  }
}

// The (sequence, KV head, split) items of a checked problem on the pool's threads, then the merge.
template <typename Layout>
void RunAttention(ffi::ThreadPool& pool, AttnProblem<Layout>& p, bool bf16) {
  int64_t most_keys = 0, total_keys = 0;
  for (int64_t b = 0; b < p.layout.Seqs(); ++b) {
    const int64_t keys = std::max<int64_t>(0, p.KeyHi(b) - p.KeyLo(b));
    most_keys = std::max(most_keys, keys);
    total_keys += keys;
  }
  p.splits = std::max<int64_t>(1, (most_keys + kSplitLen - 1) / kSplitLen);
  p.partial_size = p.layout.MaxQLen() * p.group() * (p.d + 2);
  const int64_t items = p.layout.Seqs() * p.kv_heads * p.splits;
  std::vector<float> partials(items * p.partial_size);
  p.partials = partials.data();
  // One helper thread per ~256 KB of K/V read (below that, waking one costs more than it saves).
  const int64_t bytes = p.kv_heads * total_keys * p.d * (bf16 ? 2 : 4) * 2;
  const AttnProblem<Layout>& problem = p;
  if (items > 0) {
    ParallelFor(pool, items, bytes / (256 << 10), [&problem, bf16](int64_t item) {
      if (bf16) {
        AttendSplitFor<uint16_t>(problem, item);
      } else {
        AttendSplitFor<float>(problem, item);
      }
    });
  }
  MergeSplits(p);
}

// ----------------------------------------------------------------------------- flash prefill attention
// JaxchunkFlashAttention and the long rows of JaxchunkPagedAttention: attention of prefill chunks
// (many query positions) against the cache, written once over a Layout like the decode kernel.
//
// XLA's blockwise loop (blockwise_attention.py) runs two batched dots per key block plus the
// softmax's elementwise passes, each a separate XLA op writing its [rows, keys] tile to memory.
// Here one work item is one (sequence, KV head, tile of kTileRows query rows: positions x the G
// heads of the KV head, position-major). The tile is held transposed, rows along the vector lanes:
// Q^T [d, rows] (pre-scaled), scores S^T [keys, rows], output O^T [d, rows], so every step is a
// vector op over rows: the two products use one register-blocked micro-kernel (kMicroOut outputs
// x kRowVecs vectors of rows, the classic GEMM kernel shape; a K or V element broadcast, a vector
// of Q^T or P^T loaded), the online softmax's max, exp, sum and rescale run on whole row vectors,
// and keys are read in their natural [key, d] layout (no transpose), as f32 copies of each block
// of kFlashKeys keys (bf16 widened; a page table resolved once per key). The mask is applied only
// on blocks some row does not fully see (the causal diagonal, the kv_len tail, the window edge);
// blocks no row of the tile sees are never read, so a tile's cost follows its own causal (and
// window) bound. f32 accumulation throughout. With AVX512_BF16, bf16 queries on a bf16 cache
// (attr bf16_products) take bf16 products instead (FlashTile<..., kPairs>: vdpbf16ps, two products
// per lane and instruction): the SmolLM2 bf16 prefill at 8100 tokens went from 276 to 375 tok/s.
inline float ToFloat(float x) { return x; }
inline float ToFloat(uint16_t bits) {  // bf16 bits -> f32 (exact)
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float x;
  std::memcpy(&x, &wide, sizeof x);
  return x;
}

// The micro-kernel's register tile: kMicroOut outputs x kRowVecs vectors of rows, 12 accumulators
// (of 16 ymm / 32 zmm registers). 6 x 2 is the classic AVX2 GEMM shape: 91 GFLOP/s of one core's
// ~104 peak in isolation, where 4 x 3 ran at 45 and 8 x 1 at 74 (experiments/native_flash... see
// the issue-20 note; measured with the shapes of a 96-row tile and d 64).
constexpr int kMicroOut = 6, kRowVecs = 2;
constexpr int64_t kMicroRows = kRowVecs * kLanes;  // rows per micro-kernel call: 16 / 32
constexpr int64_t kTileRows = 96;                  // rows per work item (32 positions at G = 3)
constexpr int64_t kFlashKeys = 48;                 // keys per block (a multiple of kMicroOut)
constexpr int64_t kFlashMaxHeadDim = 512;
static_assert(kTileRows % kMicroRows == 0 && kFlashKeys % kMicroOut == 0, "tile shapes");

// ExpNonPositive on kLanes lanes (the same polynomial and rounding: the same values).
inline VecN ExpNonPositiveN(VecN x) {
  const VecN lowest = x < -87.0f ? SplatN(-87.0f) : x;
  const VecN t = lowest * 1.44269504088896341f + 0.5f;
  IntN n_int = __builtin_convertvector(t, IntN);      // truncates towards zero
  n_int += __builtin_convertvector(n_int, VecN) > t;  // -1 where that rounded up: floor
  const VecN n = __builtin_convertvector(n_int, VecN);
  const VecN r = (lowest - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  VecN poly = SplatN(1.0f / 720);
  poly = poly * r + 1.0f / 120;
  poly = poly * r + 1.0f / 24;
  poly = poly * r + 1.0f / 6;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const IntN bits = (n_int + 127) << 23;
  VecN two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x < -87.0f ? VecN{} : poly * two_n;
}

// c[i][0:kMicroRows] (+)= sum_{k < n} a[i * a_i + k * a_k] * b[k * ldb + 0:kMicroRows], i < kOut.
// Q K^T: a = the key block [key, d], b = Q^T, c = S^T. P V: a = the value block read as [d, key],
// b = P^T, c = O^T (accumulated).
template <int kOut, bool kAccumulate>
inline void MicroKernel(const float* a, int64_t a_i, int64_t a_k, const float* b, int64_t ldb, int64_t n,
                        float* c, int64_t ldc) {
  VecN acc[kOut][kRowVecs];
  for (int i = 0; i < kOut; ++i) {
    for (int j = 0; j < kRowVecs; ++j) acc[i][j] = kAccumulate ? LoadN(c + i * ldc + j * kLanes) : VecN{};
  }
  for (int64_t k = 0; k < n; ++k) {
    VecN row[kRowVecs];
    for (int j = 0; j < kRowVecs; ++j) row[j] = LoadN(b + k * ldb + j * kLanes);
    for (int i = 0; i < kOut; ++i) {
      const float x = a[i * a_i + k * a_k];
      for (int j = 0; j < kRowVecs; ++j) acc[i][j] += x * row[j];
    }
  }
  for (int i = 0; i < kOut; ++i) {
    for (int j = 0; j < kRowVecs; ++j) StoreN(c + i * ldc + j * kLanes, acc[i][j]);
  }
}

// The f32 micro-kernel as MicroKernels takes it (MicroKernelBf16's twin below).
struct F32Products {
  template <int kOut, bool kAccumulate>
  static void Run(const float* a, int64_t a_i, int64_t a_k, const float* b, int64_t ldb, int64_t n, float* c,
                  int64_t ldc) {
    MicroKernel<kOut, kAccumulate>(a, a_i, a_k, b, ldb, n, c, ldc);
  }
};

// Products' micro-kernel over outputs [0, outs) of a: whole kMicroOut groups, then the remainder (a
// head_dim that is not a multiple of 6). A: float (F32Products) or uint32_t bf16 pairs (Bf16Products).
template <typename Products, bool kAccumulate, int kOut = kMicroOut, typename A>
inline void MicroKernelTail(int64_t outs, const A* a, int64_t a_i, int64_t a_k, const A* b, int64_t ldb,
                            int64_t n, float* c, int64_t ldc) {
  if constexpr (kOut > 0) {
    if (outs == kOut) return Products::template Run<kOut, kAccumulate>(a, a_i, a_k, b, ldb, n, c, ldc);
    MicroKernelTail<Products, kAccumulate, kOut - 1>(outs, a, a_i, a_k, b, ldb, n, c, ldc);
  }
}

template <typename Products, bool kAccumulate, typename A>
inline void MicroKernels(int64_t outs, const A* a, int64_t a_i, int64_t a_k, const A* b, int64_t ldb, int64_t n,
                         float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + kMicroOut <= outs; i += kMicroOut) {
    Products::template Run<kMicroOut, kAccumulate>(a + i * a_i, a_i, a_k, b, ldb, n, c + i * ldc, ldc);
  }
  if (i < outs) MicroKernelTail<Products, kAccumulate>(outs - i, a + i * a_i, a_i, a_k, b, ldb, n, c + i * ldc, ldc);
}

#if defined(__AVX512BF16__)
// bf16 products (AVX512_BF16's vdpbf16ps: 32 bf16 x bf16 products summed in pairs into 16 f32
// lanes, one instruction where f32 takes two FMAs), for a bf16 cache with bf16 queries: operands
// are 32-bit words, each two bf16 of consecutive elements along the sum (the low half first).
// c[i][0:kMicroRows] (+)= sum_{k < n_pairs} pairs(a[i * a_i + k * a_k]) . pairs(b[k * ldb + 0:kMicroRows]):
// Q K^T: a = the key block as words [key, d / 2] (its natural layout), b = Q^T's words [d / 2, rows];
// P V: a = the value block's key-pair words [keys / 2, d], b = P^T's words [keys / 2, rows].
constexpr bool kBf16Products = true;

inline __m512bh LoadPairs(const uint32_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

template <int kOut, bool kAccumulate>
inline void MicroKernelBf16(const uint32_t* a, int64_t a_i, int64_t a_k, const uint32_t* b, int64_t ldb,
                            int64_t n_pairs, float* c, int64_t ldc) {
  static_assert(kLanes == 16, "AVX-512 lanes");
  __m512 acc[kOut][kRowVecs];
  for (int i = 0; i < kOut; ++i) {
    for (int j = 0; j < kRowVecs; ++j) {
      acc[i][j] = kAccumulate ? _mm512_loadu_ps(c + i * ldc + j * kLanes) : _mm512_setzero_ps();
    }
  }
  for (int64_t k = 0; k < n_pairs; ++k) {
    __m512bh row[kRowVecs];
    for (int j = 0; j < kRowVecs; ++j) row[j] = LoadPairs(b + k * ldb + j * kLanes);
    for (int i = 0; i < kOut; ++i) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[i * a_i + k * a_k]));
      for (int j = 0; j < kRowVecs; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], x, row[j]);
    }
  }
  for (int i = 0; i < kOut; ++i) {
    for (int j = 0; j < kRowVecs; ++j) _mm512_storeu_ps(c + i * ldc + j * kLanes, acc[i][j]);
  }
}

struct Bf16Products {
  template <int kOut, bool kAccumulate>
  static void Run(const uint32_t* a, int64_t a_i, int64_t a_k, const uint32_t* b, int64_t ldb, int64_t n_pairs,
                  float* c, int64_t ldc) {
    MicroKernelBf16<kOut, kAccumulate>(a, a_i, a_k, b, ldb, n_pairs, c, ldc);
  }
};

// 16 words, each lane's bf16 bits of `lo` in its low half and of `hi` in its high half (inputs:
// bf16 bits in 32-bit lanes).
inline __m512i PairWords(__m512i lo, __m512i hi) { return _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)); }

// 16 bf16 bits (a cache row's), each in a 32-bit lane.
inline __m512i Bf16Lanes(const uint16_t* p) {
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// f32 -> bf16 bits, rounded to nearest even (vcvtneps2bf16), 16 at a time, each in a 32-bit lane.
inline __m512i Bf16Bits(const float* x) {
  return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x)));
}

// Two f32 as one word of bf16 bits (x0 low), rounded to nearest even (exact for bf16 values).
inline uint32_t Bf16Word(float x0, float x1) {
  auto bits = [](float x) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // finite inputs (queries)
  };
  return bits(x0) | (bits(x1) << 16);
}
#else
constexpr bool kBf16Products = false;  // no AVX512_BF16: a bf16 cache is widened to f32 products
#endif

// A flash call's work items: (sequence, first row of the tile), costliest first; each item of the
// pool is one of them x one KV head.
struct FlashTiles {
  std::vector<std::pair<int64_t, int64_t>> tiles;

  int64_t items(int64_t kv_heads) const { return static_cast<int64_t>(tiles.size()) * kv_heads; }
};

// Keys [lo, hi) some query at positions [first_pos, last_pos] of a sequence sees.
inline std::pair<int64_t, int64_t> FlashKeyRange(int64_t first_pos, int64_t last_pos, int64_t kv_len,
                                                 int64_t window) {
  const int64_t lo = window > 0 ? std::max<int64_t>(0, first_pos - window + 1) : 0;
  return {lo, std::max<int64_t>(lo, std::min<int64_t>(kv_len, last_pos + 1))};
}

// One item (tile x KV head). Scratch is the calling thread's. kPairs: bf16 products (T is the
// bf16 cache's bits and the queries are bf16 values; MicroKernelBf16): Q and K as they are, the
// softmax weights P rounded to bf16 for P V (the row sums and all accumulation stay f32).
template <typename T, typename Layout, bool kPairs = false>
void FlashTile(const AttnProblem<Layout>& p, const FlashTiles& work, int64_t item) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  constexpr int64_t R = kTileRows;
  const auto [b, r0] = work.tiles[item / p.kv_heads];
  const int64_t h = item % p.kv_heads;
  const int64_t g = p.group(), d = p.d;
  const Layout& lay = p.layout;
  const int64_t rows = std::min(R, lay.QLen(b) * g - r0);  // real rows; the rest of R is padding
  const int64_t q_start = lay.QStart(b), q_offset = lay.QOffset(b);
  const int64_t first_pos = q_offset + r0 / g, last_pos = q_offset + (r0 + rows - 1) / g;
  const auto [lo, hi] = FlashKeyRange(first_pos, last_pos, lay.KvLen(b), p.window);

  thread_local std::vector<float> scratch;
  const int64_t need = 2 * d * R + kFlashKeys * R + 2 * kFlashKeys * d + 3 * R;
  if (static_cast<int64_t>(scratch.size()) < need) scratch.resize(need);
  float* qt = scratch.data();         // Q^T [d, R], pre-scaled
  float* ot = qt + d * R;             // O^T [d, R], unnormalised
  float* st = ot + d * R;             // S^T [kFlashKeys, R]: scores, then weights
  float* kb = st + kFlashKeys * R;    // the key block [kFlashKeys, d], f32
  float* vb = kb + kFlashKeys * d;    // the value block [kFlashKeys, d], f32
  float* row_max = vb + kFlashKeys * d;
  float* row_sum = row_max + R;
  float* row_pos = row_sum + R;       // positions (exact in f32 below 2^24)
#if defined(__AVX512BF16__)
  // kPairs: Q^T as words [d / 2, R] (unscaled: the scores are scaled in f32), the key block as
  // words [kFlashKeys, d / 2], the value block as key-pair words [kFlashKeys / 2, d], P^T as
  // key-pair words [kFlashKeys / 2, R].
  thread_local std::vector<uint32_t> words;
  uint32_t *qw = nullptr, *kw = nullptr, *vw = nullptr, *pw = nullptr;
  if constexpr (kPairs) {
    const int64_t need_words = d / 2 * R + kFlashKeys * d / 2 + kFlashKeys / 2 * d + kFlashKeys / 2 * R;
    if (static_cast<int64_t>(words.size()) < need_words) words.resize(need_words);
    qw = words.data();
    kw = qw + d / 2 * R;
    vw = kw + kFlashKeys * d / 2;
    pw = vw + kFlashKeys / 2 * d;
  }
#endif
  for (int64_t r = 0; r < R; ++r) {
    const int64_t rr = r0 + std::min(r, rows - 1);  // padding rows repeat the last real one
    const float* src = p.q + ((q_start + rr / g) * p.heads + h * g + rr % g) * d;
    if constexpr (kPairs) {
#if defined(__AVX512BF16__)
      for (int64_t j = 0; j < d / 2; ++j) qw[j * R + r] = Bf16Word(src[2 * j], src[2 * j + 1]);
#endif
    } else {
      for (int64_t e = 0; e < d; ++e) qt[e * R + r] = src[e] * p.scale;
    }
    row_pos[r] = static_cast<float>(q_offset + rr / g);
    row_max[r] = kNegInf;
    row_sum[r] = 0.f;
  }
  std::fill(ot, ot + d * R, 0.f);
  const T* keys = static_cast<const T*>(p.k);
  const T* values = static_cast<const T*>(p.v);

  for (int64_t t0 = lo; t0 < hi; t0 += kFlashKeys) {
    const int64_t n = std::min(kFlashKeys, hi - t0);
    const int64_t n_micro = (n + kMicroOut - 1) / kMicroOut * kMicroOut;
    if constexpr (kPairs) {
#if defined(__AVX512BF16__)
      // Keys as they lie (a key's d bf16 are its d / 2 words); values interleaved by key pairs.
      const int64_t n_even = (n + 1) / 2 * 2;
      for (int64_t t = 0; t < n_micro; ++t) {  // keys past n: zeros (their scores are never used)
        if (t < n) {
          std::memcpy(kw + t * d / 2, keys + lay.Vector(b, t0 + t, h), d * sizeof(uint16_t));
        } else {
          std::fill(kw + t * d / 2, kw + (t + 1) * d / 2, 0u);
        }
      }
      for (int64_t t = 0; t < n_even; t += 2) {  // an odd last key pairs with a zero value
        const uint16_t* v0 = reinterpret_cast<const uint16_t*>(values) + lay.Vector(b, t0 + t, h);
        const uint16_t* v1 = t + 1 < n ? reinterpret_cast<const uint16_t*>(values) + lay.Vector(b, t0 + t + 1, h) : nullptr;
        for (int64_t e = 0; e < d; e += kLanes) {
          const __m512i hi = v1 ? Bf16Lanes(v1 + e) : _mm512_setzero_si512();
          _mm512_storeu_si512(vw + t / 2 * d + e, PairWords(Bf16Lanes(v0 + e), hi));
        }
      }
      for (int64_t r = 0; r < R; r += kMicroRows) {
        MicroKernels<Bf16Products, false>(n_micro, kw, d / 2, 1, qw + r, R, d / 2, st + r, R);
      }
      for (int64_t i = 0; i < n * R; ++i) st[i] *= p.scale;
#endif
    } else {
      for (int64_t t = 0; t < n_micro; ++t) {  // keys past n: zeros (their scores are never used)
        if (t < n) {
          const int64_t off = lay.Vector(b, t0 + t, h);
          for (int64_t e = 0; e < d; ++e) kb[t * d + e] = ToFloat(keys[off + e]);
          for (int64_t e = 0; e < d; ++e) vb[t * d + e] = ToFloat(values[off + e]);
        } else {
          std::fill(kb + t * d, kb + (t + 1) * d, 0.f);
        }
      }
      for (int64_t r = 0; r < R; r += kMicroRows) MicroKernels<F32Products, false>(n_micro, kb, d, 1, qt + r, R, d, st + r, R);
    }
    if (p.soft_cap > 0.f) {
      for (int64_t i = 0; i < n * R; ++i) st[i] = p.soft_cap * std::tanh(st[i] / p.soft_cap);
    }
    // Every row sees every key of this block: no mask (the interior of a long prompt).
    const bool all_seen = t0 + n - 1 <= first_pos && (p.window <= 0 || t0 > last_pos - p.window);
    for (int64_t c = 0; c < R; c += kLanes) {
      if (!all_seen) {
        const VecN pos = LoadN(row_pos + c);
        for (int64_t t = 0; t < n; ++t) {
          const VecN key = SplatN(static_cast<float>(t0 + t));
          auto seen = key <= pos;
          if (p.window > 0) seen &= key > pos - static_cast<float>(p.window);
          StoreN(st + t * R + c, seen ? LoadN(st + t * R + c) : SplatN(kNegInf));
        }
      }
      VecN m_block = SplatN(kNegInf);
      for (int64_t t = 0; t < n; ++t) {
        const VecN s = LoadN(st + t * R + c);
        m_block = m_block > s ? m_block : s;
      }
      const VecN m_old = LoadN(row_max + c);
      const VecN m_new = m_old > m_block ? m_old : m_block;
      const VecN m_use = m_new == kNegInf ? VecN{} : m_new;  // rows that saw no key yet: weights 0
      const VecN alpha = ExpNonPositiveN(m_old - m_use);      // -inf (no keys before) -> 0
      VecN sum = {};
      for (int64_t t = 0; t < n; ++t) {
        const VecN w = ExpNonPositiveN(LoadN(st + t * R + c) - m_use);  // masked: exactly 0
        StoreN(st + t * R + c, w);
        sum += w;
      }
      StoreN(row_sum + c, alpha * LoadN(row_sum + c) + sum);
      StoreN(row_max + c, m_new);
      for (int64_t e = 0; e < d; ++e) StoreN(ot + e * R + c, alpha * LoadN(ot + e * R + c));
    }
    if constexpr (kPairs) {
#if defined(__AVX512BF16__)
      const int64_t n_pairs = (n + 1) / 2;
      if (n % 2) std::fill(st + n * R, st + (n + 1) * R, 0.f);  // the zero value's weight
      for (int64_t t = 0; t < 2 * n_pairs; t += 2) {
        for (int64_t c = 0; c < R; c += kLanes) {
          _mm512_storeu_si512(pw + t / 2 * R + c, PairWords(Bf16Bits(st + t * R + c), Bf16Bits(st + (t + 1) * R + c)));
        }
      }
      for (int64_t r = 0; r < R; r += kMicroRows) MicroKernels<Bf16Products, true>(d, vw, 1, d, pw + r, R, n_pairs, ot + r, R);
#endif
    } else {
      for (int64_t r = 0; r < R; r += kMicroRows) MicroKernels<F32Products, true>(d, vb, 1, d, st + r, R, n, ot + r, R);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t rr = r0 + r;
    float* dst = p.out + ((q_start + rr / g) * p.heads + h * g + rr % g) * d;
    const float inv = row_sum[r] > 0.f ? 1.f / row_sum[r] : 0.f;  // no key seen: zeros
    for (int64_t e = 0; e < d; ++e) dst[e] = ot[e * R + r] * inv;
  }
}

// The tiles of every sequence the layout gives rows (QLen > 0), costliest (most keys) first so the
// pool's last items are small ones; then the items on the pool's threads.
template <typename Layout>
void RunFlash(ffi::ThreadPool& pool, const AttnProblem<Layout>& p, bool bf16) {
  const int64_t g = p.group();
  FlashTiles work;
  std::vector<std::pair<int64_t, std::pair<int64_t, int64_t>>> costed;  // (keys, (sequence, r0))
  int64_t total_keys = 0;
  for (int64_t b = 0; b < p.layout.Seqs(); ++b) {
    const int64_t rows = p.layout.QLen(b) * g, q_offset = p.layout.QOffset(b);
    for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
      const int64_t last = q_offset + (std::min(rows, r0 + kTileRows) - 1) / g;
      const auto [lo, hi] = FlashKeyRange(q_offset + r0 / g, last, p.layout.KvLen(b), p.window);
      costed.push_back({hi - lo, {b, r0}});
      total_keys += hi - lo;
    }
  }
  std::stable_sort(costed.begin(), costed.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
  for (const auto& c : costed) work.tiles.push_back(c.second);
  const int64_t items = work.items(p.kv_heads);
  if (items == 0) return;
  // One helper per ~1M multiply-adds (a full block of a tile is 96 rows x 64 keys x d 64 x 2).
  const int64_t multiply_adds = total_keys * p.kv_heads * kTileRows * p.d * 2;
  const bool pairs = bf16 && p.bf16_products && kBf16Products;
  ParallelFor(pool, items, multiply_adds / (1 << 20), [&p, &work, bf16, pairs](int64_t item) {
    if (pairs) {
      if constexpr (kBf16Products) FlashTile<uint16_t, Layout, true>(p, work, item);
    } else if (bf16) {
      FlashTile<uint16_t>(p, work, item);
    } else {
      FlashTile<float>(p, work, item);
    }
  });
}

// k, v: both f32 or both u16 (bf16 bits), the same 5-d shape; sets bf16.
ffi::Error CheckCachePair(const char* op, ffi::AnyBuffer k, ffi::AnyBuffer v, bool& bf16) {
  auto k_dims = k.dimensions();
  if (k_dims.size() != 5) return ffi::Error::InvalidArgument(std::string(op) + ": k and v must be 5-d");
  bf16 = k.element_type() == ffi::U16;
  if ((!bf16 && k.element_type() != ffi::F32) || v.element_type() != k.element_type()) {
    return ffi::Error::InvalidArgument(std::string(op) + ": k and v must both be f32 or u16 (bf16 bits)");
  }
  for (size_t i = 0; i < 5; ++i) {
    if (v.dimensions()[i] != k_dims[i]) return ffi::Error::InvalidArgument(std::string(op) + ": k and v differ in shape");
  }
  return ffi::Error::Success();
}

// kFlash: the flash prefill kernel (JaxchunkFlashAttention: chunks), else the decode kernel
// (JaxchunkDecodeAttention: a few query positions); the same operands and checks.
template <bool kFlash>
ffi::Error ContiguousAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                                   ffi::AnyBuffer v, ffi::Buffer<ffi::S32> q_offset,
                                   ffi::Buffer<ffi::S32> kv_len, ffi::Buffer<ffi::S32> layer_buf,
                                   ffi::ResultBuffer<ffi::F32> out, float sm_scale, float soft_cap,
                                   int64_t window, bool bf16_products) {
  const std::string op = kFlash ? "flash_attention" : "decode_attention";
  auto q_dims = q.dimensions();
  if (q_dims.size() != 4) {
    return ffi::Error::InvalidArgument(op + ": q must be [batch, q_len, heads, d] and k [layers, batch, max_seq, kv_heads, d]");
  }
  bool bf16 = false;
  if (ffi::Error error = CheckCachePair(op.c_str(), k, v, bf16); error.failure()) return error;
  auto k_dims = k.dimensions();
  AttnProblem<ContiguousLayout> p{};
  ContiguousLayout& c = p.layout;
  c.batch = q_dims[0];
  c.q_len = q_dims[1];
  p.heads = q_dims[2];
  p.d = c.d = q_dims[3];
  c.max_seq = k_dims[2];
  p.kv_heads = c.kv_heads = k_dims[3];
  if (k_dims[1] != c.batch || k_dims[4] != p.d || p.heads % p.kv_heads != 0) {
    return ffi::Error::InvalidArgument(op + ": q and k shapes do not match");
  }
  if (kFlash ? p.d % 16 != 0 || p.d > kFlashMaxHeadDim : !SupportedHeadDim(p.d)) {
    return ffi::Error::InvalidArgument(op + (kFlash ? ": head_dim must be a multiple of 16, at most 512"
                                                    : ": head_dim must be 16, 32, 64, 80, 96 or 128"));
  }
  c.layer = layer_buf.typed_data()[0];
  if (c.layer < 0 || c.layer >= k_dims[0]) {
    return ffi::Error::InvalidArgument(op + ": layer index out of range");
  }
  c.q_offset = q_offset.typed_data();
  c.kv_len = kv_len.typed_data();
  for (int64_t b = 0; b < c.batch; ++b) {
    if (c.kv_len[b] > c.max_seq) {  // the host checks this; never read past the cache
      return ffi::Error::InvalidArgument(op + ": kv_len exceeds the cache length");
    }
  }
  p.q = q.typed_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.out = out->typed_data();
  p.scale = sm_scale;
  p.soft_cap = soft_cap;
  p.window = window;
  p.bf16_products = bf16_products;
  if constexpr (kFlash) {
    RunFlash(pool, p, bf16);
  } else {
    RunAttention(pool, p, bf16);
  }
  return ffi::Error::Success();
}

// Ragged paged attention. kAllRows false (JaxchunkPagedDecodeAttention): the rows of sequences with
// at most max_q_len new tokens (decode rows), by the decode kernel; every other row of out (padding,
// longer sequences) is zero. kAllRows (JaxchunkPagedAttention): also the longer sequences' rows, by
// the flash kernel (only padding rows are zero). Layout and semantics of
// pallas_kernels/paged_attention.py:
//   q:          f32 [tokens, heads, d]
//   k, v:       f32, or u16 holding bf16 bits, [layers, num_pages, page_size, kv_heads, d]
//   cu_q_lens:  s32 [max_seqs + 1];  kv_lens: s32 [max_seqs];  page_table: s32 [max_seqs, pages_per_seq]
//   num_seqs, layer: s32 scalars
//   attrs:      sm_scale, soft_cap (0: none), window (0: none), max_q_len
//   out:        f32 [tokens, heads, d]
// The host checks the step (jaxchunk.paged.check_step); the lengths and page ids this kernel reads
// are checked again here so that nothing reads outside the pool.
template <bool kAllRows>
ffi::Error PagedAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                                    ffi::AnyBuffer v, ffi::Buffer<ffi::S32> cu_q_lens,
                                    ffi::Buffer<ffi::S32> kv_lens, ffi::Buffer<ffi::S32> page_table,
                                    ffi::Buffer<ffi::S32> num_seqs_buf, ffi::Buffer<ffi::S32> layer_buf,
                                    ffi::ResultBuffer<ffi::F32> out, float sm_scale, float soft_cap,
                                    int64_t window, int64_t max_q_len, bool bf16_products) {
  auto q_dims = q.dimensions();
  auto t_dims = page_table.dimensions();
  if (q_dims.size() != 3 || t_dims.size() != 2) {
    return ffi::Error::InvalidArgument("paged_decode_attention: q must be [tokens, heads, d], page_table 2-d");
  }
  bool bf16 = false;
  if (ffi::Error error = CheckCachePair("paged_decode_attention", k, v, bf16); error.failure()) return error;
  auto k_dims = k.dimensions();
  AttnProblem<PagedLayout> p{};
  PagedLayout& l = p.layout;
  const int64_t tokens = q_dims[0], max_seqs = t_dims[0];
  p.heads = q_dims[1];
  p.d = l.d = q_dims[2];
  l.num_pages = k_dims[1];
  l.page_size = k_dims[2];
  p.kv_heads = l.kv_heads = k_dims[3];
  l.pages_per_seq = t_dims[1];
  if (k_dims[4] != p.d || p.heads % p.kv_heads != 0 || kv_lens.dimensions()[0] != max_seqs ||
      cu_q_lens.dimensions()[0] != max_seqs + 1) {
    return ffi::Error::InvalidArgument("paged_decode_attention: q, pages and step shapes do not match");
  }
  if (!SupportedHeadDim(p.d)) {
    return ffi::Error::InvalidArgument("paged_decode_attention: head_dim must be 16, 32, 64, 80, 96 or 128");
  }
  if (max_q_len < 1) return ffi::Error::InvalidArgument("paged_decode_attention: max_q_len must be >= 1");
  l.layer = layer_buf.typed_data()[0];
  if (l.layer < 0 || l.layer >= k_dims[0]) {
    return ffi::Error::InvalidArgument("paged_decode_attention: layer index out of range");
  }
  l.page_shift = -1;
  for (int shift = 0; shift < 31; ++shift) {
    if ((int64_t{1} << shift) == l.page_size) l.page_shift = shift;
  }
  l.cu_q_lens = cu_q_lens.typed_data();
  l.kv_lens = kv_lens.typed_data();
  l.page_table = page_table.typed_data();
  l.num_seqs = num_seqs_buf.typed_data()[0];
  l.max_q_len = max_q_len;
  if (l.num_seqs < 0 || l.num_seqs > max_seqs || l.cu_q_lens[0] < 0 || l.cu_q_lens[l.num_seqs] > tokens) {
    return ffi::Error::InvalidArgument("paged_decode_attention: num_seqs or cu_q_lens out of range");
  }
  for (int64_t s = 0; s < l.num_seqs; ++s) {
    const int64_t q_len = l.NewTokens(s), kv_len = l.KvLen(s);
    if (q_len < 0) return ffi::Error::InvalidArgument("paged_decode_attention: cu_q_lens decreases");
    if (!kAllRows && l.QLen(s) == 0) continue;  // not read here
    if (q_len > kv_len || kv_len > l.pages_per_seq * l.page_size) {
      return ffi::Error::InvalidArgument("paged_decode_attention: kv_len below q_len or past the sequence's pages");
    }
    for (int64_t j = 0; j < (kv_len + l.page_size - 1) / l.page_size; ++j) {
      const int32_t page = l.page_table[s * l.pages_per_seq + j];
      if (page < 0 || page >= l.num_pages) {
        return ffi::Error::InvalidArgument("paged_decode_attention: page id outside the pool");
      }
    }
  }
  p.q = q.typed_data();
  p.k = k.untyped_data();
  p.v = v.untyped_data();
  p.out = out->typed_data();
  std::fill(p.out, p.out + tokens * p.heads * p.d, 0.f);  // rows no sequence here owns
  p.scale = sm_scale;
  p.soft_cap = soft_cap;
  p.window = window;
  p.bf16_products = bf16_products;
  RunAttention(pool, p, bf16);
  if constexpr (kAllRows) {  // the longer sequences' rows: the flash kernel
    l.min_q_len = max_q_len + 1;
    l.max_q_len = std::numeric_limits<int64_t>::max();
    RunFlash(pool, p, bf16);
  }
  return ffi::Error::Success();
}

// ----------------------------------------------------------------------------- dense gemv
// JaxchunkDenseGemv: y = x @ W for a few rows of x (decode) and a plain f32 or bf16 W, read once,
// in place at its layer. XLA:CPU's dot at one row drew a third (f32) to a quarter (bf16) of the
// host's read bandwidth, with samples 8-12x below the slowest bandwidth sample
// (experiments/roofline.py's decode dots): the spread of dense-weight decode (issue 20).
//
//   x:     f32 [rows, k]
//   w:     f32, or u16 holding bf16 bits, [layers, k, n] (transposed: [layers, n, k], the tied
//          embedding [vocab, hidden] used as the LM head)
//   layer: s32 scalar (read in place, as the quantized gemv's)
//   y:     f32 [rows, n], products and sums in f32 (bf16 widened exactly)
//
// Work items are contiguous blocks of W, so each is one sequential read: [k, n]: a range of k
// (whole rows of W) into its own partial y [rows, n], the partials summed at the end; [n, k]: a
// range of output columns (whole rows of E), each a dot product along k.
constexpr int64_t kDenseRowsPerItem = 64;     // [k, n]: at least this many rows of W per item
constexpr int64_t kDenseColumnsPerItem = 256;  // [n, k]: this many rows of E per item

constexpr int kDenseRowsPerPass = 8;  // rows of W per pass over the partial y

template <typename T>
void DenseRowsInto(const float* x, int64_t rows, int64_t k, const T* w, int64_t n, int64_t i0, int64_t i1,
                   float* part) {
  // Rows i0..i1 of W, kDenseRowsPerPass at a time: each partial is loaded and stored once per pass,
  // and the next pass's rows are prefetched one pass ahead (measured on a Zen 4 core, f32 / bf16
  // from memory: 4 rows without prefetch 15.8 / 10.1 GB/s, 8 rows with it 17-22 / 18-19).
  constexpr int P = kDenseRowsPerPass;
  const int64_t n_vec = n / kLanes * kLanes;
  std::fill(part, part + rows * n, 0.0f);
  int64_t i = i0;
  for (; i + P <= i1; i += P) {
    const T* w0 = w + i * n;
    const bool prefetch = i + 2 * P <= i1;
    for (int64_t j = 0; j < n_vec; j += kLanes) {
      if (prefetch) {
        for (int u = P; u < 2 * P; ++u) __builtin_prefetch(w0 + u * n + j);
      }
      VecN wv[P];
      for (int u = 0; u < P; ++u) wv[u] = LoadN(w0 + u * n + j);
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = x + r * k + i;
        VecN acc = LoadN(part + r * n + j);
        for (int u = 0; u < P; ++u) acc += xr[u] * wv[u];
        StoreN(part + r * n + j, acc);
      }
    }
    for (int64_t j = n_vec; j < n; ++j) {
      for (int64_t r = 0; r < rows; ++r) {
        float acc = part[r * n + j];
        for (int u = 0; u < P; ++u) acc += x[r * k + i + u] * Widen(w0[u * n + j]);
        part[r * n + j] = acc;
      }
    }
  }
  for (; i < i1; ++i) {
    const T* wi = w + i * n;
    for (int64_t r = 0; r < rows; ++r) {
      const float xi = x[r * k + i];
      for (int64_t j = 0; j < n; ++j) part[r * n + j] += xi * Widen(wi[j]);
    }
  }
}

template <typename T>
void DenseDots(const float* x, int64_t rows, int64_t k, const T* e, int64_t n, int64_t j0, int64_t j1, float* y) {
  const int64_t k_vec = k / kLanes * kLanes;
  for (int64_t j = j0; j < j1; j += 4) {
    const int64_t m = std::min<int64_t>(4, j1 - j);
    const T* e0 = e + j * k;
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * k;
      VecN acc[4] = {};
      for (int64_t i = 0; i < k_vec; i += kLanes) {
        const VecN xv = LoadN(xr + i);
        for (int64_t u = 0; u < m; ++u) acc[u] += xv * LoadN(e0 + u * k + i);
      }
      for (int64_t u = 0; u < m; ++u) {
        float tail = 0.0f;
        for (int64_t i = k_vec; i < k; ++i) tail += xr[i] * Widen(e0[u * k + i]);
        y[r * n + j + u] = HorizontalSum(acc[u]) + tail;
      }
    }
  }
}

template <typename T>
void RunDenseGemv(ffi::ThreadPool& pool, const float* x, int64_t rows, int64_t k, const T* w, int64_t n,
                  bool transposed, float* y) {
  const int64_t helpers = (k * n) / (1 << 16);  // as the quantized gemv: ~64k weights per helper
  if (transposed) {
    const int64_t items = (n + kDenseColumnsPerItem - 1) / kDenseColumnsPerItem;
    ParallelFor(pool, items, helpers, [=](int64_t item) {
      const int64_t j0 = item * kDenseColumnsPerItem;
      DenseDots(x, rows, k, w, n, j0, std::min(n, j0 + kDenseColumnsPerItem), y);
    });
    return;
  }
  // Enough items to balance two to a few threads, each a block of >= kDenseRowsPerItem rows.
  const int64_t items = std::max<int64_t>(1, std::min<int64_t>(8, k / kDenseRowsPerItem));
  const int64_t per_item = (k + items - 1) / items;
  std::vector<float> parts(items * rows * n);
  ParallelFor(pool, items, helpers, [=, &parts](int64_t item) {
    const int64_t i0 = item * per_item;
    DenseRowsInto(x, rows, k, w, n, std::min(k, i0), std::min(k, i0 + per_item), parts.data() + item * rows * n);
  });
  std::copy(parts.begin(), parts.begin() + rows * n, y);
  for (int64_t item = 1; item < items; ++item) {
    const float* part = parts.data() + item * rows * n;
    for (int64_t e = 0; e < rows * n; ++e) y[e] += part[e];
  }
}

ffi::Error DenseGemvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                         ffi::Buffer<ffi::S32> layer_buf, ffi::ResultBuffer<ffi::F32> y, bool transposed) {
  auto x_dims = x.dimensions();
  auto w_dims = w.dimensions();
  if (x_dims.size() != 2) return ffi::Error::InvalidArgument("dense_gemv: x must be [rows, k]");
  if (w_dims.size() != 3) return ffi::Error::InvalidArgument("dense_gemv: w must be [layers, k, n] or [layers, n, k]");
  if (w.element_type() != ffi::F32 && w.element_type() != ffi::U16) {
    return ffi::Error::InvalidArgument("dense_gemv: w must be f32 or u16 (bf16 bits)");
  }
  const int64_t rows = x_dims[0], k = x_dims[1];
  const int64_t n = transposed ? w_dims[1] : w_dims[2];
  if ((transposed ? w_dims[2] : w_dims[1]) != k) return ffi::Error::InvalidArgument("dense_gemv: w does not match x's k");
  if (y->dimensions().size() != 2 || y->dimensions()[0] != rows || y->dimensions()[1] != n) {
    return ffi::Error::InvalidArgument("dense_gemv: y must be [rows, n]");
  }
  const int64_t layer = layer_buf.typed_data()[0];
  if (layer < 0 || layer >= w_dims[0]) return ffi::Error::InvalidArgument("dense_gemv: layer index out of range");
  if (w.element_type() == ffi::F32) {
    RunDenseGemv(pool, x.typed_data(), rows, k, static_cast<const float*>(w.untyped_data()) + layer * k * n, n,
                 transposed, y->typed_data());
  } else {
    RunDenseGemv(pool, x.typed_data(), rows, k, static_cast<const uint16_t*>(w.untyped_data()) + layer * k * n, n,
                 transposed, y->typed_data());
  }
  return ffi::Error::Success();
}

// ----------------------------------------------------------------------------- dequantize
// W [k, n] in f32 (row-major, column j = column j % tile of tile j / tile) from one layer of the
// packed weights: what prefill feeds to XLA's dot. XLA's own dequantization fusion (nibble
// interleave, convert, scale) is ~3x slower (SmolLM2's 30 layers: 75 vs 24 ms); here one item is
// one quant block of one tile.
// Any layout (GenericDequantize's item): block b of tile t, each half of 16 rows with its group's
// scale / min row: W = d * q (+ m), one f32 rounding (d * q is exact), as gguf.quants.
void GenericDequantizeBlock(const PackedLayer& w, int64_t t, int64_t b, float* out) {
  constexpr int64_t kHalf = kQuantBlock / 2;
  const int64_t tile = w.tile, n = w.tiles * tile, ng = w.k / w.group;
  std::vector<float> d(tile), m(w.mins != nullptr ? tile : 0);
  for (int64_t h = 0; h < 2; ++h) {
    const int64_t g = w.group == kHalf ? 2 * b + h : b;
    ScaleRow(w.scales, w.f32_scales, (t * ng + g) * tile, tile, d.data());
    if (w.mins != nullptr) ScaleRow(w.mins, w.f32_scales, (t * ng + g) * tile, tile, m.data());
    for (int64_t i = 0; i < kHalf; ++i) {
      float* o = out + (b * kQuantBlock + h * kHalf + i) * n + t * tile;
      if (w.four_bit) {
        const uint8_t* row = w.qs + (t * w.rows_q + b * kHalf + i) * tile;
        const int shift = h == 0 ? 0 : 4;
        for (int64_t j = 0; j < tile; ++j) o[j] = d[j] * static_cast<float>((row[j] >> shift) & 15);
      } else {
        const int8_t* row = reinterpret_cast<const int8_t*>(w.qs) + (t * w.rows_q + b * kQuantBlock + h * kHalf + i) * tile;
        for (int64_t j = 0; j < tile; ++j) o[j] = d[j] * static_cast<float>(row[j]);
      }
      if (w.mins != nullptr) {
        for (int64_t j = 0; j < tile; ++j) o[j] += m[j];
      }
    }
  }
}

ffi::Error DequantizeImpl(ffi::ThreadPool pool, ffi::AnyBuffer qs, ffi::AnyBuffer scales,
                          ffi::AnyBuffer mins, ffi::Buffer<ffi::S32> layer_buf, ffi::ResultBuffer<ffi::F32> w_out,
                          bool has_mins) {
  PackedLayer w;
  if (ffi::Error error = ReadPackedLayer("dequantize", qs, scales, mins, layer_buf, has_mins, w); error.failure()) {
    return error;
  }
  const bool four_bit = w.four_bit;
  const int64_t k = w.k, tiles = w.tiles, tile = w.tile, rows_q = w.rows_q;
  const int64_t nb = k / kQuantBlock, n = tiles * tile;
  if (w_out->dimensions().size() != 2 || w_out->dimensions()[0] != k || w_out->dimensions()[1] != n) {
    return ffi::Error::InvalidArgument("dequantize: output must be [k, tiles * tile]");
  }
  float* out = w_out->typed_data();
  if (!w.legacy) {
    ParallelFor(pool, tiles * nb, (k * n) / (1 << 16),
                [&w, nb, out](int64_t item) { GenericDequantizeBlock(w, item / nb, item % nb, out); });
    return ffi::Error::Success();
  }
  const uint8_t* q = w.qs;
  const _Float16* d = static_cast<const _Float16*>(w.scales);
  const _Float16* m = static_cast<const _Float16*>(w.mins);
  ParallelFor(pool, tiles * nb, (k * n) / (1 << 16), [=](int64_t item) {
    const int64_t t = item / nb, b = item % nb;
    const _Float16* d_b = d + (t * nb + b) * tile;
    const _Float16* m_b = four_bit ? m + (t * nb + b) * tile : nullptr;
    float* out_b = out + b * kQuantBlock * n + t * tile;  // row b * 32, column t * tile
    if (four_bit) {
      const uint8_t* q_b = q + (t * rows_q + b * kQuantBlock / 2) * tile;
      for (int64_t i = 0; i < kQuantBlock / 2; ++i) {
        const uint8_t* row = q_b + i * tile;
        float* lo = out_b + i * n;
        float* hi = out_b + (i + kQuantBlock / 2) * n;
        for (int64_t j = 0; j < tile; ++j) {
          const float scale = static_cast<float>(d_b[j]), min = static_cast<float>(m_b[j]);
          lo[j] = scale * static_cast<float>(row[j] & 15) + min;
          hi[j] = scale * static_cast<float>(row[j] >> 4) + min;
        }
      }
    } else {
      const int8_t* q_b = reinterpret_cast<const int8_t*>(q) + (t * rows_q + b * kQuantBlock) * tile;
      for (int64_t i = 0; i < kQuantBlock; ++i) {
        const int8_t* row = q_b + i * tile;
        float* o = out_b + i * n;
        for (int64_t j = 0; j < tile; ++j) o[j] = static_cast<float>(d_b[j]) * static_cast<float>(row[j]);
      }
    }
  });
  return ffi::Error::Success();
}

// The operands of the contiguous attention handlers (decode, flash) and of the paged ones (decode
// rows, all rows): one binding per signature, shared by its two handlers.
auto ContiguousAttentionBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<float>("sm_scale")
      .Attr<float>("soft_cap")
      .Attr<int64_t>("window")
      .Attr<bool>("bf16_products");
}

auto PagedAttentionBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<float>("sm_scale")
      .Attr<float>("soft_cap")
      .Attr<int64_t>("window")
      .Attr<int64_t>("max_q_len")
      .Attr<bool>("bf16_products");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxchunkQuantGemv, QuantGemvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("quantize_x")
                                  .Attr<bool>("has_mins"));


XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxchunkDecodeAttention, ContiguousAttentionImpl<false>,
                              ContiguousAttentionBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxchunkFlashAttention, ContiguousAttentionImpl<true>,
                              ContiguousAttentionBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxchunkPagedDecodeAttention, PagedAttentionImpl<false>,
                              PagedAttentionBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxchunkPagedAttention, PagedAttentionImpl<true>,
                              PagedAttentionBinding());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxchunkDenseGemv, DenseGemvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxchunkDequantize, DequantizeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("has_mins"));
