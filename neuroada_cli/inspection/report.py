"""The markdown page of ``neuroada inspect``: key facts, scores, the figures and a per-layer table.

Pure text from plain values (no file access): run.py gathers them and links the images it wrote
beside the page, so every link is relative and the folder can be moved or published as it is.
"""
from __future__ import annotations

from pathlib import Path


def _number(value, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _fact_rows(run_info: dict, method: str, train: list, validation: dict) -> list[tuple[str, str]]:
    facts = [("method", method)]
    for key, label in (("model", "base model"), ("recipe", "recipe")):
        if run_info.get(key):
            facts.append((label, str(run_info[key])))
    trainable, total = run_info.get("trainable_params"), run_info.get("total_params")
    if trainable is not None:
        share = run_info.get("trainable_percent")
        detail = f" of {total:,}" if isinstance(total, int) else ""
        detail += f" ({share:.3f} %)" if isinstance(share, (int, float)) else ""
        facts.append(("trainable parameters", f"{trainable:,}{detail}"))
    steps = run_info.get("steps", train[-1][0] if train else None)
    if steps is not None:
        facts.append(("optimizer steps", _number(steps)))
    final_loss = run_info.get("final_loss", train[-1][1] if train else None)
    if final_loss is not None:
        facts.append(("final train loss", _number(float(final_loss))))
    best = run_info.get("validation")
    if isinstance(best, dict) and best.get("metric"):
        facts.append(("kept epoch (validation)", f"{best['metric']} {_number(best.get('value'))} "
                                                 f"at step {best.get('step')}"))
    elif validation:
        name, points = next(iter(validation.items()))
        facts.append(("last validation", f"{name} {_number(points[-1][1])} at step {points[-1][0]}"))
    if isinstance(run_info.get("wall_seconds"), (int, float)):
        facts.append(("wall time", f"{run_info['wall_seconds']:,.1f} s"))
    for key, label in (("adapter_bytes", "adapter size"), ("peak_memory_bytes", "peak memory")):
        if isinstance(run_info.get(key), int):
            facts.append((label, f"{run_info[key] / 2**20:,.2f} MiB"))
    return facts


def _eval_section(results: dict, eval_name: str | None) -> list[str]:
    tasks = results.get("tasks") if isinstance(results, dict) else None
    if not tasks:
        return ["## Evaluation", "", "Not evaluated yet: `neuroada eval run=DIR` writes `eval/results.json`.", ""]
    lines = [f"## Evaluation (`{eval_name}/results.json`)", "", "| task | metric | n | score |", "|---|---|---|---|"]
    for task, entry in tasks.items():
        if isinstance(entry, dict):
            lines.append(f"| {task} | {entry.get('metric', '')} | {entry.get('n', '')} | "
                         f"{_number(entry.get('value', ''))} |")
    return lines + [""]


def _cells_per_row(layer) -> str:
    fewest, most = layer.cells_per_row
    return str(most) if fewest == most else f"{fewest}-{most}"


def _top(pairs: list[tuple[int, float]]) -> str:
    return ", ".join(f"{index} ({share:.1%})" for index, share in pairs) or "-"


def _group_table(layers: list, histograms: dict, group_top: dict) -> list[str]:
    lines = ["| projection | layers | cells | distinct inputs | top-3 inputs (share of cells) | even share | "
             "rows moved |", "|---|---|---|---|---|---|---|"]
    for group, counts in histograms.items():
        members = [layer for layer in layers if layer.group == group]
        rows = sum(layer.d_out for layer in members)
        lines.append(f"| `{group}` | {len(members)} | {int(counts.sum()):,} | {int((counts > 0).sum())} | "
                     f"{_top(group_top[group])} | {1 / max(len(counts), 1):.2%} | "
                     f"{sum(layer.rows_moved for layer in members) / max(rows, 1):.1%} |")
    return lines + [""]


def _selection_section(layers: list, method: str, histograms: dict, group_top: dict) -> list[str]:
    if not layers:  # decided by the adapter's contents, not by the method's name
        return ["## Selected cells", "", f"This {method} run's adapter holds no NeuroAda layers (no `neuroada_delta` / "
                "`neuroada_indices` tensors): per-layer selection plots and tables describe NeuroAda adapters only.", ""]
    d_out = sum(layer.d_out for layer in layers)
    with_cells = sum(layer.rows_with_cells for layer in layers)
    moved = sum(layer.rows_moved for layer in layers)
    lines = [
        "## Selected cells", "",
        f"{len(layers)} target layers, {sum(layer.cells for layer in layers):,} selected cells. "
        f"Rows with cells: {with_cells:,} of {d_out:,} ({with_cells / d_out:.1%}); rows whose delta moved "
        f"(any non-zero delta after training): {moved:,} ({moved / d_out:.1%}).", "",
        "Which input features the cells read, summed over the layers of each projection type (the input axis "
        "ends at the largest selected index). An even spread gives every input the same share of cells; a spike "
        "is a feature the selection favours (magnitude selection follows outlier input features):", "",
        "![input features selected](selection.png)", "",
        *_group_table(layers, histograms, group_top),
        "The same per layer: the share of each layer's rows (neurons) that read each input feature:", "",
        "![input features selected, per layer](selection_layers.png)", "",
        "Delta norm and share of rows whose delta moved, per layer:", "",
        "![per-layer delta norm and rows moved](layers.png)", "",
        "| layer | d_out | k | distinct input columns | top-3 inputs (share of cells) | rows moved | delta norm |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer in layers:
        lines.append(f"| `{layer.name}` | {layer.d_out} | {_cells_per_row(layer)} | {layer.distinct_columns} | "
                     f"{_top(layer.top_inputs(3))} | {layer.rows_moved / max(layer.d_out, 1):.1%} | "
                     f"{layer.delta_norm:.4g} |")
    return lines + [""]


def _confusion_section(confusion_files: dict[str, str]) -> list[str]:
    if not confusion_files:
        return []
    lines = ["## Confusion matrices", "", "Gold label by row, predicted label by column.", ""]
    for task, filename in confusion_files.items():
        lines += [f"### {task}", "", f"![confusion matrix, {task}]({filename})", ""]
    return lines


def render_report(*, run_dir: Path, run_info: dict, method: str, train: list, validation: dict, layers: list,
                  histograms: dict, group_top: dict, results: dict, confusion_files: dict[str, str],
                  eval_name: str | None) -> str:
    lines = [f"# Run `{run_dir.name}`", "", f"Inspected from the files of `{run_dir}` by `neuroada inspect`.", "",
             "| | |", "|---|---|"]
    lines += [f"| {label} | {value} |" for label, value in _fact_rows(run_info, method, train, validation)]
    lines += ["", *_eval_section(results, eval_name)]
    validation_note = ", validation loss/metrics as markers" if validation else " (no validation recorded)"
    lines += ["## Loss", "", f"Train loss by optimizer step{validation_note}.", "", "![loss](loss.png)", ""]
    lines += _selection_section(layers, method, histograms, group_top)
    lines += _confusion_section(confusion_files)
    return "\n".join(lines).rstrip() + "\n"
