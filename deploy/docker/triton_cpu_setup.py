"""Build step of triton-cpu.Dockerfile: set up the nvidia-pytriton wheel's tritonserver as `hpeft serve` sets it
up (hpeft_serve/serving/triton.py: the Python backend and this Python's stub as symlinks in a backend folder,
the wheel's libraries and this Python's libpython on LD_LIBRARY_PATH, this virtual environment first on PATH,
a library check, the CPU-only memory flags, no HPEFT_* variable in the server's or its stubs' environment),
and write it as /usr/local/bin/tritonserver. Compose, Kubernetes and the image's CMD then run `tritonserver
FLAGS` the same way in the NGC image and in this one."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from hpeft_serve.serving.triton import backend_dir, check_libraries, environment, locate

WORK = Path("/opt/hpeft/triton")
WRAPPER = Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/local/bin/tritonserver")
# the flags of TritonServer.command that set up the wheel's server (no GPU, no CUDA memory pools); the model
# repository, ports, model control and the restricted APIs come from the caller's command line
SETUP_FLAGS = ["--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0"]


def main() -> None:
    inst = locate()
    env = environment(inst)
    check_libraries(inst, env)  # a missing library makes tritonserver hang: fail the build instead
    backends = backend_dir(inst, WORK)
    flags = [f"--backend-directory={backends}", f"--cache-directory={inst.caches}", *SETUP_FLAGS]
    WRAPPER.write_text(
        "#!/bin/sh\n"
        "# the nvidia-pytriton wheel's tritonserver as `hpeft serve` runs it (deploy/docker/triton_cpu_setup.py)\n"
        "for v in $(env | sed -n 's/^\\(HPEFT_[A-Za-z0-9_]*\\)=.*/\\1/p'); do unset \"$v\"; done\n"
        f"export LD_LIBRARY_PATH={shlex.quote(env['LD_LIBRARY_PATH'].rstrip(os.pathsep))}\n"
        f"export PATH={shlex.quote(str(Path(sys.prefix) / 'bin'))}:\"$PATH\"\n"
        f"exec {shlex.quote(str(inst.binary))} {' '.join(flags)} \"$@\"\n")
    WRAPPER.chmod(0o755)
    print(f"{WRAPPER}: {inst.binary} with {' '.join(flags)}")


if __name__ == "__main__":
    main()
