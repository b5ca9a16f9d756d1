// CgTfOuterExtremes and CgTfOuterMiddles: extremes.h as TensorFlow CPU ops,
// their rows split over TensorFlow's intra-op threads. Each row is computed
// whole by one thread, so the results do not depend on the number of threads.

#include <algorithm>
#include <atomic>
#include <cstring>

#include "extremes.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace cg_tf {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::shape_inference::InferenceContext;

// Shapes of an op of (activations [batch, fan_in], deltas [batch, fan_out]):
// `coordinate_outputs` outputs of [fan_in, fan_out], then scalars.
absl::Status PerCoordinateShapes(InferenceContext* c, int coordinate_outputs) {
  ::tensorflow::shape_inference::ShapeHandle a, d;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &a));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &d));
  const auto coordinates = c->Matrix(c->Dim(a, 1), c->Dim(d, 1));
  for (int i = 0; i < c->num_outputs(); ++i) {
    c->set_output(i, i < coordinate_outputs ? coordinates : c->Scalar());
  }
  return absl::OkStatus();
}

REGISTER_OP("CgTfOuterExtremes")
    .Input("activations: float")
    .Input("deltas: float")
    .Attr("num_high: int >= 0")
    .Attr("num_low: int >= 0")
    .Output("largest_sum: float")
    .Output("upper: float")
    .Output("smallest_sum: float")
    .Output("lower: float")
    .Output("num_clipped: int64")
    .SetShapeFn([](InferenceContext* c) { return PerCoordinateShapes(c, 4); })
    .Doc(R"doc(
For every coordinate (i, j) of the per-example values activations[e, i] *
deltas[e, j]: the sum of the num_high largest, the next largest, the sum of the
num_low smallest and the next smallest; and how many values lie strictly
outside those two bounds. activations [batch, fan_in], deltas [batch, fan_out];
four [fan_in, fan_out] outputs and an int64 scalar.
)doc");

// `deltas` [batch, fan_out] as the kernels read it: [batch, PaddedWidth(fan_out)],
// zeros in the padding columns; `padded` holds the copy when one is needed.
absl::Status PaddedDeltas(OpKernelContext* context, const Tensor& deltas, Tensor* padded,
                          const float** d) {
  const int64_t batch = deltas.dim_size(0), fan_out = deltas.dim_size(1);
  const int64_t padded_out = PaddedWidth(fan_out);
  *d = deltas.flat<float>().data();
  if (padded_out == fan_out) return absl::OkStatus();
  TF_RETURN_IF_ERROR(context->allocate_temp(::tensorflow::DT_FLOAT,
                                            TensorShape({batch, padded_out}), padded));
  float* p = padded->flat<float>().data();
  std::memset(p, 0, sizeof(float) * batch * padded_out);
  for (int64_t e = 0; e < batch; ++e) {
    std::memcpy(p + e * padded_out, *d + e * fan_out, sizeof(float) * fan_out);
  }
  *d = p;
  return absl::OkStatus();
}

absl::Status CheckFactors(const Tensor& activations, const Tensor& deltas) {
  if (activations.dims() == 2 && deltas.dims() == 2 &&
      activations.dim_size(0) == deltas.dim_size(0)) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError("activations and deltas must be [batch, n] matrices");
}

