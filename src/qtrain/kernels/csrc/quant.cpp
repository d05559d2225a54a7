// Fused CPU kernels of qtrain's `cpu_fused` backend, registered as `qtrain::*` operators.
//
// Every quantizer and element-wise kernel computes what qtrain/kernels/reference.py computes,
// with the same float operations in the same order, so results are bit-identical to the
// reference for nearest and for stochastic rounding with the same seed. That is why the build
// uses -ffp-contract=off: a fused multiply-add would round once where the reference rounds
// twice. The exception is Range BN's reductions (range_bn_stats' sums, range_bn_backward's):
// they sum in their own fixed order, within float32 summation error of the reference's float64.
//
// Layout: the quantizer's canonical view, a contiguous float32 (O, C, I) tensor with one scale
// and zero point per C. The flat index range is cut into one contiguous chunk per thread (a
// static schedule) and each chunk into runs that share a scale; the inner loops are plain
// element-wise loops that GCC vectorises (AVX2 / AVX-512 under -march=native). Stochastic
// rounding draws its uniform from a hash of (seed, linear index), so no split changes a result.
// The layer kernels (Range BN, the ReLU masks, the 2×2 max pool) also take channels-last
// tensors (C innermost), walking memory in order, and return their results in that layout.
// qtrain.lowp's GEMM-operand quantizer (quantize_rows_int8) takes an (R, K) matrix instead,
// contiguous or the transpose of a contiguous one, and writes row-major int8 levels (or the
// same levels as float32, for the emulated product). Its convolutions' im2col and col2im
// (im2col_nhwc, col2im_nhwc) move channels-last pixels, C floats at a time.

#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/zeros.h>
#include <c10/core/Allocator.h>
#include <c10/util/accumulate.h>
#include <omp.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <iterator>
#include <limits>
#include <mutex>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using at::Tensor;

// ---- counter-based RNG (reference.seed_keys / uniform_bits) ---------------------------------

// lowbias32 finaliser: a bijection on 32 bits whose multiply/xor/shift steps vectorise.
inline uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x846CA68Bu;
  return h ^ (h >> 16);
}

struct Keys {
  uint32_t key0 = 0;
  uint32_t key1 = 0;
};

Keys seed_keys(int64_t seed) {
  const auto bits = static_cast<uint64_t>(seed);  // the seed's value mod 2^64
  Keys keys;
  keys.key0 = mix32(static_cast<uint32_t>(bits) ^ 0x9E3779B9u);
  keys.key1 = mix32(static_cast<uint32_t>(bits >> 32) ^ keys.key0);
  return keys;
}

// Stochastic rounding of v at linear index i: floor(v) + [u < v - floor(v)] with
// u = (mix32(mix32(low) ^ high) >> 8) * 2^-24, low = lo32(i) ^ key0, high = hi32(i) + key1.
inline float uniform_at(uint32_t low, uint32_t high) {
  const uint32_t h = mix32(mix32(low) ^ high);
  return static_cast<float>(static_cast<int32_t>(h >> 8)) * 0x1p-24f;
}

inline float round_up_if(float v, float u) {
  const float down = std::floor(v);
  return down + (u < v - down ? 1.0f : 0.0f);
}

inline float round_stochastic(float v, uint32_t low, uint32_t high) {
  return round_up_if(v, uniform_at(low, high));
}

// ---- work splitting --------------------------------------------------------------------------

// Below this many elements per thread, waking a second thread costs more than it saves.
constexpr int64_t kMinPerThread = 1 << 15;
// Chunk boundaries fall on whole 64-byte lines of 1-byte outputs (and so of 4-byte ones too):
// threads never write the same cache line.
constexpr int64_t kChunkAlign = 64;

int plan_chunks(int64_t numel) {
  const int64_t wanted = std::max<int64_t>(1, numel / kMinPerThread);
  return static_cast<int>(std::min<int64_t>(wanted, at::get_num_threads()));
}

// Calls body(begin, end, chunk) for `chunks` contiguous pieces of [0, numel); one piece per
// OpenMP thread when the runtime grants them, several per thread otherwise (nested regions).
template <class Body>
void parallel_chunks(int64_t numel, int chunks, const Body& body) {
  const int64_t per_chunk = (numel + chunks - 1) / chunks;
  const int64_t step = (per_chunk + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  auto run = [&](int chunk) {
    const int64_t begin = std::min(numel, chunk * step);
    const int64_t end = std::min(numel, begin + step);
    if (begin < end) body(begin, end, chunk);
  };
  if (chunks == 1) {
    run(0);
    return;
  }
#pragma omp parallel num_threads(chunks)
  {
    for (int chunk = omp_get_thread_num(); chunk < chunks; chunk += omp_get_num_threads()) {
      run(chunk);
    }
  }
}

// Calls run(begin, end, channel) for the pieces of [begin, end) that share a channel layout
// and do not cross a multiple of 2^32 (the RNG's high index word is constant over a piece).
// inner > 1: a piece lies in one row (o, c) of the (O, C, I) view and `channel` is its c.
// inner == 1 (one value per scale): a piece lies in one o and holds channels channel,
// channel + 1, ... in order, so that kernels read their parameters as contiguous vectors.
template <class Run>
void for_each_run(int64_t begin, int64_t end, int64_t channels, int64_t inner, const Run& run) {
  const int64_t span = inner == 1 ? channels : inner;
  while (begin < end) {
    const int64_t row = begin / span;
    const int64_t word_end = ((begin >> 32) + 1) << 32;
    const int64_t stop = std::min({end, (row + 1) * span, word_end});
    run(begin, stop, inner == 1 ? begin - row * span : row % channels);
    begin = stop;
  }
}

// ---- output memory -------------------------------------------------------------------------

// Large outputs: glibc serves them from fresh mmap()s (always from 32 MiB, often from less),
// whose first touch faults and zeroes every page, which on the benchmark machine costs as much
// as the kernel itself. Outputs from 4 MiB come from this allocator instead: 2 MiB-aligned
// blocks backed by transparent huge pages (one fault per 2 MiB), and freed blocks are kept, up
// to kCachedBytes with the oldest dropped first, for the next output of the same size, as a
// training loop asks for every step.
constexpr size_t kHugePage = size_t{1} << 21;
constexpr size_t kCachedFromBytes = size_t{4} << 20;
constexpr size_t kCachedBytes = size_t{256} << 20;

class OutputAllocator final : public c10::Allocator {
 public:
  // Never destroyed: outputs may be freed during static destruction.
  static OutputAllocator& instance() {
    static auto* allocator = new OutputAllocator();
    return *allocator;
  }

  c10::DataPtr allocate(size_t bytes) override {
    const c10::Device cpu(c10::DeviceType::CPU);
    if (bytes == 0) return {nullptr, cpu};
    const size_t size = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = take(size);
    return {data, new Block{data, size}, &release, cpu};
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* data;
    size_t size;
  };

  static void release(void* context) {
    const auto* block = static_cast<Block*>(context);
    instance().keep(*block);
    delete block;
  }

  void* take(size_t size) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = cached_.rbegin(); it != cached_.rend(); ++it) {
        if (it->size == size) {
          void* data = it->data;
          cached_bytes_ -= size;
          cached_.erase(std::next(it).base());
          return data;
        }
      }
    }
    void* data = nullptr;
    TORCH_CHECK(posix_memalign(&data, kHugePage, size) == 0, "qtrain: out of memory (", size,
                " bytes)");
#ifdef MADV_HUGEPAGE
    madvise(data, size, MADV_HUGEPAGE);  // a hint: failure changes nothing
#endif
    return data;
  }

  void keep(const Block& block) {
    const std::lock_guard<std::mutex> lock(mutex_);
    cached_.push_back(block);
    cached_bytes_ += block.size;
    while (cached_bytes_ > kCachedBytes) {
      std::free(cached_.front().data);
      cached_bytes_ -= cached_.front().size;
      cached_.pop_front();
    }
  }

  std::mutex mutex_;
  std::deque<Block> cached_;  // oldest first
  size_t cached_bytes_ = 0;
};

Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype) {
  const size_t bytes = c10::multiply_integers(sizes) * c10::elementSize(dtype);
  if (bytes < kCachedFromBytes) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  return at::detail::empty_generic(sizes, &OutputAllocator::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

// An output with x's sizes and strides (x non-overlapping and dense, as every torch memory
// format is), so that a kernel may write it in x's memory order.
Tensor empty_output_like(const Tensor& x, at::ScalarType dtype) {
  const size_t bytes = x.numel() * c10::elementSize(dtype);
  if (bytes < kCachedFromBytes) {
    return at::empty_strided(x.sizes(), x.strides(), at::TensorOptions().dtype(dtype));
  }
  return at::detail::empty_strided_generic(x.sizes(), x.strides(), &OutputAllocator::instance(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), dtype);
}

// The two layouts the layer kernels (Range BN, the 2×2 pool) take: contiguous, or
// channels-last (C innermost, the other dims in order: a channels_last (B, C, H, W) tensor or
// its (B, C, H·W) view). A tensor that is both (C or the rest is 1) counts as contiguous: the
// memory is the same. Returns whether x is channels-last; any other layout is an error.
bool channels_last_layout(const Tensor& x, const char* what) {
  if (x.is_contiguous()) return false;
  TORCH_CHECK(x.dim() >= 3 && x.movedim(1, -1).is_contiguous(), what,
              ": expected a contiguous or channels-last tensor (C innermost), got strides ",
              x.strides());
  return true;
}

// Range BN's batches: a (B, C, S) float32 view; channels-last, it is an (M = B·S, C) matrix
// whose row p is each channel's sample-major position p. Returns whether it is channels-last.
bool check_batch_view(const Tensor& x3, const char* what) {
  TORCH_CHECK(x3.device().is_cpu() && x3.scalar_type() == at::kFloat && x3.dim() == 3, what,
              ": expected a float32 CPU (B, C, S) view");
  return channels_last_layout(x3, what);
}

void check_view(const Tensor& x3, const char* what) {
  TORCH_CHECK(x3.device().is_cpu(), what, ": expected a CPU tensor");
  TORCH_CHECK(x3.scalar_type() == at::kFloat, what, ": expected float32, got ", x3.scalar_type());
  TORCH_CHECK(x3.dim() == 3, what, ": expected an (O, C, I) view, got ", x3.dim(), " dims");
  TORCH_CHECK(x3.is_contiguous(), what, ": expected a contiguous (O, C, I) view");
}

void check_params(const Tensor& x3, const Tensor& scale, const Tensor& zero_point,
                  const char* what) {
  for (const Tensor* param : {&scale, &zero_point}) {
    TORCH_CHECK(param->device().is_cpu() && param->scalar_type() == at::kFloat &&
                    param->is_contiguous() && param->numel() == x3.size(1),
                what, ": scale and zero_point must be contiguous float32 CPU tensors of ",
                x3.size(1), " values");
  }
}

// ---- min / max per channel ------------------------------------------------------------------

// Per-channel reduction of an (O, C, I) view: each chunk reduces into its own row of partials
// (min/max are exact, so the combination order cannot change the value), then rows combine.
// Everything runs on integer images of the floats, because GCC vectorises integer min/max but
// not float min/max (whose NaN and signed-zero rules forbid reordering):
// - |x|'s bit pattern: for non-negative floats integer order is float order, and every NaN
//   sorts above inf, so its max is max|x| and also tells whether the channel holds a NaN;
// - order_key(x): a signed integer in float order for all non-NaN x (-0 just below +0).
inline uint32_t bits_of(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
}

inline float float_of(uint32_t bits) {
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

inline uint32_t abs_bits_of(float v) { return bits_of(v) & 0x7FFFFFFFu; }

// Negative floats order backwards as integers: flip their magnitude bits. An involution.
inline int32_t order_key(uint32_t bits) {
  const auto key = static_cast<int32_t>(bits);
  return key ^ ((key >> 31) & 0x7FFFFFFF);
}

inline float from_order_key(int32_t key) {
  return float_of(static_cast<uint32_t>(order_key(static_cast<uint32_t>(key))));
}

constexpr uint32_t kInfBits = 0x7F800000u;

// Running extremes per channel, as arrays (not structs) so that column updates vectorise.
struct Extremes {
  explicit Extremes(size_t size)
      : low(size, std::numeric_limits<int32_t>::max()),
        high(size, std::numeric_limits<int32_t>::min()),
        abs_bits(size, 0) {}
  std::vector<int32_t> low;
  std::vector<int32_t> high;
  std::vector<uint32_t> abs_bits;
};

// Folds x[b, e) into one channel's extremes.
template <bool WantRange>
void reduce_run(const float* __restrict x, int64_t b, int64_t e, int32_t* __restrict low_out,
                int32_t* __restrict high_out, uint32_t* __restrict abs_out) {
  int32_t low = *low_out;
  int32_t high = *high_out;
  uint32_t abs_max = *abs_out;
#pragma omp simd reduction(min : low) reduction(max : high, abs_max)
  for (int64_t j = b; j < e; ++j) {
    const uint32_t bits = bits_of(x[j]);
    if constexpr (WantRange) {
      low = std::min(low, order_key(bits));
      high = std::max(high, order_key(bits));
    }
    abs_max = std::max(abs_max, bits & 0x7FFFFFFFu);
  }
  *low_out = low;
  *high_out = high;
  *abs_out = abs_max;
}

// Folds x[b + k] into channel k's extremes (inner == 1: one value per channel and row).
template <bool WantRange>
void reduce_columns(const float* __restrict x, int64_t b, int64_t e, int32_t* __restrict low,
                    int32_t* __restrict high, uint32_t* __restrict abs_bits) {
  // Values, not std::min on array elements: GCC does not vectorise loads through the
  // references std::min returns.
#pragma omp simd
  for (int64_t k = 0; k < e - b; ++k) {
    const uint32_t bits = bits_of(x[b + k]);
    if constexpr (WantRange) {
      const int32_t key = order_key(bits);
      const int32_t low_k = low[k];
      const int32_t high_k = high[k];
      low[k] = key < low_k ? key : low_k;
      high[k] = key > high_k ? key : high_k;
    }
    const uint32_t magnitude = bits & 0x7FFFFFFFu;
    const uint32_t abs_k = abs_bits[k];
    abs_bits[k] = magnitude > abs_k ? magnitude : abs_k;
  }
}

template <bool WantRange>
Extremes reduce_channels(const Tensor& x3, const char* what) {
  check_view(x3, what);
  const int64_t channels = x3.size(1);
  const int64_t inner = x3.size(2);
  TORCH_CHECK_INDEX(channels == 0 || x3.size(0) * inner > 0, what,
                    ": expected non-empty channels, got a view of shape ", x3.sizes());
  const int chunks = plan_chunks(x3.numel());
  Extremes partial(static_cast<size_t>(chunks * channels));  // one row of channels per chunk
  const float* x = x3.data_ptr<float>();
  parallel_chunks(x3.numel(), chunks, [&](int64_t begin, int64_t end, int chunk) {
    const int64_t mine = chunk * channels;
    for_each_run(begin, end, channels, inner, [&](int64_t b, int64_t e, int64_t c) {
      int32_t* low = partial.low.data() + mine + c;
      int32_t* high = partial.high.data() + mine + c;
      uint32_t* abs_bits = partial.abs_bits.data() + mine + c;
      if (inner == 1) {
        reduce_columns<WantRange>(x, b, e, low, high, abs_bits);
      } else {
        reduce_run<WantRange>(x, b, e, low, high, abs_bits);
      }
    });
  });
  Extremes result(static_cast<size_t>(channels));
  for (int chunk = 0; chunk < chunks; ++chunk) {
    for (int64_t c = 0; c < channels; ++c) {
      const int64_t i = chunk * channels + c;
      result.low[c] = std::min(result.low[c], partial.low[i]);
      result.high[c] = std::max(result.high[c], partial.high[i]);
      result.abs_bits[c] = std::max(result.abs_bits[c], partial.abs_bits[i]);
    }
  }
  return result;
}

std::tuple<Tensor, Tensor> minmax(const Tensor& x3) {
  const Extremes result = reduce_channels<true>(x3, "qtrain::minmax");
  const auto channels = static_cast<int64_t>(result.low.size());
  Tensor low = at::empty({channels}, at::kFloat);
  Tensor high = at::empty({channels}, at::kFloat);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t c = 0; c < channels; ++c) {
    const bool has_nan = result.abs_bits[c] > kInfBits;
    low.data_ptr<float>()[c] = has_nan ? nan : from_order_key(result.low[c]);
    high.data_ptr<float>()[c] = has_nan ? nan : from_order_key(result.high[c]);
  }
  return {low, high};
}

Tensor absmax(const Tensor& x3) {
  const Extremes result = reduce_channels<false>(x3, "qtrain::absmax");
  const auto channels = static_cast<int64_t>(result.abs_bits.size());
  Tensor out = at::empty({channels}, at::kFloat);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t c = 0; c < channels; ++c) {
    out.data_ptr<float>()[c] = result.abs_bits[c] > kInfBits ? nan : float_of(result.abs_bits[c]);
  }
  return out;
}

// g where the byte mask is 0, +0 where it is set: the bit pattern ANDed with all ones or zero
// (vectorises; NaN and inf gradients are zeroed too, as threshold_backward does).
inline float masked_value(float g, uint8_t zeroed) {
  return float_of(bits_of(g) & (static_cast<uint32_t>(zeroed != 0) - 1u));
}

// Σg and Σg·(x − mean) over one row of n values (g read through a fused ReLU's mask when
// Masked), in float32 with a fixed order that no compiler or vector width changes: 16 lanes,
// element j into lane j mod 16, then the lanes added pairwise. So reading g through the mask
// gives bit for bit what reading masked_zero's output does.
template <bool Masked>
void row_sums(const float* __restrict g, const uint8_t* __restrict mask,
              const float* __restrict x, float mean, int64_t n, float& sum_g, float& sum_gx) {
  constexpr int64_t kLanes = 16;
  float lane_g[kLanes] = {};
  float lane_gx[kLanes] = {};
  const int64_t whole = n - n % kLanes;
  for (int64_t j = 0; j < whole; j += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      const float gv = Masked ? masked_value(g[j + l], mask[j + l]) : g[j + l];
      lane_g[l] += gv;
      lane_gx[l] += gv * (x[j + l] - mean);
    }
  }
  for (int64_t l = 0; l < n - whole; ++l) {
    const float gv = Masked ? masked_value(g[whole + l], mask[whole + l]) : g[whole + l];
    lane_g[l] += gv;
    lane_gx[l] += gv * (x[whole + l] - mean);
  }
  for (int64_t width = kLanes / 2; width >= 1; width /= 2) {
    for (int64_t l = 0; l < width; ++l) {
      lane_g[l] += lane_g[l + width];
      lane_gx[l] += lane_gx[l + width];
    }
  }
  sum_g = lane_g[0];
  sum_gx = lane_gx[0];
}

// Channels-last rows hold C values each: too few for a vector loop when C is small (a loop that
// also stores bytes may get a vector factor of 32 or 64, and a row of 16 then runs entirely in
// the scalar epilogue). The kernels walk spans of `reps` whole rows instead, at least
// kWideSpan values, with the per-channel vectors repeated reps times.
constexpr int64_t kWideSpan = 256;

int64_t rows_per_span(int64_t channels) {
  return std::max<int64_t>(1, kWideSpan / std::max<int64_t>(1, channels));
}

std::vector<float> repeated(const float* values, int64_t channels, int64_t reps) {
  std::vector<float> out(channels * reps);
  for (int64_t r = 0; r < reps; ++r) {
    std::copy(values, values + channels, out.data() + r * channels);
  }
  return out;
}

