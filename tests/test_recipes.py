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


def test_unknown_recipe_lists_recipes(capsys):
    with pytest.raises(GpusqError, match="available: fp8, int4, int8, sparse"):
        load_recipe("int9")
    assert main(["recipes", "int9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown recipe 'int9'" in err


def test_unknown_command(capsys):
    assert main(["stat"]) == 2
    assert "did you mean: stats" in capsys.readouterr().err
