import pytest

from conftest import run_cli


@pytest.mark.slow
def test_cli_help_lists_commands():
    result = run_cli("--help")
    assert "caption" in result.stdout


def test_tiny_clip_fixture_loads(tiny_clip_dir):
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(tiny_clip_dir)
    tokens = CLIPTokenizer.from_pretrained(tiny_clip_dir)("a man riding a horse.", return_tensors="pt")
    # transformers 5: get_text_features returns an output object whose pooler_output is the projection.
    assert model.get_text_features(**tokens).pooler_output.shape == (1, 32)
