"""Build the Cython extensions and the native ``hypercoil`` launcher.

Both are optional: when Cython or a C compiler is missing the package still
installs and the pure-Python fallbacks are used (``hypercoil version`` says
which backend is active). ``COIL_REQUIRE_FAST=1`` turns a failed build into
an error, which is what ``make`` uses so that CI never silently tests only
the fallback.
"""

import os
import shutil
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

REQUIRE_FAST = os.environ.get("COIL_REQUIRE_FAST", "") not in ("", "0")

EXTENSIONS = [
    ("coil._fast.bitmap", "coil/_fast/bitmap.pyx"),
    ("coil.net._netlink", "coil/net/_netlink.pyx"),
]
LAUNCHER_SRC = "coil/_fast/launcher.c"
HERE = os.path.dirname(os.path.abspath(__file__))


def write_protocol_header(directory: str) -> str:
    """Write protocol.h, the relay protocol's constants for the launcher,
    from coil/cni/protocol.py (their one owner) into ``directory``."""
    sys.path.insert(0, HERE)
    try:
        from coil.cni import protocol
    finally:
        sys.path.remove(HERE)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "protocol.h")
    with open(path, "w") as f:
        f.write(protocol.c_header())
    return path


# The launcher is linked statically against musl when musl-gcc is there
# (Debian's musl-tools; COIL_LAUNCHER_CC overrides): the runtime execs it for
# every CNI call, and a static musl binary starts in ~0.1 ms of CPU where
# glibc's start-up costs ~0.7 ms (dynamic loading, and its CPU feature and
# cache detection through cpuid, which traps to the hypervisor on a VM).
# Without musl-gcc the default C compiler links it against glibc.
LAUNCHER_CC = os.environ.get("COIL_LAUNCHER_CC") or shutil.which("musl-gcc")


def _extensions():
    try:
        from Cython.Build import cythonize
    except ImportError:
        if REQUIRE_FAST:
            raise
        return []
    exts = [Extension(name, [src], extra_compile_args=["-O2"])
            for name, src in EXTENSIONS if os.path.exists(src)]
    return cythonize(exts, language_level=3, quiet=True,
                     compiler_directives={"boundscheck": False, "wraparound": False})


class BuildExt(build_ext):
    """build_ext that tolerates failures (fallbacks exist) and also links
    the native launcher executable."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # compiler missing or broken
            if REQUIRE_FAST:
                raise
            print(f"warning: Cython extensions not built ({exc}); "
                  "the pure-Python fallback will be used", file=sys.stderr)
        self._build_launcher()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            if REQUIRE_FAST:
                raise
            print(f"warning: {ext.name} not built ({exc})", file=sys.stderr)

    def _build_launcher(self):
        if not os.path.exists(LAUNCHER_SRC):
            return
        out_dir = "coil/_fast" if self.inplace else os.path.join(self.build_lib, "coil", "_fast")
        os.makedirs(out_dir, exist_ok=True)
        target = os.path.join(out_dir, "hypercoil")
        python = os.environ.get("COIL_LAUNCHER_PYTHON", sys.executable)
        include = os.path.join(self.build_temp, "launcher-include")
        write_protocol_header(include)
        if LAUNCHER_CC and self._build_launcher_static(target, python, include):
            return
        try:
            compiler = self.compiler
            if compiler is None or isinstance(compiler, str):
                from setuptools._distutils.ccompiler import new_compiler
                from setuptools._distutils.sysconfig import customize_compiler
                compiler = new_compiler()
                customize_compiler(compiler)
            compiler.compile([LAUNCHER_SRC], output_dir=self.build_temp,
                             macros=[("COIL_PYTHON", '"%s"' % python)],
                             include_dirs=[include], extra_postargs=["-O2", "-Wall"])
            obj = compiler.object_filenames([LAUNCHER_SRC], output_dir=self.build_temp)
            compiler.link_executable(obj, "hypercoil", output_dir=self.build_temp)
            shutil.copy2(os.path.join(self.build_temp, "hypercoil"), target)
            os.chmod(target, 0o755)
        except Exception as exc:
            if REQUIRE_FAST:
                raise
            print(f"warning: native launcher not built ({exc})", file=sys.stderr)

    def _build_launcher_static(self, target: str, python: str, include: str) -> bool:
        """Link the launcher statically with LAUNCHER_CC; False (and a
        warning) when that fails, so that the default compiler is tried."""
        import subprocess
        os.makedirs(self.build_temp, exist_ok=True)
        out = os.path.join(self.build_temp, "hypercoil-static")
        cmd = [LAUNCHER_CC, "-O2", "-Wall", "-static", '-DCOIL_PYTHON="%s"' % python,
               "-I", include, "-o", out, LAUNCHER_SRC]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"warning: {' '.join(cmd)} failed, linking the launcher with the default "
                  f"compiler:\n{proc.stderr}", file=sys.stderr)
            return False
        shutil.copy2(out, target)
        os.chmod(target, 0o755)
        return True


if __name__ == "__main__":      # setuptools runs it so; tests import write_protocol_header
    setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