// Calls body(offset, n) for the spans of `reps` rows of `channels` values covering rows rows,
// split between threads.
template <class Body>
void for_each_span(int64_t rows, int64_t channels, int64_t reps, const Body& body) {
  const int64_t span = reps * channels;
  const int64_t spans = (rows + reps - 1) / reps;
  const int64_t total = rows * channels;
  at::parallel_for(0, spans, std::max<int64_t>(1, kMinPerThread / span), [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) body(k * span, std::min(span, total - k * span));
  });
}

// ---- Range BatchNorm -------------------------------------------------------------------------

// Range BN's training statistics of a contiguous float32 (B, C, HW) batch (the authors'
// chunking): each channel's B·HW values, laid out sample by sample, are cut into `chunks` runs
// of n = ⌊B·HW / K⌋ values (the last B·HW − K·n are in no chunk); a run may start or end inside
// a sample. One read of x, parallel over (chunk, channel) pairs: per pair the run's sum
// (double) and the first position in the run of its maximum and of its minimum
// (reference.range_bn_stats: torch.max/min over the same order), plus per channel the sum of
// the values in no chunk. +0 and -0 tie, as float comparison says. A run that holds a NaN has
// NaN as both extremes, at its first NaN. A channels-last batch: range_bn_stats_rows.
struct RowExtremes {
  int32_t high;
  int32_t low;
  uint32_t abs_bits;
  double sum;
};

// Order key of v + 0 (-0 becomes +0, so the two zeros tie).
inline int32_t tie_zero_key(float v) { return order_key(bits_of(v + 0.0f)); }

RowExtremes row_extremes(const float* __restrict x, int64_t n) {
  if (n < 16) {  // short rows (small feature maps): a vector loop's set-up costs more
    RowExtremes r{std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max(), 0,
                  0.0};
    for (int64_t j = 0; j < n; ++j) {
      const int32_t key = tie_zero_key(x[j]);
      r.high = key > r.high ? key : r.high;
      r.low = key < r.low ? key : r.low;
      r.abs_bits = std::max(r.abs_bits, abs_bits_of(x[j]));
      r.sum += static_cast<double>(x[j]);
    }
    return r;
  }
  int32_t high = std::numeric_limits<int32_t>::min();
  int32_t low = std::numeric_limits<int32_t>::max();
  uint32_t abs_max = 0;
  double sum = 0.0;
#pragma omp simd reduction(min : low) reduction(max : high, abs_max) reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const int32_t key = tie_zero_key(x[j]);
    high = std::max(high, key);
    low = std::min(low, key);
    abs_max = std::max(abs_max, abs_bits_of(x[j]));
    sum += static_cast<double>(x[j]);
  }
  return {high, low, abs_max, sum};
}

// First j in [0, n) with x[j] matching: NaN when `nan`, else the order key `key`.
int64_t first_position(const float* x, int64_t n, int32_t key, bool nan) {
  for (int64_t j = 0; j < n; ++j) {
    if (nan ? std::isnan(x[j]) : tie_zero_key(x[j]) == key) return j;
  }
  return 0;  // unreachable: the key came from this row
}

// Where a run [b, e) of one channel's sample-major positions lies: the (sample, first column,
// end column) pieces, in order.
template <class Piece>
void for_each_piece(int64_t b, int64_t e, int64_t spatial, const Piece& piece) {
  while (b < e) {
    const int64_t sample = b / spatial;
    const int64_t column = b - sample * spatial;
    const int64_t stop = std::min(e - sample * spatial, spatial);
    piece(sample, column, stop);
    b = sample * spatial + stop;
  }
}

// The statistics of a channels-last batch, an (M, C) matrix whose row p is each channel's
// position p: a run is a block of n whole rows. Per run, one pass over its rows keeps each
// channel's extremes (order keys), their first rows, its first NaN row and its sum, vectorised
// across the channels; the runs are shared out between threads.
void range_bn_stats_rows(const float* __restrict x, int64_t positions, int64_t channels,
                         int64_t chunks, double* sum_out, double* rest_out, float* high_out,
                         float* low_out, int64_t* high_index_out, int64_t* low_index_out) {
  const int64_t run = positions / chunks;
  TORCH_CHECK(run <= std::numeric_limits<int32_t>::max(),
              "qtrain::range_bn_stats: runs of more than 2^31 values are not supported");
  // Lanes over spans of `reps` rows (see kWideSpan): lane j holds channel j mod C of the rows
  // r + j / C, and keeps the span start r of its extremes and first NaN.
  const int64_t reps = rows_per_span(channels);
  const int64_t span = reps * channels;
  const int64_t grain = std::max<int64_t>(1, kMinPerThread / std::max<int64_t>(1, run * channels));
  at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> high_key(span), low_key(span), high_row(span), low_row(span),
        nan_row(span);
    std::vector<double> sums(span);
    for (int64_t k = begin; k < end; ++k) {
      int32_t* __restrict hk = high_key.data();
      int32_t* __restrict lk = low_key.data();
      int32_t* __restrict hr = high_row.data();
      int32_t* __restrict lr = low_row.data();
      int32_t* __restrict nr = nan_row.data();
      double* __restrict sum = sums.data();
      std::fill(hk, hk + span, std::numeric_limits<int32_t>::min());
      std::fill(lk, lk + span, std::numeric_limits<int32_t>::max());
      std::fill(hr, hr + span, 0);
      std::fill(lr, lr + span, 0);
      std::fill(nr, nr + span, -1);
      std::fill(sum, sum + span, 0.0);
      const float* __restrict first = x + k * run * channels;
      for (int64_t start = 0; start < run; start += reps) {
        const int32_t r = static_cast<int32_t>(start);  // < run <= INT32_MAX
        const float* __restrict rows = first + start * channels;
        const int64_t n = std::min<int64_t>(reps, run - start) * channels;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const float v = rows[j];
          const int32_t key = tie_zero_key(v);
          const int32_t high = hk[j];
          const int32_t low = lk[j];
          hr[j] = key > high ? r : hr[j];  // strictly greater: the first position keeps a tie
          hk[j] = key > high ? key : high;
          lr[j] = key < low ? r : lr[j];
          lk[j] = key < low ? key : low;
          nr[j] = abs_bits_of(v) > kInfBits && nr[j] < 0 ? r : nr[j];
          sum[j] += static_cast<double>(v);
        }
      }
      for (int64_t c = 0; c < channels; ++c) {
        // The channel's lanes: the best key, at its first row; the first NaN row.
        int32_t best_high = std::numeric_limits<int32_t>::min();
        int32_t best_low = std::numeric_limits<int32_t>::max();
        int64_t high_at = run, low_at = run, nan_at = run;
        double channel_sum = 0.0;
        for (int64_t j = c; j < span; j += channels) {
          const int64_t lane_row = j / channels;
          if (hk[j] > best_high || (hk[j] == best_high && hr[j] + lane_row < high_at)) {
            best_high = hk[j];
            high_at = hr[j] + lane_row;
          }
          if (lk[j] < best_low || (lk[j] == best_low && lr[j] + lane_row < low_at)) {
            best_low = lk[j];
            low_at = lr[j] + lane_row;
          }
          if (nr[j] >= 0) nan_at = std::min<int64_t>(nan_at, nr[j] + lane_row);
          channel_sum += sum[j];
        }
        if (nan_at < run) high_at = low_at = nan_at;
        const int64_t pair = k * channels + c;
        sum_out[pair] = channel_sum;
        // The value as stored there (a tied -0 or +0 as torch.max gives it).
        high_out[pair] = first[high_at * channels + c];
        low_out[pair] = first[low_at * channels + c];
        high_index_out[pair] = high_at;
        low_index_out[pair] = low_at;
      }
    }
  });
  for (int64_t p = chunks * run; p < positions; ++p) {
    for (int64_t c = 0; c < channels; ++c) rest_out[c] += static_cast<double>(x[p * channels + c]);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> range_bn_stats(const Tensor& x3,
                                                                          int64_t chunks) {
  const bool channels_last = check_batch_view(x3, "qtrain::range_bn_stats");
  const int64_t batch = x3.size(0);
  const int64_t channels = x3.size(1);
  const int64_t spatial = x3.size(2);
  const int64_t per_channel = batch * spatial;
  TORCH_CHECK(chunks >= 1 && chunks <= per_channel,
              "qtrain::range_bn_stats: chunks must be in 1..B·HW (", per_channel, "), got ",
              chunks);
  const int64_t run = per_channel / chunks;
  Tensor sums = at::empty({chunks, channels}, at::kDouble);
  Tensor rest = at::zeros({channels}, at::kDouble);
  Tensor high = at::empty({chunks, channels}, at::kFloat);
  Tensor low = at::empty({chunks, channels}, at::kFloat);
  Tensor high_index = at::empty({chunks, channels}, at::kLong);
  Tensor low_index = at::empty({chunks, channels}, at::kLong);
  const float* x = x3.data_ptr<float>();
  double* sum_out = sums.data_ptr<double>();
  double* rest_out = rest.data_ptr<double>();
  float* high_out = high.data_ptr<float>();
  float* low_out = low.data_ptr<float>();
  int64_t* high_index_out = high_index.data_ptr<int64_t>();
  int64_t* low_index_out = low_index.data_ptr<int64_t>();
  if (channels_last) {
    range_bn_stats_rows(x, per_channel, channels, chunks, sum_out, rest_out, high_out, low_out,
                        high_index_out, low_index_out);
    return {sums, rest, high, high_index, low, low_index};
  }
  const auto row = [&](int64_t sample, int64_t c) { return x + (sample * channels + c) * spatial; };
  const int64_t grain = std::max<int64_t>(1, kMinPerThread / run);
  at::parallel_for(0, chunks * channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t k = pair / channels;
      const int64_t c = pair % channels;
      int32_t best_high = std::numeric_limits<int32_t>::min();
      int32_t best_low = std::numeric_limits<int32_t>::max();
      // The pieces (sample, first column, end column) holding the extremes and the first NaN.
      std::array<int64_t, 3> high_piece{}, low_piece{}, nan_piece{-1, 0, 0};
      double sum = 0.0;
      for_each_piece(k * run, (k + 1) * run, spatial, [&](int64_t sample, int64_t b, int64_t e) {
        const RowExtremes r = row_extremes(row(sample, c) + b, e - b);
        sum += r.sum;
        if (r.high > best_high) best_high = r.high, high_piece = {sample, b, e};
        if (r.low < best_low) best_low = r.low, low_piece = {sample, b, e};
        if (nan_piece[0] < 0 && r.abs_bits > kInfBits) nan_piece = {sample, b, e};
      });
      sum_out[pair] = sum;
      // The position in the run, and the value there (a tied -0 or +0 as it is stored, as
      // torch.max gives it).
      const auto locate = [&](const std::array<int64_t, 3>& piece, int32_t key, bool nan,
                              float* value, int64_t* index) {
        const float* data = row(piece[0], c) + piece[1];
        const int64_t at = first_position(data, piece[2] - piece[1], key, nan);
        *value = data[at];
        *index = piece[0] * spatial + piece[1] + at - k * run;
      };
      if (nan_piece[0] >= 0) {
        locate(nan_piece, 0, true, high_out + pair, high_index_out + pair);
        locate(nan_piece, 0, true, low_out + pair, low_index_out + pair);
      } else {
        locate(high_piece, best_high, false, high_out + pair, high_index_out + pair);
        locate(low_piece, best_low, false, low_out + pair, low_index_out + pair);
      }
    }
  });
  for (int64_t c = 0; c < channels; ++c) {
    for_each_piece(chunks * run, per_channel, spatial, [&](int64_t sample, int64_t b, int64_t e) {
      rest_out[c] += row_extremes(row(sample, c) + b, e - b).sum;
    });
  }
  return {sums, rest, high, high_index, low, low_index};
}

// One row of the affine (+ ReLU) pass: parameters a[j], d[j] per value (a channels-last span)
// or a[0], d[0] for the whole row (a contiguous row of one channel).
template <bool Relu, bool PerValue>
void affine_span(const float* __restrict x, float* __restrict y, uint8_t* __restrict m,
                 const float* __restrict a, const float* __restrict d, int64_t n) {
  const float a0 = a[0];
  const float d0 = d[0];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float z = x[j] * (PerValue ? a[j] : a0) + (PerValue ? d[j] : d0);
    if constexpr (Relu) {
      const float v = z < 0.0f ? 0.0f : z;
      y[j] = v;
      m[j] = v <= 0.0f ? 1 : 0;
    } else {
      y[j] = z;
    }
  }
}

// y = x·scale[c] + shift[c] over a float32 (B, C, ...) tensor, contiguous or channels-last
// (C innermost, the rest in order: channels_last or a (B, C, S) view of it), with two
// roundings as reference.channel_affine, written in x's layout to a cached output block.
// With Relu, then y = relu(y) (torch.relu: -0 and NaN kept, negatives to +0) and the ReLU's
// backward mask [y <= 0] in the same pass (reference.channel_affine_relu).
template <bool Relu>
std::tuple<Tensor, Tensor> affine_rows(const Tensor& x_in, const Tensor& scale,
                                       const Tensor& shift, const char* what) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() >= 2,
              what, ": expected a float32 CPU tensor (B, C, ...)");
  const bool channels_last = channels_last_layout(x_in, what);
  const int64_t channels = x_in.size(1);
  const int64_t spatial = x_in.numel() == 0 ? 0 : x_in.numel() / (x_in.size(0) * channels);
  const Tensor x3 = x_in.view({x_in.size(0), channels, spatial});
  check_params(x3, scale, shift, what);
  Tensor out = empty_output_like(x_in, at::kFloat);
  Tensor mask = Relu ? empty_output_like(x_in, at::kBool) : Tensor();
  const float* x = x3.data_ptr<float>();
  const float* a = scale.data_ptr<float>();
  const float* d = shift.data_ptr<float>();
  float* y = out.data_ptr<float>();
  auto* m = Relu ? reinterpret_cast<uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  if (x_in.numel() == 0) return {out, mask};
  if (channels_last) {  // spans of (b, s) rows of C values, the parameter vectors repeated
    const int64_t reps = rows_per_span(channels);
    const std::vector<float> wide_a = repeated(a, channels, reps);
    const std::vector<float> wide_d = repeated(d, channels, reps);
    for_each_span(x3.size(0) * spatial, channels, reps, [&](int64_t offset, int64_t n) {
      affine_span<Relu, true>(x + offset, y + offset, Relu ? m + offset : nullptr, wide_a.data(),
                              wide_d.data(), n);
    });
    return {out, mask};
  }
  // (b, c) rows of S values with one parameter each.
  const int64_t rows = x3.size(0) * channels;
  const int64_t grain = std::max<int64_t>(1, kMinPerThread / std::max<int64_t>(1, spatial));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t offset = r * spatial;
      affine_span<Relu, false>(x + offset, y + offset, Relu ? m + offset : nullptr,
                               a + r % channels, d + r % channels, spatial);
    }
  });
  return {out, mask};
}

Tensor channel_affine(const Tensor& x, const Tensor& scale, const Tensor& shift) {
  return std::get<0>(affine_rows<false>(x, scale, shift, "qtrain::channel_affine"));
}

std::tuple<Tensor, Tensor> channel_affine_relu(const Tensor& x, const Tensor& scale,
                                               const Tensor& shift) {
  return affine_rows<true>(x, scale, shift, "qtrain::channel_affine_relu");
}

// grad_x = g·a + d over one row (g read through a fused ReLU's mask when Masked), with a[j],
// d[j] per value (a channels-last row) or a[0], d[0] for the whole row (a contiguous row).
template <bool Masked, bool PerValue>
void grad_span(const float* __restrict g, const uint8_t* __restrict mask, float* __restrict y,
               const float* __restrict a, const float* __restrict d, int64_t n) {
  const float a0 = a[0];
  const float d0 = d[0];
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const float gv = Masked ? masked_value(g[j], mask[j]) : g[j];
    y[j] = gv * (PerValue ? a[j] : a0) + (PerValue ? d[j] : d0);
  }
}

// Σg and Σg·(x − μ) per channel over the rows [b, e) of a channels-last batch (C values per
// row), added to sum_g / sum_gx: in double lanes over spans of `reps` rows (wide_mean: μ
// repeated), the lanes of a channel then added in order.
template <bool Masked>
void column_sums(const float* __restrict g, const uint8_t* __restrict mask,
                 const float* __restrict x, const float* __restrict wide_mean, int64_t b,
                 int64_t e, int64_t channels, int64_t reps, double* __restrict sum_g,
                 double* __restrict sum_gx) {
  const int64_t span = reps * channels;
  std::vector<double> lanes_g(span, 0.0), lanes_gx(span, 0.0);
  double* __restrict lane_g = lanes_g.data();
  double* __restrict lane_gx = lanes_gx.data();
  for (int64_t r = b; r < e; r += reps) {
    const int64_t offset = r * channels;
    const int64_t n = std::min(reps, e - r) * channels;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float gv = Masked ? masked_value(g[offset + j], mask[offset + j]) : g[offset + j];
      lane_g[j] += static_cast<double>(gv);
      lane_gx[j] += static_cast<double>(gv) * static_cast<double>(x[offset + j] - wide_mean[j]);
    }
  }
  for (int64_t j = 0; j < span; ++j) {
    sum_g[j % channels] += lane_g[j];
    sum_gx[j % channels] += lane_gx[j];
  }
}

