"""Builds libgpo.so with cargo (from the repository this directory belongs to, or $GPO_SOURCE)
and ships it inside the `gpo` package: `pip install ./bindings/python`, then `import gpo` works
from any directory. $GPO_LIB skips the build and packages that library instead."""
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = Path(__file__).resolve().parent
ROOT = Path(os.environ.get("GPO_SOURCE", HERE.parent.parent))


class BuildWithCargo(build_py):
    def run(self):
        super().run()
        lib = os.environ.get("GPO_LIB")
        if not lib:
            cargo = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
            if not (ROOT / "Cargo.toml").exists():
                raise SystemExit(f"gpo: no Cargo.toml at {ROOT}; set GPO_SOURCE to the gpo repository or GPO_LIB to a built libgpo.so")
            print("gpo: cargo build --release --lib (the first build takes ~15 minutes on 2 cores)", flush=True)
            subprocess.check_call([cargo, "build", "--release", "--locked", "--lib", "--manifest-path", str(ROOT / "Cargo.toml")])
            target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
            lib = target / "release" / "libgpo.so"
        dest = Path(self.build_lib) / "gpo" / "libgpo.so"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, dest)
        # The release profile keeps line tables for backtraces; the shipped copy does not need them.
        if shutil.which("strip"):
            subprocess.call(["strip", "--strip-debug", str(dest)])


class BinaryDistribution(Distribution):
    """A wheel with a native library is platform-specific."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildWithCargo}, distclass=BinaryDistribution)
