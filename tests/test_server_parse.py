"""The server's request parsing without a server: chat rendering (template or plain) and the
settings a request maps to (tts_kernels.apps.server.parse)."""
import pytest
from tiny_models import char_tokenizer

from tts_kernels.apps.engine import request_seeds
from tts_kernels.apps.server import APIError, ServerConfig, parse, render_chat
from tts_kernels.search import Settings

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"}]


class FakePolicy:
    def __init__(self, tok, context=64):
        self.tokenizer = tok

        class Cfg:
            max_position_embeddings = context

        class Model:
            config = Cfg()

        self.model = Model()

    def encode(self, text):
        return self.tokenizer(text).input_ids


def test_chat_template_when_the_tokenizer_has_one():
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    assert render_chat(tok, MSGS) == tok.apply_chat_template(MSGS, tokenize=False, add_generation_prompt=True)
    assert render_chat(tok, MSGS).endswith("<|assistant|>")


def test_plain_rendering_without_a_template():
    tok = char_tokenizer()
    assert render_chat(tok, MSGS) == "Be brief.\n\n1+1?\n\n"
    assert render_chat(tok, [{"role": "user", "content": "Q\n\n"}]) == "Q\n\n"


@pytest.mark.parametrize("messages,param", [([], "messages"), ([{"role": "user"}], "messages[0].content"),
                                            ([{"role": "robot", "content": "x"}], "messages[0].role"),
                                            ([{"role": "user", "content": " "}], "messages"), ("hi", "messages")])
def test_bad_messages_name_the_field(messages, param):
    with pytest.raises(APIError) as e:
        render_chat(char_tokenizer(), messages)
    assert e.value.param == param and e.value.status == 400


def test_fields_map_to_settings_and_seeds():
    cfg = ServerConfig(model_name="m", max_budget=8, defaults=Settings(max_new_tokens=20))
    pol = FakePolicy(char_tokenizer())
    job, opts = parse({"model": "m", "prompt": ["ab", "cd"], "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
                       "seed": 11, "n": 2, "budget": 4, "agg": "min", "stop": "x"}, chat=False, cfg=cfg, policy=pol,
                      has_verifier=True)
    assert job.settings == Settings(max_new_tokens=7, temperature=0.5, top_p=0.9, agg="min", stop=("x",))
    assert job.strategy == "best_of_n" and job.budget == 4 and job.seeds == request_seeds(11, 2)
    assert opts["n"] == 2 and opts["prompt_tokens"] == len(pol.encode("ab")) + len(pol.encode("cd"))
    # Defaults: one sample; greedy at temperature 0; majority without a verifier.
    assert parse({"model": "m", "prompt": "a"}, chat=False, cfg=cfg, policy=pol, has_verifier=True)[0].strategy \
        == "majority"
    assert parse({"model": "m", "prompt": "a", "temperature": 0}, chat=False, cfg=cfg, policy=pol,
                 has_verifier=True)[0].strategy == "greedy"
    assert parse({"model": "m", "prompt": "a", "budget": 4}, chat=False, cfg=cfg, policy=pol,
                 has_verifier=False)[0].strategy == "majority"
    with pytest.raises(APIError, match="needs a verifier"):
        parse({"model": "m", "prompt": "a", "strategy": "dvts"}, chat=False, cfg=cfg, policy=pol, has_verifier=False)
    with pytest.raises(APIError) as e:  # 60 prompt tokens + 20 new > a context of 64
        parse({"model": "m", "prompt": "x" * 60}, chat=False, cfg=cfg, policy=pol, has_verifier=True)
    assert e.value.param == "max_tokens"
    # A file path on the server is not a request's to choose.
    with pytest.raises(APIError, match="set by the server") as e:
        parse({"model": "m", "prompt": "a", "budget": 4, "optimal_table": "/etc/passwd"}, chat=False, cfg=cfg,
              policy=pol, has_verifier=True)
    assert e.value.param == "optimal_table"
