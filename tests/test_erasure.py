"""Erasure methods on a tiny trained model: each lowers the erased digit; SepME is decoupled and composes exactly.

The tiny model cannot draw digits a classifier would read, so efficacy is measured by a fast proxy grounded in
the model itself: the *label evidence* of digit d, E[CE(x0 | x_t, ∅) − CE(x0 | x_t, d)] in nats per pixel over
real images of d (same x_t and t for both labels). A trained model explains its digit better under its own
label (evidence > 0); erasing d removes that advantage (≈ 0 when d behaves like the null label, < 0 when it
is guided away from d). The benchmark measures the real rates on the shipped model.
"""

import json
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from d3pm_hub import D3PMPipeline
from d3pm_hub.cards import delta_card
from d3pm_hub.deltas import ConceptDelta, compose_parameters
from d3pm_hub.erasure import (
    METHODS,
    InferenceTimeErasurePipeline,
    attacked_parameters,
    concept_inversion_attack,
    decoupling_projector,
    erase_closed_form,
    erase_separable,
    erase_separable_jointly,
    erase_sepme,
)
from d3pm_hub.erasure.anchors import anchors_of, context_token_table, rank_anchors
from d3pm_hub.erasure.common import DigitSampler, guide_away, optimise_increment, select_parameters
from d3pm_hub.erasure.posterior import class_posterior, null_label_target

from .conftest import REPO, null_target_mismatch, run_erase_script, run_on_two_processes, tiny_pipeline

FAST_GRADIENT = dict(steps=20, learning_rate=1e-2, batch_size=8)


@torch.no_grad()
def logits(pipeline, labels, parameters=None, seed=0, digit=9, count=32):
    """x0 logits for real images of ``digit`` noised at t ~ U{1..T}, under each of ``labels``."""
    generator = torch.Generator().manual_seed(seed)
    sampler = DigitSampler.for_digits(pipeline.scheduler, [digit])
    x0, x_t, t, _ = sampler.draw(pipeline.scheduler, count, generator, "cpu")
    outputs = []
    for label in labels:
        args = (x_t, t, torch.full((count,), label))
        unet = pipeline.unet
        outputs.append(unet(*args) if parameters is None else torch.func.functional_call(unet, parameters, args))
    return x0, outputs


def evidence(pipeline, digit=9, parameters=None) -> float:
    """Label evidence of ``digit`` (nats per pixel): CE under the null label minus CE under the digit's label."""
    x0, (cond, null) = logits(pipeline, [digit, 10], parameters, digit=digit)
    return (F.cross_entropy(null, x0[:, 0]) - F.cross_entropy(cond, x0[:, 0])).item()


def test_the_fixture_model_is_conditional(trained):
    assert evidence(trained) > 0.003


