"""Package the MedVAR bundle as a model-zoo zip.

The zip holds one top folder, ``medvar_bundle/`` (the bundle root), laid out as zoo bundles are:

    medvar_bundle/configs/        every file of configs/ (metadata.json, logging.conf, the YAML configs)
    medvar_bundle/models/         model.pt, tokenizer.pt, datasets.json, medvar.pt from --models (or empty);
                                  for a training run's RUN/models, RUN/model.pt (the portable file) becomes medvar.pt
    medvar_bundle/docs/           docs/ (README.md, data_license.txt, the other docs and figures)
    medvar_bundle/LICENSE, medvar_bundle/large_files.yml
    medvar_bundle/medvar_bundle/  the Python package (*.py only)

The package sits at the bundle root so that a config's ``$import medvar_bundle`` resolves when
``python -m monai.bundle run`` is started from the unpacked bundle root (``python -m`` puts the working
directory first on ``sys.path``; see docs/README.md). Entries are sorted and carry a fixed timestamp,
so the same inputs give the same bytes; the zip is written to a temporary file and renamed into place.

    .venv/bin/python scripts/make_bundle.py [--out dist/medvar_bundle.zip] [--models RUN/models]
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

from medvar_bundle.files import atomic_write_bytes

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = "medvar_bundle"
MODEL_FILES = ("model.pt", "tokenizer.pt", "datasets.json", "medvar.pt")
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def _files(folder: Path, pattern: str = "*") -> list[Path]:
    """Files under ``folder`` matching ``pattern``, sorted, without byte-code caches."""
    return sorted(
        p for p in folder.rglob(pattern) if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


def bundle_entries(root: Path = ROOT, models: Path | None = None) -> dict[str, Path]:
    """Archive name → source file for every file of the bundle.

    Raises:
        FileNotFoundError: ``models`` is given but holds none of :data:`MODEL_FILES`.
    """
    entries = {f"{BUNDLE}/{name}": root / name for name in ("LICENSE", "large_files.yml")}
    for folder, pattern in (("configs", "*"), ("docs", "*"), (BUNDLE, "*.py")):
        entries.update({f"{BUNDLE}/{p.relative_to(root).as_posix()}": p for p in _files(root / folder, pattern)})
    if models is not None:
        found = {name: models / name for name in MODEL_FILES if (models / name).is_file()}
        if not found:
            raise FileNotFoundError(f"{models} holds none of {', '.join(MODEL_FILES)}")
        portable = models.parent / "model.pt"  # a `medvar train` run folder: RUN/model.pt beside RUN/models/
        if "medvar.pt" not in found and "model.pt" in found and portable.is_file():
            found["medvar.pt"] = portable
        entries.update({f"{BUNDLE}/models/{name}": path for name, path in found.items()})
    return entries


def write_zip(out: Path, entries: dict[str, Path]) -> None:
    """Write ``entries`` (plus an entry for the ``models/`` folder) to ``out`` atomically, readable
    as the umask allows (:func:`~medvar_bundle.files.atomic_write_bytes`)."""

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as zf:
            folder = zipfile.ZipInfo(f"{BUNDLE}/models/", ZIP_TIME)
            folder.external_attr = (0o40755 << 16) | 0x10
            zf.writestr(folder, b"")
            for name in sorted(entries):
                info = zipfile.ZipInfo(name, ZIP_TIME)
                info.external_attr = 0o644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, entries[name].read_bytes())

    atomic_write_bytes(out, write)


def main(argv: list[str] | None = None) -> int:
    """Build the bundle zip; exit status 2 with one line on stderr when ``--models`` is unusable."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "dist" / "medvar_bundle.zip",
        help="zip to write (default: dist/medvar_bundle.zip)",
    )
    parser.add_argument(
        "--models",
        type=Path,
        default=None,
        help=f"folder whose {', '.join(MODEL_FILES)} go into models/ (default: none, models/ empty)",
    )
    args = parser.parse_args(argv)
    if args.out.is_dir():
        print(f"make_bundle: --out {args.out} is a folder; give the zip's file name", file=sys.stderr)
        return 2
    try:
        entries = bundle_entries(models=args.models)
    except FileNotFoundError as e:
        print(f"make_bundle: {e}", file=sys.stderr)
        return 2
    write_zip(args.out, entries)
    print(f"make_bundle: {args.out} ({len(entries)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
