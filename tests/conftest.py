"""Test-session setup: Triton kernels run in Triton's CPU interpreter (no GPU in CI).

Triton reads TRITON_INTERPRET when a kernel is first compiled, which may happen in any test module, so it is set
here, before any test imports triton.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