def test_closed_form_maps_the_erased_label_onto_null_and_keeps_the_others(trained):
    delta = erase_closed_form(trained, [9], ridge=1e-4)
    assert set(delta.tensors) == set(select_parameters(trained.unet, "context"))
    parameters = compose_parameters(trained.unet, [delta])
    assert abs(evidence(trained, 9, parameters)) < 0.1 * evidence(trained)
    _, base = logits(trained, [4, 7, 10])
    _, edited = logits(trained, [4, 7, 10], parameters)
    for before, after in zip(base, edited, strict=True):
        torch.testing.assert_close(after, before, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("method", ["esd-x", "esd-u", "esd-full", "esd-x-kl", "esd-u-preserve"])
def test_esd_variants_lower_the_erased_digit(trained, method):
    delta = METHODS[method](trained, [9], alpha=1.0, **FAST_GRADIENT)
    assert delta.method == method and delta.concepts == [9]
    after = evidence(trained, 9, compose_parameters(trained.unet, [delta]))
    assert after < 0.5 * evidence(trained)


def test_preservation_term_keeps_other_labels_closer_to_the_base(trained):
    _, base = logits(trained, [7, 10], digit=7)
    changes = {}
    for method in ("esd-u", "esd-u-preserve"):
        delta = METHODS[method](trained, [9], alpha=1.0, **FAST_GRADIENT)
        _, edited = logits(trained, [7, 10], compose_parameters(trained.unet, [delta]), digit=7)
        changes[method] = sum((after - before).abs().mean().item() for after, before in zip(edited, base, strict=True))
    assert changes["esd-u-preserve"] < changes["esd-u"]


def test_naive_fine_tunes_every_weight(trained):
    """The floor: it runs and edits everything; its (lack of) efficacy is measured by the benchmark."""
    delta = METHODS["naive"](trained, [9], steps=3, batch_size=8)
    assert set(delta.tensors) == {name for name, _ in trained.unet.named_parameters()}
    assert all(torch.isfinite(t).all() for t in delta.tensors.values())


@pytest.fixture(scope="module")
def sepme_deltas(trained) -> dict[int, ConceptDelta]:
    return {digit: erase_sepme(trained, [digit], steps=40, learning_rate=1e-2, batch_size=8) for digit in (9, 4)}


def test_sepme_lowers_the_erased_digit(trained, sepme_deltas):
    parameters = compose_parameters(trained.unet, [sepme_deltas[9]])
    assert evidence(trained, 9, parameters) < 0.5 * evidence(trained)
    assert sepme_deltas[9].metrics["steps_run"] <= 40


def test_sepme_increments_leave_other_labels_unchanged(trained, sepme_deltas):
    parameters = compose_parameters(trained.unet, [sepme_deltas[9]])
    others = [0, 4, 7, 10]
    _, base = logits(trained, others)
    _, edited = logits(trained, others, parameters)
    for before, after in zip(base, edited, strict=True):
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_sepme_pairs_compose_additively_and_restore_exactly(trained, sepme_deltas):
    alone = {d: compose_parameters(trained.unet, [sepme_deltas[d]]) for d in (9, 4)}
    both = compose_parameters(trained.unet, [sepme_deltas[9], sepme_deltas[4]])
    for digit in (9, 4):
        _, (single,) = logits(trained, [digit], alone[digit], digit=digit)
        _, (paired,) = logits(trained, [digit], both, digit=digit)
        torch.testing.assert_close(paired, single, atol=1e-5, rtol=1e-5)
    assert evidence(trained, 4, both) < 0.5 * evidence(trained, 4)
    # Restore 4 (drop its delta): 4 comes back exactly, 9 stays erased.
    _, (restored,) = logits(trained, [4], alone[9], digit=4)
    _, (base,) = logits(trained, [4], digit=4)
    torch.testing.assert_close(restored, base, atol=1e-5, rtol=1e-5)
    half = compose_parameters(trained.unet, [(sepme_deltas[9], 0.5)])
    assert evidence(trained, 9, both) < evidence(trained, 9, half) < evidence(trained)


def test_decoupling_needs_room_in_the_context_space():
    with pytest.raises(ValueError, match="no decoupled edit"):
        decoupling_projector(tiny_pipeline().unet, [9])  # D = 16 < 22 preserved tokens


def test_inference_time_switching_and_negative_guidance(trained):
    switched = InferenceTimeErasurePipeline.wrap(trained, [9])
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    erased = switched([9, 3], num_inference_steps=3, output_type="pt", generator=generator()).images
    reference = trained([10, 3], num_inference_steps=3, output_type="pt", generator=generator()).images
    assert torch.equal(erased, reference)
    negative = InferenceTimeErasurePipeline.wrap(trained, [9], negative_scale=2.0)
    sampler = DigitSampler.for_digits(trained.scheduler, [9])
    x0 = sampler.images[:32]
    t = 25
    x_t = trained.scheduler.add_noise(x0, torch.full((32,), t), torch.Generator().manual_seed(0))
    labels = torch.full((32,), 9)
    with torch.no_grad():
        plain = F.nll_loss(switched.x0_log_probs(x_t, t, labels, 2.0).float(), x0[:, 0])
        guided = F.nll_loss(negative.x0_log_probs(x_t, t, labels, 2.0).float(), x0[:, 0])
    assert guided > plain  # real 9s are less likely under negative guidance


def test_concept_inversion_attack_recovers_evidence(trained):
    delta = erase_closed_form(trained, [9])
    erased = compose_parameters(trained.unet, [delta])
    result = concept_inversion_attack(trained, 9, budgets=(5, 30), unet_parameters=erased, learning_rate=0.05)
    assert set(result.tokens) == {5, 30} and result.tokens[30].shape == (2, 32)
    attacked = attacked_parameters(trained, 9, result.tokens[30], erased)
    assert evidence(trained, 9, attacked) > evidence(trained, 9, erased)


def test_early_stopping_ends_every_process_at_the_same_step(tmp_path):
    """Two DDP processes over gloo whose concept losses disagree still stop together (else one hangs or dies)."""
    stdout = run_on_two_processes("tests.distributed_early_stopping", tmp_path / "torchrun.log")
    steps = sorted(re.findall(r"rank (\d) steps (\d+)", stdout))
    assert [rank for rank, _ in steps] == ["0", "1"] and steps[0][1] == steps[1][1], stdout
    assert int(steps[0][1]) > 4  # process 0 alone would have stopped after 4 steps


def test_exact_edits_refuse_context_tokens_that_are_not_independent():
    narrow = tiny_pipeline()  # cross_attention_dim 16 < the 24 context tokens
    with pytest.raises(ValueError, match="context tokens span only 16 dimensions"):
        erase_closed_form(narrow, [9])
    assert erase_closed_form(narrow, [9], ridge=0.01).concepts == [9]  # the ridge solution needs no independence


def test_separable_refuses_a_delta_of_every_digit_before_training(trained):
    with pytest.raises(ValueError, match="leaves no digit to anchor"):
        erase_separable(trained, list(range(10)), steps=1)


def test_erase_script_writes_a_loadable_delta(trained, tmp_path):
    trained.save_pretrained(tmp_path / "base")
    command = [sys.executable, str(REPO / "training" / "erase.py"), "--method", "closed-form", "--digits", "9", "4"]
    command += ["--each", "--model", str(tmp_path / "base"), "--output-dir", str(tmp_path / "deltas")]
    command += ["--set", "ridge=0.001"]
    subprocess.run(command, check=True, capture_output=True, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    for digit in (9, 4):
        delta = ConceptDelta.load(tmp_path / "deltas" / f"digit-{digit}.safetensors")
        assert delta.concepts == [digit] and delta.hyperparameters["ridge"] == 0.001
        compose_parameters(D3PMPipeline.from_pretrained(tmp_path / "base").unet, [delta])


@pytest.mark.parametrize(
    ("launcher", "method", "settings"),
    [
        ([], "naive", ["steps=2", "batch_size=4"]),
        ([], "esd-u-preserve", ["steps=2", "batch_size=4"]),
        ([], "sepme", ["steps=2", "batch_size=4"]),
        ([], "separable", ["steps=2", "batch_size=4"]),
        (["accelerate", "launch", "--cpu", "--num_processes", "1"], "separable", ["steps=2", "batch_size=4"]),
    ],
)
def test_every_weight_editing_family_runs_from_the_erase_script(trained, tmp_path, launcher, method, settings):
    run_erase_script(trained, tmp_path, launcher, "--method", method, "--digits", "9", "--set", *settings)
    delta = ConceptDelta.load(tmp_path / "deltas" / "digit-9.safetensors")
    assert delta.method == method and delta.concepts == [9] and delta.hyperparameters["steps"] == 2
    assert delta.metadata["base_model"] == "base"  # the folder's name, not this machine's absolute path


@pytest.mark.parametrize("launcher", [[], ["accelerate", "launch", "--cpu", "--num_processes", "1"]])
def test_inference_time_erasure_runs_from_the_erase_script(trained, tmp_path, launcher):
    arguments = ["--method", "inference-negative", "--digits", "9", "--set", "negative_scale=2", "combine=mixture"]
    run_erase_script(trained, tmp_path, launcher, *arguments)
    path = tmp_path / "deltas" / "digit-9.json"
    loaded = InferenceTimeErasurePipeline.load_erasure(trained, path)
    assert loaded.erased_digits == (9,) and loaded.negative_scale == 2.0 and loaded.combine == "mixture"
    assert loaded.method == "inference-negative"
    direct = InferenceTimeErasurePipeline.wrap(trained, [9], negative_scale=2.0, combine="mixture")
    sample, t, labels = torch.randint(0, 8, (4, 1, 28, 28)), torch.full((4,), 30), torch.tensor([9, 4, 10, 9])
    torch.testing.assert_close(loaded.x0_log_probs(sample, t, labels, 1.0), direct.x0_log_probs(sample, t, labels, 1.0))
    weighted = InferenceTimeErasurePipeline.wrap(trained, [4, 9], negative_scale=2.0, weights=[0.5, 1.0])
    reloaded = InferenceTimeErasurePipeline.load_erasure(trained, weighted.save_erasure(tmp_path / "weighted.json"))
    assert reloaded.weights == [0.5, 1.0]
    torch.testing.assert_close(
        reloaded.x0_log_probs(sample, t, labels, 1.0), weighted.x0_log_probs(sample, t, labels, 1.0)
    )
    config = json.loads(path.read_text())
    other = tiny_pipeline()
    with pytest.raises(ValueError, match="another base model"):
        InferenceTimeErasurePipeline.load_erasure(other, path)
    path.write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        InferenceTimeErasurePipeline.load_erasure(trained, path)
    path.write_bytes(b"\x00safetensors?")
    with pytest.raises(ValueError, match="not an inference-time erasure config"):
        InferenceTimeErasurePipeline.load_erasure(trained, path)


def test_exact_closed_form_is_decoupled_and_maps_onto_null(trained):
    delta = erase_closed_form(trained, [9])  # ridge 0: exact minimum-norm solution
    parameters = compose_parameters(trained.unet, [delta])
    _, (nine, null) = logits(trained, [9, 10], parameters)
    torch.testing.assert_close(nine, null, atol=1e-4, rtol=1e-4)
    _, base = logits(trained, [0, 4, 10])
    _, edited = logits(trained, [0, 4, 10], parameters)
    for before, after in zip(base, edited, strict=True):
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_closed_form_null_edit_adds_across_digits(trained):
    """With null_alpha the null label's keys/values move; two digits' null edits add exactly in weight space."""
    deltas = {d: erase_closed_form(trained, [d], alpha=1.0, null_alpha=0.5) for d in (9, 4)}
    joint = erase_closed_form(trained, [9, 4], alpha=1.0, null_alpha=0.5)
    both = compose_parameters(trained.unet, list(deltas.values()))
    together = compose_parameters(trained.unet, [joint])
    _, (null_base,) = logits(trained, [10])
    _, (null_pair, nine_pair, four_pair, seven_pair) = logits(trained, [10, 9, 4, 7], both)
    _, (null_joint, nine_joint, four_joint, seven_joint) = logits(trained, [10, 9, 4, 7], together)
    assert (null_pair - null_base).abs().max() > 1e-3
    for pair, single in ((null_pair, null_joint), (nine_pair, nine_joint), (four_pair, four_joint)):
        torch.testing.assert_close(pair, single, atol=1e-4, rtol=1e-4)
    _, (seven_base,) = logits(trained, [7])
    torch.testing.assert_close(seven_pair, seven_base, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def separable_deltas(trained) -> dict[int, ConceptDelta]:
    return {d: METHODS["separable"](trained, [d], steps=20, learning_rate=1e-2, batch_size=8) for d in (9, 4)}


def fit(pipeline, digit=9, label=10, parameters=None) -> float:
    """How well ``label`` explains real ``digit``s: −CE(x0 | x_t, label) in nats per pixel (higher is better)."""
    x0, (output,) = logits(pipeline, [label], parameters, digit=digit)
    return -F.cross_entropy(output, x0[:, 0]).item()


def test_separable_erases_the_label_and_the_unconditional_model(trained, separable_deltas):
    delta = separable_deltas[9]
    assert delta.method == "separable" and set(delta.tensors) == set(select_parameters(trained.unet, "context"))
    parameters = compose_parameters(trained.unet, [delta])
    assert fit(trained, 9, 9, parameters) < fit(trained, 9, 9) - 0.01  # label 9 explains real 9s worse
    assert fit(trained, 9, 10, parameters) < fit(trained, 9, 10) - 0.01  # and so does the null label


def test_separable_leaves_other_labels_exactly_and_composes(trained, separable_deltas):
    alone = compose_parameters(trained.unet, [separable_deltas[9]])
    both = compose_parameters(trained.unet, [separable_deltas[9], separable_deltas[4]])
    _, base = logits(trained, [0, 4, 7])
    _, edited = logits(trained, [0, 4, 7], alone)
    for before, after in zip(base, edited, strict=True):
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    assert fit(trained, 4, 4, both) < fit(trained, 4, 4) - 0.003
    assert fit(trained, 4, 10, both) < fit(trained, 4, 10, alone) - 0.003
    _, (seven_base,) = logits(trained, [7])
    _, (seven_both,) = logits(trained, [7], both)
    torch.testing.assert_close(seven_both, seven_base, atol=1e-5, rtol=1e-5)


def test_separable_anchor_maps_the_label_onto_the_anchor(trained):
    delta = METHODS["separable"](trained, [9], anchor=7, steps=5, learning_rate=1e-2, batch_size=8)
    _, (nine, seven) = logits(trained, [9, 7], compose_parameters(trained.unet, [delta]))
    torch.testing.assert_close(nine, seven, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="anchor"):
        METHODS["separable"](trained, [9], anchor=9, steps=1)
    with pytest.raises(ValueError, match="anchor"):
        METHODS["separable"](trained, [9], anchor="nearest", steps=1)


def test_separable_auto_anchor_is_the_digit_least_able_to_draw_the_erased_one(trained, separable_deltas):
    ranked = anchors_of(separable_deltas[9].hyperparameters)[9]
    assert sorted(ranked) == [0, 1, 2, 3, 4, 5, 6, 7, 8] and ranked == rank_anchors(trained.unet, trained.scheduler, 9)
    assert fit(trained, 9, ranked[0]) <= fit(trained, 9, ranked[-1])
    _, (nine, anchor) = logits(trained, [9, ranked[0]], compose_parameters(trained.unet, [separable_deltas[9]]))
    torch.testing.assert_close(nine, anchor, atol=1e-4, rtol=1e-4)


def test_separable_values_only_null_edit_keeps_the_null_keys(trained):
    delta = METHODS["separable"](trained, [9], null_keys=False, **FAST_GRADIENT)
    table, _ = context_token_table(dict(trained.unet.named_parameters()))
    for name, increment in delta.tensors.items():
        null_change = (increment.double() @ table[10].T).abs().max().item()
        assert (null_change < 1e-5) == (".to_k." in name), name
    anchor = anchors_of(delta.hyperparameters)[9][0]
    _, (nine, anchored) = logits(trained, [9, anchor], compose_parameters(trained.unet, [delta]))
    torch.testing.assert_close(nine, anchored, atol=1e-4, rtol=1e-4)


def test_an_erased_anchor_moves_the_label_to_the_next_anchor(trained):
    nine = METHODS["separable"](trained, [9], anchor=7, **FAST_GRADIENT)
    ranked = anchors_of(nine.hyperparameters)[9]
    seven = erase_closed_form(trained, [7])
    both = compose_parameters(trained.unet, [nine, seven])
    _, (label_nine, label_seven) = logits(trained, [9, 7], both)
    _, (next_anchor, seven_alone) = logits(trained, [ranked[1], 7], compose_parameters(trained.unet, [seven]))
    torch.testing.assert_close(label_nine, next_anchor, atol=1e-4, rtol=1e-4)  # not the base model's 7
    torch.testing.assert_close(label_seven, seven_alone, atol=1e-4, rtol=1e-4)
    half = compose_parameters(trained.unet, [(nine, 0.5), seven])  # keys/values linear in the strength
    base = dict(trained.unet.named_parameters())
    table, _ = context_token_table(base)
    for name in nine.tensors:
        weight = base[name].detach().double()
        expected = (weight @ table[9].T + weight @ table[ranked[1]].T) / 2
        torch.testing.assert_close(half[name].double() @ table[9].T, expected, atol=1e-4, rtol=1e-4)
    restored = compose_parameters(trained.unet, [nine])  # dropping 7's delta gives the plain anchor back
    _, (label_nine_alone, base_seven) = logits(trained, [9, 7], restored)
    torch.testing.assert_close(label_nine_alone, base_seven, atol=1e-4, rtol=1e-4)


def test_with_every_anchor_erased_the_label_draws_the_edited_null_label(trained):
    nine = METHODS["separable"](trained, [9], anchor=7, **FAST_GRADIENT)
    nine.metadata["hyperparameters"] = json.dumps({**nine.hyperparameters, "anchors": {"9": [7]}})
    both = compose_parameters(trained.unet, [nine, erase_closed_form(trained, [7])])
    _, (label_nine, null) = logits(trained, [9, 10], both)
    torch.testing.assert_close(label_nine, null, atol=1e-4, rtol=1e-4)


def test_class_posterior_recovers_the_mixture_weights_of_the_null_prediction():
    generator = torch.Generator().manual_seed(0)
    log_labels = torch.log_softmax(3 * torch.randn(3, 2, 4, 5, 5, generator=generator), dim=2)  # (C, B, K, H, W)
    weights = torch.tensor([[0.7, 0.1], [0.2, 0.3], [0.1, 0.6]])
    log_null = torch.logsumexp(weights.log()[..., None, None, None] + log_labels, 0)
    recovered = class_posterior(log_null, log_labels, iterations=500, pixels=25)
    torch.testing.assert_close(recovered, weights, atol=0.02, rtol=0)


def test_null_label_target_removes_the_erased_classes_from_the_mixture():
    generator = torch.Generator().manual_seed(0)
    log_labels = torch.log_softmax(torch.randn(3, 2, 4, 5, 5, generator=generator), dim=2)
    weights = torch.tensor([[0.5, 0.2], [0.3, 0.3], [0.2, 0.5]])
    log_null = torch.logsumexp(weights.log()[..., None, None, None] + log_labels, 0)
    nothing_erased = null_label_target(log_null, log_labels, weights, [])
    torch.testing.assert_close(torch.log_softmax(nothing_erased, 1), log_null)
    kept = weights[1:] / weights[1:].sum(0)
    expected = torch.logsumexp(kept.log()[..., None, None, None] + log_labels[1:], 0)
    torch.testing.assert_close(torch.log_softmax(null_label_target(log_null, log_labels, weights, [0]), 1), expected)
    sharp = null_label_target(log_null, log_labels, weights, [0], sharpness=50.0)  # γ → ∞: the likelier kept class
    torch.testing.assert_close(torch.log_softmax(sharp, 1)[0], log_labels[1, 0], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="null target base"):
        null_label_target(log_null, log_labels, weights, [0], base="prior")
    with pytest.raises(ValueError, match="class posterior"):
        null_label_target(log_null, log_labels, None, [0])


def test_separable_posterior_target_moves_the_null_label_to_the_mixture_without_the_digit(trained):
    delta = METHODS["separable"](trained, [9], null_target="posterior", null_alpha=0.0, pool_size=128, **FAST_GRADIENT)
    assert delta.hyperparameters["null_target"] == "posterior" and delta.hyperparameters["pool_size"] == 128
    target = dict(base="posterior", beta=0.0, sharpness=delta.hyperparameters["null_sharpness"])
    before = null_target_mismatch(trained, dict(trained.unet.named_parameters()), [9], **target)
    after = null_target_mismatch(trained, compose_parameters(trained.unet, [delta]), [9], **target)
    assert after < 0.5 * before
    _, base = logits(trained, [0, 4])
    _, edited = logits(trained, [0, 4], compose_parameters(trained.unet, [delta]))
    for before_logits, after_logits in zip(base, edited, strict=True):  # still decoupled
        torch.testing.assert_close(after_logits, before_logits, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def joint_deltas(trained) -> list[ConceptDelta]:
    return erase_separable_jointly(trained, [4, 7, 9], steps=90, null_alpha=1.0, learning_rate=1e-2, batch_size=8)


def test_jointly_trained_deltas_compose_in_the_null_label(trained, joint_deltas):
    four, seven, nine = joint_deltas
    assert [delta.concepts for delta in joint_deltas] == [[4], [7], [9]]
    assert nine.hyperparameters["jointly_with"] == [4, 7, 9] and nine.hyperparameters["subset_sizes"] == [1, 2]
    assert set(anchors_of(nine.hyperparameters)) == {9}
    singles = [METHODS["separable"](trained, [d], steps=45, learning_rate=1e-2, batch_size=8) for d in (4, 7)]
    base = dict(trained.unet.named_parameters())
    for delta in joint_deltas:  # each delta alone moves the null label towards its own target
        alone = compose_parameters(trained.unet, [delta])
        before = null_target_mismatch(trained, base, delta.concepts)
        assert null_target_mismatch(trained, alone, delta.concepts) < before
    joint_pair = null_target_mismatch(trained, compose_parameters(trained.unet, [four, seven]), [4, 7])
    single_pair = null_target_mismatch(trained, compose_parameters(trained.unet, singles), [4, 7])
    assert joint_pair < single_pair  # trained together, the pair's sum is closer to the pair's joint target


def test_jointly_trained_deltas_stay_decoupled(trained, joint_deltas):
    nine = compose_parameters(trained.unet, [joint_deltas[2]])
    _, base = logits(trained, [0, 4, 7])
    _, edited = logits(trained, [0, 4, 7], nine)
    for before, after in zip(base, edited, strict=True):
        torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    anchor = anchors_of(joint_deltas[2].hyperparameters)[9][0]
    _, (label_nine, anchored) = logits(trained, [9, anchor], nine)
    torch.testing.assert_close(label_nine, anchored, atol=1e-4, rtol=1e-4)
    card = str(delta_card(joint_deltas[2], "deltas/separable/digit-9.safetensors"))
    assert "trained together with the deltas of digits 4, 7 (on random subsets of 1 or 2 digits" in card


def test_joint_training_refuses_bad_subsets_and_methods_without_it(trained, tmp_path):
    with pytest.raises(ValueError, match="subset_sizes"):
        erase_separable_jointly(trained, [4, 9], subset_sizes=(1, 3), steps=1)
    trained.save_pretrained(tmp_path / "base")
    command = [sys.executable, str(REPO / "training" / "erase.py"), "--digits", "9", "4", "--jointly"]
    command += ["--model", str(tmp_path / "base"), "--output-dir", str(tmp_path / "deltas")]
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    refused = subprocess.run([*command, "--method", "esd-x"], capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and "--jointly needs a method in ['separable']" in refused.stderr
    subprocess.run([*command, "--method", "separable", "--set", "steps=3"], check=True, capture_output=True, env=env)
    for digit in (9, 4):
        delta = ConceptDelta.load(tmp_path / "deltas" / f"digit-{digit}.safetensors")
        assert delta.concepts == [digit] and delta.hyperparameters["jointly_with"] == [9, 4]


def test_negative_guidance_away_from_one_digit_or_the_mixture_of_several():
    generator = torch.Generator().manual_seed(0)
    unconditional, first, second = torch.randn(3, 2, 8, 4, 4, generator=generator).log_softmax(2)
    one = torch.stack([first])
    torch.testing.assert_close(
        guide_away(unconditional, unconditional, one, 2.0, "sum"),
        guide_away(unconditional, unconditional, one, 2.0, "mixture"),
    )
    both = torch.stack([first, second])
    summed = guide_away(unconditional, unconditional, both, 1.0, "sum")
    torch.testing.assert_close(summed, 3 * unconditional - first - second)
    mixture = guide_away(unconditional, unconditional, both, 1.0, "mixture")
    torch.testing.assert_close(mixture, 2 * unconditional - ((first.exp() + second.exp()) / 2).log())
    weighted = guide_away(unconditional, unconditional, both, 2.0, "sum", [0.5, 1.0])
    torch.testing.assert_close(weighted, 4 * unconditional - first - 2 * second)
    with pytest.raises(ValueError, match="negative guidance"):
        guide_away(unconditional, unconditional, both, 1.0, "max")
    for combine, weights in (("mixture", [0.5, 1.0]), ("sum", [0.5])):
        with pytest.raises(ValueError, match="one weight per erased digit"):
            guide_away(unconditional, unconditional, both, 1.0, combine, weights)
    with pytest.raises(ValueError, match="combine"):
        InferenceTimeErasurePipeline.wrap(tiny_pipeline(), [9], negative_scale=1.0, combine="max")
    with pytest.raises(ValueError, match="one positive weight per digit"):
        InferenceTimeErasurePipeline.wrap(tiny_pipeline(), [4, 9], negative_scale=1.0, weights=[1.0])


def test_increments_follow_a_diffusers_learning_rate_schedule(trained):
    def loss_fn(model, generator):
        size = trained.unet.config.sample_size
        logits = model(torch.zeros(2, 1, size, size, dtype=torch.long), torch.tensor([1, 1]), torch.tensor([9, 9]))
        return {"loss": logits.square().mean(), "concept": logits.square().mean()}

    names = select_parameters(trained.unet, "context")
    cosine = optimise_increment(trained.unet, names, loss_fn, 4, 1e-2, lr_schedule="cosine")
    assert [round(step["lr"], 6) for step in cosine.history] == [0.01, 0.008536, 0.005, 0.001464]
    constant = optimise_increment(trained.unet, names, loss_fn, 4, 1e-2)
    assert [step["lr"] for step in constant.history] == [0.01] * 4
    with pytest.raises(ValueError, match="is not a valid SchedulerType"):
        optimise_increment(trained.unet, names, loss_fn, 4, 1e-2, lr_schedule="sometimes")
