// Bindings of the fused passes of Muon and L-BFGS (algo_api.hpp), the registration of
// optkern.RowSparse and a test hook of the row grouping (sparse_rows.hpp). Each pass checks every
// array (check_array: float32, native byte order, C-contiguous, aligned, writeable where written;
// then sizes, and no written array sharing memory with another) before anything is written,
// releases the GIL and splits the work into blocks fixed by the sizes alone, so results do not
// depend on the number of threads. The vectors of L-BFGS are flat (torch's state layout); the
// gradients and parameters are the lists of arrays the optimizer holds.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "algo_api.hpp"
#include "bindings/arrays.hpp"
#include "bindings/row_grads.hpp"
#include "dispatch.hpp"
#include "multi_tensor.hpp"
#include "sparse_rows.hpp"

namespace optkern {
namespace {
namespace algos {  // named: the bindings are one unity-build unit with other anonymous helpers

const AlgoKernels& algo_table(py::handle isa) {
  const std::string name = isa.is_none() ? std::string(active_isa()) : py::cast<std::string>(isa);
  if (kernels_for(name) == nullptr) {
    throw py::value_error("isa='" + name + "' is not available here");
  }
  // The ISA builds this binary holds (isa_builds.txt, OPTKERN_HAVE_<ISA> from CMake).
  struct Build {
    const char* name;
    const AlgoKernels* (*table)();
  };
  static const Build builds[] = {
#if defined(OPTKERN_HAVE_SCALAR)
      {"scalar", scalar::algo_kernels},
#endif
#if defined(OPTKERN_HAVE_AVX2)
      {"avx2", avx2::algo_kernels},
#endif
#if defined(OPTKERN_HAVE_AVX512)
      {"avx512", avx512::algo_kernels},
#endif
#if defined(OPTKERN_HAVE_NEON)
      {"neon", neon::algo_kernels},
#endif
#if defined(OPTKERN_HAVE_SVE)
      {"sve", sve::algo_kernels},
#endif
  };
  for (const Build& b : builds) {
    if (name == b.name) return *b.table();
  }
  throw py::value_error("isa='" + name + "' has no fused Muon and L-BFGS passes in this build");
}

// One checked float32 array of a call.
struct Span {
  float* data;
  std::size_t size;
  std::string name;
  bool written;
};

class Arrays {
 public:
  Span& add(py::handle h, const std::string& name, bool write) {
    DType type;
    const auto* a =
        check_array(h, name, write ? Access::write : Access::read, bit(DType::f32), &type);
    std::size_t size = 1;
    for (int d = 0; d < a->nd; ++d) size *= static_cast<std::size_t>(a->dimensions[d]);
    held_.push_back(py::reinterpret_borrow<py::object>(h));
    spans_.push_back({reinterpret_cast<float*>(a->data), size, name, write});
    return spans_.back();
  }

  // A list or tuple of arrays (copied first: nothing the caller does can free an item).
  std::vector<std::size_t> add_list(py::handle seq, const std::string& name, bool write) {
    const py::list items = snapshot(seq, name, "float32 arrays");
    std::vector<std::size_t> at;
    for (std::size_t i = 0; i < items.size(); ++i) {
      add(items[i], name + "[" + std::to_string(i) + "]", write);
      at.push_back(spans_.size() - 1);
    }
    held_.push_back(items);
    return at;
  }

  Span& operator[](std::size_t i) { return spans_[i]; }
  std::size_t count() const { return spans_.size(); }

  // No array written by the call shares memory with any other array of the call.
  void check_disjoint() const {
    std::vector<const Span*> order;
    for (const Span& s : spans_) {
      if (s.size != 0) order.push_back(&s);
    }
    std::sort(order.begin(), order.end(),
              [](const Span* a, const Span* b) { return a->data < b->data; });
    const Span* reach = nullptr;
    for (const Span* s : order) {
      if (reach != nullptr && s->data < reach->data + reach->size &&
          (s->written || reach->written)) {
        throw py::value_error(s->name + " shares memory with " + reach->name +
                              "; every array the pass writes must be separate from the others");
      }
      if (reach == nullptr || s->data + s->size > reach->data + reach->size) reach = s;
    }
  }

