"""ControlNet serving: parity with diffusers, batching rows with their own control images, and request checks."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusiond.errors import FailedPrecondition, InvalidArgument, NotFound
from diffusiond.models.canny import canny
from diffusiond.models.config import load_model_config
from diffusiond.pipeline.request import ControlSpec, GenerationRequest
from diffusiond.service.control import ControlParams
from diffusiond.service.models import load_model
from diffusiond.service.resolver import GenerationParams, resolve
from diffusiond.training import dataset
from diffusiond.training.train_controlnet import conditioning_channels_for

TOLERANCE = 1e-4  # as the text-to-image parity test: float images in [0, 1], same fp32 modules


def make_controlnet(builtin_dir: Path, out: Path) -> Path:
    """A ControlNet for the built-in UNet whose zero convolutions are seeded random, so it steers visibly."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(builtin_dir / "unet")
    torch.manual_seed(0)
    channels = conditioning_channels_for(load_model_config(builtin_dir).vae_scale_factor)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    with torch.no_grad():
        for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                      controlnet.controlnet_cond_embedding.conv_out]:
            block.weight.normal_(0, 0.05)
    controlnet.save_pretrained(out)
    return out


def scene_image(index: int, size: tuple[int, int] = (64, 64)) -> np.ndarray:
    _, image = dataset.sample(dataset.split("test"), 5, index)
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def controlnet_dir(builtin_dir, tmp_path_factory) -> Path:
    return make_controlnet(builtin_dir, tmp_path_factory.mktemp("controlnet") / "edges")


@pytest.fixture(scope="module")
def controlled(builtin_dir, controlnet_dir):
    """The built-in model with the test's ControlNet attached as ``edges`` (and the shipped one, if any, not)."""
    model = load_model("builtin", builtin_dir, controlnets={"edges": controlnet_dir})
    yield model
    model.backend.close()


def request(control: ControlSpec | None, **overrides) -> GenerationRequest:
    fields = dict(
        request_id="cn", model="builtin", prompt="a large red circle on a blue background, top left",
        negative_prompt="", width=64, height=72, steps=6, guidance_scale=4.0, seed=11, num_images=2,
        scheduler="ddim", control=control,
    )
    fields.update(overrides)
    return GenerationRequest(**fields)


def test_images_match_diffusers_controlnet_pipeline(builtin_dir, controlnet_dir, controlled):
    """Scale and guidance window included: the window (0.2, 0.8) of 5 steps leaves the first and last unsteered."""
    window = (0.2, 0.8)
    import diffusers
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    from diffusiond.pipeline.schedulers import SCHEDULERS

    control_image = canny(scene_image(1, (64, 72)))
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        builtin_dir, controlnet=ControlNetModel.from_pretrained(controlnet_dir), safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    spec = SCHEDULERS["ddim"]
    pipe.scheduler = getattr(diffusers, spec.class_name).from_config(pipe.scheduler.config, **spec.overrides)
    control = ControlSpec("edges", control_image, scale=0.8, guidance_start=window[0], guidance_end=window[1])
    ours = controlled.pipeline.generate(request(control, steps=5)).images
    expected = pipe(
        "a large red circle on a blue background, top left", image=Image.fromarray(control_image), height=72,
        width=64, num_inference_steps=5, guidance_scale=4.0, num_images_per_prompt=2,
        controlnet_conditioning_scale=0.8, control_guidance_start=window[0], control_guidance_end=window[1],
        generator=[torch.Generator().manual_seed(11), torch.Generator().manual_seed(12)], output_type="np",
    ).images
    plain = controlled.pipeline.generate(request(None, steps=5)).images
    assert ours.shape == expected.shape == (2, 72, 64, 3)
    assert np.abs(ours - expected).max() <= TOLERANCE
    assert np.abs(ours - plain).max() > 0.05  # the ControlNet does steer


