import re

import pytest

from gpusq.cli import main
from gpusq.errors import GpusqError
from gpusq.recipes import list_recipes, load_recipe, parse_override


def test_shipped_recipes():
    assert list_recipes() == ["fp8", "int4", "int8", "sparse"]
    r8, r4, rf, rs = (load_recipe(n) for n in ("int8", "int4", "fp8", "sparse"))
    assert (r8.quant.weight.dtype, r8.quant.act.dtype, r8.sparse) == ("int8", "int8", True)
    assert (r4.quant.weight.dtype, r4.quant.act.dtype) == ("int4", "int8")
    assert (rf.quant.weight.dtype, rf.quant.act.dtype) == ("fp8_e4m3", "fp8_e4m3")
    assert rs.sparse and not rs.quantized
    assert r8.name == "int8" and r4.name == "int4"


def test_user_file_overrides_fields(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("base: int8\nname: mine\ntrain:\n  stage1:\n    epochs: 2\ndistill:\n  layer_weighting: false\n")
    r = load_recipe(str(f))
    assert r.name == "mine" and r.train.stage1.epochs == 2.0 and r.distill.layer_weighting is False
    assert r.quant.weight.dtype == "int8"  # inherited


def test_unknown_key_names_the_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("base: int8\nquant:\n  weight:\n    dtyp: int4\n")
    with pytest.raises(GpusqError, match=r"unknown key 'quant\.weight\.dtyp'.*dtype"):
        load_recipe(str(f))


def test_bad_values(tmp_path):
    with pytest.raises(GpusqError, match="train.stage1.epochs"):
        load_recipe("int8", {"train": {"stage1": {"epochs": "many"}}})
    with pytest.raises(GpusqError, match="int3"):
        load_recipe("int8", {"quant": {"weight": {"dtype": "int3"}}})
    with pytest.raises(GpusqError, match="batch_size"):
        load_recipe("int8", parse_override("train.stage2.batch_size=0"))


def test_importance_and_min_steps_fields(tmp_path, capsys):
    r = load_recipe("int8")
    assert r.distill.importance == "relative" and r.distill.layer_weighting  # the default (docs/results.md)
    assert load_recipe("int4", parse_override("distill.importance=paper")).distill.importance == "paper"
    f = tmp_path / "p.yaml"
    f.write_text("base: int8\ndistill: {importance: paper}\ntrain: {stage2: {min_steps: 0}}\n")
    r = load_recipe(str(f))
    assert r.distill.importance == "paper" and r.train.stage2.min_steps == 0 and r.train.stage1.min_steps > 0
    for over, msg in (("distill.importance=papr", "distill.importance must be one of relative, paper, got 'papr'"),
                      ("distill.importance=1", "bad value for 'distill.importance': 1"),
                      ("train.stage2.min_steps=-1", "min_steps must be >= 0"),
                      ("train.stage2.min_steps=2.5", "bad value for 'train.stage2.min_steps': 2.5")):
        with pytest.raises(GpusqError, match=re.escape(msg)):
            load_recipe("int8", parse_override(over))
    capsys.readouterr()
    assert main(["compress", "--teacher", str(tmp_path), "--data", "mnist5k", "--out", str(tmp_path / "o"),
                 "--set", "distill.importance=papr"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "distill.importance must be one of relative, paper" in err, err


def test_unknown_recipe_lists_recipes(capsys):
    with pytest.raises(GpusqError, match="available: fp8, int4, int8, sparse"):
        load_recipe("int9")
    assert main(["recipes", "int9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown recipe 'int9'" in err


def test_unknown_command(capsys):
    assert main(["stat"]) == 2
    assert "did you mean: stats" in capsys.readouterr().err


def test_shipped_names_are_not_shadowed_by_the_working_directory(tmp_path, monkeypatch, capsys):
    """Issue 17.6: after ``gpusq compress ... --out int8`` (the README's example), ``--recipe int8``,
    ``--recipe int4`` (``base: int8``) and user files that ``base: int8`` still mean the shipped recipes."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "int8"  # what `--out int8` leaves behind
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"x")
    (out / "recipe.yaml").write_text("name: int8\n")
    for name, wdtype in (("int8", "int8"), ("int4", "int4")):
        r = load_recipe(name)
        assert (r.name, r.quant.weight.dtype, r.quant.act.dtype) == (name, wdtype, "int8")
    (tmp_path / "mine.yaml").write_text("base: int8\nname: mine\ntrain: {stage1: {epochs: 2}}\n")
    r = load_recipe("mine.yaml")
    assert r.name == "mine" and r.quant.weight.dtype == "int8" and r.train.stage1.epochs == 2.0
    capsys.readouterr()
    assert main(["recipes", "int4"]) == 0
    assert "dtype: int4" in capsys.readouterr().out
    # the directory named as a path is an error that says how to get the shipped recipe
    with pytest.raises(GpusqError, match=r"^recipe \./int8 is a directory, not a YAML file; "
                                         r"for the shipped recipe write int8$"):
        load_recipe("./int8")
    # a YAML file called like a shipped recipe, without suffix: the bare name stays the shipped one,
    # the file is reached by its path
    (tmp_path / "sparse").write_text("base: int8\nname: local\n")
    assert load_recipe("sparse").name == "sparse" and not load_recipe("sparse").quantized
    assert load_recipe("./sparse").name == "local" and load_recipe("./sparse").quantized
    # a file without suffix that is not a shipped name is read as YAML, as before
    (tmp_path / "myrecipe").write_text("base: int4\nname: myrecipe\n")
    assert load_recipe("myrecipe").quant.weight.dtype == "int4"
    with pytest.raises(GpusqError, match="recipe file not found: nothere.yaml"):
        load_recipe("nothere.yaml")
    with pytest.raises(GpusqError, match="recipe file not found: sub/int8"):
        load_recipe("sub/int8")
    (tmp_path / "somedir").mkdir()
    with pytest.raises(GpusqError, match=r"^recipe somedir is a directory, not a YAML file$"):
        load_recipe("somedir")
