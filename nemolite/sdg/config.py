"""SDG settings: the defaults in ``prompts.yaml`` with a user's ``--config`` YAML merged over them.

Templates and seed data are data, not code, so that a user can change a prompt or a pipeline's
size without touching Python. Sizes are checked here, once, so that a typo (``n_questions: five``,
NeMo-Curator's silent failure) stops the run before the first request.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from nemolite.errors import NemoliteError

DEFAULTS_PATH = Path(__file__).with_name("prompts.yaml")
PIPELINES = ("open-qa", "writing", "closed-qa", "math", "python", "dialogue", "two-turn", "preference")
# Keys whose value is free-form (a user may add templates or attributes the defaults do not name).
OPEN_KEYS = ("templates", "filter", "reward_weights", "sampling")


def merge(base: dict, override: Mapping, free: bool = False, where: str = "") -> dict:
    """``override`` over ``base``: mappings merge key by key, other values replace. Keys the defaults do
    not have are refused (a misspelt key would otherwise be ignored silently), except OPEN_KEYS and
    anything below them."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if not free and key not in base and key not in OPEN_KEYS:
            raise NemoliteError(f"unknown config key {where + str(key)!r}; known here: {sorted(base)}")
        if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            merged[key] = merge(base[key], value, free or key in OPEN_KEYS, f"{where}{key}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_config(config: str | Path | Mapping | None = None) -> dict:
    """The defaults, with ``config`` (a YAML file or a mapping) merged over them."""
    defaults = yaml.safe_load(DEFAULTS_PATH.read_text())
    if config is None:
        return defaults
    if not isinstance(config, Mapping):
        path = Path(config)
        if not path.is_file():
            raise NemoliteError(f"config file {str(path)!r} not found")
        try:
            config = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise NemoliteError(f"{path} is not valid YAML: {error}") from None
        if not isinstance(config, Mapping):
            raise NemoliteError(f"{path} must hold a YAML mapping (key: value lines)")
    return merge(defaults, config)


def section(config: dict, pipeline: str) -> dict:
    """A pipeline's own settings with the shared ones it needs: its sampling merged over the global one."""
    own = dict(config[pipeline])
    own["sampling"] = {**config["sampling"], **own.get("sampling", {})}
    return own


def count(settings: Mapping, key: str, minimum: int = 1) -> int:
    value = settings[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise NemoliteError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def render(config: Mapping, template: str, **fields: Any) -> str:
    """A template filled in; a template naming a field its stage does not give is a config error."""
    text = config["templates"].get(template)
    if not isinstance(text, str):
        raise NemoliteError(f"templates.{template} must be a string in the config")
    try:
        return text.format(**fields)
    except (KeyError, IndexError) as error:
        raise NemoliteError(f"templates.{template} uses the field {error} which this stage does not give; it "
                            f"has {sorted(fields)} (write literal braces as {{{{ and }}}})") from None


def fingerprint(config: Mapping) -> str:
    """A stable text of everything that decides the output, to refuse resuming a different job."""
    return json.dumps(config, sort_keys=True, ensure_ascii=False, default=str)


def read_records(path: str | Path) -> list[dict | str]:
    """The objects of a JSONL file, or the blank-line-separated blocks of any other text file."""
    path = Path(path)
    if not path.is_file():
        raise NemoliteError(f"{path} not found")
    text = path.read_text()
    if path.suffix != ".jsonl":
        return [block.strip() for block in text.split("\n\n") if block.strip()]
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise NemoliteError(f"{path}:{number} is not a JSON line") from None
    return records
