// Weight-only int4 linear for bfloat16 activations: y = x @ w.T with w = (q - 8) * scale + zero,
// q a 4-bit level, one scale and zero per group of input channels and output channel (aten's
// int4 formula). Registered as torch.ops.tierserve.int4_woq_linear where the CPU has
// AVX512_BF16; built with decode_attention.cpp into one library (decode_attention.py).
//
// Why not aten._weight_int4pack_mm_for_cpu: its cost grows with the rows almost as a matmul's
// would, so int4-woq's TPOT at 8 streams was 2.3x one stream's on a Zen 4 and the tier scaled
// least of all (docs/benchmarks/throughput-2026-12-04-epyc-zen4-int8-kernels.md). Here the levels are
// unpacked in registers, 64 at a time in four instructions (no table: OR-ed into the bfloat16
// bits of 128, which makes them exactly 128 + q), and each unpacked register is multiplied with up
// to four rows by VDPBF16PS. Unpacking into a buffer once per call (as woq_int8.cpp widens int8)
// was tried first: a one-row call then paid a write and a read of 2 bytes a weight to save
// nothing, and one stream got slower than on aten's kernel. The scales and zeros are read as
// bfloat16 (they are rounded to it anyway), a group's for a block in one cache line: as float32
// tables they were half as many bytes again as the weights at group size 32, and a one-row call
// was slower than aten's.
//
// Every output is the same sums in the same order, whichever rows and channels share a call: per
// group, pairs of input channels first to last into one float32 accumulator, then added to the
// output as acc * scale + (zero - 136 * scale) * (the row's sum of x over the group). A row's
// result never depends on the batch it is in.

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

constexpr int64_t kLanes = 16;  // output channels per float32 register
// Blocks of 16 channels a tile computes: rows x blocks accumulators of a group in registers, the
// output's in the thread's stack (touched once a group).
constexpr int64_t kBlocks = 4;
constexpr int64_t kRows = 4;  // rows a tile computes

// Packed weights: [N / 16][K / 4][32] bytes. Byte j of a block's quad of input channels 4m..4m+3
// holds word j of two registers: the low nibble is word j of pair 2m (channels 4m and 4m + 1),
// the high nibble word j of pair 2m + 1 (4m + 2 and 4m + 3), where word 2c + i of a pair is output
// channel c's level at that pair's input channel i (VDPBF16PS's layout;
// `pack_int4_for_dot_products` in linears.py). Unpacked by zero-extending the 32 bytes to words
// and OR-ing each nibble into the bfloat16 bits of 128: 0x4300 | q is exactly 128 + q. The kernel
// sums x * (128 + q) and takes 136 x the group's sum of x off through the zeros (see `run`).
constexpr uint16_t kBf16OneTwentyEight = 0x4300;

inline void unpack(const uint8_t* bytes, __m512bh& even, __m512bh& odd) {
  const __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes)));
  const __m512i base = _mm512_set1_epi16(static_cast<int16_t>(kBf16OneTwentyEight));
  // (words & 0x000F) | 0x4300 in one instruction: truth table of (a & b) | c is 0xEA.
  even = reinterpret_cast<__m512bh>(_mm512_ternarylogic_epi32(words, _mm512_set1_epi16(0x000F), base, 0xEA));
  odd = reinterpret_cast<__m512bh>(_mm512_or_si512(_mm512_srli_epi16(words, 4), base));
}

inline __m512 widen_bf16(__m256i values) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(values), 16));
}

struct Int4Call {
  const uint8_t* weights;     // the tile's first block: [blocks][K / 4][32]
  int64_t pairs;              // K / 2
  int64_t group_pairs;        // group size / 2
  const c10::BFloat16* x;     // the tile's first row
  int64_t x_stride;
  const float* group_sums;    // the tile's first row: [rows][groups]
  int64_t groups;
  // The tile's first block's: [blocks][groups][2][16] bfloat16, a group's 16 scales then zeros
  // in one cache line, each block's in the order its weights are read.
  const c10::BFloat16* scales_and_zeros;
  int64_t out_features;
  c10::BFloat16* y;           // the tile's first row and channel
  int64_t y_stride;
};

// kR rows x kB blocks of 16 channels, group by group.
template <int kR, int kB>
struct Int4Tile {
  // No fast-math here: under it the compiler may contract or reorder the epilogue's float
  // operations differently in the 1-row instantiation, and a row's bits would depend on its tile.
  __attribute__((optimize("no-fast-math"))) static void run(const Int4Call& c) {
    alignas(64) float out[kR][kB][kLanes] = {};
    const int64_t quads = c.pairs / 2;
    for (int64_t g = 0; g < c.groups; ++g) {
      __m512 acc[kR][kB];
      for (int r = 0; r < kR; ++r)
        for (int b = 0; b < kB; ++b) acc[r][b] = _mm512_setzero_ps();
      for (int64_t p = g * c.group_pairs; p < (g + 1) * c.group_pairs; p += 2) {
        __m512bh even[kB], odd[kB];
        for (int b = 0; b < kB; ++b) unpack(c.weights + (b * quads + p / 2) * 2 * kLanes, even[b], odd[b]);
        for (int r = 0; r < kR; ++r) {
          int32_t pairs[2];
          std::memcpy(pairs, c.x + r * c.x_stride + 2 * p, sizeof(pairs));
          const __m512bh first = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pairs[0]));
          const __m512bh second = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pairs[1]));
          for (int b = 0; b < kB; ++b) {
            acc[r][b] = _mm512_dpbf16_ps(acc[r][b], first, even[b]);
            acc[r][b] = _mm512_dpbf16_ps(acc[r][b], second, odd[b]);
          }
        }
      }
      for (int b = 0; b < kB; ++b) {
        const __m512i both = _mm512_loadu_si512(c.scales_and_zeros + (b * c.groups + g) * 2 * kLanes);
        const __m512 scale = widen_bf16(_mm512_castsi512_si256(both));
        // The sums are of x * (128 + q): (q - 8) * scale + zero = (128 + q) * scale + (zero - 136 * scale).
        const __m512 zero = _mm512_fnmadd_ps(_mm512_set1_ps(136.0f), scale,
                                             widen_bf16(_mm512_extracti64x4_epi64(both, 1)));
        for (int r = 0; r < kR; ++r) {
          __m512 sum = _mm512_fmadd_ps(acc[r][b], scale, _mm512_load_ps(out[r][b]));
          sum = _mm512_fmadd_ps(zero, _mm512_set1_ps(c.group_sums[r * c.groups + g]), sum);
          _mm512_store_ps(out[r][b], sum);
        }
      }
    }
    for (int r = 0; r < kR; ++r)
      for (int b = 0; b < kB; ++b)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(c.y + r * c.y_stride + b * kLanes),
                            reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(_mm512_load_ps(out[r][b]))));
  }
};

