"""The label map: which folder name each class index of a model means (``data.labels``).

Without one, class ``i`` is the ``i``-th class folder in sorted order, which is how a model trained
here numbers them; a brought model numbers its classes its own way, and its label map says how.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional, Union

from edgeopt.config import resolve_path


def read_label_map(labels: Union[Path, List[str], None]) -> Optional[List[str]]:
    """The folder name of each class index, in order (None: sorted folder names); ValueError in one line.

    A labels.txt has one folder name per line (line i is class i; blank lines only at the end); a
    labels.json is a list of names or a mapping {"0": name, "1": name, ...} over every index from 0.
    """
    if labels is None or isinstance(labels, list):
        return labels
    path = resolve_path(labels)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"data.labels: {path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    if path.suffix.lower() == ".json":
        try:
            names = parse_labels(json.loads(text))
        except ValueError as err:
            raise ValueError(f"data.labels: {path}: {str(err).splitlines()[0][:200]}") from None
    else:
        names = [line.strip() for line in text.rstrip().splitlines()]
        if "" in names:
            raise ValueError(f"data.labels: {path}: line {names.index('') + 1} is blank (one folder name per line, "
                             "line i is class i)")
    if len(set(names)) != len(names) or not names:
        dup = next((n for n in names if names.count(n) > 1), None)
        raise ValueError(f"data.labels: {path}: " + (f"names {dup!r} twice" if dup else "no class names"))
    return names


def parse_labels(doc: Any) -> List[str]:
    """Class names from a decoded label document: a list of names, or {"0": name, ...} (keys may be ints)."""
    if isinstance(doc, list) and doc and all(isinstance(n, str) for n in doc):
        return list(doc)
    if isinstance(doc, dict) and doc and all(str(k).isdigit() and isinstance(v, str) for k, v in doc.items()):
        by_index = {int(k): v for k, v in doc.items()}
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError("its indices must be 0, 1, 2 ... with none missing")
        return [by_index[i] for i in range(len(by_index))]
    raise ValueError('expected a list of folder names or {"0": name, "1": name, ...}')


def in_label_order(classes: List[str], names: List[str], where: Path) -> List[str]:
    """The class folders ``classes`` in the label map's order; ValueError when they are not the same classes."""
    extra, missing = sorted(set(names) - set(classes)), sorted(set(classes) - set(names))
    if extra or missing:
        parts = [f"{word} {', '.join(repr(n) for n in ns[:3])}{' ...' if len(ns) > 3 else ''}" for word, ns in (
            ("names no class folder:", extra), ("has no entry for the class folder(s)", missing)) if ns]
        raise ValueError(f"data.labels: the label map of {len(names)} classes and the {len(classes)} class folders "
                         f"of {where} differ: it {'; it '.join(parts)}")
    return list(names)
