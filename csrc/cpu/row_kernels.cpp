// Picks the copy of the row kernels this CPU runs (row_kernels.h).
#include "row_kernels.h"

#include <ATen/Version.h>

#include <string>

namespace sled {

const RowKernels& row_kernels() {
  // torch's own choice: the best level the CPU supports, or ATEN_CPU_CAPABILITY if lower.
  static const RowKernels& chosen = []() -> const RowKernels& {
#if defined(SLED_X86_LEVELS)
    const std::string level = at::get_cpu_capability();
    if (level == "AVX512") return AVX512::row_kernels();
    if (level == "AVX2") return AVX2::row_kernels();
#endif
    return DEFAULT::row_kernels();
  }();
  return chosen;
}

}  // namespace sled
