// The factored plan: how a factored kernel (KernelDecl::passes, Adafactor) runs over a group.
//
// Its passes go over tiles of every array, the tiles of the whole group in one parallel region per
// pass, and the rule's host step (`between`) runs on each array after each pass but the last;
// after pass 0 also its work per row and per column (`between_range`), in parallel over ranges of
// rows and of columns. A matrix's tile grid and ranges depend on its shape alone, each tile's sums
// are added per array in tile order, its row and column partial sums per row and column in tile
// order, so the results do not depend on the number of threads.
#include <algorithm>
#include <array>

#include "multi_tensor.hpp"
#include "update.hpp"

namespace optkern {
namespace {

// Tiles of a factored kernel: a matrix's rows longer than 2 * FACTOR_COLS are cut into column
// tiles of about FACTOR_COLS; each column tile into row tiles of about FACTOR_TILE elements, at
// most FACTOR_TILES of them and at least FACTOR_MIN_ROWS rows each (an array of <= 1 dimension:
// tiles of FACTOR_TILE elements). Each tile keeps a partial sum per row and per column it holds
// (a 5000 x 10000 matrix: 1 x 64 tiles, 5 MB of column partials; 16 x 250000: 31 x 1 tiles).
// Fixed by the shapes alone, never by the thread count. A tile's rows are separate runs of
// memory, each restarting the hardware's streams: with FACTOR_COLS = 4096 a 5000 x 10000 matrix
// came in runs of 3344 elements and its three passes took 1.15-1.5x the time of three flat passes
// over the same bytes, against 1.0-1.2x in whole rows of 10000 (the kernel's column block, 64 KB,
// still holds a float32 tile's width).
constexpr std::size_t FACTOR_TILE = 4096;
constexpr std::size_t FACTOR_TILES = 64;
constexpr std::size_t FACTOR_MIN_ROWS = 16;
constexpr std::size_t FACTOR_COLS = 8192;
// Rows or columns per range of a factored rule's work per row and column (between_range).
constexpr std::size_t HOST_RANGE = 4096;

struct Array {
  std::size_t batch = 0, rows = 1, cols = 0, numel = 0;
  std::size_t row_at = 0, col_at = 0, mat_at = 0;  // into per_row, per_col (bytes), per_matrix
  std::size_t row_tiles = 1, col_tiles = 1;
  // Its row partials, [col_tiles][batch * rows], and column partials, [row_tiles][batch *
  // cols], in `parts`: each tile writes its own; the first slice ends up holding the sums.
  std::size_t rp_at = 0, cp_at = 0;
  std::size_t real = 4;  // bytes of its compute type (its per-row and per-column numbers)
  bool factored = false;
  // One row tile: pass 0 finishes the columns itself (FactoredTile::col_scale_out), with no
  // column partials and no ranges of columns.
  bool whole_cols = false;
};
struct Tile {
  std::size_t tensor, matrix, row, rows, col, cols;  // rows x cols at (row, col) of a matrix
  std::size_t begin;                                 // its first element in the array
  std::size_t row_part, col_part;                    // where its partial sums go in `parts`
};
struct HostRange {  // rows or columns [lo, hi) of a matrix, for between_range
  std::size_t tensor, matrix, lo, hi;
  bool rows;
};

void* at(void* base, std::size_t bytes) { return static_cast<char*>(base) + bytes; }
const void* at(const void* base, std::size_t bytes) {
  return static_cast<const char*>(base) + bytes;
}

}  // namespace

void run_factored(const Update& u) {
  const Rule& rule = *u.rule;
  const int passes = rule.info.passes;
  const std::size_t count = u.tensors.size();
  std::vector<Array> arrays(count);
  std::vector<Tile> tiles;
  std::vector<HostRange> ranges;
  std::size_t n_scale_bytes = 0, n_matrices = 0, n_parts = 0, total = 0, spans = 0;
  for (std::size_t t = 0; t < count; ++t) {
    const Tensor& tensor = u.tensors[t];
    Array& a = arrays[t];
    const int nd = tensor.ndim;
    const std::intptr_t* dims = tensor.dims;
    a.numel = tensor.size;
    a.real = computes_in_f64(tensor.types.param) ? 8 : 4;
    total += a.numel;
    a.factored = nd >= 2;
    if (!a.factored) {
      for (std::size_t e = 0; e < a.numel; e += FACTOR_TILE) {
        const std::size_t n = std::min(FACTOR_TILE, a.numel - e);
        tiles.push_back({t, 0, 0, 1, 0, n, e, 0, 0});
      }
      continue;
    }
    a.rows = static_cast<std::size_t>(dims[nd - 2]);
    a.cols = static_cast<std::size_t>(dims[nd - 1]);
    a.batch = 1;
    for (int d = 0; d < nd - 2; ++d) a.batch *= static_cast<std::size_t>(dims[d]);
    a.row_at = n_scale_bytes;
    n_scale_bytes += a.batch * a.rows * a.real;
    a.col_at = n_scale_bytes;
    n_scale_bytes += a.batch * a.cols * a.real;
    a.mat_at = n_matrices;
    n_matrices += a.batch;
    // Columns in tiles of about FACTOR_COLS when a row is longer than twice that; rows in
    // tiles of about FACTOR_TILE elements, at most FACTOR_TILES per column tile and at least
    // FACTOR_MIN_ROWS rows (the column partials: at most an eighth of the matrix's bytes).
    std::size_t width = a.cols;
    if (a.cols > 2 * FACTOR_COLS) {
      const std::size_t n = (a.cols + FACTOR_COLS - 1) / FACTOR_COLS;
      width = ((a.cols + n - 1) / n + 15) / 16 * 16;
      a.col_tiles = (a.cols + width - 1) / width;
    }
    std::size_t per = std::max(
        (FACTOR_TILE + std::max<std::size_t>(width, 1) - 1) / std::max<std::size_t>(width, 1),
        (a.rows + FACTOR_TILES - 1) / FACTOR_TILES);
    per = std::max<std::size_t>(1, std::max(per, std::min(a.rows, FACTOR_MIN_ROWS)));
    a.row_tiles = a.numel == 0 ? 1 : (a.rows + per - 1) / per;
    a.whole_cols = a.numel != 0 && a.row_tiles == 1;
    a.rp_at = n_parts;
    n_parts += a.col_tiles * a.batch * a.rows;
    a.cp_at = n_parts;
    if (!a.whole_cols) n_parts += a.row_tiles * a.batch * a.cols;
    for (std::size_t b = 0; b < a.batch; ++b) {
      for (std::size_t r = 0, rt = 0; a.numel != 0 && r < a.rows; r += per, ++rt) {
        for (std::size_t c = 0, ct = 0; c < a.cols; c += width, ++ct) {
          tiles.push_back({t, b, r, std::min(per, a.rows - r), c, std::min(width, a.cols - c),
                           (b * a.rows + r) * a.cols + c, a.rp_at + (ct * a.batch + b) * a.rows + r,
                           a.cp_at + (rt * a.batch + b) * a.cols + c});
        }
      }
      for (std::size_t lo = 0; lo < a.rows; lo += HOST_RANGE) {
        ranges.push_back({t, b, lo, std::min(a.rows, lo + HOST_RANGE), true});
      }
      for (std::size_t lo = 0; !a.whole_cols && lo < a.cols; lo += HOST_RANGE) {
        ranges.push_back({t, b, lo, std::min(a.cols, lo + HOST_RANGE), false});
      }
      spans += a.rows + (a.whole_cols ? 0 : a.cols);
    }
  }
  // The partial sums and the per-row and per-column numbers, in buffers kept by the calling
  // thread from step to step (every element is written before it is read): fresh pages of a
  // few tens of MB would cost more than the pass that fills them.
  thread_local std::vector<double> parts_buffer;
  thread_local std::vector<double> scale_buffer;  // per-row and per-column numbers, as bytes
  if (parts_buffer.size() < n_parts) parts_buffer.resize(n_parts);
  if (scale_buffer.size() * sizeof(double) < n_scale_bytes) {
    scale_buffer.resize((n_scale_bytes + sizeof(double) - 1) / sizeof(double));
  }
  double* parts = parts_buffer.data();
  void* scales = scale_buffer.data();
  for (const Array& a : arrays) {  // an empty matrix: its rows or columns sum to 0
    if (a.factored && a.numel == 0) {
      std::fill(parts + a.rp_at, parts + a.cp_at + a.batch * a.cols, 0.0);
    }
  }
  constexpr std::size_t NS = 1;  // sums per tile and pass
  std::vector<double> sums(tiles.size() * NS), range_out(ranges.size()), per_matrix(n_matrices);
  std::vector<ScalarsSlot> scalars(count);
  std::vector<std::array<void*, MAX_STATES>> states(count);
  for (std::size_t t = 0; t < count; ++t) {
    scalars[t] = u.scalars[u.tensors[t].scalars];
    std::copy(u.tensors[t].state, u.tensors[t].state + MAX_STATES, states[t].begin());
  }
  auto array_view = [&](std::size_t t, const double* array_sums) {
    const Array& a = arrays[t];
    FactoredArray fa{};
    fa.sums = array_sums != nullptr ? array_sums + t * NS : nullptr;
    fa.row_sums = a.factored ? parts + a.rp_at : nullptr;
    fa.col_sums = a.factored ? parts + a.cp_at : nullptr;
    fa.state = states[t].data();
    fa.batch = a.batch;
    fa.rows = a.rows;
    fa.cols = a.cols;
    fa.numel = a.numel;
    fa.per_row = at(scales, a.row_at);
    fa.per_col = at(scales, a.col_at);
    fa.per_matrix = per_matrix.data() + a.mat_at;
    fa.factored = a.factored;
    return fa;
  };
  auto is_f64 = [&](std::size_t t) { return computes_in_f64(u.tensors[t].types.param); };
  auto run_ranges = [&](int stage) {
    auto body = [&](std::size_t lo, std::size_t hi) {
      for (std::size_t i = lo; i < hi; ++i) {
        const HostRange& g = ranges[i];
        const Array& a = arrays[g.tensor];
        if (stage == 0) {  // this range's sums: its partials in tile order
          const std::size_t n = g.rows ? a.rows : a.cols,
                            slices = g.rows ? a.col_tiles : a.row_tiles;
          double* first = parts + (g.rows ? a.rp_at : a.cp_at) + g.matrix * n;
          for (std::size_t k = 1; k < slices; ++k) {
            const double* other = first + k * a.batch * n;
            for (std::size_t j = g.lo; j < g.hi; ++j) first[j] += other[j];
          }
        }
        range_out[i] =
            rule.between_range[is_f64(g.tensor)](stage, array_view(g.tensor, nullptr), g.matrix,
                                                 g.rows, g.lo, g.hi, scalars[g.tensor].bytes);
      }
    };
    const std::size_t w = ranges.empty() ? 1 : std::max<std::size_t>(1, spans / ranges.size());
    parallel_for(ranges.size(), w * WEIGHT_DIVIDES, body);
  };
  const std::size_t weight =
      tiles.empty() ? 1 : std::max<std::size_t>(1, total / tiles.size()) * rule.info.weight;
  for (int pass = 0; pass < passes; ++pass) {
    auto body = [&](std::size_t lo, std::size_t hi) {
      for (std::size_t i = lo; i < hi; ++i) {
        const Tile& k = tiles[i];
        const Array& a = arrays[k.tensor];
        const Tensor& tensor = u.tensors[k.tensor];
        const std::size_t ps = dtype_size(tensor.types.param), gs = dtype_size(tensor.types.grad),
                          ss = dtype_size(tensor.types.state);
        FactoredTile ft{};
        ft.param = at(tensor.param, k.begin * ps);
        ft.grad = at(tensor.grad, k.begin * gs);
        for (std::size_t s = 0; s < rule.states.size(); ++s) {
          void* base = tensor.state[s];
          if (base == nullptr) continue;
          switch (rule.states[s].shape) {
            case StateShape::rows:
              ft.state[s] = at(base, (k.matrix * a.rows + k.row) * ss);
              break;
            case StateShape::cols:
              ft.state[s] = at(base, (k.matrix * a.cols + k.col) * ss);
              break;
            default:
              ft.state[s] = at(base, k.begin * ss);
          }
        }
        ft.rows = k.rows;
        ft.cols = k.cols;
        ft.stride = a.factored ? a.cols : k.cols;
        ft.row_scale =
            a.factored ? at(scales, a.row_at + (k.matrix * a.rows + k.row) * a.real) : nullptr;
        ft.col_scale =
            a.factored ? at(scales, a.col_at + (k.matrix * a.cols + k.col) * a.real) : nullptr;
        ft.sums = &sums[i * NS];
        ft.row_sums = a.factored ? parts + k.row_part : nullptr;
        ft.col_sums = a.factored && !a.whole_cols ? parts + k.col_part : nullptr;
        ft.col_scale_out =
            a.whole_cols ? at(scales, a.col_at + (k.matrix * a.cols + k.col) * a.real) : nullptr;
        tensor.entry->pass(scalars[k.tensor].bytes, pass, ft);
      }
    };
    parallel_for(tiles.size(), weight, body);
    if (pass == passes - 1) break;
    if (pass == 0) run_ranges(0);
    // The host step of each array: its tile sums in tile order, and after pass 0 its matrices'
    // stage-0 results over their row ranges in range order.
    std::vector<double> array_sums(count * NS, 0.0);
    for (std::size_t i = 0; i < tiles.size(); ++i) {
      for (std::size_t r = 0; r < NS; ++r) {
        array_sums[tiles[i].tensor * NS + r] += sums[i * NS + r];
      }
    }
    if (pass == 0) {
      std::fill(per_matrix.begin(), per_matrix.end(), 0.0);
      for (std::size_t i = 0; i < ranges.size(); ++i) {
        const HostRange& g = ranges[i];
        if (g.rows) per_matrix[arrays[g.tensor].mat_at + g.matrix] += range_out[i];
      }
    }
    for (std::size_t t = 0; t < count; ++t) {
      rule.between[is_f64(t)](pass, array_view(t, array_sums.data()), scalars[t].bytes);
    }
    if (pass == 0) run_ranges(1);
  }
}

}  // namespace optkern
