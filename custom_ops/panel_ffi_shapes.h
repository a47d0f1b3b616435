// The shape checks and the attribute binding of the XLA FFI handlers, shared by the CPU binding
// (custom_ops/panel_ffi.cc) and the CUDA one (custom_ops/panel_ffi_cuda.cc): the same messages and attributes
// wherever the panel runs. Needs jaxlib's FFI headers.
#ifndef KERAS_IMPLICIT_PANEL_FFI_SHAPES_H_
#define KERAS_IMPLICIT_PANEL_FFI_SHAPES_H_

#include <string>

#include "panel_math.h"
#include "xla/ffi/api/ffi.h"

namespace keras_implicit {
namespace ffi_shapes {

namespace ffi = xla::ffi;

inline std::string Shape(const ffi::AnyBuffer::Dimensions& dims) {
  std::string text = "[";
  for (size_t i = 0; i < dims.size(); ++i) text += (i ? "," : "") + std::to_string(dims[i]);
  return text + "]";
}

// What the shapes of (logits, labels, feature_norm) say.
struct Shapes {
  Index batch = 0;
  Index classes = 0;
  bool norm_per_sample = false;
};

// logits [batch, classes] with at least 2 classes, labels [batch], feature_norm [] or [batch]; returns the
// message of the first problem, or the empty string.
template <ffi::DataType dtype>
std::string ReadShapes(const ffi::Buffer<dtype>& logits, const ffi::Buffer<ffi::S32>& labels,
                       const ffi::Buffer<dtype>& feature_norm, Shapes* shapes) {
  const auto dims = logits.dimensions();
  if (dims.size() != 2) return "logits must be [batch, classes], got shape " + Shape(dims);
  const Index batch = dims[0], classes = dims[1];
  std::string message = CheckClasses(batch, classes);
  if (!message.empty()) return message;
  if (labels.dimensions().size() != 1 || labels.dimensions()[0] != batch) {
    return "labels must be [batch] = [" + std::to_string(batch) + "], got shape " + Shape(labels.dimensions());
  }
  const auto norm_dims = feature_norm.dimensions();
  bool per_sample = false;
  if (norm_dims.size() == 1 && norm_dims[0] == batch) {
    per_sample = true;
  } else if (norm_dims.size() != 0) {
    return "feature_norm must be a scalar or [batch] = [" + std::to_string(batch) + "], got shape " +
           Shape(norm_dims);
  }
  *shapes = Shapes{batch, classes, per_sample};
  return std::string();
}

// The forward result: [batch, columns], or [columns] with `reduce`.
template <ffi::DataType dtype>
std::string CheckValues(ffi::ResultBuffer<dtype> values, Index batch, Index columns, bool reduce) {
  if (columns == 0) return "the panel is empty";
  const Index expected = reduce ? columns : batch * columns;
  if (static_cast<Index>(values->element_count()) == expected) return std::string();
  return "values must hold " + std::to_string(expected) + " elements, got shape " + Shape(values->dimensions());
}

// The gradient's upstream: [batch, columns], or [columns] with `reduce`.
template <ffi::DataType dtype>
std::string CheckUpstream(const ffi::Buffer<dtype>& grad, Index batch, Index columns, bool reduce) {
  const auto dims = grad.dimensions();
  const bool fits = reduce ? (dims.size() == 1 && dims[0] == columns)
                           : (dims.size() == 2 && dims[0] == batch && dims[1] == columns);
  if (fits) return std::string();
  const std::string expected = reduce ? "[" + std::to_string(columns) + "]"
                                      : "[" + std::to_string(batch) + "," + std::to_string(columns) + "]";
  return "grad must have shape " + expected + ", got " + Shape(dims);
}

}  // namespace ffi_shapes
}  // namespace keras_implicit

// The panel's static attributes (the parameters, `error` and `reduce`), bound in this order by every handler of
// both bindings, after their contexts and buffers: `KERAS_IMPLICIT_PANEL_ATTRIBUTES(ffi::Ffi::Bind()...)`.
#define KERAS_IMPLICIT_PANEL_ATTRIBUTES(binding)               \
  binding.Attr<::xla::ffi::Span<const double>>("sigmas")      \
      .Attr<::xla::ffi::Span<const double>>("temperatures")   \
      .Attr<::xla::ffi::Span<const double>>("margins")        \
      .Attr<bool>("error")                                    \
      .Attr<bool>("reduce")

#endif  // KERAS_IMPLICIT_PANEL_FFI_SHAPES_H_
