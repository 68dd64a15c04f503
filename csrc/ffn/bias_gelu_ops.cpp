// CUDA kernels of fast_attn::cuda_bias_gelu_fwd / cuda_bias_gelu_bwd (schemas in ops.cpp).
//
// The torch side of csrc/ffn/bias_gelu.cu: input checks whose messages name the argument
// and the expectation, views of (..., cols) tensors as (rows, cols), output and workspace
// allocation, and the launch on the current CUDA stream. Inputs are copied only when
// their last dimension is not contiguous or their leading dimensions cannot be read with
// one row stride. Outputs are contiguous tensors of x's shape.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/row_view_ops.h"
#include "bias_gelu.h"

namespace {

using fast_attn::as_rows;
using fast_attn::RowView;

fast_attn::ScalarKind scalar_kind(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return fast_attn::ScalarKind::kFloat32;
    case at::kHalf:
      return fast_attn::ScalarKind::kFloat16;
    case at::kBFloat16:
      return fast_attn::ScalarKind::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "bias_gelu: x must be float16, bfloat16 or float32, got ", x.scalar_type());
  }
}

// `other` (named `name`) must sit on x's device with x's dtype.
void check_like_x(const at::Tensor& other, const char* name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(other.device() == x.device(), "bias_gelu: ", name, " must be on x's device (", x.device(),
                    "), got ", other.device());
  TORCH_CHECK_TYPE(other.scalar_type() == x.scalar_type(), "bias_gelu: ", name, " must have x's dtype (",
                   x.scalar_type(), "), got ", other.scalar_type());
}

void check_inputs(const at::Tensor& x, const std::optional<at::Tensor>& bias, const at::Tensor* dy) {
  TORCH_CHECK_VALUE(x.is_cuda(), "bias_gelu: x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK_VALUE(x.dim() >= 1, "bias_gelu: x must have shape (..., cols), got a 0-dim tensor");
  scalar_kind(x);
  if (bias.has_value()) {
    check_like_x(*bias, "bias", x);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == x.size(-1), "bias_gelu: bias must have shape (",
                      x.size(-1), ",) to match the last dimension of x ", x.sizes(), ", got ", bias->sizes());
  }
  if (dy != nullptr) {
    check_like_x(*dy, "dy", x);
    TORCH_CHECK_VALUE(dy->sizes() == x.sizes(), "bias_gelu: dy must have x's shape ", x.sizes(), ", got ",
                      dy->sizes());
  }
}

fast_attn::BiasGeluParams make_params(const RowView& xv, const at::Tensor& bias, const at::Tensor& out,
                                      bool approximate_tanh) {
  fast_attn::BiasGeluParams params;
  params.x = xv.tensor.data_ptr();
  params.bias = bias.defined() ? bias.data_ptr() : nullptr;
  params.out = out.data_ptr();
  params.rows = xv.rows;
  params.cols = xv.cols;
  params.x_row_stride = xv.row_stride;
  params.out_row_stride = xv.cols;  // outputs are allocated contiguous
  params.dtype = scalar_kind(xv.tensor);
  params.approximate_tanh = approximate_tanh;
  params.device = xv.tensor.get_device();
  return params;
}

at::Tensor bias_gelu_fwd(const at::Tensor& x, const std::optional<at::Tensor>& bias, bool approximate_tanh) {
  check_inputs(x, bias, nullptr);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return y;

  const RowView xv = as_rows(x);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const fast_attn::BiasGeluParams params = make_params(xv, b, y, approximate_tanh);
  C10_CUDA_CHECK(fast_attn::bias_gelu_fwd(params, c10::cuda::getCurrentCUDAStream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                 const std::optional<at::Tensor>& bias, bool approximate_tanh) {
  check_inputs(x, bias, &dy);
  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dbias = at::empty({bias.has_value() ? x.size(-1) : 0}, x.options());
  if (dbias.numel() == 0 && x.numel() == 0) return {dx, dbias};

  const RowView xv = as_rows(x);
  const RowView dyv = as_rows(dy);
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  fast_attn::BiasGeluParams params = make_params(xv, b, dx, approximate_tanh);
  params.dy = dyv.tensor.data_ptr();
  params.dy_row_stride = dyv.row_stride;

  at::Tensor workspace;  // fp32 partial column sums of dx, one row per slab of rows
  if (b.defined()) {
    params.dbias = dbias.data_ptr();
    const int64_t numel = fast_attn::bias_gelu_bwd_workspace_numel(params);
    TORCH_CHECK(numel >= 0, "bias_gelu: cannot query the multiprocessor count of device ", x.device());
    workspace = at::empty({numel}, x.options().dtype(at::kFloat));
    params.workspace = numel > 0 ? workspace.data_ptr<float>() : nullptr;
  }
  C10_CUDA_CHECK(fast_attn::bias_gelu_bwd(params, c10::cuda::getCurrentCUDAStream()));
  return {dx, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fast_attn, CUDA, m) {
  m.impl("cuda_bias_gelu_fwd", &bias_gelu_fwd);
  m.impl("cuda_bias_gelu_bwd", &bias_gelu_bwd);
}
