"""The old name of :mod:`kdqat_dist.engine.diagnostics` (the training loop's TensorBoard diagnostics).

The module moved below the analysis tools because the loop calls it. Importing this name gives the very
same module object, so code that sets its attributes (bench/bench_diagnostics.py times its functions
that way) still reaches the functions the loop calls.
"""

import sys

from kdqat_dist.engine import diagnostics

sys.modules[__name__] = diagnostics
