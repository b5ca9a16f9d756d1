// The running extremes of a Dense layer's per-example gradients, on a CPU.
//
// Example e's gradient of a Dense kernel is outer(a_e, d_e): a_e the layer's
// input [fan_in], d_e its back-propagated error [fan_out]. For every
// coordinate (i, j), winsorizing or trimming the batch's values a_e[i] d_e[j]
// needs only the few largest and smallest of them (cg_tf/winsorize.py). This
// file has no TensorFlow in it: extremes_op.cc wraps it as a TensorFlow op.

#ifndef CG_TF_KERNELS_EXTREMES_H_
#define CG_TF_KERNELS_EXTREMES_H_

#include <cstdint>

namespace cg_tf {

// Largest number of extremes a side (num_high + 1 or num_low + 1) handled here.
constexpr int kMaxKept = 16;

// How many columns d must hold, zero-padded, for `fan_out` columns: a
// multiple of the vector width extremes.cc was compiled for.
int64_t PaddedWidth(int64_t fan_out);

// Per coordinate: the sum of the num_high largest values (largest first), the
// next largest value, the sum of the num_low smallest (smallest first) and the
// next smallest. Each output is [fan_in, fan_out], row-major.
struct Extremes {
  float* largest_sum;
  float* upper;
  float* smallest_sum;
  float* lower;
};

// Fills rows [row_begin, row_end) of `out` for the values a[e, i] * d[e, j].
//
// a is [batch, fan_in] and d is [batch, padded_out] (row-major), padded_out =
// PaddedWidth(fan_out), with zeros beyond fan_out. max(num_high, num_low) + 1
// must be at most kMaxKept, and at most batch. Returns how many values are
// strictly above their coordinate's upper or below its lower value.
int64_t OuterExtremes(const float* a, const float* d, int64_t batch, int64_t fan_in,
                      int64_t fan_out, int64_t padded_out, int num_high, int num_low,
                      int64_t row_begin, int64_t row_end, const Extremes& out);

// The coordinate-wise median's two middle values: for rows [row_begin, row_end),
// the values a[e, i] * d[e, j] at sorted positions batch / 2 - 1 and batch / 2
// (batch / 2 for both when batch is odd), for every coordinate whose row of a
// and column of d both have at least batch - batch / 2 nonzeros. Elsewhere
// more than half of the values are 0, and so are both outputs. a, d and
// padded_out are as for OuterExtremes; lower and upper are [fan_in, fan_out].
void OuterMiddles(const float* a, const float* d, int64_t batch, int64_t fan_in, int64_t fan_out,
                  int64_t padded_out, int64_t row_begin, int64_t row_end, float* lower,
                  float* upper);

}  // namespace cg_tf

#endif  // CG_TF_KERNELS_EXTREMES_H_
