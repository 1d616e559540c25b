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
//   scales: f16 [layers, tiles, k / 32, tile];  mins: the same (4-bit only)
//   layer:  s32 scalar: W is that layer of the stack (read in place: inside the model's layer scan
//           a sliced operand would be copied into a new buffer first)
//   y:      f32 [rows, tiles * tile]
//
// Per quant block the 32 products are summed first, then scaled (W = d q + m):
//   y = sum_b d_b * (sum_i x_i q_i) + m_b * (sum_i x_i)        (the min term only for 4-bit)
// Columns are processed kColumnBlock (128) at a time, eight AVX-512 vectors of partial sums; the
// column blocks are shared among XLA's intra-op threads.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kQuantBlock = 32;
constexpr int64_t kColumnBlock = 128;

struct Problem {
  const float* x;
  const uint8_t* qs;       // 4-bit: u8 nibbles; 8-bit: s8 bytes (reinterpreted below)
  const _Float16* scales;
  const _Float16* mins;    // nullptr for 8-bit
  float* y;
  int64_t rows, k, tiles, tile;
  bool four_bit;
};

// Columns [j0, j0 + W) of tile t, every row. W is kColumnBlock (vectorised) or the edge remainder.
template <int64_t W>
void ColumnBlock(const Problem& p, int64_t t, int64_t j0, int64_t width) {
  const int64_t w = W > 0 ? W : width;
  const int64_t nb = p.k / kQuantBlock;
  const int64_t n = p.tiles * p.tile;
  const int64_t qrows = p.four_bit ? p.k / 2 : p.k;
  const uint8_t* q_t = p.qs + t * qrows * p.tile + j0;
  const _Float16* d_t = p.scales + t * nb * p.tile + j0;
  const _Float16* m_t = p.four_bit ? p.mins + t * nb * p.tile + j0 : nullptr;
  for (int64_t r = 0; r < p.rows; ++r) {
    const float* xr = p.x + r * p.k;
    float acc[kColumnBlock] = {};
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = xr + b * kQuantBlock;
      float part[kColumnBlock] = {};
      if (p.four_bit) {
        for (int64_t i = 0; i < kQuantBlock / 2; ++i) {
          const uint8_t* q = q_t + (b * kQuantBlock / 2 + i) * p.tile;
          const float x_lo = xb[i], x_hi = xb[kQuantBlock / 2 + i];
          for (int64_t j = 0; j < w; ++j) {
            part[j] += x_lo * static_cast<float>(q[j] & 15) + x_hi * static_cast<float>(q[j] >> 4);
          }
        }
        float x_sum = 0.f;
        for (int64_t i = 0; i < kQuantBlock; ++i) x_sum += xb[i];
        const _Float16* d = d_t + b * p.tile;
        const _Float16* m = m_t + b * p.tile;
        for (int64_t j = 0; j < w; ++j) {
          acc[j] += static_cast<float>(d[j]) * part[j] + static_cast<float>(m[j]) * x_sum;
        }
      } else {
        for (int64_t i = 0; i < kQuantBlock; ++i) {
          const int8_t* q = reinterpret_cast<const int8_t*>(q_t + (b * kQuantBlock + i) * p.tile);
          const float xi = xb[i];
          for (int64_t j = 0; j < w; ++j) part[j] += xi * static_cast<float>(q[j]);
        }
        const _Float16* d = d_t + b * p.tile;
        for (int64_t j = 0; j < w; ++j) acc[j] += static_cast<float>(d[j]) * part[j];
      }
    }
    float* yr = p.y + r * n + t * p.tile + j0;
    for (int64_t j = 0; j < w; ++j) yr[j] = acc[j];
  }
}

void RunItem(const Problem& p, int64_t item) {
  const int64_t blocks_per_tile = (p.tile + kColumnBlock - 1) / kColumnBlock;
  const int64_t t = item / blocks_per_tile;
  const int64_t j0 = (item % blocks_per_tile) * kColumnBlock;
  const int64_t width = std::min(kColumnBlock, p.tile - j0);
  if (width == kColumnBlock) {
    ColumnBlock<kColumnBlock>(p, t, j0, width);
  } else {
    ColumnBlock<0>(p, t, j0, width);
  }
}

