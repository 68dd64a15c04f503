// CUDA kernels of fast_attn::cuda_glu_fwd / cuda_glu_bwd (schemas in ops.cpp).
//
// The torch side of csrc/ffn/glu.cu: input checks whose messages name the argument and
// the expectation, the activation name, views of (..., cols) tensors as (rows, cols),
// output allocation, and the launch on the current CUDA stream. Inputs are copied only
// when their last dimension is not contiguous or their leading dimensions cannot be read
// with one row stride; they are never written. Outputs are contiguous tensors of gate's
// shape and dtype. Empty inputs give empty outputs without a launch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <tuple>

#include "common/row_view_ops.h"
#include "glu.h"

namespace {

using fast_attn::as_rows;
using fast_attn::RowView;

fast_attn::ScalarKind scalar_kind(const at::Tensor& gate) {
  switch (gate.scalar_type()) {
    case at::kFloat:
      return fast_attn::ScalarKind::kFloat32;
    case at::kHalf:
      return fast_attn::ScalarKind::kFloat16;
    case at::kBFloat16:
      return fast_attn::ScalarKind::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, "glu: gate must be float16, bfloat16 or float32, got ", gate.scalar_type());
  }
}

fast_attn::GluActivation parse_activation(c10::string_view activation) {
  if (activation == "silu") return fast_attn::GluActivation::kSilu;
  if (activation == "gelu") return fast_attn::GluActivation::kGelu;
  if (activation == "gelu_tanh") return fast_attn::GluActivation::kGeluTanh;
  TORCH_CHECK_VALUE(false, "glu: activation must be \"silu\", \"gelu\" or \"gelu_tanh\", got \"", activation, "\"");
}

// `other` (named `name`) must sit on gate's device with gate's dtype and shape.
void check_like_gate(const at::Tensor& other, const char* name, const at::Tensor& gate) {
  TORCH_CHECK_VALUE(other.device() == gate.device(), "glu: ", name, " must be on gate's device (", gate.device(),
                    "), got ", other.device());
  TORCH_CHECK_TYPE(other.scalar_type() == gate.scalar_type(), "glu: ", name, " must have gate's dtype (",
                   gate.scalar_type(), "), got ", other.scalar_type());
  TORCH_CHECK_VALUE(other.sizes() == gate.sizes(), "glu: ", name, " must have gate's shape ", gate.sizes(), ", got ",
                    other.sizes());
}

void check_inputs(const at::Tensor& gate, const at::Tensor& up, const at::Tensor* dy) {
  TORCH_CHECK_VALUE(gate.is_cuda(), "glu: gate must be a CUDA tensor, got device ", gate.device());
  TORCH_CHECK_VALUE(gate.dim() >= 1, "glu: gate must have shape (..., cols), got a 0-dim tensor");
  scalar_kind(gate);
  check_like_gate(up, "up", gate);
  if (dy != nullptr) check_like_gate(*dy, "dy", gate);
}

fast_attn::GluParams make_params(const RowView& gate, const RowView& up, fast_attn::GluActivation activation) {
  fast_attn::GluParams params;
  params.gate = gate.tensor.data_ptr();
  params.up = up.tensor.data_ptr();
  params.rows = gate.rows;
  params.cols = gate.cols;
  params.gate_row_stride = gate.row_stride;
  params.up_row_stride = up.row_stride;
  params.dtype = scalar_kind(gate.tensor);
  params.activation = activation;
  return params;
}

at::Tensor glu_fwd(const at::Tensor& gate, const at::Tensor& up, c10::string_view activation) {
  check_inputs(gate, up, nullptr);
  const fast_attn::GluActivation act = parse_activation(activation);
  const c10::cuda::CUDAGuard device_guard(gate.device());
  at::Tensor y = at::empty(gate.sizes(), gate.options());
  if (gate.numel() == 0) return y;

  // The views own any copies they made: they must outlive the launch.
  const RowView gate_rows = as_rows(gate);
  const RowView up_rows = as_rows(up);
  fast_attn::GluParams params = make_params(gate_rows, up_rows, act);
  params.y = y.data_ptr();
  C10_CUDA_CHECK(fast_attn::glu_fwd(params, c10::cuda::getCurrentCUDAStream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor> glu_bwd(const at::Tensor& dy, const at::Tensor& gate, const at::Tensor& up,
                                           c10::string_view activation) {
  check_inputs(gate, up, &dy);
  const fast_attn::GluActivation act = parse_activation(activation);
  const c10::cuda::CUDAGuard device_guard(gate.device());
  at::Tensor dgate = at::empty(gate.sizes(), gate.options());
  at::Tensor dup = at::empty(gate.sizes(), gate.options());
  if (gate.numel() == 0) return {dgate, dup};

  // The views own any copies they made: they must outlive the launch.
  const RowView dy_rows = as_rows(dy);
  const RowView gate_rows = as_rows(gate);
  const RowView up_rows = as_rows(up);
  fast_attn::GluParams params = make_params(gate_rows, up_rows, act);
  params.dy = dy_rows.tensor.data_ptr();
  params.dy_row_stride = dy_rows.row_stride;
  params.dgate = dgate.data_ptr();
  params.dup = dup.data_ptr();
  C10_CUDA_CHECK(fast_attn::glu_bwd(params, c10::cuda::getCurrentCUDAStream()));
  return {dgate, dup};
}

}  // namespace

TORCH_LIBRARY_IMPL(fast_attn, CUDA, m) {
  m.impl("cuda_glu_fwd", &glu_fwd);
  m.impl("cuda_glu_bwd", &glu_bwd);
}
