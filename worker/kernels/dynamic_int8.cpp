// Dynamic int8 linear: each row of float32 x quantized to 8 bits on its own range, multiplied with
// int8 weights (one scale per output channel) in int32 by VPDPBUSD, mapped back to float32.
// Registered as torch.ops.tierserve.int8_dynamic_linear where the CPU has AVX512_VNNI; built
// with decode_attention.cpp into one library (worker/kernels/decode_attention.py).
//
// The same arithmetic as `DynamicInt8Linear`'s fbgemm path (worker/kernels/linears.py): a row
// maps affinely onto [-1, 1] (its minimum to -1, its maximum to +1), to the 256 levels
// round(unit x 127.5) in [-128, 127], and back: W x = center (W 1) + half / 127.5 (W s). Why not
// fbgemm: its per-call cost grows with the rows (a step of 8 rows cost 2.2x one of 1 on a Zen 4)
// and the per-token quantization around it is a dozen torch ops per layer
// (docs/benchmarks/dynamic-int8-kernel-*). Here the quantization is one pass over the input, and
// each block of 64 output channels is read once per call and used by every row, 4 rows at a time.
// Integer sums are exact, so a row's result never depends on the rows beside it.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "tiles.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;  // output channels per int32 register
constexpr int64_t kBlocks = 4;  // registers of channels a tile computes: 64 channels
constexpr int64_t kRows = 4;    // rows a tile computes
constexpr float kLevels = 127.5f;

struct RowRange {
  float center;
  float half;
};

// One row to unsigned levels (s + 128, s = round((x - center) / half x 127.5) in [-128, 127]).
RowRange quantize_row(const float* x, int64_t n, uint8_t* out) {
  float low = x[0], high = x[0];
  for (int64_t i = 1; i < n; ++i) {
    low = std::min(low, x[i]);
    high = std::max(high, x[i]);
  }
  const float center = (high + low) * 0.5f;
  const float half = std::max((high - low) * 0.5f, 1e-12f);
  const float factor = kLevels / half;
  const __m512 shift = _mm512_set1_ps(center);
  const __m512 scale = _mm512_set1_ps(factor);
  const __m512i lowest = _mm512_set1_epi32(-128);
  const __m512i highest = _mm512_set1_epi32(127);
  const __m512i offset = _mm512_set1_epi32(128);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 unit = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), shift), scale);
    __m512i level = _mm512_cvtps_epi32(unit);  // round to nearest even, as nearbyint
    level = _mm512_min_epi32(_mm512_max_epi32(level, lowest), highest);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(_mm512_add_epi32(level, offset)));
  }
  for (; i < n; ++i) {
    const float level = std::nearbyint((x[i] - center) * factor);
    out[i] = static_cast<uint8_t>(std::min(127.0f, std::max(-128.0f, level)) + 128.0f);
  }
  return {center, half};
}

// One row's outputs from its int32 sums. Not inlined into the tiles: every row, whatever tile it
// is in, takes this one compiled sequence of float operations (-ffast-math may otherwise
// reassociate them differently per tile shape, and a row's bits would depend on its batch).
__attribute__((noinline)) void finish_row(const int32_t* sums, int64_t channels, RowRange range,
                                          const int32_t* col_sums, const float* scales, const float* weight_sums,
                                          float* y) {
  const __m512 half = _mm512_set1_ps(range.half / kLevels);
  const __m512 center = _mm512_set1_ps(range.center);
  for (int64_t c = 0; c < channels; c += kLanes) {
    // The levels carry +128: take 128 x (W 1) back out, exactly, in int32.
    const __m512i shift = _mm512_slli_epi32(_mm512_loadu_si512(col_sums + c), 7);
    const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_loadu_si512(sums + c), shift));
    const __m512 spread = _mm512_mul_ps(_mm512_mul_ps(dot, _mm512_loadu_ps(scales + c)), half);
    _mm512_storeu_ps(y + c, _mm512_fmadd_ps(_mm512_loadu_ps(weight_sums + c), center, spread));
  }
}

