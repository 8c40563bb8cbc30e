"""genai_config.json reading: every malformed dir is one InputError line naming the problem."""

import json

import pytest

from phitune import genai_config
from phitune.errors import InputError


def _dir(tmp_path, content):
    if content is not None:
        (tmp_path / "genai_config.json").write_text(content if isinstance(content, str)
                                                    else json.dumps(content))
    return tmp_path


GOOD = {"model": {"context_length": 4096, "vocab_size": 32064,
                  "decoder": {"filename": "model.onnx", "session_options": {}}}}


def test_fields_of_a_good_config(tmp_path):
    d = _dir(tmp_path, GOOD)
    assert genai_config.context_length(d) == 4096
    assert genai_config.vocab_size(d) == 32064
    assert genai_config.decoder_file(d) == "model.onnx"
    assert genai_config.decoder(d)["session_options"] == {}


def test_decoder_file_defaults_to_model_onnx(tmp_path):
    d = _dir(tmp_path, {"model": {"decoder": {}}})
    assert genai_config.decoder_file(d) == "model.onnx"


@pytest.mark.parametrize("content, reader, message", [
    (None, genai_config.decoder, "is not an onnxruntime-genai model"),
    ("{not json", genai_config.decoder, "cannot read genai_config.json"),
    ([1, 2], genai_config.decoder, "has no 'model' section"),
    ({"model": {}}, genai_config.context_length, "has no model.context_length"),
    ({"model": {"context_length": "long"}}, genai_config.context_length, "not a positive integer"),
    ({"model": {"vocab_size": 0}}, genai_config.vocab_size, "not a positive integer"),
    ({"model": {"decoder": "model.onnx"}}, genai_config.decoder_file, "model.decoder is not an object"),
])
def test_malformed_configs_are_one_clear_error(tmp_path, content, reader, message):
    with pytest.raises(InputError) as err:
        reader(_dir(tmp_path, content))
    assert message in str(err.value) and "\n" not in str(err.value)
