// CUDA kernels of fast_attn::cuda_norm_fwd / cuda_norm_bwd (schemas in ops.cpp).
//
// The torch side of csrc/norm/norm_{fwd,bwd}.cu: input checks whose messages name the
// argument and the expectation, views of (..., cols) tensors as (rows, cols), output and
// workspace allocation, and the launch on the current CUDA stream. Row tensors are copied
// only when their last dimension is not contiguous or their leading dimensions cannot be
// read with one row stride. Outputs are contiguous.
//
// weight and bias may have any float dtype (fast_attn.layer_norm allows it): the kernels
// read them in x's dtype or in fp32, so other dtypes (fp64, or fp16 with bf16 x and the
// like) are converted to fp32 here, exactly for 16-bit values. dweight and dbias come back
// in the weight's dtype (x's dtype without weight).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "common/row_view_ops.h"
#include "norm.h"

namespace {

using fast_attn::as_rows;
using fast_attn::RowView;

fast_attn::NormDtype norm_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return fast_attn::NormDtype::kFloat32;
    case at::kHalf:
      return fast_attn::NormDtype::kFloat16;
    case at::kBFloat16:
      return fast_attn::NormDtype::kBFloat16;
    case at::kDouble:
      return fast_attn::NormDtype::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, "norm: unsupported dtype ", type);
  }
}

// The tensor normalised (x, or inp of the backward): CUDA, (..., cols >= 1), 16/32-bit float.
void check_rows_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), "norm: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.dim() >= 1, "norm: ", name, " must have shape (..., N), got a 0-dim tensor");
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK_TYPE(type == at::kHalf || type == at::kBFloat16 || type == at::kFloat, "norm: ", name,
                   " must be float16, bfloat16 or float32, got ", type);
  TORCH_CHECK_VALUE(t.size(-1) >= 1, "norm: ", name,
                    " must have a last dimension (the normalised width) >= 1, got shape ", t.sizes());
}

// `other` (named `name`) must have the shape, dtype and device of `like` (named like_name).
void check_same_as(const at::Tensor& other, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_VALUE(other.device() == like.device(), "norm: ", name, " must be on ", like_name, "'s device (",
                    like.device(), "), got ", other.device());
  TORCH_CHECK_TYPE(other.scalar_type() == like.scalar_type(), "norm: ", name, " must have ", like_name, "'s dtype (",
                   like.scalar_type(), "), got ", other.scalar_type());
  TORCH_CHECK_VALUE(other.sizes() == like.sizes(), "norm: ", name, " must have ", like_name, "'s shape ", like.sizes(),
                    ", got ", other.sizes());
}

// weight / bias: (cols,) of a float dtype on x's device.
void check_param(const std::optional<at::Tensor>& param, const char* name, const at::Tensor& x) {
  if (!param.has_value()) return;
  TORCH_CHECK_VALUE(param->device() == x.device(), "norm: ", name, " must be on x's device (", x.device(), "), got ",
                    param->device());
  const at::ScalarType type = param->scalar_type();
  TORCH_CHECK_TYPE(type == at::kHalf || type == at::kBFloat16 || type == at::kFloat || type == at::kDouble, "norm: ",
                   name, " must be float16, bfloat16, float32 or float64, got ", type);
  TORCH_CHECK_VALUE(param->dim() == 1 && param->size(0) == x.size(-1), "norm: ", name, " must have shape (",
                    x.size(-1), ",) to match the last dimension of x ", x.sizes(), ", got ", param->sizes());
}

// A per-row statistic of the backward: fp32 (rows,) on inp's device.
void check_stat(const at::Tensor& stat, const char* name, const at::Tensor& inp, int64_t rows) {
  TORCH_CHECK_VALUE(stat.device() == inp.device(), "norm: ", name, " must be on inp's device (", inp.device(),
                    "), got ", stat.device());
  TORCH_CHECK_TYPE(stat.scalar_type() == at::kFloat, "norm: ", name, " must be float32, got ", stat.scalar_type());
  TORCH_CHECK_VALUE(stat.dim() == 1 && stat.size(0) == rows, "norm: ", name, " must have shape (", rows,
                    ",) (one value per row of inp ", inp.sizes(), "), got ", stat.sizes());
}

// The parameter as the kernels read it: contiguous, in x's dtype or fp32; undefined if absent.
at::Tensor kernel_param(const std::optional<at::Tensor>& param, const at::Tensor& x) {
  if (!param.has_value()) return at::Tensor();
  const at::Tensor p = param->contiguous();
  if (p.scalar_type() == x.scalar_type() || p.scalar_type() == at::kFloat) return p;
  return p.to(at::kFloat);
}

