// The CPU row kernels for any x86-64 or other CPU (at::vec's portable DEFAULT implementation).
#define KL_FUSED_CPU_NAMESPACE generic
#include "row_kernels.h"
#include "jsd_row_kernels.h"
#include "sparse_row_kernels.h"
