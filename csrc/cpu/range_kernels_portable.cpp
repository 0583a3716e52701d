// Range kernels for any x86-64 / other CPU: the baseline every machine can run.
#include "range_kernels.h"

BAYES_EXT_DEFINE_RANGE_KERNELS(portable, float)
BAYES_EXT_DEFINE_RANGE_KERNELS(portable, double)