// Range BN's backward (reference.range_bn_backward): with s = 1/(C(n)·r + eps) and n values
// per channel, Σg and Σg·(x − μ) per channel (one read of g and x), then
// grad_x = g·(γs) + (−γs·Σg)/n in one pass, and ∂L/∂r = −C(n)·γ·s²·Σg·(x − μ) shared out over
// the chunks' max (+1/K) and min (−1/K) positions. g, x and the mask share one layout,
// contiguous or channels-last; grad_x comes in it too.
std::tuple<Tensor, Tensor, Tensor> range_bn_backward(const Tensor& grad3, const Tensor& x3,
                                                     const Tensor& mean, const Tensor& inv_spread,
                                                     const Tensor& gamma, double constant,
                                                     const Tensor& high_index,
                                                     const Tensor& low_index,
                                                     const std::optional<Tensor>& zero_mask) {
  const bool channels_last = check_batch_view(x3, "qtrain::range_bn_backward");
  TORCH_CHECK(grad3.sizes() == x3.sizes() &&
                  check_batch_view(grad3, "qtrain::range_bn_backward") == channels_last,
              "qtrain::range_bn_backward: grad and x differ in shape or layout");
  const int64_t batch = x3.size(0);
  const int64_t channels = x3.size(1);
  const int64_t spatial = x3.size(2);
  for (const Tensor* param : {&mean, &inv_spread, &gamma}) {
    TORCH_CHECK(param->scalar_type() == at::kFloat && param->is_contiguous() &&
                    param->numel() == channels,
                "qtrain::range_bn_backward: per-channel parameters must be contiguous float32 of ",
                channels, " values");
  }
  const int64_t chunks = high_index.size(0);
  for (const Tensor* index : {&high_index, &low_index}) {
    TORCH_CHECK(index->scalar_type() == at::kLong && index->is_contiguous() &&
                    index->dim() == 2 && index->size(0) == chunks && index->size(1) == channels,
                "qtrain::range_bn_backward: indices must be contiguous int64 (chunks, C)");
  }
  TORCH_CHECK(chunks >= 1 && chunks <= batch * spatial,
              "qtrain::range_bn_backward: chunks must be in 1..B·HW");
  // A fused ReLU's mask zeroes g where it is set (as masked_zero would): both passes read g
  // through it, as bit patterns ANDed with all ones or zero (NaN and inf zeroed too).
  const uint8_t* zm = nullptr;
  if (zero_mask) {
    TORCH_CHECK(zero_mask->scalar_type() == at::kBool && zero_mask->sizes() == grad3.sizes() &&
                    channels_last_layout(*zero_mask, "qtrain::range_bn_backward") ==
                        channels_last,
                "qtrain::range_bn_backward: zero_mask must be a bool tensor of grad's shape "
                "and layout");
    zm = reinterpret_cast<const uint8_t*>(zero_mask->data_ptr<bool>());
  }
  const float* g = grad3.data_ptr<float>();
  const float* x = x3.data_ptr<float>();
  const float* mu = mean.data_ptr<float>();
  const float* s = inv_spread.data_ptr<float>();
  const float* gam = gamma.data_ptr<float>();
  // Memory order: blocks of kSamplesPerBlock samples, each summing its rows into its own
  // per-channel partials (double), combined in block order: the result does not depend on the
  // thread count.
  constexpr int64_t kSamplesPerBlock = 8;
  const int64_t blocks = (batch + kSamplesPerBlock - 1) / kSamplesPerBlock;
  std::vector<double> partial_g(blocks * channels), partial_gx(blocks * channels);
  const int64_t reps = rows_per_span(channels);
  const std::vector<float> wide_mean = channels_last ? repeated(mu, channels, reps)
                                                     : std::vector<float>();
  const int64_t block_values = std::max<int64_t>(1, kSamplesPerBlock * channels * spatial);
  const int64_t block_grain = std::max<int64_t>(1, kMinPerThread / block_values);
  at::parallel_for(0, blocks, block_grain, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * kSamplesPerBlock;
      const int64_t last = std::min(batch, first + kSamplesPerBlock);
      double* block_g = partial_g.data() + block * channels;
      double* block_gx = partial_gx.data() + block * channels;
      if (channels_last) {
        const int64_t b = first * spatial;
        const int64_t e = last * spatial;
        if (zm == nullptr) {
          column_sums<false>(g, nullptr, x, wide_mean.data(), b, e, channels, reps, block_g,
                             block_gx);
        } else {
          column_sums<true>(g, zm, x, wide_mean.data(), b, e, channels, reps, block_g,
                            block_gx);
        }
        continue;
      }
      for (int64_t sample = first; sample < last; ++sample) {
        for (int64_t c = 0; c < channels; ++c) {
          const int64_t offset = (sample * channels + c) * spatial;
          // float partial sums over one row, then double across rows: the error stays at a
          // few float roundings of the row's terms.
          float row_g, row_gx;
          if (zm == nullptr) {
            row_sums<false>(g + offset, nullptr, x + offset, mu[c], spatial, row_g, row_gx);
          } else {
            row_sums<true>(g + offset, zm + offset, x + offset, mu[c], spatial, row_g, row_gx);
          }
          block_g[c] += row_g;
          block_gx[c] += row_gx;
        }
      }
    }
  });
  std::vector<double> sum_g(channels, 0.0), sum_gx(channels, 0.0);
  for (int64_t block = 0; block < blocks; ++block) {
    for (int64_t c = 0; c < channels; ++c) {
      sum_g[c] += partial_g[block * channels + c];
      sum_gx[c] += partial_gx[block * channels + c];
    }
  }
  const double count = static_cast<double>(batch * spatial);
  Tensor grad_gamma = at::empty({channels}, at::kFloat);
  Tensor grad_beta = at::empty({channels}, at::kFloat);
  std::vector<float> slope(channels), offset(channels), share(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const double gs = static_cast<double>(gam[c]) * s[c];
    grad_beta.data_ptr<float>()[c] = static_cast<float>(sum_g[c]);
    grad_gamma.data_ptr<float>()[c] = static_cast<float>(sum_gx[c] * s[c]);
    slope[c] = static_cast<float>(gs);
    offset[c] = static_cast<float>(-gs * sum_g[c] / count);
    share[c] = static_cast<float>(-constant * gs * s[c] * sum_gx[c] / chunks);
  }
  Tensor grad_x = empty_output_like(x3, at::kFloat);
  float* out = grad_x.data_ptr<float>();
  if (channels_last) {  // spans of rows of C values, as in affine_rows
    const std::vector<float> wide_slope = repeated(slope.data(), channels, reps);
    const std::vector<float> wide_offset = repeated(offset.data(), channels, reps);
    for_each_span(batch * spatial, channels, reps, [&](int64_t at, int64_t n) {
      if (zm == nullptr) {
        grad_span<false, true>(g + at, nullptr, out + at, wide_slope.data(), wide_offset.data(), n);
      } else {
        grad_span<true, true>(g + at, zm + at, out + at, wide_slope.data(), wide_offset.data(), n);
      }
    });
  } else {  // rows of S values of one channel
    at::parallel_for(0, batch * channels, std::max<int64_t>(1, kMinPerThread / spatial),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t r = begin; r < end; ++r) {
                         const int64_t at = r * spatial;
                         const float* a = slope.data() + r % channels;
                         const float* d = offset.data() + r % channels;
                         if (zm == nullptr) {
                           grad_span<false, false>(g + at, nullptr, out + at, a, d, spatial);
                         } else {
                           grad_span<true, false>(g + at, zm + at, out + at, a, d, spatial);
                         }
                       }
                     });
  }
  // Position i of run k is the channel's sample-major position p = k·n + i (range_bn_stats):
  // row p of a channels-last batch, sample p / S and column p mod S of a contiguous one.
  const int64_t run = batch * spatial / chunks;
  const int64_t* highs = high_index.data_ptr<int64_t>();
  const int64_t* lows = low_index.data_ptr<int64_t>();
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t c = 0; c < channels; ++c) {
      for (const auto& [index, sign] : {std::pair{highs, 1.0f}, std::pair{lows, -1.0f}}) {
        const int64_t i = index[k * channels + c];
        TORCH_CHECK_INDEX(i >= 0 && i < run, "qtrain::range_bn_backward: index out of range");
        const int64_t p = k * run + i;
        const int64_t at = channels_last ? p * channels + c
                                         : (p / spatial * channels + c) * spatial + p % spatial;
        out[at] += sign * share[c];
      }
    }
  }
  return {grad_x, grad_gamma, grad_beta};
}

// ---- compact ReLU ----------------------------------------------------------------------------

// The element-wise kernels below take any non-overlapping dense layout (contiguous,
// channels_last, ...) and walk memory in order; their outputs come in the input's layout.

// [y <= 0] for a float32 y: where threshold_backward zeroes the gradient of a ReLU whose
// output is y (NaN is not ≤ 0: its gradient passes). One byte per value.
Tensor zero_mask(const Tensor& y_in) {
  TORCH_CHECK(y_in.device().is_cpu() && y_in.scalar_type() == at::kFloat &&
                  y_in.is_non_overlapping_and_dense(),
              "qtrain::zero_mask: expected a dense float32 CPU tensor");
  Tensor mask = empty_output_like(y_in, at::kBool);
  const float* y = y_in.data_ptr<float>();
  bool* m = mask.data_ptr<bool>();
  const int64_t numel = y_in.numel();
  parallel_chunks(numel, plan_chunks(numel), [&](int64_t begin, int64_t end, int) {
    // Through uint8: GCC vectorises a compare stored as bytes, not as bool.
    auto* __restrict out = reinterpret_cast<uint8_t*>(m);
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) out[i] = y[i] <= 0.0f ? 1 : 0;
  });
  return mask;
}

// grad where the mask is false, 0 where it is true (threshold_backward given zero_mask).
Tensor masked_zero(const Tensor& grad_in, const Tensor& mask) {
  TORCH_CHECK(grad_in.device().is_cpu() && grad_in.scalar_type() == at::kFloat &&
                  grad_in.is_non_overlapping_and_dense() && mask.scalar_type() == at::kBool &&
                  mask.sizes() == grad_in.sizes() && mask.strides() == grad_in.strides(),
              "qtrain::masked_zero: expected a dense float32 CPU grad and a bool mask of its "
              "shape and strides");
  Tensor out = empty_output_like(grad_in, at::kFloat);
  const float* g = grad_in.data_ptr<float>();
  const auto* m = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  float* y = out.data_ptr<float>();
  const int64_t numel = grad_in.numel();
  parallel_chunks(numel, plan_chunks(numel), [&](int64_t begin, int64_t end, int) {
    // On the bit patterns: GCC vectorises the widening of the byte mask this way, not a float
    // select on it.
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) y[i] = masked_value(g[i], m[i]);
  });
  return out;
}

// ---- 2×2 max pool, stride 2 ----------------------------------------------------------------

// Each (B, C) plane's output rows, split between threads, with body(plane, output row).
template <class Body>
void for_each_pool_row(int64_t planes, int64_t out_rows, int64_t input_numel, const Body& body) {
  parallel_chunks(planes * out_rows, plan_chunks(input_numel), [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) body(r / out_rows, r % out_rows);
  });
}

// One output row of max_pool2x2 from its two input rows: the window is
// scanned as torch does (a, b on top, then c, d below); a value is taken when above the best so
// far or NaN.
void pool_row_scalar(const float* __restrict top, const float* __restrict bottom,
                     float* __restrict y, uint8_t* __restrict where, int64_t out_w) {
  for (int64_t j = 0; j < out_w; ++j) {
    const float a = top[2 * j], b = top[2 * j + 1], c = bottom[2 * j], d = bottom[2 * j + 1];
    const bool take_b = b > a || b != b;
    float best = take_b ? b : a;
    int32_t at = take_b ? 1 : 0;
    const bool take_c = c > best || c != c;
    best = take_c ? c : best;
    at = take_c ? 2 : at;
    const bool take_d = d > best || d != d;
    y[j] = take_d ? d : best;
    where[j] = static_cast<uint8_t>(take_d ? 3 : at);
  }
}

// The backward of one output row: each input of the two rows gets 0 + g where it was the max
// (torch adds into zeros: -0 becomes +0), 0 elsewhere.
void unpool_row_scalar(const float* __restrict g, const uint8_t* __restrict where,
                       float* __restrict top, float* __restrict bottom, int64_t out_w) {
  for (int64_t j = 0; j < out_w; ++j) {
    const float value = 0.0f + g[j];
    const uint8_t at = where[j];
    top[2 * j] = at == 0 ? value : 0.0f;
    top[2 * j + 1] = at == 1 ? value : 0.0f;
    bottom[2 * j] = at == 2 ? value : 0.0f;
    bottom[2 * j + 1] = at == 3 ? value : 0.0f;
  }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
}  // namespace
#include <immintrin.h>
namespace {
constexpr bool kVectorPool = true;

// 16 outputs at a time with masked tails: feature-map rows are short (14 outputs for 28
// columns), too short for an auto-vectorised loop, which would run its scalar epilogue only.
// Same comparisons, so the same results as the scalar rows.
inline __mmask32 row_mask(int64_t count) {
  return count >= 32 ? ~__mmask32{0} : (__mmask32{1} << count) - 1;
}

void pool_row_vector(const float* top, const float* bottom, float* y, uint8_t* where,
                     int64_t out_w) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t j = 0; j < out_w; j += 16) {
    const __mmask32 pairs = row_mask(2 * (out_w - j));
    const auto low = static_cast<__mmask16>(pairs), high = static_cast<__mmask16>(pairs >> 16);
    const __m512i t0 = _mm512_castps_si512(_mm512_maskz_loadu_ps(low, top + 2 * j));
    const __m512i t1 = _mm512_castps_si512(_mm512_maskz_loadu_ps(high, top + 2 * j + 16));
    const __m512i b0 = _mm512_castps_si512(_mm512_maskz_loadu_ps(low, bottom + 2 * j));
    const __m512i b1 = _mm512_castps_si512(_mm512_maskz_loadu_ps(high, bottom + 2 * j + 16));
    const __m512 a = _mm512_castsi512_ps(_mm512_permutex2var_epi32(t0, even, t1));
    const __m512 b = _mm512_castsi512_ps(_mm512_permutex2var_epi32(t0, odd, t1));
    const __m512 c = _mm512_castsi512_ps(_mm512_permutex2var_epi32(b0, even, b1));
    const __m512 d = _mm512_castsi512_ps(_mm512_permutex2var_epi32(b0, odd, b1));
    const __mmask16 take_b = _mm512_cmp_ps_mask(b, a, _CMP_GT_OQ) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q);
    __m512 best = _mm512_mask_blend_ps(take_b, a, b);
    __m512i at = _mm512_maskz_set1_epi32(take_b, 1);
    const __mmask16 take_c =
        _mm512_cmp_ps_mask(c, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(c, c, _CMP_UNORD_Q);
    best = _mm512_mask_blend_ps(take_c, best, c);
    at = _mm512_mask_set1_epi32(at, take_c, 2);
    const __mmask16 take_d =
        _mm512_cmp_ps_mask(d, best, _CMP_GT_OQ) | _mm512_cmp_ps_mask(d, d, _CMP_UNORD_Q);
    best = _mm512_mask_blend_ps(take_d, best, d);
    at = _mm512_mask_set1_epi32(at, take_d, 3);
    const auto outputs = static_cast<__mmask16>(row_mask(out_w - j));
    _mm512_mask_storeu_ps(y + j, outputs, best);
    _mm_mask_storeu_epi8(where + j, outputs, _mm512_cvtepi32_epi8(at));
  }
}

void unpool_row_vector(const float* g, const uint8_t* where, float* top, float* bottom,
                       int64_t out_w) {
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  for (int64_t j = 0; j < out_w; j += 16) {
    const auto outputs = static_cast<__mmask16>(row_mask(out_w - j));
    const __m512 value = _mm512_add_ps(_mm512_setzero_ps(), _mm512_maskz_loadu_ps(outputs, g + j));
    const __m512i at = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(outputs, where + j));
    const auto at_is = [&](int k) {
      return _mm512_castps_si512(
          _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(at, _mm512_set1_epi32(k)), value));
    };
    const __m512i v0 = at_is(0), v1 = at_is(1), v2 = at_is(2), v3 = at_is(3);
    const __mmask32 pairs = row_mask(2 * (out_w - j));
    const auto low = static_cast<__mmask16>(pairs), high = static_cast<__mmask16>(pairs >> 16);
    _mm512_mask_storeu_ps(top + 2 * j, low, _mm512_castsi512_ps(_mm512_permutex2var_epi32(v0, first, v1)));
    _mm512_mask_storeu_ps(top + 2 * j + 16, high, _mm512_castsi512_ps(_mm512_permutex2var_epi32(v0, second, v1)));
    _mm512_mask_storeu_ps(bottom + 2 * j, low, _mm512_castsi512_ps(_mm512_permutex2var_epi32(v2, first, v3)));
    _mm512_mask_storeu_ps(bottom + 2 * j + 16, high, _mm512_castsi512_ps(_mm512_permutex2var_epi32(v2, second, v3)));
  }
}
#else
constexpr bool kVectorPool = false;
void pool_row_vector(const float*, const float*, float*, uint8_t*, int64_t) {}
void unpool_row_vector(const float*, const uint8_t*, float*, float*, int64_t) {}
#endif

// Channels-last: a window's four inputs are four vectors of C channel values (a, b on top,
// then c, d below), compared channel by channel as pool_row_scalar does; the loop over the
// channels vectorises as it is.
void pool_pixel_channels(const float* __restrict a, const float* __restrict b,
                         const float* __restrict c, const float* __restrict d,
                         float* __restrict y, uint8_t* __restrict where, int64_t channels) {
#pragma omp simd
  for (int64_t k = 0; k < channels; ++k) {
    const bool take_b = b[k] > a[k] || b[k] != b[k];
    float best = take_b ? b[k] : a[k];
    int32_t at = take_b ? 1 : 0;
    const bool take_c = c[k] > best || c[k] != c[k];
    best = take_c ? c[k] : best;
    at = take_c ? 2 : at;
    const bool take_d = d[k] > best || d[k] != d[k];
    y[k] = take_d ? d[k] : best;
    where[k] = static_cast<uint8_t>(take_d ? 3 : at);
  }
}

void unpool_pixel_channels(const float* __restrict g, const uint8_t* __restrict where,
                           float* __restrict a, float* __restrict b, float* __restrict c,
                           float* __restrict d, int64_t channels) {
#pragma omp simd
  for (int64_t k = 0; k < channels; ++k) {
    const float value = 0.0f + g[k];
    const uint8_t at = where[k];
    a[k] = at == 0 ? value : 0.0f;
    b[k] = at == 1 ? value : 0.0f;
    c[k] = at == 2 ? value : 0.0f;
    d[k] = at == 3 ? value : 0.0f;
  }
}

// An output of shape (B, C, h, w) in the contiguous or the channels_last layout.
Tensor pool_output(const Tensor& like, int64_t height, int64_t width, bool channels_last,
                   at::ScalarType dtype) {
  if (!channels_last) return empty_output({like.size(0), like.size(1), height, width}, dtype);
  return empty_output({like.size(0), height, width, like.size(1)}, dtype).permute({0, 3, 1, 2});
}

// QTRAIN_SCALAR_POOL set: the portable rows even where AVX-512 is compiled in (for the tests).
bool vector_pool() { return kVectorPool && std::getenv("QTRAIN_SCALAR_POOL") == nullptr; }

// y = the max of each 2×2 window of a float32 (B, C, H, W) tensor, contiguous or
// channels_last (floor mode: an odd last row or column is in no window) and where = its
// position in the window (0..3, row by row), as torch.max_pool2d_with_indices picks it: the
// first maximum, or the last NaN. Both outputs come in x's layout.
std::tuple<Tensor, Tensor> max_pool2x2(const Tensor& x_in) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 4 &&
                  x_in.size(2) >= 2 && x_in.size(3) >= 2,
              "qtrain::max_pool2x2: expected a float32 CPU (B, C, H, W) tensor with H, W >= 2");
  const bool channels_last = channels_last_layout(x_in, "qtrain::max_pool2x2");
  const int64_t channels = x_in.size(1), height = x_in.size(2), width = x_in.size(3);
  const int64_t out_h = height / 2, out_w = width / 2;
  Tensor y_out = pool_output(x_in, out_h, out_w, channels_last, at::kFloat);
  Tensor where_out = pool_output(x_in, out_h, out_w, channels_last, at::kByte);
  const float* x = x_in.data_ptr<float>();
  float* y = y_out.data_ptr<float>();
  uint8_t* where = where_out.data_ptr<uint8_t>();
  if (channels_last) {  // per sample and output row: out_w windows of C-vectors
    for_each_pool_row(x_in.size(0), out_h, x_in.numel(), [&](int64_t sample, int64_t row) {
      const float* top = x + ((sample * height + 2 * row) * width) * channels;
      const float* bottom = top + width * channels;
      const int64_t out = (sample * out_h + row) * out_w * channels;
      for (int64_t j = 0; j < out_w; ++j) {
        const int64_t left = 2 * j * channels;
        pool_pixel_channels(top + left, top + left + channels, bottom + left,
                            bottom + left + channels, y + out + j * channels,
                            where + out + j * channels, channels);
      }
    });
    return {y_out, where_out};
  }
  const bool vector = vector_pool();
  for_each_pool_row(x_in.size(0) * channels, out_h, x_in.numel(), [&](int64_t plane, int64_t row) {
    const float* top = x + (plane * height + 2 * row) * width;
    const int64_t out = (plane * out_h + row) * out_w;
    if (vector) {
      pool_row_vector(top, top + width, y + out, where + out, out_w);
    } else {
      pool_row_scalar(top, top + width, y + out, where + out, out_w);
    }
  });
  return {y_out, where_out};
}

