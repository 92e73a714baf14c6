"""HFPolicy's chat rendering: prompts as user turns through the tokenizer's chat template (checked against
apply_chat_template), the template's end-of-turn token ending completions, and the refusals."""
import pytest
from tiny_models import char_tokenizer, tiny_llama

from tts_kernels.models import HFPolicy
from tts_kernels.models.policy import MATH_SYSTEM_PROMPT
from tts_kernels.search import Settings, run

pytestmark = pytest.mark.models

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer(template=TEMPLATE):
    tok = char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


def test_prompts_render_as_the_template_does():
    tok = chat_tokenizer()
    model = tiny_llama(3)
    model.resize_token_embeddings(len(tok))
    policy = HFPolicy(model, tok, chat_template=True, system_prompt=MATH_SYSTEM_PROMPT)
    msgs = [{"role": "system", "content": MATH_SYSTEM_PROMPT}, {"role": "user", "content": "1+1?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert policy.render("1+1?") == text
    assert policy.encode("1+1?") == tok(text, add_special_tokens=False).input_ids
    assert policy.encode("1+1?")[0] == tok.bos_token_id and policy.encode("1+1?").count(tok.bos_token_id) == 1
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in policy.eos_token_ids and tok.eos_token_id in policy.eos_token_ids
    plain = HFPolicy(model, tok)
    assert plain.encode("1+1?") == tok("1+1?").input_ids and im_end not in plain.eos_token_ids
    # A search runs on it; no completion goes past an end of turn.
    res = run("majority", policy, None, ["1+1?"], budget=3, settings=Settings(max_new_tokens=12), seed=0)
    assert all(im_end not in (c.token_ids or [])[:-1] for c in res.candidates[0])


def test_refusals_name_what_is_missing():
    model = tiny_llama(3)
    with pytest.raises(ValueError, match="has no chat template"):
        HFPolicy(model, char_tokenizer(), chat_template=True)
    with pytest.raises(ValueError, match="renders without the content"):
        HFPolicy(model, chat_tokenizer("{% for m in messages %}<|im_start|>{{ m['role'] }}{% endfor %}"),
                 chat_template=True)
    with pytest.raises(ValueError, match="renders without the content"):  # drops the system turn
        HFPolicy(model, chat_tokenizer("{% for m in messages if m['role'] == 'user' %}{{ m['content'] }}{% endfor %}"),
                 chat_template=True, system_prompt="Be brief.")
    with pytest.raises(ValueError, match="system_prompt needs chat_template"):
        HFPolicy(model, chat_tokenizer(), system_prompt="Be brief.")
