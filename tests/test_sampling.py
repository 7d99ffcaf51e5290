"""Sampling defaults come from the config's chat section defaults wherever no config or request gives them."""

import json

from typer.testing import CliRunner

from medtune.cli import app
from medtune.config import ChatConfig
from medtune.infer.server import parse_chat_request


def test_a_request_without_sampling_fields_gets_the_config_defaults():
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}).encode()
    _, args, _ = parse_chat_request(body, "m")
    assert (args["temperature"], args["top_p"]) == (ChatConfig().temperature, ChatConfig().top_p)


def test_medtune_chat_without_a_config_uses_the_config_defaults():
    help_text = CliRunner().invoke(app, ["chat", "--help"], env={"COLUMNS": "200"}).output
    chat = ChatConfig()
    for value in (chat.temperature, chat.top_p, chat.max_tokens, chat.n_ctx):
        assert f"[default: {value}]" in help_text
