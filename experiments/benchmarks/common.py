"""Shared helpers of the benchmark scripts: timing, matmul peak, machine description, RESULTS.md.

    from experiments.benchmarks import common      # or `import common` from this folder
    peak = common.matmul_peak_flops("bfloat16")     # FLOP/s of one large jitted matmul
    times = common.alternate({"ours": step_a, "hf": step_b}, steps=5, warmup=2)
    common.write_section(common.RESULTS, "train_step_vs_hf.py", body)

Timing rules every script follows (several programs share small CPU machines, so absolute
numbers drift between runs): medians rather than means, `block_until_ready` before the
clock stops, and A/B comparisons measured in one process with the steps interleaved
(`alternate`), so a slow period hits every variant alike. MFU is always divided by a peak
measured in the same run, in the same dtype.
"""
from __future__ import annotations

import datetime
import os
import pathlib
import platform
import re
import statistics
import sys
import time
from typing import Callable, Mapping, Optional

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

RESULTS = REPO / "experiments" / "benchmarks" / "RESULTS.md"
RESULTS_HEADER = ("# Benchmark results\n\nEach benchmark script keeps one section here, replaced "
                  "each time it runs (`common.write_section`); the command and date are in it.\n")


# ----- timing --------------------------------------------------------------------------------

def block(x):
    """Waits for every jax array in `x` (torch tensors and Python values pass through)."""
    return jax.block_until_ready(x)


def time_once(fn: Callable, *args) -> float:
    """Seconds of one call of `fn(*args)`, its jax outputs waited for."""
    start = time.perf_counter()
    block(fn(*args))
    return time.perf_counter() - start


def median_time(fn: Callable, *args, repeats: int = 5, warmup: int = 1) -> float:
    """Median seconds of `fn(*args)` over `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        block(fn(*args))
    return statistics.median(time_once(fn, *args) for _ in range(max(1, repeats)))


def best_time(fn: Callable, *args, repeats: int = 10, warmup: int = 2) -> float:
    """Fastest of `repeats` calls: what the machine can do when nothing else interferes."""
    for _ in range(warmup):
        block(fn(*args))
    return min(time_once(fn, *args) for _ in range(max(1, repeats)))


def alternate(fns: Mapping[str, Callable[[], object]], steps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Interleaved timing: warm every variant up, then run step i of every variant in turn.

    Round i starts at the i-th variant (A B C, B C A, C A B, ..): a step can run slower after
    some steps than after others (measured before MALLOC_TUNABLES: our bf16 step ~1.8x slower
    right after HF's bf16-autocast step), so no variant always follows the same one. Each
    `fns[name]()` runs one step and returns something to block on. Returns the list of
    per-step seconds of every variant; take `statistics.median` of each.
    """
    for fn in fns.values():
        for _ in range(warmup):
            block(fn())
    names = list(fns)
    times = {name: [] for name in names}
    for i in range(max(1, steps)):
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(time_once(fns[name]))
    return times


def median(xs) -> float:
    return statistics.median(xs)


def enable_compile_cache(path=None) -> str:
    """Persistent XLA compilation cache (the repository's .jax_cache unless JAX_COMPILATION_CACHE_DIR
    is set): a program compiled twice in one run (AOT for cost analysis, then jit) or across
    runs compiles once."""
    path = str(path or os.environ.get("JAX_COMPILATION_CACHE_DIR") or REPO / ".jax_cache")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


# glibc's malloc hands a buffer above 32 MB out as a fresh mmap and unmaps it on free. XLA:CPU
# allocates a step's temporaries as one buffer (the bench model's: 1.05 GB), so every step
# page-faults it in anew: ~10% of the step with 4 KB pages. Transparent huge pages (hugetlb=1)
# cut the faults ~17x, but each 2 MB fault then needs a free huge page, and once another
# process has fragmented memory (measured: one torch bf16-autocast step) the kernel compacts
# memory inside the fault: the bench's bf16 step went from 1.4 s to 2.6 s, almost all of it
# system time. So malloc also keeps what it frees: one arena (a worker thread's arena would
# mmap the big buffer regardless), no mmap, no trimming. The step then reuses the same pages
# and takes no page fault at all after the first. The tunables are read when a process
# starts, so the script re-executes itself once; HF's worker process inherits them.
MALLOC_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                   "glibc.malloc.trim_threshold=1099511627776")


def reexec_with_malloc_tunables() -> None:
    """Restart this script (same arguments) with MALLOC_TUNABLES in GLIBC_TUNABLES, unless it
    is there already or this is not Linux; `malloc_tuned()` tells the restarted process."""
    if malloc_tuned() or sys.platform != "linux":
        return
    tunables = os.environ.get("GLIBC_TUNABLES")
    os.environ["GLIBC_TUNABLES"] = f"{tunables}:{MALLOC_TUNABLES}" if tunables else MALLOC_TUNABLES
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *sys.argv])


def malloc_tuned() -> bool:
    return MALLOC_TUNABLES in os.environ.get("GLIBC_TUNABLES", "")


# ----- matmul peak ---------------------------------------------------------------------------

