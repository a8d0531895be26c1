"""Plots on the dataset card: PNGs under `<run>/publish/plots/`, linked from a "## Plots" section.

Called by flows.publishing.publish_run after `storage.publish` has swapped the new folder into
place. The files are added to the publish manifest's `files` list FIRST (so a later publish still
recognises the folder as ours, see storage.publish.check_publish_target), then written, then the
card gets its links. Skipped (nothing written, returns []) when matplotlib is not installed or the
run folder is not local.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PLOTS_DIR = "plots"
SECTION = "## Plots"


def add_card_plots(run_url: str) -> list[str]:
    """Writes the run's plots into `<run_url>/publish/plots/` and links them in its README.md."""
    from reporting.plots import MissingDependency, require_matplotlib, run_plots
    from reporting.run import load_run

    if "://" in run_url and not run_url.startswith("file://"):
        return []  # remote run folders: the card stays as published
    try:
        require_matplotlib()
    except MissingDependency:
        return []
    root = Path(run_url.removeprefix("file://")).expanduser()
    publish = root / "publish"
    manifest_path = publish / "_manifest.json"
    if not manifest_path.is_file():
        return []
    plots = run_plots(load_run(root))
    files = {f"{PLOTS_DIR}/{stem}.png": png for stem, png in plots.items()}
    if not files:
        return []
    manifest = json.loads(manifest_path.read_text())
    manifest["files"] = sorted(set(manifest.get("files") or []) | set(files))
    _atomic_write(manifest_path, json.dumps(manifest, indent=2, default=str).encode())
    for relative, png in files.items():
        _atomic_write(publish / relative, png)
    readme = publish / "README.md"
    if readme.is_file():
        _atomic_write(readme, insert_plots_section(readme.read_text(encoding="utf-8"), list(files)).encode("utf-8"))
    return sorted(files)


def insert_plots_section(card: str, files: list[str]) -> str:
    """The card with a "## Plots" section right after its "## Steps" section (else before the footer)."""
    lines = [SECTION, "", "Kept rows (blue) and dropped rows (red) of the whole run; `alignforge report <run>` "
             "shows them with sample rows.", ""]
    lines += [f"![{Path(f).stem}]({f})" for f in files] + [""]
    block = "\n".join(lines) + "\n"
    if SECTION + "\n" in card:  # already there (a rerun on the same card): replace it
        start = card.index(SECTION + "\n")
        end = card.find("\n## ", start + len(SECTION))
        return card[:start] + block + (card[end + 1:] if end != -1 else "")
    steps = card.find("\n## Steps\n")
    if steps != -1:
        end = card.find("\n## ", steps + 1)
        if end != -1:
            return card[:end + 1] + block + card[end + 1:]
    footer = card.rfind("\nPublished by alignforge")
    at = footer + 1 if footer != -1 else len(card)
    return card[:at] + block + "\n" + card[at:]


def _atomic_write(path: Path, data: bytes) -> None:
    """Written beside publish/ (in the run folder), then renamed in: a kill never leaves a file in
    publish/ that its manifest does not list."""
    path.parent.mkdir(parents=True, exist_ok=True)
    run_folder = next(p for p in path.parents if p.name == "publish").parent
    tmp = run_folder / f".card-plot.tmp-{os.getpid()}-{path.name}"
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
