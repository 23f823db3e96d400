"""torch.compile: the attached layer traces into the model's one graph (no graph break), forward and backward."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_llama

from randlora_io.train import RandloraConfig
from randlora_io.train import attach


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_an_attached_model_compiles_to_one_graph(dropout):
    import torch._dynamo as dynamo

    dynamo.reset()
    model = tiny_llama(layers=1)
    attach(model, RandloraConfig(r=4, dropout=dropout))
    model.train()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    explained = dynamo.explain(model)(input_ids=ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
@pytest.mark.parametrize("tokens", [3, 64])            # the factored and the merged path
def test_fullgraph_compiled_layer_gives_eager_outputs_and_gradients(shape, tokens):
    import torch._dynamo as dynamo

    dynamo.reset()
    out_f, in_f = shape
    model = torch.nn.Sequential(torch.nn.Linear(in_f, out_f), torch.nn.GELU(), torch.nn.Linear(out_f, in_f))
    handle = attach(model, RandloraConfig(r=4, target_modules=["0", "2"]))
    with torch.no_grad():
        for i, p in enumerate(handle.parameters()):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(7))

    def grads(fn):
        for p in handle.parameters():
            p.grad = None
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.square().sum().backward()
        return [y.detach(), xi.grad] + [p.grad.clone() for p in handle.parameters()]

    eager = grads(model)
    compiled = grads(torch.compile(model, backend="aot_eager", fullgraph=True))
    for a, e in zip(compiled, eager):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
