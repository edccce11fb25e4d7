import pytest
import torch

from mnistflow import models


@pytest.mark.parametrize("mirror", ["off", "on"])
@pytest.mark.parametrize("name", models.MODELS)
def test_every_model_maps_images_to_ten_logits(name, mirror):
    net = models.build(name, mirror).eval()
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    text = models.summary(net)
    assert f"{models.count_params(net):,}" in text.splitlines()[-1]


def test_pipeline_doc_architectures_have_their_sizes():
    # Conv32 (320) + dense 5408 -> 10 (54,090)
    assert models.count_params(models.baseline()) == 54_410
    # Conv64 (640) + dense 10816 -> 128 (1,384,576) + dense 128 -> 10 (1,290)
    assert models.count_params(models.enhanced()) == 1_386_506


@pytest.mark.parametrize("name", models.MODELS)
def test_pooling_before_relu_is_the_usual_conv_relu_pool_exactly(name):
    torch.manual_seed(0)
    net = models.build(name).train()
    layers = list(net)
    pooled = [i for i, layer in enumerate(layers) if isinstance(layer, torch.nn.MaxPool2d)]
    assert pooled and all(isinstance(layers[i + 1], torch.nn.ReLU) for i in pooled)
    for i in pooled:  # the textbook order: ReLU, then pool
        layers[i], layers[i + 1] = layers[i + 1], layers[i]
    textbook = torch.nn.Sequential(*layers)
    x = torch.randn(16, 1, 28, 28)
    outputs, grads = [], []
    for model in (net, textbook):
        torch.manual_seed(1)  # the same dropout masks
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        outputs.append(out)
        grads.append([p.grad.clone() for p in model.parameters()])
    assert torch.equal(outputs[0], outputs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_servable_normalises_and_returns_probabilities():
    torch.manual_seed(0)
    net = models.build("baseline").eval()
    served = models.servable(net, mean=0.5, std=0.25)
    pixels = torch.rand(4, 1, 28, 28)
    probabilities = served(pixels)
    assert torch.allclose(probabilities.sum(1), torch.ones(4))
    assert torch.allclose(probabilities, torch.softmax(net((pixels - 0.5) / 0.25), 1))


def test_mirrored_trains_on_either_view_and_predicts_the_mean_of_both():
    torch.manual_seed(0)
    net = models.build("baseline")  # no batch norm or dropout: the same function in train and eval mode
    mirrored = models.Mirrored(net)
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        plain, flipped = net(x), net(x.flip(3))
        trained_on = mirrored.train()(x)
        predicted = mirrored.eval()(x)
    assert torch.allclose(predicted, (plain + flipped) / 2, atol=1e-5)
    as_plain = torch.isclose(trained_on, plain, atol=1e-5).all(1)
    as_flipped = torch.isclose(trained_on, flipped, atol=1e-5).all(1)
    assert (as_plain | as_flipped).all()
    assert 16 <= as_flipped.sum() <= 48  # about half of the batch is mirrored
