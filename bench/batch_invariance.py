"""Does a request's output depend on the batch it shares? Measures where, how much, and the price of exactness.

    .venv/bin/python bench/batch_invariance.py [--model DIR] [--batch 4] [--steps 20]

Reports, for the model's UNet on this machine:
1. one sample's output alone vs at position 0 and at the last position of a batch;
2. one sample's output in a batch of fixed size and position with different companions;
3. the leaf modules whose output for a sample changes with the batch size;
4. the final 8-bit images of a batch of requests vs each request alone (pipeline, guidance on);
5. the time per sample of a batched UNet call vs one call per sample (the only exact way).
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from diffusiond.models.builtin import ensure_builtin_model  # noqa: E402
from diffusiond.service.models import load_model  # noqa: E402
from diffusiond.service.resolver import GenerationParams, resolve  # noqa: E402


def unet_inputs(model, n: int, seed: int = 0):
    config = model.config
    unet = model.backend._unet
    size = unet.config.sample_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, config.latent_channels, size, size, generator=g)
    c = torch.randn(n, 77, unet.config.cross_attention_dim, generator=g)
    t = torch.full((n,), 500.0)
    return x, t, c


def leaf_differences(model, n: int) -> dict[str, float]:
    unet = model.backend._unet
    x, t, c = unet_inputs(model, n)
    records = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: records.append((mod, inp, out)))
        for m in unet.modules() if not list(m.children())
    ]
    with torch.inference_mode():
        unet(x, t, encoder_hidden_states=c)
    for h in hooks:
        h.remove()
    worst: dict[str, float] = collections.defaultdict(float)
    with torch.inference_mode():
        for mod, inp, out in records:
            if not (isinstance(out, torch.Tensor) and inp and isinstance(inp[0], torch.Tensor)):
                continue
            if inp[0].shape[0] != n or out.shape[0] != n:
                continue
            alone = mod(inp[0][:1], *[a[:1] if isinstance(a, torch.Tensor) and a.shape[0] == n else a for a in inp[1:]])
            worst[type(mod).__name__] = max(worst[type(mod).__name__], (alone - out[:1]).abs().max().item())
    return dict(worst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model directory (default: the built-in model)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model("m", args.model or ensure_builtin_model())
    unet = model.backend.unet
    n = args.batch

    x, t, c = unet_inputs(model, n)
    alone = unet(x[:1], t[:1], c[:1])
    batch = unet(x, t, c)
    perm = torch.arange(n).roll(-1)  # sample 0 goes last
    moved = unet(x[perm], t[perm], c[perm])
    print(f"1. UNet output of one sample, max |diff|: alone vs position 0 of {n}: "
          f"{(alone[0] - batch[0]).abs().max().item():.3g}; position 0 vs position {n - 1}: "
          f"{(batch[0] - moved[-1]).abs().max().item():.3g}")
    x2, _, c2 = unet_inputs(model, n, seed=1)
    x2[0], c2[0] = x[0], c[0]
    other = unet(x2, t, c2)
    print(f"2. same size and position, other companions: max |diff| {(batch[0] - other[0]).abs().max().item():.3g}")
    print("3. leaf modules whose output changes with the batch size (max |diff|): "
          + ", ".join(f"{k} {v:.3g}" for k, v in sorted(leaf_differences(model, n).items()) if v > 0))

    requests = [
        resolve(GenerationParams(prompt=f"prompt {i}", steps=args.steps, guidance_scale=7.5, seed=100 + i,
                                 scheduler="ddim", request_id=f"r{i}"), model)
        for i in range(n)
    ]
    together = model.pipeline.generate_together(requests)
    levels = []
    for request, result in zip(requests, together):
        solo = model.pipeline.generate(request)
        diff = np.abs(solo.images_uint8().astype(int) - result.images_uint8().astype(int))
        levels.append(int(diff.max()))
    print(f"4. {n} requests batched vs each alone, {args.steps} steps: max 8-bit difference per request {levels}")

    rows = 2 * n  # guidance doubles the UNet batch
    x, t, c = unet_inputs(model, rows)

    def best_of(fn, repeats: int = 3) -> float:
        fn()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    batched = best_of(lambda: unet(x, t, c))
    one_by_one = best_of(lambda: [unet(x[i : i + 1], t[i : i + 1], c[i : i + 1]) for i in range(rows)])
    print(f"5. UNet, {rows} rows: one batched call {batched * 1000:.0f} ms, one call per row {one_by_one * 1000:.0f} ms "
          f"({one_by_one / batched:.2f}x the time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
