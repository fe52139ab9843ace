"""LoRA serving end to end: a real server on the built-in model with ``--lora-dir``.

Scale 0 is the base image bit for bit; adapters hot-swap between requests
without a reload and come back exactly; requests with different adapter sets
never share a UNet call while requests with the same set do; adapters copied
into the directory are found without a restart; bad requests get clear statuses.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from conftest import running_server
from images import assert_same_image, pixels

from diffusiond.backends.lora_patch import LoraPatcher
from diffusiond.client import ClientError, DiffusionClient, build_request
from diffusiond.models.lora import LoraLayer, save_adapter
from diffusiond.models.sources import ModelSource
from diffusiond.server.app import ServerSettings, ServerThread
from diffusiond.service.batcher import BatcherSettings

PROMPT = "a large red circle on a blue background"
WAIT_S = 60.0


def random_adapter(path: Path, unet_shapes: dict, seed: int, strength: float = 0.3, suffixes=("attn2.to_k", "attn1.to_q",
                   "conv2")) -> None:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for name, shape in sorted(unet_shapes.items()):
        if not name.endswith(suffixes):
            continue
        down_shape = (4, *shape[1:]) if len(shape) == 4 else (4, shape[1])
        up_shape = (shape[0], 4, 1, 1) if len(shape) == 4 else (shape[0], 4)
        layers.append(LoraLayer(name, torch.randn(down_shape, generator=g) * strength,
                                torch.randn(up_shape, generator=g) * strength, 1.0))
    save_adapter(path, layers, 4, 4.0, {"base_model": "builtin"})


class RecordingBackend:
    """Wraps a backend: records every UNet call's rows and the adapter set active during it."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[tuple[int, object]] = []
        self.before_unet = None

    def unet(self, sample, timestep, encoder_hidden_states):
        if self.before_unet is not None:
            self.before_unet(len(self.calls))
        self.calls.append((sample.shape[0], self.inner._patcher.active))
        return self.inner.unet(sample, timestep, encoder_hidden_states)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, builtin_dir) -> Path:
    from diffusers import UNet2DConditionModel

    directory = tmp_path_factory.mktemp("loras")
    shapes = LoraPatcher(UNet2DConditionModel.from_pretrained(builtin_dir / "unet")).weight_shapes()
    random_adapter(directory / "alpha.safetensors", shapes, 1)
    random_adapter(directory / "beta.safetensors", shapes, 2)
    random_adapter(directory.parent / "gamma.safetensors", shapes, 3)  # copied in while the server runs
    wrong = [LoraLayer("down_blocks.0.attentions.0.proj_in", torch.zeros(4, 320), torch.zeros(320, 4), 1.0)]
    save_adapter(directory / "sd15style.safetensors", wrong, 4, 4.0, {"base_model": "sd15"})
    (directory / "notes.safetensors").write_bytes(b"these are not tensors")
    return directory


@pytest.fixture(scope="module")
def lora_server(builtin_dir, lora_dir) -> Iterator[ServerThread]:
    settings = ServerSettings(
        host="127.0.0.1", port=0, models=[ModelSource("builtin", str(builtin_dir))], lora_dir=str(lora_dir),
        batcher=BatcherSettings(max_batch_size=4, batching="continuous"), warmup=False,
    )
    with running_server(settings, RecordingBackend) as thread:
        yield thread


@pytest.fixture(scope="module")
def lclient(lora_server) -> Iterator[DiffusionClient]:
    with DiffusionClient(lora_server.address, timeout=120) as c:
        yield c


@pytest.fixture
def recording(lora_server) -> RecordingBackend:
    backend = lora_server.server.registry.get("builtin").pipeline.backend
    backend.calls.clear()
    backend.before_unet = None
    return backend


def generate(client, loras=None, **kw) -> bytes:
    kw = {"prompt": PROMPT, "seed": 5, "steps": 6, **kw}
    return client.generate(loras=loras, **kw).images[0].data


def test_scale_zero_is_the_base_image_bit_for_bit_and_swaps_come_back_exactly(lclient, recording):
    base = generate(lclient)
    assert generate(lclient, {"alpha": 0.0}) == base
    alpha = generate(lclient, {"alpha": 1.0})
    beta = generate(lclient, {"beta": 1.0})
    assert abs(pixels(alpha).astype(int) - pixels(base)).mean() > 2  # the adapter changes the image
    assert alpha != beta
    both = generate(lclient, {"alpha": 1.0, "beta": 1.0})
    assert both not in (alpha, beta)
    assert generate(lclient, {"alpha": 1.0}) == alpha  # hot-swapped back: the same bytes
    assert generate(lclient, {"alpha": 0.0, "beta": 0.0}) == base  # back to base: the original weights
    half = generate(lclient, {"alpha": 0.5})
    assert 0 < abs(pixels(half).astype(int) - pixels(base)).mean() < abs(pixels(alpha).astype(int) - pixels(base)).mean()


