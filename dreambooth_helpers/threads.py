"""One CPU thread for the built-in models, wherever they run: the CLI, the notebook's cells, the app's training jobs.

The built-in models (toy, tiny, tiny-sdxl) are so small that no operation is worth splitting: a second thread
mostly waits at each operation's barrier for the first. On an idle machine that costs a little; on a busy one
the waiting thread also waits for the other programs' turn on a core, and training crawls. Measured on a 2-core
machine with one other CPU-bound process: the README's first command ran at 3.4-4.2 s/step on torch's default
two threads and ~0.2 s/step on one (benchmarks/busy_machine.py measures it again).

torch.set_num_threads covers only the thread that calls it: the oneDNN convolutions and MKL matrix products of
any other thread (Gradio runs the demo's and the app's generation in worker threads) still use one thread per
core. So new threads are made to take torch's setting too (_follow_torch_in_new_threads).

A user's OMP_NUM_THREADS always wins: set it to choose the thread count yourself. Real models (SD 1.5, SDXL)
are left to torch's defaults, and nothing changes when a GPU does the work.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from pathlib import Path

from .config import TINY_MODEL, TOY_MODEL
from .files import SUMMARY_FILE

TINY_SDXL_MODEL = "tiny-sdxl"  # the coming SDXL stand-in; families/ will own this name, then import it from there
CPU_BUILT_IN_MODELS = (TOY_MODEL, TINY_MODEL, TINY_SDXL_MODEL)
USER_THREADS_VARIABLE = "OMP_NUM_THREADS"


def built_in_model(model: str | os.PathLike | None) -> str | None:
    """The built-in model `model` is, or that a trained output folder was trained from; None for any other.

    A folder counts by the base model its training_summary.json records, so `generate --model outputs/sample`
    after training the toy model gets one thread too.
    """
    if model is None:
        return None
    if str(model) in CPU_BUILT_IN_MODELS:
        return str(model)
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        base = json.loads((Path(model) / SUMMARY_FILE).read_text()).get("base_model")
        if base in CPU_BUILT_IN_MODELS:
            return base
    return None


def wants_one_thread(model: str | os.PathLike | None, *, environ: dict[str, str] | None = None,
                     cuda_available: bool | None = None) -> bool:
    """Whether `model` should run on one CPU thread: a built-in model, no GPU, and no OMP_NUM_THREADS of the user's."""
    environ = os.environ if environ is None else environ
    if USER_THREADS_VARIABLE in environ or built_in_model(model) is None:
        return False
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    return not cuda_available


def use_one_thread_for(model: str | os.PathLike | None) -> bool:
    """Run this process on one CPU thread when `model` is a built-in model on a CPU (see wants_one_thread).

    Call it before the model does any work. Returns whether the setting was made.
    """
    if not wants_one_thread(model):
        return False
    import torch

    torch.set_num_threads(1)  # torch's own loops, MKL and oneDNN in this thread
    with contextlib.suppress(RuntimeError):  # allowed once per process, before any inter-op work has started
        torch.set_num_interop_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the fast tokenizers' own thread pool
    _one_blas_thread()
    _follow_torch_in_new_threads()
    return True


def _one_blas_thread() -> None:
    """numpy's OpenBLAS keeps a pool of its own, one thread per core; threadpoolctl (when installed) can size it."""
    with contextlib.suppress(ImportError):
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")


def _follow_torch_in_new_threads() -> None:
    """Make each thread started from now on take torch's process-wide thread count as its own.

    torch keeps the count of MKL and OpenMP threads per thread: a thread that did not call set_num_threads
    itself runs matrix products and convolutions on every core. The hook runs once at the start of each new
    thread and removes itself there, so it costs nothing afterwards. A profile hook someone else installed
    (a profiler) is left alone.
    """
    if threading.getprofile() not in (None, _take_torch_threads):
        return
    threading.setprofile(_take_torch_threads)


def _take_torch_threads(frame, event, arg) -> None:
    sys.setprofile(None)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(torch.get_num_threads())
