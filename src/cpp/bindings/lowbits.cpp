// The 16-bit and 8-bit element types from Python: ml_dtypes' bfloat16 registered as a type the
// arrays may have, q8 states converted to and from float32 (a state dict loaded into an
// optimizer of the other state type), the dynamic maps themselves, and the conversions of every
// ISA build for the tests (kernels/staging.cpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "bindings/arrays.hpp"
#include "bindings/prepared.hpp"
#include "dynamic_map.hpp"
#include "multi_tensor.hpp"

namespace optkern {
namespace {

using npy = py::detail::npy_api;

// x as a C-contiguous array of exactly `type_num` (no conversion), `what` for messages.
const py::detail::PyArray_Proxy* exact_array(py::handle x, int type_num, const char* what,
                                             bool writeable) {
  if (!py::isinstance<py::array>(x)) {
    throw py::type_error(std::string(what) + " must be a NumPy array, got " + type_name(x));
  }
  const auto* a = py::detail::array_proxy(x.ptr());
  const auto* d = py::detail::array_descriptor_proxy(a->descr);
  if (d->type_num != type_num || !(a->flags & npy::NPY_ARRAY_C_CONTIGUOUS_) ||
      !(a->flags & npy::NPY_ARRAY_ALIGNED_) ||
      (writeable && !(a->flags & npy::NPY_ARRAY_WRITEABLE_))) {
    throw py::type_error(std::string(what) + " must be a C-contiguous" +
                         (writeable ? ", writeable" : "") + " array of the right dtype, got " +
                         std::string(py::str(py::handle(a->descr))));
  }
  return a;
}

std::size_t size_of(const py::detail::PyArray_Proxy* a) {
  std::size_t n = 1;
  for (int d = 0; d < a->nd; ++d) n *= static_cast<std::size_t>(a->dimensions[d]);
  return n;
}

// codes (uint8) and absmax (float32, one per block) of x (float32), block by block.
void quantize_blockwise(py::handle x, py::handle codes, py::handle absmax, bool nonnegative,
                        py::handle isa) {
  const auto* xa = exact_array(x, npy::NPY_FLOAT_, "x", false);
  const auto* qa = exact_array(codes, npy::NPY_UBYTE_, "codes", true);
  const auto* ma = exact_array(absmax, npy::NPY_FLOAT_, "absmax", true);
  const std::size_t n = size_of(xa);
  if (size_of(qa) != n || size_of(ma) != q8_blocks(n)) {
    throw py::value_error("codes must have x's " + std::to_string(n) + " elements and absmax " +
                          std::to_string(q8_blocks(n)) + " (one per block of " +
                          std::to_string(Q8_BLOCK) + ")");
  }
  const StagingKernels& k = *table_for(isa).staging;
  const auto* xp = reinterpret_cast<const float*>(xa->data);
  auto* qp = reinterpret_cast<std::uint8_t*>(qa->data);
  auto* mp = reinterpret_cast<float*>(ma->data);
  auto blocks = [&](std::size_t lo, std::size_t hi) {
    for (std::size_t b = lo; b < hi; ++b) {
      const std::size_t at = b * Q8_BLOCK, len = std::min(Q8_BLOCK, n - at);
      mp[b] = k.quantize(xp + at, nonnegative, qp + at, len);
    }
  };
  py::gil_scoped_release nogil;
  parallel_for(q8_blocks(n), Q8_BLOCK * 4, blocks);
}

void dequantize_blockwise(py::handle codes, py::handle absmax, py::handle out, bool nonnegative,
                          py::handle isa) {
  const auto* qa = exact_array(codes, npy::NPY_UBYTE_, "codes", false);
  const auto* ma = exact_array(absmax, npy::NPY_FLOAT_, "absmax", false);
  const auto* oa = exact_array(out, npy::NPY_FLOAT_, "out", true);
  const std::size_t n = size_of(qa);
  if (size_of(oa) != n || size_of(ma) != q8_blocks(n)) {
    throw py::value_error("out must have the codes' " + std::to_string(n) +
                          " elements and absmax " + std::to_string(q8_blocks(n)));
  }
  const StagingKernels& k = *table_for(isa).staging;
  const auto* qp = reinterpret_cast<const std::uint8_t*>(qa->data);
  const auto* mp = reinterpret_cast<const float*>(ma->data);
  auto* op = reinterpret_cast<float*>(oa->data);
  auto blocks = [&](std::size_t lo, std::size_t hi) {
    for (std::size_t b = lo; b < hi; ++b) {
      const std::size_t at = b * Q8_BLOCK, len = std::min(Q8_BLOCK, n - at);
      k.dequantize(qp + at, mp[b], nonnegative, op + at, len);
    }
  };
  py::gil_scoped_release nogil;
  parallel_for(q8_blocks(n), Q8_BLOCK, blocks);
}

py::array_t<float> dynamic_map(bool nonnegative) {
  py::array_t<float> out(256);
  const float* code = nonnegative ? kUnsignedMap.code : kSignedMap.code;
  std::copy(code, code + 256, out.mutable_data());
  return out;
}

// 16-bit conversions of one ISA build (tests): x (float32) into out (bfloat16 or float16, by its
// dtype) rounded to nearest even, or stochastically with the noise of (key, first + i); and back.
DType half_type(const py::detail::PyArray_Proxy* a) {
  DType t = DType::f32;
  if (!dtype_of(py::detail::array_descriptor_proxy(a->descr)->type_num, &t)) return DType::f32;
  return t == DType::bf16 || t == DType::f16 ? t : DType::f32;
}

void round_to(py::handle x, py::handle out, py::handle key, std::size_t first, py::handle isa) {
  const auto* xa = exact_array(x, npy::NPY_FLOAT_, "x", false);
  if (!py::isinstance<py::array>(out)) throw py::type_error("out must be a NumPy array");
  const auto* oa = py::detail::array_proxy(out.ptr());
  const DType type = half_type(oa);
  if (type == DType::f32 || !(oa->flags & npy::NPY_ARRAY_C_CONTIGUOUS_) ||
      size_of(oa) != size_of(xa)) {
    throw py::type_error("out must be a C-contiguous bfloat16 or float16 array like x");
  }
  const StagingKernels& k = *table_for(isa).staging;
  if (key.is_none()) {
    k.narrow(type, reinterpret_cast<const float*>(xa->data), oa->data, size_of(xa));
  } else {
    k.narrow_stochastic(type, reinterpret_cast<const float*>(xa->data), oa->data, size_of(xa),
                        key.cast<std::uint32_t>(), first);
  }
}

void widen_from(py::handle x, py::handle out, py::handle isa) {
  const auto* oa = exact_array(out, npy::NPY_FLOAT_, "out", true);
  if (!py::isinstance<py::array>(x)) throw py::type_error("x must be a NumPy array");
  const auto* xa = py::detail::array_proxy(x.ptr());
  const DType type = half_type(xa);
  if (type == DType::f32 || !(xa->flags & npy::NPY_ARRAY_C_CONTIGUOUS_) ||
      size_of(oa) != size_of(xa)) {
    throw py::type_error("x must be a C-contiguous bfloat16 or float16 array like out");
  }
  table_for(isa).staging->widen(type, xa->data, reinterpret_cast<float*>(oa->data), size_of(xa));
}

}  // namespace

void define_lowbits(py::module_& m, py::module_& testing) {
  m.def(
      "set_bfloat16_dtype",
      [](py::handle dtype) {
        if (dtype.is_none()) return set_bfloat16_type(-1);
        if (!py::isinstance<py::dtype>(dtype)) {
          throw py::type_error("set_bfloat16_dtype takes ml_dtypes.bfloat16's NumPy dtype");
        }
        const py::dtype d = py::reinterpret_borrow<py::dtype>(dtype);
        if (d.itemsize() != 2 || d.num() < 256) {  // a user-defined NumPy type of 2 bytes
          throw py::type_error("set_bfloat16_dtype takes ml_dtypes.bfloat16's NumPy dtype");
        }
        set_bfloat16_type(d.num());
      },
      py::arg("dtype"),
      "Registers ml_dtypes' bfloat16 (its NumPy dtype) as the type of bfloat16 arrays; optkern "
      "does so on import when ml_dtypes is installed.");
  m.def("quantize_blockwise", &quantize_blockwise, py::arg("x"), py::arg("codes"),
        py::arg("absmax"), py::kw_only(), py::arg("nonnegative"), py::arg("isa") = py::none(),
        "codes, absmax = the q8 form of float32 x: per block of 256 elements its absmax and each "
        "element's nearest code of bitsandbytes' dynamic map (unsigned where nonnegative).");
  m.def("dequantize_blockwise", &dequantize_blockwise, py::arg("codes"), py::arg("absmax"),
        py::arg("out"), py::kw_only(), py::arg("nonnegative"), py::arg("isa") = py::none(),
        "out = code[codes] * absmax of the codes' block.");
  m.def("dynamic_map", &dynamic_map, py::arg("nonnegative"),
        "The 256 codes of bitsandbytes' dynamic map (signed, or unsigned where nonnegative).");
  testing.def("round_to", &round_to, py::arg("x"), py::arg("out"), py::arg("key") = py::none(),
              py::arg("first") = 0, py::arg("isa") = py::none());
  testing.def("widen_from", &widen_from, py::arg("x"), py::arg("out"), py::arg("isa") = py::none());
}

}  // namespace optkern
