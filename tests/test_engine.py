"""The engine's task-independent parts: which layers a family compresses and distils under a recipe."""

import pytest

from gpusq.distill import DEFAULT_FEATURE_PATTERN
from gpusq.engine import feature_pattern, sparsity_config
from gpusq.errors import GpusqError
from gpusq.pipeline import ClassificationAdapter
from gpusq.recipes import load_recipe
from gpusq.sparsity import DEFAULT_INCLUDE


def test_family_patterns_unless_the_recipe_names_its_own():
    from gpusq.tasks.pipeline import MASKRCNN, TaskAdapter

    task = TaskAdapter(MASKRCNN, None, 4, None)
    r = load_recipe("int8")
    assert tuple(sparsity_config(task, r).include) == MASKRCNN.include  # the family's GEMMs by default
    assert feature_pattern(task, r.distill).features == MASKRCNN.features
    mine = load_recipe("int8", {"sparsity": {"include": [r"attn\.qkv$"], "exclude": ["x"]},
                                "distill": {"features": r"fpn\.layer_blocks\.\d+$"}})
    s = sparsity_config(task, mine)
    assert list(s.include) == [r"attn\.qkv$"] and list(s.exclude) == ["x"]  # the recipe's own: honoured
    assert feature_pattern(task, mine.distill).features == r"fpn\.layer_blocks\.\d+$"
    cls = ClassificationAdapter(None, None, flip=False)  # classification: always the recipe's
    assert tuple(sparsity_config(cls, r).include) == tuple(DEFAULT_INCLUDE)
    assert feature_pattern(cls, r.distill).features == DEFAULT_FEATURE_PATTERN


def test_task_refuses_label_smoothing():
    from gpusq.tasks.pipeline import check_recipe

    check_recipe(load_recipe("int8"))
    with pytest.raises(GpusqError, match=r"train\.stage1\.label_smoothing is for classification"):
        check_recipe(load_recipe("int8", {"train": {"stage1": {"label_smoothing": 0.1}}}))
