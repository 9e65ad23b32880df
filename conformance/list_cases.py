#!/usr/bin/env python3
"""Print the Autobahn case ids kosoku knows, one per line, minus excluded globs.

Run it with the venv's python (it imports kosoku). It loads kosoku's vendored
case files the way kosoku's own index does (kosoku._caseindex.build_index):
every `caseN_N[_N].py` module is one case class, and the `*_X` modules are
generators holding lists named `CaseN_N_X` / `CaseN_X_X`. This gives
compare.py an independent list of the cases a run must contain, so a run that
silently lost cases (in both reports alike) still fails.

Usage: list_cases.py [-x GLOB]...
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import re
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-x", "--exclude", action="append", default=[], metavar="GLOB")
    args = ap.parse_args()

    import kosoku
    from kosoku import _caseindex

    cases_dir = Path(kosoku.__file__).resolve().parent / "cases"
    _caseindex.initialize_shims()
    static = sorted(
        p.stem for p in cases_dir.glob("case*.py") if re.fullmatch(r"case\d+(_\d+)+", p.stem)
    )
    generators: list[tuple[str, str]] = []
    for p in sorted(cases_dir.glob("case*.py")):
        if re.fullmatch(r"case\d+(_\d+)+", p.stem) or not re.search(r"_[xX]", p.stem):
            continue
        mod = importlib.import_module(p.stem)
        for name, value in vars(mod).items():
            if re.fullmatch(r"Case\d+(_(\d+|X))*_X", name) and isinstance(value, list):
                generators.append((p.stem, name))
    cases, _groups = _caseindex.build_index(static, generators)
    ids = [c for c in cases if not any(fnmatch.fnmatchcase(c, g) for g in args.exclude)]
    if not ids:
        print("list_cases: no cases found", file=sys.stderr)
        return 1
    sys.stdout.write("".join(f"{c}\n" for c in ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
