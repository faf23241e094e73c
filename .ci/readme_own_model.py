"""The README's "Your own model" section, as a new user would run it, into the current
directory: its Python blocks written to the files their first line names (``# mynet.py: ...``),
its shell block written to ``own_model.sh`` (the commands exactly as printed, but the search's
trials, cut for CI with ``--trials N``), and MNIST-like IDX files in ``mnist/`` (small and
generated: CI has no network); with ``--api FILE``, the README's Python API example too.
Usage: python readme_own_model.py README.md [--trials 3] [--api api_example.py]"""

from __future__ import annotations

import argparse
import gzip
import re
import struct
from pathlib import Path

import numpy as np


def section(readme: str, title: str) -> str:
    start = readme.index(f"## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start:end if end != -1 else None]


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.M | re.S)]


def idx_files(folder: Path, test: int = 297) -> None:
    """MNIST's layout (train and t10k pairs, gzipped) holding real handwritten digits that
    need no download: scikit-learn's 1,797 8x8 digits, upscaled to 28x28 like MNIST's."""
    from PIL import Image
    from sklearn.datasets import load_digits

    if folder.is_symlink() or (folder.exists() and any(folder.iterdir())):
        raise SystemExit(f"{folder} exists and is not empty: this writes generated IDX files only into a new "
                         f"folder (run it in an empty directory)")
    digits = load_digits()
    images = np.stack([np.asarray(Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((28, 28),
                                                                                             Image.BILINEAR))
                       for img in digits.images])
    labels = digits.target.astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, part in (("train", slice(test, None)), ("t10k", slice(0, test))):
        x, y = images[part], labels[part]
        (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">IIII", 0x803, len(x), 28, 28) + x.tobytes()))
        (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(struct.pack(">II", 0x801, len(y)) + y.tobytes()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("readme")
    parser.add_argument("--trials", type=int, default=0, help="cut the search's trials to this many (0: as printed)")
    parser.add_argument("--api", default="", help="also write the README's Python API example to this file")
    args = parser.parse_args()
    if args.api:
        (example,) = [body for language, body in blocks(section(Path(args.readme).read_text(), "Python API"))
                      if language == "python"]
        Path(args.api).write_text(example)
        print(f"wrote {args.api} (the README's Python API example)")
    text = section(Path(args.readme).read_text(), "Your own model")
    shell = []
    for language, body in blocks(text):
        first = body.splitlines()[0]
        named = re.match(r"# (\S+\.py):", first)
        if language == "python" and named:
            Path(named.group(1)).write_text(body)
            print(f"wrote {named.group(1)} ({len(body.splitlines())} lines)")
        elif language == "bash":
            shell.append(body)
    assert len(shell) == 1, f"expected one shell block in the README's 'Your own model', found {len(shell)}"
    commands = shell[0]
    if args.trials:
        commands = re.sub(r"--trials \d+", f"--trials {args.trials}", commands)
    Path("own_model.sh").write_text("set -euxo pipefail\n" + commands)
    data = re.search(r"--data-dir (\S+)", commands)
    assert data, "the README's commands name no --data-dir"
    idx_files(Path(data.group(1)))
    print(f"wrote own_model.sh ({len(commands.splitlines())} commands) and IDX files in {data.group(1)}/")


if __name__ == "__main__":
    main()