int64_t row_count(const at::Tensor& t) { return t.numel() / t.size(-1); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd(const at::Tensor& x,
                                                                    const std::optional<at::Tensor>& residual,
                                                                    const std::optional<at::Tensor>& weight,
                                                                    const std::optional<at::Tensor>& bias, double eps,
                                                                    bool rms) {
  check_rows_input(x, "x");
  if (residual.has_value()) check_same_as(*residual, "residual", x, "x");
  check_param(weight, "weight", x);
  check_param(bias, "bias", x);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, "norm: eps must be a finite number >= 0, got ", eps);

  const c10::cuda::CUDAGuard device_guard(x.device());
  const int64_t rows = row_count(x);
  const at::TensorOptions stat_options = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor h = residual.has_value() ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({rms ? 0 : rows}, stat_options);
  at::Tensor rstd = at::empty({rows}, stat_options);
  if (rows == 0) return {y, h, mean, rstd};

  const RowView xv = as_rows(x);
  const RowView rv = residual.has_value() ? as_rows(*residual) : RowView{at::Tensor(), 0, 0, 0};
  const at::Tensor w = kernel_param(weight, x);
  const at::Tensor b = kernel_param(bias, x);

  fast_attn::NormFwdParams params;
  params.x = xv.tensor.data_ptr();
  params.residual = rv.tensor.defined() ? rv.tensor.data_ptr() : nullptr;
  params.weight = w.defined() ? w.data_ptr() : nullptr;
  params.bias = b.defined() ? b.data_ptr() : nullptr;
  params.y = y.data_ptr();
  params.h = residual.has_value() ? h.data_ptr() : nullptr;
  params.mean = rms ? nullptr : mean.data_ptr<float>();
  params.rstd = rstd.data_ptr<float>();
  params.rows = rows;
  params.cols = xv.cols;
  params.x_row_stride = xv.row_stride;
  params.residual_row_stride = rv.row_stride;
  params.eps = static_cast<float>(eps);
  params.rms = rms;
  params.dtype = norm_dtype(x.scalar_type());
  params.weight_dtype = w.defined() ? norm_dtype(w.scalar_type()) : params.dtype;
  params.bias_dtype = b.defined() ? norm_dtype(b.scalar_type()) : params.dtype;
  params.device = x.get_device();
  C10_CUDA_CHECK(fast_attn::norm_fwd(params, c10::cuda::getCurrentCUDAStream()));
  return {y, h, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd(const at::Tensor& dy, const std::optional<at::Tensor>& dh,
                                                        const at::Tensor& inp, const std::optional<at::Tensor>& weight,
                                                        const at::Tensor& mean, const at::Tensor& rstd, bool rms,
                                                        bool want_dbias) {
  check_rows_input(inp, "inp");
  check_same_as(dy, "dy", inp, "inp");
  if (dh.has_value()) check_same_as(*dh, "dh", inp, "inp");
  check_param(weight, "weight", inp);
  const int64_t rows = row_count(inp);
  if (!rms) check_stat(mean, "mean", inp, rows);
  check_stat(rstd, "rstd", inp, rows);

  const c10::cuda::CUDAGuard device_guard(inp.device());
  const int64_t cols = inp.size(-1);
  // dweight and dbias in the weight's dtype (inp's without weight).
  const at::TensorOptions param_options = weight.has_value() ? weight->options() : inp.options();
  at::Tensor dx = at::empty(inp.sizes(), inp.options());
  at::Tensor dweight = at::empty({weight.has_value() ? cols : 0}, param_options);
  at::Tensor dbias = at::empty({want_dbias ? cols : 0}, param_options);
  if (rows == 0 && dweight.numel() == 0 && dbias.numel() == 0) return {dx, dweight, dbias};

  const RowView inpv = as_rows(inp);
  const RowView dyv = as_rows(dy);
  const RowView dhv = dh.has_value() ? as_rows(*dh) : RowView{at::Tensor(), 0, 0, 0};
  const at::Tensor w = kernel_param(weight, inp);
  const at::Tensor mean_c = rms ? at::Tensor() : mean.contiguous();
  const at::Tensor rstd_c = rstd.contiguous();

  fast_attn::NormBwdParams params;
  params.dy = dyv.tensor.data_ptr();
  params.dh = dhv.tensor.defined() ? dhv.tensor.data_ptr() : nullptr;
  params.inp = inpv.tensor.data_ptr();
  params.weight = w.defined() ? w.data_ptr() : nullptr;
  params.mean = rms ? nullptr : mean_c.data_ptr<float>();
  params.rstd = rstd_c.data_ptr<float>();
  params.dx = dx.data_ptr();
  params.dweight = weight.has_value() ? dweight.data_ptr() : nullptr;
  params.dbias = want_dbias ? dbias.data_ptr() : nullptr;
  params.rows = rows;
  params.cols = cols;
  params.dy_row_stride = dyv.row_stride;
  params.dh_row_stride = dhv.row_stride;
  params.inp_row_stride = inpv.row_stride;
  params.rms = rms;
  params.dtype = norm_dtype(inp.scalar_type());
  params.weight_dtype = w.defined() ? norm_dtype(w.scalar_type()) : params.dtype;
  params.param_dtype = norm_dtype(dweight.scalar_type());
  params.device = inp.get_device();

  // fp32 partial column sums (one row per block), and per-row sums for very wide rows.
  const int64_t numel = fast_attn::norm_bwd_workspace_numel(params);
  TORCH_CHECK(numel >= 0, "norm: cannot query the multiprocessor count of device ", inp.device());
  at::Tensor workspace = at::empty({numel}, inp.options().dtype(at::kFloat));
  params.workspace = numel > 0 ? workspace.data_ptr<float>() : nullptr;
  C10_CUDA_CHECK(fast_attn::norm_bwd(params, c10::cuda::getCurrentCUDAStream()));
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(fast_attn, CUDA, m) {
  m.impl("cuda_norm_fwd", &norm_fwd);
  m.impl("cuda_norm_bwd", &norm_bwd);
}
