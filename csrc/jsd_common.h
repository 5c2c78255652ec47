// What the CPU and CUDA implementations of jsd_logits share beyond the row contract of
// kl_div_common.h: the check of beta, and the endpoints where the op is a KL divergence.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

namespace kl_fused {

inline void check_jsd_beta(double beta) {
  TORCH_CHECK_VALUE(std::isfinite(beta) && beta >= 0.0 && beta <= 1.0, "beta must be in [0, 1], got ", beta);
}

// beta = 0 is KL(p || q) (forward, teacher || student) and beta = 1 KL(q || p) (reverse), as TRL
// defines them; there the op runs kl_div_logits' kernels, so the endpoints are exact. Returns the
// `reverse` flag of kl_div_logits at an endpoint, nullopt for the mixture 0 < beta < 1.
inline std::optional<bool> jsd_kl_endpoint(double beta) {
  if (beta == 0.0) return false;
  if (beta == 1.0) return true;
  return std::nullopt;
}

}  // namespace kl_fused