// kR rows x kB blocks of 16 channels: int32 sums of level x weight over quads of input channels.
// Packed weights: [N / 16][K / 4][16][4] int8, four input channels of 16 output channels side by
// side, VPDPBUSD's layout (`pack_for_vnni` in linears.py).
template <int kR, int kB>
struct Tile {
  static void run(const int8_t* packed, int64_t quads, const uint8_t* levels, int64_t level_stride,
          const RowRange* ranges, const int32_t* col_sums, const float* scales, const float* weight_sums,
          float* y, int64_t y_stride) {
  __m512i acc[kR][kB];
  for (int r = 0; r < kR; ++r)
    for (int b = 0; b < kB; ++b) acc[r][b] = _mm512_setzero_si512();
  for (int64_t q = 0; q < quads; ++q) {
    __m512i w[kB];
    for (int b = 0; b < kB; ++b)
      w[b] = _mm512_loadu_si512(reinterpret_cast<const void*>(packed + (b * quads + q) * 64));
    for (int r = 0; r < kR; ++r) {
      int32_t quad;
      std::memcpy(&quad, levels + r * level_stride + 4 * q, sizeof(quad));
      const __m512i both = _mm512_set1_epi32(quad);
      for (int b = 0; b < kB; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], both, w[b]);
    }
  }
  alignas(64) int32_t sums[kB * kLanes];
  for (int r = 0; r < kR; ++r) {
    for (int b = 0; b < kB; ++b) _mm512_store_si512(reinterpret_cast<void*>(sums + b * kLanes), acc[r][b]);
    finish_row(sums, kB * kLanes, ranges[r], col_sums, scales, weight_sums, y + r * y_stride);
  }
}
};

at::Tensor int8_dynamic_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& col_sums,
                               const at::Tensor& scales, const at::Tensor& weight_sums) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int8_dynamic_linear: x must be 2-D float32");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kChar && packed.size(2) == kLanes &&
                  packed.size(3) == 4,
              "int8_dynamic_linear: weights must be packed int8 [N/16, K/4, 16, 4]");
  const int64_t rows = x.size(0);
  const int64_t in_features = x.size(1);
  const int64_t quads = packed.size(1);
  const int64_t channel_blocks = packed.size(0);
  const int64_t out_features = channel_blocks * kLanes;
  TORCH_CHECK(in_features == quads * 4, "int8_dynamic_linear: x has ", in_features, " columns, the weights ",
              quads * 4);
  for (const at::Tensor* vector : {&col_sums, &scales, &weight_sums})
    TORCH_CHECK(vector->dim() == 1 && vector->size(0) == out_features, "int8_dynamic_linear: ",
                vector->sizes(), " sums or scales for ", out_features, " channels");
  TORCH_CHECK(col_sums.scalar_type() == at::kInt && scales.scalar_type() == at::kFloat &&
                  weight_sums.scalar_type() == at::kFloat,
              "int8_dynamic_linear: column sums must be int32, scales and weight sums float32");
  at::Tensor xc = x.contiguous();
  at::Tensor pc = packed.contiguous();
  at::Tensor cs = col_sums.contiguous();
  at::Tensor sc = scales.contiguous();
  at::Tensor ws = weight_sums.contiguous();
  at::Tensor y = at::empty({rows, out_features}, x.options());
  if (rows == 0) return y;

  std::vector<uint8_t> levels(static_cast<size_t>(rows * in_features));
  std::vector<RowRange> ranges(static_cast<size_t>(rows));
  const float* x_data = xc.data_ptr<float>();
  for (int64_t row = 0; row < rows; ++row)
    ranges[row] = quantize_row(x_data + row * in_features, in_features, levels.data() + row * in_features);

  const int8_t* w_data = pc.data_ptr<int8_t>();
  float* y_data = y.data_ptr<float>();
  tierserve_tiles::for_each_tile(
      channel_blocks, rows, kBlocks, kRows, [&](int64_t first_block, int64_t blocks, int64_t row, int64_t tile_rows) {
        const int64_t channel = first_block * kLanes;
        tierserve_tiles::tile_for<Tile>(tile_rows, blocks)(
            w_data + first_block * quads * 64, quads, levels.data() + row * in_features, in_features,
            ranges.data() + row, cs.data_ptr<int32_t>() + channel, sc.data_ptr<float>() + channel,
            ws.data_ptr<float>() + channel, y_data + row * out_features + channel, out_features);
      });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tierserve, m) {
  m.def("int8_dynamic_linear(Tensor x, Tensor packed, Tensor col_sums, Tensor scales, Tensor weight_sums) -> Tensor");
  m.impl("int8_dynamic_linear", c10::DispatchKey::CPU, &int8_dynamic_linear);
}

#endif  // __AVX512VNNI__ && __AVX512BW__
