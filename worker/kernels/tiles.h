// What the linear kernels (woq_int8.cpp, woq_int4.cpp, dynamic_int8.cpp, bf16_linear.cpp) share:
// the walk over a call's tiles, and the dispatch to Tile<kR, kB>::run for 1-kMaxRows rows and 1-4
// blocks of 16 channels. The shapes are template arguments so that each instantiation keeps its
// accumulators in registers.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace tierserve_tiles {

template <template <int, int> class Tile, int kR>
auto for_blocks(int64_t blocks) -> decltype(&Tile<kR, 1>::run) {
  switch (blocks) {
    case 1: return &Tile<kR, 1>::run;
    case 2: return &Tile<kR, 2>::run;
    case 3: return &Tile<kR, 3>::run;
    default: return &Tile<kR, 4>::run;
  }
}

// Rows beyond kMaxRows take the kMaxRows tile (the caller walks rows kMaxRows at a time).
template <template <int, int> class Tile, int kMaxRows = 4>
auto tile_for(int64_t rows, int64_t blocks) -> decltype(&Tile<1, 1>::run) {
  if constexpr (kMaxRows > 1) {
    if (rows < kMaxRows) return tile_for<Tile, kMaxRows - 1>(rows, blocks);
  }
  return for_blocks<Tile, kMaxRows>(blocks);
}

// Every tile of a call: the output channels in chunks of `chunk_blocks` blocks, split over the
// threads, and within a chunk the rows `tile_rows` at a time, so that a chunk's weights stay in
// cache for every row. `start_chunk(first_block, blocks)` runs first in each chunk (e.g. to widen
// its weights), then `tile(first_block, blocks, row, rows_here)` per tile.
template <typename StartChunk, typename RunTile>
void for_each_tile(int64_t channel_blocks, int64_t rows, int64_t chunk_blocks, int64_t tile_rows,
                   const StartChunk& start_chunk, const RunTile& tile) {
  const int64_t chunks = (channel_blocks + chunk_blocks - 1) / chunk_blocks;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first_block = chunk * chunk_blocks;
      const int64_t blocks = std::min(chunk_blocks, channel_blocks - first_block);
      start_chunk(first_block, blocks);
      for (int64_t row = 0; row < rows; row += tile_rows) tile(first_block, blocks, row, std::min(tile_rows, rows - row));
    }
  });
}

template <typename RunTile>
void for_each_tile(int64_t channel_blocks, int64_t rows, int64_t chunk_blocks, int64_t tile_rows, const RunTile& tile) {
  for_each_tile(channel_blocks, rows, chunk_blocks, tile_rows, [](int64_t, int64_t) {}, tile);
}

}  // namespace tierserve_tiles