class CallLog:
    """Wraps a backend: records (ControlNet name or "", rows) of every UNet call."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[tuple[str, int]] = []

    def unet(self, sample, timestep, context):
        self.calls.append(("", sample.shape[0]))
        return self.inner.unet(sample, timestep, context)

    def unet_controlled(self, sample, timestep, context, control):
        self.calls.append((control.name, sample.shape[0]))
        return self.inner.unet_controlled(sample, timestep, context, control)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def run_together(model, requests):
    pipeline = model.pipeline
    states = [pipeline.prepare(r) for r in requests]
    while any(s.active for s in states):
        pipeline.step(states)
    return [pipeline.finish(s).images for s in states]


def test_rows_share_calls_each_with_its_own_image_and_scale(controlled):
    a = request(ControlSpec("edges", canny(scene_image(2, (64, 72))), scale=1.0), num_images=1, steps=3)
    b = request(ControlSpec("edges", canny(scene_image(3, (64, 72))), scale=0.5, guidance_end=0.5), num_images=1,
                seed=99, guidance_scale=1.0, steps=2, scheduler="euler_a")
    alone = [controlled.pipeline.generate(r).images for r in (a, b)]
    log = CallLog(controlled.pipeline.backend)
    controlled.pipeline.backend = log
    try:
        together = run_together(controlled, [a, b])
    finally:
        controlled.pipeline.backend = log.inner
    assert log.calls[0] == ("edges", 3)  # one call: a's two guidance halves and b's single row
    for mine, theirs in zip(together, alone):
        assert np.abs(mine - theirs).max() <= 6 / 255  # the README's batching guarantee


def test_requests_without_or_with_another_controlnet_never_share_a_call(controlled):
    edges = ControlSpec("edges", canny(scene_image(4, (64, 72))))
    log = CallLog(controlled.pipeline.backend)
    controlled.pipeline.backend = log
    try:
        run_together(controlled, [request(edges, num_images=1, steps=2), request(None, num_images=1, steps=2)])
    finally:
        controlled.pipeline.backend = log.inner
    assert sorted(log.calls) == [("", 2), ("", 2), ("edges", 2), ("edges", 2)]  # two calls per step
    with_edges = request(edges)
    assert with_edges.latent_group() != request(None).latent_group()
    assert with_edges.latent_group() != request(replace(edges, name="other")).latent_group()
    assert with_edges.latent_group() == request(replace(edges, scale=0.3), seed=5).latent_group()


def test_outside_the_guidance_window_the_plain_unet_runs(controlled):
    """Steps with every row's scale 0 skip the ControlNet; the image is the plain one where the window is empty."""
    control = ControlSpec("edges", canny(scene_image(5, (64, 72))), guidance_start=0.75, guidance_end=1.0)
    log = CallLog(controlled.pipeline.backend)
    controlled.pipeline.backend = log
    try:
        controlled.pipeline.generate(request(control, steps=4))
    finally:
        controlled.pipeline.backend = log.inner
    assert [name for name, _ in log.calls] == ["", "", "", "edges"]


def params(**control) -> GenerationParams:
    return GenerationParams(prompt="a small red square", width=64, height=64, seed=1, control=ControlParams(**control))


def test_resolve_control(controlled):
    edges = png(scene_image(6))
    spec = resolve(params(canny_from=edges, canny_low=50, canny_high=150, scale=0.5), controlled).control
    assert spec.name == "edges" and spec.scale == 0.5 and spec.image.shape == (64, 64, 3)
    assert np.array_equal(spec.image, canny(scene_image(6), 50, 150))
    bigger = resolve(params(image=png(scene_image(6, (128, 96)))), controlled).control
    assert bigger.image.shape == (64, 64, 3)  # resized to the request's size


@pytest.mark.parametrize(
    ("control", "error", "names"),
    [
        (dict(controlnet="nope", image=b"x"), NotFound, "nope"),
        (dict(image=b"x", scale=2.5), InvalidArgument, "control.scale"),
        (dict(image=b"x", guidance_start=0.6, guidance_end=0.5), InvalidArgument, "control.guidance_start"),
        (dict(image=b"x", guidance_end=1.5), InvalidArgument, "control.guidance_end"),
        (dict(), InvalidArgument, "control.canny_from"),
        (dict(canny_from=b"x", canny_low=300, canny_high=200), InvalidArgument, "control.canny_low"),
        (dict(image=b"not an image"), InvalidArgument, "control.image"),
    ],
)
def test_bad_control_options_name_the_problem(controlled, control, error, names):
    with pytest.raises(error) as caught:
        resolve(params(**control), controlled)
    assert names in str(caught.value)


def test_step_caching_and_a_model_without_controlnets_are_refused(controlled):
    with pytest.raises(FailedPrecondition, match="step caching"):
        resolve(replace(params(image=png(scene_image(0))), cache_interval=2), controlled)
    bare = replace(controlled, controlnets={})
    with pytest.raises(FailedPrecondition, match="no ControlNet"):
        resolve(params(image=png(scene_image(0))), bare)


