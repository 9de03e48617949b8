"""``gpusq.cli``: the shared argument spellings (``--json [FILE]``, ``--model-arg``)."""

from __future__ import annotations

import json

from gpusq.cli import main

TINY = ["--model", "deit_tiny_patch16_224", "--model-arg", "img_size=32,patch_size=8,num_classes=10,depth=1"]


def test_json_to_stdout_or_file(tmp_path, capsys):
    """Bare --json prints only JSON; --json FILE writes it (atomically) and prints the usual table."""
    assert main(["stats", *TINY, "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["model"] == "deit_tiny_patch16_224"
    out = tmp_path / "s.json"
    assert main(["stats", *TINY, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == row and "deit_tiny_patch16_224" in printed and not printed.startswith("{")


def test_one_model_arg_spelling(capsys):
    """--model-arg everywhere (bench and deploy took --model-args before): the old spelling is refused."""
    for cmd in ("stats", "bench", "deploy"):
        argv = [cmd, "--model", "deit_tiny_patch16_224", "--model-args", "depth=1"]
        argv += ["--warmup"] if cmd == "deploy" else []
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        assert rc == 2, cmd
        assert "--model-args" in capsys.readouterr().err
