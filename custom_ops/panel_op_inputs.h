// The input checks of the TensorFlow op's kernels, shared by the CPU kernels (custom_ops/panel_op.cc) and the GPU
// ones (custom_ops/panel_op_gpu.cc): shapes, the host parameter vectors, the attributes, with the same messages.
// Values that live on the device (labels, feature norms) are checked by each kernel itself.
#ifndef KERAS_IMPLICIT_PANEL_OP_INPUTS_H_
#define KERAS_IMPLICIT_PANEL_OP_INPUTS_H_

#include <string>

#include "panel_math.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"

namespace keras_implicit {

// A message of panel_math.h's Check* functions as a Status.
inline ::tensorflow::Status AsStatus(const std::string& problem) {
  if (problem.empty()) return ::tensorflow::OkStatus();
  return ::tensorflow::errors::InvalidArgument(problem);
}

inline ::tensorflow::Status CheckVector(const ::tensorflow::Tensor& tensor, const char* name) {
  if (::tensorflow::TensorShapeUtils::IsVector(tensor.shape())) return ::tensorflow::OkStatus();
  return ::tensorflow::errors::InvalidArgument(name, " must be a vector, got shape ", tensor.shape().DebugString());
}

// What the shapes of inputs first..first + 2 (logits, labels, feature_norm) say.
struct InputShapes {
  ::tensorflow::int64 batch = 0;
  ::tensorflow::int64 classes = 0;
  bool norm_per_sample = false;
};

// logits [batch, classes] with at least 2 classes, labels [batch], feature_norm [] or [batch].
inline ::tensorflow::Status ReadShapes(::tensorflow::OpKernelContext* context, int first, InputShapes* shapes) {
  using ::tensorflow::TensorShapeUtils;
  const ::tensorflow::TensorShape& logits_shape = context->input(first).shape();
  if (!TensorShapeUtils::IsMatrix(logits_shape)) {
    return ::tensorflow::errors::InvalidArgument("logits must be [batch, classes], got shape ",
                                                 logits_shape.DebugString());
  }
  shapes->batch = logits_shape.dim_size(0);
  shapes->classes = logits_shape.dim_size(1);
  TF_RETURN_IF_ERROR(AsStatus(CheckClasses(shapes->batch, shapes->classes)));
  const ::tensorflow::Tensor& labels = context->input(first + 1);
  if (!TensorShapeUtils::IsVector(labels.shape()) || labels.dim_size(0) != shapes->batch) {
    return ::tensorflow::errors::InvalidArgument("labels must be [batch] = [", shapes->batch, "], got shape ",
                                                 labels.shape().DebugString());
  }
  const ::tensorflow::TensorShape& norm_shape = context->input(first + 2).shape();
  if (TensorShapeUtils::IsScalar(norm_shape)) {
    shapes->norm_per_sample = false;
  } else if (TensorShapeUtils::IsVector(norm_shape) && norm_shape.dim_size(0) == shapes->batch) {
    shapes->norm_per_sample = true;
  } else {
    return ::tensorflow::errors::InvalidArgument("feature_norm must be a scalar or [batch] = [", shapes->batch,
                                                 "], got shape ", norm_shape.DebugString());
  }
  return ::tensorflow::OkStatus();
}

// Inputs first + 3..first + 5 (sigmas, temperatures, margins; in host memory): vectors of valid parameters.
inline ::tensorflow::Status ReadHostPanel(::tensorflow::OpKernelContext* context, int first, bool error,
                                          Panel* panel) {
  const ::tensorflow::Tensor &sigmas = context->input(first + 3), &temperatures = context->input(first + 4),
                             &margins = context->input(first + 5);
  TF_RETURN_IF_ERROR(CheckVector(sigmas, "sigmas"));
  TF_RETURN_IF_ERROR(CheckVector(temperatures, "temperatures"));
  TF_RETURN_IF_ERROR(CheckVector(margins, "margins"));
  return AsStatus(ReadPanel(sigmas.flat<double>().data(), sigmas.NumElements(), temperatures.flat<double>().data(),
                            temperatures.NumElements(), margins.flat<double>().data(), margins.NumElements(), error,
                            panel));
}

// The upstream gradient, input 0 of the gradient kernels: [batch, columns], or [columns] with `reduce`.
inline ::tensorflow::Status CheckUpstream(const ::tensorflow::Tensor& upstream, ::tensorflow::int64 batch,
                                          ::tensorflow::int64 columns, bool reduce) {
  const ::tensorflow::TensorShape expected =
      reduce ? ::tensorflow::TensorShape({columns}) : ::tensorflow::TensorShape({batch, columns});
  if (upstream.shape() == expected) return ::tensorflow::OkStatus();
  return ::tensorflow::errors::InvalidArgument("grad must have shape ", expected.DebugString(), ", got ",
                                               upstream.shape().DebugString());
}

// The attributes every kernel of both ops reads.
class PanelKernelBase : public ::tensorflow::OpKernel {
 public:
  explicit PanelKernelBase(::tensorflow::OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("error", &error_));
    OP_REQUIRES_OK(context, context->GetAttr("reduce", &reduce_));
  }

 protected:
  bool error_ = false;
  bool reduce_ = false;
};

}  // namespace keras_implicit

#endif  // KERAS_IMPLICIT_PANEL_OP_INPUTS_H_
