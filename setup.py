"""Build the one compiled part: kernels/_cpu_kernel.c, the CPU serving step's fused gather and cell.

Everything else about the package is in pyproject.toml. The extension is optional: where no C compiler is
available the install still succeeds, and the CPU step runs on torch ops alone (kernels/cpu_step.py says which).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lstmd.kernels._cpu_kernel",
            sources=["kernels/_cpu_kernel.c"],
            # No -ffast-math: NaN/Inf semantics stay IEEE and no process-wide FP flags change (see the source).
            extra_compile_args=["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast"],
            optional=True,
        )
    ]
)
