// The kl_div_logits op on CUDA (kl_div_cuda.cu), for the ops that are a KL divergence in some of
// their arguments: jsd_logits at beta = 0 and beta = 1 (jsd_cuda.cu).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>
#include <tuple>

namespace kl_fused::cuda {

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_div_logits_cuda(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const std::optional<at::Tensor>& mask,
    double temperature, bool reverse, c10::string_view reduction, bool student_grad, bool teacher_grad);

}  // namespace kl_fused::cuda
