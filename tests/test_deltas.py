"""Deltas: file round trip with metadata, additive composition, exact removal, every refusal, thread safety."""

import json
import threading

import pytest
import torch

from d3pm_hub.deltas import (
    FORMAT_VERSION,
    ConceptDelta,
    apply_deltas,
    base_hash_of,
    base_model_hash,
    compose_parameters,
    deltas_applied,
    fuse,
    remove_deltas,
)

from .conftest import tiny_pipeline

KEY = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
VALUE = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight"


def make_delta(unet, seed: int, names=(KEY, VALUE), concepts=(9,)) -> ConceptDelta:
    generator = torch.Generator().manual_seed(seed)
    shapes = dict(unet.named_parameters())
    increments = {name: 0.5 * torch.randn(shapes[name].shape, generator=generator) for name in names}
    return ConceptDelta.create(unet, increments, list(concepts), "test", {"seed": seed}, "tiny", {"rate": 0.0})


def sample(pipeline, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return pipeline([3, 9, 10], num_inference_steps=3, output_type="pt", generator=generator, **kwargs).images


def state(unet):
    return {name: p.detach().clone() for name, p in unet.named_parameters()}


def test_round_trip_keeps_tensors_and_metadata(pipeline, tmp_path):
    delta = make_delta(pipeline.unet, 0)
    path = delta.save(tmp_path / "nested" / "digit-9.safetensors", dtype=torch.float32)
    loaded = ConceptDelta.load(path)
    assert loaded.metadata == delta.metadata and set(loaded.tensors) == {KEY, VALUE}
    for name in delta.tensors:
        assert torch.equal(loaded.tensors[name], delta.tensors[name])
    assert loaded.concepts == [9] and loaded.method == "test" and loaded.hyperparameters == {"seed": 0}
    assert loaded.metrics == {"rate": 0.0} and loaded.metadata["base_model"] == "tiny"
    assert loaded.metadata["format_version"] == str(FORMAT_VERSION) and loaded.metadata["created"]
    assert loaded.metadata["base_model_hash"] == base_model_hash(pipeline.unet)
    assert [p.name for p in path.parent.iterdir()] == ["digit-9.safetensors"]  # no temp file left behind


def test_fp16_is_the_default_and_small(pipeline, tmp_path):
    delta = make_delta(pipeline.unet, 0)
    half = ConceptDelta.load(delta.save(tmp_path / "half.safetensors"))
    full_size = delta.save(tmp_path / "full.safetensors", dtype=torch.float32).stat().st_size
    assert (tmp_path / "half.safetensors").stat().st_size < full_size - 1.9 * delta.num_parameters()
    torch.testing.assert_close(half.tensors[KEY], delta.tensors[KEY], rtol=1e-3, atol=1e-3)
    assert half.tensors[KEY].dtype == torch.float32


def test_composition_is_additive_and_scales(pipeline):
    unet = pipeline.unet
    a, b = make_delta(unet, 1), make_delta(unet, 2, names=(KEY,))
    base = state(unet)
    composed = compose_parameters(unet, [(a, 0.5), (b, -2.0)])
    assert set(composed) == {KEY, VALUE}
    torch.testing.assert_close(composed[KEY], base[KEY] + 0.5 * a.tensors[KEY] - 2.0 * b.tensors[KEY])
    torch.testing.assert_close(composed[VALUE], base[VALUE] + 0.5 * a.tensors[VALUE])
    assert torch.equal(compose_parameters(unet, [(a, 0.0)])[KEY], base[KEY])
    assert torch.equal(compose_parameters(unet, [a])[KEY], compose_parameters(unet, [(a, 1.0)])[KEY])


def test_apply_then_remove_restores_bitwise(pipeline):
    base, before = state(pipeline.unet), sample(pipeline)
    a, b = make_delta(pipeline.unet, 1), make_delta(pipeline.unet, 2)
    apply_deltas(pipeline, [(a, 0.7)])
    apply_deltas(pipeline, [b])  # stacks on the first
    expected = compose_parameters(tiny_pipeline().unet, [(a, 0.7), b])
    torch.testing.assert_close(dict(pipeline.unet.named_parameters())[KEY].detach(), expected[KEY])
    assert not torch.equal(sample(pipeline), before)
    remove_deltas(pipeline)
    assert all(torch.equal(p, base[n]) for n, p in pipeline.unet.named_parameters())
    assert torch.equal(sample(pipeline), before)
    remove_deltas(pipeline)  # nothing applied: a no-op


def test_context_manager_and_unet_parameters_agree(pipeline):
    delta = make_delta(pipeline.unet, 3)
    functional = sample(pipeline, unet_parameters=compose_parameters(pipeline.unet, [delta]))
    with deltas_applied(pipeline, [delta]) as edited:
        in_place = sample(edited)
    assert torch.equal(functional, in_place)
    assert torch.equal(sample(pipeline), sample(tiny_pipeline()))


def test_fuse_gives_a_standalone_copy(pipeline, tmp_path):
    delta = make_delta(pipeline.unet, 4)
    fused = fuse(pipeline, [(delta, 0.5)])
    composed = compose_parameters(pipeline.unet, [(delta, 0.5)])
    assert torch.equal(sample(fused), sample(pipeline, unet_parameters=composed))
    assert torch.equal(sample(pipeline), sample(tiny_pipeline()))  # the original is untouched
    fused.save_pretrained(tmp_path / "fused")
    reloaded = type(pipeline).from_pretrained(tmp_path / "fused")
    assert torch.equal(sample(reloaded), sample(fused))


def test_refuses_a_delta_for_another_base_model(pipeline):
    other = make_delta(tiny_pipeline(seed=1).unet, 0)
    with pytest.raises(ValueError, match="another base model"):
        compose_parameters(pipeline.unet, [other])
    with pytest.raises(ValueError, match="another base model"):
        apply_deltas(pipeline, [other])
    assert torch.equal(sample(pipeline), sample(tiny_pipeline()))  # nothing was half-applied


def test_refuses_unknown_names_and_wrong_shapes(pipeline):
    unknown = make_delta(pipeline.unet, 0)
    unknown.tensors["unet.no_such.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="does not have"):
        compose_parameters(pipeline.unet, [unknown])
    wrong = make_delta(pipeline.unet, 0)
    wrong.tensors[KEY] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape"):
        compose_parameters(pipeline.unet, [wrong])
    with pytest.raises(ValueError, match="finite"):
        compose_parameters(pipeline.unet, [(make_delta(pipeline.unet, 0), float("nan"))])


def test_refuses_non_finite_values(pipeline, tmp_path):
    delta = make_delta(pipeline.unet, 0)
    delta.tensors[KEY][0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        compose_parameters(pipeline.unet, [delta])
    with pytest.raises(ValueError, match="non-finite"):
        delta.save(tmp_path / "bad.safetensors")
    from safetensors.torch import save_file

    save_file({KEY: delta.tensors[KEY]}, tmp_path / "nan.safetensors", metadata=delta.metadata)
    with pytest.raises(ValueError, match="non-finite"):
        ConceptDelta.load(tmp_path / "nan.safetensors")


def test_refuses_truncated_and_foreign_files(pipeline, tmp_path):
    path = make_delta(pipeline.unet, 0).save(tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a valid safetensors"):
        ConceptDelta.load(truncated)
    text = tmp_path / "text.safetensors"
    text.write_text("not a tensor file")
    with pytest.raises(ValueError, match="not a valid safetensors"):
        ConceptDelta.load(text)
    from safetensors.torch import save_file

    save_file({KEY: torch.zeros(16, 16)}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="lacks metadata"):
        ConceptDelta.load(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        ConceptDelta.load(tmp_path / "missing.safetensors")


def test_refuses_a_newer_format_version(pipeline, tmp_path):
    delta = make_delta(pipeline.unet, 0)
    delta.metadata["format_version"] = str(FORMAT_VERSION + 1)
    from safetensors.torch import save_file

    save_file(dict(delta.tensors), tmp_path / "future.safetensors", metadata=delta.metadata)
    with pytest.raises(ValueError, match="newer"):
        ConceptDelta.load(tmp_path / "future.safetensors")
    assert json.loads(make_delta(pipeline.unet, 0).metadata["concepts"]) == [9]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("format_version", "-3", "versions start at 1"),
        ("concepts", "9", "'concepts' must be a JSON list"),
        ("concepts", "[]", "'concepts' must list"),
        ("concepts", '["nine"]', "'concepts' must list"),
        ("concepts", "[9", "not valid JSON"),
        ("metrics", "[1]", "'metrics' must be a JSON dict"),
        ("interactions", "[]", "'interactions' must be a JSON dict"),
        ("hyperparameters", '{"anchors": {"9": []}}', "'anchors' must map"),
        ("hyperparameters", '{"anchors": [4]}', "'anchors' must map"),
    ],
)
def test_refuses_malformed_metadata(pipeline, tmp_path, key, value, message):
    """Metadata the composition reads is checked on load, so a bad file fails there with what is wrong."""
    delta = make_delta(pipeline.unet, 0)
    delta.metadata[key] = value
    from safetensors.torch import save_file

    save_file(dict(delta.tensors), tmp_path / "bad.safetensors", metadata=delta.metadata)
    with pytest.raises(ValueError, match=message):
        ConceptDelta.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=message):
        compose_parameters(pipeline.unet, [delta])


def test_refuses_anchors_outside_the_models_labels(pipeline):
    anchored = make_delta(pipeline.unet, 0, concepts=(1,))
    anchored.metadata["hyperparameters"] = json.dumps({"anchors": {"42": [1]}})
    with pytest.raises(ValueError, match="labels are 0..9"):
        compose_parameters(pipeline.unet, [anchored, make_delta(pipeline.unet, 1, concepts=(1,))])


def test_composing_on_top_of_in_place_deltas_is_refused(pipeline):
    """Per-call weights over a UNet with deltas applied in place would mix the two sets: refused, clearly."""
    delta = make_delta(pipeline.unet, 0)
    with deltas_applied(pipeline, [delta]):
        with pytest.raises(ValueError, match="applied in place"):
            compose_parameters(pipeline.unet, [delta])
        assert base_hash_of(pipeline) == base_model_hash(tiny_pipeline().unet)
    assert torch.equal(
        sample(pipeline, unet_parameters=compose_parameters(pipeline.unet, [delta])), sample(fuse(pipeline, [delta]))
    )


def run_threads(function, arguments) -> None:
    errors = []

    def guarded(argument):
        try:
            function(argument)
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(argument,)) for argument in arguments]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors


def test_concurrent_requests_never_mix_weights(pipeline):
    """Threads sampling with different deltas at once get exactly what they get alone: through a fused copy
    per request (shares nothing) and through ``deltas_applied`` (which takes turns on the pipeline)."""
    settings = {index: [(make_delta(pipeline.unet, index), 1.0)] if index else [] for index in range(4)}
    expected = {i: sample(pipeline, unet_parameters=compose_parameters(pipeline.unet, d)) for i, d in settings.items()}
    results = {}

    def fused(index: int) -> None:
        for repeat in range(3):
            results[index, "fused", repeat] = sample(fuse(pipeline, settings[index]))

    def in_place(index: int) -> None:
        for repeat in range(3):
            with deltas_applied(pipeline, settings[index]) as edited:
                results[index, "in_place", repeat] = sample(edited)

    run_threads(fused, settings)
    run_threads(in_place, settings)
    assert len(results) == 24
    for (index, _, _), images in results.items():
        assert torch.equal(images, expected[index])
