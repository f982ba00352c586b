"""CUDA MPS for nodes that share one GPU (`epd serve --mps auto|on|off`).

Without MPS, the CUDA contexts of several processes on one GPU take turns (time slices): under
load an encoder's vision forward waits for the prefill and decode nodes' slices (measured on one
H100: vision time 60 ms at 2 req/s grew to 1,080 ms at 8 req/s; 23-93 ms with MPS, see
BENCHMARKS.md). With MPS their kernels run side by side.

`MPSDaemon.start()`: a daemon this user already runs (its pipe directory answers) is used as is;
otherwise `nvidia-cuda-mps-control -d` is started with a pipe and a log directory of its own, and
the processes `epd serve` starts get `CUDA_MPS_PIPE_DIRECTORY` (`env()`), so they become its
clients. `stop()` quits the daemon it started (never one it found running).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

CONTROL = "nvidia-cuda-mps-control"
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"


class MPSDaemon:
    def __init__(self) -> None:
        self.pipe_dir = ""
        self.started = False      # by us (then stop() quits it)

    @staticmethod
    def available() -> bool:
        return shutil.which(CONTROL) is not None

    def start(self) -> str:
        """Start (or find) the daemon; what happened, for the console. Raises RuntimeError."""
        running = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", DEFAULT_PIPE_DIR)
        if os.path.exists(os.path.join(running, "control")) and self._answers(running):
            self.pipe_dir = running
            return f"CUDA MPS: using the daemon already running (pipes in {running})"
        if not self.available():
            raise RuntimeError(f"{CONTROL} is not on PATH (it comes with the NVIDIA driver)")
        base = tempfile.mkdtemp(prefix="epd-mps-")
        self.pipe_dir = os.path.join(base, "pipe")
        os.makedirs(self.pipe_dir)
        os.makedirs(os.path.join(base, "log"))
        result = subprocess.run([CONTROL, "-d"], env=self._daemon_env(base), capture_output=True, text=True,
                                timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"{CONTROL} -d failed: {(result.stderr or result.stdout).strip()}")
        self.started = True
        return f"CUDA MPS: started a daemon for the nodes sharing the GPU (pipes in {self.pipe_dir})"

    def env(self) -> dict[str, str]:
        """What a process needs in its environment to be this daemon's client."""
        return {"CUDA_MPS_PIPE_DIRECTORY": self.pipe_dir} if self.pipe_dir else {}

    def stop(self) -> None:
        if not self.started:
            return
        base = os.path.dirname(self.pipe_dir)
        try:
            subprocess.run([CONTROL], input="quit\n", env=self._daemon_env(base), capture_output=True, text=True,
                           timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.started = False

    def _daemon_env(self, base: str) -> dict[str, str]:
        return dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=os.path.join(base, "pipe"),
                    CUDA_MPS_LOG_DIRECTORY=os.path.join(base, "log"))

    @staticmethod
    def _answers(pipe_dir: str) -> bool:
        try:
            result = subprocess.run([CONTROL], input="get_server_list\n", capture_output=True, text=True, timeout=5,
                                    env=dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=pipe_dir))
        except (OSError, subprocess.TimeoutExpired):
            return False
        return result.returncode == 0
