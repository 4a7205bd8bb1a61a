"""Help epilogs: examples kept line by line, prose paragraphs joined so the terminal wraps them."""

from cl_tool.cli import COMMANDS, DRIVERS, reflow


def test_reflow_joins_prose_and_keeps_examples():
    text = "Examples:\n\n  cl-tool a --x\n\n  cl-tool b\n  --y\n\nOne paragraph\nin two lines.\n\nAnother.\n"
    assert (
        reflow(text)
        == "Examples:\n\n  cl-tool a --x\n\n  cl-tool b\n  --y\n\nOne paragraph in two lines.\n\nAnother.\n"
    )


def test_every_command_has_examples_in_its_help(cli):
    for name in [*COMMANDS, *DRIVERS]:
        r = cli(name, "--help")
        assert r.code == 0 and "Examples:" in r.out and f"cl-tool {name}" in r.out, name
