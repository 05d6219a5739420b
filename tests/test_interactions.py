"""Pair interaction terms: fitted per pair, stored in both partners' files, applied only to their pair's null label."""

import argparse
import copy
import json

import pytest
import torch

from d3pm_hub.cards import delta_card
from d3pm_hub.deltas import FORMAT_VERSION, ConceptDelta, compose_parameters
from d3pm_hub.erasure import add_erase_arguments, run_erase, train_pair_interactions
from d3pm_hub.erasure.anchors import context_token_table

from .conftest import PAIR_SETTINGS, REFINE_SETTINGS, null_target_mismatch, run_erase_script


def compose(pipeline, deltas) -> dict[str, torch.Tensor]:
    return compose_parameters(pipeline.unet, deltas)


def test_pair_terms_bring_every_pair_closer_to_its_target(trained, singles, paired):
    deltas, kl = paired
    assert set(kl) == {"4+7", "4+9", "7+9"} and all(after < before for before, after in kl.values())
    assert deltas[0].metrics["pair_kl"] == {"4+7": kl["4+7"], "4+9": kl["4+9"]}
    for i, j in ((0, 1), (0, 2), (1, 2)):  # on a pool of its own, not the one the terms were fitted on
        digits = deltas[i].concepts + deltas[j].concepts
        without = null_target_mismatch(trained, compose(trained, [singles[i], singles[j]]), digits)
        assert null_target_mismatch(trained, compose(trained, [deltas[i], deltas[j]]), digits) < without


def test_pair_terms_change_only_their_pairs_null_label_tokens(trained, singles, paired):
    deltas, _ = paired
    for old, new in zip(singles, deltas, strict=True):  # a delta alone is its single
        assert all(torch.equal(compose(trained, [new])[n], value) for n, value in compose(trained, [old]).items())
    with_term, without = compose(trained, deltas[:2]), compose(trained, singles[:2])
    _, tokens = context_token_table(dict(trained.unet.named_parameters()))
    n = trained.unet.config.num_label_tokens
    null = slice(trained.unet.null_label * n, (trained.unet.null_label + 1) * n)
    moved = 0.0
    for name, value in with_term.items():
        change = (value - without[name]).double() @ tokens.T  # (out, tokens): how each token's keys/values move
        assert change[:, : null.start].abs().max() < 1e-6 and change[:, null.stop :].abs().max() < 1e-6
        moved = max(moved, change[:, null].abs().max().item())
    assert moved > 1e-3


def test_pair_terms_scale_with_both_strengths_and_vanish_when_either_is_dropped(trained, singles, paired):
    deltas, _ = paired
    term = {n: v - compose(trained, singles[:2])[n] for n, v in compose(trained, deltas[:2]).items()}
    half = compose(trained, [(deltas[0], 0.5), (deltas[1], 0.4)])
    expected = compose(trained, [(singles[0], 0.5), (singles[1], 0.4)])
    for name, value in half.items():
        torch.testing.assert_close(value, expected[name] + 0.2 * term[name], atol=1e-6, rtol=1e-5)
    dropped = compose(trained, [deltas[0], (deltas[1], 0.0)])
    assert all(torch.equal(value, compose(trained, [singles[0]])[name]) for name, value in dropped.items())


def test_a_retrained_partner_gets_no_stale_term(trained, singles, paired):
    deltas, _ = paired
    retrained = copy.deepcopy(singles[1])  # digit 7 retrained alone: 4's term for 7 no longer fits
    retrained.tensors = {name: 1.01 * value for name, value in retrained.tensors.items()}
    stale = compose(trained, [deltas[0], retrained])
    expected = compose(trained, [singles[0], retrained])
    assert all(torch.equal(value, expected[name]) for name, value in stale.items())


def test_pair_terms_round_trip_through_files(trained, paired, tmp_path):
    deltas, _ = paired
    for delta in deltas:
        delta.save(tmp_path / f"digit-{delta.concepts[0]}.safetensors")
    loaded = [ConceptDelta.load(tmp_path / f"digit-{digit}.safetensors") for digit in (4, 7, 9)]
    assert loaded[0].metadata["format_version"] == str(FORMAT_VERSION) == "3"
    assert set(loaded[0].interactions) == set(json.loads(loaded[0].metadata["interactions"])) == {"7", "9"}
    for name, change in deltas[0].interactions["9"].items():
        assert change.shape == (trained.unet.get_parameter(name).shape[0], trained.unet.config.num_label_tokens)
        torch.testing.assert_close(loaded[0].interactions["9"][name], change, atol=1e-3, rtol=1e-3)
    # the float16 files still recognise each other as partners (hashes of float16-rounded increments)
    in_memory, from_files = compose(trained, deltas[:2]), compose(trained, loaded[:2])
    for name, value in from_files.items():
        torch.testing.assert_close(value, in_memory[name], atol=2e-3, rtol=1e-3)


