// Row-sparse gradients (optkern.RowSparse): the rows of a parameter listed in a gradient, grouped
// once per step, and the driver that runs a rule's element-wise kernel on those rows only.
//
// A row-sparse gradient of a parameter with R rows of D elements is k indices in [0, R) and k
// rows of D values; a row listed more than once has its values summed, in the order they appear
// (torch's coalesce). The indices are sorted once (a stable radix sort: O(k) per 11 bits of R),
// so every distinct row is visited once, by one thread: results do not depend on the number of
// threads, and nothing the size of the parameter is allocated.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace optkern {

// One gradient's rows, grouped: rows[u] (ascending, distinct) is listed at the positions
// order[first[u]] .. order[first[u + 1] - 1] of the values, ascending.
struct RowGroups {
  std::vector<std::int64_t> rows;
  std::vector<std::size_t> first;  // rows.size() + 1 entries
  std::vector<std::size_t> order;  // k entries
};

// The position of the first index outside [0, num_rows), or k when all are inside.
std::size_t first_bad_row(const std::int64_t* idx, std::size_t k, std::int64_t num_rows);

// Groups k indices, each in [0, num_rows) (checked before by first_bad_row).
RowGroups group_rows(const std::int64_t* idx, std::size_t k, std::int64_t num_rows);

// One parameter with a row-sparse gradient, as the driver sees it.
struct RowTarget {
  const RowGroups* groups;
  const float* values;  // [k, row]: the listed rows' gradients
  std::size_t row;      // elements per row
  std::size_t num_rows;
};

// fn(ctx, target, offset, g, n): the rule's kernel on elements [offset, offset + n) of target's
// parameter (and states), with the gradient g[0, n) of those elements.
using RowFn = void (*)(void* ctx, std::size_t target, std::size_t offset, const float* g,
                       std::size_t n);

// prefetch(ctx, target, offset, n): asks for the memory fn will touch for elements [offset,
// offset + n) of target (its parameter and states), a few rows before fn runs on them: the rows
// of a large table are far apart, and each would otherwise start with a cache and TLB miss.
using RowPrefetchFn = void (*)(void* ctx, std::size_t target, std::size_t offset, std::size_t n);

// Runs fn on the rows of every target. Lazy (dense = false): each distinct listed row once, with
// its summed gradient. Dense: every row, the rows not listed with a zero gradient (what the rule
// does to a dense gradient that is zero outside the listed rows), in runs of consecutive rows.
// weight: the work of one element against the single-thread threshold (multi_tensor.hpp).
void for_each_row(const RowTarget* targets, std::size_t count, bool dense, std::size_t weight,
                  RowFn fn, RowPrefetchFn prefetch, void* ctx);

// f(t, offset, g, n) runs the kernel; f.prefetch(t, offset, n) asks for its memory.
template <class F>
void for_each_row(const std::vector<RowTarget>& targets, bool dense, std::size_t weight, F& f) {
  for_each_row(
      targets.data(), targets.size(), dense, weight,
      [](void* c, std::size_t t, std::size_t offset, const float* g, std::size_t n) {
        (*static_cast<F*>(c))(t, offset, g, n);
      },
      [](void* c, std::size_t t, std::size_t offset, std::size_t n) {
        static_cast<F*>(c)->prefetch(t, offset, n);
      },
      &f);
}

}  // namespace optkern
