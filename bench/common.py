"""Shared plumbing of the benchmark parts: machine description, peak memory, inputs."""
from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import re
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20


# --------------------------------------------------------------------------- machine


def machine() -> dict:
    """What the numbers were measured on (and how busy it was when the part started)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), flags=re.M)
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        import psutil

        ram_gib = round(psutil.virtual_memory().total / (1 << 30), 1)
    except ImportError:  # pragma: no cover
        ram_gib = None
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": affinity, "ram_gib": ram_gib,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "os": f"{platform.system()} {platform.release()}",
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), flags=re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


def exact_rss_mode() -> bool:
    """Make RSS track tensor memory (glibc only): every allocation of 64 KiB or more gets its own
    mmap, returned to the system when freed. By default glibc raises that threshold after large
    frees and then serves big blocks from freed heap pages, which hides them from the RSS.
    One-way for the process (it slows allocation a little), so call it after any timing."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        m_mmap_threshold = -3
        ok = bool(libc.mallopt(m_mmap_threshold, 64 * 1024))
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def _trim() -> None:
    try:
        import ctypes
        import ctypes.util

        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


class PeakRSS:
    """Peak resident memory of this process while the block runs, above what it held before.

    On Linux the kernel's own high-water mark is reset on entry (``/proc/self/clear_refs``)
    and read on exit, so no short spike is missed; elsewhere a thread samples the RSS every
    millisecond. ``delta_mib``: peak minus the RSS on entry (memory the block needed)."""

    def __init__(self):
        self.before = self.peak = 0
        self._exact = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        gc.collect()
        _trim()
        self.before = rss_bytes()
        self._exact = _reset_peak()
        if not self._exact:
            self.peak = self.before

            def poll():
                while not self._stop.is_set():
                    self.peak = max(self.peak, rss_bytes())
                    time.sleep(0.001)

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._exact:
            self.peak = max(self.before, (_status_kib("VmHWM") or 0) * 1024)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, rss_bytes())
        return False

    @property
    def delta_mib(self) -> float:
        return max(0, self.peak - self.before) / MIB

    @property
    def method(self) -> str:
        return "VmHWM reset" if self._exact else "1 ms RSS polling"


def timed(fn):
    """``(result, seconds)`` of ``fn()``."""
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# --------------------------------------------------------------------------- inputs


def params(root: Path = REPO) -> dict:
    """The validated params.yaml sections of ``root`` (the default profile)."""
    from lib.core import config

    raw = config.read_params(root / "params.yaml")
    return {s: config.validate_section(s, raw[s]) for s in ("skills", "synthesize", "model", "experts", "evaluation")}


def base_model_dir(root: Path, scratch: Path) -> tuple[Path, str]:
    """``models/base`` of the default profile when it exists; else a freshly initialised
    scratch Llama of the default size saved under ``scratch`` (speed does not depend on
    the weights). Returns (directory, what it is)."""
    base = root / "models" / "base"
    if (base / "config.json").exists():
        source = params(root)["model"].base
        return base, ("models/base (the default profile's pretrained base)" if source == "scratch" else
                      f"models/base of {root} (model.base {source})")
    from lib.core.tokenization import build_char_tokenizer
    from lib.core.training import build_scratch_model

    m = params(root)["model"]
    tok = build_char_tokenizer()
    model = build_scratch_model(tok, m)
    out = scratch / "base"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out, "an untrained scratch Llama of the default size (models/base missing)"


def skill_train_set(root: Path, skill: str):
    """The default profile's training split of ``skill`` (from datasets/, else synthesized now)."""
    from lib.core import data
    from lib.synth import datasets as synth

    path = root / "datasets" / "skills" / skill
    if path.exists():
        return data.load(path, ("train",))["train"], str(path.relative_to(root))
    p = params(root)
    return synth.skill_splits(skill, p["skills"], p["synthesize"])["train"], f"{skill} (synthesized in memory)"
