// The conversions of the staged entries (kernels/kernel.hpp declares them; kernels/rule.cpp's
// staged entries call them on one block at a time): 16-bit and float64 operands widened into
// float32 and narrowed back, with round-to-nearest-even or stochastic rounding, and the q8
// states quantised and dequantised. Compiled once per ISA, like the rules' kernels; every loop is
// made of integer operations and exactly rounded float operations, so every ISA build gives the
// same bits.
#include "dynamic_map.hpp"
#include "kernels/kernel.hpp"

namespace optkern {
namespace OPTKERN_ISA_NS {
namespace {

// -- 16-bit types ---------------------------------------------------------------------------------

template <class H, float (*kWiden)(std::uint16_t)>
OK_LOOP void widen_loop(const H* OK_RESTRICT x, float* OK_RESTRICT out, size_t n) {
  OK_SIMD
  for (size_t i = 0; i < n; ++i) out[i] = kWiden(x[i].bits);
}

OK_LOOP void widen_f64(const double* OK_RESTRICT x, float* OK_RESTRICT out, size_t n) {
  OK_SIMD
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(x[i]);
}

template <class H, std::uint16_t (*kNarrow)(float)>
OK_LOOP void narrow_loop(const float* OK_RESTRICT x, H* OK_RESTRICT out, size_t n) {
  OK_SIMD
  for (size_t i = 0; i < n; ++i) out[i].bits = kNarrow(x[i]);
}

// The noise of element i under a key: 32 bits, from Chris Wellons' lowbias32 integer hash of the
// index offset by the key (a counter-based generator: any element's noise is computed alone).
std::uint32_t noise_bits(std::uint32_t key, std::uint32_t i) {
  std::uint32_t x = i * 0x9e3779b9u + key;
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// Stochastic rounding to bfloat16 (torchao's bf16_stochastic_round): adding 16 random bits to the
// 16 that are dropped, then dropping them, rounds the magnitude up with probability (its
// distance from the value below) / (the spacing there). NaN as in float_to_bf16.
std::uint16_t bf16_stochastic(float x, std::uint32_t noise) {
  const std::uint32_t u = bits_of(x);
  const std::uint32_t rounded = (u + (noise & 0xffffu)) >> 16;
  const std::uint32_t nan = ((u >> 16) & 0x8000u) | 0x7fc0u;
  return static_cast<std::uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

// Stochastic rounding to float16. Normal halves: as bf16_stochastic, with 13 dropped bits.
// Subnormal halves (below 2^-14): count in units of 2^-24 (exact), round the count up when 24
// random bits, as a fraction, fall below its fractional part. From 65504 up, the value rounds
// towards Inf as towards any next value; from 65536 up it is Inf.
std::uint16_t f16_stochastic(float x, std::uint32_t noise) {
  const std::uint32_t u = bits_of(x);
  const std::uint32_t sign = (u >> 16) & 0x8000u;
  const std::uint32_t a = u & 0x7fffffffu;
  const std::uint32_t normal = (a - ((127u - 15u) << 23) + (noise & 0x1fffu)) >> 13;
  // |x| / 2^-24: below 1024 where it is used; capped at 2048 (2^-13 as bits) to stay in range
  // for the conversion (no NaN)
  const std::uint32_t capped = a < 0x39000000u ? a : 0x39000000u;
  const float units = float_of(capped) * 16777216.0f;
  const std::int32_t whole = static_cast<std::int32_t>(units);
  const float fraction = units - static_cast<float>(whole);
  const float uniform =
      static_cast<float>(static_cast<std::int32_t>(noise >> 8)) * 5.9604644775390625e-8f;
  const std::uint32_t subnormal =
      static_cast<std::uint32_t>(whole) + static_cast<std::uint32_t>(uniform < fraction);
  // Selected by masks, as kernel.hpp's float_to_f16 (nested selects kept the loop scalar).
  const std::uint32_t big = 0x7c00u | (0x200u & (0u - static_cast<std::uint32_t>(a > 0x7f800000u)));
  const std::uint32_t over = 0u - static_cast<std::uint32_t>(a >= 0x47800000u);
  const std::uint32_t norm = 0u - static_cast<std::uint32_t>(a >= 0x38800000u);
  const std::uint32_t r = (big & over) | (normal & norm & ~over) | (subnormal & ~norm);
  return static_cast<std::uint16_t>(r | sign);
}

template <class H, std::uint16_t (*kRound)(float, std::uint32_t)>
OK_LOOP void stochastic_loop(const float* OK_RESTRICT x, H* OK_RESTRICT out, size_t n,
                             std::uint32_t key, std::uint32_t first) {
  OK_SIMD
  for (size_t i = 0; i < n; ++i) {
    out[i].bits = kRound(x[i], noise_bits(key, first + static_cast<std::uint32_t>(i)));
  }
}

// -- q8
// ---------------------------------------------------------------------------------------------

// The block's absmax: the largest |x| (NaN when any x is NaN: as unsigned integers the bits of
// |x| order NaN above Inf above every finite value).
OK_LOOP float absmax_of(const float* OK_RESTRICT x, size_t n) {
  std::uint32_t top[LANES] = {};
  size_t i = 0;
  for (; i + LANES <= n; i += LANES) {
    OK_SIMD
    for (size_t j = 0; j < LANES; ++j) {
      const std::uint32_t a = bits_of(x[i + j]) & 0x7fffffffu;
      top[j] = a > top[j] ? a : top[j];
    }
  }
  std::uint32_t best = 0;
  for (; i < n; ++i) {
    const std::uint32_t a = bits_of(x[i]) & 0x7fffffffu;
    best = a > best ? a : best;
  }
  for (size_t j = 0; j < LANES; ++j) best = top[j] > best ? top[j] : best;
  return float_of(best);
}

// The index of the nearest code, for a magnitude a = |x| / absmax given by its bits (<=
// kBelowOneBits): dynamic_map.hpp's bucket and one compare.
template <class Map>
std::uint32_t half_index(const Map& m, std::uint32_t a) {
  const std::int32_t b =
      static_cast<std::int32_t>(a >> Map::kLowBits) - static_cast<std::int32_t>(Map::kFirstBucket);
  const std::uint32_t e = static_cast<std::uint32_t>(m.bucket[b < 0 ? 0 : b]);
  return (e >> 24) + ((a & Map::kLowMask) >= (e & 0xffffffu) ? 1u : 0u);
}

// Signed map: |x| is placed among the codes of [0, 1] (code[127..255]), and a negative x takes the
// mirrored code. A negative x whose nearest code is 0 takes the least negative code instead, as
// bitsandbytes' 8-bit optimizers keep the sign of their first state.
OK_LOOP void quantize_signed(const float* OK_RESTRICT x, float inv, std::uint8_t* OK_RESTRICT q,
                             size_t n) {
  const SignedMap& m = kSignedMap;
  OK_SIMD
  for (size_t i = 0; i < n; ++i) {
    const std::uint32_t u = bits_of(x[i]);
    std::uint32_t a = bits_of(float_of(u & 0x7fffffffu) * inv);
    a = a < kBelowOneBits ? a : kBelowOneBits;  // 1 + an ulp, and NaN
    const std::int32_t r = static_cast<std::int32_t>(half_index(m, a));
    const std::int32_t down = 127 - (r > 1 ? r : 1);
    const std::int32_t code = (u >> 31) != 0 ? (down > 0 ? down : 0) : 127 + r;
    q[i] = static_cast<std::uint8_t>(code);
  }
}

// Unsigned map: a negative x (which the states that take it never hold) is quantised as 0.
OK_LOOP void quantize_unsigned(const float* OK_RESTRICT x, float inv, std::uint8_t* OK_RESTRICT q,
                               size_t n) {
  const UnsignedMap& m = kUnsignedMap;
  OK_SIMD
  for (size_t i = 0; i < n; ++i) {
    const float v = x[i] > 0.0f ? x[i] : 0.0f;
    std::uint32_t a = bits_of(v * inv);
    a = a < kBelowOneBits ? a : kBelowOneBits;
    q[i] = static_cast<std::uint8_t>(half_index(m, a));
  }
}

// code[q] * absmax. The map is named, not passed as a pointer: from a table of known size GCC
// gathers, from a pointer it builds each vector of scalar loads (a gather of 64-bit offsets
// being its only other choice), which made this loop 40% of an int8 Adam step on AVX-512.
template <class Map>
OK_LOOP void dequantize_loop(const Map& m, const std::uint8_t* OK_RESTRICT q, float absmax,
                             float* OK_RESTRICT out, size_t n) {
  OK_SIMD
  for (size_t i = 0; i < n; ++i) out[i] = m.code[q[i]] * absmax;
}

}  // namespace

void widen(DType type, const void* x, float* out, size_t n) {
  switch (type) {
    case DType::bf16:
      return widen_loop<bfloat16, bf16_to_float>(static_cast<const bfloat16*>(x), out, n);
    case DType::f16:
      return widen_loop<float16, f16_to_float>(static_cast<const float16*>(x), out, n);
    case DType::f64:
      return widen_f64(static_cast<const double*>(x), out, n);
    default:
      return;  // the driver never stages other types
  }
}

void narrow(DType type, const float* x, void* out, size_t n) {
  if (type == DType::bf16) {
    narrow_loop<bfloat16, float_to_bf16>(x, static_cast<bfloat16*>(out), n);
  } else if (type == DType::f16) {
    narrow_loop<float16, float_to_f16>(x, static_cast<float16*>(out), n);
  }
}

void narrow_stochastic(DType type, const float* x, void* out, size_t n, std::uint32_t key,
                       size_t first) {
  // The counter is the element index: its high half (a tensor beyond 2^32 elements) joins the
  // key. A block never crosses a multiple of 2^32, since blocks start at multiples of Q8_BLOCK.
  key ^=
      noise_bits(0x85ebca6bu, static_cast<std::uint32_t>(static_cast<std::uint64_t>(first) >> 32));
  const auto low = static_cast<std::uint32_t>(first);
  if (type == DType::bf16) {
    stochastic_loop<bfloat16, bf16_stochastic>(x, static_cast<bfloat16*>(out), n, key, low);
  } else if (type == DType::f16) {
    stochastic_loop<float16, f16_stochastic>(x, static_cast<float16*>(out), n, key, low);
  }
}

namespace {

// The codes of x in a block of the given absmax (absmax_of(x)).
void quantize_with(const float* x, float absmax, bool nonnegative, std::uint8_t* out, size_t n) {
  // 1 / absmax rounded once: each element then costs a multiplication, not a division (within
  // an ulp of bitsandbytes' x / absmax). An all-zero block keeps absmax 0 (codes of 0); a NaN or
  // Inf absmax makes the block dequantise to NaN or Inf.
  const float inv = absmax > 0.0f ? 1.0f / absmax : 0.0f;
  if (nonnegative) {
    quantize_unsigned(x, inv, out, n);
  } else {
    quantize_signed(x, inv, out, n);
  }
}

}  // namespace

float quantize(const float* x, bool nonnegative, std::uint8_t* out, size_t n) {
  const float absmax = absmax_of(x, n);
  quantize_with(x, absmax, nonnegative, out, n);
  return absmax;
}

void dequantize(const std::uint8_t* q, float absmax, bool nonnegative, float* out, size_t n) {
  if (nonnegative) {
    dequantize_loop(kUnsignedMap, q, absmax, out, n);
  } else {
    dequantize_loop(kSignedMap, q, absmax, out, n);
  }
}

namespace {

size_t element_size(DType type) {
  return type == DType::f64 ? 8 : type == DType::q8 ? 1 : (type == DType::f32 ? 4 : 2);
}
char* at(void* p, DType type, size_t b) { return static_cast<char*>(p) + b * element_size(type); }
const char* at(const void* p, DType type, size_t b) { return at(const_cast<void*>(p), type, b); }

}  // namespace

StagedBlock stage_in(const Operands& op, size_t b, size_t n, Stage& buf, unsigned nonnegative) {
  StagedBlock out{};
  const optkern::Types& t = op.types;
  if (t.write == ParamWrite::master) {
    out.param = op.master + b;
  } else if (t.param == DType::f32) {
    out.param = static_cast<float*>(op.param) + b;
  } else {
    widen(t.param, at(op.param, t.param, b), buf.param, n);
    out.param = buf.param;
  }
  if (t.grad == DType::f32) {
    out.grad = static_cast<const float*>(op.grad) + b;
  } else {
    widen(t.grad, at(op.grad, t.grad, b), buf.grad, n);
    out.grad = buf.grad;
  }
  for (size_t k = 0; k < MAX_STATES; ++k) {
    if (op.state[k] == nullptr) continue;
    if (t.state == DType::f32) {
      out.state[k] = static_cast<float*>(op.state[k]) + b;
      continue;
    }
    out.state[k] = buf.state[k];
    if (t.state == DType::q8) {
      dequantize(static_cast<const std::uint8_t*>(op.state[k]) + b, op.absmax[k][b / Q8_BLOCK],
                 (nonnegative >> k) & 1u, buf.state[k], n);
    } else {
      widen(t.state, at(op.state[k], t.state, b), buf.state[k], n);
    }
  }
  return out;
}

void prefetch_block(const Operands& op, size_t b) {
  const optkern::Types& t = op.types;
  auto ask = [b](const void* p, DType type) {
    prefetch_lines(at(p, type, b), Q8_BLOCK * element_size(type));
  };
  ask(op.param, t.param);
  ask(op.grad, t.grad);
  for (size_t k = 0; k < MAX_STATES; ++k) {
    if (op.state[k] != nullptr) ask(op.state[k], t.state);
  }
  if (op.master != nullptr) prefetch_lines(op.master + b, Q8_BLOCK);
}

void stage_out(const Operands& op, size_t b, size_t n, const StagedBlock& block,
               unsigned nonnegative, bool param_written, bool states_written) {
  const optkern::Types& t = op.types;
  if (param_written && t.param != DType::f32) {
    void* to = at(op.param, t.param, b);
    if (t.write == ParamWrite::stochastic) {
      narrow_stochastic(t.param, block.param, to, n, op.noise, op.first + b);
    } else {
      narrow(t.param, block.param, to, n);  // from the stack, or from the master copy
    }
  }
  if (!states_written || t.state == DType::f32) return;
  if (t.state != DType::q8) {
    for (size_t k = 0; k < MAX_STATES; ++k) {
      if (op.state[k] != nullptr) narrow(t.state, block.state[k], at(op.state[k], t.state, b), n);
    }
    return;
  }
  // Every state's absmax first, then every state's codes: each quantisation waits for its
  // block's absmax (a reduction, then a division), and this order gives the core the next
  // state's independent work to overlap with that wait.
  float absmax[MAX_STATES] = {};
  for (size_t k = 0; k < MAX_STATES; ++k) {
    if (op.state[k] != nullptr) absmax[k] = absmax_of(block.state[k], n);
  }
  for (size_t k = 0; k < MAX_STATES; ++k) {
    if (op.state[k] == nullptr) continue;
    quantize_with(block.state[k], absmax[k], (nonnegative >> k) & 1u,
                  static_cast<std::uint8_t*>(op.state[k]) + b, n);
    op.absmax[k][b / Q8_BLOCK] = absmax[k];
  }
}

// The bindings' own use of the conversions (kernel_api.hpp's StagingKernels).
extern const StagingKernels staging_kernels = {&quantize, &dequantize, &widen, &narrow,
                                               &narrow_stochastic};

}  // namespace OPTKERN_ISA_NS
}  // namespace optkern
