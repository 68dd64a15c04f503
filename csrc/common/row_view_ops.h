// Reading a (..., cols) tensor as a (rows, cols) matrix with one row stride: the layout
// the row-wise kernels (csrc/ffn/, csrc/norm/) take. Torch side only: like *_ops.cpp, an
// *_ops.h file may include torch headers; kernel files and their headers may not.
//
// The leading dims collapse into one row index when, skipping size-1 dims, each one's
// stride is the next inner one's stride times its size; the last dim must have unit
// stride. Anything else is copied once to a contiguous tensor, so views such as
// x[:, :k] or a transposed batch are read in place when possible.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fast_attn {

// Element (r, c) of `tensor` sits at data + r * row_stride + c.
struct RowView {
  at::Tensor tensor;  // the input itself, or its contiguous copy
  int64_t rows;
  int64_t cols;
  int64_t row_stride;  // in elements
};

inline RowView as_rows(const at::Tensor& t) {
  const int64_t ndim = t.dim();
  const int64_t cols = t.size(-1);
  int64_t rows = 1;
  for (int64_t d = 0; d < ndim - 1; ++d) rows *= t.size(d);

  bool collapsible = cols <= 1 || t.stride(-1) == 1;
  int64_t row_stride = -1;
  int64_t expected = 0;
  for (int64_t d = ndim - 2; d >= 0 && collapsible; --d) {
    if (t.size(d) == 1) continue;
    if (row_stride < 0) {
      row_stride = t.stride(d);
      expected = row_stride * t.size(d);
    } else if (t.stride(d) == expected) {
      expected *= t.size(d);
    } else {
      collapsible = false;
    }
  }
  if (!collapsible) return RowView{t.contiguous(), rows, cols, cols};
  return RowView{t, rows, cols, row_stride < 0 ? cols : row_stride};
}

}  // namespace fast_attn
