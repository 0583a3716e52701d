"""Builds bayes_ext and, when a C++ compiler is present, its kernels (bayes_ext._C).

- CPU kernels are always built when torch and a compiler are available.
- CUDA kernels are added when CUDA is available or FORCE_CUDA=1 (CUDA_HOME must point at a toolkit).
- BAYES_EXT_NO_EXTENSION=1 skips the compiled kernels (the package then runs on pure PyTorch).
- BAYES_EXT_SANITIZE=1 builds with -fsanitize=address,undefined (see tools/sanitize.sh).
Install with `pip install --no-build-isolation .` so the extension is built against the torch you run.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def write_build_info(torch_version, cuda_version, with_cuda):
    """Records which torch (and CUDA) the kernels were built for; checked at import time."""
    path = os.path.join(ROOT, "bayes_ext", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py: the torch build the compiled kernels were made for.\n")
        f.write(f"TORCH_VERSION = {torch_version!r}\n")
        f.write(f"CUDA_VERSION = {cuda_version!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")


def extension_modules():
    if env_flag("BAYES_EXT_NO_EXTENSION"):
        print("bayes_ext: BAYES_EXT_NO_EXTENSION set, building the pure-Python package", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("bayes_ext: torch is not importable at build time (use --no-build-isolation); "
              "building the pure-Python package", file=sys.stderr)
        return [], {}
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        print(f"bayes_ext: no C++ compiler ({compiler}) found, building the pure-Python package", file=sys.stderr)
        return [], {}

    with_cuda = (env_flag("FORCE_CUDA") or torch.cuda.is_available()) and CUDA_HOME is not None
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fvisibility=hidden"]
    nvcc_flags = ["-O3", "-lineinfo"]
    link_flags = []
    # at::parallel_for is a header template: without -fopenmp in *our* compile it runs serially.
    # Linking libgomp.so.1 resolves to the copy torch has already loaded (same soname), so there
    # is one OpenMP runtime and one thread pool in the process.
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if env_flag("BAYES_EXT_SANITIZE"):
        cxx_flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fno-math-errno", "-fopenmp",
                     "-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=undefined"]
        link_flags = ["-fopenmp", "-fsanitize=address,undefined,float-cast-overflow"]
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc", "cpu")]
    kwargs = dict(include_dirs=include_dirs, extra_link_args=link_flags)
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension("bayes_ext._C", sources, extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                            **kwargs)
    else:
        ext = CppExtension("bayes_ext._C", sources, extra_compile_args={"cxx": cxx_flags}, **kwargs)
    write_build_info(torch.__version__, torch.version.cuda if with_cuda else None, with_cuda)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extension_modules()

setup(
    name="bayes_ext",
    packages=find_packages(include=["bayes_ext", "bayes_ext.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