def test_bad_pair_terms_are_refused(trained, paired, tmp_path):
    deltas, _ = paired
    wrong_shape = copy.deepcopy(deltas[0])
    name = next(iter(wrong_shape.interactions["7"]))
    wrong_shape.interactions["7"][name] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"has shape \(3, 3\), expected"):
        compose(trained, [wrong_shape, deltas[1]])
    not_finite = copy.deepcopy(deltas[0])
    not_finite.interactions["7"][name][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        not_finite.save(tmp_path / "nan.safetensors")
    unlisted = copy.deepcopy(deltas[0])
    unlisted.metadata["interactions"] = "{}"
    with pytest.raises(ValueError, match="name different partners"):
        unlisted.validate()
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_pair_training_refuses_deltas_it_cannot_pair(trained, singles):
    with pytest.raises(ValueError, match="two or more single-digit 'separable' deltas"):
        train_pair_interactions(trained, singles[:1], steps=1)
    other_target = copy.deepcopy(singles[1])
    other_target.metadata["hyperparameters"] = json.dumps(other_target.hyperparameters | {"null_alpha": 3.0})
    with pytest.raises(ValueError, match="different null-label targets"):
        train_pair_interactions(trained, [singles[0], other_target], steps=1)


def test_refining_fits_a_further_on_policy_round_on_top_of_the_terms(trained, singles, paired):
    deltas, _ = paired
    refined, kl = train_pair_interactions(trained, deltas, refine=True, **REFINE_SETTINGS)
    recorded = refined[2].hyperparameters["pair_terms"]
    assert recorded["rounds"] == 2 and recorded["steps"] == PAIR_SETTINGS["steps"] and recorded["refine_steps"] == 60
    assert all(after < before for before, after in kl.values())
    for name, change in deltas[0].interactions["9"].items():  # a correction added to the round-1 term
        assert not torch.allclose(refined[0].interactions["9"][name], change)
        torch.testing.assert_close(refined[0].interactions["9"][name], refined[2].interactions["4"][name])
    for i, j in ((0, 1), (0, 2), (1, 2)):
        digits = deltas[i].concepts + deltas[j].concepts
        without = null_target_mismatch(trained, compose(trained, [singles[i], singles[j]]), digits)
        assert null_target_mismatch(trained, compose(trained, [refined[i], refined[j]]), digits) < without
    with pytest.raises(ValueError, match="refine again with the same refine_\\* settings"):
        train_pair_interactions(trained, refined, refine=True, **REFINE_SETTINGS | {"refine_steps": 7})
    with pytest.raises(ValueError, match="Refining needs every pair's term: the delta of 4 has none"):
        train_pair_interactions(trained, singles, refine=True, **REFINE_SETTINGS)


def test_refining_to_a_stronger_pair_target_records_each_rounds_beta(trained, paired, stronger):
    deltas, _ = paired
    assert stronger[1].hyperparameters["pair_terms"]["null_alphas"] == [1.0, 3.0]
    card = str(delta_card(stronger[1], "deltas/separable/digit-7.safetensors"))
    assert "guidance away from the pair's mixture, β = 1.0, 3.0 in successive rounds" in card
    for i, j in ((0, 1), (0, 2), (1, 2)):
        digits = deltas[i].concepts + deltas[j].concepts
        weaker = null_target_mismatch(trained, compose(trained, [deltas[i], deltas[j]]), digits, beta=3.0)
        assert null_target_mismatch(trained, compose(trained, [stronger[i], stronger[j]]), digits, beta=3.0) < weaker


def test_a_targeted_round_refits_only_the_chosen_pairs_term(trained, paired, targeted):
    deltas, _ = paired
    chosen, kl = targeted
    assert set(kl) == {"4+9"} and kl["4+9"][1] < kl["4+9"][0]
    recorded = chosen[1].hyperparameters["pair_terms"]  # the run's record, in every delta
    assert recorded["rounds"] == 1 and recorded["null_alphas"] == [1.0]
    plan = dict(steps=60, learning_rate=1e-2, trajectories=4, timesteps=[15, 35], seed=2, null_alpha=3.0)
    weights = {"null_combine": "sum", "null_weights": {"4": 0.5}}
    assert recorded["targeted"] == [plan | {"pairs": ["4+9"], "after_round": 1} | weights]
    with pytest.raises(ValueError, match="'sum' for targeted rounds of chosen pairs"):
        train_pair_interactions(trained, deltas, refine=True, null_combine="sum")
    with pytest.raises(ValueError, match="pass null_combine=sum and --pairs"):
        train_pair_interactions(trained, deltas, refine=True, pairs=["4+9"], null_weights={"4": 0.5})
    with pytest.raises(ValueError, match="null_weights maps digits of these deltas \\(4, 7, 9\\)"):
        train_pair_interactions(trained, deltas, refine=True, pairs=["4+9"], null_combine="sum", null_weights={"5": 1})
    for i in (0, 2):  # 4+7 and 7+9 kept bitwise
        assert all(torch.equal(chosen[i].interactions["7"][n], v) for n, v in deltas[i].interactions["7"].items())
    target = dict(beta=3.0, combine="sum", weights=[0.5, 1.0])
    weaker = null_target_mismatch(trained, compose(trained, [deltas[0], deltas[2]]), [4, 9], **target)
    assert null_target_mismatch(trained, compose(trained, [chosen[0], chosen[2]]), [4, 9], **target) < weaker
    further = (
        "Pair 4+9 then ran a further round on its own (β = 3.0, guidance away from each digit of the pair rather "
        "than their mixture, β times 0.5 for 4, 4 trajectories per pair, states with 15 ≤ t ≤ 35)"
    )
    assert further in str(delta_card(chosen[0], "deltas/separable/digit-4.safetensors"))
    assert "further round" not in str(delta_card(chosen[1], "deltas/separable/digit-7.safetensors"))
    with pytest.raises(ValueError, match="pass refine=True"):
        train_pair_interactions(trained, deltas, pairs=["4+9"])
    with pytest.raises(ValueError, match="pairs must name pairs of these deltas \\(4\\+7, 4\\+9, 7\\+9\\)"):
        train_pair_interactions(trained, deltas, refine=True, pairs=["4+5"])
    with pytest.raises(ValueError, match="timesteps \\[200, 300\\] holds none of the sampler's timesteps"):
        train_pair_interactions(trained, deltas, refine=True, pairs=["4+9"], refine_timesteps=[200, 300])


@pytest.fixture(scope="module")
def image_path(trained, paired) -> tuple[list[ConceptDelta], dict[str, list[float]]]:
    """``paired``'s deltas after one round of the 4+9 term on the image path (every UNet weight but the label
    path, rank 2), and its KL."""
    settings = REFINE_SETTINGS | {"refine_parameters": "full", "refine_rank": 2, "refine_learning_rate": 1e-4}
    return train_pair_interactions(trained, paired[0], refine=True, pairs=["4+9"], **settings)


def test_an_image_path_round_adds_a_low_rank_term_only_to_its_pair(trained, paired, image_path, tmp_path):
    deltas, _ = paired
    chosen, kl = image_path
    assert set(kl) == {"4+9"} and kl["4+9"][1] < kl["4+9"][0]
    plan = chosen[0].hyperparameters["pair_terms"]["targeted"][-1]
    assert plan["parameters"] == "full" and plan["rank"] == 2 and plan["pairs"] == ["4+9"]
    assert "as a rank-2 term" in str(delta_card(chosen[0], "deltas/separable/digit-4.safetensors"))
    term = chosen[0].interactions["9"]
    image = [key.removesuffix(":up") for key in term if key.endswith(":up")]
    assert any(".attn1." in name or ".conv" in name for name in image)  # the image path, not just the label path
    assert all(term[f"{name}:up"].shape[1] <= 2 and f"{name}:down" in term for name in image)
    other_file = chosen[2].interactions["4"]  # 9's file keeps the null-label changes; only 4's holds the factors
    assert other_file.keys() == {key for key in term if not key.endswith((":up", ":down"))} and other_file
    for composition in ([0], [0, 1], [1, 2]):  # singles and the other pairs keep their weights bitwise
        before = compose(trained, [deltas[i] for i in composition])
        after = compose(trained, [chosen[i] for i in composition])
        assert before.keys() == after.keys() and all(torch.equal(after[n], v) for n, v in before.items())
    base = dict(trained.unet.named_parameters())
    name = next(name for name in image if name not in deltas[0].tensors)  # a weight only the term edits
    full_term = (term[f"{name}:up"] @ term[f"{name}:down"]).reshape(base[name].shape)
    half = compose(trained, [(chosen[0], 0.5), (chosen[2], 0.4)])[name] - base[name].detach()
    torch.testing.assert_close(half, 0.2 * full_term, atol=1e-6, rtol=1e-5)
    swapped = compose(trained, [(chosen[2], 0.4), (chosen[0], 0.5)])[name] - base[name].detach()
    assert torch.equal(swapped, half)  # the factors are found from either partner's side
    assert name not in compose(trained, [chosen[0], (chosen[2], 0.0)])  # dropping a partner drops the term
    for delta in chosen:
        delta.save(tmp_path / f"digit-{delta.concepts[0]}.safetensors", dtype=torch.float32)
    loaded = [ConceptDelta.load(tmp_path / f"digit-{digit}.safetensors") for digit in (4, 7, 9)]
    from_files, in_memory = compose(trained, [loaded[0], loaded[2]]), compose(trained, [chosen[0], chosen[2]])
    assert from_files.keys() == in_memory.keys() and all(torch.equal(from_files[n], v) for n, v in in_memory.items())
    wrong = copy.deepcopy(chosen[0])
    wrong.interactions["9"][f"{name}:down"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=f"term for '{name}' has factors of shapes"):
        compose(trained, [wrong, chosen[2]])
    with pytest.raises(ValueError, match="'full' for targeted rounds of chosen pairs"):
        train_pair_interactions(trained, deltas, refine=True, refine_parameters="full")


def test_erase_script_adds_pair_terms_to_a_folder_of_joint_deltas(trained, singles, tmp_path):
    for delta in singles:
        delta.save(tmp_path / "joint" / f"digit-{delta.concepts[0]}.safetensors")
    settings = ["steps=3", "trajectories=1", "eval_trajectories=1", "batch_size=4"]
    arguments = ["--digits", "4", "7", "9", "--pair-terms", str(tmp_path / "joint"), "--set", *settings]
    run_erase_script(trained, tmp_path, [], "--method", "separable", *arguments)
    written = ConceptDelta.load(tmp_path / "deltas" / "digit-7.safetensors")
    assert set(written.interactions) == {"4", "9"} and written.hyperparameters["pair_terms"]["steps"] == 3
    refine = ["--pair-terms", str(tmp_path / "deltas"), "--refine", "--set", "refine_steps=2", "refine_trajectories=1"]
    run_erase_script(trained, tmp_path, [], "--method", "separable", "--digits", "4", "7", "9", *refine)
    refined = ConceptDelta.load(tmp_path / "deltas" / "digit-7.safetensors")
    assert refined.hyperparameters["pair_terms"] | {"seconds": 0} == written.hyperparameters["pair_terms"] | {
        "rounds": 2,
        "null_alphas": [1.0, 1.0],
        "refine_steps": 2,
        "refine_trajectories": 1,
        "seconds": 0,
    }
    targeted = ["--pair-terms", str(tmp_path / "deltas"), "--refine", "--pairs", "9+7", "--set", "null_alpha=2"]
    run_erase_script(trained, tmp_path, [], "--method", "separable", "--digits", "4", "7", "9", *targeted, *refine[4:])
    plans = ConceptDelta.load(tmp_path / "deltas" / "digit-7.safetensors").hyperparameters["pair_terms"]["targeted"]
    assert [(plan["pairs"], plan["null_alpha"], plan["steps"], plan["after_round"]) for plan in plans] == [
        (["7+9"], 2.0, 2, 2)
    ]
    parser = argparse.ArgumentParser()
    add_erase_arguments(parser)
    alone = parser.parse_args(
        ["--method", "separable", "--digits", "4", "7", "--refine", "--model", str(tmp_path / "base")]
    )
    with pytest.raises(ValueError, match="--refine and --complete work on existing pair terms: name their folder"):
        run_erase(alone)
    with pytest.raises(ValueError, match="--pairs chooses the pair terms that --refine adds rounds to"):
        run_erase(parser.parse_args(["--method", "separable", "--digits", "4", "7", "--pairs", "4+7"]))


def test_the_card_names_the_pair_partners(paired):
    card = str(delta_card(paired[0][2], "deltas/separable/digit-9.safetensors"))
    assert "It carries pair terms for the deltas of digits 4, 7" in card and "pair_kl.4+9" in card
