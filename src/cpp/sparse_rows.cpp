#include "sparse_rows.hpp"

#include <algorithm>
#include <numeric>

#include "multi_tensor.hpp"

namespace optkern {
namespace {

// Radix digits of 11 bits: a row index below 2^22 (4M rows) sorts in two passes over the k
// indices, each with a 2048-entry histogram (16 KB) that stays in L1.
constexpr int DIGIT_BITS = 11;
constexpr std::size_t DIGITS = std::size_t{1} << DIGIT_BITS;
// Below this many indices a comparison sort is cheaper than clearing the histograms.
constexpr std::size_t RADIX_MIN = 512;
// A run of rows not listed (dense mode) is handed to the kernel in pieces of at most this many
// elements, with this block of zeros as their gradient.
constexpr std::size_t ZERO_BLOCK = 16384;
alignas(64) const float kZeros[ZERO_BLOCK] = {};
// How many listed rows ahead of the one being updated their memory is asked for.
constexpr std::size_t PREFETCH_ROWS = 8;

int bits_for(std::int64_t num_rows) {
  int bits = 0;
  for (std::uint64_t v = num_rows > 1 ? static_cast<std::uint64_t>(num_rows - 1) : 0; v != 0;
       v >>= 1) {
    ++bits;
  }
  return bits;
}

// The gradient of listed row u of target g: the row itself when listed once, else its
// occurrences summed in order into `scratch`.
const float* summed_row(const RowTarget& g, std::size_t u, std::vector<float>& scratch) {
  const RowGroups& rg = *g.groups;
  const std::size_t lo = rg.first[u], hi = rg.first[u + 1], n = g.row;
  const float* first = g.values + rg.order[lo] * n;
  if (hi - lo == 1) return first;
  if (scratch.size() < n) scratch.resize(n);
  float* s = scratch.data();
  std::copy(first, first + n, s);
  for (std::size_t j = lo + 1; j < hi; ++j) {
    const float* v = g.values + rg.order[j] * n;
    for (std::size_t e = 0; e < n; ++e) s[e] += v[e];
  }
  return s;
}

}  // namespace

std::size_t first_bad_row(const std::int64_t* idx, std::size_t k, std::int64_t num_rows) {
  for (std::size_t j = 0; j < k; ++j) {
    if (idx[j] < 0 || idx[j] >= num_rows) return j;
  }
  return k;
}

RowGroups group_rows(const std::int64_t* idx, std::size_t k, std::int64_t num_rows) {
  RowGroups out;
  out.order.resize(k);
  std::iota(out.order.begin(), out.order.end(), std::size_t{0});
  const int bits = bits_for(num_rows);
  if (k < RADIX_MIN) {
    std::stable_sort(out.order.begin(), out.order.end(),
                     [idx](std::size_t a, std::size_t b) { return idx[a] < idx[b]; });
  } else {
    // LSD radix sort of the positions by their row: each pass is stable, so positions of one
    // row stay in the order they appear.
    std::vector<std::size_t> next(k);
    std::vector<std::size_t> count(DIGITS);
    for (int shift = 0; shift < bits; shift += DIGIT_BITS) {
      std::fill(count.begin(), count.end(), 0);
      for (std::size_t j : out.order)
        ++count[(static_cast<std::uint64_t>(idx[j]) >> shift) & (DIGITS - 1)];
      std::size_t at = 0;
      for (std::size_t& c : count) {
        const std::size_t n = c;
        c = at;
        at += n;
      }
      for (std::size_t j : out.order) {
        next[count[(static_cast<std::uint64_t>(idx[j]) >> shift) & (DIGITS - 1)]++] = j;
      }
      out.order.swap(next);
    }
  }
  for (std::size_t i = 0; i < k; ++i) {
    const std::int64_t r = idx[out.order[i]];
    if (out.rows.empty() || out.rows.back() != r) {
      out.rows.push_back(r);
      out.first.push_back(i);
    }
  }
  out.first.push_back(k);
  return out;
}

void for_each_row(const RowTarget* targets, std::size_t count, bool dense, std::size_t weight,
                  RowFn fn, RowPrefetchFn prefetch, void* ctx) {
  // Items: the listed rows (lazy) or all rows (dense) of every target, numbered across targets.
  std::vector<std::size_t> start(count + 1, 0);
  std::size_t widest = 1;
  for (std::size_t t = 0; t < count; ++t) {
    const RowTarget& g = targets[t];
    start[t + 1] = start[t] + (dense ? g.num_rows : g.groups->rows.size());
    widest = std::max(widest, g.row);
  }
  const std::size_t items = start[count];
  auto body = [&](std::size_t lo, std::size_t hi) {
    thread_local std::vector<float> scratch;
    std::size_t t =
        static_cast<std::size_t>(std::upper_bound(start.begin(), start.end(), lo) - start.begin()) -
        1;
    for (std::size_t i = lo; i < hi;) {
      while (i >= start[t + 1]) ++t;
      const RowTarget& g = targets[t];
      const std::size_t end = std::min(hi, start[t + 1]);
      const RowGroups& rg = *g.groups;
      if (!dense) {
        for (std::size_t a = i; a < std::min(end, i + PREFETCH_ROWS); ++a) {
          prefetch(ctx, t, static_cast<std::size_t>(rg.rows[a - start[t]]) * g.row, g.row);
        }
        for (; i < end; ++i) {
          const std::size_t u = i - start[t];
          if (i + PREFETCH_ROWS < end) {
            prefetch(ctx, t, static_cast<std::size_t>(rg.rows[u + PREFETCH_ROWS]) * g.row, g.row);
          }
          fn(ctx, t, static_cast<std::size_t>(rg.rows[u]) * g.row, summed_row(g, u, scratch),
             g.row);
        }
        continue;
      }
      // Rows [r, r_end) of target t: the listed ones with their gradient, runs of the others
      // with zeros.
      std::size_t r = i - start[t];
      const std::size_t r_end = end - start[t];
      std::size_t u = static_cast<std::size_t>(
          std::lower_bound(rg.rows.begin(), rg.rows.end(), static_cast<std::int64_t>(r)) -
          rg.rows.begin());
      while (r < r_end) {
        if (u < rg.rows.size() && static_cast<std::size_t>(rg.rows[u]) == r) {
          fn(ctx, t, r * g.row, summed_row(g, u, scratch), g.row);
          ++u;
          ++r;
          continue;
        }
        const std::size_t run_end =
            u < rg.rows.size() ? std::min(r_end, static_cast<std::size_t>(rg.rows[u])) : r_end;
        for (std::size_t e = r * g.row, stop = run_end * g.row; e < stop;) {
          const std::size_t n = std::min(ZERO_BLOCK, stop - e);
          fn(ctx, t, e, kZeros, n);
          e += n;
        }
        r = run_end;
      }
      i = end;
    }
  };
  parallel_for(items, weight * widest, body);
}

}  // namespace optkern
