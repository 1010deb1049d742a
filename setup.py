"""Build the Cython KVM layer (ext/) as microvm._kvm."""

from typing import Any

from Cython.Build import cythonize
from setuptools import Distribution, Extension, setup

# The guest kernel config (kernels/) ships inside the package, so an
# installed microvm can still build its kernel.
KERNELS_PACKAGE = "microvm._kernels"


class MicrovmDistribution(Distribution):
    """pyproject.toml's package list (found: every package under microvm/)
    plus microvm._kernels. That one lives in kernels/, outside microvm/, where
    no find can see it, and a list given to setup() is replaced by pyproject's."""

    def parse_config_files(self, *args: Any, **kwargs: Any) -> None:
        super().parse_config_files(*args, **kwargs)
        if KERNELS_PACKAGE not in (self.packages or []):
            self.packages = [*(self.packages or []), KERNELS_PACKAGE]


extensions = [
    Extension(
        "microvm._kvm",
        sources=["ext/_kvm.pyx"],
        extra_compile_args=["-O2", "-Wno-unused-function"],
    ),
    Extension(
        "microvm._virtq",
        sources=["ext/_virtq.pyx"],
        extra_compile_args=["-O2", "-Wno-unused-function"],
    ),
    # MicroVM(seccomp=...): libseccomp (Debian's libseccomp-dev, scripts/setup installs it).
    Extension(
        "microvm._seccomp",
        sources=["ext/_seccomp.pyx"],
        libraries=["seccomp"],
        extra_compile_args=["-O2", "-Wno-unused-function"],
    ),
]

setup(
    distclass=MicrovmDistribution,
    package_dir={KERNELS_PACKAGE: "kernels"},
    # exits_raw.c: `microvm bench exits` compiles it when it runs.
    package_data={KERNELS_PACKAGE: ["*.config"], "microvm.benchmarks": ["*.c"]},
    ext_modules=cythonize(
        extensions,
        include_path=["ext"],
        compiler_directives={"language_level": "3", "embedsignature": True},
    ),
)