// max_pool2d_with_indices_backward for max_pool2x2 (an input of spatial size height × width):
// each window's gradient goes to its max's position, 0 elsewhere and outside the windows. grad
// and where share one layout, contiguous or channels_last; the result comes in it.
Tensor max_pool2x2_backward(const Tensor& grad_in, const Tensor& where_in, int64_t height,
                            int64_t width) {
  TORCH_CHECK(grad_in.device().is_cpu() && grad_in.scalar_type() == at::kFloat &&
                  grad_in.dim() == 4 && where_in.scalar_type() == at::kByte &&
                  where_in.sizes() == grad_in.sizes() && grad_in.size(2) == height / 2 &&
                  grad_in.size(3) == width / 2,
              "qtrain::max_pool2x2_backward: expected a float32 CPU grad and uint8 "
              "positions of the pooled shape (B, C, H/2, W/2)");
  const char* what = "qtrain::max_pool2x2_backward";
  const bool channels_last = channels_last_layout(grad_in, what);
  TORCH_CHECK(channels_last_layout(where_in, what) == channels_last, what,
              ": grad and where must share one layout");
  const int64_t channels = grad_in.size(1);
  const int64_t out_h = height / 2, out_w = width / 2;
  Tensor out = pool_output(grad_in, height, width, channels_last, at::kFloat);
  const float* g = grad_in.data_ptr<float>();
  const uint8_t* where = where_in.data_ptr<uint8_t>();
  float* dx = out.data_ptr<float>();
  if (channels_last) {
    const int64_t row_values = width * channels;
    for_each_pool_row(grad_in.size(0), out_h, out.numel(), [&](int64_t sample, int64_t row) {
      float* top = dx + (sample * height + 2 * row) * row_values;
      float* bottom = top + row_values;
      const int64_t pooled = (sample * out_h + row) * out_w * channels;
      for (int64_t j = 0; j < out_w; ++j) {
        const int64_t left = 2 * j * channels;
        unpool_pixel_channels(g + pooled + j * channels, where + pooled + j * channels,
                              top + left, top + left + channels, bottom + left,
                              bottom + left + channels, channels);
      }
      if (width % 2) {
        std::fill(top + row_values - channels, top + row_values, 0.0f);
        std::fill(bottom + row_values - channels, bottom + row_values, 0.0f);
      }
      if (height % 2 && row == out_h - 1) {
        std::fill(bottom + row_values, bottom + 2 * row_values, 0.0f);
      }
    });
    return out;
  }
  const bool vector = vector_pool();
  const int64_t planes = grad_in.size(0) * channels;
  for_each_pool_row(planes, out_h, out.numel(), [&](int64_t plane, int64_t row) {
    float* top = dx + (plane * height + 2 * row) * width;
    float* bottom = top + width;
    const int64_t pooled = (plane * out_h + row) * out_w;
    if (vector) {
      unpool_row_vector(g + pooled, where + pooled, top, bottom, out_w);
    } else {
      unpool_row_scalar(g + pooled, where + pooled, top, bottom, out_w);
    }
    if (width % 2) top[width - 1] = bottom[width - 1] = 0.0f;
    if (height % 2 && row == out_h - 1) std::fill(bottom + width, bottom + 2 * width, 0.0f);
  });
  return out;
}

// ---- integer quantization --------------------------------------------------------------------

// Integer levels are stored in the format's storage dtype; NaN has no level and is stored as 0.
template <class Level>
inline Level to_level(float level) {
  if constexpr (std::is_same_v<Level, float>) {
    return level;
  } else {
    // Through int32: GCC vectorises float -> int32 -> int8 but not float -> int8.
    return static_cast<Level>(static_cast<int32_t>(level == level ? level : 0.0f));
  }
}

struct IntOutputs {
  float* fake = nullptr;
  bool* mask = nullptr;
  void* levels = nullptr;
};

// Comparisons, not std::min/max: NaN must propagate as in torch.clamp.
inline float clamp_level(float shifted, float qmin, float qmax) {
  const float level = shifted < qmin ? qmin : shifted;
  return level > qmax ? qmax : level;
}

// Per-channel parameters of a run: one value for the whole run, or with PerElement (inner == 1)
// one per element, read as a contiguous vector starting at the run's first channel.
template <bool PerElement>
inline float param(const float* __restrict values, int64_t k) {
  return values[PerElement ? k : 0];
}

// One run [b, e) starting at channel c (see for_each_run):
// level = clamp(round(x * (1/s)) + z, qmin, qmax); writes whichever of
// fake = (level - z) * s, the STE mask [qmin <= round(x/s) + z <= qmax] and the level is wanted.
// Pointers are restrict-qualified and the rest passed by value: 1-byte stores may alias
// anything, and GCC vectorises only once it knows they cannot.
template <bool Stochastic, bool WantFake, bool WantMask, bool PerElement, class Level>
void quantize_int_run(const float* __restrict x, float* __restrict fake, bool* __restrict mask,
                      Level* __restrict levels, int64_t b, int64_t e,
                      const float* __restrict scale, const float* __restrict inverse,
                      const float* __restrict zero_point, float qmin, float qmax, Keys keys) {
  const uint32_t low0 = static_cast<uint32_t>(b);
  const uint32_t high = static_cast<uint32_t>(static_cast<uint64_t>(b) >> 32) + keys.key1;
#pragma omp simd
  for (int64_t k = 0; k < e - b; ++k) {
    const int64_t j = b + k;
    const float z = param<PerElement>(zero_point, k);
    const float v = x[j] * param<PerElement>(inverse, k);
    float rounded;
    if constexpr (Stochastic) {
      rounded = round_stochastic(v, (low0 + static_cast<uint32_t>(k)) ^ keys.key0, high);
    } else {
      rounded = std::nearbyint(v);  // round half to even, as torch.round
    }
    const float shifted = rounded + z;
    if constexpr (WantMask) mask[j] = (shifted >= qmin) & (shifted <= qmax);
    const float level = clamp_level(shifted, qmin, qmax);
    if constexpr (!std::is_void_v<Level>) levels[j] = to_level<Level>(level);
    if constexpr (WantFake) fake[j] = (level - z) * param<PerElement>(scale, k);
  }
}

template <bool Stochastic, bool WantFake, bool WantMask, class Level>
void quantize_int_kernel(const Tensor& x3, const float* scale, const float* inverse,
                         const float* zero_point, float qmin, float qmax, Keys keys,
                         const IntOutputs& out) {
  const float* x = x3.data_ptr<float>();
  auto* levels = static_cast<Level*>(out.levels);
  const int64_t channels = x3.size(1);
  const int64_t inner = x3.size(2);
  parallel_chunks(x3.numel(), plan_chunks(x3.numel()), [&](int64_t begin, int64_t end, int) {
    for_each_run(begin, end, channels, inner, [&](int64_t b, int64_t e, int64_t c) {
      if (inner == 1) {
        quantize_int_run<Stochastic, WantFake, WantMask, true, Level>(
            x, out.fake, out.mask, levels, b, e, scale + c, inverse + c, zero_point + c, qmin,
            qmax, keys);
      } else {
        quantize_int_run<Stochastic, WantFake, WantMask, false, Level>(
            x, out.fake, out.mask, levels, b, e, scale + c, inverse + c, zero_point + c, qmin,
            qmax, keys);
      }
    });
  });
}

template <class F>
void with_bool(bool value, const F& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Calls f with a null pointer of the C++ type that stores levels of `dtype` (void*: no levels).
template <class F>
void with_level_type(std::optional<at::ScalarType> dtype, const F& f) {
  if (!dtype.has_value()) return f(static_cast<void*>(nullptr));
  switch (*dtype) {
    case at::kFloat:
      return f(static_cast<float*>(nullptr));
    case at::kChar:
      return f(static_cast<int8_t*>(nullptr));
    case at::kByte:
      return f(static_cast<uint8_t*>(nullptr));
    case at::kShort:
      return f(static_cast<int16_t*>(nullptr));
    case at::kInt:
      return f(static_cast<int32_t*>(nullptr));
    default:
      TORCH_CHECK(false, "qtrain: levels dtype must be float32, int8, uint8, int16 or int32, got ",
                  *dtype);
  }
}

std::vector<float> inverses(const Tensor& scale) {
  // 1/s in float32, as the reference's `1.0 / scale` computes it.
  std::vector<float> out(static_cast<size_t>(scale.numel()));
  for (int64_t c = 0; c < scale.numel(); ++c) out[c] = 1.0f / scale.data_ptr<float>()[c];
  return out;
}

std::tuple<Tensor, Tensor, Tensor> quantize_int(const Tensor& x3, const Tensor& scale,
                                                const Tensor& zero_point, int64_t qmin,
                                                int64_t qmax, std::optional<int64_t> seed,
                                                bool want_fake, bool want_mask,
                                                std::optional<at::ScalarType> levels_dtype) {
  check_view(x3, "qtrain::quantize_int");
  check_params(x3, scale, zero_point, "qtrain::quantize_int");
  TORCH_CHECK(qmin <= qmax, "qtrain::quantize_int: qmin > qmax");
  with_level_type(levels_dtype, [](auto*) {});  // rejects an unsupported dtype before allocating
  const auto none = [] { return at::empty({0}, at::kBool); };
  Tensor fake = want_fake ? empty_output(x3.sizes(), at::kFloat) : at::empty({0}, at::kFloat);
  Tensor mask = want_mask ? empty_output(x3.sizes(), at::kBool) : none();
  Tensor levels = levels_dtype ? empty_output(x3.sizes(), *levels_dtype) : none();
  IntOutputs out;
  out.fake = want_fake ? fake.data_ptr<float>() : nullptr;
  out.mask = want_mask ? mask.data_ptr<bool>() : nullptr;
  out.levels = levels_dtype ? levels.data_ptr() : nullptr;
  const std::vector<float> inverse = inverses(scale);
  const Keys keys = seed ? seed_keys(*seed) : Keys{};
  with_level_type(levels_dtype, [&](auto* level_ptr) {
    using Level = std::remove_pointer_t<decltype(level_ptr)>;
    with_bool(seed.has_value(), [&](auto stochastic) {
      with_bool(want_fake, [&](auto fake_wanted) {
        with_bool(want_mask, [&](auto mask_wanted) {
          quantize_int_kernel<decltype(stochastic)::value, decltype(fake_wanted)::value,
                              decltype(mask_wanted)::value, Level>(
              x3, scale.data_ptr<float>(), inverse.data(), zero_point.data_ptr<float>(),
              static_cast<float>(qmin), static_cast<float>(qmax), keys, out);
        });
      });
    });
  });
  return {fake, mask, levels};
}

// ---- one tensor onto two grids (SBM's gradient bifurcation) ---------------------------------

// One grid of quantize_int_pair: per-channel scale, 1/scale and zero point, and the clamp.
struct Grid {
  const float* scale;
  const float* inverse;
  const float* zero_point;
  float qmin;
  float qmax;
};

inline Grid grid_at(const Grid& grid, int64_t c) {
  return {grid.scale + c, grid.inverse + c, grid.zero_point + c, grid.qmin, grid.qmax};
}

// x̂ = (clamp(rounded + z, qmin, qmax) − z)·s of one grid, as quantize_int_run writes it.
template <bool PerElement>
inline float fake_on(const Grid& grid, float rounded, int64_t k) {
  const float z = param<PerElement>(grid.zero_point, k);
  return (clamp_level(rounded + z, grid.qmin, grid.qmax) - z) * param<PerElement>(grid.scale, k);
}

// One run [b, e) starting at channel c: both grids' x̂ from one read of x, rounded with one
// uniform per index (the one quantize_int draws for that seed and index).
template <bool Stochastic, bool PerElement>
void quantize_int_pair_run(const float* __restrict x, float* __restrict fake_a,
                           float* __restrict fake_b, int64_t b, int64_t e, Grid a, Grid g,
                           Keys keys) {
  const uint32_t low0 = static_cast<uint32_t>(b);
  const uint32_t high = static_cast<uint32_t>(static_cast<uint64_t>(b) >> 32) + keys.key1;
#pragma omp simd
  for (int64_t k = 0; k < e - b; ++k) {
    const int64_t j = b + k;
    const float va = x[j] * param<PerElement>(a.inverse, k);
    const float vg = x[j] * param<PerElement>(g.inverse, k);
    float ra, rg;
    if constexpr (Stochastic) {
      const float u = uniform_at((low0 + static_cast<uint32_t>(k)) ^ keys.key0, high);
      ra = round_up_if(va, u);
      rg = round_up_if(vg, u);
    } else {
      ra = std::nearbyint(va);
      rg = std::nearbyint(vg);
    }
    fake_a[j] = fake_on<PerElement>(a, ra, k);
    fake_b[j] = fake_on<PerElement>(g, rg, k);
  }
}

std::tuple<Tensor, Tensor> quantize_int_pair(const Tensor& x3, const Tensor& scale_a,
                                             const Tensor& zero_point_a, int64_t qmin_a,
                                             int64_t qmax_a, const Tensor& scale_b,
                                             const Tensor& zero_point_b, int64_t qmin_b,
                                             int64_t qmax_b, std::optional<int64_t> seed) {
  check_view(x3, "qtrain::quantize_int_pair");
  check_params(x3, scale_a, zero_point_a, "qtrain::quantize_int_pair");
  check_params(x3, scale_b, zero_point_b, "qtrain::quantize_int_pair");
  TORCH_CHECK(qmin_a <= qmax_a && qmin_b <= qmax_b, "qtrain::quantize_int_pair: qmin > qmax");
  Tensor fake_a = empty_output(x3.sizes(), at::kFloat);
  Tensor fake_b = empty_output(x3.sizes(), at::kFloat);
  const std::vector<float> inverse_a = inverses(scale_a);
  const std::vector<float> inverse_b = inverses(scale_b);
  const Grid a{scale_a.data_ptr<float>(), inverse_a.data(), zero_point_a.data_ptr<float>(),
               static_cast<float>(qmin_a), static_cast<float>(qmax_a)};
  const Grid g{scale_b.data_ptr<float>(), inverse_b.data(), zero_point_b.data_ptr<float>(),
               static_cast<float>(qmin_b), static_cast<float>(qmax_b)};
  const Keys keys = seed ? seed_keys(*seed) : Keys{};
  const float* x = x3.data_ptr<float>();
  float* out_a = fake_a.data_ptr<float>();
  float* out_b = fake_b.data_ptr<float>();
  const int64_t channels = x3.size(1);
  const int64_t inner = x3.size(2);
  with_bool(seed.has_value(), [&](auto stochastic) {
    constexpr bool kStochastic = decltype(stochastic)::value;
    parallel_chunks(x3.numel(), plan_chunks(x3.numel()), [&](int64_t begin, int64_t end, int) {
      for_each_run(begin, end, channels, inner, [&](int64_t b, int64_t e, int64_t c) {
        if (inner == 1) {
          quantize_int_pair_run<kStochastic, true>(x, out_a, out_b, b, e, grid_at(a, c),
                                                   grid_at(g, c), keys);
        } else {
          quantize_int_pair_run<kStochastic, false>(x, out_a, out_b, b, e, grid_at(a, c),
                                                    grid_at(g, c), keys);
        }
      });
    });
  });
  return {fake_a, fake_b};
}

template <bool PerElement, class Level>
void dequantize_run(const Level* __restrict q, float* __restrict y, int64_t b, int64_t e,
                    const float* __restrict scale, const float* __restrict zero_point) {
#pragma omp simd
  for (int64_t k = 0; k < e - b; ++k) {
    const float level = static_cast<float>(q[b + k]);
    y[b + k] = (level - param<PerElement>(zero_point, k)) * param<PerElement>(scale, k);
  }
}

// x̂ = (level - z) * s from stored levels: bit-identical to quantize_int's fake output.
Tensor dequantize_int(const Tensor& levels3, const Tensor& scale, const Tensor& zero_point) {
  TORCH_CHECK(levels3.device().is_cpu() && levels3.dim() == 3 && levels3.is_contiguous(),
              "qtrain::dequantize_int: expected a contiguous (O, C, I) CPU tensor");
  check_params(levels3, scale, zero_point, "qtrain::dequantize_int");
  Tensor out = empty_output(levels3.sizes(), at::kFloat);
  float* y = out.data_ptr<float>();
  const float* s = scale.data_ptr<float>();
  const float* z = zero_point.data_ptr<float>();
  const int64_t channels = levels3.size(1);
  const int64_t inner = levels3.size(2);
  with_level_type(levels3.scalar_type(), [&](auto* level_ptr) {
    using Level = std::remove_pointer_t<decltype(level_ptr)>;
    if constexpr (!std::is_void_v<Level>) {
      const auto* q = static_cast<const Level*>(levels3.data_ptr());
      const int64_t numel = levels3.numel();
      parallel_chunks(numel, plan_chunks(numel), [&](int64_t begin, int64_t end, int) {
        for_each_run(begin, end, channels, inner, [&](int64_t b, int64_t e, int64_t c) {
          if (inner == 1) {
            dequantize_run<true>(q, y, b, e, s + c, z + c);
          } else {
            dequantize_run<false>(q, y, b, e, s + c, z + c);
          }
        });
      });
    }
  });
  return out;
}

// ---- one GEMM operand to int8 levels (qtrain.lowp) ------------------------------------------

// qtrain.lowp's _quantize_twin for int8 levels: a float32 (R, K) operand becomes row-major int8
// levels (R, K) and a scale per row (rowwise) or one for the whole tensor:
//   s = amax / bound, FLT_MIN where below it, 1 where amax == 0 (NaN and inf stay);
//   level = clamp(round(a · (1/s)), −bound, bound), NaN stored as 0;
// round is nearest-even, or stochastic with the uniform of the level's flat (R, K) index.
// amax is the largest bit pattern of |a| (reduce_channels), so a row holding a NaN has a NaN
// scale, the row's largest |NaN| quieted (0x7FC00000 for float('nan') or -nan), and levels 0.
// torch's NaN bits depend on its reduction path: for float('nan') 0x7FC00000 too in a
// contiguous operand or per tensor, but 0xFFFFFFFF (its vectorised maximum ORs in all ones) in
// most rows of a transposed one. Only that a scale is NaN is matched, not its bits.
//
// Two layouts are read in place: a contiguous operand, and the transpose of a contiguous
// matrix (grad-weight's gᵀ and xᵀ), whose row r is column r of the stored (K, R) matrix.
// Contiguous and rowwise: one read, each row's amax then its levels while the row is in
// cache. Otherwise a first read for the amax (per-tensor: of the flat memory; transposed and
// rowwise: the column maxima, streaming the stored rows), then the levels: flat chunks, or
// for the transpose tiles of kTileRows × kTileCols values turned in a buffer so that each tile
// row is quantized as a contiguous run of its output row.

constexpr float kTiny = std::numeric_limits<float>::min();  // torch.finfo(float32).tiny

inline float scale_from_amax(uint32_t amax_bits, float bound) {
  const float amax = float_of(amax_bits);
  const float scale = amax / bound;
  if (amax == 0.0f) return 1.0f;
  return scale < kTiny ? kTiny : scale;
}

// A clamped level stored as Level: int8_t, or float holding the value that int8 level converts
// to: NaN stored as 0 in both, and -0 as +0 (-0 + 0 is +0). Not float(int32(level)): with
// -fno-trapping-math and SSE4.1, GCC rewrites that as truncf(level), which keeps -0.
template <class Level>
inline Level int8_level(float level) {
  if constexpr (std::is_same_v<Level, float>) {
    return (level == level ? level : 0.0f) + 0.0f;
  } else {
    return to_level<int8_t>(level);
  }
}

// Nearest int8 levels of x[0, n): round(x[k]·inverse) half to even, clamped to ±bound, NaN
// stored as 0 — with one inverse scale (inverse[0]) or, PerValue, one per value (inverse[k]).
// With AVX-512, 64 values at a time, each 16 converted in registers and the 64 bytes stored
// at once, with masked tails: the auto-vectorised loop also steps 64 values, but runs the rest
// scalar, so rows of 144 or 288 values (a convolution's im2col rows) ran a ninth to a sixth of
// their values, and rows of 32 all of them, in its scalar epilogue; and converting 16 values
// straight to memory (vpmovdb) is slow on AMD's Zen.
template <bool PerValue>
void nearest_levels(const float* __restrict x, int8_t* __restrict q, int64_t n,
                    const float* __restrict inverse, float bound) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  const __m512 high = _mm512_set1_ps(bound), low = _mm512_set1_ps(-bound);
  const __m512 one_inverse = _mm512_set1_ps(inverse[0]);
  const auto levels16 = [&](int64_t k, __mmask16 lanes) {
    const __m512 scale = PerValue ? _mm512_maskz_loadu_ps(lanes, inverse + k) : one_inverse;
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, x + k), scale);
    __m512 level = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    level = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(level, level, _CMP_ORD_Q), level);
    level = _mm512_min_ps(_mm512_max_ps(level, low), high);
    return _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(level));
  };
  constexpr __mmask16 all = 0xFFFF;
  int64_t k = 0;
  for (; k + 64 <= n; k += 64) {
    __m512i bytes = _mm512_castsi128_si512(levels16(k, all));
    bytes = _mm512_inserti32x4(bytes, levels16(k + 16, all), 1);
    bytes = _mm512_inserti32x4(bytes, levels16(k + 32, all), 2);
    bytes = _mm512_inserti32x4(bytes, levels16(k + 48, all), 3);
    _mm512_storeu_si512(q + k, bytes);
  }
  if (k == n) return;
  // The last n − k < 64 values: only the 16-value parts that hold some.
  const int64_t left = n - k;
  const auto part = [&](int64_t first) {
    return static_cast<__mmask16>(left - first >= 16 ? all : (1u << (left - first)) - 1u);
  };
  __m512i bytes = _mm512_castsi128_si512(levels16(k, part(0)));
  if (left > 16) bytes = _mm512_inserti32x4(bytes, levels16(k + 16, part(16)), 1);
  if (left > 32) bytes = _mm512_inserti32x4(bytes, levels16(k + 32, part(32)), 2);
  if (left > 48) bytes = _mm512_inserti32x4(bytes, levels16(k + 48, part(48)), 3);
  _mm512_mask_storeu_epi8(q + k, (__mmask64{1} << left) - 1, bytes);
