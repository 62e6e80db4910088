"""The one part of edgecam that pyproject.toml cannot declare in a stable form: the compiled
core (drawing, the tracker's step and its matching), plain C loaded with ctypes by
edgecam.native, built when the package is installed."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "edgecam.native._core",
            sources=[f"src/edgecam/native/{name}.c" for name in ("draw", "match", "track")],
            # No fused multiply-adds: the matching must round as numpy does.
            extra_compile_args=["-O2", "-std=c11", "-ffp-contract=off"],
        )
    ]
)