// Work shared by the calling thread and XLA's pool: each participant takes items from an atomic
// counter until none are left; the caller then waits for items still in flight. A pool task that
// starts after the work is gone just returns (the state is shared_ptr-owned), so nothing waits on a
// task the pool has not started (the caller may itself be the pool's only thread).
struct Shared {
  std::function<void(int64_t)> run_item;
  int64_t items = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void Participate(Shared& s) {
  for (int64_t i = s.next.fetch_add(1); i < s.items; i = s.next.fetch_add(1)) {
    s.run_item(i);
    s.done.fetch_add(1, std::memory_order_release);
  }
}

// Runs run_item(0 .. items - 1) on the caller and up to `helpers` pool threads.
void ParallelFor(ffi::ThreadPool& pool, int64_t items, int64_t helpers,
                 std::function<void(int64_t)> run_item) {
  auto shared = std::make_shared<Shared>();
  shared->run_item = std::move(run_item);
  shared->items = items;
  helpers = std::min<int64_t>({helpers, pool.num_threads(), items - 1});
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([shared] { Participate(*shared); });
  }
  Participate(*shared);
  while (shared->done.load(std::memory_order_acquire) < items) {
  }
}

ffi::Error QuantGemvImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer qs,
                         ffi::Buffer<ffi::F16> scales, ffi::AnyBuffer mins,
                         ffi::Buffer<ffi::S32> layer_buf, ffi::ResultBuffer<ffi::F32> y) {
  auto x_dims = x.dimensions();
  auto q_dims = qs.dimensions();
  if (x_dims.size() != 2 || q_dims.size() != 4) {
    return ffi::Error::InvalidArgument(
        "quant_gemv: x must be [rows, k] and qs [layers, tiles, rows_q, tile]");
  }
  const bool four_bit = qs.element_type() == ffi::U8;
  if (!four_bit && qs.element_type() != ffi::S8) {
    return ffi::Error::InvalidArgument("quant_gemv: qs must be u8 (4-bit) or s8 (8-bit)");
  }
  const int64_t rows = x_dims[0], k = x_dims[1];
  const int64_t layers = q_dims[0], tiles = q_dims[1], tile = q_dims[3];
  if (q_dims[2] != (four_bit ? k / 2 : k) || k % kQuantBlock != 0) {
    return ffi::Error::InvalidArgument("quant_gemv: qs does not match x's k");
  }
  if (four_bit && mins.element_type() != ffi::F16) {
    return ffi::Error::InvalidArgument("quant_gemv: 4-bit weights need f16 mins");
  }
  const int64_t layer = layer_buf.typed_data()[0];
  if (layer < 0 || layer >= layers) {
    return ffi::Error::InvalidArgument("quant_gemv: layer index out of range");
  }
  const int64_t q_layer = tiles * q_dims[2] * tile;        // elements (bytes) per layer
  const int64_t s_layer = tiles * (k / kQuantBlock) * tile;
  const Problem problem{
      x.typed_data(),
      static_cast<const uint8_t*>(qs.untyped_data()) + layer * q_layer,
      reinterpret_cast<const _Float16*>(scales.typed_data()) + layer * s_layer,
      four_bit ? static_cast<const _Float16*>(mins.untyped_data()) + layer * s_layer : nullptr,
      y->typed_data(), rows, k, tiles, tile, four_bit};
  const int64_t items = tiles * ((tile + kColumnBlock - 1) / kColumnBlock);
  // Small products (< ~64k weights per helper) are not worth waking another thread for.
  ParallelFor(pool, items, (k * tiles * tile) / (1 << 16),
              [&problem](int64_t item) { RunItem(problem, item); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxchunkQuantGemv, QuantGemvImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

