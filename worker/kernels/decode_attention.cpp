// Decode attention over a paged KV cache: one new token per row, each row over its own length.
//
// Built at first use by worker/kernels/decode_attention.py (torch.utils.cpp_extension, -march of
// the machine it runs on) and registered as torch.ops.tierserve.decode_attention.
//
// Why not IPEX's single_query_cached_kv_attention: it computes each query head on its own, so
// under grouped-query attention every key is read and converted once per query head, and it
// takes one dot product per position and head (docs/benchmarks/attention-kernels-*). Here one
// task is one row's one key/value head: each key and value row is loaded and widened to float
// once and used by every query head of the group, scores are kept per task and exponentiated in
// vectorised loops. Accumulation is in float32, as IPEX's kernel accumulates.

#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// A cache or query row widened to float: bf16 is the high half of a float's bits.
inline const float* widened(const float* row, int64_t, float*) { return row; }

inline const float* widened(const c10::BFloat16* row, int64_t n, float* buffer) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
  uint32_t* out = reinterpret_cast<uint32_t*>(buffer);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(bits[i]) << 16;
  return buffer;
}

inline void narrowed(const float* row, int64_t n, float* out) { std::memcpy(out, row, n * sizeof(float)); }

inline void narrowed(const float* row, int64_t n, c10::BFloat16* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = c10::BFloat16(row[i]);  // round to nearest even
}

// Scores turned into softmax numerators in place (less their largest, for range); their sum.
inline float exponentiated(float* scores, int64_t length) {
  float top = scores[0];
  for (int64_t p = 1; p < length; ++p) top = std::max(top, scores[p]);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t p = 0; p < length; ++p) {
    scores[p] = std::exp(scores[p] - top);
    sum += scores[p];
  }
  return sum;
}

// One row's one key/value head: `groups` query heads over `length` cached positions.
// kDim > 0 fixes head_dim at compile time (so the inner loops unroll); 0 reads `dim`.
template <typename T, int64_t kDim>
void attend_one(const T* query,            // [groups, dim], this row's heads of this kv head
                T* out,                    // [groups, dim]
                const T* keys,             // [blocks, kv_heads, block, dim]
                const T* values,
                const int32_t* table,      // this row's blocks
                int64_t length, int64_t kv_head, int64_t kv_heads, int64_t block, int64_t groups,
                int64_t dim_arg, float scale) {
  const int64_t dim = kDim > 0 ? kDim : dim_arg;
  std::vector<float> q(groups * dim), row(dim), scores(groups * length), acc(groups * dim, 0.0f);
  for (int64_t g = 0; g < groups; ++g) {
    const float* qg = widened(query + g * dim, dim, row.data());
    for (int64_t d = 0; d < dim; ++d) q[g * dim + d] = qg[d] * scale;
  }
  // A block's positions of one kv head are `block x dim` contiguous elements.
  const int64_t block_stride = kv_heads * block * dim, head_offset = kv_head * block * dim;
  for (int64_t first = 0, j = 0; first < length; first += block, ++j) {
    const T* base = keys + table[j] * block_stride + head_offset;
    const int64_t count = std::min(block, length - first);
    for (int64_t i = 0; i < count; ++i) {
      const float* k = widened(base + i * dim, dim, row.data());
      for (int64_t g = 0; g < groups; ++g) {
        const float* qg = q.data() + g * dim;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < dim; ++d) dot += qg[d] * k[d];
        scores[g * length + first + i] = dot;
      }
    }
  }
  std::vector<float> total(groups);
  for (int64_t g = 0; g < groups; ++g) total[g] = exponentiated(scores.data() + g * length, length);
  for (int64_t first = 0, j = 0; first < length; first += block, ++j) {
    const T* base = values + table[j] * block_stride + head_offset;
    const int64_t count = std::min(block, length - first);
    for (int64_t i = 0; i < count; ++i) {
      const float* v = widened(base + i * dim, dim, row.data());
      for (int64_t g = 0; g < groups; ++g) {
        const float w = scores[g * length + first + i];
        float* a = acc.data() + g * dim;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) a[d] += w * v[d];
      }
    }
  }
  for (int64_t g = 0; g < groups; ++g) {
    float* a = acc.data() + g * dim;
    const float inverse = 1.0f / total[g];
    for (int64_t d = 0; d < dim; ++d) a[d] *= inverse;
    narrowed(a, dim, out + g * dim);
  }
}

