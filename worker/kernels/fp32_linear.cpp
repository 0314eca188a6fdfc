// float32 linear whose rows do not depend on each other: y = x @ w.T, all float32. Registered as
// torch.ops.tierserve.fp32_linear where the CPU has AVX-512F; built with decode_attention.cpp into
// one library (worker/kernels/decode_attention.py).
//
// Why not IPEX's (oneDNN's) float32 linears: a decode step reads every weight once, and on a
// Zen 4 core oneDNN's kernels for a handful of rows read the fp32 weights at about half the
// memory bandwidth, and PyTorch's own lm_head product (aten::mm on the tied embedding) took 2-3x
// longer for 2 or 3 rows than for 4 (docs/benchmarks/fp32-kernel-*). Here, as in bf16_linear.cpp,
// 16 output channels share a register, four blocks of them a tile, and each weight register
// loaded serves up to six rows; every output is the same sum in the same order (input channels
// first to last, one fused multiply-add each, in one accumulator) whichever rows share the call,
// so a greedy text made in a batch equals the text made alone.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "tiles.h"

#if defined(__AVX512F__)
#include <immintrin.h>

#include <cstdint>

namespace {

constexpr int64_t kLanes = 16;  // output channels per float32 register
constexpr int64_t kBlocks = 4;  // registers of channels a tile computes: 64 channels
// rows a tile computes: kRows x kBlocks accumulators, 24 of the 32 registers (6 x 4 beat 4 x 4 and
// 8 x 2 at 6-16 rows and matched them below: docs/benchmarks/fp32-kernel-*)
constexpr int64_t kRows = 6;

// Packed weights: [N / 16][K][16] float32, each input channel's weights of 16 output channels side
// by side (`pack_for_fp32_lanes` in linears.py): one input channel of a block is one register.
template <int kR, int kB>
struct Tile {
  static void run(const float* w, int64_t in_features, const float* x, int64_t x_stride,
                  const float* /*unused*/, float* y, int64_t y_stride) {
    __m512 acc[kR][kB];
    for (int r = 0; r < kR; ++r)
      for (int b = 0; b < kB; ++b) acc[r][b] = _mm512_setzero_ps();
    const int64_t block_stride = in_features * kLanes;
    for (int64_t k = 0; k < in_features; ++k) {
      __m512 weights[kB];
      for (int b = 0; b < kB; ++b) weights[b] = _mm512_loadu_ps(w + b * block_stride + k * kLanes);
      for (int r = 0; r < kR; ++r) {
        const __m512 input = _mm512_set1_ps(x[r * x_stride + k]);
        for (int b = 0; b < kB; ++b) acc[r][b] = _mm512_fmadd_ps(input, weights[b], acc[r][b]);
      }
    }
    for (int r = 0; r < kR; ++r)
      for (int b = 0; b < kB; ++b) _mm512_storeu_ps(y + r * y_stride + b * kLanes, acc[r][b]);
  }
};

at::Tensor fp32_linear(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "fp32_linear: x must be 2-D float32");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kFloat && packed.size(2) == kLanes,
              "fp32_linear: weights must be packed float32 [N/16, K, 16]");
  const int64_t rows = x.size(0);
  const int64_t in_features = x.size(1);
  const int64_t channel_blocks = packed.size(0);
  const int64_t out_features = channel_blocks * kLanes;
  TORCH_CHECK(in_features == packed.size(1), "fp32_linear: x has ", in_features, " columns, the weights ",
              packed.size(1));
  at::Tensor xc = x.contiguous();
  at::Tensor pc = packed.contiguous();
  at::Tensor y = at::empty({rows, out_features}, x.options());
  if (rows == 0) return y;
  const float* x_data = xc.data_ptr<float>();
  const float* w_data = pc.data_ptr<float>();
  float* y_data = y.data_ptr<float>();
  tierserve_tiles::for_each_tile(
      channel_blocks, rows, kBlocks, kRows, [&](int64_t first_block, int64_t blocks, int64_t row, int64_t tile_rows) {
        const int64_t channel = first_block * kLanes;
        tierserve_tiles::tile_for<Tile, kRows>(tile_rows, blocks)(w_data + first_block * in_features * kLanes,
                                                           in_features, x_data + row * in_features, in_features,
                                                           nullptr, y_data + row * out_features + channel,
                                                           out_features);
      });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tierserve, m) {
  m.def("fp32_linear(Tensor x, Tensor packed) -> Tensor");
  m.impl("fp32_linear", c10::DispatchKey::CPU, &fp32_linear);
}

#endif  // __AVX512F__