#else
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const float v = x[k] * (PerValue ? inverse[k] : inverse[0]);
    q[k] = int8_level<int8_t>(clamp_level(std::nearbyint(v), -bound, bound));
  }
#endif
}

// Levels of x[0, n) into q[0, n) (int8_t or float, see int8_level); x[k] is element first + k
// of the flat (R, K) output, and [first, first + n) crosses no multiple of 2^32 (the RNG's high
// counter word is constant).
template <bool Stochastic, class Level>
void int8_levels_run(const float* __restrict x, Level* __restrict q, int64_t n, int64_t first,
                     float inverse, float bound, Keys keys) {
  if constexpr (!Stochastic && std::is_same_v<Level, int8_t>) {
    return nearest_levels<false>(x, q, n, &inverse, bound);
  }
  const uint32_t low0 = static_cast<uint32_t>(first);
  const uint32_t high = static_cast<uint32_t>(static_cast<uint64_t>(first) >> 32) + keys.key1;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const float v = x[k] * inverse;
    float rounded;
    if constexpr (Stochastic) {
      rounded = round_stochastic(v, (low0 + static_cast<uint32_t>(k)) ^ keys.key0, high);
    } else {
      rounded = std::nearbyint(v);  // round half to even, as torch.round
    }
    q[k] = int8_level<Level>(clamp_level(rounded, -bound, bound));
  }
}

// int8_levels_run over any span of the flat output, cut at the multiples of 2^32.
template <bool Stochastic, class Level>
void int8_levels(const float* x, Level* q, int64_t n, int64_t first, float inverse, float bound,
                 Keys keys) {
  while (n > 0) {
    const int64_t run = std::min(n, (((first >> 32) + 1) << 32) - first);
    int8_levels_run<Stochastic>(x, q, run, first, inverse, bound, keys);
    x += run;
    q += run;
    first += run;
    n -= run;
  }
}

// max |x| over x[0, n) as a bit pattern (NaN above inf).
uint32_t abs_bits_max(const float* x, int64_t n) {
  int32_t unused_low = 0;
  int32_t unused_high = 0;
  uint32_t abs_bits = 0;
  reduce_run<false>(x, 0, n, &unused_low, &unused_high, &abs_bits);
  return abs_bits;
}

template <bool Stochastic, class Level>
void int8_rows_contiguous(const float* a, Level* q, float* scale, int64_t rows, int64_t cols,
                          float bound, Keys keys) {
  at::parallel_for(0, rows, std::max<int64_t>(1, kMinPerThread / cols), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float* row = a + r * cols;
      scale[r] = scale_from_amax(abs_bits_max(row, cols), bound);
      int8_levels<Stochastic>(row, q + r * cols, cols, r * cols, 1.0f / scale[r], bound, keys);
    }
  });
}

// Tiles of the transposed operand: kTileRows output rows (one 64-byte line of each stored row)
// by kTileCols output columns (one line of each output row).
constexpr int64_t kTileRows = 16;
constexpr int64_t kTileCols = 64;

// Eight floats as one vector of GCC's generic vector extension: the 8 × 8 transpose below is
// written once and compiles to the target's shuffles (AVX: unpack, shufps, vperm2f128).
using Float8 = float __attribute__((vector_size(32)));

inline Float8 load8(const float* p) {
  Float8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// out[i][j] = in[j][i] for the 8 × 8 blocks at `in` and `out`, rows in_stride and out_stride
// floats apart.
void transpose8x8(const float* __restrict in, int64_t in_stride, float* __restrict out,
                  int64_t out_stride) {
  Float8 r[8];
  for (int i = 0; i < 8; ++i) r[i] = load8(in + i * in_stride);
  Float8 pairs[8];  // interleaved pairs of rows (unpacklo / unpackhi)
  for (int i = 0; i < 8; i += 2) {
    pairs[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    pairs[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  Float8 quads[8];  // four rows' values of a column, in each 128-bit half
  for (int i = 0; i < 8; i += 4) {
    for (int j = 0; j < 2; ++j) {
      quads[i + 2 * j] = __builtin_shufflevector(pairs[i + j], pairs[i + j + 2], 0, 1, 8, 9, 4, 5,
                                                 12, 13);
      quads[i + 2 * j + 1] = __builtin_shufflevector(pairs[i + j], pairs[i + j + 2], 2, 3, 10,
                                                     11, 6, 7, 14, 15);
    }
  }
  for (int j = 0; j < 4; ++j) {
    const Float8 low = __builtin_shufflevector(quads[j], quads[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    const Float8 high =
        __builtin_shufflevector(quads[j], quads[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    std::memcpy(out + j * out_stride, &low, sizeof low);
    std::memcpy(out + (j + 4) * out_stride, &high, sizeof high);
  }
}

// tile[r][k] = stored[k][r] for r < rows, k < cols, stored rows `stride` floats apart: whole
// tiles by 8 × 8 blocks, the ragged ones at the edges value by value.
void turn_tile(const float* __restrict stored, int64_t stride, int64_t rows, int64_t cols,
               float* __restrict tile) {
  if (rows == kTileRows && cols == kTileCols) {
    for (int64_t k = 0; k < kTileCols; k += 8) {
      for (int64_t r = 0; r < kTileRows; r += 8) {
        transpose8x8(stored + k * stride + r, stride, tile + r * kTileCols + k, kTileCols);
      }
    }
    return;
  }
  for (int64_t k = 0; k < cols; ++k) {
    for (int64_t r = 0; r < rows; ++r) tile[r * kTileCols + k] = stored[k * stride + r];
  }
}

// Levels of a = storedᵀ, stored a contiguous (K, R) matrix; threads take bands of kTileCols
// stored rows, which are contiguous memory.
template <bool Stochastic, class Level>
void int8_rows_transposed(const float* stored, Level* q, const float* inverse, int64_t rows,
                          int64_t cols, float bound, Keys keys) {
  const int64_t bands = (cols + kTileCols - 1) / kTileCols;
  const int64_t grain = std::max<int64_t>(1, kMinPerThread / (kTileCols * rows));
  at::parallel_for(0, bands, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float tile[kTileRows * kTileCols];
    for (int64_t band = begin; band < end; ++band) {
      const int64_t k0 = band * kTileCols;
      const int64_t width = std::min(kTileCols, cols - k0);
      for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
        const int64_t height = std::min(kTileRows, rows - r0);
        turn_tile(stored + k0 * rows + r0, rows, height, width, tile);
        for (int64_t r = 0; r < height; ++r) {
          const int64_t row = r0 + r;
          int8_levels<Stochastic>(tile + r * kTileCols, q + row * cols + k0, width,
                                  row * cols + k0, inverse[row], bound, keys);
        }
      }
    }
  });
}

// Per-tensor levels of a contiguous operand: flat chunks with the one scale.
template <bool Stochastic, class Level>
void int8_flat(const float* a, Level* q, int64_t numel, float inverse, float bound, Keys keys) {
  parallel_chunks(numel, plan_chunks(numel), [&](int64_t begin, int64_t end, int) {
    int8_levels<Stochastic>(a + begin, q + begin, end - begin, begin, inverse, bound, keys);
  });
}

// (levels, scale) of a 2-D floating-point operand (converted to float32 first, as
// a.to(torch.float32)); bound: one value in [1, 127]; keys: the two 32-bit hash keys of
// lowp_products._hash_keys (int64), for stochastic rounding; levels_dtype: int8, or float32 for the
// same levels as exact float values (what the emulated product multiplies: writing them
// directly saves torch's int8 -> float32 conversion, a pass slower than this one). An empty
// operand has scale 1 (the amax of no values is 0): (R,) ones rowwise, [1] per tensor.
std::tuple<Tensor, Tensor> quantize_rows_int8(const Tensor& a_in, const Tensor& bound_in,
                                              bool rowwise, const std::optional<Tensor>& keys_in,
                                              at::ScalarType levels_dtype) {
  const char* what = "qtrain::quantize_rows_int8";
  TORCH_CHECK(levels_dtype == at::kChar || levels_dtype == at::kFloat, what,
              ": levels_dtype must be int8 or float32, got ", levels_dtype);
  TORCH_CHECK(a_in.device().is_cpu() && a_in.dim() == 2 && at::isFloatingType(a_in.scalar_type()),
              what, ": expected a 2-D floating-point CPU tensor");
  TORCH_CHECK(bound_in.device().is_cpu() && bound_in.numel() == 1, what,
              ": bound must be a CPU tensor of one value");
  const float bound = bound_in.item<float>();
  TORCH_CHECK(bound >= 1.0f && bound <= 127.0f, what, ": bound must be in [1, 127], got ", bound);
  Keys keys;
  if (keys_in) {
    TORCH_CHECK(keys_in->device().is_cpu() && keys_in->scalar_type() == at::kLong &&
                    keys_in->numel() == 2,
                what, ": keys must be an int64 CPU tensor of two values");
    const Tensor pair = keys_in->contiguous();
    keys.key0 = static_cast<uint32_t>(pair.data_ptr<int64_t>()[0]);
    keys.key1 = static_cast<uint32_t>(pair.data_ptr<int64_t>()[1]);
  }
  Tensor a = a_in.to(at::kFloat);  // no copy for float32; strides kept otherwise
  const int64_t rows = a.size(0);
  const int64_t cols = a.size(1);
  Tensor levels = empty_output({rows, cols}, levels_dtype);
  Tensor scale = at::empty({rowwise ? rows : 1}, at::kFloat);
  if (a.numel() == 0) return {levels, scale.fill_(1.0f)};
  const bool transposed = !a.is_contiguous() && a.t().is_contiguous();
  const Tensor stored = transposed ? a.t() : a.contiguous();
  const float* x = stored.data_ptr<float>();
  float* s = scale.data_ptr<float>();
  const auto run = [&](auto* q, auto stochastic) {
    constexpr bool kStochastic = decltype(stochastic)::value;
    if (rowwise && !transposed) {
      int8_rows_contiguous<kStochastic>(x, q, s, rows, cols, bound, keys);
      return;
    }
    std::vector<float> inverse(rows);
    if (rowwise) {  // column maxima of the stored (K, R) matrix
      const Extremes extremes = reduce_channels<false>(stored.view({cols, rows, 1}), what);
      for (int64_t r = 0; r < rows; ++r) {
        s[r] = scale_from_amax(extremes.abs_bits[r], bound);
        inverse[r] = 1.0f / s[r];
      }
    } else {
      const Extremes extremes = reduce_channels<false>(stored.view({1, 1, rows * cols}), what);
      s[0] = scale_from_amax(extremes.abs_bits[0], bound);
      std::fill(inverse.begin(), inverse.end(), 1.0f / s[0]);
    }
    if (transposed) {
      int8_rows_transposed<kStochastic>(x, q, inverse.data(), rows, cols, bound, keys);
    } else {
      int8_flat<kStochastic>(x, q, rows * cols, inverse[0], bound, keys);
    }
  };
  with_bool(keys_in.has_value(), [&](auto stochastic) {
    if (levels_dtype == at::kFloat) {
      run(levels.data_ptr<float>(), stochastic);
    } else {
      run(levels.data_ptr<int8_t>(), stochastic);
    }
  });
  return {levels, scale};
}

// ---- im2col and its adjoint (qtrain.lowp's convolutions) -----------------------------------

// qtrain.lowp runs a convolution as matrix products on x's im2col matrix, built here from
// channels-last x (B, H, W, C in memory): row r is output pixel (b, oh, ow) in that order, and
// its columns (i, j, c) hold, for each kernel offset (i, j), the C channels of input pixel
// (oh·sh − ph + i·dh, ow·sw − pw + j·dw), zeros where that lies in the padding. (F.unfold orders
// columns (c, i, j): a weight row must be permuted to (i, j, c) to match.) Each block (i, j) is
// then one copy of C contiguous floats, and with dilation_w 1 a kernel row's kw blocks are one
// copy of kw·C, so im2col runs at memory speed; threads take bands of rows.
//
// col2im is its adjoint, the gradient of x from that of the matrix: every block added back onto
// its input pixel, padding dropped. Threads own bands of input rows (b, h) of the channels-last
// output (whole images, but for the ends of their bands) so no two write one pixel, without
// atomics: a band is zeroed, then the matrix rows that reach it are read in order, each adding
// the kernel rows that land in the band (kw·C values onto kw adjacent pixels when dilation_w
// is 1). Reading rows in order streams the matrix, and a pixel's channel vector is 0 + its
// blocks in the order of the rows (b, oh, ow) that hold them (no row holds two), however the
// rows are cut into bands: results are bitwise the same on any number of threads. (F.fold sums
// in its own order: the two agree within float32 rounding.)

struct Conv2dGeometry {
  int64_t batch, channels, height, width;
  std::array<int64_t, 2> kernel, stride, padding, dilation;
  std::array<int64_t, 2> out;  // H', W'

  int64_t rows() const { return batch * out[0] * out[1]; }
  int64_t cols() const { return kernel[0] * kernel[1] * channels; }
};

std::array<int64_t, 2> pair_arg(const char* what, const char* name, at::IntArrayRef values,
                                int64_t least) {
  TORCH_CHECK(values.size() == 2 && values[0] >= least && values[1] >= least, what, ": ", name,
              " must be two ints >= ", least, ", got ", values);
  return {values[0], values[1]};
}

// Checks the parameters (each error names its parameter) and computes the output size
// H' = (H + 2p − d·(k − 1) − 1) / s + 1 (floor), which must be at least 1, as F.unfold requires.
Conv2dGeometry conv2d_geometry(const char* what, at::IntArrayRef x_shape, at::IntArrayRef kernel,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation) {
  Conv2dGeometry g;
  g.batch = x_shape[0];
  g.channels = x_shape[1];
  g.height = x_shape[2];
  g.width = x_shape[3];
  g.kernel = pair_arg(what, "kernel", kernel, 1);
  g.stride = pair_arg(what, "stride", stride, 1);
  g.padding = pair_arg(what, "padding", padding, 0);
  g.dilation = pair_arg(what, "dilation", dilation, 1);
  const std::array<int64_t, 2> size = {g.height, g.width};
  for (int d = 0; d < 2; ++d) {
    const int64_t extent = g.dilation[d] * (g.kernel[d] - 1) + 1;
    const int64_t padded = size[d] + 2 * g.padding[d];
    TORCH_CHECK(extent <= padded, what, ": the dilated kernel (", extent, ") is larger than the ",
                d == 0 ? "height" : "width", " with padding (", padded, ")");
    g.out[d] = (padded - extent) / g.stride[d] + 1;
  }
  return g;
}

// For each output column ow, the kernel columns [j_begin, j_end) whose input column
// ow·sw − pw + j·dw lies inside the image (the others read padding).
std::vector<std::pair<int64_t, int64_t>> kernel_columns_inside(const Conv2dGeometry& g) {
  std::vector<std::pair<int64_t, int64_t>> ranges(g.out[1]);
  const int64_t kernel_w = g.kernel[1], dilation_w = g.dilation[1];
  for (int64_t ow = 0; ow < g.out[1]; ++ow) {
    const int64_t left = ow * g.stride[1] - g.padding[1];  // input column of j = 0
    const int64_t first = std::min(kernel_w, left >= 0 ? 0 : (dilation_w - 1 - left) / dilation_w);
    const int64_t last = left >= g.width ? 0 : (g.width - 1 - left) / dilation_w + 1;
    ranges[ow] = {first, std::max(first, std::min(kernel_w, last))};
  }
  return ranges;
}

// Blocks j_begin .. j_end − 1 of a kernel row, in runs whose input pixels are adjacent in
// memory (all of them when dilation_w is 1, else one at a time): run(j, blocks).
template <class Run>
void for_each_block_run(int64_t j_begin, int64_t j_end, int64_t dilation_w, const Run& run) {
  const int64_t blocks = dilation_w == 1 ? std::max<int64_t>(1, j_end - j_begin) : 1;
  for (int64_t j = j_begin; j < j_end; j += blocks) run(j, blocks);
}

// n values of a pixel run into a block of the float32 row (a bfloat16 x widened exactly).
// float32 with AVX-512: 16 at a time, the tail masked — the plain loop compiles to a memmove
// call, whose set-up costs as much as a run of a few pixels' channels.
template <class T, class Out>
inline void copy_channels(const T* __restrict pixel, Out* __restrict block, int64_t n) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  if constexpr (std::is_same_v<T, float> && std::is_same_v<Out, float>) {
    for (int64_t c = 0; c < n; c += 16) {
      const auto lanes = static_cast<__mmask16>(n - c >= 16 ? 0xFFFFu : (1u << (n - c)) - 1u);
      _mm512_mask_storeu_ps(block + c, lanes, _mm512_maskz_loadu_ps(lanes, pixel + c));
    }
    return;
  }
#endif
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) block[c] = static_cast<Out>(pixel[c]);
}

// The output pixel (b, oh, ow) of im2col row r = (b·H' + oh)·W' + ow, stepped row by row
// without the three divisions that finding it from r takes.
struct OutputPixel {
  OutputPixel(const Conv2dGeometry& g, int64_t r)
      : b(r / (g.out[0] * g.out[1])), oh(r / g.out[1] % g.out[0]), ow(r % g.out[1]) {}
  void next(const Conv2dGeometry& g) {
    if (++ow < g.out[1]) return;
    ow = 0;
    if (++oh < g.out[0]) return;
    oh = 0;
    ++b;
  }
  int64_t b, oh, ow;
};

// The im2col row of output pixel p of channels-last x (at `x`) into `row` (g.cols()
// values): each kernel row's blocks copied, `pad` where they read padding.
template <class T, class Out>
void im2col_row(const T* x, const Conv2dGeometry& g,
                const std::vector<std::pair<int64_t, int64_t>>& columns_inside,
                const OutputPixel& p, Out* __restrict row, Out pad = Out(0)) {
  const int64_t channels = g.channels, height = g.height, width = g.width;
  const int64_t block_row_values = g.kernel[1] * channels;
  const int64_t ow = p.ow, oh = p.oh;
  const T* image = x + p.b * height * width * channels;
  const int64_t left = ow * g.stride[1] - g.padding[1];  // input column of j = 0
  const auto [j_begin, j_end] = columns_inside[ow];
  for (int64_t i = 0; i < g.kernel[0]; ++i) {
    Out* block_row = row + i * block_row_values;
    const int64_t h = oh * g.stride[0] - g.padding[0] + i * g.dilation[0];
    if (h < 0 || h >= height) {
      std::fill(block_row, block_row + block_row_values, pad);
      continue;
    }
    std::fill(block_row, block_row + j_begin * channels, pad);
    const T* pixels = image + h * width * channels;
    for_each_block_run(j_begin, j_end, g.dilation[1], [&](int64_t j, int64_t blocks) {
      copy_channels(pixels + (left + j * g.dilation[1]) * channels, block_row + j * channels,
                    blocks * channels);
    });
    std::fill(block_row + j_end * channels, block_row + block_row_values, pad);
  }
}

// The end of rows [row_begin, row_end) of the im2col matrix (None: its last row), checked.
int64_t row_range_end(const char* what, const Conv2dGeometry& g, int64_t row_begin,
                      std::optional<int64_t> row_end_in) {
  const int64_t row_end = row_end_in.value_or(g.rows());
  TORCH_CHECK(0 <= row_begin && row_begin <= row_end && row_end <= g.rows(), what,
              ": rows must satisfy 0 <= row_begin <= row_end <= ", g.rows(), ", got [",
              row_begin, ", ", row_end, ")");
  return row_end;
}

// x: a float32 or int8 (B, C, H, W) tensor, read as channels-last (other layouts are copied
// to it first). Returns the row-major (B·H'·W', kh·kw·C) matrix described above in x's dtype;
// values are copied bit for bit (NaN, inf and -0 included); padding reads +0, or pad_value
// for int8 (integer levels shifted by an offset: the padding's shifted zero).
// rows [row_begin, row_end) only (row_end None: to the last), for products run in pieces.
Tensor im2col_nhwc(const Tensor& x_in, at::IntArrayRef kernel, at::IntArrayRef stride,
                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t row_begin,
                   std::optional<int64_t> row_end_in, int64_t pad_value) {
  const char* what = "qtrain::im2col_nhwc";
  TORCH_CHECK(x_in.device().is_cpu(), what, ": x must be a CPU tensor");
  TORCH_CHECK(x_in.dim() == 4, what, ": x must be (B, C, H, W), got ", x_in.dim(), " dims");
  const bool levels = x_in.scalar_type() == at::kChar;
  TORCH_CHECK(levels || x_in.scalar_type() == at::kFloat, what,
              ": x must be float32 or int8, got ", x_in.scalar_type());
  TORCH_CHECK(levels ? -128 <= pad_value && pad_value <= 127 : pad_value == 0, what,
              ": pad_value must be 0 for float32 x and in [-128, 127] for int8 x, got ",
              pad_value);
  const Conv2dGeometry g = conv2d_geometry(what, x_in.sizes(), kernel, stride, padding, dilation);
  const int64_t row_end = row_range_end(what, g, row_begin, row_end_in);
  Tensor out = empty_output({row_end - row_begin, g.cols()}, x_in.scalar_type());
  if (out.numel() == 0) return out;
  const Tensor x_nhwc = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t row_values = g.cols();
  const auto columns_inside = kernel_columns_inside(g);
  const int64_t grain = std::max<int64_t>(1, kMinPerThread / row_values);
  const auto unfold = [&](const auto* x, auto* y, auto pad) {
    at::parallel_for(0, row_end - row_begin, grain, [&](int64_t begin, int64_t end) {
      OutputPixel pixel(g, row_begin + begin);
      for (int64_t r = begin; r < end; ++r, pixel.next(g)) {
        im2col_row(x, g, columns_inside, pixel, y + r * row_values, pad);
      }
    });
  };
  if (levels) {
    unfold(x_nhwc.data_ptr<int8_t>(), out.data_ptr<int8_t>(), static_cast<int8_t>(pad_value));
  } else {
    unfold(x_nhwc.data_ptr<float>(), out.data_ptr<float>(), 0.0f);
  }
  return out;
}

inline void add_channels(const float* __restrict block, float* __restrict pixel, int64_t n) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) pixel[c] += block[c];
}

// Input rows [h_begin, h_end) of image b's gradient (channels-last, at `image`): zeros, then
// every block of the matrix rows (b, oh, ·) that lands on them, rows in order.
// add_run(row, col, pixels, n) adds values col .. col + n − 1 of matrix row `row` (the global
// row index (b·H' + oh)·W' + ow) onto the n floats at `pixels`.
template <class AddRun>
void col2im_band(const AddRun& add_run, float* image, const Conv2dGeometry& g,
                 const std::vector<std::pair<int64_t, int64_t>>& columns_inside, int64_t b,
                 int64_t h_begin, int64_t h_end) {
  const int64_t channels = g.channels, width = g.width, kernel_w = g.kernel[1];
  const int64_t pixel_row_values = width * channels;
  std::fill(image + h_begin * pixel_row_values, image + h_end * pixel_row_values, 0.0f);
  // The output rows oh whose kernel rows reach [h_begin, h_end): oh·sh − ph + i·dh in it.
  const int64_t reach = h_begin + g.padding[0] - (g.kernel[0] - 1) * g.dilation[0];
  const int64_t oh_begin = reach <= 0 ? 0 : (reach + g.stride[0] - 1) / g.stride[0];
  const int64_t oh_end = std::min(g.out[0], (h_end - 1 + g.padding[0]) / g.stride[0] + 1);
  for (int64_t oh = oh_begin; oh < oh_end; ++oh) {
    for (int64_t ow = 0; ow < g.out[1]; ++ow) {
      const int64_t row = (b * g.out[0] + oh) * g.out[1] + ow;
      const int64_t left = ow * g.stride[1] - g.padding[1];  // input column of j = 0
      const auto [j_begin, j_end] = columns_inside[ow];
      for (int64_t i = 0; i < g.kernel[0]; ++i) {
        const int64_t h = oh * g.stride[0] - g.padding[0] + i * g.dilation[0];
        if (h < h_begin || h >= h_end) continue;
        const int64_t block_row = i * kernel_w * channels;
        float* pixels = image + h * pixel_row_values;
        for_each_block_run(j_begin, j_end, g.dilation[1], [&](int64_t j, int64_t blocks) {
          add_run(row, block_row + j * channels, pixels + (left + j * g.dilation[1]) * channels,
                  blocks * channels);
        });
      }
    }
  }
}

// cols: the float32 (B·H'·W', kh·kw·C) gradient of im2col_nhwc(x) for an x of x_shape
// (B, C, H, W). Returns x's float32 gradient (B, C, H, W), channels-last in memory.
Tensor col2im_nhwc(const Tensor& cols_in, at::IntArrayRef x_shape, at::IntArrayRef kernel,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* what = "qtrain::col2im_nhwc";
  TORCH_CHECK(x_shape.size() == 4 && *std::min_element(x_shape.begin(), x_shape.end()) >= 0,
              what, ": x_shape must be four sizes (B, C, H, W), got ", x_shape);
  const Conv2dGeometry g = conv2d_geometry(what, x_shape, kernel, stride, padding, dilation);
  TORCH_CHECK(cols_in.device().is_cpu(), what, ": cols must be a CPU tensor");
  TORCH_CHECK(cols_in.scalar_type() == at::kFloat, what, ": cols must be float32, got ",
              cols_in.scalar_type());
  TORCH_CHECK(cols_in.dim() == 2 && cols_in.size(0) == g.rows() && cols_in.size(1) == g.cols(),
              what, ": cols must be the (B·H'·W', kh·kw·C) = (", g.rows(), ", ", g.cols(),
              ") matrix of x_shape ", x_shape, ", got ", cols_in.sizes());
  const int64_t height = g.height, image_values = height * g.width * g.channels;
  Tensor out = empty_output({g.batch, height, g.width, g.channels}, at::kFloat);
  if (out.numel() == 0) return out.permute({0, 3, 1, 2});
  const Tensor cols = cols_in.contiguous();
  const float* dy = cols.data_ptr<float>();
  float* dx = out.data_ptr<float>();
  const int64_t row_values = g.cols();
  const auto add_run = [&](int64_t row, int64_t col, float* pixels, int64_t n) {
    add_channels(dy + row * row_values + col, pixels, n);
  };
  const auto columns_inside = kernel_columns_inside(g);
  // Threads own bands of the B·H input rows: whole images, or parts at their bands' ends.
  const int64_t grain = std::max<int64_t>(1, kMinPerThread / (g.width * g.channels));
  at::parallel_for(0, g.batch * height, grain, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t b = begin / height, h_begin = begin % height;
      const int64_t h_end = std::min(height, h_begin + end - begin);
      col2im_band(add_run, dx + b * image_values, g, columns_inside, b, h_begin, h_end);
      begin += h_end - h_begin;
    }
  });
  return out.permute({0, 3, 1, 2});
}