def test_wire_and_cli_carry_the_control_options(tmp_path):
    from diffusiond.api.v1 import diffusion_pb2 as pb
    from diffusiond.cli import build_parser
    from diffusiond.client import control_options
    from diffusiond.client.cli import _control
    from diffusiond.server.codec import params_from_proto, params_to_proto

    picture = tmp_path / "scene.png"
    picture.write_bytes(png(scene_image(8)))
    args = build_parser().parse_args(["generate", "a red circle", "--canny-from", str(picture),
                                      "--control-scale", "0.8", "--control-end", "0.6", "--canny-low", "50"])
    msg = _control(args)
    assert msg.canny_from == picture.read_bytes() and not msg.image and msg.scale == pytest.approx(0.8)
    assert not msg.HasField("guidance_start") and msg.guidance_end == pytest.approx(0.6)
    params = params_from_proto(pb.GenerateRequest(prompt="x", control=msg))
    assert params.control.canny_low == 50 and params.control.canny_high is None
    assert params_to_proto(params).control == msg  # the codec round-trips, unset fields stay unset
    assert params_from_proto(pb.GenerateRequest(prompt="x")).control is None
    with pytest.raises(ValueError, match="exactly one"):
        control_options(image=b"a", canny_from=b"b")
    bare = build_parser().parse_args(["generate", "a red circle", "--control-scale", "0.5"])
    with pytest.raises(ValueError, match="--control-image or --canny-from"):
        _control(bare)


def test_canny_finds_colour_edges_and_honours_its_thresholds():
    scene = dataset.Scene("red", "blue", "square", "large", "center")  # about equally bright: a grey canny misses it
    image = dataset.render(scene, dataset.Placement(32.0, 32.0, 24.0))
    edges = canny(image)
    assert edges.shape == (64, 64, 3) and edges.dtype == np.uint8 and set(np.unique(edges)) <= {0, 255}
    rows, cols = np.nonzero(edges[:, :, 0])
    assert 19 <= rows.min() <= 21 and 43 <= rows.max() <= 45 and 19 <= cols.min() <= 21  # the square's outline
    assert not edges[25:39, 25:39].any() and not edges[:15].any()  # nothing inside it or on the plain background
    assert not canny(image, 1400, 1442).any()  # above every gradient: no edges
    with pytest.raises(ValueError, match="low <= high"):
        canny(image, 200, 100)


def test_controlnet_training_is_seeded_and_resumes_exactly(builtin_dir, tmp_path):
    from diffusiond.training.train_controlnet import ControlRecipe, ControlTrainer

    recipe = ControlRecipe(steps=2, batch=2, pool_size=8, warmup_steps=1)
    straight = ControlTrainer(recipe, builtin_dir, tmp_path / "a", None, progress=False)
    assert straight.run()
    # The pool knows where each shape is and its size, for the shape-weighted loss and small-shape draws.
    assert straight.pool["coverage"].shape == (8, 1, 64, 64) and straight.pool["coverage"].dtype == torch.uint8
    assert straight.pool["small"].tolist() == [c.startswith("a small") for c in straight.pool["captions"]]
    # A pool made before the shape-weighted loss (no coverage) is made again, not used half-filled.
    old = {k: v for k, v in straight.pool.items() if k not in ("coverage", "small")}
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "controlnet_pool.pt")
    remade = ControlTrainer(recipe, builtin_dir, tmp_path / "old", None, progress=False)
    assert torch.equal(remade.pool["coverage"], straight.pool["coverage"])
    first = ControlTrainer(replace(recipe), builtin_dir, tmp_path / "b", budget_s=0.0, progress=False)
    assert not first.run() and first.step == 1  # out of budget after one step, checkpointed
    resumed = ControlTrainer(recipe, builtin_dir, tmp_path / "b", None, progress=False)
    assert resumed.step == 1 and resumed.run()
    for (name, a), b in zip(straight.controlnet.state_dict().items(), resumed.controlnet.state_dict().values()):
        assert torch.equal(a, b), name
    resumed.export(tmp_path / "out", "test")
    assert (tmp_path / "out" / "diffusiond_control.json").is_file()
    # The conditioning embedding brings a 64x64 control image to the model's latent size.
    side = load_model_config(builtin_dir).unet_sample_size
    with torch.no_grad():
        embedded = resumed.controlnet.controlnet_cond_embedding(torch.zeros(1, 3, 64, 64))
    assert embedded.shape[-2:] == (side, side)


def test_conditioning_channels_downsample_by_the_vae_factor():
    assert conditioning_channels_for(8) == (8, 16, 16, 16)
    assert conditioning_channels_for(4) == (8, 16, 16)
    with pytest.raises(ValueError, match="power of two"):
        conditioning_channels_for(6)
