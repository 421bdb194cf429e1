"""The image models of BGmD's experiments: exact parameter counts, output shapes, devices."""

from __future__ import annotations

import pytest
import torch

from median_sgd.models import LeNet, TinyCNN, count_parameters, resnet18


def test_lenet_has_the_authors_parameter_count():
    model = LeNet()
    # conv 1->64 5x5 (1664) + conv 64->64 5x5 (102464) + fc 1024->1024 (1049600) + fc 1024->10
    assert count_parameters(model) == 1_163_978
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_lenet_on_cifar_sized_images():
    model = LeNet(in_channels=3, image_size=32)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError):
        LeNet(image_size=8)


def test_tiny_cnn_has_412_parameters_and_any_image_size():
    model = TinyCNN()
    assert count_parameters(model) == 412
    for side in (8, 28):
        assert model(torch.zeros(3, 1, side, side)).shape == (3, 10)


def test_resnet18_cifar():
    model = resnet18()
    assert count_parameters(model) == 11_173_962  # "11.2M parameters"
    model.eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_models_on_device(device):
    torch.manual_seed(0)
    for model, shape in ((TinyCNN(), (2, 1, 8, 8)), (LeNet(), (2, 1, 28, 28))):
        model = model.to(device.type)  # as a user writes it: "cuda", which tensors report as cuda:0
        assert all(p.device == device for p in model.parameters())
        out = model(torch.zeros(shape, device=device.type))
        assert out.device == device and out.shape == (2, 10)