#if defined(__AVX512F__)
// The same computation with AVX-512 registers, for blocks of 16 positions, head_dim = 16 x kV and
// kG query heads per key/value head: the group's queries and accumulators stay in registers,
// each key is widened once for all of them, and 16 positions' dot products are summed across
// their lanes together (`lane_sums`) rather than one at a time.

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// Lane i of the result is the sum of v[i]'s 16 lanes.
inline __m512 lane_sums(const __m512* v) {
  __m512 w[8], x[4];
  for (int j = 0; j < 8; ++j) {  // 128-bit quarters: v[2j]'s in w[j]'s low half, v[2j+1]'s high
    const __m512 a = v[2 * j], b = v[2 * j + 1];
    w[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int j = 0; j < 4; ++j) {  // quarter c of x[j]: 4 partial sums of v[4j + c]
    const __m512 a = w[2 * j], b = w[2 * j + 1];
    x[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  }
  const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
  const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(s01, s23, _MM_SHUFFLE(3, 2, 3, 2)));
  // r's lane 4c + j holds v[4j + c]'s sum.
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}

template <typename T>
inline void prefetch_block(const T* first_row, int64_t elements) {
  const char* bytes = reinterpret_cast<const char*>(first_row);
  for (int64_t offset = 0; offset < elements * static_cast<int64_t>(sizeof(T)); offset += 64) {
    _mm_prefetch(bytes + offset, _MM_HINT_T0);
  }
}

constexpr int64_t kVectorBlock = 16;

template <typename T, int kV, int kG>
void attend_one_avx512(const T* query, T* out, const T* keys, const T* values, const int32_t* table,
                       int64_t length, int64_t kv_head, int64_t kv_heads, float scale) {
  constexpr int64_t dim = 16 * kV;
  const int64_t block_stride = kv_heads * kVectorBlock * dim, head_offset = kv_head * kVectorBlock * dim;
  const int64_t blocks = (length + kVectorBlock - 1) / kVectorBlock, padded = blocks * kVectorBlock;
  thread_local std::vector<float> buffer;
  buffer.resize(kG * padded);
  float* scores = buffer.data();
  __m512 q[kG][kV];
  const __m512 scale_v = _mm512_set1_ps(scale);
  for (int g = 0; g < kG; ++g)
    for (int v = 0; v < kV; ++v) q[g][v] = _mm512_mul_ps(load16(query + g * dim + v * 16), scale_v);

  __m512 dots[kG][kVectorBlock];
  for (int64_t j = 0; j < blocks; ++j) {
    const T* base = keys + table[j] * block_stride + head_offset;
    if (j + 1 < blocks) prefetch_block(keys + table[j + 1] * block_stride + head_offset, kVectorBlock * dim);
    const int64_t count = std::min(kVectorBlock, length - j * kVectorBlock);
    for (int64_t i = 0; i < count; ++i) {
      __m512 k[kV];
      for (int v = 0; v < kV; ++v) k[v] = load16(base + i * dim + v * 16);
      for (int g = 0; g < kG; ++g) {
        __m512 acc = _mm512_mul_ps(q[g][0], k[0]);
        for (int v = 1; v < kV; ++v) acc = _mm512_fmadd_ps(q[g][v], k[v], acc);
        dots[g][i] = acc;
      }
    }
    for (int64_t i = count; i < kVectorBlock; ++i)
      for (int g = 0; g < kG; ++g) dots[g][i] = _mm512_setzero_ps();
    for (int g = 0; g < kG; ++g) _mm512_storeu_ps(scores + g * padded + j * kVectorBlock, lane_sums(dots[g]));
  }

  float total[kG];
  for (int g = 0; g < kG; ++g) total[g] = exponentiated(scores + g * padded, length);

  __m512 acc[kG][kV];
  for (int g = 0; g < kG; ++g)
    for (int v = 0; v < kV; ++v) acc[g][v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < blocks; ++j) {
    const T* base = values + table[j] * block_stride + head_offset;
    if (j + 1 < blocks) prefetch_block(values + table[j + 1] * block_stride + head_offset, kVectorBlock * dim);
    const int64_t first = j * kVectorBlock, count = std::min(kVectorBlock, length - first);
    for (int64_t i = 0; i < count; ++i) {
      __m512 vv[kV];
      for (int v = 0; v < kV; ++v) vv[v] = load16(base + i * dim + v * 16);
      for (int g = 0; g < kG; ++g) {
        const __m512 weight = _mm512_set1_ps(scores[g * padded + first + i]);
        for (int v = 0; v < kV; ++v) acc[g][v] = _mm512_fmadd_ps(weight, vv[v], acc[g][v]);
      }
    }
  }
  for (int g = 0; g < kG; ++g) {
    alignas(64) float row[dim];
    const __m512 inverse = _mm512_set1_ps(1.0f / total[g]);
    for (int v = 0; v < kV; ++v) _mm512_store_ps(row + v * 16, _mm512_mul_ps(acc[g][v], inverse));
    narrowed(row, dim, out + g * dim);
  }
}

// The AVX-512 path for this shape, or nullptr (then the general one).
template <typename T>
using AttendOne = void (*)(const T*, T*, const T*, const T*, const int32_t*, int64_t, int64_t, int64_t, float);

template <typename T, int kV>
AttendOne<T> avx512_for_groups(int64_t groups) {
  switch (groups) {
    case 1: return &attend_one_avx512<T, kV, 1>;
    case 2: return &attend_one_avx512<T, kV, 2>;
    case 3: return &attend_one_avx512<T, kV, 3>;
    case 4: return &attend_one_avx512<T, kV, 4>;
    case 5: return &attend_one_avx512<T, kV, 5>;
    case 6: return &attend_one_avx512<T, kV, 6>;
    case 7: return &attend_one_avx512<T, kV, 7>;
    case 8: return &attend_one_avx512<T, kV, 8>;
    default: return nullptr;
  }
}

template <typename T>
AttendOne<T> avx512_path(int64_t dim, int64_t groups, int64_t block) {
  if (block != kVectorBlock) return nullptr;
  switch (dim) {
    case 32: return avx512_for_groups<T, 2>(groups);
    case 64: return avx512_for_groups<T, 4>(groups);
    case 128: return avx512_for_groups<T, 8>(groups);
    default: return nullptr;
  }
}
#endif

template <typename T, int64_t kDim>
void attend_all(const at::Tensor& out, const at::Tensor& query, const at::Tensor& keys,
                const at::Tensor& values, const at::Tensor& tables, const at::Tensor& lengths,
                double scale) {
  const int64_t rows = query.size(0), heads = query.size(1), dim = query.size(2);
  const int64_t kv_heads = keys.size(1), block = keys.size(2);
  const int64_t groups = heads / kv_heads, table_stride = tables.size(1);
  const T* q = query.const_data_ptr<T>();
  T* o = out.mutable_data_ptr<T>();
  const T* k = keys.const_data_ptr<T>();
  const T* v = values.const_data_ptr<T>();
  const int32_t* t = tables.const_data_ptr<int32_t>();
  const int32_t* n = lengths.const_data_ptr<int32_t>();
#if defined(__AVX512F__)
  const AttendOne<T> fast = avx512_path<T>(dim, groups, block);
#endif
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, h = task % kv_heads;
      const int64_t offset = (r * heads + h * groups) * dim;
#if defined(__AVX512F__)
      if (fast != nullptr) {
        fast(q + offset, o + offset, k, v, t + r * table_stride, n[r], h, kv_heads, static_cast<float>(scale));
        continue;
      }
#endif
      attend_one<T, kDim>(q + offset, o + offset, k, v, t + r * table_stride, n[r], h, kv_heads, block,
                          groups, dim, static_cast<float>(scale));
    }
  });
}

