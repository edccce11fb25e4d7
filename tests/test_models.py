import pytest
import torch

from mnistflow import models


@pytest.mark.parametrize("name", models.MODELS)
def test_every_model_maps_images_to_ten_logits(name):
    net = models.build(name).eval()
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    text = models.summary(net)
    assert f"{models.count_params(net):,}" in text.splitlines()[-1]


def test_pipeline_doc_architectures_have_their_sizes():
    # Conv32 (320) + dense 5408 -> 10 (54,090)
    assert models.count_params(models.baseline()) == 54_410
    # Conv64 (640) + dense 10816 -> 128 (1,384,576) + dense 128 -> 10 (1,290)
    assert models.count_params(models.enhanced()) == 1_386_506


def test_servable_normalises_and_returns_probabilities():
    torch.manual_seed(0)
    net = models.build("baseline").eval()
    served = models.servable(net, mean=0.5, std=0.25)
    pixels = torch.rand(4, 1, 28, 28)
    probabilities = served(pixels)
    assert torch.allclose(probabilities.sum(1), torch.ones(4))
    assert torch.allclose(probabilities, torch.softmax(net((pixels - 0.5) / 0.25), 1))