def matmul_peak_flops(dtype="float32", n: Optional[int] = None, repeats: int = 10,
                      device: Optional[jax.Device] = None) -> float:
    """Achieved FLOP/s of one large jitted [n, n] @ [n, n] matmul on one device.

    The fastest of `repeats` calls, not the median: a peak is a ceiling, and on a shared
    machine a median peak comes out low and inflates every MFU divided by it.

    bfloat16 uses bf16 inputs with float32 accumulation (`preferred_element_type`), the way
    the model's dense layers run in bf16. n defaults to 2048 on CPU (large enough to reach
    the cores' plateau: AMX for bf16) and 8192 on accelerators.
    """
    device = device or jax.devices()[0]
    dtype = jnp.dtype(dtype)
    if n is None:
        n = 2048 if device.platform == "cpu" else 8192
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.device_put(jax.random.normal(ka, (n, n), jnp.float32).astype(dtype), device)
    b = jax.device_put(jax.random.normal(kb, (n, n), jnp.float32).astype(dtype), device)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    return 2.0 * n ** 3 / best_time(f, a, b, repeats=repeats)


def torch_matmul_peak_flops(dtype="float32", n: int = 2048, repeats: int = 10) -> float:
    """The same measurement through torch on CPU (the peak HF's MFU is divided by)."""
    import torch

    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[str(jnp.dtype(dtype))]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(tdtype)
    b = torch.randn(n, n, generator=g).to(tdtype)
    return 2.0 * n ** 3 / best_time(lambda: torch.matmul(a, b), repeats=repeats)


# ----- machine -------------------------------------------------------------------------------

# The CPU features that decide bf16 GEMM speed (same model name, 4x apart in bf16 throughput).
BF16_FEATURES = ("avx512_bf16", "amx_bf16")


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The model name, plus which of BF16_FEATURES the CPU has."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        return model
    have = [f for f in BF16_FEATURES if f in flags]
    return f"{model} ({', '.join(have) if have else 'no native bf16'})"


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: the description just leaves it out
        return None


def machine_info() -> dict:
    """CPU count and model, accelerator, Python and library versions."""
    dev = jax.devices()[0]
    info = dict(cpus=os.cpu_count(), cpu_model=cpu_model(), backend=jax.default_backend(),
                device=f"{dev.platform} {dev.device_kind}", devices=jax.device_count(),
                python=platform.python_version())
    for m in ("jax", "flax", "optax", "torch", "transformers"):
        info[m] = _version(m)
    return info


def machine_line(info: Optional[dict] = None) -> str:
    """One markdown line describing the machine, for a RESULTS.md section."""
    i = info or machine_info()
    libs = ", ".join(f"{m} {i[m]}" for m in ("jax", "flax", "optax", "torch", "transformers") if i.get(m))
    pages = (f" GLIBC_TUNABLES={MALLOC_TUNABLES} (huge pages; freed memory kept, no per-step page faults)."
             if malloc_tuned() else "")
    return (f"Machine: {i['cpus']} CPUs ({i['cpu_model']}), {i['device']} x{i['devices']}; "
            f"Python {i['python']}; {libs}.{pages}")


def utc_stamp() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command_line(script: str, argv=None) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", f"experiments/benchmarks/{script}", *args])


# ----- RESULTS.md ----------------------------------------------------------------------------

def _split_sections(text: str) -> tuple[str, list[str]]:
    """(text before the first `## ` heading, [each `## ` section with its trailing text])."""
    starts = [m.start() for m in re.finditer(r"^## ", text, flags=re.M)]
    if not starts:
        return text, []
    bounds = starts + [len(text)]
    return text[:starts[0]], [text[a:b] for a, b in zip(bounds, bounds[1:])]


def section_key(section: str) -> str:
    """The owner of a section: its heading up to the first comma (`## gpu_routing.py, date`)."""
    heading = section.splitlines()[0][3:]
    return heading.split(",", 1)[0].strip()


def write_section(path, key: str, body: str, title_suffix: Optional[str] = None) -> str:
    """Writes `## {key}, {date}` + body into the markdown file at `path`.

    The section REPLACES every earlier section whose heading starts with `## {key},` (or is
    exactly `## {key}`), at the place of the first of them; sections of other keys stay
    untouched and in order. A new key is appended at the end. The file gets a header when
    it does not exist. Returns the new section's text.
    """
    path = pathlib.Path(path)
    text = path.read_text() if path.exists() else RESULTS_HEADER
    head, sections = _split_sections(text)
    title = f"## {key}, {title_suffix or utc_stamp()}"
    new = f"{title}\n\n{body.strip()}\n\n"
    out, placed = [], False
    for s in sections:
        if section_key(s) == key:
            if not placed:
                out.append(new)
                placed = True
            continue
        out.append(s if s.endswith("\n\n") else s.rstrip("\n") + "\n\n")
    if not placed:
        out.append(new)
    if not head.endswith("\n\n"):
        head = head.rstrip("\n") + "\n\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((head + "".join(out)).rstrip("\n") + "\n")
    return new


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