template <typename T>
void attend_typed(const at::Tensor& out, const at::Tensor& query, const at::Tensor& keys,
                  const at::Tensor& values, const at::Tensor& tables, const at::Tensor& lengths,
                  double scale) {
  switch (query.size(2)) {
    case 64: return attend_all<T, 64>(out, query, keys, values, tables, lengths, scale);
    case 128: return attend_all<T, 128>(out, query, keys, values, tables, lengths, scale);
    default: return attend_all<T, 0>(out, query, keys, values, tables, lengths, scale);
  }
}

// out [rows, heads, dim] = attention of query [rows, heads, dim] over each row's first
// lengths[row] positions of the paged cache keys/values [blocks, kv_heads, block, dim], whose
// blocks are tables[row]. heads is a multiple of kv_heads (query heads share kv heads in order).
void decode_attention(at::Tensor out, const at::Tensor& query, const at::Tensor& keys,
                      const at::Tensor& values, const at::Tensor& tables, const at::Tensor& lengths,
                      double scale) {
  TORCH_CHECK(query.dim() == 3 && out.sizes() == query.sizes(), "query and out must be [rows, heads, dim]");
  TORCH_CHECK(keys.dim() == 4 && keys.sizes() == values.sizes(), "keys and values must be [blocks, kv_heads, block, dim]");
  TORCH_CHECK(keys.size(3) == query.size(2), "head_dim differs between query and cache");
  TORCH_CHECK(query.size(1) % keys.size(1) == 0, "heads must be a multiple of kv_heads");
  TORCH_CHECK(tables.scalar_type() == at::kInt && lengths.scalar_type() == at::kInt, "tables and lengths must be int32");
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == query.size(0) && lengths.numel() == query.size(0),
              "one block table and one length per row");
  TORCH_CHECK(query.scalar_type() == keys.scalar_type() && out.scalar_type() == keys.scalar_type() &&
                  values.scalar_type() == keys.scalar_type(),
              "query, out and cache must share a dtype");
  for (const at::Tensor* tensor : std::initializer_list<const at::Tensor*>{&out, &query, &keys, &values, &tables, &lengths}) {
    TORCH_CHECK(tensor->is_contiguous(), "every tensor must be contiguous");
  }
  // A bad table would read outside the cache: checked here, a few hundred integers per step.
  const int32_t* n = lengths.const_data_ptr<int32_t>();
  const int32_t* t = tables.const_data_ptr<int32_t>();
  const int64_t block = keys.size(2), width = tables.size(1);
  for (int64_t r = 0; r < lengths.numel(); ++r) {
    TORCH_CHECK(n[r] > 0 && n[r] <= width * block, "a row's length is outside its block table");
    for (int64_t b = 0; b < (n[r] + block - 1) / block; ++b) {
      TORCH_CHECK(t[r * width + b] >= 0 && t[r * width + b] < keys.size(0), "a block table names no block of the cache");
    }
  }
  if (keys.scalar_type() == at::kFloat) {
    attend_typed<float>(out, query, keys, values, tables, lengths, scale);
  } else if (keys.scalar_type() == at::kBFloat16) {
    attend_typed<c10::BFloat16>(out, query, keys, values, tables, lengths, scale);
  } else {
    TORCH_CHECK(false, "decode_attention takes float32 or bfloat16, not ", keys.scalar_type());
  }
}