def test_different_adapter_sets_never_share_a_unet_call_and_the_same_set_does(lclient, recording, lora_server):
    solo = {name: generate(lclient, loras, prompt=f"a small {name} square on a white background", steps=4)
            for name, loras in (("green", {"alpha": 1.0}), ("purple", {"alpha": 1.0}), ("black", {"beta": 0.8}))}
    recording.calls.clear()
    first_held, release = threading.Event(), threading.Event()

    def hold_first(n: int) -> None:
        if n == 0:
            first_held.set()
            assert release.wait(WAIT_S)

    recording.before_unet = hold_first
    results: dict[str, bytes] = {}

    def run(name: str, loras: dict) -> None:
        results[name] = generate(lclient, loras, prompt=f"a small {name} square on a white background", steps=4)

    threads = [threading.Thread(target=run, args=("green", {"alpha": 1.0}))]
    threads[0].start()
    assert first_held.wait(WAIT_S)
    for name, loras in (("purple", {"alpha": 1.0}), ("black", {"beta": 0.8})):
        threads.append(threading.Thread(target=run, args=(name, loras)))
        threads[-1].start()
    batcher = lora_server.server.batcher
    queued = threading.Event()
    while not queued.wait(0.05):  # both others queued behind the held call (no timing: a condition)
        if batcher.queue_depth >= 2:
            queued.set()
    release.set()
    for t in threads:
        t.join(WAIT_S)
    recording.before_unet = None
    keys = {key for _, key in recording.calls}
    assert len(keys) == 2  # alpha's set and beta's set, each in its own calls
    alpha_rows = [rows for rows, key in recording.calls if key and key[0][0] == "alpha"]
    beta_rows = [rows for rows, key in recording.calls if key and key[0][0] == "beta"]
    assert max(alpha_rows) == 4  # green and purple (two guided rows each) shared calls
    assert set(beta_rows) == {2}  # black ran alone: never with alpha's requests
    for name in solo:
        assert_same_image(results[name], solo[name])


def test_adapters_are_listed_and_new_files_found_without_a_restart(lclient, lora_dir, recording):
    (model,) = lclient.list_models()
    listed = {a.name: a for a in model.adapters}
    assert set(listed) == {"alpha", "beta", "sd15style", "notes"}
    assert (listed["alpha"].format, listed["alpha"].rank, listed["alpha"].base_model) == ("peft", 4, "builtin")
    assert not listed["alpha"].error and listed["alpha"].layers > 0
    assert "sd15style.safetensors" in listed["sd15style"].error and "notes.safetensors" in listed["notes"].error
    assert not model.fused_adapters

    shutil.copy(lora_dir.parent / "gamma.safetensors", lora_dir / "gamma.safetensors")
    assert generate(lclient, {"gamma": 1.0}) != generate(lclient)  # found on its first request
    assert "gamma" in {a.name for a in lclient.list_models()[0].adapters}


@pytest.mark.parametrize("loras, code, words", [
    ({"nope": 1.0}, grpc.StatusCode.NOT_FOUND, ["'nope'", "alpha"]),
    ({"alpha": 2.5}, grpc.StatusCode.INVALID_ARGUMENT, ["loras[0].scale", "-2.0 and 2.0"]),
    ({"alpha": float("nan")}, grpc.StatusCode.INVALID_ARGUMENT, ["loras[0].scale"]),
    ([("alpha", 1.0), ("alpha", 0.5)], grpc.StatusCode.INVALID_ARGUMENT, ["named twice"]),
    ({"": 1.0}, grpc.StatusCode.INVALID_ARGUMENT, ["loras[0].name"]),
    ({"sd15style": 1.0}, grpc.StatusCode.FAILED_PRECONDITION, ["sd15style.safetensors", "another base model"]),
    ({"notes": 1.0}, grpc.StatusCode.FAILED_PRECONDITION, ["notes.safetensors", "not a readable safetensors"]),
])
def test_bad_adapter_requests_get_clear_statuses(lclient, loras, code, words):
    with pytest.raises(ClientError) as info:
        lclient.generate_request(build_request(PROMPT, steps=2, loras=loras))
    assert info.value.code == code
    for word in words:
        assert word in info.value.details


def test_a_server_without_a_lora_dir_says_so(client):
    with pytest.raises(ClientError) as info:
        client.generate_request(build_request(PROMPT, steps=2, loras={"alpha": 1.0}))
    assert info.value.code == grpc.StatusCode.NOT_FOUND and "--lora-dir" in info.value.details


def test_the_command_line_applies_and_lists_adapters(lora_server, lclient, tmp_path, capsys):
    from diffusiond.cli import main

    out = tmp_path / "framed.png"
    code = main(["generate", PROMPT, "--seed", "5", "--steps", "6", "--lora", "alpha:1", "--lora", "beta:0",
                 "-o", str(out), "--server", lora_server.address])
    assert code == 0
    assert out.read_bytes() == generate(lclient, {"alpha": 1.0})
    assert main(["models", "--server", lora_server.address]) == 0
    listing = capsys.readouterr().out
    assert "adapter alpha: peft, rank 4" in listing and "adapter sd15style: error:" in listing
    with pytest.raises(SystemExit) as bad:
        main(["generate", PROMPT, "--lora", "alpha:x", "--server", lora_server.address])
    assert bad.value.code == 2 and "expected NAME:SCALE" in capsys.readouterr().err
