"""Build the Cython KVM layer (ext/) as microvm._kvm."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "microvm._kvm",
        sources=["ext/_kvm.pyx"],
        extra_compile_args=["-O2", "-Wno-unused-function"],
    ),
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=["ext"],
        compiler_directives={"language_level": "3", "embedsignature": True},
    ),
)
