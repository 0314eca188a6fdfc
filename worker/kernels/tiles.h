// The tile kernels' dispatch, shared by woq_int8.cpp and dynamic_int8.cpp: a pointer to
// Tile<kR, kB>::run for 1-4 rows and 1-4 blocks of 16 channels. The shapes are template
// arguments so that each instantiation keeps its accumulators in registers.
#pragma once

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

template <template <int, int> class Tile>
auto tile_for(int64_t rows, int64_t blocks) -> decltype(&Tile<1, 1>::run) {
  switch (rows) {
    case 1: return for_blocks<Tile, 1>(blocks);
    case 2: return for_blocks<Tile, 2>(blocks);
    case 3: return for_blocks<Tile, 3>(blocks);
    default: return for_blocks<Tile, 4>(blocks);
  }
}

}  // namespace tierserve_tiles
