"""Packaging glue that pyproject.toml cannot express.

* The C++/CUDA sources (csrc/) travel inside the package as streamssl/_csrc, so the JIT build on
  first use also works from a wheel or a non-editable install.
* ``STREAMSSL_BUILD_EXT=1 pip install --no-build-isolation .`` compiles the extension ahead of time
  (for wheels); the CUDA sources are included when nvcc is found, exactly as in the JIT build.
"""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        dst = Path(self.build_lib) / "streamssl" / "_csrc"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(ROOT / "csrc", dst)


def _ahead_of_time_extension():
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # Reuse the JIT build's logic (source lists, nvcc flags, object cache) without importing the
    # package itself.
    spec = importlib.util.spec_from_file_location("_streamssl_build", ROOT / "streamssl" / "ops" / "_build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    root = ROOT / "csrc"
    cflags, ldflags, objects = build._cxx_flags(), ["-fopenmp"], []
    nvcc = build.find_nvcc()
    if nvcc:
        objects = [str(o) for o in build.compile_cuda_objects(root, ROOT / "build" / "cuda_objects", nvcc)]
        cflags.append("-DSTREAMSSL_WITH_CUDA")
        ldflags += [f"-L{build.cuda_home(nvcc) / 'lib64'}", "-lcudart_static", "-ldl", "-lrt", "-lpthread"]
    ext = CppExtension(
        "streamssl._C",
        sources=[str(p.relative_to(ROOT)) for p in build.cpp_sources(root)],
        include_dirs=[str(root)],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        extra_objects=objects,
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


cmdclass = {"build_py": BuildPyWithSources}
ext_modules = []
if os.environ.get("STREAMSSL_BUILD_EXT", "0") not in ("", "0"):
    ext_modules, extra = _ahead_of_time_extension()
    cmdclass.update(extra)

setup(cmdclass=cmdclass, ext_modules=ext_modules)
