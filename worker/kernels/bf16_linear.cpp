// bfloat16 linear whose rows do not depend on each other: y = x @ w.T, x and w bfloat16, y
// bfloat16. Registered as torch.ops.tierserve.bf16_linear where the CPU has AVX512_BF16; built
// with decode_attention.cpp into one library (worker/kernels/decode_attention.py).
//
// Why not IPEX's bfloat16 linears: they pick their blocking by the number of rows, so a row's
// float32 sums run in another order in a batch of 8 than alone, and greedy text made in a batch
// parts from the text made alone at near-ties (tests/integration/test_batching.py). Here every
// output is the same sum in the same order (pairs of input channels, first to last, in one
// float32 accumulator, rounded to bfloat16 once), whichever rows share the call. As in
// woq_int8.cpp, 16 output channels share a register, four blocks of them a tile, and each
// weight register loaded serves up to six rows.

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "tiles.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kLanes = 16;  // output channels per float32 register
constexpr int64_t kBlocks = 4;  // registers of channels a tile computes: 64 channels
// rows a tile computes: kRows x kBlocks accumulators, 24 of the 32 registers (6 rows: the bf16
// tier's 8-row step 9% shorter than with 4 on a Zen 4, 1 row the same; docs/benchmarks/bf16-tile-*)
constexpr int64_t kRows = 6;

// Packed weights: [N / 16][K / 2][16][2] bfloat16, the pairs of input channels of 16 output
// channels side by side, VDPBF16PS's layout (`pack_for_dot_products` in linears.py): one pair-row
// of a block is one register.
template <int kR, int kB>
struct Tile {
  static void run(const c10::BFloat16* w, int64_t pairs, const c10::BFloat16* x, int64_t x_stride,
                  const float* /*unused*/, c10::BFloat16* y, int64_t y_stride) {
    __m512 acc[kR][kB];
    for (int r = 0; r < kR; ++r)
      for (int b = 0; b < kB; ++b) acc[r][b] = _mm512_setzero_ps();
    const int64_t block_stride = pairs * 32;
    for (int64_t p = 0; p < pairs; ++p) {
      __m512bh weights[kB];
      for (int b = 0; b < kB; ++b)
        weights[b] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + b * block_stride + p * 32));
      for (int r = 0; r < kR; ++r) {
        int32_t pair;
        std::memcpy(&pair, x + r * x_stride + 2 * p, sizeof(pair));
        __m512bh both = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
        for (int b = 0; b < kB; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], both, weights[b]);
      }
    }
    for (int b = 0; b < kB; ++b)
      for (int r = 0; r < kR; ++r) {
        __m256bh out = _mm512_cvtneps_pbh(acc[r][b]);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * y_stride + b * kLanes),
                            reinterpret_cast<__m256i>(out));
      }
  }
};

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "bf16_linear: x must be 2-D bfloat16");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kBFloat16 && packed.size(2) == kLanes &&
                  packed.size(3) == 2,
              "bf16_linear: weights must be packed bfloat16 [N/16, K/2, 16, 2]");
  const int64_t rows = x.size(0);
  const int64_t in_features = x.size(1);
  const int64_t pairs = packed.size(1);
  const int64_t channel_blocks = packed.size(0);
  const int64_t out_features = channel_blocks * kLanes;
  TORCH_CHECK(in_features == pairs * 2, "bf16_linear: x has ", in_features, " columns, the weights ",
              pairs * 2);
  at::Tensor xc = x.contiguous();
  at::Tensor pc = packed.contiguous();
  at::Tensor y = at::empty({rows, out_features}, x.options());
  if (rows == 0) return y;
  const c10::BFloat16* x_data = xc.data_ptr<c10::BFloat16>();
  const c10::BFloat16* w_data = pc.data_ptr<c10::BFloat16>();
  c10::BFloat16* y_data = y.data_ptr<c10::BFloat16>();
  tierserve_tiles::for_each_tile(
      channel_blocks, rows, kBlocks, kRows, [&](int64_t first_block, int64_t blocks, int64_t row, int64_t tile_rows) {
        const int64_t channel = first_block * kLanes;
        tierserve_tiles::tile_for<Tile, kRows>(tile_rows, blocks)(w_data + first_block * pairs * 32, pairs,
                                                           x_data + row * in_features, in_features, nullptr,
                                                           y_data + row * out_features + channel, out_features);
      });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tierserve, m) {
  m.def("bf16_linear(Tensor x, Tensor packed) -> Tensor");
  m.impl("bf16_linear", c10::DispatchKey::CPU, &bf16_linear);
}

#endif  // __AVX512BF16__