// ---- qtrain.lowp's int8 convolutions: quantized im2col rows, fused epilogues --------------------

// The products of LowPrecisionConv2d on the CPU never build the float32 im2col matrix (k²
// times x): the forward and grad-weight operands come as int8 levels of its rows, each built
// in a buffer of the thread's and quantized while in cache; the grad-input product's int32
// result is scaled and folded back onto x's pixels in one pass (col2im's order, so bitwise
// col2im_nhwc of the scaled matrix); the others' scaled in one pass. Levels and scales are
// bitwise those of quantize_rows_int8 on the float32 matrix (nearest rounding).

// maxima[k] = max(maxima[k], |x[k]|'s bits) for k < n (NaN above inf), vectorised.
inline void fold_abs_bits(const float* __restrict x, uint32_t* __restrict maxima, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t magnitude = abs_bits_of(x[k]);
    const uint32_t current = maxima[k];
    maxima[k] = magnitude > current ? magnitude : current;
  }
}

float bound_value(const Tensor& bound_in, const char* what) {
  TORCH_CHECK(bound_in.device().is_cpu() && bound_in.numel() == 1, what,
              ": bound must be a CPU tensor of one value");
  const float bound = bound_in.item<float>();
  TORCH_CHECK(bound >= 1.0f && bound <= 127.0f, what, ": bound must be in [1, 127], got ", bound);
  return bound;
}

// Short rows (K = kh·kw·C up to kTileMaxCols, a first layer's 9 or 27 values): per-field
// loops of K values cost more in overhead than in work, so n adjacent fields of one output
// row (b, oh, ow .. ow + n − 1) are built as a (K, n) tile — value k of every field in one
// contiguous run — and the maxima, scales and levels run across the n fields; the levels are
// then written back row-major. The same operations on the same values as the per-field path.
constexpr int64_t kTileMaxCols = 32;
// Longer rows are built a block at a time: up to kBlockMaxRows rows, about kBlockValues floats.
constexpr int64_t kBlockMaxRows = 16;
constexpr int64_t kBlockValues = 4096;

struct FieldTile {
  explicit FieldTile(const Conv2dGeometry& geometry)
      : cols(geometry.cols()),
        width(geometry.out[1]),
        values(cols * width),
        levels(cols * width),
        amax(width),
        inverse(width) {}

  // Fields first .. first + n − 1 (global rows of the im2col matrix, one output row).
  template <class T>
  void build(const T* x, const Conv2dGeometry& g, int64_t first, int64_t count) {
    n = count;
    const int64_t ow0 = first % g.out[1], oh = first / g.out[1] % g.out[0];
    const int64_t b = first / (g.out[0] * g.out[1]), channels = g.channels;
    for (int64_t i = 0; i < g.kernel[0]; ++i) {
      const int64_t h = oh * g.stride[0] - g.padding[0] + i * g.dilation[0];
      const bool inside = h >= 0 && h < g.height;
      const T* line = x + (b * g.height + (inside ? h : 0)) * g.width * channels;
      const int64_t step = g.stride[1];
      for (int64_t j = 0; j < g.kernel[1]; ++j) {
        // Field idx reads column w = first_w + idx·step: inside the image for idx in
        // [begin, end), padding (zeros) on either side.
        const int64_t first_w = ow0 * step - g.padding[1] + j * g.dilation[1];
        int64_t begin = first_w >= 0 ? 0 : (-first_w + step - 1) / step;
        int64_t end = first_w >= g.width ? 0 : (g.width - first_w + step - 1) / step;
        end = inside ? std::min(end, n) : 0;
        begin = std::min(begin, end);
        for (int64_t c = 0; c < channels; ++c) {
          float* __restrict t = values.data() + ((i * g.kernel[1] + j) * channels + c) * n;
          std::fill(t, t + begin, 0.0f);
          const int64_t stride_values = step * channels;
          const int64_t w_begin = first_w + begin * step;  // inside the image when begin < end
          for (int64_t idx = begin; idx < end; ++idx) {
            t[idx] = static_cast<float>(line[w_begin * channels + c + (idx - begin) * stride_values]);
          }
          std::fill(t + end, t + n, 0.0f);
        }
      }
    }
  }

  // Levels into rows q[0 .. n) (row-major, K each): with row_scale, each field's scale from
  // its absmax (written there); else column_inverse's per-column scales. column_max: folds
  // each column's absmax bits in. q null: the levels stay in `levels` (value k of field idx
  // at k·n + idx).
  void quantize(int8_t* q, float* row_scale, const float* column_inverse, float bound,
                uint32_t* column_max) {
    if (row_scale != nullptr) {
      std::fill(amax.begin(), amax.begin() + n, 0u);
      for (int64_t k = 0; k < cols; ++k) fold_abs_bits(values.data() + k * n, amax.data(), n);
      for (int64_t idx = 0; idx < n; ++idx) {
        row_scale[idx] = scale_from_amax(amax[idx], bound);
        inverse[idx] = 1.0f / row_scale[idx];
      }
    }
    for (int64_t k = 0; k < cols; ++k) {
      const float* __restrict t = values.data() + k * n;
      int8_t* __restrict out = levels.data() + k * n;
      if (column_max != nullptr) column_max[k] = std::max(column_max[k], abs_bits_max(t, n));
      if (row_scale != nullptr) {
        nearest_levels<true>(t, out, n, inverse.data(), bound);
      } else {
        nearest_levels<false>(t, out, n, column_inverse + k, bound);
      }
    }
    if (q == nullptr) return;  // the levels stay in the tile (im2col_int8_product)
    for (int64_t idx = 0; idx < n; ++idx) {
      for (int64_t k = 0; k < cols; ++k) q[idx * cols + k] = levels[k * n + idx];
    }
  }

  int64_t cols, width, n = 0;
  std::vector<float> values;
  std::vector<int8_t> levels;
  std::vector<uint32_t> amax;
  std::vector<float> inverse;
};

// The arguments of the ops that quantize rows of x's im2col matrix, checked: x a float32 or
// bfloat16 (B, C, H, W) CPU tensor, its geometry, rows [row_begin, row_end) (None: to the
// last), a bound in [1, 127].
struct QuantizedRows {
  QuantizedRows(const char* what, const Tensor& x, at::IntArrayRef kernel, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t row_begin,
                std::optional<int64_t> row_end)
      : g(checked_geometry(what, x, kernel, stride, padding, dilation)),
        rows(row_range_end(what, g, row_begin, row_end) - row_begin),
        cols(g.cols()) {}

  static Conv2dGeometry checked_geometry(const char* what, const Tensor& x,
                                         at::IntArrayRef kernel, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation) {
    TORCH_CHECK(x.device().is_cpu() && x.dim() == 4, what,
                ": x must be a (B, C, H, W) CPU tensor");
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, what,
                ": x must be float32 or bfloat16, got ", x.scalar_type());
    return conv2d_geometry(what, x.sizes(), kernel, stride, padding, dilation);
  }

  // The ops that keep a tile's levels in the tile (im2col_int8_product, _grad_weight).
  void require_short(const char* what) const {
    TORCH_CHECK(cols <= kTileMaxCols, what, ": rows of kh·kw·C <= ", kTileMaxCols,
                " values only, got ", cols);
  }

  Conv2dGeometry g;
  int64_t rows, cols;
};

// An int8 (·, cols) CPU matrix: the other operand of a short-row op's product.
void check_int8_matrix(const Tensor& m, int64_t cols, const char* name, const char* what) {
  TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kChar && m.dim() == 2 &&
                  m.size(1) == cols,
              what, ": ", name, " must be an int8 (C_out, ", cols, ") CPU matrix, got ",
              m.scalar_type(), " ", m.sizes());
}