// Each row's sum of x over each group (for the zeros), in one fixed order: pairs into 16 lanes
// by VDPBF16PS against ones, then the lanes' fixed reduction tree.
void group_sums(const c10::BFloat16* x, int64_t rows, int64_t in_features, int64_t group_size, float* sums) {
  const int64_t groups = in_features / group_size;
  const __m512bh ones = reinterpret_cast<__m512bh>(_mm512_set1_epi16(c10::BFloat16(1.0f).x));
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const c10::BFloat16* xr = x + row * in_features;
      for (int64_t g = 0; g < groups; ++g) {
        __m512 lanes = _mm512_setzero_ps();
        for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 32) {
          const int64_t left = std::min<int64_t>(32, (g + 1) * group_size - k);
          const __mmask32 mask = left == 32 ? ~__mmask32(0) : ((__mmask32(1) << left) - 1);
          const __m512i chunk = _mm512_maskz_loadu_epi16(mask, xr + k);
          lanes = _mm512_dpbf16_ps(lanes, reinterpret_cast<__m512bh>(chunk), ones);
        }
        sums[row * groups + g] = _mm512_reduce_add_ps(lanes);
      }
    }
  });
}

at::Tensor int4_woq_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_and_zeros,
                           int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int4_woq_linear: x must be 2-D bfloat16");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.size(2) == 2 * kLanes,
              "int4_woq_linear: weights must be packed uint8 [N/16, K/4, 32]");
  const int64_t rows = x.size(0);
  const int64_t in_features = x.size(1);
  const int64_t pairs = packed.size(1) * 2;
  const int64_t channel_blocks = packed.size(0);
  const int64_t out_features = channel_blocks * kLanes;
  TORCH_CHECK(in_features == pairs * 2, "int4_woq_linear: x has ", in_features, " columns, the weights ",
              pairs * 2);
  TORCH_CHECK(group_size > 0 && group_size % 4 == 0 && in_features % group_size == 0,
              "int4_woq_linear: group size ", group_size, " must be a multiple of 4 and divide ", in_features);
  const int64_t groups = in_features / group_size;
  TORCH_CHECK(scales_and_zeros.dim() == 4 && scales_and_zeros.size(0) == channel_blocks &&
                  scales_and_zeros.size(1) == groups && scales_and_zeros.size(2) == 2 &&
                  scales_and_zeros.size(3) == kLanes && scales_and_zeros.scalar_type() == at::kBFloat16,
              "int4_woq_linear: scales and zeros must be bfloat16 [", channel_blocks, ", ", groups, ", 2, ",
              kLanes, "], got ", scales_and_zeros.sizes(), " ", scales_and_zeros.scalar_type());
  at::Tensor xc = x.contiguous();
  at::Tensor pc = packed.contiguous();
  at::Tensor szc = scales_and_zeros.contiguous();
  at::Tensor y = at::empty({rows, out_features}, x.options());
  if (rows == 0) return y;
  const c10::BFloat16* x_data = xc.data_ptr<c10::BFloat16>();
  const uint8_t* w_data = pc.data_ptr<uint8_t>();
  c10::BFloat16* y_data = y.data_ptr<c10::BFloat16>();
  std::vector<float> sums(static_cast<size_t>(rows * groups));
  group_sums(x_data, rows, in_features, group_size, sums.data());
  tierserve_tiles::for_each_tile(
      channel_blocks, rows, kBlocks, kRows, [&](int64_t first_block, int64_t blocks, int64_t row, int64_t tile_rows) {
        const Int4Call call{w_data + first_block * (pairs / 2) * 2 * kLanes,
                            pairs,
                            group_size / 2,
                            x_data + row * in_features,
                            in_features,
                            sums.data() + row * groups,
                            groups,
                            szc.data_ptr<c10::BFloat16>() + first_block * groups * 2 * kLanes,
                            out_features,
                            y_data + row * out_features + first_block * kLanes,
                            out_features};
        tierserve_tiles::tile_for<Int4Tile>(tile_rows, blocks)(call);
      });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tierserve, m) {
  m.def("int4_woq_linear(Tensor x, Tensor packed, Tensor scales_and_zeros, int group_size) -> Tensor");
  m.impl("int4_woq_linear", c10::DispatchKey::CPU, &int4_woq_linear);
}

#endif  // __AVX512BF16__
