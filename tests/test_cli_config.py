"""One source for every setting: RefinerConfig's field descriptions, the CLI options built from
them, ``--config FILE`` and ``--dump-config`` (issue 11, item 3)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import cgc_refine.cli as cli
from cgc_refine.cli.options import (
    FIT_SETTINGS,
    PRIOR_FILE_KINDS,
    SINGLE_SUBJECT_SETTINGS,
    option_name,
)
from cgc_refine.config import RefinerConfig
from cgc_refine.exceptions import ConfigError

#: A valid value other than the default for every RefinerConfig field: a new field must be
#: added here, which makes this test check that it is reachable from the command line.
NON_DEFAULT = {
    "channels": [4, 8, 16], "norm": "instance", "use_coarse": False, "use_fine": False,
    "patch_size": [2, 2, 2], "proj_dim": 16, "temperature": 0.3, "lambda_cg": 0.5, "lambda_fg": 2.0,
    "crop_size": [32, 32, 16], "batch_size": 3, "learning_rate": 0.001, "iterations": 7,
    "foreground_oversampling": 0.25, "inference_window": [64, 64, 32], "overlap": 0.25,
    "sw_batch_size": 4, "threshold": 0.4, "min_size_mm3": 5.0, "amp": False, "compile": True,
    "num_workers": 2, "log_every": 5, "target_weighting": "none", "intensity_augmentation": False,
    "intensity_alignment": "prior", "cleanup": "focal", "cleanup_output": False, "rounds": 2, "ema_horizon": 0.25, "tta": 4, "anisotropic": False,
    "output_blend": "none", "fallback": False,
}


def run(*args: object):  # noqa: ANN201 - click's Result
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


def dumped(result) -> dict:  # noqa: ANN001
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return json.loads(result.stdout)


def assert_one_line_error(result, phrase: str) -> None:  # noqa: ANN001
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("cgc-refine: error: "), lines
    assert phrase in lines[0], lines[0]


def test_every_field_has_a_non_default_value_here() -> None:
    names = [spec.name for spec in dataclasses.fields(RefinerConfig)]
    assert sorted(NON_DEFAULT) == sorted(names)
    config = RefinerConfig.from_dict(NON_DEFAULT)
    for name in names:
        assert getattr(config, name) != getattr(RefinerConfig(), name), name


def test_every_field_is_described_once() -> None:
    for spec in dataclasses.fields(RefinerConfig):
        assert spec.metadata["help"], spec.name
        assert spec.metadata["help"] in RefinerConfig.__doc__  # the docstring is generated
        assert "default" not in spec.metadata["help"].lower(), spec.name  # stated by the CLI itself


@pytest.mark.parametrize("command", [[], ["fit"]])
def test_cli_options_and_config_file_reach_every_field(tmp_path: Path, command: list[str]) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(NON_DEFAULT))
    values = dumped(run(*command, "--config", settings, "--dump-config"))
    assert values == RefinerConfig.from_dict(NON_DEFAULT).to_dict()
    exposed = SINGLE_SUBJECT_SETTINGS if not command else FIT_SETTINGS
    group = cli.main if not command else cli.main.commands[command[0]]
    flags = {opt for param in group.params for opt in param.opts}
    for name in exposed:
        assert option_name(name) in flags, name


@pytest.mark.parametrize("command", [[], ["fit"]])
def test_options_override_the_config_file_and_fast(tmp_path: Path, command: list[str]) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"iterations": 9, "norm": "group", "tta": 4}))
    values = dumped(run(*command, "--fast", "--config", settings, "--iterations", "3", "--tta", "1",
                        "--crop-size", "16", "16", "16", "--dump-config"))
    expected = RefinerConfig.fast(iterations=3, norm="group", tta=1, crop_size=(16, 16, 16))
    assert values == expected.validate().to_dict()


def test_help_states_the_defaults_from_the_configuration() -> None:
    text = run("--help").stdout
    assert f"default {RefinerConfig().iterations}; with --fast {RefinerConfig.fast().iterations}" in text
    assert "--config FILE" in text and "--dump-config" in text


@pytest.mark.parametrize("command", [[], ["fit"]])
def test_dump_config_round_trip(tmp_path: Path, command: list[str]) -> None:
    first = run(*command, "--fast", "--iterations", "11", "--cleanup", "multifocal", "--dump-config")
    settings = tmp_path / "dumped.json"
    settings.write_text(first.stdout)
    again = run(*command, "--config", settings, "--dump-config")
    assert dumped(again) == dumped(first)
    assert RefinerConfig.from_json(settings) == RefinerConfig.fast(iterations=11, cleanup="multifocal").validate()


@pytest.mark.parametrize("content, phrase", [
    (None, "cannot read settings file"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"bogus": 1}', "unknown refiner settings"),
    ('{"iterations": 0}', "iterations must be >= 1"),
    ('{"amp": "yes"}', "amp must be true or false"),
    ('{"tta": 3}', "tta must be one of 1, 2, 4, 8"),
])
@pytest.mark.parametrize("command", [[], ["fit"]])
def test_bad_config_file_is_one_line_exit_2(tmp_path: Path, content: str | None, phrase: str,
                                            command: list[str]) -> None:
    settings = tmp_path / "settings.json"
    if content is not None:
        settings.write_text(content)
    result = run(*command, "--config", settings, "--dump-config")
    assert_one_line_error(result, phrase)
    assert str(settings) in result.stderr


def test_config_from_json_errors_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown refiner settings"):
        RefinerConfig.from_dict({"window_size": [64, 64, 32]})
    with pytest.raises(ConfigError, match="iterations must be an integer"):
        RefinerConfig().replace({"iterations": "many"})


def test_every_prior_file_kind_is_one_the_adapters_know() -> None:
    import numpy as np

    from cgc_refine.exceptions import InvalidPriorError
    from cgc_refine.priors import PRIOR_KINDS, as_probability_map

    values = np.zeros((8, 8, 8), dtype=np.float32)
    values[2:5, 2:5, 2:5] = 1.0
    for kind in PRIOR_FILE_KINDS:
        try:  # a kind may refuse these values, but never as an unknown kind
            as_probability_map(values, np.eye(4), kind=kind)
        except InvalidPriorError as exc:
            assert "unknown prior kind" not in str(exc), kind
    with pytest.raises(InvalidPriorError, match="unknown prior kind"):
        as_probability_map(values, np.eye(4), kind="guess")
    assert "auto" not in PRIOR_KINDS  # the sources a ProbabilityMap records: another set
