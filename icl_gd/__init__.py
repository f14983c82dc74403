"""icl-gd: do trained transformers learn in context by gradient descent?

On CPU, XLA's multi-threaded Eigen pool can wedge (the process sleeps forever) on the vmapped
solves of `icl_gd.explain` (seen with jax 0.10.2 on 2 cores, also reported upstream); single-
threaded Eigen avoids it. Set here, before jax starts; a setting already in XLA_FLAGS wins.
"""

import os

if "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()
