"""The bundle's configs, run from Python: where they are and how MONAI runs them.

The package lives inside the bundle folder (``medvar_bundle/`` beside ``configs/``), in the
repository and in the model-zoo zip alike, so the configs are found next to the package (or under
``$MEDVAR_BUNDLE_ROOT``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from monai.bundle import ConfigParser, ConfigWorkflow

BUNDLE_ROOT = Path(os.environ.get("MEDVAR_BUNDLE_ROOT") or Path(__file__).resolve().parent.parent)
"""The bundle folder: ``$MEDVAR_BUNDLE_ROOT``, else the folder holding this package (an editable
install or an unpacked bundle)."""
CONFIGS = BUNDLE_ROOT / "configs"


def config_path(name: str | os.PathLike) -> Path:
    """``configs/<name>.yaml`` of the bundle this package belongs to, or ``name`` itself when it is
    the path of a YAML or JSON file (an overlay of the user's, merged after the bundle's configs).

    Raises:
        FileNotFoundError: one line, when the package was installed away from its bundle.
    """
    if Path(name).suffix in (".yaml", ".yml", ".json") and Path(name).is_file():
        return Path(name)
    path = CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such bundle config; install the package editable (pip install -e BUNDLE) or set "
            "MEDVAR_BUNDLE_ROOT to the bundle folder"
        )
    return path


def device_expression(name: str) -> str:
    """``cuda:1`` → ``$torch.device('cuda:1')`` (a config expression)."""
    return f"$torch.device({name!r})"


def config_component(config: str, id: str, overrides: dict | None = None):
    """The object the id ``id`` of ``configs/<config>.yaml`` builds, with ``overrides`` (config ids) applied."""
    parser = ConfigParser(ConfigParser.load_config_file(config_path(config)))
    for key, value in (overrides or {}).items():
        parser[key] = value
    return parser.get_parsed_content(id)


def run_config(
    config: str,
    workflow_type: str | None,
    overrides: dict,
    extra_configs: Sequence[str] = (),
    tracking: str | None = None,
) -> list:
    """Initialise, run and finalise ``configs/<config>.yaml`` (plus overlays) with ``overrides``.

    Returns what the expressions of the config's ``run`` id returned, in order.

    ``tracking="mlflow"`` adds MONAI's experiment tracking (``MLFlowHandler`` on the trainer and
    the evaluator; a SQLite store ``mlruns.db`` in ``output_dir``), as ``python -m monai.bundle
    run --tracking mlflow`` does.

    ``bundle_root`` is the bundle folder unless overridden. Errors are raised unchanged, except
    that a config expression that failed is unwrapped to the error that made it fail (a missing
    store, a bad value), so the command line can print one line.
    """
    files = [str(config_path(config)), *(str(config_path(c)) for c in extra_configs)]
    workflows_logger = logging.getLogger("monai.bundle.workflows")
    level = workflows_logger.level
    workflows_logger.setLevel(logging.ERROR)  # its "logging file is set to False" warning is our choice, not news
    try:
        workflow = ConfigWorkflow(
            config_file=files if len(files) > 1 else files[0],
            meta_file=str(CONFIGS / "metadata.json"),
            logging_file=False,  # the caller's logging stays as it is (the medvar CLI sets its own)
            workflow_type=workflow_type,
            tracking=tracking,
            **{"bundle_root": str(BUNDLE_ROOT), **overrides},
        )
    finally:
        workflows_logger.setLevel(level)
    try:
        workflow.initialize()
        results = workflow.run()
        workflow.finalize()
    except RuntimeError as err:
        raise root_cause(err) from None
    return results


def root_cause(err: BaseException) -> BaseException:
    """The first error of the chain that is not MONAI's ``Failed to evaluate`` wrapper."""
    while isinstance(err, RuntimeError) and str(err).startswith("Failed to ") and err.__cause__ is not None:
        err = err.__cause__
    return err
