"""On-policy single rounds: corrections of one digit's null-label edit, then refitting the pair terms it invalidated."""

import argparse
import copy
import functools
import json

import pytest
import torch

from d3pm_hub.cards import delta_card
from d3pm_hub.deltas import ConceptDelta, compose_parameters
from d3pm_hub.erasure import add_erase_arguments, interactions, refine_singles, run_erase, train_pair_interactions
from d3pm_hub.erasure.anchors import context_token_table
from d3pm_hub.erasure.common import frozen_copy
from d3pm_hub.erasure.on_policy import RoundSettings, fit_corrections, null_target_settings

from .conftest import null_target_mismatch, run_erase_script

SINGLE_SETTINGS = dict(rounds=1, steps=60, learning_rate=1e-2, batch_size=8, trajectories=4, eval_trajectories=2)


@pytest.fixture(scope="module")
def refined_seven(trained, paired) -> tuple[list[ConceptDelta], dict[str, list[float]]]:
    return refine_singles(trained, [paired[0][1]], **SINGLE_SETTINGS)


def compose(pipeline, deltas) -> dict[str, torch.Tensor]:
    return compose_parameters(pipeline.unet, deltas)


def test_a_single_round_brings_the_null_label_closer_to_its_target(trained, singles, paired, refined_seven):
    (seven,), kl = refined_seven
    assert set(kl) == {"7"} and kl["7"][1] < kl["7"][0] and seven.metrics["single_kl"] == kl["7"]
    before = null_target_mismatch(trained, compose(trained, [singles[1]]), [7])
    assert null_target_mismatch(trained, compose(trained, [seven]), [7]) < before
    record = seven.hyperparameters["single_rounds"]
    assert record["rounds"] == 1 and record["steps"] == 60 and record["seconds"] > 0
    assert not seven.interactions and "interactions" not in seven.metadata  # its pair terms no longer apply
    assert seven.hyperparameters["pair_terms"] == paired[0][1].hyperparameters["pair_terms"]  # for refitting them
    card = str(delta_card(seven, "deltas/separable/digit-7.safetensors"))
    assert "ran 1 on-policy round(s) on its own" in card and "single_kl" in card


def test_a_single_round_moves_only_the_null_label_tokens(trained, singles, refined_seven):
    (seven,), _ = refined_seven
    _, tokens = context_token_table(dict(trained.unet.named_parameters()))
    n = trained.unet.config.num_label_tokens
    null = slice(trained.unet.null_label * n, (trained.unet.null_label + 1) * n)
    old = compose(trained, [singles[1]])
    moved = 0.0
    for name, value in compose(trained, [seven]).items():
        change = (value - old[name]).double() @ tokens.T  # (out, tokens)
        assert change[:, : null.start].abs().max() < 1e-6 and change[:, null.stop :].abs().max() < 1e-6
        moved = max(moved, change[:, null].abs().max().item())
    assert moved > 1e-3


def test_a_round_without_decoupling_also_edits_the_shared_tokens_or_the_whole_network(trained, singles):
    settings = RoundSettings(steps=20, learning_rate=1e-2, trajectories=2, eval_trajectories=1, batch_size=4)
    target = null_target_settings([singles[1]])
    fit = functools.partial(fit_corrections, trained, frozen_copy(trained), [[singles[1]]], [[singles[1]]], settings)
    (free,), _, _ = fit(target, parameter_set="context", decouple=False)
    _, tokens = context_token_table(dict(trained.unet.named_parameters()))
    n, shared = trained.unet.config.num_label_tokens, trained.unet.config.num_shared_tokens
    assert n * (trained.unet.null_label + 1) + shared == tokens.shape[0]  # labels' tokens, then the shared ones
    changes = [value.double() @ tokens.T for value in free.values()]  # (out, tokens): the last ones are shared
    assert max(change[:, -shared:].abs().max().item() for change in changes) > 1e-3
    (whole,), kl, _ = fit(target, parameter_set="full", decouple=False)
    assert any(".attn1." in name or ".conv" in name for name in whole) and len(kl[0]) == 2
    with pytest.raises(ValueError, match="Only 'context' edits can be decoupled"):
        fit(target, parameter_set="full")
    (low,), _, _ = fit(target, parameter_set="full", decouple=False, rank=1)  # projected to rank 1 after each step
    assert all(torch.linalg.matrix_rank(value.reshape(len(value), -1), rtol=1e-4) <= 1 for value in low.values())
    assert max(value.abs().max().item() for value in low.values()) > 1e-4
    with pytest.raises(ValueError, match="already confined to the null label's tokens"):
        fit(target, rank=1)


