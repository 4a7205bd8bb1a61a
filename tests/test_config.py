"""--config FILE: keys are option names, the command line overrides, bad keys/types are usage errors."""

import json
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parent.parent / "sample_configs"


def test_config_sets_options_and_cli_overrides(cli, small_mlp, demo_dir, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('penalty = "none"\nepochs = 2\nbatch-size = 50\nlr = 0.01\n')
    out = tmp_path / "o.safetensors"
    r = cli(
        "train-next",
        small_mlp,
        "--data",
        f"{demo_dir}::limit=200",
        "--config",
        cfg,
        "--epochs",
        "1",
        "--device",
        "cpu",
        "-o",
        out,
        "--json",
    )
    assert r.code == 0, r.err
    res = json.loads(r.out)
    assert res["steps"] == 4  # 200 samples / batch 50 from the file, 1 epoch from the command line
    assert res["penalty"] == "none"
    from cl_tool.checkpoint import load_checkpoint

    assert load_checkpoint(out).history[-1]["lr"] == 0.01


def test_unknown_key_is_a_usage_error(cli, small_mlp, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("epochz = 3\n")
    r = cli("train-next", small_mlp, "--data", "x", "--config", cfg, "-o", tmp_path / "o.safetensors")
    assert r.code == 2 and "unknown key 'epochz'" in r.error_line


def test_wrong_type_is_a_usage_error(cli, small_mlp, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('epochs = "many"\n')
    r = cli("train-next", small_mlp, "--data", "x", "--config", cfg, "-o", tmp_path / "o.safetensors")
    assert r.code == 2 and "epochs" in r.err
    assert str(cfg) in r.error_line  # the sentence names the file to fix, not only the option
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize(
    "command,line,key",
    [
        ("train-next", 'lr = "fast"', "lr"),
        ("train-next", "epochs = 2.5", "epochs"),
        ("prune", "sparsity = [0.5, 0.9]", "sparsity"),
        ("evaluate", 'batch-size = "big"', "batch-size"),
    ],
)
def test_wrong_type_names_file_and_key(cli, small_mlp, tmp_path, command, line, key):
    cfg = tmp_path / "c.toml"
    cfg.write_text(line + "\n")
    r = cli(command, small_mlp, "--config", cfg)
    assert r.code == 2, r.err
    assert str(cfg) in r.error_line and f"key {key!r}" in r.error_line, r.error_line
    assert "Traceback" not in r.err


def test_invalid_toml(cli, small_mlp, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("epochs = = 3\n")
    r = cli("importance", small_mlp, "--config", cfg)
    assert r.code == 2 and "not valid TOML" in r.error_line


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_sample_configs_only_use_known_keys(path):
    """Every sample config parses and maps onto options of the command named in its first line."""
    import typer

    from cl_tool.cli import app, config_default_map, register

    first = path.read_text().splitlines()[0]
    if "cl-tool " not in first:
        pytest.skip("not a per-command config")
    command = first.split("cl-tool ", 1)[1].split()[0]
    register()
    group = typer.main.get_command(app)
    assert command in group.commands, first
    mapped = config_default_map(group.commands[command], str(path))
    assert mapped
