"""`copy_adapter_weights` (the pooled render pipeline's LoRA swap): a file holding exactly the loaded adapter's
tensors is copied in place and leaves the UNet as loading that file afresh does; any other file changes
nothing and says so, so the render job falls back to diffusers' loaders."""

from __future__ import annotations

from pathlib import Path

import torch

from tasks.models.base_model import load_pipeline
from tasks.models.pipeline_pool import adapter_copies, copy_adapter_weights
from tests.test_extra_loras import random_lora, save_diffusers

ADAPTER = "lora"


def lora_params(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "lora_" in n}


def loaded(model_dir: Path, file: Path):
    pipe = load_pipeline(str(model_dir))
    pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=ADAPTER)
    return pipe


def test_a_like_file_is_copied_in_place_as_a_fresh_load_would_leave_it(tmp_path: Path, tiny_model_dir: Path) -> None:
    first = save_diffusers(tmp_path, "a.safetensors", random_lora(tiny_model_dir, seed=1))
    second = save_diffusers(tmp_path, "b.safetensors", random_lora(tiny_model_dir, seed=2))
    pipe = loaded(tiny_model_dir, first)
    before, copies = lora_params(pipe.unet), adapter_copies()
    assert copy_adapter_weights(pipe.unet, second, ADAPTER)
    assert adapter_copies() == copies + 1
    after, expected = lora_params(pipe.unet), lora_params(loaded(tiny_model_dir, second).unet)
    assert after.keys() == expected.keys() == before.keys()
    assert all(torch.equal(after[n], expected[n]) for n in after)
    assert any(not torch.equal(after[n], before[n]) for n in after)  # the two files differ


def test_other_files_change_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    first = save_diffusers(tmp_path, "a.safetensors", random_lora(tiny_model_dir, seed=1))
    with_text = save_diffusers(tmp_path, "te.safetensors", random_lora(tiny_model_dir, seed=3, text_encoder=True))
    pipe = loaded(tiny_model_dir, first)
    before, copies = lora_params(pipe.unet), adapter_copies()
    unet_keys = dict(random_lora(tiny_model_dir, seed=4)[0])
    fewer = save_diffusers(tmp_path, "fewer.safetensors", (dict(list(unet_keys.items())[:-2]), {}, {}))
    doubled = {k: torch.cat([v, v], dim=0 if "lora_A" in k else 1) for k, v in unet_keys.items()}
    wider = save_diffusers(tmp_path, "wider.safetensors", (doubled, {}, {}))
    for file in (with_text, fewer, wider):  # a text-encoder part, a missing tensor, another rank
        assert not copy_adapter_weights(pipe.unet, file, ADAPTER), file.name
    assert not copy_adapter_weights(pipe.unet, first, "another-adapter")
    after = lora_params(pipe.unet)
    assert adapter_copies() == copies and all(torch.equal(after[n], before[n]) for n in before)
