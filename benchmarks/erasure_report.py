"""Render the erasure tables of BENCHMARKS.md from the JSON files the erasure benchmarks wrote.

    python benchmarks/erasure_report.py --leaderboard benchmarks/results/erasure-9.json \
        benchmarks/results/erasure-9-separable.json --digits benchmarks/results/erasure-separable-digits.json \
        --matrix benchmarks/results/erasure-separable-matrix.json \
        --strengths benchmarks/results/erasure-separable-strength-9.json --sweeps benchmarks/results/sweep-*.json \
        --targets benchmarks/results/erasure-targets.json \
        --attack-digits benchmarks/results/erasure-separable-attack-digits-*.json \
        --null-matrices "shipped=benchmarks/results/erasure-null-matrix-pair-terms-rounds-3.json"

Prints Markdown: the leaderboard (and its attack table), the per-digit table of the shipped deltas, the pair
matrix, the strength sweep, one table per hyper-parameter sweep, the null-target comparison, the per-digit
attack and the null-label pair summary. Nothing here measures; it only formats.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from erasure import leaderboard  # benchmarks/erasure.py


def load(path: str) -> dict:
    return json.loads(Path(path).read_text())


def merge_leaderboards(reports: list[dict]) -> dict:
    """One report with every method; accuracy drops filled in against the base row of whichever file has it."""
    merged = {"methods": {m: e for report in reports for m, e in report["methods"].items()}}
    base = merged["methods"]["base"]["evaluation"]["per_class_accuracy"]
    digit = reports[0]["args"]["digit"]
    for entry in merged["methods"].values():
        accuracy = entry["evaluation"]["per_class_accuracy"]
        if entry["summary"].get("max_accuracy_drop") is None and entry is not merged["methods"]["base"]:
            entry["summary"]["max_accuracy_drop"] = max(base[d] - accuracy[d] for d in range(10) if d != digit)
    return merged


def steps_to_half(success: dict) -> str:
    """The first budget whose attack success reaches 50%, or "> largest budget"."""
    reached = [int(b) for b, rate in sorted(success.items(), key=lambda item: int(item[0])) if rate >= 0.5]
    return str(reached[0]) if reached else f"> {max(int(b) for b in success)}"


def attack_table(report: dict) -> str:
    """Attack success per budget, the first budget reaching 50% and the attack's seconds, per method."""
    rows = {m: e["summary"]["attack"] for m, e in report["methods"].items() if "attack" in e["summary"]}
    budgets = sorted({int(b) for row in rows.values() for b in row["success"]})
    lines = [
        "| attacked model | " + " | ".join(f"@{b}" for b in budgets) + " | steps to 50% | attack s |",
        "|---|" + "---|" * (len(budgets) + 2),
    ]
    for method, row in rows.items():
        cells = [f"{row['success'][str(b)]:.2f}" for b in budgets]
        first = steps_to_half(row["success"])
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {first} | {row['seconds']:.0f} |")
    return "\n".join(lines)


