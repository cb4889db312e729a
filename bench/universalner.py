"""Write WNUT-17 in UniversalNER's IOB2 shape, for the closing run of issue 24.

    python bench/universalner.py            # -> runs/uner/{train,dev,test}.iob2

UniversalNER (Mayhew et al. 2024) releases `.iob2` files: each sentence is `# sent_id = ...`
and `# text = ...` comment lines, then one row per token, `index<TAB>token<TAB>tag<TAB>-<TAB>-`.
There is no UniversalNER file in ../shared/data, so WNUT-17 is rewritten in that shape: the
same words and tags, so a run on it compares with the WNUT-17 row of docs/RESULTS.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptkit.tagging import read_tagged  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "wnut17"
OUT = ROOT / "runs" / "uner"
SPLITS = {
    "train": "wnut17train.conll",
    "dev": "emerging.dev.conll",
    "test": "emerging.test.annotated",
}


def universalner(sentences: list[tuple[list[str], list[str]]], name: str) -> str:
    """Sentences as UniversalNER writes them (its sent_id values look like 'name-0001')."""
    blocks = []
    for number, (words, tags) in enumerate(sentences, start=1):
        lines = [f"# sent_id = {name}-{number:04d}", f"# text = {' '.join(words)}"]
        pairs = enumerate(zip(words, tags, strict=True), start=1)
        lines += [f"{i}\t{w}\t{t}\t-\t-" for i, (w, t) in pairs]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def main() -> None:
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is missing: this conversion needs the shared WNUT-17 files")
    OUT.mkdir(parents=True, exist_ok=True)
    for split, name in SPLITS.items():
        sentences = read_tagged(SHARED / name)
        path = OUT / f"{split}.iob2"
        path.write_text(universalner(sentences, f"wnut17-{split}"), encoding="utf-8")
        print(f"{path}: {len(sentences)} sentences")


if __name__ == "__main__":
    main()
