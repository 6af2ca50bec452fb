#include "update.hpp"

#include <algorithm>
#include <atomic>

#include "multi_tensor.hpp"

namespace optkern {
namespace {

// Elements per block of a reduction pass (as NORM_BLOCK for the gradient norms): each block's
// sums are computed on one thread, in a fixed order, and added per array in block order, so the
// sums, and everything computed from them, are the same for any number of threads.
constexpr std::size_t REDUCE_BLOCK = 4096;

void* advance(void* p, DType type, std::size_t elements) {
  return p == nullptr ? nullptr : static_cast<char*>(p) + elements * dtype_size(type);
}
const void* advance(const void* p, DType type, std::size_t elements) {
  return p == nullptr ? nullptr : static_cast<const char*>(p) + elements * dtype_size(type);
}

// Asks for the cache lines of elements [offset, offset + n) of an array (nullptr: none), to be
// written: its first lines (the hardware prefetcher follows a long row by itself).
void prefetch_span(const void* p, DType type, std::size_t offset, std::size_t n) {
#if defined(__GNUC__) || defined(__clang__)
  if (p == nullptr) return;
  const char* at = static_cast<const char*>(p) + offset * dtype_size(type);
  const std::size_t bytes = std::min<std::size_t>(n * dtype_size(type), 1024);
  for (std::size_t b = 0; b < bytes; b += 64) __builtin_prefetch(at + b, 1);
#else
  (void)p, (void)type, (void)offset, (void)n;
#endif
}

// A call whose operands take at least STREAMING_CALL_BYTES comes from memory, not from the
// caches: the kernel entries of a rule with a division per element (WEIGHT_DIVIDES) then
// prefetch ahead (Operands::streaming, kernels/rule.cpp). Below it the prefetches cost more
// than they bring (up to 10% of a call held in L2); the cheaper rules keep up with the hardware
// prefetcher by themselves (SGD's 50M step 0.97x with them).
constexpr std::size_t STREAMING_CALL_BYTES = std::size_t{32} << 20;
std::atomic<std::size_t> g_streaming_call_bytes{STREAMING_CALL_BYTES};

// The bytes an update reads or writes.
std::size_t call_bytes(const Update& u) {
  std::size_t bytes = 0;
  for (const Tensor& t : u.tensors) {
    std::size_t per =
        dtype_size(t.types.param) + (t.grad == nullptr ? 0 : dtype_size(t.types.grad));
    for (const void* s : t.state) per += s == nullptr ? 0 : dtype_size(t.types.state);
    per += t.master == nullptr ? 0 : sizeof(float);
    bytes += t.size * per;
  }
  return bytes;
}

// Tensor t's operands from element b on (b a multiple of range_align(t.types)).
Operands operands_at(const Tensor& t, std::size_t b) {
  Operands op{};
  op.param = advance(t.param, t.types.param, b);
  op.grad = advance(t.grad, t.types.grad, b);
  for (std::size_t k = 0; k < MAX_STATES; ++k) {
    op.state[k] = advance(t.state[k], t.types.state, b);
    op.absmax[k] = t.absmax[k] == nullptr ? nullptr : t.absmax[k] + b / Q8_BLOCK;
  }
  op.master = t.master == nullptr ? nullptr : t.master + b;
  op.types = t.types;
  op.noise = t.noise;
  op.first = b;
  return op;
}

// The reduction pass of a kernel that has one (KernelDecl::reduce_sums): its first pass over
// fixed blocks of every array, in parallel; each array's sums added in block order; then the
// rule's per_array function gives each array its own scalars, returned one per tensor.
std::vector<ScalarsSlot> reduce(const Update& u) {
  const std::size_t NR = u.rule->info.reduce_sums;
  struct Block {
    std::size_t tensor, begin, size;
  };
  std::vector<Block> blocks;
  for (std::size_t t = 0; t < u.tensors.size(); ++t) {
    for (std::size_t b = 0; b < u.sizes[t]; b += REDUCE_BLOCK) {
      blocks.push_back({t, b, std::min(REDUCE_BLOCK, u.sizes[t] - b)});
    }
  }
  std::vector<double> partial(blocks.size() * NR);
  auto pass = [&](std::size_t lo, std::size_t hi) {
    for (std::size_t i = lo; i < hi; ++i) {
      const Block& k = blocks[i];
      const Tensor& t = u.tensors[k.tensor];
      t.entry->reduce(u.scalars[t.scalars].bytes, operands_at(t, k.begin), k.size,
                      &partial[i * NR]);
    }
  };
  parallel_for(blocks.size(), REDUCE_BLOCK * u.rule->info.weight, pass);
  std::vector<double> sums(u.tensors.size() * NR, 0.0);
  for (std::size_t i = 0; i < blocks.size(); ++i) {  // block order: fixed
    for (std::size_t r = 0; r < NR; ++r) sums[blocks[i].tensor * NR + r] += partial[i * NR + r];
  }
  std::vector<ScalarsSlot> out(u.tensors.size());
  for (std::size_t t = 0; t < u.tensors.size(); ++t) {
    const Tensor& tensor = u.tensors[t];
    out[t] = u.scalars[tensor.scalars];
    u.rule->per_array[computes_in_f64(tensor.types.param)](&sums[t * NR], out[t].bytes);
  }
  return out;
}

}  // namespace

void set_streaming_call_bytes(std::size_t bytes) {
  g_streaming_call_bytes.store(bytes, std::memory_order_relaxed);
}
std::size_t streaming_call_bytes() {
  return g_streaming_call_bytes.load(std::memory_order_relaxed);
}

const KernelEntry* find_entry(const KernelSet& set, Types types) {
  for (std::size_t i = 0; i < set.count; ++i) {
    const Types& e = set.entries[i].types;
    if (e.param == types.param && e.grad == types.grad && e.state == types.state &&
        e.write == types.write) {
      return &set.entries[i];
    }
  }
  return set.staged != nullptr && staged(types) ? set.staged : nullptr;
}

bool staged(Types t) {
  const bool half = t.param == DType::bf16 || t.param == DType::f16;
  if (!(t.param == DType::f32 || half) || t.grad == DType::q8) return false;
  if (!(t.state == DType::f32 || t.state == DType::bf16 || t.state == DType::q8)) return false;
  if (t.write != ParamWrite::nearest && !half) return false;
  return true;
}

void run_update(const Update& u) {
  if (u.rule->info.passes > 0) {
    run_factored(u);
    return;
  }
  // Each tensor's scalars: its step's, or its own after a reduction pass.
  std::vector<ScalarsSlot> per_array;
  if (u.rule->info.reduce_sums > 0) per_array = reduce(u);
  const bool streaming = u.rule->info.weight >= WEIGHT_DIVIDES &&
                         call_bytes(u) >= g_streaming_call_bytes.load(std::memory_order_relaxed);
  auto body = [&](std::size_t t, std::size_t b, std::size_t e) {
    const Tensor& tensor = u.tensors[t];
    const ScalarsSlot& s = per_array.empty() ? u.scalars[tensor.scalars] : per_array[t];
    Operands op = operands_at(tensor, b);
    op.streaming = streaming;
    tensor.entry->step(s.bytes, op, e - b);
  };
  for_each_span(u.sizes, u.aligns, u.rule->info.weight, body);
  if (u.rows.empty()) return;
  // The tensors with row-sparse gradients (their sizes are 0 above): the rule's kernel on each
  // listed row (or every row), the row's gradient summed from its duplicates in order (float32;
  // their parameters and states are plain, checked by the bindings: no q8 blocks to align to).
  struct Rows {
    const Update& u;
    void operator()(std::size_t r, std::size_t offset, const float* g, std::size_t n) const {
      const Tensor& tensor = u.tensors[u.row_tensors[r]];
      Operands op = operands_at(tensor, offset);
      op.grad = g;
      tensor.entry->step(u.scalars[tensor.scalars].bytes, op, n);
    }
    void prefetch(std::size_t r, std::size_t offset, std::size_t n) const {
      const Tensor& tensor = u.tensors[u.row_tensors[r]];
      prefetch_span(tensor.param, tensor.types.param, offset, n);
      for (void* s : tensor.state) prefetch_span(s, tensor.types.state, offset, n);
    }
  } rows{u};
  for_each_row(u.rows, u.dense_rows, u.rule->info.weight, rows);
}

}  // namespace optkern