def digits_table(report: dict) -> str:
    """One row per erased digit of the shipped deltas (`benchmarks/erasure_ship.py`)."""
    base = report["base"]["accuracy_per_label"]
    lines = [
        "| digit | rate of d (label d) | confidence (label d) | label d draws | rate of d (null label) | null conf. "
        "| other digits acc. (min) | max drop vs base | erase s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    means = {"erased_label_rate": [], "erased_label_confidence": [], "null_rate": [], "null_confidence": []}
    for digit, row in sorted(report["digits"].items(), key=lambda item: int(item[0])):
        becomes = sorted(enumerate(row["erased_label_becomes"]), key=lambda item: -item[1])[:2]
        drops = [base[d] - acc for d, acc in enumerate(row["accuracy_per_label"]) if acc is not None]
        for key, values in means.items():
            values.append(row[key])
        lines.append(
            f"| {digit} | {row['erased_label_rate']:.3f} | {row['erased_label_confidence']:.3f} | "
            + ", ".join(f"{d}:{n}" for d, n in becomes if n)
            + f" | {row['null_rate']:.3f} | {row['null_confidence']:.3f} | {row['other_digits_accuracy']:.3f} "
            f"({row['other_digits_min_accuracy']:.2f}) | {max(drops):+.3f} | {row['erase_seconds']:.0f} |"
        )
    mean = {key: sum(values) / len(values) for key, values in means.items()}
    lines.append(
        f"| mean | {mean['erased_label_rate']:.3f} | {mean['erased_label_confidence']:.3f} | | "
        f"{mean['null_rate']:.3f} | {mean['null_confidence']:.3f} | | | |"
    )
    return "\n".join(lines)


def matrix_tables(report: dict, singles: dict | None) -> str:
    """10×10 views of the pair matrix: each erased label's own rate, what leaks between the pair, the null label."""
    cells = report["matrix"]
    own = [["" for _ in range(10)] for _ in range(10)]
    null = [["" for _ in range(10)] for _ in range(10)]
    worst_leak, worst_confidence, worst_change = 0.0, 1.0, 0.0
    for key, row in cells.items():
        a, b = map(int, key.split("+"))
        own[a][b], own[b][a] = row["label_a"][a], row["label_b"][b]
        null[a][b], null[b][a] = row["null"][a], row["null"][b]
        worst_leak = max(worst_leak, row["label_a"][b], row["label_b"][a])
        worst_confidence = min(worst_confidence, row["confidence_a"], row["confidence_b"])
        worst_change = max(worst_change, row["restore_b_max_key_value_change"])
    worse = []  # pairs where a digit's null-label rate exceeds its single delta's by more than 1 point
    if singles:
        for digit, row in singles["digits"].items():
            own[int(digit)][int(digit)] = row["erased_label_rate"]
            null[int(digit)][int(digit)] = row["null_rate"]
        for key in cells:
            a, b = map(int, key.split("+"))
            excess = max(null[a][b] - null[a][a], null[b][a] - null[b][b], own[a][b] - own[a][a], own[b][a] - own[b][b])
            if excess > 0.01 + 1e-6:
                worse.append(key)

    def grid(values, title) -> str:
        header = f"| {title} | " + " | ".join(f"+{b}" for b in range(10)) + " |"
        body = [f"| {a} | " + " | ".join("-" if v == "" else f"{v:.2f}" for v in values[a]) + " |" for a in range(10)]
        return "\n".join([header, "|---|" + "---|" * 10, *body])

    summary = (
        f"Across the {len(cells)} pairs: the most either label's samples read as the *other* erased digit "
        f"{worst_leak:.2f}; "
        f"lowest mean confidence of an erased label's samples {worst_confidence:.2f}; largest change of a restored "
        f"label's keys/values from the base model's {worst_change:.1e}."
    )
    if singles:
        summary += f" Pairs worse than their singles by more than 1 point: {len(worse)} ({', '.join(worse)})."
    return "\n\n".join(
        [
            grid(own, "rate of row digit among its own label's samples, with column digit also erased"),
            grid(null, "rate of row digit among null-label samples, with column digit also erased"),
            summary,
        ]
    )


def null_matrix_row(name: str, report: dict) -> str:
    """One row of the null-label pair summary: ``report`` is `erasure_null_matrix.py`'s (parts merged).

    A cell is (pair, erased digit e): e's rate among the pair's null-label samples against e's single delta's.
    "Clearly over" counts the pairs where some cell's excess is above 1 point by more than two standard errors of
    the difference, √((p_pair + p_single) / n) (rare events, the two rates taken as independent, which overstates
    the error: both use the same seeds).
    """
    cells, samples = report["null_label"], report["args"]["samples"]
    single = {digit: cells[str(digit)]["rates"][digit] for digit in range(10)}
    excess, over, clearly, worst = [], set(), set(), (0.0, "")
    for key, row in cells.items():
        if "+" not in key:
            continue
        for digit in map(int, key.split("+")):
            rate, error = row["rates"][digit], ((row["rates"][digit] + single[digit]) / samples) ** 0.5
            excess.append(rate - single[digit])
            over |= {key} if excess[-1] > 0.01 + 1e-6 else set()
            clearly |= {key} if excess[-1] - 2 * error > 0.01 else set()
            worst = max(worst, (rate, f"{digit} with {key.replace(str(digit), '').strip('+')}"))
    rates = [cells[key]["rates"][int(d)] for key in cells if "+" in key for d in key.split("+")]
    found = round(sum(rates) * samples)
    return (
        f"| {name} | {samples} | {sum(rates) / len(rates):.4f} | {sum(excess) / len(excess):.4f} | "
        f"{worst[0]:.3f} ({worst[1]}) | {len(over)} | {len(clearly)} | {found} of {len(rates) * samples:,} |"
    )


def merge_null_matrices(reports: list[dict]) -> dict:
    """The parts of one `erasure_null_matrix.py` run as one report (they must agree on the sample count)."""
    samples = {report["args"]["samples"] for report in reports}
    if len(samples) != 1:
        raise ValueError(
            f"These null matrices were sampled at different sizes {sorted(samples)}: merge one run's parts."
        )
    cells = {key: row for report in reports for key, row in report["null_label"].items()}
    return {"args": {"samples": samples.pop()}, "null_label": cells}


def null_matrix_table(variants: list[tuple[str, dict]]) -> str:
    """The null-label pair summary: one `null_matrix_row` per (name, merged report)."""
    header = (
        "| deltas | samples per cell | mean rate | mean excess over the single | worst cell | pairs > 1 point | "
        "pairs clearly > 1 point | erased digit, all cells |"
    )
    return "\n".join([header, "|---|---|---|---|---|---|---|---|", *(null_matrix_row(*v) for v in variants)])


def strength_table(report: dict) -> str:
    """The strength sweep of `benchmarks/erasure_compose.py --strengths`."""
    neighbours = list(next(iter(report["sweep"].values()))["neighbour_accuracy"])
    digit = report["args"]["digit"]
    lines = [
        f"| strength | rate of {digit} (label {digit}) | confidence (label {digit}) | rate of {digit} (null label) | "
        + " | ".join(f"acc. {d}" for d in neighbours)
        + " |",
        "|---|---|---|---|" + "---|" * len(neighbours),
    ]
    for strength, row in report["sweep"].items():
        lines.append(
            f"| {float(strength):.2f} | {row['rate']:.3f} | {row['confidence']:.3f} | {row['null_rate']:.3f} | "
            + " | ".join(f"{row['neighbour_accuracy'][d]:.2f}" for d in neighbours)
            + " |"
        )
    return "\n".join(lines)


def sweep_table(report: dict) -> str:
    """One row per grid point of `benchmarks/erasure_sweep.py`."""
    keys = list(report["points"][0]["settings"])
    neighbours = list(report["points"][0]["neighbour_accuracy"])
    lines = [
        "| "
        + " | ".join(keys)
        + " | rate | confidence | null rate | null conf. | "
        + " | ".join(f"acc. {d}" for d in neighbours)
        + " | erase s |",
        "|" + "---|" * (len(keys) + 5 + len(neighbours)),
    ]
    for point in report["points"]:
        lines.append(
            "| "
            + " | ".join(str(point["settings"][k]) for k in keys)
            + f" | {point['rate']:.3f} | {point['confidence']:.3f} | {point['null_rate']:.3f} | "
            + f"{point['null_confidence']:.3f} | "
            + " | ".join(f"{point['neighbour_accuracy'][d]:.2f}" for d in neighbours)
            + f" | {point['erase_seconds']:.0f} |"
        )
    return "\n".join(lines)


def targets_table(report: dict) -> str:
    """Rate of each erased digit among null-label samples guided away from the set, per combination and scale."""
    scales = report["args"]["scales"]
    header = "| erased set | " + " | ".join(f"{c} β={s:g}" for c in ("sum", "mixture") for s in scales) + " |"
    lines = [header, "|---" * (1 + 2 * len(scales)) + "|"]
    for erased, rows in report["rates"].items():
        cells = [" / ".join(f"{r:.2f}" for r in rows[c][str(float(s))]) for c in ("sum", "mixture") for s in scales]
        lines.append(f"| {erased} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def attack_digits_table(reports: list[dict]) -> str:
    """Per digit: attack success at each budget against the base model and against the shipped delta."""
    method = reports[0]["args"]["method"]
    budgets = reports[0]["args"]["budgets"]
    header = (
        "| digit | "
        + " | ".join(f"base @{b}" for b in budgets)
        + " | base: steps to 50% | "
        + " | ".join(f"{method} @{b}" for b in budgets)
        + f" | {method}: steps to 50% |"
    )
    lines = [header, "|---" * (3 + 2 * len(budgets)) + "|"]
    rows = {int(d): row for report in reports for d, row in report["digits"].items()}
    for digit, row in sorted(rows.items()):
        cells = [str(digit)]
        for model in ("base", method):
            success = row[model]["success"]
            cells += [f"{success[str(b)]:.2f}" for b in budgets] + [steps_to_half(success)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leaderboard", nargs="*", default=[], help="benchmarks/erasure.py outputs, merged")
    parser.add_argument("--digits", help="benchmarks/erasure_ship.py output")
    parser.add_argument("--matrix", nargs="*", default=[], help="erasure_compose.py --matrix outputs (merged)")
    parser.add_argument("--strengths", help="benchmarks/erasure_compose.py --strengths output")
    parser.add_argument("--sweeps", nargs="*", default=[], help="benchmarks/erasure_sweep.py outputs")
    parser.add_argument("--targets", help="benchmarks/erasure_targets.py output")
    parser.add_argument("--attack-digits", nargs="*", default=[], help="benchmarks/erasure_attack_digits.py outputs")
    parser.add_argument(
        "--null-matrices",
        nargs="*",
        default=[],
        metavar="NAME=PATH[,PATH]",
        help="erasure_null_matrix.py outputs (parts joined by commas), one summary row each",
    )
    args = parser.parse_args()
    if args.leaderboard:
        reports = [load(path) for path in args.leaderboard]
        merged = merge_leaderboards(reports)
        digit = reports[0]["args"]["digit"]
        print(leaderboard(merged, digit), attack_table(merged), sep="\n\n", end="\n\n")
    singles = load(args.digits) if args.digits else None
    if singles:
        print(digits_table(singles), end="\n\n")
    if args.matrix:
        cells = {key: row for path in args.matrix for key, row in load(path)["matrix"].items()}
        cells = dict(sorted(cells.items(), key=lambda item: tuple(map(int, item[0].split("+")))))
        print(matrix_tables({"matrix": cells}, singles), end="\n\n")
    if args.strengths:
        print(strength_table(load(args.strengths)), end="\n\n")
    for path in args.sweeps:
        report = load(path)
        print(
            f"`{report['args']['method']}` sweep (digit {report['args']['digit']}, {report['args']['samples']} "
            "samples per label):\n"
        )
        print(sweep_table(report), end="\n\n")
    if args.targets:
        print(targets_table(load(args.targets)), end="\n\n")
    if args.attack_digits:
        print(attack_digits_table([load(path) for path in args.attack_digits]), end="\n\n")
    if args.null_matrices:
        variants = [text.split("=", 1) for text in args.null_matrices]
        merged = [(name, merge_null_matrices([load(path) for path in paths.split(",")])) for name, paths in variants]
        print(null_matrix_table(merged), end="\n\n")


if __name__ == "__main__":
    main()
