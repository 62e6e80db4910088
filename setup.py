"""The one part of edgecam that pyproject.toml cannot declare in a stable form: the drawing
core, plain C loaded with ctypes by edgecam.native, built when the package is installed."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "edgecam.native._draw",
            sources=["src/edgecam/native/draw.c"],
            extra_compile_args=["-O2", "-std=c11"],
        )
    ]
)
