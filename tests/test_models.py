import pytest
import torch
from opacus.validators import ModuleValidator

from fedcore.errors import ConfigError
from fedcore.models import build_model


def tiny_user_model(*, input_shape, num_classes):
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(int(torch.tensor(input_shape).prod()), num_classes)
    )


def not_a_model(*, input_shape, num_classes):
    return "nope"


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (64,)])
def test_builtin_models_shapes_and_opacus_compatibility(name, shape):
    model = build_model(name, input_shape=shape, num_classes=10)
    assert model(torch.zeros(5, *shape)).shape == (5, 10)
    assert ModuleValidator.validate(model, strict=False) == []


def test_user_model_by_reference():
    model = build_model("tests.test_models:tiny_user_model", input_shape=(3, 4), num_classes=2)
    assert model(torch.zeros(2, 3, 4)).shape == (2, 2)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("resnet", "unknown model 'resnet'"),
        ("no.such.module:fn", "could not be loaded"),
        ("tests.test_models:missing", "could not be loaded"),
        ("tests.test_models:not_a_model", "not a torch.nn.Module"),
    ],
)
def test_bad_model_names(name, fragment):
    with pytest.raises(ConfigError, match=fragment):
        build_model(name, input_shape=(64,), num_classes=10)


def test_cnn_refuses_non_image_input():
    with pytest.raises(ConfigError, match="needs image input"):
        build_model("cnn", input_shape=(20,), num_classes=3)