class OuterExtremesOp : public OpKernel {
 public:
  explicit OuterExtremesOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("num_high", &num_high_));
    OP_REQUIRES_OK(context, context->GetAttr("num_low", &num_low_));
    most_kept_ = std::max(num_high_, num_low_);
    OP_REQUIRES(context, most_kept_ < kMaxKept,
                absl::InvalidArgumentError("CgTfOuterExtremes clips at most 15 values a side"));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& activations = context->input(0);
    const Tensor& deltas = context->input(1);
    OP_REQUIRES_OK(context, CheckFactors(activations, deltas));
    const int64_t batch = activations.dim_size(0);
    const int64_t fan_in = activations.dim_size(1);
    const int64_t fan_out = deltas.dim_size(1);
    OP_REQUIRES(context, most_kept_ < batch,
                absl::InvalidArgumentError("CgTfOuterExtremes needs more examples than it keeps"));
    Tensor* outputs[4];
    for (int k = 0; k < 4; ++k) {
      OP_REQUIRES_OK(context,
                     context->allocate_output(k, TensorShape({fan_in, fan_out}), &outputs[k]));
    }
    Tensor* num_clipped;
    OP_REQUIRES_OK(context, context->allocate_output(4, TensorShape({}), &num_clipped));
    const int64_t padded_out = PaddedWidth(fan_out);
    const float* d;
    Tensor padded;
    OP_REQUIRES_OK(context, PaddedDeltas(context, deltas, &padded, &d));
    const Extremes out{outputs[0]->flat<float>().data(), outputs[1]->flat<float>().data(),
                       outputs[2]->flat<float>().data(), outputs[3]->flat<float>().data()};
    const float* a = activations.flat<float>().data();
    std::atomic<int64_t> clipped{0};
    const int kept = most_kept_ + 1;
    // Cost of a row, in the sharder's units (about a cycle): two min/max a
    // level a side per value.
    const int64_t cost_per_row = batch * padded_out * (4 * kept + 1) / 8;
    const auto& workers = *context->device()->tensorflow_cpu_worker_threads();
    ::tensorflow::Shard(workers.num_threads, workers.workers, fan_in, cost_per_row,
                        [&](int64_t begin, int64_t end) {
                          clipped += OuterExtremes(a, d, batch, fan_in, fan_out, padded_out,
                                                   num_high_, num_low_, begin, end, out);
                        });
    num_clipped->scalar<int64_t>()() = clipped.load();
  }

 private:
  int num_high_;
  int num_low_;
  int most_kept_;  // the larger of num_high_ and num_low_
};

REGISTER_KERNEL_BUILDER(Name("CgTfOuterExtremes").Device(::tensorflow::DEVICE_CPU),
                        OuterExtremesOp);

REGISTER_OP("CgTfOuterMiddles")
    .Input("activations: float")
    .Input("deltas: float")
    .Output("lower: float")
    .Output("upper: float")
    .SetShapeFn([](InferenceContext* c) { return PerCoordinateShapes(c, 2); })
    .Doc(R"doc(
For every coordinate (i, j) of the per-example values activations[e, i] *
deltas[e, j]: the values at sorted positions batch / 2 - 1 and batch / 2
(batch / 2 twice for odd batch), or 0 and 0 where more than half of row i's
activations or of column j's errors are 0. Two [fan_in, fan_out] outputs.
)doc");

class OuterMiddlesOp : public OpKernel {
 public:
  explicit OuterMiddlesOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& activations = context->input(0);
    const Tensor& deltas = context->input(1);
    OP_REQUIRES_OK(context, CheckFactors(activations, deltas));
    const int64_t batch = activations.dim_size(0);
    const int64_t fan_in = activations.dim_size(1);
    const int64_t fan_out = deltas.dim_size(1);
    Tensor *lower, *upper;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({fan_in, fan_out}), &lower));
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({fan_in, fan_out}), &upper));
    if (batch == 0) return;
    const int64_t padded_out = PaddedWidth(fan_out);
    const float* d;
    Tensor padded;
    OP_REQUIRES_OK(context, PaddedDeltas(context, deltas, &padded, &d));
    const float* a = activations.flat<float>().data();
    // A bitonic sort of the batch per vector of columns: about size log2(size)^2 / 4
    // min/max pairs for size = the batch rounded up to a power of two.
    int64_t size = 1, depth = 0;
    while (size < batch) size *= 2, ++depth;
    const int64_t cost_per_row = padded_out * size * (depth * depth + 1) / 8;
    const auto& workers = *context->device()->tensorflow_cpu_worker_threads();
    ::tensorflow::Shard(workers.num_threads, workers.workers, fan_in, cost_per_row,
                        [&](int64_t begin, int64_t end) {
                          OuterMiddles(a, d, batch, fan_in, fan_out, padded_out, begin, end,
                                       lower->flat<float>().data(), upper->flat<float>().data());
                        });
  }
};

REGISTER_KERNEL_BUILDER(Name("CgTfOuterMiddles").Device(::tensorflow::DEVICE_CPU),
                        OuterMiddlesOp);

}  // namespace cg_tf
