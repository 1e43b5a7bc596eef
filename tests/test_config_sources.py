"""Flags from CONVEYOR_* variables and a --config YAML file: precedence, parsing, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from server.cli import build_parser, parse_args
from server.config_sources import ConfigError, layerable_actions, parse_bool

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "configs" / "conveyor.yaml"


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "conveyor.yaml"
    path.write_text(text)
    return str(path)


def _serve_parser():
    return build_parser()._subparsers._group_actions[0].choices["serve"]  # noqa: SLF001


def test_precedence_cli_over_env_over_file_over_default(tmp_path):
    cfg = _write(tmp_path, "max-num-seqs: 11\n")
    env = {"CONVEYOR_MAX_NUM_SEQS": "22"}
    assert parse_args(["serve"], {}).max_num_seqs == 256
    assert parse_args(["serve", "--config", cfg], {}).max_num_seqs == 11
    assert parse_args(["serve", "--config", cfg], env).max_num_seqs == 22
    assert parse_args(["serve", "--config", cfg, "--max-num-seqs", "33"], env).max_num_seqs == 33
    # The file may also come from $CONVEYOR_CONFIG; --config wins over it.
    other = tmp_path / "other.yaml"
    other.write_text("max_num_seqs: 44\n")
    assert parse_args(["serve"], {"CONVEYOR_CONFIG": str(other)}).max_num_seqs == 44
    assert parse_args(["serve", f"--config={cfg}"],
                      {"CONVEYOR_CONFIG": str(other)}).max_num_seqs == 11


def test_layers_mix_per_flag_and_keep_types(tmp_path):
    cfg = _write(tmp_path, "port: 9001\nhost: 0.0.0.0\ngpu_memory_utilization: 0.5\n"
                           "dtype: bfloat16\n")
    args = parse_args(["serve", "--config", cfg, "--host", "::1"], {"CONVEYOR_PORT": "9002"})
    assert (args.host, args.port, args.gpu_memory_utilization, args.dtype) == (
        "::1", 9002, 0.5, "bfloat16")
    assert args.max_num_batched_tokens == 2048


@pytest.mark.parametrize(("text", "expected"), [
    ("true", True), ("TRUE", True), ("1", True), ("yes", True), ("Yes", True),
    ("false", False), ("False", False), ("0", False), ("no", False), ("NO", False),
])
def test_bool_strings(text, expected):
    assert parse_bool(text, "src") is expected


def test_bool_flags_from_env_and_file(tmp_path):
    env = {"CONVEYOR_ENABLE_PREFIX_CACHING": "no", "CONVEYOR_VLLM_METRIC_NAMES": "1"}
    args = parse_args(["serve"], env)
    assert (args.enable_prefix_caching, args.vllm_metric_names) == (False, True)
    # The command line still wins, in both directions.
    args = parse_args(["serve", "--enable-prefix-caching"], env)
    assert args.enable_prefix_caching is True
    cfg = _write(tmp_path, "enable-prefix-caching: false\nvllm-metric-names: yes\n")
    args = parse_args(["serve", "--config", cfg], {})
    assert (args.enable_prefix_caching, args.vllm_metric_names) == (False, True)
    args = parse_args(["serve", "--config", cfg], {"CONVEYOR_VLLM_METRIC_NAMES": "false"})
    assert args.vllm_metric_names is False
    with pytest.raises(ConfigError) as err:
        parse_bool("maybe", "environment variable CONVEYOR_X")
    assert str(err.value) == ("environment variable CONVEYOR_X: invalid boolean value: 'maybe' "
                              "(use true/false, 1/0 or yes/no)")


def test_unknown_file_key_fails_naming_file_and_key(tmp_path, capsys):
    cfg = _write(tmp_path, "port: 1\nmax-num-seq: 8\n")
    with pytest.raises(SystemExit) as exc:
        parse_args(["serve", "--config", cfg], {})
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"conveyor serve: error: config file {cfg}: key 'max-num-seq': "
        "not a flag of 'conveyor serve'")


@pytest.mark.parametrize(("yaml_text", "env", "message"), [
    ("port: eighty\n", {}, "config file {cfg}: key 'port': invalid int value: 'eighty'"),
    ("dtype: fp8\n", {}, "config file {cfg}: key 'dtype': invalid choice: 'fp8' (choose from "
                         "'auto', 'float32', 'bfloat16', 'float16')"),
    ("port: true\n", {}, "config file {cfg}: key 'port': expected a value of type int, got True"),
    ("", {"CONVEYOR_MAX_NUM_SEQS": "lots"},
     "environment variable CONVEYOR_MAX_NUM_SEQS: invalid int value: 'lots'"),
    ("", {"CONVEYOR_ENABLE_PREFIX_CACHING": "on?"},
     "environment variable CONVEYOR_ENABLE_PREFIX_CACHING: invalid boolean value: 'on?' "
     "(use true/false, 1/0 or yes/no)"),
])
def test_bad_value_fails_naming_the_source(tmp_path, capsys, yaml_text, env, message):
    cfg = _write(tmp_path, yaml_text)
    with pytest.raises(SystemExit) as exc:
        parse_args(["serve", "--config", cfg], env)
    assert exc.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == "conveyor serve: error: " + message.format(cfg=cfg)


def test_bad_file_fails_naming_the_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SystemExit):
        parse_args(["serve", "--config", str(missing)], {})
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"conveyor serve: error: config file {missing}: cannot read it: "
        "No such file or directory")
    cfg = _write(tmp_path, "- port\n")
    with pytest.raises(SystemExit):
        parse_args(["serve", "--config", cfg], {})
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"conveyor serve: error: config file {cfg}: expected a mapping of flag names to "
        "values, got list")


def test_unknown_env_only_warns(capsys):
    env = {"CONVEYOR_MAX_NUM_SEQZ": "3", "CONVEYOR_NATIVE_CPU": "0", "CONVEYOR_PROMPT": "hi",
           "CONVEYOR_API_KEY": "sekret", "CONVEYOR_PORT": "", "OTHER": "x"}
    args = parse_args(["serve"], env)
    # CONVEYOR_API_KEY is the --api-key flag; run_server also still reads it itself.
    assert (args.max_num_seqs, args.api_key, args.port) == (256, "sekret", 8000)
    # CONVEYOR_PROMPT is a flag of `generate`, CONVEYOR_NATIVE_CPU a known non-flag: silent.
    assert capsys.readouterr().err.splitlines() == [
        "conveyor serve: warning: environment variable CONVEYOR_MAX_NUM_SEQZ is not a flag "
        "of 'conveyor serve'; ignored"]


def test_generate_list_flags_are_replaced_not_extended(tmp_path):
    cfg = _write(tmp_path, "prompt: [a, b]\nstop: '.'\nmax_tokens: 5\n")
    args = parse_args(["generate", "--config", cfg], {})
    assert (args.prompt, args.stop, args.max_tokens) == (["a", "b"], ["."], 5)
    args = parse_args(["generate", "--config", cfg, "--prompt", "c"], {"CONVEYOR_STOP": "!"})
    assert (args.prompt, args.stop) == (["c"], ["!"])
    with pytest.raises(SystemExit):  # --prompt is still required when no layer gives it
        parse_args(["generate"], {})


def test_example_config_parses_and_every_key_is_a_flag():
    data = yaml.safe_load(EXAMPLE.read_text())
    serve = _serve_parser()
    actions = layerable_actions(serve)
    assert set(data) - {k.replace("_", "-") for k in actions} == set()
    assert len(data) == 19
    args = parse_args(["serve", "--config", str(EXAMPLE)], {})
    defaults = parse_args(["serve"], {})
    # The example spells out the defaults, so it changes nothing.
    assert vars(args) | {"config": None} == vars(defaults)
    assert args.config == str(EXAMPLE)


def test_help_documents_config_and_env():
    out = subprocess.run([sys.executable, "-m", "server", "serve", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    flat = " ".join(out.split())
    assert "--config PATH" in flat
    assert "CONVEYOR_MAX_NUM_SEQS" in flat
    assert "Precedence: command line > environment > config file > defaults." in flat