def test_more_single_rounds_continue_the_seeds_and_refuse_mixed_histories(trained, singles, refined_seven):
    (seven,), _ = refined_seven
    (again,), _ = refine_singles(trained, [seven], **SINGLE_SETTINGS)
    assert again.hyperparameters["single_rounds"]["rounds"] == 2
    assert any(not torch.equal(again.tensors[name], value) for name, value in seven.tensors.items())
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        refine_singles(trained, [seven], **SINGLE_SETTINGS | {"rounds": 0})
    with pytest.raises(ValueError, match="as many single rounds before, got \\[0, 1\\]"):
        refine_singles(trained, [singles[0], seven], **SINGLE_SETTINGS)
    naive = copy.deepcopy(singles[0])
    naive.metadata["method"] = "naive"
    with pytest.raises(ValueError, match="single-digit 'separable' deltas"):
        refine_singles(trained, [naive], **SINGLE_SETTINGS)


def test_completing_refits_only_the_pairs_whose_term_went_stale(trained, paired, refined_seven):
    deltas, _ = paired
    (seven,), _ = refined_seven
    completed, kl = train_pair_interactions(trained, [deltas[0], seven, deltas[2]], complete=True)
    assert set(kl) == {"4+7", "7+9"} and all(after < before for before, after in kl.values())
    for name, change in deltas[0].interactions["9"].items():  # 4+9 still applied: kept as it was
        assert torch.equal(completed[0].interactions["9"][name], change)
    for name, change in deltas[0].interactions["7"].items():  # 4+7 fitted anew against the refined 7
        assert not torch.allclose(completed[0].interactions["7"][name], change)
        torch.testing.assert_close(completed[0].interactions["7"][name], completed[1].interactions["4"][name])
    recorded = completed[1].hyperparameters["pair_terms"]
    assert recorded | {"seconds": 0} == deltas[1].hyperparameters["pair_terms"] | {"seconds": 0}
    assert recorded["seconds"] > deltas[1].hyperparameters["pair_terms"]["seconds"]
    assert completed[0].metrics["pair_kl"]["4+9"] == deltas[0].metrics["pair_kl"]["4+9"]
    digits = [4, 7]
    stale = null_target_mismatch(trained, compose(trained, [deltas[0], seven]), digits)
    assert null_target_mismatch(trained, compose(trained, completed[:2]), digits) < stale
    again, nothing = train_pair_interactions(trained, completed, complete=True)  # nothing left to fit
    assert nothing == {} and all(
        a.interactions.keys() == b.interactions.keys() for a, b in zip(again, completed, strict=True)
    )
    refined, _ = train_pair_interactions(
        trained, completed, refine=True, rounds=1, refine_steps=30, refine_trajectories=2
    )
    assert refined[0].hyperparameters["pair_terms"]["rounds"] == 2


def test_completing_replays_each_recorded_rounds_target(trained, stronger, monkeypatch):
    (seven,), _ = refine_singles(trained, [stronger[1]], **SINGLE_SETTINGS)
    betas, fit_pair_round = [], interactions.fit_pair_round
    monkeypatch.setattr(
        interactions, "fit_pair_round", lambda *args: betas.append(args[-2]["null_alpha"]) or fit_pair_round(*args)
    )
    completed, kl = train_pair_interactions(trained, [stronger[0], seven, stronger[2]], complete=True)
    assert betas == [1.0, 3.0] and set(kl) == {"4+7", "7+9"}
    assert completed[1].hyperparameters["pair_terms"]["null_alphas"] == [1.0, 3.0]


