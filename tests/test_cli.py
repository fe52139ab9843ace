"""`diffusiond generate` and `diffusiond models` against a real server."""

from __future__ import annotations

from PIL import Image

from diffusiond.cli import main


def test_generate_writes_the_image(server, tmp_path, capsys):
    out = tmp_path / "fox.png"
    code = main(["generate", "a red fox in the snow", "-o", str(out), "--seed", "3", "--steps", "3", "--server", server.address])
    assert code == 0
    assert Image.open(out).size == (64, 64)
    assert "seed=3" in capsys.readouterr().out


def test_stream_saves_previews_and_numbered_images(server, tmp_path, capsys):
    out = tmp_path / "img.jpg"
    previews = tmp_path / "previews"
    code = main([
        "generate", "a cat", "--stream", "--preview-dir", str(previews), "--num-images", "2", "--steps", "4",
        "--scheduler", "ddim", "--format", "jpeg", "-o", str(out), "--server", server.address,
    ])
    assert code == 0
    assert (tmp_path / "img-0.jpg").is_file() and (tmp_path / "img-1.jpg").is_file()
    assert sorted(p.name for p in previews.iterdir())[:2] == ["step0001-0.jpg", "step0001-1.jpg"]
    assert len(list(previews.iterdir())) == 8
    err = capsys.readouterr().err
    assert "4/4" in err and "ETA" in err


def test_server_error_is_one_line(server, tmp_path, capsys):
    code = main(["generate", "a cat", "--width", "65", "-o", str(tmp_path / "x.png"), "--server", server.address])
    assert code == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: INVALID_ARGUMENT: width: must be a multiple of 4 (the model's latent factor) between 32 and 2048, got 65"


def test_models_command(server, capsys):
    assert main(["models", "--server", server.address]) == 0
    out = capsys.readouterr().out
    assert "builtin (default): torch on cpu (fp32)" in out and "euler_a" in out
    assert "previews: approx_rgb, full, latent (the first is the best live preview)" in out


def test_generate_from_an_init_image_with_a_mask(server, tmp_path, capsys):
    from image_inputs import box_mask, encode, picture

    init, mask, out = tmp_path / "in.png", tmp_path / "mask.png", tmp_path / "out.png"
    init.write_bytes(encode(picture(96, 80)))
    mask.write_bytes(encode(box_mask(96, 80)))
    code = main(["generate", "a red circle", "--init-image", str(init), "--strength", "0.6", "--mask", str(mask),
                 "--mask-blur", "2", "--keep-unmasked", "--steps", "4", "--seed", "2", "-o", str(out),
                 "--server", server.address])
    assert code == 0
    assert Image.open(out).size == (96, 80)  # the init image's size
    assert "Denoising strength: 0.6, Mask blur: 2" in Image.open(out).text["parameters"]


def test_generate_with_hires(server, tmp_path, capsys):
    out = tmp_path / "big.png"
    code = main(["generate", "a red circle", "--hires", "2x", "--hires-strength", "0.5", "--hires-upscaler", "lanczos",
                 "--steps", "4", "--seed", "2", "-o", str(out), "--stream", "--server", server.address])
    assert code == 0
    assert Image.open(out).size == (128, 128)
    assert "6/6" in capsys.readouterr().err  # both passes in one progress bar


def test_unreadable_init_image_and_bad_hires_are_one_line_errors(server, tmp_path, capsys):
    missing = tmp_path / "nope.png"
    assert main(["generate", "x", "--init-image", str(missing), "--server", server.address]) == 2
    assert capsys.readouterr().err.startswith(f"error: --init-image: cannot read {missing}: ")
    assert main(["generate", "x", "--hires", "big", "--server", server.address]) == 2
    assert "hires must be a scale (2, 2x, 1.5x) or a size (WIDTHxHEIGHT), got 'big'" in capsys.readouterr().err


def test_models_command_lists_image_inputs(server, capsys):
    assert main(["models", "--server", server.address]) == 0
    assert "image inputs: img2img, inpainting (latent_blend), hi-res fix" in capsys.readouterr().out
