"""The Triton kernels compile for an H100 (sm_90) without a GPU, within its shared-memory limit.

The interpreter runs the kernels' semantics but accepts shapes the compiler rejects (tl.dot dimensions under
16) and knows nothing of resources, so this compiles the smallest and the largest block configuration through
Triton's own toolchain in a subprocess without TRITON_INTERPRET (see lstmd.kernels.compile_check). It is not a
run on a GPU: launch-time behaviour is still only checked by the `cuda` tests.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _has_nvidia_backend() -> bool:
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_nvidia_backend(), reason="this triton build has no NVIDIA backend")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["--hidden", "48", "512", "--layers", "2", "--weights", "fp32", "--precision", "tf32", "ieee"]
    cmd = [sys.executable, "-m", "lstmd.kernels.compile_check", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("\nok ") == 12, proc.stdout  # 3 kernels x 2 block configurations x 2 precisions
