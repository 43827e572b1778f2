"""The separate virtualenv that ``saeray bench saelens`` runs SAELens in.

sae-lens is never a dependency of saeray: it pulls transformer-lens, datasets, wandb and a
transformers major that saeray's own environment does not pin. So the benchmark installs it into
its own virtualenv (default ``.bench/saelens-venv`` in the repository, git-ignored; or
``$SAERAY_BENCH_VENV``), created on first use and reused after (a stamp file records what was
installed). torch there is pinned to exactly the version of the calling environment (pip
``-c`` constraints and an ``==`` requirement), so pip never swaps in another build: on a CPU
machine the local CPU wheel satisfies it, and pip never reaches for a multi-GB CUDA wheel. saeray
itself is not installed there: the benchmark body (:mod:`saeray.bench.saelens_side`) runs with
``PYTHONPATH`` pointing at this checkout, so it always uses the working tree's saeray.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

from ..errors import InputError, SaerayError

SAELENS_REQ = "sae-lens>=6.54,<7"     # the synthetic-data API (SynthSAEBench) the benchmark uses is 6.x
# what saeray.sae.train/io import besides torch (sae-lens pulls them too; listed so a change there
# cannot break the bench side silently)
SAERAY_SIDE_REQS = ("numpy", "safetensors", "fsspec")
VENV_ENV = "SAERAY_BENCH_VENV"
STAMP = ".saeray-bench-installed"
CONSTRAINTS = "saeray-constraints.txt"
SIDE_MODULE = "saeray.bench.saelens_side"
FAMILY_MODULE = "saeray.bench.saelens_family"   # saeray bench saelens-family
ARCHS = ("topk", "batchtopk", "gba", "relu", "gated", "jumprelu")   # saeray architectures the bench trains
# saeray's sparsity coefficients for the L1/L0 architectures (jumprelu: L0 coefficient): the values of
# saeray's own recovery benchmark (saeray/bench/recovery.py; inputs are scaled to E||x||^2 = 1 there
# as here, so the scale carries over). Not tuned on SAELens's data.
DEFAULT_L1 = {"relu": 1.0, "gated": 1.0, "jumprelu": 0.03}

_TORCH_PIN = re.compile(r"torch==\d+(\.\d+)*([a-z]+\d+)?(\.post\d+)?(\.dev\d+)?(\+[A-Za-z0-9.]+)?")


def parse_l1(spec: str | None) -> dict[str, float]:
    """``"relu=0.3,jumprelu=0.01"`` -> DEFAULT_L1 with those entries replaced."""
    out = dict(DEFAULT_L1)
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, sep, val = part.partition("=")
        name = name.strip()
        if not sep or name not in DEFAULT_L1:
            raise InputError(f"--l1: '{part.strip()}' is not ARCH=VALUE with ARCH one of {', '.join(DEFAULT_L1)}")
        try:
            out[name] = float(val)
        except ValueError:
            raise InputError(f"--l1: '{val.strip()}' is not a number") from None
        if not out[name] >= 0:
            raise InputError(f"--l1: {name}={val.strip()} must be >= 0")
    return out


def source_root() -> Path:
    """The folder that holds the ``saeray`` package (the repository root for a checkout)."""
    return Path(__file__).resolve().parents[2]


def default_venv() -> Path:
    env = os.environ.get(VENV_ENV)
    return Path(env) if env else source_root() / ".bench" / "saelens-venv"


def venv_python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def torch_version() -> str:
    """The torch release of this environment without its local build tag ("2.13.0+cpu" -> "2.13.0"):
    ``torch==2.13.0`` matches the installed ``+cpu`` wheel, and on a GPU machine the same release."""
    try:
        v = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        raise SaerayError("torch is not installed in this environment; run infra/bootstrap.sh first") from None
    return v.split("+", 1)[0]


def _req_name(req: str) -> str:
    return re.split(r"[\s<>=!~\[;@(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def check_torch_pinned(reqs: Sequence[str]) -> None:
    """Refuse any torch requirement that is not an exact ``torch==X.Y.Z`` pin (an unpinned or
    ranged torch lets pip pick the newest release: on Linux a multi-GB CUDA build)."""
    for r in reqs:
        if _req_name(r) == "torch" and not _TORCH_PIN.fullmatch(r.replace(" ", "")):
            raise InputError(f"refusing to install '{r}': torch must be pinned exactly (torch==X.Y.Z) "
                             "or pip may pull a multi-GB CUDA build")


def requirements(torch_ver: str, saelens: str = SAELENS_REQ) -> list[str]:
    return [f"torch=={torch_ver}", saelens, *SAERAY_SIDE_REQS]


def constraints_text(torch_ver: str) -> str:
    return f"# written by saeray.bench.saelens_env: keep the calling environment's torch\ntorch=={torch_ver}\n"


def pip_install_cmd(python: Path | str, reqs: Sequence[str], constraints: Path | str) -> list[str]:
    """``python -m pip install -c constraints reqs...``; raises InputError on an unpinned torch, in
    ``reqs`` or in the constraints file, or when the constraints do not pin torch at all."""
    reqs = list(reqs)
    check_torch_pinned(reqs)
    lines = [ln.split("#", 1)[0].strip() for ln in Path(constraints).read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    check_torch_pinned(lines)
    if not any(_req_name(ln) == "torch" for ln in lines):
        raise InputError(f"{constraints}: must pin torch (torch==X.Y.Z)")
    if not any(_req_name(r) == "torch" for r in reqs):
        raise InputError("the requirements must include an exact torch==X.Y.Z pin")
    return [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints), *reqs]


def stamp_key(reqs: Sequence[str]) -> str:
    return hashlib.sha256("\n".join([sys.version.split()[0], *reqs]).encode()).hexdigest()[:16]


def is_ready(venv: Path, reqs: Sequence[str]) -> bool:
    st = Path(venv) / STAMP
    return venv_python(venv).exists() and st.exists() and st.read_text().strip() == stamp_key(reqs)


def ensure_env(venv: Path | None = None, log: Callable[[str], None] | None = None,
               saelens: str = SAELENS_REQ) -> Path:
    """Create (first use) or reuse the bench virtualenv; return its python. Idempotent: a venv whose
    stamp matches the requirements is used as it is (no pip call)."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    venv = Path(venv or default_venv()).resolve()
    tv = torch_version()
    reqs = requirements(tv, saelens)
    if is_ready(venv, reqs):
        return venv_python(venv)
    py = venv_python(venv)
    if not py.exists():
        log(f"bench saelens: creating the benchmark virtualenv {venv}")
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    cons = venv / CONSTRAINTS
    cons.write_text(constraints_text(tv))
    cmd = pip_install_cmd(py, reqs, cons)
    log(f"bench saelens: installing {' '.join(reqs)} (torch pinned to this environment's {tv}; a few minutes the first time)")
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise SaerayError(f"pip install into {venv} failed:\n{r.stdout[-3000:]}")
    chk = subprocess.run([str(py), "-c", "import sae_lens.synthetic, torch, saeray.sae.io, saeray.sae.train; "
                          "print(torch.__version__)"], env=side_env(), capture_output=True, text=True)
    if chk.returncode != 0:
        raise SaerayError(f"the benchmark virtualenv {venv} cannot import sae_lens/saeray:\n{chk.stderr[-3000:]}")
    if chk.stdout.strip().split("+", 1)[0] != tv:
        raise SaerayError(f"the benchmark virtualenv got torch {chk.stdout.strip()}, expected {tv}")
    (venv / STAMP).write_text(stamp_key(reqs) + "\n")
    return py


def installed_version(python: Path | str, dist: str = "sae-lens") -> str:
    r = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                       capture_output=True, text=True, check=True)
    return r.stdout.strip()


def side_env(base: dict | None = None) -> dict:
    """Environment of the bench side: this checkout first on PYTHONPATH; no hub, no wandb."""
    env = dict(os.environ if base is None else base)
    root = str(source_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "disabled")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def side_cmd(python: Path | str, args: Sequence[str], module: str = SIDE_MODULE) -> list[str]:
    return [str(python), "-m", module, *args]


def run_side(python: Path | str, args: Sequence[str], module: str = SIDE_MODULE) -> int:
    """Run a benchmark body (``module``) in the bench venv; its stdout/stderr are this process's (streamed)."""
    return subprocess.run(side_cmd(python, args, module), env=side_env(), cwd=os.getcwd()).returncode
