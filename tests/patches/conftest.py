"""A model directory with remote code: the tiny model's weights plus our upstream-structured fixture modules."""

import json
import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
FIXTURE_CODE = FIXTURES / "remote_chatglm"
AUTO_MAP = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}


def make_remote_dir(tiny_dir: Path, dest: Path, code: Path = FIXTURE_CODE) -> Path:
    shutil.copytree(tiny_dir, dest)
    for source in code.glob("*.py"):
        shutil.copy(source, dest / source.name)
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "auto_map": AUTO_MAP}, indent=2))
    tokenizer = json.loads((dest / "tokenizer_config.json").read_text())
    tokenizer["auto_map"] = {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=2))
    return dest


@pytest.fixture(scope="session")
def remote_dir(tiny_dir, tmp_path_factory):
    return make_remote_dir(tiny_dir, tmp_path_factory.mktemp("remote") / "chatglm3-remote")


@pytest.fixture(scope="session")
def remote_v1_dir(tmp_path_factory):
    """A ChatGLM-6B tiny model with our upstream-structured v1 fixture modules."""
    from glm_portable.modeling.tiny import make_tiny_model

    tiny = make_tiny_model(tmp_path_factory.mktemp("models") / "tiny1", family="chatglm", seed=5)
    return make_remote_dir(tiny, tmp_path_factory.mktemp("remote") / "chatglm-6b-remote", FIXTURES / "remote_chatglm_v1")