// Rows [row_begin, row_end) of im2col_nhwc(x) as int8 levels (row-major) and their scales:
// without column_scale, a scale per row from its absmax (quantize_rows_int8(rows, bound, true));
// with column_scale ((kh·kw·C,) float32), those scales per column (quantize_rows_int8 of the
// matrix's transpose with those scales, transposed back); then the scales returned are a copy.
// column_amax: also each column's absmax over these rows, as float32 bit patterns in int32
// (NaN above inf; empty otherwise) — the forward's rows give backward its column scales.
std::tuple<Tensor, Tensor, Tensor> im2col_int8(const Tensor& x_in, at::IntArrayRef kernel,
                                               at::IntArrayRef stride, at::IntArrayRef padding,
                                               at::IntArrayRef dilation, int64_t row_begin,
                                               std::optional<int64_t> row_end_in,
                                               const Tensor& bound_in,
                                               const std::optional<Tensor>& column_scale_in,
                                               bool column_amax) {
  const char* what = "qtrain::im2col_int8";
  const QuantizedRows checked(what, x_in, kernel, stride, padding, dilation, row_begin,
                              row_end_in);
  const Conv2dGeometry& g = checked.g;
  const int64_t rows = checked.rows, cols = checked.cols;
  const float bound = bound_value(bound_in, what);
  std::vector<float> inverse;
  Tensor scale;
  if (column_scale_in) {
    TORCH_CHECK(column_scale_in->device().is_cpu() &&
                    column_scale_in->scalar_type() == at::kFloat &&
                    column_scale_in->numel() == cols,
                what, ": column_scale must be a float32 CPU tensor of kh·kw·C = ", cols,
                " values");
    scale = column_scale_in->contiguous().clone();
    const float* s = scale.data_ptr<float>();
    inverse.resize(cols);
    for (int64_t k = 0; k < cols; ++k) inverse[k] = 1.0f / s[k];
  } else {
    scale = at::empty({rows}, at::kFloat);
  }
  Tensor levels = empty_output({rows, cols}, at::kChar);
  Tensor amax = at::zeros({column_amax ? cols : 0}, at::kInt);
  if (levels.numel() == 0) return {levels, scale, amax};
  const Tensor x_nhwc = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  int8_t* q = levels.data_ptr<int8_t>();
  float* s = scale.data_ptr<float>();
  uint32_t* column_max = column_amax ? reinterpret_cast<uint32_t*>(amax.data_ptr<int32_t>())
                                     : nullptr;
  std::mutex merge;
  const auto columns_inside = kernel_columns_inside(g);
  const auto build = [&](const auto* x) {
    const int64_t grain = std::max<int64_t>(1, kMinPerThread / cols);
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
      const int64_t block_rows = std::clamp<int64_t>(kBlockValues / cols, 1, kBlockMaxRows);
      std::vector<float> block(cols <= kTileMaxCols ? 0 : block_rows * cols);
      std::array<float, kBlockMaxRows> row_inverse;
      std::vector<uint32_t> maxima(column_amax ? cols : 0, 0u);
      if (cols <= kTileMaxCols) {  // short rows: a tile of fields at a time (see below)
        FieldTile tile(g);
        for (int64_t r = b; r < e;) {
          const int64_t ow = (row_begin + r) % g.out[1];
          const int64_t n = std::min(g.out[1] - ow, e - r);
          tile.build(x, g, row_begin + r, n);
          tile.quantize(q + r * cols, column_scale_in ? nullptr : s + r,
                        column_scale_in ? inverse.data() : nullptr, bound,
                        column_amax ? maxima.data() : nullptr);
          r += n;
        }
      } else {
        // A block of rows at a time: built, then every row's maximum, then their levels, so
        // that one row's chain (horizontal maximum → scale → division → levels) overlaps the
        // next rows' work instead of stalling on it (measured: 46 → ~30 ns a row of 144).
        OutputPixel pixel(g, row_begin + b);
        for (int64_t r0 = b; r0 < e; r0 += block_rows) {
          const int64_t n = std::min(block_rows, e - r0);
          for (int64_t t = 0; t < n; ++t, pixel.next(g)) {
            im2col_row(x, g, columns_inside, pixel, block.data() + t * cols);
          }
          if (column_amax) {
            for (int64_t t = 0; t < n; ++t) fold_abs_bits(block.data() + t * cols, maxima.data(), cols);
          }
          if (column_scale_in) {
            for (int64_t t = 0; t < n; ++t) {
              nearest_levels<true>(block.data() + t * cols, q + (r0 + t) * cols, cols,
                                  inverse.data(), bound);
            }
            continue;
          }
          for (int64_t t = 0; t < n; ++t) {
            s[r0 + t] = scale_from_amax(abs_bits_max(block.data() + t * cols, cols), bound);
          }
          for (int64_t t = 0; t < n; ++t) row_inverse[t] = 1.0f / s[r0 + t];
          for (int64_t t = 0; t < n; ++t) {
            int8_levels<false>(block.data() + t * cols, q + (r0 + t) * cols, cols, 0,
                               row_inverse[t], bound, Keys{});
          }
        }
      }
      if (column_amax) {
        const std::lock_guard<std::mutex> lock(merge);
        for (int64_t k = 0; k < cols; ++k) column_max[k] = std::max(column_max[k], maxima[k]);
      }
    });
  };
  if (x_nhwc.scalar_type() == at::kBFloat16) {
    build(x_nhwc.data_ptr<at::BFloat16>());
  } else {
    build(x_nhwc.data_ptr<float>());
  }
  return {levels, scale, amax};
}

// An accumulator's value as float32, rounded to nearest even as torch's .to(torch.float32).
template <class Acc>
inline float acc_float(Acc v) {
  return static_cast<float>(v);
}

// Calls f(pointer) with acc's data as its C++ type: int32 (torch._int_mm), int64 (summed
// int32 pieces), float32 or float64 (the emulated twin's exact float products).
template <class F>
void with_acc(const Tensor& acc, const char* what, const F& f) {
  switch (acc.scalar_type()) {
    case at::kInt: return f(acc.data_ptr<int32_t>());
    case at::kLong: return f(acc.data_ptr<int64_t>());
    case at::kFloat: return f(acc.data_ptr<float>());
    case at::kDouble: return f(acc.data_ptr<double>());
    default:
      TORCH_CHECK(false, what, ": acc must be int32, int64, float32 or float64, got ",
                  acc.scalar_type());
  }
}

// A (rows, cols) matrix whose rows may be apart (a slice of a wider one): its row stride.
int64_t row_stride(const Tensor& m, int64_t rows, int64_t cols, const char* name,
                   const char* what) {
  TORCH_CHECK(m.dim() == 2 && m.size(0) == rows && m.size(1) == cols, what, ": ", name,
              " must be (", rows, ", ", cols, "), got ", m.sizes());
  TORCH_CHECK(m.device().is_cpu() && (cols <= 1 || m.stride(1) == 1) &&
                  (rows <= 1 || m.stride(0) >= cols),
              what, ": ", name, " must be a CPU matrix with unit column stride");
  return rows <= 1 ? cols : m.stride(0);
}

// The per-row or per-column scales of an epilogue: `count` float32 values, or one (broadcast).
const float* scales_of(const Tensor& scale, int64_t count, const char* name, const char* what,
                       std::vector<float>& storage) {
  TORCH_CHECK(scale.device().is_cpu() && scale.scalar_type() == at::kFloat &&
                  (scale.numel() == count || scale.numel() == 1),
              what, ": ", name, " must hold ", count, " float32 values (or one), got ",
              scale.numel(), " of ", scale.scalar_type());
  const Tensor flat = scale.contiguous();
  storage.assign(count, 0.0f);
  const float* values = flat.data_ptr<float>();
  for (int64_t k = 0; k < count; ++k) storage[k] = values[scale.numel() == 1 ? 0 : k];
  return storage.data();
}

// An epilogue's optional bias: `count` float32 values (no broadcast), or nullptr without one.
const float* bias_of(const std::optional<Tensor>& bias, int64_t count, const char* what,
                     std::vector<float>& storage) {
  if (!bias) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == count, what,
              ": bias must hold ", count, " float32 values");
  return scales_of(*bias, count, "bias", what, storage);
}

// out[m, n] = float32(acc[m, n])·scale_a[m]·scale_b[n] (+ bias[n]), in that order: lowp's
// epilogue (acc.to(float32), then mul_ by scale_a, by scale_b, add_ bias) in one pass.
void int8_epilogue_out(const Tensor& acc, const Tensor& scale_a, const Tensor& scale_b,
                       const std::optional<Tensor>& bias, const Tensor& out) {
  const char* what = "qtrain::int8_epilogue_out";
  TORCH_CHECK(acc.dim() == 2, what, ": acc must be a matrix, got ", acc.dim(), " dims");
  const int64_t rows = acc.size(0), cols = acc.size(1);
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16, what,
              ": out must be float32 or bfloat16");
  const int64_t acc_stride = row_stride(acc, rows, cols, "acc", what);
  const int64_t out_stride = row_stride(out, rows, cols, "out", what);
  std::vector<float> a_storage, b_storage, bias_storage;
  const float* sa = scales_of(scale_a, rows, "scale_a", what, a_storage);
  const float* sb = scales_of(scale_b, cols, "scale_b", what, b_storage);
  const float* bias_values = bias_of(bias, cols, what, bias_storage);
  if (acc.numel() == 0) return;
  // The float32 result, then (a bfloat16 out) rounded to nearest even as torch's .to() does.
  const auto run = [&](const auto* a, auto* y) {
    using Out = std::remove_pointer_t<decltype(y)>;
    const int64_t grain = std::max<int64_t>(1, kMinPerThread / cols);
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) {
        const auto* __restrict in = a + m * acc_stride;
        Out* __restrict row = y + m * out_stride;
        const float scale = sa[m];
        if (bias_values != nullptr) {
#pragma omp simd
          for (int64_t n = 0; n < cols; ++n) {
            row[n] = static_cast<Out>(acc_float(in[n]) * scale * sb[n] + bias_values[n]);
          }
        } else {
#pragma omp simd
          for (int64_t n = 0; n < cols; ++n) {
            row[n] = static_cast<Out>(acc_float(in[n]) * scale * sb[n]);
          }
        }
      }
    });
  };
  with_acc(acc, what, [&](const auto* a) {
    if (out.scalar_type() == at::kBFloat16) {
      run(a, out.data_ptr<at::BFloat16>());
    } else {
      run(a, out.data_ptr<float>());
    }
  });
}

// The forward of a convolution whose im2col rows are short (K = kh·kw·C ≤ kTileMaxCols: a
// first layer's 9 or 27 values) without the int8 matrix: each tile of fields quantized as
// im2col_int8 does (a scale per row), its levels times W's levels summed in int32 — exact, so
// torch._int_mm's integers — and scaled as int8_epilogue_out into out, rows [row_begin,
// row_end) of the product. torch._int_mm runs such K at a fraction of its speed, and the
// levels matrix and its epilogue were two more passes. Returns the column absmax as
// im2col_int8 does (column_amax; empty otherwise).
Tensor im2col_int8_product(const Tensor& x_in, at::IntArrayRef kernel, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t row_begin,
                           std::optional<int64_t> row_end_in, const Tensor& bound_in,
                           const Tensor& weight_levels, const Tensor& weight_scale,
                           const std::optional<Tensor>& bias, bool column_amax,
                           const Tensor& out) {
  const char* what = "qtrain::im2col_int8_product";
  const QuantizedRows checked(what, x_in, kernel, stride, padding, dilation, row_begin,
                              row_end_in);
  checked.require_short(what);
  const Conv2dGeometry& g = checked.g;
  const int64_t rows = checked.rows, cols = checked.cols;
  const float bound = bound_value(bound_in, what);
  check_int8_matrix(weight_levels, cols, "weight_levels", what);
  const int64_t outputs = weight_levels.size(0);
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16, what,
              ": out must be float32 or bfloat16");
  const int64_t out_stride = row_stride(out, rows, outputs, "out", what);
  std::vector<float> w_storage, bias_storage;
  const float* sw = scales_of(weight_scale, outputs, "weight_scale", what, w_storage);
  const float* bias_values = bias_of(bias, outputs, what, bias_storage);
  Tensor amax = at::zeros({column_amax ? cols : 0}, at::kInt);
  if (rows == 0 || outputs == 0) return amax;
  // W's levels by pairs of columns (k = 2p, 2p + 1; a zero after an odd K), each pair of an
  // output as two int16 in one int32 word, the outputs padded with zeros to blocks of
  // kOutputBlock: a field's pair of levels times a block of outputs is one multiply-add of
  // int16 pairs into int32 lanes (exact: |sum| ≤ 2·127²), its sums held in registers.
  constexpr int64_t kOutputBlock = 16;
  const int64_t padded = (outputs + kOutputBlock - 1) / kOutputBlock * kOutputBlock;
  const int64_t pairs = (cols + 1) / 2;
  const Tensor w = weight_levels.contiguous();
  const int8_t* w_levels = w.data_ptr<int8_t>();
  const auto pair_word = [](int32_t low, int32_t high) {
    return static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint16_t>(low)) |
                                static_cast<uint32_t>(static_cast<uint16_t>(high)) << 16);
  };
  std::vector<int32_t> w_pairs(pairs * padded, 0);
  for (int64_t o = 0; o < outputs; ++o) {
    for (int64_t q = 0; q < pairs; ++q) {
      const int32_t high = 2 * q + 1 < cols ? w_levels[o * cols + 2 * q + 1] : 0;
      w_pairs[q * padded + o] = pair_word(w_levels[o * cols + 2 * q], high);
    }
  }
  const Tensor x_nhwc = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  uint32_t* column_max = column_amax ? reinterpret_cast<uint32_t*>(amax.data_ptr<int32_t>())
                                     : nullptr;
  std::mutex merge;
  const auto run = [&](const auto* x, auto* y) {
    using Out = std::remove_pointer_t<decltype(y)>;
    const int64_t grain = std::max<int64_t>(1, kMinPerThread / (cols + outputs));
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
      FieldTile tile(g);
      std::vector<float> row_scale(g.out[1]);
      std::vector<int32_t> level_pairs(pairs);
      std::vector<uint32_t> maxima(column_amax ? cols : 0, 0u);
      for (int64_t r = b; r < e;) {
        const int64_t ow = (row_begin + r) % g.out[1];
        const int64_t n = std::min(g.out[1] - ow, e - r);
        tile.build(x, g, row_begin + r, n);
        tile.quantize(nullptr, row_scale.data(), nullptr, bound,
                      column_amax ? maxima.data() : nullptr);
        for (int64_t idx = 0; idx < n; ++idx) {
          for (int64_t q = 0; q < pairs; ++q) {
            const int32_t high = 2 * q + 1 < cols ? tile.levels[(2 * q + 1) * n + idx] : 0;
            level_pairs[q] = pair_word(tile.levels[2 * q * n + idx], high);
          }
          Out* __restrict row = y + (r + idx) * out_stride;
          const float scale = row_scale[idx];
          for (int64_t first = 0; first < outputs; first += kOutputBlock) {
            const int64_t count = std::min(kOutputBlock, outputs - first);
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
            if constexpr (std::is_same_v<Out, float>) {
              __m512i sums = _mm512_setzero_si512();
              for (int64_t q = 0; q < pairs; ++q) {
                const __m512i w_block = _mm512_loadu_si512(w_pairs.data() + q * padded + first);
                sums = _mm512_add_epi32(
                    sums, _mm512_madd_epi16(_mm512_set1_epi32(level_pairs[q]), w_block));
              }
              // int8_epilogue_out's operations, in its order (int32 → float32 rounds to
              // nearest even, as the scalar conversion)
              const auto lanes = static_cast<__mmask16>((1u << count) - 1u);
              __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(scale));
              v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(lanes, sw + first));
              if (bias_values != nullptr) {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(lanes, bias_values + first));
              }
              _mm512_mask_storeu_ps(row + first, lanes, v);
              continue;
            }
#endif
            int32_t sums[kOutputBlock] = {};
            for (int64_t q = 0; q < pairs; ++q) {
              const int32_t pair = level_pairs[q];
              const int32_t low = static_cast<int16_t>(pair & 0xFFFF), high = pair >> 16;
              const int32_t* __restrict w_block = w_pairs.data() + q * padded + first;
              for (int64_t o = 0; o < kOutputBlock; ++o) {
                sums[o] += low * static_cast<int16_t>(w_block[o] & 0xFFFF) + high * (w_block[o] >> 16);
              }
            }
            // int8_epilogue_out's operations, in its order
            for (int64_t o = 0; o < count; ++o) {
              const float scaled = acc_float(sums[o]) * scale * sw[first + o];
              row[first + o] = static_cast<Out>(
                  bias_values != nullptr ? scaled + bias_values[first + o] : scaled);
            }
          }
        }
        r += n;
      }
      if (column_amax) {
        const std::lock_guard<std::mutex> lock(merge);
        for (int64_t k = 0; k < cols; ++k) column_max[k] = std::max(column_max[k], maxima[k]);
      }
    });
  };
  const auto with_out = [&](const auto* x) {
    if (out.scalar_type() == at::kBFloat16) {
      run(x, out.data_ptr<at::BFloat16>());
    } else {
      run(x, out.data_ptr<float>());
    }
  };
  if (x_nhwc.scalar_type() == at::kBFloat16) {
    with_out(x_nhwc.data_ptr<at::BFloat16>());
  } else {
    with_out(x_nhwc.data_ptr<float>());
  }
  return amax;
}

// Σ_idx a[idx]·b[idx] over n int8 values, exact in int32 (n ≤ 2^31 / 127²).
inline int32_t int8_dot(const int8_t* __restrict a, const int8_t* __restrict b, int64_t n) {
  int32_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t idx = 0; idx < n; ++idx) sum += int32_t{a[idx]} * int32_t{b[idx]};
  return sum;
}

// The grad-weight product of a convolution whose im2col rows are short (K ≤ kTileMaxCols)
// without the int8 matrix: acc[o, k] = Σ_p g_levels[o, p]·levels[p, k] over rows [row_begin,
// row_end), for levels = im2col_int8(x, ..., column_scale)'s (x's levels with a scale per
// column), exact in int64 — the integers of torch._int_mm on the matrix, which runs so short
// a reduction's transpose slowly. g_levels: int8 (C_out, row_end − row_begin), row-major.
Tensor im2col_int8_grad_weight(const Tensor& x_in, at::IntArrayRef kernel,
                               at::IntArrayRef stride, at::IntArrayRef padding,
                               at::IntArrayRef dilation, int64_t row_begin,
                               std::optional<int64_t> row_end_in, const Tensor& bound_in,
                               const Tensor& column_scale, const Tensor& g_levels) {
  const char* what = "qtrain::im2col_int8_grad_weight";
  const QuantizedRows checked(what, x_in, kernel, stride, padding, dilation, row_begin,
                              row_end_in);
  checked.require_short(what);
  const Conv2dGeometry& g = checked.g;
  const int64_t rows = checked.rows, cols = checked.cols;
  const float bound = bound_value(bound_in, what);
  check_int8_matrix(g_levels, rows, "g_levels", what);
  const int64_t outputs = g_levels.size(0);
  std::vector<float> scale_storage;
  const float* scales = scales_of(column_scale, cols, "column_scale", what, scale_storage);
  std::vector<float> inverse(cols);
  for (int64_t k = 0; k < cols; ++k) inverse[k] = 1.0f / scales[k];
  Tensor acc = at::zeros({outputs, cols}, at::kLong);
  if (rows == 0 || outputs == 0) return acc;
  const Tensor gq = g_levels.contiguous();
  const int8_t* gl = gq.data_ptr<int8_t>();
  int64_t* total = acc.data_ptr<int64_t>();
  const Tensor x_nhwc = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  std::mutex merge;
  const auto run = [&](const auto* x) {
    const int64_t grain = std::max<int64_t>(1, kMinPerThread / (cols + outputs));
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
      FieldTile tile(g);
      std::vector<int64_t> sums(outputs * cols, 0);  // a tile's dot fits int32; their sum not
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
      // 32 fields at a time as int16 lanes: each (o, k) pair's products summed by pairs of
      // fields (a multiply-add into 16 int32 lanes, |lane step| ≤ 2·127²), the lanes folded
      // into the int64 sums before they could overflow (kFlush steps).
      constexpr int64_t kFlush = 60000;  // 60000·2·127² < 2^31
      std::vector<int32_t> lanes(outputs * cols * 16, 0);  // 16 int32 lanes per (o, k)
      __m512i field_levels[kTileMaxCols];
      int64_t steps = 0;
      const auto flush = [&] {
        for (int64_t i = 0; i < outputs * cols; ++i) {
          const __m512i pair_sums = _mm512_loadu_si512(lanes.data() + i * 16);
          const __m512i low = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(pair_sums));
          const __m512i high = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(pair_sums, 1));
          sums[i] += _mm512_reduce_add_epi64(_mm512_add_epi64(low, high));
        }
        std::fill(lanes.begin(), lanes.end(), 0);
        steps = 0;
      };
