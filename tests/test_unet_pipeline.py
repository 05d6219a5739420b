"""UNet and pipeline: shapes, cross-attention, guidance, determinism, save/load, bad input."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from d3pm_hub import D3PMPipeline, D3PMUNet

from .conftest import tiny_pipeline


def sample(pipeline, labels=(0, 3, 10), seed=0, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("output_type", "pt")
    return pipeline(list(labels), generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_unet_output_shape_and_cross_attention_names(pipeline):
    unet = pipeline.unet
    x_t = torch.randint(0, 8, (2, 1, 28, 28))
    logits = unet(x_t, torch.tensor([3, 40]), torch.tensor([1, 10]))
    assert logits.shape == (2, 8, 28, 28)
    names = [n for n, _ in unet.named_parameters() if "attn2.to_k" in n]
    assert any(n.startswith("unet.down_blocks.1") for n in names)
    assert any(n.startswith("unet.up_blocks.1") for n in names) and any("mid_block" in n for n in names)
    assert unet.label_context(torch.tensor([0, 10])).shape == (2, 4, 16)


def test_to_k_changes_the_output(pipeline):
    """Several context tokens: the attention softmax is not trivially 1, so keys matter."""
    unet = pipeline.unet
    x_t, t, labels = torch.randint(0, 8, (2, 1, 28, 28)), torch.tensor([10, 10]), torch.tensor([2, 5])
    with torch.no_grad():
        before = unet(x_t, t, labels)
        for name, parameter in unet.named_parameters():
            if "attn2.to_k" in name:
                parameter.mul_(3.0)
        after = unet(x_t, t, labels)
    assert not torch.allclose(before, after)


def test_output_types_and_shapes(pipeline):
    pt = sample(pipeline, output_type="pt")
    assert pt.shape == (3, 1, 28, 28) and pt.dtype == torch.float32 and pt.min() >= 0 and pt.max() <= 1
    np_images = sample(pipeline, output_type="np")
    assert isinstance(np_images, np.ndarray) and np_images.shape == (3, 28, 28, 1)
    pil = sample(pipeline, output_type="pil")
    assert len(pil) == 3 and isinstance(pil[0], Image.Image) and pil[0].size == (28, 28)
    np.testing.assert_allclose(np_images[..., 0], pt[:, 0].numpy())
    assert np.array_equal(np.asarray(pil[1]), np.round(np_images[1, ..., 0] * 255).astype(np.uint8))
    images = pipeline([1], num_inference_steps=2, return_dict=False, output_type="pt")
    assert isinstance(images, tuple) and images[0].shape == (1, 1, 28, 28)


def test_sampling_is_deterministic(pipeline):
    assert torch.equal(sample(pipeline, seed=5), sample(pipeline, seed=5))
    assert not torch.equal(sample(pipeline, seed=5), sample(pipeline, seed=6))


def test_step_callback_sees_every_sample_and_can_replace_it(pipeline):
    seen = []

    def record(_pipeline, index, timestep, outputs):
        seen.append((index, timestep, outputs["sample"].clone()))
        return {"sample": torch.zeros_like(outputs["sample"])} if index == 4 else None

    images = pipeline(
        [3, 10],
        num_inference_steps=5,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        callback_on_step_end=record,
    ).images
    assert [index for index, _, _ in seen] == list(range(5)) and seen[0][1] > seen[-1][1]
    assert seen[0][2].shape == (2, 1, 28, 28) and seen[0][2].dtype == torch.long
    assert torch.equal(images, torch.zeros_like(images))  # the replaced last sample is what comes out


def test_guidance_scale_one_and_zero(pipeline):
    labels = torch.tensor([2, 7])
    x_t = torch.randint(0, 8, (2, 1, 28, 28))
    conditional = torch.log_softmax(pipeline.unet(x_t, 20, labels).double(), dim=1)
    unconditional = torch.log_softmax(pipeline.unet(x_t, 20, torch.tensor([10, 10])).double(), dim=1)
    with torch.no_grad():
        torch.testing.assert_close(pipeline.x0_log_probs(x_t, 20, labels, 1.0), conditional)
        torch.testing.assert_close(pipeline.x0_log_probs(x_t, 20, labels, 0.0), unconditional)
        guided = pipeline.x0_log_probs(x_t, 20, labels, 3.0)
    expected = torch.log_softmax(unconditional + 3.0 * (conditional - unconditional), dim=1)
    torch.testing.assert_close(guided, expected.detach(), atol=1e-5, rtol=1e-5)
    # guidance 0 samples exactly what the null label samples
    assert torch.equal(sample(pipeline, (2, 7), guidance_scale=0.0), sample(pipeline, (10, 10), guidance_scale=1.0))


def test_low_temperature_sharpens_towards_the_x0_argmax(pipeline):
    cold = sample(pipeline, (4, 4, 4, 4), temperature=1e-3, num_inference_steps=1, guidance_scale=2.0)
    x_t = pipeline.scheduler.prior_sample((4, 1, 28, 28), torch.Generator().manual_seed(0))
    with torch.no_grad():
        argmax = pipeline.x0_log_probs(x_t, 50, torch.tensor([4] * 4), 2.0).argmax(1, keepdim=True)
    # all but near-ties of the random tiny model's logits
    assert (cold == pipeline.levels_to_images(argmax, "pt")).float().mean() > 0.99


def test_unet_parameters_override_is_per_call(pipeline):
    params = {n: p.detach().clone() for n, p in pipeline.unet.named_parameters()}
    assert torch.equal(sample(pipeline, unet_parameters=params), sample(pipeline))
    params = {n: torch.zeros_like(p) for n, p in params.items()}
    zeros = sample(pipeline, unet_parameters=params)
    assert not torch.equal(zeros, sample(pipeline))
    assert all(p.abs().sum() > 0 for n, p in pipeline.unet.named_parameters() if "weight" in n)


def test_concurrent_calls_with_different_weights_and_steps_do_not_mix(pipeline):
    base = {n: p.detach() for n, p in pipeline.unet.named_parameters()}
    settings = [({n: p * (1 + 0.05 * i) for n, p in base.items()}, 2 + i % 3) for i in range(6)]

    def run(setting):
        parameters, steps = setting
        return sample(pipeline, unet_parameters=parameters, num_inference_steps=steps)

    sequential = [run(setting) for setting in settings]
    with ThreadPoolExecutor(max_workers=6) as pool:
        concurrent = list(pool.map(run, settings))
    assert all(torch.equal(a, b) for a, b in zip(sequential, concurrent, strict=True))
    with pytest.raises(ValueError, match="lacks"):
        sample(pipeline, unet_parameters={"no.such.weight": torch.zeros(1)})


@pytest.mark.parametrize("transition_type", ["uniform", "absorbing", "gaussian"])
def test_save_load_round_trip(tmp_path, transition_type):
    pipeline = tiny_pipeline(transition_type=transition_type)
    pipeline.save_pretrained(tmp_path)
    loaded = D3PMPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.unet, D3PMUNet) and loaded.unet.dtype == torch.float32
    assert torch.equal(sample(pipeline), sample(loaded))
    unet = D3PMUNet.from_pretrained(tmp_path / "unet")
    x_t = torch.randint(0, 8, (1, 1, 28, 28))
    with torch.no_grad():
        torch.testing.assert_close(unet(x_t, 5, torch.tensor([4])), pipeline.unet(x_t, 5, torch.tensor([4])))


def test_bad_input_is_refused(pipeline, tmp_path):
    for labels in ([11], [-1], [], [1.5]):
        with pytest.raises(ValueError, match="class_labels"):
            pipeline(labels, num_inference_steps=2)
    for steps in (0, -3, 51):
        with pytest.raises(ValueError, match="num_inference_steps"):
            pipeline([1], num_inference_steps=steps)
    with pytest.raises(ValueError, match="output_type"):
        pipeline([1], num_inference_steps=2, output_type="jpeg")
    with pytest.raises(ValueError, match="guidance_scale"):
        pipeline([1], num_inference_steps=2, guidance_scale=float("nan"))
    for temperature in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            pipeline([1], num_inference_steps=2, temperature=temperature)
    with pytest.raises(ValueError, match="int64"):
        pipeline.unet(torch.zeros(1, 1, 28, 28), 3, torch.tensor([1]))
    with pytest.raises(ValueError, match="shape"):
        pipeline.unet(torch.zeros(1, 28, 28, dtype=torch.long), 3, torch.tensor([1]))
    with pytest.raises(ValueError, match="0..7"):
        pipeline.unet(torch.full((1, 1, 28, 28), 8), 3, torch.tensor([1]))
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        D3PMPipeline.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        D3PMPipeline.from_pretrained("nobody/no-such-d3pm")
