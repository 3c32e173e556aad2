"""Model adapters: every supported architecture, built tiny from its config."""
import pytest
import torch
from torch import nn

from sled_ext.models import UnsupportedModel, adapt, candidate_layers
from tiny_models import ARCHITECTURES, VOCAB, tiny_model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_final_row_through_the_head_is_the_models_logits(arch):
    model = tiny_model(arch)
    adapter = adapt(model)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(7).expand(2, -1)
    layers = list(range(adapter.num_layers))
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True)
        with adapter.capture(layers, select=lambda hidden: hidden[:, 3:]):
            final = adapter.forward(ids, torch.ones_like(ids), positions)[:, 3:]
            premature = adapter.premature_rows(layers)
    torch.testing.assert_close(adapter.head(final), expected.logits[:, 3:].float(),
                               atol=1e-5, rtol=1e-5)
    for layer in layers:  # raw residual stream, numbered as output_hidden_states
        torch.testing.assert_close(premature[layer], expected.hidden_states[layer][:, 3:])


def test_logit_post_processing_is_read_from_the_config():
    assert adapt(tiny_model("gemma2")).softcap == 30.0
    assert adapt(tiny_model("llama")).softcap == 0.0
    assert adapt(tiny_model("llama")).logit_scale == 1.0


def test_premature_norm_applies_the_final_norm():
    model = tiny_model("llama")
    adapter = adapt(model)
    ids = torch.randint(3, VOCAB, (1, 5))
    with torch.no_grad(), adapter.capture([1, 2], select=lambda hidden: hidden[:, -1]):
        adapter.forward(ids, torch.ones_like(ids), torch.arange(5)[None])
        raw = adapter.premature_rows([1, 2])
        normed = adapter.premature_rows([1, 2], premature_norm=True)
    torch.testing.assert_close(normed, model.model.norm(raw))


def test_unsupported_model_names_what_is_missing():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Linear(4, 4)
            self.lm_head = nn.Linear(4, 10)

        def get_output_embeddings(self):
            return self.lm_head

    with pytest.raises(UnsupportedModel, match="no list of decoder blocks"):
        adapt(NoBlocks())


def test_candidate_layers():
    assert candidate_layers("all", 4) == [0, 1, 2, 3]
    assert candidate_layers("stride:2", 6) == [0, 2, 4]
    assert candidate_layers("stride:4", 6) == [2]
    assert candidate_layers([3, 1, 1], 4) == [1, 3]
    with pytest.raises(ValueError, match=r"must be in \[0, 3\]"):
        candidate_layers([4], 4)
    with pytest.raises(ValueError, match="at least one premature layer"):
        candidate_layers([], 4)
    with pytest.raises(ValueError, match='"all", "stride:S"'):
        candidate_layers("top", 4)