#endif
      for (int64_t r = b; r < e;) {
        const int64_t ow = (row_begin + r) % g.out[1];
        const int64_t n = std::min(g.out[1] - ow, e - r);
        tile.build(x, g, row_begin + r, n);
        tile.quantize(nullptr, nullptr, inverse.data(), bound, nullptr);
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
        for (int64_t first = 0; first < n; first += 32) {
          const int64_t count = std::min<int64_t>(32, n - first);
          const auto fields = static_cast<__mmask32>(count == 32 ? ~0u : (1u << count) - 1u);
          for (int64_t k = 0; k < cols; ++k) {
            field_levels[k] = _mm512_cvtepi8_epi16(
                _mm256_maskz_loadu_epi8(fields, tile.levels.data() + k * n + first));
          }
          for (int64_t o = 0; o < outputs; ++o) {
            const __m512i g_fields =
                _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(fields, gl + o * rows + r + first));
            int32_t* acc_o = lanes.data() + o * cols * 16;
            for (int64_t k = 0; k < cols; ++k) {
              const __m512i acc = _mm512_loadu_si512(acc_o + k * 16);
              _mm512_storeu_si512(acc_o + k * 16, _mm512_add_epi32(
                  acc, _mm512_madd_epi16(g_fields, field_levels[k])));
            }
          }
          if (++steps == kFlush) flush();
        }
#else
        for (int64_t o = 0; o < outputs; ++o) {
          const int8_t* g_row = gl + o * rows + r;
          for (int64_t k = 0; k < cols; ++k) {
            sums[o * cols + k] += int8_dot(g_row, tile.levels.data() + k * n, n);
          }
        }
#endif
        r += n;
      }
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
      flush();
#endif
      const std::lock_guard<std::mutex> lock(merge);
      for (int64_t i = 0; i < outputs * cols; ++i) total[i] += sums[i];
    });
  };
  if (x_nhwc.scalar_type() == at::kBFloat16) {
    run(x_nhwc.data_ptr<at::BFloat16>());
  } else {
    run(x_nhwc.data_ptr<float>());
  }
  return acc;
}

// quantize_rows_int8(a, bound_rows, true) and quantize_rows_int8(aᵀ, bound_cols, true) of
// one float32 (R, C) matrix, nearest rounding — a layer gradient's two operands, per output
// pixel for the grad-input product and per output channel for the grad-weight one — in two
// passes over a instead of three: the rows' pass also folds each column's absmax, which the
// transposed operand's scales then take without a pass of their own. Bitwise the two calls.
std::tuple<Tensor, Tensor, Tensor, Tensor> quantize_rows_int8_both(const Tensor& a_in,
                                                                   const Tensor& bound_rows_in,
                                                                   const Tensor& bound_cols_in) {
  const char* what = "qtrain::quantize_rows_int8_both";
  TORCH_CHECK(a_in.device().is_cpu() && a_in.dim() == 2 && at::isFloatingType(a_in.scalar_type()),
              what, ": expected a 2-D floating-point CPU tensor");
  const float bound_rows = bound_value(bound_rows_in, what);
  const float bound_cols = bound_value(bound_cols_in, what);
  const Tensor a = a_in.to(at::kFloat).contiguous();
  const int64_t rows = a.size(0), cols = a.size(1);
  Tensor q_rows = empty_output({rows, cols}, at::kChar);
  Tensor q_cols = empty_output({cols, rows}, at::kChar);
  Tensor scale_rows = at::empty({rows}, at::kFloat);
  Tensor scale_cols = at::empty({cols}, at::kFloat);
  if (a.numel() == 0) return {q_rows, scale_rows.fill_(1.0f), q_cols, scale_cols.fill_(1.0f)};
  const float* x = a.data_ptr<float>();
  float* sr = scale_rows.data_ptr<float>();
  std::vector<uint32_t> column_max(cols, 0u);
  std::mutex merge;
  int8_t* qr = q_rows.data_ptr<int8_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kMinPerThread / cols), [&](int64_t b, int64_t e) {
    std::vector<uint32_t> maxima(cols, 0u);
    for (int64_t r = b; r < e; ++r) {
      const float* row = x + r * cols;
      fold_abs_bits(row, maxima.data(), cols);
      sr[r] = scale_from_amax(abs_bits_max(row, cols), bound_rows);
      int8_levels<false>(row, qr + r * cols, cols, r * cols, 1.0f / sr[r], bound_rows, Keys{});
    }
    const std::lock_guard<std::mutex> lock(merge);
    for (int64_t k = 0; k < cols; ++k) column_max[k] = std::max(column_max[k], maxima[k]);
  });
  float* sc = scale_cols.data_ptr<float>();
  std::vector<float> inverse(cols);
  for (int64_t k = 0; k < cols; ++k) {
    sc[k] = scale_from_amax(column_max[k], bound_cols);
    inverse[k] = 1.0f / sc[k];
  }
  int8_rows_transposed<false>(x, q_cols.data_ptr<int8_t>(), inverse.data(), cols, rows,
                              bound_cols, Keys{});
  return {q_rows, scale_rows, q_cols, scale_cols};
}

// An uninitialised output from the extension's allocator (transparent huge pages from 4 MiB,
// freed blocks kept for the next output of the same size): for a result the caller fills in
// pieces, which would otherwise fault its fresh pages in one by one every step.
// `like`: any CPU tensor (it routes the call to this CPU kernel; its values are not read).
Tensor empty_cached(const Tensor& like, at::IntArrayRef sizes, at::ScalarType dtype) {
  TORCH_CHECK(like.device().is_cpu(), "qtrain::empty_cached: like must be a CPU tensor");
  TORCH_CHECK(sizes.empty() || *std::min_element(sizes.begin(), sizes.end()) >= 0,
              "qtrain::empty_cached: sizes must be non-negative, got ", sizes);
  return empty_output(sizes, dtype);
}

Tensor int8_epilogue(const Tensor& acc, const Tensor& scale_a, const Tensor& scale_b,
                     const std::optional<Tensor>& bias) {
  TORCH_CHECK(acc.dim() == 2, "qtrain::int8_epilogue: acc must be a matrix, got ", acc.dim(),
              " dims");
  Tensor out = empty_output({acc.size(0), acc.size(1)}, at::kFloat);
  int8_epilogue_out(acc, scale_a, scale_b, bias, out);
  return out;
}

// The grad-input product's epilogue and col2im in one pass: images [image_begin, image_begin +
// acc.size(0) / (H'·W')) of grad_x (a float32 (B, C, H, W) channels-last tensor) set to
// col2im_nhwc(int8_epilogue(acc, scale_a, scale_b)) — the gradient of x from the
// (B'·H'·W', kh·kw·C) gradient of those images' im2col rows — bitwise.
void col2im_int8_epilogue(const Tensor& acc, const Tensor& scale_a, const Tensor& scale_b,
                          const Tensor& grad_x, at::IntArrayRef kernel, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation,
                          int64_t image_begin) {
  const char* what = "qtrain::col2im_int8_epilogue";
  TORCH_CHECK(grad_x.dim() == 4 && grad_x.scalar_type() == at::kFloat &&
                  grad_x.device().is_cpu() &&
                  grad_x.is_contiguous(at::MemoryFormat::ChannelsLast),
              what, ": grad_x must be a float32 (B, C, H, W) channels-last CPU tensor");
  const Conv2dGeometry g =
      conv2d_geometry(what, grad_x.sizes(), kernel, stride, padding, dilation);
  const int64_t per_image = g.out[0] * g.out[1], cols = g.cols();
  TORCH_CHECK(acc.dim() == 2 && acc.size(1) == cols && acc.size(0) % per_image == 0, what,
              ": acc must be (images·H'·W', kh·kw·C) = (n·", per_image, ", ", cols, "), got ",
              acc.sizes());
  const int64_t images = acc.size(0) / per_image;
  TORCH_CHECK(0 <= image_begin && image_begin + images <= g.batch, what,
              ": images [", image_begin, ", ", image_begin + images, ") outside the batch of ",
              g.batch);
  const int64_t acc_stride = row_stride(acc, acc.size(0), cols, "acc", what);
  std::vector<float> a_storage, b_storage;
  const float* sa = scales_of(scale_a, acc.size(0), "scale_a", what, a_storage);
  const float* sb = scales_of(scale_b, cols, "scale_b", what, b_storage);
  if (grad_x.numel() == 0 || images == 0) return;
  const int64_t height = g.height, image_values = height * g.width * g.channels;
  float* dx = grad_x.data_ptr<float>();
  const auto columns_inside = kernel_columns_inside(g);
  const int64_t first_row = image_begin * per_image;
  with_acc(acc, what, [&](const auto* a) {
    const auto add_run = [&](int64_t row, int64_t col, float* __restrict pixels, int64_t n) {
      const int64_t local = row - first_row;
      const auto* __restrict in = a + local * acc_stride + col;
      const float* __restrict column_scale = sb + col;
      const float scale = sa[local];
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) pixels[c] += acc_float(in[c]) * scale * column_scale[c];
    };
    const int64_t grain = std::max<int64_t>(1, kMinPerThread / (g.width * g.channels));
    at::parallel_for(0, images * height, grain, [&](int64_t begin, int64_t end) {
      while (begin < end) {
        const int64_t b = image_begin + begin / height, h_begin = begin % height;
        const int64_t h_end = std::min(height, h_begin + end - begin);
        col2im_band(add_run, dx + b * image_values, g, columns_inside, b, h_begin, h_end);
        begin += h_end - h_begin;
      }
    });
  });
}

// ---- minifloat rounding ----------------------------------------------------------------------

// Exact 2^n in float32 for integer n in [-126, 127], from the bit pattern.
inline float pow2(int32_t n) { return float_of(static_cast<uint32_t>(n + 127) << 23); }

struct MiniFloat {
  int32_t min_exponent;
  int32_t mantissa_bits;
  float max_value;
  float out_of_range;  // magnitude for overflow and ±inf: max_value, inf, or NaN (no sign)
};

// Rounds x[b, e) onto the grid into y[b, e). Parameters by value: GCC vectorises this loop only
// when nothing it reads can alias the output.
template <bool Stochastic>
void minifloat_run(const float* __restrict x, float* __restrict y, int64_t b, int64_t e,
                   MiniFloat format, Keys keys) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const bool signed_out_of_range = !std::isnan(format.out_of_range);
  const uint32_t low0 = static_cast<uint32_t>(b);
  const uint32_t high = static_cast<uint32_t>(static_cast<uint64_t>(b) >> 32) + keys.key1;
#pragma omp simd
  for (int64_t k = 0; k < e - b; ++k) {
    const float xv = x[b + k];
    const uint32_t abs_bits = abs_bits_of(xv);
    // |x| = m·2^e with m in [1, 2); zeros and subnormals take the format's min exponent
    // (float32's own exponent range never reaches below any minifloat's, e <= 8 bits).
    const int32_t exponent =
        std::max(static_cast<int32_t>(abs_bits >> 23) - 127, format.min_exponent);
    const int32_t quantum = exponent - format.mantissa_bits;
    // x·2^-quantum and level·2^quantum in two exact power-of-two steps, as the reference.
    const int32_t up_first = (-quantum) >> 1;  // floor(-quantum / 2)
    const float v = xv * pow2(up_first) * pow2(-quantum - up_first);
    float rounded;
    if constexpr (Stochastic) {
      rounded = round_stochastic(v, (low0 + static_cast<uint32_t>(k)) ^ keys.key0, high);
    } else {
      rounded = std::nearbyint(v);
    }
    const int32_t down_first = quantum >> 1;
    float yv = rounded * pow2(down_first) * pow2(quantum - down_first);
    if (std::fabs(yv) > format.max_value || abs_bits == kInfBits) {
      yv = signed_out_of_range ? std::copysign(format.out_of_range, xv) : nan;
    }
    y[b + k] = abs_bits > kInfBits ? xv : yv;  // NaN passes through unchanged
  }
}

template <bool Stochastic>
void minifloat_kernel(const Tensor& x_in, Tensor& out, const MiniFloat& format, Keys keys) {
  const float* x = x_in.data_ptr<float>();
  float* y = out.data_ptr<float>();
  const int64_t numel = x_in.numel();
  parallel_chunks(numel, plan_chunks(numel), [&](int64_t begin, int64_t end, int) {
    for_each_run(begin, end, 1, numel, [&](int64_t b, int64_t e, int64_t) {
      minifloat_run<Stochastic>(x, y, b, e, format, keys);
    });
  });
}

Tensor fake_quant_minifloat(const Tensor& x, int64_t exponent_bits, int64_t mantissa_bits,
                            bool has_inf, bool saturate, std::optional<int64_t> seed) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "qtrain::fake_quant_minifloat: expected a contiguous float32 CPU tensor");
  TORCH_CHECK(exponent_bits >= 2 && exponent_bits <= 8 && mantissa_bits >= 0 &&
                  mantissa_bits <= 23,
              "qtrain::fake_quant_minifloat: exponent_bits must be in 2..8 and mantissa_bits "
              "in 0..23");
  const int32_t bias = (1 << (exponent_bits - 1)) - 1;
  const int32_t top = (1 << exponent_bits) - 1;
  const int32_t max_exponent = (has_inf ? top - 1 : top) - bias;
  // Formats without inf give the top binade's all-ones mantissa to NaN. Rounded to float32 as
  // the reference's comparison does (e8 without inf: beyond float32, so inf).
  const double max_mantissa = 2.0 - std::ldexp(1.0, -(has_inf ? mantissa_bits : mantissa_bits - 1));
  MiniFloat format;
  format.min_exponent = 1 - bias;
  format.mantissa_bits = static_cast<int32_t>(mantissa_bits);
  format.max_value = static_cast<float>(std::ldexp(max_mantissa, max_exponent));
  format.out_of_range = saturate  ? format.max_value
                        : has_inf ? std::numeric_limits<float>::infinity()
                                  : std::numeric_limits<float>::quiet_NaN();
  Tensor out = empty_output(x.sizes(), at::kFloat);
  if (seed) {
    minifloat_kernel<true>(x, out, format, seed_keys(*seed));
  } else {
    minifloat_kernel<false>(x, out, format, Keys{});
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qtrain, m) {
  m.set_python_module("qtrain.kernels.cpu_fused");
  m.def("minmax(Tensor x3) -> (Tensor, Tensor)");
  m.def("absmax(Tensor x3) -> Tensor");
  m.def(
      "range_bn_stats(Tensor x3, int chunks) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("channel_affine(Tensor x, Tensor scale, Tensor shift) -> Tensor");
  m.def("zero_mask(Tensor y) -> Tensor");
  m.def("channel_affine_relu(Tensor x, Tensor scale, Tensor shift) -> (Tensor, Tensor)");
  m.def("masked_zero(Tensor grad, Tensor mask) -> Tensor");
  m.def(
      "range_bn_backward(Tensor grad3, Tensor x3, Tensor mean, Tensor inv_spread, Tensor gamma, "
      "float constant, Tensor high_index, Tensor low_index, Tensor? zero_mask=None) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "quantize_int(Tensor x3, Tensor scale, Tensor zero_point, int qmin, int qmax, int? seed, "
      "bool want_fake, bool want_mask, ScalarType? levels_dtype) -> (Tensor, Tensor, Tensor)");
  m.def(
      "quantize_int_pair(Tensor x3, Tensor scale_a, Tensor zero_point_a, int qmin_a, int qmax_a, "
      "Tensor scale_b, Tensor zero_point_b, int qmin_b, int qmax_b, int? seed) -> "
      "(Tensor, Tensor)");
  m.def("max_pool2x2(Tensor x) -> (Tensor, Tensor)");
  m.def("max_pool2x2_backward(Tensor grad, Tensor where, int height, int width) -> Tensor");
  m.def("dequantize_int(Tensor levels3, Tensor scale, Tensor zero_point) -> Tensor");
  m.def(
      "fake_quant_minifloat(Tensor x, int exponent_bits, int mantissa_bits, bool has_inf, "
      "bool saturate, int? seed) -> Tensor");
}

// qtrain.lowp's kernels: their Python wrappers and fake implementations are in cpu_gemm.
TORCH_LIBRARY_FRAGMENT(qtrain, m) {
  m.set_python_module("qtrain.kernels.cpu_gemm");
  m.def(
      "quantize_rows_int8(Tensor a, Tensor bound, bool rowwise, Tensor? keys, "
      "ScalarType levels_dtype=int8) -> (Tensor, Tensor)");
  m.def(
      "quantize_rows_int8_both(Tensor a, Tensor bound_rows, Tensor bound_cols) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "im2col_nhwc(Tensor x, int[2] kernel, int[2] stride, int[2] padding, int[2] dilation, "
      "int row_begin=0, int? row_end=None, int pad_value=0) -> Tensor");
  m.def(
      "col2im_nhwc(Tensor cols, int[4] x_shape, int[2] kernel, int[2] stride, int[2] padding, "
      "int[2] dilation) -> Tensor");
  m.def(
      "im2col_int8(Tensor x, int[2] kernel, int[2] stride, int[2] padding, int[2] dilation, "
      "int row_begin, int? row_end, Tensor bound, Tensor? column_scale, bool column_amax=False) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "im2col_int8_product(Tensor x, int[2] kernel, int[2] stride, int[2] padding, "
      "int[2] dilation, int row_begin, int? row_end, Tensor bound, Tensor weight_levels, "
      "Tensor weight_scale, Tensor? bias, bool column_amax, Tensor(a!) out) -> Tensor");
  m.def(
      "im2col_int8_grad_weight(Tensor x, int[2] kernel, int[2] stride, int[2] padding, "
      "int[2] dilation, int row_begin, int? row_end, Tensor bound, Tensor column_scale, "
      "Tensor g_levels) -> Tensor");
  m.def("int8_epilogue(Tensor acc, Tensor scale_a, Tensor scale_b, Tensor? bias) -> Tensor");
  m.def("empty_cached(Tensor like, int[] sizes, ScalarType dtype) -> Tensor");
  m.def(
      "int8_epilogue_out(Tensor acc, Tensor scale_a, Tensor scale_b, Tensor? bias, "
      "Tensor(a!) out) -> ()");
  m.def(
      "col2im_int8_epilogue(Tensor acc, Tensor scale_a, Tensor scale_b, Tensor(a!) grad_x, "
      "int[2] kernel, int[2] stride, int[2] padding, int[2] dilation, int image_begin) -> ()");
}

TORCH_LIBRARY_IMPL(qtrain, CPU, m) {
  m.impl("minmax", &minmax);
  m.impl("absmax", &absmax);
  m.impl("range_bn_stats", &range_bn_stats);
  m.impl("range_bn_backward", &range_bn_backward);
  m.impl("channel_affine", &channel_affine);
  m.impl("zero_mask", &zero_mask);
  m.impl("channel_affine_relu", &channel_affine_relu);
  m.impl("masked_zero", &masked_zero);
  m.impl("quantize_int", &quantize_int);
  m.impl("quantize_int_pair", &quantize_int_pair);
  m.impl("dequantize_int", &dequantize_int);
  m.impl("max_pool2x2", &max_pool2x2);
  m.impl("max_pool2x2_backward", &max_pool2x2_backward);
  m.impl("fake_quant_minifloat", &fake_quant_minifloat);
  m.impl("quantize_rows_int8", &quantize_rows_int8);
  m.impl("im2col_nhwc", &im2col_nhwc);
  m.impl("col2im_nhwc", &col2im_nhwc);
  m.impl("quantize_rows_int8_both", &quantize_rows_int8_both);
  m.impl("im2col_int8", &im2col_int8);
  m.impl("im2col_int8_product", &im2col_int8_product);
  m.impl("im2col_int8_grad_weight", &im2col_int8_grad_weight);
  m.impl("int8_epilogue", &int8_epilogue);
  m.impl("empty_cached", &empty_cached);
  m.impl("int8_epilogue_out", &int8_epilogue_out);
  m.impl("col2im_int8_epilogue", &col2im_int8_epilogue);
}