 private:
  std::deque<Span> spans_;  // references to its items stay valid as it grows
  std::vector<py::object> held_;
};

void require_size(const Span& s, std::size_t n, const char* what) {
  if (s.size != n) {
    throw py::value_error(s.name + " has " + std::to_string(s.size) + " elements, " + what + " " +
                          std::to_string(n));
  }
}

double nan_max(double a, double b) { return (a != a || b != b) ? a + b : (a > b ? a : b); }

// (dot, max) of the L-BFGS passes from their per-block pairs (algo_api.hpp), added in block order.
py::tuple dot_and_max(const std::vector<double>& partial) {
  double dot = 0.0, mx = 0.0;
  for (std::size_t b = 0; b + 1 < partial.size(); b += 2) {
    dot += partial[b];
    mx = nan_max(mx, partial[b + 1]);
  }
  return py::make_tuple(dot, mx);
}

// The blocks of a pass over a list of arrays that together hold n elements of flat vectors: a
// block never spans two arrays.
struct Block {
  float* g;          // in its array
  std::size_t flat;  // its first element in the flat vectors
  std::size_t size;
};

std::vector<Block> blocks_of(Arrays& a, const std::vector<std::size_t>& list) {
  std::vector<Block> out;
  std::size_t flat = 0;
  for (std::size_t i : list) {
    const Span& s = a[i];
    for (std::size_t b = 0; b < s.size; b += ALGO_BLOCK) {
      out.push_back({s.data + b, flat + b, std::min(ALGO_BLOCK, s.size - b)});
    }
    flat += s.size;
  }
  return out;
}

std::size_t total_size(Arrays& a, const std::vector<std::size_t>& list) {
  std::size_t n = 0;
  for (std::size_t i : list) n += a[i].size;
  return n;
}

// torch's lerp form for weight w, rounded to float as torch rounds it (Lerp in rules.hpp).
void lerp_form(double w, float& coeff, float& from_start) {
  const float wf = static_cast<float>(w);
  const bool start = std::fabs(wf) < 0.5f;
  from_start = start ? 1.0f : 0.0f;
  coeff = start ? wf : wf - 1.0f;
}

// -- Muon -----------------------------------------------------------------------------------------

double muon_momentum(py::handle g, py::handle buf, py::handle out, double momentum, bool nesterov,
                     double grad_scale, py::handle isa) {
  const AlgoKernels& k = algo_table(isa);
  Arrays a;
  const Span& gs = a.add(g, "grad", false);
  const Span& bs = a.add(buf, "momentum_buffer", true);
  const Span& os = a.add(out, "out", true);
  require_size(bs, gs.size, "its gradient has");
  require_size(os, gs.size, "its gradient has");
  a.check_disjoint();
  MuonMomentum m{};
  lerp_form(1.0 - momentum, m.buf_coeff, m.buf_from_start);
  lerp_form(momentum, m.out_coeff, m.out_from_start);
  m.grad_scale = static_cast<float>(grad_scale);
  m.nesterov = nesterov;
  const std::size_t n = gs.size, nb = (n + ALGO_BLOCK - 1) / ALGO_BLOCK;
  std::vector<double> partial(nb);
  auto body = [&](std::size_t lo, std::size_t hi) {
    for (std::size_t b = lo; b < hi; ++b) {
      const std::size_t at = b * ALGO_BLOCK, len = std::min(ALGO_BLOCK, n - at);
      partial[b] = k.muon_momentum(m, gs.data + at, bs.data + at, os.data + at, len);
    }
  };
  {
    py::gil_scoped_release nogil;
    parallel_for(nb, ALGO_BLOCK * WEIGHT_STREAMING, body);
  }
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

void muon_update(py::handle p, py::handle u, double decay, double coeff, py::handle isa) {
  const AlgoKernels& k = algo_table(isa);
  Arrays a;
  const Span& ps = a.add(p, "param", true);
  const Span& us = a.add(u, "update", false);
  require_size(us, ps.size, "its parameter has");
  a.check_disjoint();
  const float d = static_cast<float>(decay), c = static_cast<float>(coeff);
  const std::size_t n = ps.size;
  auto body = [&](std::size_t lo, std::size_t hi) {
    k.muon_update(ps.data + lo, us.data + lo, d, c, hi - lo);
  };
  py::gil_scoped_release nogil;
  parallel_for(n, WEIGHT_STREAMING, body);
}

// -- L-BFGS ---------------------------------------------------------------------------------------

// The history: k arrays per list, each of n elements.
std::vector<const float*> history(Arrays& a, py::handle seq, const char* name, std::size_t n) {
  std::vector<const float*> out;
  for (std::size_t i : a.add_list(seq, name, false)) {
    require_size(a[i], n, "the flat vectors have");
    out.push_back(a[i].data);
  }
  return out;
}

py::tuple lbfgs_history(py::handle grads, py::handle gp, py::handle d, double t, py::handle y,
                        py::handle s, py::handle S, py::handle Y, py::handle isa) {
  const AlgoKernels& k = algo_table(isa);
  Arrays a;
  const auto gl = a.add_list(grads, "grads", false);
  const std::size_t n = total_size(a, gl);
  Span& gps = a.add(gp, "prev_flat_grad", true);
  Span& ds = a.add(d, "d", false);
  Span& ys = a.add(y, "y", true);
  Span& ss = a.add(s, "s", true);
  for (Span* v : {&gps, &ds, &ys, &ss}) require_size(*v, n, "the gradients have");
  const std::vector<const float*> Sp = history(a, S, "S", n), Yp = history(a, Y, "Y", n);
  if (Sp.size() != Yp.size()) throw py::value_error("S and Y must hold the same number of arrays");
  a.check_disjoint();
  const std::size_t kk = Sp.size(), width = LBFGS_NEW_SUMS + LBFGS_PAIR_SUMS * kk;
  const std::vector<Block> blocks = blocks_of(a, gl);
  std::vector<double> partial(blocks.size() * width);
  const float tf = static_cast<float>(t);
  float* gpd = gps.data;
  const float* dd = ds.data;
  float *yd = ys.data, *sd = ss.data;
  auto body = [&](std::size_t lo, std::size_t hi) {
    std::vector<const float*> Sb(kk), Yb(kk);
    for (std::size_t b = lo; b < hi; ++b) {
      const Block& blk = blocks[b];
      for (std::size_t j = 0; j < kk; ++j) {
        Sb[j] = Sp[j] + blk.flat;
        Yb[j] = Yp[j] + blk.flat;
      }
      const LbfgsHistory h{blk.g,         gpd + blk.flat, dd + blk.flat, tf, yd + blk.flat,
                           sd + blk.flat, Sb.data(),      Yb.data(),     kk};
      k.lbfgs_history(h, blk.size, &partial[b * width]);
    }
  };
  {
    py::gil_scoped_release nogil;
    parallel_for(blocks.size(), ALGO_BLOCK * (1 + kk), body);
  }
  py::array_t<double> fresh(LBFGS_NEW_SUMS);
  py::array_t<double> pairs({kk, LBFGS_PAIR_SUMS});
  double* f = fresh.mutable_data();
  double* pr = pairs.mutable_data();
  std::fill(f, f + LBFGS_NEW_SUMS, 0.0);
  std::fill(pr, pr + kk * LBFGS_PAIR_SUMS, 0.0);
  for (std::size_t b = 0; b < blocks.size(); ++b) {  // block order: fixed
    const double* p = &partial[b * width];
    for (std::size_t i = 0; i < LBFGS_NEW_SUMS; ++i) f[i] += p[i];
    for (std::size_t i = 0; i < kk * LBFGS_PAIR_SUMS; ++i) pr[i] += p[LBFGS_NEW_SUMS + i];
  }
  return py::make_tuple(fresh, pairs);
}

// The history's inner products from scratch (a loaded state), with the very sums the history
// pass makes (the same kernel, blocks and order), so a loaded run continues bit for bit:
// SY[i, j] = s_i . y_j, YY[i, j] = y_i . y_j. sizes: the parameters' sizes (the blocks).
py::tuple lbfgs_gram(py::handle S, py::handle Y, const std::vector<std::size_t>& sizes,
                     py::handle isa) {
  const AlgoKernels& k = algo_table(isa);
  Arrays a;
  std::size_t n = 0;
  for (std::size_t sz : sizes) n += sz;
  const std::vector<const float*> Sp = history(a, S, "S", n), Yp = history(a, Y, "Y", n);
  if (Sp.size() != Yp.size()) throw py::value_error("S and Y must hold the same number of arrays");
  const std::size_t kk = Sp.size();
  struct Chunk {
    std::size_t flat, size;
  };
  std::vector<Chunk> blocks;
  std::size_t flat = 0;
  for (std::size_t sz : sizes) {
    for (std::size_t b = 0; b < sz; b += ALGO_BLOCK)
      blocks.push_back({flat + b, std::min(ALGO_BLOCK, sz - b)});
    flat += sz;
  }
  const std::size_t width = kk * kk * LBFGS_PAIR_SUMS;
  std::vector<double> partial(blocks.size() * width);
  auto body = [&](std::size_t lo, std::size_t hi) {
    std::vector<const float*> Sb(kk), Yb(kk);
    for (std::size_t b = lo; b < hi; ++b) {
      const Chunk& c = blocks[b];
      for (std::size_t j = 0; j < kk; ++j) {
        Sb[j] = Sp[j] + c.flat;
        Yb[j] = Yp[j] + c.flat;
      }
      for (std::size_t i = 0; i < kk; ++i) {  // pair i as the "new" one: y = y_i, s = s_i
        k.lbfgs_pairs(Yb[i], Sb[i], Yb[i], Sb.data(), Yb.data(), kk, c.size,
                      &partial[b * width + i * kk * LBFGS_PAIR_SUMS]);
      }
    }
  };
  {
    py::gil_scoped_release nogil;
    parallel_for(blocks.size(), ALGO_BLOCK * (1 + kk * kk), body);
  }
  py::array_t<double> SY({kk, kk}), YY({kk, kk});
  double *sy = SY.mutable_data(), *yy = YY.mutable_data();
  std::fill(sy, sy + kk * kk, 0.0);
  std::fill(yy, yy + kk * kk, 0.0);
  for (std::size_t b = 0; b < blocks.size(); ++b) {  // block order, as the history pass
    for (std::size_t i = 0; i < kk; ++i) {
      for (std::size_t j = 0; j < kk; ++j) {
        const double* p = &partial[b * width + (i * kk + j) * LBFGS_PAIR_SUMS];
        sy[j * kk + i] += p[0];  // s_j . y_i
        yy[j * kk + i] += p[2];  // y_j . y_i
      }
    }
  }
  return py::make_tuple(SY, YY);
}

std::vector<float> coefficients(py::handle seq, std::size_t k, const char* name) {
  const auto values = py::cast<std::vector<double>>(seq);
  if (values.size() != k) {
    throw py::value_error(std::string(name) + " must hold " + std::to_string(k) + " numbers");
  }
  return std::vector<float>(values.begin(), values.end());
}

py::tuple lbfgs_direction(py::handle grads, double cg, py::handle S, py::handle cs, py::handle Y,
                          py::handle cy, py::handle d, py::handle isa) {
  const AlgoKernels& k = algo_table(isa);
  Arrays a;
  const auto gl = a.add_list(grads, "grads", false);
  const std::size_t n = total_size(a, gl);
  Span& ds = a.add(d, "d", true);
  require_size(ds, n, "the gradients have");
  const std::vector<const float*> Sp = history(a, S, "S", n), Yp = history(a, Y, "Y", n);
  if (Sp.size() != Yp.size()) throw py::value_error("S and Y must hold the same number of arrays");
  const std::size_t kk = Sp.size();
  const std::vector<float> csf = coefficients(cs, kk, "cs"), cyf = coefficients(cy, kk, "cy");
  a.check_disjoint();
  const std::vector<Block> blocks = blocks_of(a, gl);
  std::vector<double> partial(blocks.size() * 2);
  const float cgf = static_cast<float>(cg);
  float* dd = ds.data;
  auto body = [&](std::size_t lo, std::size_t hi) {
    std::vector<const float*> Sb(kk), Yb(kk);
    for (std::size_t b = lo; b < hi; ++b) {
      const Block& blk = blocks[b];
      for (std::size_t j = 0; j < kk; ++j) {
        Sb[j] = Sp[j] + blk.flat;
        Yb[j] = Yp[j] + blk.flat;
      }
      const LbfgsDirection dir{blk.g,     cgf,        Sb.data(), csf.data(),
                               Yb.data(), cyf.data(), kk,        dd + blk.flat};
      k.lbfgs_direction(dir, blk.size, &partial[b * 2]);
    }
  };
  {
    py::gil_scoped_release nogil;
    parallel_for(blocks.size(), ALGO_BLOCK * (1 + kk), body);
  }
  return dot_and_max(partial);
}

py::tuple lbfgs_take(py::handle grads, py::handle out, py::handle d, py::handle isa) {
  const AlgoKernels& k = algo_table(isa);
  Arrays a;
  const auto gl = a.add_list(grads, "grads", false);
  const std::size_t n = total_size(a, gl);
  Span& os = a.add(out, "out", true);
  Span& ds = a.add(d, "d", false);
  require_size(os, n, "the gradients have");
  require_size(ds, n, "the gradients have");
  a.check_disjoint();
  const std::vector<Block> blocks = blocks_of(a, gl);
  std::vector<double> partial(blocks.size() * 2);
  float* od = os.data;
  const float* dd = ds.data;
  auto body = [&](std::size_t lo, std::size_t hi) {
    for (std::size_t b = lo; b < hi; ++b) {
      const Block& blk = blocks[b];
      k.lbfgs_take(blk.g, od + blk.flat, dd + blk.flat, blk.size, &partial[b * 2]);
    }
  };
  {
    py::gil_scoped_release nogil;
    parallel_for(blocks.size(), ALGO_BLOCK * WEIGHT_STREAMING, body);
  }
  return dot_and_max(partial);
}

void lbfgs_point(py::handle params, py::handle x, py::handle d, double t, py::handle isa) {
  const AlgoKernels& k = algo_table(isa);
  Arrays a;
  const auto pl = a.add_list(params, "params", true);
  const std::size_t n = total_size(a, pl);
  Span& xs = a.add(x, "x", false);
  Span& ds = a.add(d, "d", false);
  require_size(xs, n, "the parameters have");
  require_size(ds, n, "the parameters have");
  a.check_disjoint();
  const std::vector<Block> blocks = blocks_of(a, pl);
  const float tf = static_cast<float>(t);
  const float *xd = xs.data, *dd = ds.data;
  auto body = [&](std::size_t lo, std::size_t hi) {
    for (std::size_t b = lo; b < hi; ++b) {
      const Block& blk = blocks[b];
      k.lbfgs_point(blk.g, xd + blk.flat, dd + blk.flat, tf, blk.size);
    }
  };
  py::gil_scoped_release nogil;
  parallel_for(blocks.size(), ALGO_BLOCK * WEIGHT_STREAMING, body);
}

// -- row-sparse gradients: the grouping, for tests
// --------------------------------------------------

py::tuple group_rows_hook(py::array_t<std::int64_t, py::array::c_style> idx, std::int64_t rows) {
  if (idx.ndim() != 1) throw py::value_error("indices must be 1-D");
  const std::size_t k = static_cast<std::size_t>(idx.size());
  const std::size_t bad = first_bad_row(idx.data(), k, rows);
  if (bad != k) {
    throw py::value_error("indices[" + std::to_string(bad) +
                          "] = " + std::to_string(idx.data()[bad]) + " is outside [0, " +
                          std::to_string(rows) + ")");
  }
  RowGroups g;
  {
    py::gil_scoped_release nogil;
    g = group_rows(idx.data(), k, rows);
  }
  return py::make_tuple(py::array_t<std::int64_t>(g.rows.size(), g.rows.data()),
                        py::array_t<std::size_t>(g.first.size(), g.first.data()),
                        py::array_t<std::size_t>(g.order.size(), g.order.data()));
}

}  // namespace algos
}  // namespace

using namespace algos;  // NOLINT: this file's own helpers, for the registrations below

void define_algos(py::module_& m) {
  m.def("_set_row_sparse_type", &set_row_sparse_type, py::arg("cls"),
        "Registers optkern.RowSparse, the row-sparse gradients the bindings take.");
  m.def("muon_momentum", &muon_momentum, py::arg("grad"), py::arg("momentum_buffer"),
        py::arg("out"), py::kw_only(), py::arg("momentum"), py::arg("nesterov"),
        py::arg("grad_scale") = 1.0, py::arg("isa") = py::none(),
        "Muon's momentum: buf <- lerp(buf, g, 1 - momentum), out <- lerp(g, buf, momentum) "
        "(nesterov) or buf, g scaled by grad_scale; returns the sum of out's squares.");
  m.def("muon_update", &muon_update, py::arg("param"), py::arg("update"), py::kw_only(),
        py::arg("decay"), py::arg("coeff"), py::arg("isa") = py::none(),
        "Muon's update: p <- p * decay + coeff * update.");
  m.def("lbfgs_history", &lbfgs_history, py::arg("grads"), py::arg("prev_flat_grad"), py::arg("d"),
        py::arg("t"), py::arg("y"), py::arg("s"), py::arg("S"), py::arg("Y"), py::kw_only(),
        py::arg("isa") = py::none(),
        "L-BFGS's history pass: y <- g - prev, s <- t d, prev <- g; returns ([y.s, y.y, g.s, "
        "g.y], [[s_j.y, s_j.g, y_j.y, y_j.s, y_j.g] for each pair j]).");
  m.def("lbfgs_gram", &lbfgs_gram, py::arg("S"), py::arg("Y"), py::arg("sizes"), py::kw_only(),
        py::arg("isa") = py::none(),
        "L-BFGS's history products from scratch, as the history pass sums them: (SY, YY), "
        "SY[i, j] = s_i.y_j, YY[i, j] = y_i.y_j; sizes: the parameters' sizes.");
  m.def("lbfgs_direction", &lbfgs_direction, py::arg("grads"), py::arg("cg"), py::arg("S"),
        py::arg("cs"), py::arg("Y"), py::arg("cy"), py::arg("d"), py::kw_only(),
        py::arg("isa") = py::none(),
        "L-BFGS's direction pass: d <- cg g + sum_j (cy_j y_j + cs_j s_j); returns (g.d, max|d|).");
  m.def("lbfgs_take", &lbfgs_take, py::arg("grads"), py::arg("out"), py::arg("d"), py::kw_only(),
        py::arg("isa") = py::none(), "out <- g (flat); returns (g.d, max|g|).");
  m.def("lbfgs_point", &lbfgs_point, py::arg("params"), py::arg("x"), py::arg("d"), py::arg("t"),
        py::kw_only(), py::arg("isa") = py::none(), "p <- x + t d, over the parameters in order.");
}

void define_algos_testing(py::module_& m) {
  m.def("group_rows", &group_rows_hook, py::arg("indices"), py::arg("num_rows"),
        "A row-sparse gradient's rows grouped: (rows, first, order) (sparse_rows.hpp).");
}

}  // namespace optkern
