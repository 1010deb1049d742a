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
    # The guest kernel config (kernels/) ships inside the package, so an
    # installed microvm can still build its kernel.
    package_dir={"microvm._kernels": "kernels"},
    package_data={"microvm._kernels": ["*.config"]},
    ext_modules=cythonize(
        extensions,
        include_path=["ext"],
        compiler_directives={"language_level": "3", "embedsignature": True},
    ),
)