def test_completing_replays_targeted_rounds_of_the_stale_pairs(trained, targeted, monkeypatch):
    chosen, _ = targeted
    (four,), _ = refine_singles(trained, [chosen[0]], **SINGLE_SETTINGS)
    rounds, fit_pair_round = [], interactions.fit_pair_round
    monkeypatch.setattr(
        interactions,
        "fit_pair_round",
        lambda *args: rounds.append((len(args[3]), args[-2]["null_alpha"])) or fit_pair_round(*args),
    )
    completed, kl = train_pair_interactions(trained, [four, *chosen[1:]], complete=True)
    assert rounds == [(2, 1.0), (1, 3.0)] and set(kl) == {"4+7", "4+9"}  # 4+9's targeted round after round 1
    assert completed[0].hyperparameters["pair_terms"]["targeted"] == chosen[0].hyperparameters["pair_terms"]["targeted"]


def test_completing_and_refining_refuse_what_they_cannot_do(trained, singles, paired, refined_seven):
    deltas, _ = paired
    (seven,), _ = refined_seven
    with pytest.raises(ValueError, match="Fit the missing ones first"):
        train_pair_interactions(trained, [deltas[0], seven, deltas[2]], refine=True)
    with pytest.raises(ValueError, match="terms come from one run"):
        train_pair_interactions(trained, singles, complete=True)
    other = copy.deepcopy(deltas[2])
    other.metadata["hyperparameters"] = json.dumps(
        other.hyperparameters | {"pair_terms": other.hyperparameters["pair_terms"] | {"steps": 7}}
    )
    with pytest.raises(ValueError, match="terms come from one run"):
        train_pair_interactions(trained, [deltas[0], seven, other], complete=True)
    with pytest.raises(ValueError, match="choose one"):
        train_pair_interactions(trained, deltas, refine=True, complete=True)


def test_erase_script_runs_single_rounds_then_completes_the_pair_terms(trained, paired, tmp_path):
    for delta in paired[0]:
        delta.save(tmp_path / "deltas" / f"digit-{delta.concepts[0]}.safetensors")
    folder = str(tmp_path / "deltas")
    four = ConceptDelta.load(tmp_path / "deltas" / "digit-4.safetensors")
    settings = ["rounds=1", "steps=3", "trajectories=1", "eval_trajectories=1", "batch_size=4"]
    single = ["--method", "separable", "--digits", "7", "--single-rounds", folder, "--set", *settings]
    run_erase_script(trained, tmp_path, [], *single)
    seven = ConceptDelta.load(tmp_path / "deltas" / "digit-7.safetensors")
    assert seven.hyperparameters["single_rounds"]["steps"] == 3 and not seven.interactions
    complete = ["--method", "separable", "--digits", "4", "7", "9", "--pair-terms", folder, "--complete"]
    run_erase_script(trained, tmp_path, [], *complete)
    written = {d: ConceptDelta.load(tmp_path / "deltas" / f"digit-{d}.safetensors") for d in (4, 7, 9)}
    assert set(written[7].interactions) == {"4", "9"}
    assert all(torch.equal(written[4].interactions["9"][n], v) for n, v in four.interactions["9"].items())
    parser = argparse.ArgumentParser()
    add_erase_arguments(parser)
    base = ["--method", "separable", "--digits", "4", "7", "--model", str(tmp_path / "base")]
    with pytest.raises(ValueError, match="--refine and --complete work on existing pair terms"):
        run_erase(parser.parse_args([*base, "--complete"]))
    with pytest.raises(ValueError, match="Run --single-rounds first"):
        run_erase(parser.parse_args([*base, "--single-rounds", folder, "--pair-terms", folder]))
