// Weight-only int8 linear for bfloat16 activations: y = x @ (w * scale).T, w int8 per output
// channel. Registered as torch.ops.tierserve.int8_woq_linear where the CPU has AVX512_BF16;
// built with decode_attention.cpp into one library (worker/kernels/decode_attention.py).
//
// Why not aten._weight_int8pack_mm: it takes the rows four at a time and widens every weight
// again for each four, so a step of 8 rows costs 3.5x one of 1 and a 256-token prompt chunk
// 3.4x the bfloat16 matmul (docs/benchmarks/woq-int8-kernel-*). Here each block of 64 output
// channels is widened to bfloat16 once per call (int8 is exact in bfloat16) into a buffer of the
// thread's, and every row of the call is multiplied with it by VDPBF16PS, 16 channels a
// register. The weights are read from memory once, whatever the number of rows.
//
// Every output is the same sum in the same order (pairs of input channels, first to last, in
// one float32 accumulator), whichever rows and channels share a call: a row's result never
// depends on the batch it is in.

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "tiles.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kLanes = 16;   // output channels per float32 register
constexpr int64_t kBlocks = 4;   // registers of channels a tile computes: 64 channels
constexpr int64_t kRows = 4;     // rows a tile computes: kRows x kBlocks accumulators

// Packed weights: [N / 16][K / 2][16][2] int8, the pairs of input channels of 16 output
// channels side by side, which is VDPBF16PS's layout (see `pack` in linears.py). One pair-row
// of a block is 32 int8 = one register of bfloat16 once widened.
void widen(const int8_t* packed, int64_t pairs, int64_t blocks, __m512i* out) {
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* block = packed + b * pairs * 32;
    for (int64_t p = 0; p < pairs; ++p) {
      __m128i low = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + p * 32));
      __m128i high = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + p * 32 + 16));
      __m512 low_f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(low));
      __m512 high_f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(high));
      out[p * kBlocks + b] = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high_f, low_f));
    }
  }
}

// kR rows x kB blocks of 16 channels over the widened weights, scaled and rounded to bf16.
template <int kR, int kB>
struct Tile {
  static void run(const __m512i* widened, int64_t pairs, const c10::BFloat16* x, int64_t x_stride,
          const float* scales, c10::BFloat16* y, int64_t y_stride) {
  __m512 acc[kR][kB];
  for (int r = 0; r < kR; ++r)
    for (int b = 0; b < kB; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh w[kB];
    for (int b = 0; b < kB; ++b) w[b] = reinterpret_cast<__m512bh>(widened[p * kBlocks + b]);
    for (int r = 0; r < kR; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * x_stride + 2 * p, sizeof(pair));
      __m512bh both = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
      for (int b = 0; b < kB; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], both, w[b]);
    }
  }
  for (int b = 0; b < kB; ++b) {
    __m512 scale = _mm512_loadu_ps(scales + b * kLanes);
    for (int r = 0; r < kR; ++r) {
      __m256bh out = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][b], scale));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * y_stride + b * kLanes),
                          reinterpret_cast<__m256i>(out));
    }
  }
}
};

at::Tensor int8_woq_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int8_woq_linear: x must be 2-D bfloat16");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kChar && packed.size(2) == kLanes &&
                  packed.size(3) == 2,
              "int8_woq_linear: weights must be packed int8 [N/16, K/2, 16, 2]");
  TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == at::kFloat, "int8_woq_linear: scales must be float32");
  const int64_t rows = x.size(0);
  const int64_t in_features = x.size(1);
  const int64_t pairs = packed.size(1);
  const int64_t channel_blocks = packed.size(0);
  const int64_t out_features = channel_blocks * kLanes;
  TORCH_CHECK(in_features == pairs * 2, "int8_woq_linear: x has ", in_features, " columns, the weights ",
              pairs * 2);
  TORCH_CHECK(scales.size(0) == out_features, "int8_woq_linear: ", scales.size(0), " scales for ",
              out_features, " channels");
  at::Tensor xc = x.contiguous();
  at::Tensor pc = packed.contiguous();
  at::Tensor sc = scales.contiguous();
  at::Tensor y = at::empty({rows, out_features}, x.options());
  if (rows == 0) return y;
  const c10::BFloat16* x_data = xc.data_ptr<c10::BFloat16>();
  const int8_t* w_data = pc.data_ptr<int8_t>();
  const float* s_data = sc.data_ptr<float>();
  c10::BFloat16* y_data = y.data_ptr<c10::BFloat16>();
  // A thread's widened chunk, reused from chunk to chunk.
  thread_local std::vector<__m512i> widened;
  tierserve_tiles::for_each_tile(
      channel_blocks, rows, kBlocks, kRows,
      [&](int64_t first_block, int64_t blocks) {
        widened.resize(static_cast<size_t>(pairs * kBlocks));
        widen(w_data + first_block * pairs * 32, pairs, blocks, widened.data());
      },
      [&](int64_t first_block, int64_t blocks, int64_t row, int64_t tile_rows) {
        const int64_t channel = first_block * kLanes;
        tierserve_tiles::tile_for<Tile>(tile_rows, blocks)(widened.data(), pairs, x_data + row * in_features,
                                                           in_features, s_data + channel,
                                                           y_data + row * out_features + channel, out_features);
      });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tierserve, m) {
  m.def("int8_woq_linear(Tensor x, Tensor packed, Tensor scales) -> Tensor");
  m.impl("int8_woq_linear", c10::DispatchKey::CPU, &int8_woq_linear);
}

#endif  // __AVX512BF16__
