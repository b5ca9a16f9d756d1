// See extremes.h. Compiled with -O3 -march=native (cg_tf/cpu_kernel.py): the
// vectors below become AVX-512, AVX2 or NEON registers, whatever the CPU has.
//
// For a row i, the examples with a[e, i] == 0 contribute exact zeros to every
// coordinate of the row (blank pixels, inactive ReLUs: 81% and about 50% of a
// batch's inputs on MNIST), so only the others are streamed, and the zeros are
// inserted once, all together. Values are streamed for kLanes columns at a
// time, and each is inserted into the sorted running extremes, which stay in
// registers for the whole batch: level k becomes max(level k, min(level k-1,
// x)), the same value a carry chain gives, without the chain. Only min, max,
// one product per value and the final sums touch the values, so the results
// are the bits that winsorize.py's XLA network computes from the same inputs.

#include "extremes.h"

#include <cstring>
#include <limits>
#include <utility>
#include <vector>

namespace cg_tf {
namespace {

// Columns handled together: one vector register of floats, so that c = 8's
// 18 running extremes stay in the registers (AVX-512 has 32 of 16 floats,
// AVX 16 of 8, SSE and NEON 16 or 32 of 4).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t Mask __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec Max(Vec x, Vec y) { return x > y ? x : y; }
inline Vec Min(Vec x, Vec y) { return x < y ? x : y; }
inline Vec Splat(float v) { return Vec{} + v; }

// Inserts Z copies of 0 into the K largest (descending) and K smallest
// (ascending) running values: level k takes max(level k, min(level k-Z, 0)),
// levels below Z take max(level k, 0) (mirrored for the smallest).
template <int K, int Z>
inline void InsertZeros(Vec* largest, Vec* smallest) {
  const Vec zero = Splat(0.0f);
  for (int k = K - 1; k >= Z; --k) {
    largest[k] = Max(largest[k], Min(largest[k - Z], zero));
    smallest[k] = Min(smallest[k], Max(smallest[k - Z], zero));
  }
  for (int k = Z - 1; k >= 0; --k) {
    largest[k] = Max(largest[k], zero);
    smallest[k] = Min(smallest[k], zero);
  }
}

// InsertZeros<K, zeros> for a run-time zeros in 1..K (0: nothing to insert).
template <int K, int... Z>
inline void InsertZerosOf(int zeros, Vec* largest, Vec* smallest,
                          std::integer_sequence<int, Z...>) {
  ((zeros == Z + 1 ? InsertZeros<K, Z + 1>(largest, smallest) : void()), ...);
}

template <int K>
int64_t Rows(const float* a, const float* d, int64_t batch, int64_t fan_in, int64_t fan_out,
             int64_t padded_out, int num_high, int num_low, int64_t row_begin, int64_t row_end,
             const Extremes& out) {
  const Vec inf = Splat(std::numeric_limits<float>::infinity());
  std::vector<int64_t> examples(batch);
  std::vector<float> factors(batch);
  Mask clipped = Mask{};
  for (int64_t i = row_begin; i < row_end; ++i) {
    int64_t nonzero = 0;
    for (int64_t e = 0; e < batch; ++e) {
      const float factor = a[e * fan_in + i];
      if (factor != 0.0f) {
        examples[nonzero] = e;
        factors[nonzero] = factor;
        ++nonzero;
      }
    }
    // More than K zeros change no more than K do.
    const int zeros = static_cast<int>(batch - nonzero < K ? batch - nonzero : K);
    for (int64_t j = 0; j < padded_out; j += kLanes) {
      Vec largest[K], smallest[K];
      for (int k = 0; k < K; ++k) {
        largest[k] = -inf;
        smallest[k] = inf;
      }
      for (int64_t t = 0; t < nonzero; ++t) {
        Vec errors;
        std::memcpy(&errors, d + examples[t] * padded_out + j, sizeof(Vec));
        const Vec x = factors[t] * errors;
        for (int k = K - 1; k > 0; --k) {
          largest[k] = Max(largest[k], Min(largest[k - 1], x));
          smallest[k] = Min(smallest[k], Max(smallest[k - 1], x));
        }
        largest[0] = Max(largest[0], x);
        smallest[0] = Min(smallest[0], x);
      }
      InsertZerosOf<K>(zeros, largest, smallest, std::make_integer_sequence<int, K>{});
      // Summed in order, largest (smallest) first, as XLA's reduce_sum does.
      Vec largest_sum = Splat(0.0f), smallest_sum = Splat(0.0f);
      Vec upper = largest[0], lower = smallest[0];
      for (int k = 0; k < K; ++k) {
        if (k < num_high) largest_sum += largest[k];
        if (k == num_high) upper = largest[k];
        if (k < num_low) smallest_sum += smallest[k];
        if (k == num_low) lower = smallest[k];
      }
      // Padding columns hold zeros only, so they count nothing.
      for (int k = 0; k < K; ++k) {
        if (k < num_high) clipped -= reinterpret_cast<Mask>(largest[k] > upper);
        if (k < num_low) clipped -= reinterpret_cast<Mask>(smallest[k] < lower);
      }
      const int64_t offset = i * fan_out + j;
      const int64_t width = fan_out - j < kLanes ? fan_out - j : kLanes;
      if (width == kLanes) {
        std::memcpy(out.largest_sum + offset, &largest_sum, sizeof(Vec));
        std::memcpy(out.upper + offset, &upper, sizeof(Vec));
        std::memcpy(out.smallest_sum + offset, &smallest_sum, sizeof(Vec));
        std::memcpy(out.lower + offset, &lower, sizeof(Vec));
      } else {
        for (int64_t l = 0; l < width; ++l) {
          out.largest_sum[offset + l] = largest_sum[l];
          out.upper[offset + l] = upper[l];
          out.smallest_sum[offset + l] = smallest_sum[l];
          out.lower[offset + l] = lower[l];
        }
      }
    }
  }
  int64_t total = 0;
  for (int l = 0; l < kLanes; ++l) total += clipped[l];
  return total;
}

// Rows<kept> for a run-time kept in 1..kMaxKept: the levels must be
// compile-time constants to stay in registers.
template <int... K>
int64_t RowsOf(int kept, std::integer_sequence<int, K...>, const float* a, const float* d,
               int64_t batch, int64_t fan_in, int64_t fan_out, int64_t padded_out, int num_high,
               int num_low, int64_t row_begin, int64_t row_end, const Extremes& out) {
  int64_t clipped = 0;
  ((kept == K + 1 ? (void)(clipped = Rows<K + 1>(a, d, batch, fan_in, fan_out, padded_out,
                                                 num_high, num_low, row_begin, row_end, out))
                  : void()),
   ...);
  return clipped;
}

}  // namespace

void OuterMiddles(const float* a, const float* d, int64_t batch, int64_t fan_in, int64_t fan_out,
                  int64_t padded_out, int64_t row_begin, int64_t row_end, float* lower,
                  float* upper) {
  const int64_t needed = batch - batch / 2;
  // Columns with enough nonzero errors, as a mask a vector at a time.
  std::vector<Mask> column_formed(padded_out / kLanes);
  for (int64_t j = 0; j < padded_out; j += kLanes) {
    Mask formed;
    for (int l = 0; l < kLanes; ++l) {
      int64_t nonzero = 0;
      for (int64_t e = 0; e < batch; ++e) nonzero += d[e * padded_out + j + l] != 0.0f;
      formed[l] = nonzero >= needed ? -1 : 0;
    }
    column_formed[j / kLanes] = formed;
  }
  // Sorted by a bitonic network over a power of two, padded with +inf, which
  // sorts last and leaves positions below batch to the values.
  int64_t size = 1;
  while (size < batch) size *= 2;
  std::vector<Vec> values(size);
  const Vec inf = Splat(std::numeric_limits<float>::infinity());
  for (int64_t i = row_begin; i < row_end; ++i) {
    int64_t nonzero = 0;
    for (int64_t e = 0; e < batch; ++e) nonzero += a[e * fan_in + i] != 0.0f;
    for (int64_t j = 0; j < padded_out; j += kLanes) {
      Vec low = Splat(0.0f), high = Splat(0.0f);
      if (nonzero >= needed) {
        for (int64_t e = 0; e < batch; ++e) {
          Vec errors;
          std::memcpy(&errors, d + e * padded_out + j, sizeof(Vec));
          values[e] = a[e * fan_in + i] * errors;
        }
        for (int64_t e = batch; e < size; ++e) values[e] = inf;
        for (int64_t block = 2; block <= size; block *= 2) {
          for (int64_t stride = block / 2; stride > 0; stride /= 2) {
            for (int64_t p = 0; p < size; ++p) {
              const int64_t q = p ^ stride;
              if (q <= p) continue;
              const Vec smaller = Min(values[p], values[q]), larger = Max(values[p], values[q]);
              const bool ascending = (p & block) == 0;
              values[p] = ascending ? smaller : larger;
              values[q] = ascending ? larger : smaller;
            }
          }
        }
        const Mask formed = column_formed[j / kLanes];
        high = formed ? values[batch / 2] : Splat(0.0f);
        low = formed ? values[batch % 2 ? batch / 2 : batch / 2 - 1] : Splat(0.0f);
      }
      const int64_t width = fan_out - j < kLanes ? fan_out - j : kLanes;
      for (int64_t l = 0; l < width; ++l) {
        lower[i * fan_out + j + l] = low[l];
        upper[i * fan_out + j + l] = high[l];
      }
    }
  }
}

int64_t PaddedWidth(int64_t fan_out) { return (fan_out + kLanes - 1) / kLanes * kLanes; }

int64_t OuterExtremes(const float* a, const float* d, int64_t batch, int64_t fan_in,
                      int64_t fan_out, int64_t padded_out, int num_high, int num_low,
                      int64_t row_begin, int64_t row_end, const Extremes& out) {
  const int kept = (num_high > num_low ? num_high : num_low) + 1;
  return RowsOf(kept, std::make_integer_sequence<int, kMaxKept>{}, a, d, batch, fan_in, fan_out,
                padded_out, num_high, num_low, row_begin, row_end, out);
}

}  // namespace cg_tf
