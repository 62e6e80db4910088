"""The one part of edgecam that pyproject.toml cannot declare in a stable form: the compiled
core (drawing, tracker matching), plain C loaded with ctypes by edgecam.native, built when the
package is installed."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "edgecam.native._core",
            sources=["src/edgecam/native/draw.c", "src/edgecam/native/match.c"],
            # No fused multiply-adds: the matching must round as numpy does.
            extra_compile_args=["-O2", "-std=c11", "-ffp-contract=off"],
        )
    ]
)
