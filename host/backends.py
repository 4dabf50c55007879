"""Which backend serves: `ENGRAIN_HOST_BACKEND` (auto prefers llama.cpp when it is installed and can serve the base)."""

from __future__ import annotations

import importlib.util
import logging

from host.backend import Backend
from train_worker.settings import Settings

log = logging.getLogger(__name__)

FAST_EXTRA = "install the fast backend with `pip install 'engrain[fast]'` (builds llama-cpp-python, a few minutes)"


class BackendUnavailable(Exception):
    pass


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def choose_backend(settings: Settings) -> Backend:
    """The backend named by the settings; with `auto`, llama.cpp when it can serve this base on the CPU."""
    from host.llama_backend import gguf_for

    wanted = settings.host_backend
    if wanted == "auto":
        reasons = []
        if not llama_cpp_installed():
            reasons.append("llama-cpp-python is not installed")
        if gguf_for(settings.base_model) is None:
            reasons.append("the base model has no GGUF file")
        if settings.device == "cuda":
            reasons.append("ENGRAIN_DEVICE=cuda (llama.cpp here is built for the CPU)")
        wanted = "transformers" if reasons else "llama.cpp"
        log.info("host backend: %s%s", wanted, f" ({'; '.join(reasons)})" if reasons else "")
    if wanted == "llama.cpp":
        if not llama_cpp_installed():
            raise BackendUnavailable(f"ENGRAIN_HOST_BACKEND=llama.cpp needs llama-cpp-python: {FAST_EXTRA}")
        if gguf_for(settings.base_model) is None:
            raise BackendUnavailable(
                f"ENGRAIN_HOST_BACKEND=llama.cpp needs a GGUF file for the base model {settings.base_model!r}: put "
                "exactly one .gguf in its folder, or use ENGRAIN_HOST_BACKEND=transformers"
            )
        from host.llama_backend import LlamaCppBackend

        return LlamaCppBackend(settings)
    from host.transformers_backend import TransformersBackend

    return TransformersBackend(settings)