// Copies rows [tokens, kv_heads, dim] of `cache`'s dtype into the paged cache at `slots`
// (block x block_size + offset): what IPEX's reshape_and_cache does.
void store_in_slots(const at::Tensor& rows, at::Tensor& cache, const at::Tensor& slots) {
  const int64_t tokens = rows.size(0), kv_heads = rows.size(1), dim = rows.size(2);
  const int64_t block = cache.size(2), capacity = cache.size(0) * block;
  const int64_t bytes = dim * static_cast<int64_t>(rows.element_size());
  const char* source = static_cast<const char*>(rows.const_data_ptr());
  char* target = static_cast<char*>(cache.mutable_data_ptr());
  const int32_t* slot = slots.const_data_ptr<int32_t>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slot[t] >= 0 && slot[t] < capacity, "a slot lies outside the cache");
    const int64_t b = slot[t] / block, offset = slot[t] % block;
    for (int64_t h = 0; h < kv_heads; ++h) {
      std::memcpy(target + (((b * kv_heads + h) * block + offset) * dim) * rows.element_size(),
                  source + (t * kv_heads + h) * bytes, bytes);
    }
  }
}

// A decode step's whole attention op in one call, so the graph's attention costs one dispatch
// from Python a layer instead of a dozen: each row's new key and value stored at `slots`, then
// its query over its own length. query [rows, 1, heads, dim], key and value [rows, 1, kv_heads,
// dim] in the graph's dtype; returns [rows, heads, 1, dim] laid out as [rows, 1, heads, dim], in
// that dtype, as IPEX's attention op does. Computes in the cache's dtype, as the unfused path.
at::Tensor paged_decode(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                        at::Tensor key_cache, at::Tensor value_cache, const at::Tensor& slots,
                        const at::Tensor& tables, const at::Tensor& lengths, double scale) {
  TORCH_CHECK(query.dim() == 4 && query.size(1) == 1, "query must be [rows, 1, heads, dim]");
  TORCH_CHECK(key.dim() == 4 && key.sizes() == value.sizes() && key.size(0) == query.size(0) && key.size(1) == 1,
              "key and value must be [rows, 1, kv_heads, dim]");
  TORCH_CHECK(slots.scalar_type() == at::kInt && slots.is_contiguous() && slots.numel() == query.size(0),
              "one int32 slot per row");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "the caches must be contiguous");
  const int64_t rows = query.size(0), heads = query.size(2), dim = query.size(3), kv_heads = key.size(2);
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.size(1) == kv_heads && key_cache.size(3) == dim,
              "the cache's kv_heads or head_dim differ from the new keys'");
  const auto dtype = key_cache.scalar_type();
  store_in_slots(key.reshape({rows, kv_heads, dim}).to(dtype).contiguous(), key_cache, slots);
  store_in_slots(value.reshape({rows, kv_heads, dim}).to(dtype).contiguous(), value_cache, slots);
  const at::Tensor q = query.reshape({rows, heads, dim}).to(dtype).contiguous();
  at::Tensor out = at::empty({rows, 1, heads, dim}, q.options());
  decode_attention(out.view({rows, heads, dim}), q, key_cache, value_cache, tables, lengths, scale);
  return out.to(query.scalar_type()).transpose(1, 2);
}

}  // namespace

TORCH_LIBRARY(tierserve, m) {
  m.def("decode_attention(Tensor(a!) out, Tensor query, Tensor keys, Tensor values, Tensor tables, Tensor lengths, float scale) -> ()");
  m.impl("decode_attention", c10::DispatchKey::CPU, &decode_attention);
  m.def("paged_decode(Tensor query, Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slots, Tensor tables, Tensor lengths, float scale) -> Tensor");
  m.impl("paged_decode", c10::DispatchKey::CPU, &paged_decode);
}
