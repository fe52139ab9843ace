"""Schedulers built from a model's config: SD's own, and a schedule rescaled to zero terminal SNR."""

from __future__ import annotations

import pytest

from diffusiond.errors import NotFound
from diffusiond.models.synthetic import SD15_SCHEDULER_CONFIG
from diffusiond.pipeline.schedulers import SCHEDULERS, SchedulerFactory
from diffusiond.training.recipe import BUILTIN_SCHEDULER

ZERO_SNR = {**BUILTIN_SCHEDULER, "_class_name": "DPMSolverMultistepScheduler"}


def test_an_sd_model_gets_every_scheduler_on_its_own_schedule():
    factory = SchedulerFactory(SD15_SCHEDULER_CONFIG)
    assert factory.names == list(SCHEDULERS) and factory.default_name == "pndm"
    ddim = factory.create("ddim")
    assert ddim.alphas_cumprod[-1] > 0.004  # SD's last timestep keeps some signal
    assert ddim.config.prediction_type == "epsilon"


def test_a_zero_terminal_snr_model_gets_only_schedulers_that_rescale():
    factory = SchedulerFactory(ZERO_SNR)
    assert factory.default_name == "dpmpp_2m"
    assert "pndm" not in factory.names and "lms" not in factory.names and "lms_karras" not in factory.names
    for name in factory.names:
        scheduler = factory.create(name)
        assert scheduler.config.rescale_betas_zero_snr and scheduler.config.prediction_type == "v_prediction"
        assert float(scheduler.alphas_cumprod[-1]) < 1e-6, name  # no image left at the last timestep
        scheduler.set_timesteps(20)
        assert int(scheduler.timesteps[0]) == 999, name  # trailing: sampling starts where the image is gone
    with pytest.raises(NotFound, match="'lms' is not available for this model: LMSDiscreteScheduler cannot rescale"):
        factory.resolve("lms")
    with pytest.raises(NotFound, match="PNDMScheduler"):
        factory.resolve("plms")
